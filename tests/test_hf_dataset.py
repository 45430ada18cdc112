"""--dataset_name as a local Hugging Face dataset: imagefolder (metadata.jsonl / .csv), parquet, save_to_disk
(issue 33, item 4). Nothing here touches the network: the hub is switched off before `datasets` is imported."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` reads it: these tests never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dreamcoeff.train import data, main  # noqa: E402
from dreamcoeff.train.data import DataError  # noqa: E402
from dreamcoeff.train.dataset_source import read_dataset  # noqa: E402
from tests.helpers import make_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")
SIZES = ((64, 64), (80, 64), (64, 96), (72, 72))
CAPTIONS = ["a photo of sks dog, sitting", "a photo of sks dog, red", "sks dog on grass", "a  photo of sks dog"]


def needs_datasets():
    return pytest.importorskip("datasets", reason="the `datasets` extra (pip install 'dreamcoeff[datasets]')")


def caption_folder(root: Path) -> Path:
    """The reference: images with .txt caption files, read by --instance_dir --caption_ext .txt."""
    folder = make_images(root / "captions", sizes=SIZES, seed=1)
    for path, caption in zip(data.list_images(folder), CAPTIONS):
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


def as_imagefolder(src: Path, dst: Path, metadata: str = "jsonl") -> Path:
    """The same images in Hugging Face's imagefolder layout (metadata.jsonl or metadata.csv)."""
    dst.mkdir(parents=True)
    images = data.list_images(src)
    for p in images:
        shutil.copy(p, dst / p.name)
    rows = [{"file_name": p.name, "text": p.with_suffix(".txt").read_text(encoding="utf-8")} for p in images]
    if metadata == "jsonl":
        (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import csv

        with open(dst / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return dst


def as_parquet(src: Path, file: Path, image_column="image", caption_column="text") -> Path:
    """The same images as parquet rows of PNG bytes, written with pyarrow alone (as the hub's files are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = data.list_images(src)
    table = pa.table({
        image_column: [{"bytes": p.read_bytes(), "path": p.name} for p in images],
        caption_column: [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images],
    })  # fmt: skip
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file)
    return file


def batches(images, captions=None, caption_ext=None, prompt="unused prompt") -> list[dict]:
    """Two epochs of collated batches as the trainer forms them (buckets, flips, repeats)."""
    ds = data.DreamBoothDataset(images, prompt, resolution=64, caption_ext=caption_ext, captions=captions,
                                random_flip=True, use_buckets=True, repeats=2, seed=3, warn=lambda m: None)  # fmt: skip
    sampler = data.BucketBatchSampler(ds, 2, seed=3, indices=ds.instance_indices)
    out = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        out += [data.collate_examples([ds[i] for i in idx]) for idx in sampler]
    return out


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g["captions"] == w["captions"] and g["indices"] == w["indices"]
        assert torch.equal(g["pixel_values"], w["pixel_values"])
        assert torch.equal(g["add_time_ids"], w["add_time_ids"]) and torch.equal(g["flipped"], w["flipped"])


# --------------------------------------------------------------------------------------------
# The same images and captions, four ways
# --------------------------------------------------------------------------------------------


def test_metadata_jsonl_reader_agrees_with_datasets_imagefolder(tmp_path):
    datasets = needs_datasets()
    folder = as_imagefolder(caption_folder(tmp_path), tmp_path / "imagefolder")
    ours = read_dataset(str(folder))  # the built-in reader (no dependency)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", streaming=True,
                                   cache_dir=str(tmp_path / "cache")).cast_column("image", datasets.Image(decode=False))  # fmt: skip
    assert [(p.resolve(), c) for p, c in ours] == [
        (Path(r["image"]["path"]).resolve(), " ".join(r["text"].split())) for r in theirs
    ]


@pytest.mark.parametrize("layout", ["metadata.jsonl", "metadata.csv", "parquet folder", "parquet file", "save_to_disk"])
def test_a_dataset_gives_the_batches_of_its_caption_files(tmp_path, layout):
    ref = caption_folder(tmp_path)
    want = batches(data.list_images(ref), caption_ext=".txt")
    if layout == "metadata.jsonl":
        name = as_imagefolder(ref, tmp_path / "ds")
    else:
        needs_datasets()
        if layout == "metadata.csv":
            name = as_imagefolder(ref, tmp_path / "ds", metadata="csv")
        elif layout == "parquet folder":  # the hub's layout
            name = as_parquet(ref, tmp_path / "ds" / "data" / "train-00000-of-00001.parquet").parents[1]
        elif layout == "parquet file":
            name = as_parquet(ref, tmp_path / "one.parquet")
        else:
            import datasets

            datasets.Dataset.from_parquet(str(as_parquet(ref, tmp_path / "p.parquet")),
                                          cache_dir=str(tmp_path / "cache")).save_to_disk(str(tmp_path / "ds"))  # fmt: skip
            name = tmp_path / "ds"
    rows = read_dataset(str(name), cache_dir=str(tmp_path / "cache"))
    assert [c for _, c in rows] == [" ".join(c.split()) for c in CAPTIONS]
    assert_same_batches(batches([p for p, _ in rows], captions=dict(rows)), want)


def test_parquet_image_bytes_are_written_once_and_duplicates_keep_their_captions(tmp_path):
    needs_datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = next(iter(data.list_images(make_images(tmp_path / "img")))).read_bytes()
    file = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"image": [{"bytes": png, "path": None}] * 2, "text": ["first", "second"]}), file)
    rows = read_dataset(str(file), cache_dir=str(tmp_path / "cache"))
    assert [c for _, c in rows] == ["first", "second"] and rows[0][0] != rows[1][0]
    assert all(p.read_bytes() == png and p.suffix == ".png" for p, _ in rows)
    mtimes = [p.stat().st_mtime_ns for p, _ in rows]
    assert [p for p, _ in read_dataset(str(file), cache_dir=str(tmp_path / "cache"))] == [p for p, _ in rows]
    assert [p.stat().st_mtime_ns for p, _ in rows] == mtimes  # not rewritten


def test_other_columns(tmp_path):
    needs_datasets()
    file = as_parquet(caption_folder(tmp_path), tmp_path / "x.parquet", image_column="img", caption_column="prompt")
    rows = read_dataset(str(file), image_column="img", caption_column="prompt", cache_dir=str(tmp_path / "c"))
    assert [c for _, c in rows] == [" ".join(c.split()) for c in CAPTIONS]


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the dataset, the row and the column
# --------------------------------------------------------------------------------------------


def test_bad_datasets_are_named(tmp_path):
    needs_datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = caption_folder(tmp_path)
    cache = str(tmp_path / "cache")

    def refused(name, message, **kw):
        with pytest.raises(DataError) as err:
            read_dataset(str(name), cache_dir=cache, **kw)
        assert str(err.value).startswith(f"--dataset_name {name}") and message in str(err.value), str(err.value)

    file = as_parquet(ref, tmp_path / "a.parquet", caption_column="caption")
    refused(file, "no caption column 'text' (columns: image, caption); pass --caption_column")
    refused(file, "no image column 'picture' (columns: image, caption); pass --image_column",
            image_column="picture", caption_column="caption")  # fmt: skip
    csv_folder = as_imagefolder(ref, tmp_path / "csv", metadata="csv")
    (csv_folder / "img2.png").unlink()
    refused(csv_folder, "row 2 column 'image': image")
    refused(csv_folder, "img2.png does not exist")
    plain = make_images(tmp_path / "plain")
    refused(plain, "no caption column 'text' (columns: image)")
    refused(plain, "metadata.jsonl")  # the hint for a folder of images alone
    empty = tmp_path / "empty.parquet"
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([], struct), "text": pa.array([], pa.string())}), empty)
    refused(empty, "has no rows")
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b"not an image", "path": "a.png"}], "text": ["x"]}), broken)
    refused(broken, "row 0 column 'image': the bytes are not an image")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(
        pa.table({"image": [{"bytes": (ref / "img0.png").read_bytes(), "path": "a.png"}], "text": [3]}), numbers
    )
    refused(numbers, "row 0: the caption in 'text' is int, not text")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(
        pa.table(
            {
                "image": [{"bytes": (ref / "img0.png").read_bytes(), "path": "a.png"}],
                "text": pa.array([None], pa.string()),
            }
        ),
        nulls,
    )
    refused(nulls, "row 0: no caption in 'text' (null)")
    refused(ref / "img0.png", "a file must be .parquet")
    refused(tmp_path / "nowhere", "no such folder or file")


def test_hub_ids_are_refused_offline(tmp_path, monkeypatch):
    needs_datasets()
    import datasets

    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset was called for a hub id while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub datasets cannot be read offline .*huggingface-cli download"):
        read_dataset("someone/dogs", cache_dir=str(tmp_path))


def test_without_datasets_only_metadata_jsonl_folders_are_read(tmp_path, monkeypatch):
    ref = caption_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert len(read_dataset(str(as_imagefolder(ref, tmp_path / "ds")))) == len(SIZES)
    with pytest.raises(
        DataError, match=r"--dataset_name .*one\.parquet: a parquet file .*pip install 'dreamcoeff\[datasets\]'"
    ):
        read_dataset(str(tmp_path / "one.parquet"))


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def test_the_trainer_refuses_a_bad_dataset_before_any_model_loads(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    needs_datasets()
    import dreamcoeff.train.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the dataset was checked")

    monkeypatch.setattr(loop, "load_components", no_model)
    file = as_parquet(caption_folder(tmp_path), tmp_path / "a.parquet", caption_column="caption")
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--dataset_name", str(file),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 2
    assert f"--dataset_name {file}: no caption column 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_training_from_parquet_equals_training_from_caption_files(tiny_pipeline_dir, tmp_path, monkeypatch):
    datasets = needs_datasets()
    from tests.trainer_runs import assert_same_weights, final_adapter_weights

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # image bytes go here
    ref = caption_folder(tmp_path)
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--resolution", "64", "--report_to", "none",
              "--checkpointing_steps", "0", "--max_train_steps", "3", "--random_flip", "--seed", "7"]  # fmt: skip
    parquet = as_parquet(ref, tmp_path / "ds" / "train.parquet").parent
    assert main([*common, "--dataset_name", str(parquet), "--output_dir", str(tmp_path / "a")]) == 0
    assert (
        main([*common, "--instance_dir", str(ref), "--caption_ext", ".txt", "--output_dir", str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "hf-cache" / "dreamcoeff-images").is_dir()
    got, want = final_adapter_weights(tmp_path / "a"), final_adapter_weights(tmp_path / "b")
    assert any(v.abs().max() > 0 for v in want.values())  # it trained
    assert_same_weights(got, want, atol=0)


def test_real_photos_as_parquet_give_the_batches_of_their_folder(tmp_path):
    """DreamBooth's dog photos (JPEG, EXIF) packed as parquet bytes, as a hub dataset has them."""
    from tests.conftest import SHARED_DREAMBOOTH

    folder = SHARED_DREAMBOOTH / "dog"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here")
    needs_datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = data.list_images(folder)
    file = tmp_path / "dog.parquet"
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
        "text": ["a photo of sks dog"] * len(images),
    }
    pq.write_table(pa.table(rows), file)
    got = read_dataset(str(file), cache_dir=str(tmp_path / "cache"))
    assert [p.name for p, _ in got] == [p.name for p in images]
    ds_batches = batches([p for p, _ in got], captions=dict(got))
    assert_same_batches(ds_batches, batches(images, prompt="a photo of sks dog"))  # --instance_dir + prompt
