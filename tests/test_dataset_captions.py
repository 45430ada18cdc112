"""--dataset_name (image folder with metadata.jsonl), --caption_dropout and [trigger] (issue 17, item 4)."""

from __future__ import annotations

import json

import pytest

from dreamcoeff.train import main
from dreamcoeff.train.data import DataError
from dreamcoeff.train.dataset_source import read_dataset_folder, substitute_trigger
from tests.helpers import make_images

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


def _dataset(folder, rows):
    make_images(folder)  # 0.png, 1.png, 2.png
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return folder


def test_metadata_rows_give_images_and_captions(tmp_path):
    names = sorted(p.name for p in make_images(tmp_path / "probe").iterdir())
    rows = [{"file_name": n, "text": f"a  photo of [trigger] dog {i}", "extra": 1} for i, n in enumerate(names)]
    folder = _dataset(tmp_path / "ds", rows)
    got = read_dataset_folder(str(folder))
    assert [p.name for p, _ in got] == names
    assert got[0][1] == "a photo of [trigger] dog 0"  # whitespace runs collapsed like caption files
    # another caption column, and an image column
    rows = [{"img": n, "prompt": "x"} for n in names]
    folder2 = _dataset(tmp_path / "ds2", rows)
    assert [p.name for p, _ in read_dataset_folder(str(folder2), "img", "prompt")] == names


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        ([{"file_name": "0.png", "caption": "x"}], {}, "no caption column 'text' (columns: file_name, caption)"),
        ([{"file_name": "nope.png", "text": "x"}], {}, "does not exist"),
        ([{"text": "x"}], {}, "no image column 'image' or 'file_name'"),
        ([{"file_name": "0.png", "text": 3}], {}, "is int, not text"),
        (["just a string"], {}, "expected a JSON object"),
    ],
)
def test_bad_metadata_is_named_with_its_line(tmp_path, rows, kwargs, message):
    names = sorted(p.name for p in make_images(tmp_path / "probe").iterdir())
    rows = [json.loads(json.dumps(r).replace("0.png", names[0])) for r in rows]
    folder = _dataset(tmp_path / "ds", rows)
    with pytest.raises(DataError) as err:
        read_dataset_folder(str(folder), **kwargs)
    assert message in str(err.value) and "metadata.jsonl line 1" in str(err.value)


def test_missing_metadata_and_hub_ids_are_refused(tmp_path):
    make_images(tmp_path / "plain")
    with pytest.raises(DataError, match="no metadata.jsonl"):
        read_dataset_folder(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="hub datasets are not downloaded"):
        read_dataset_folder("someone/dogs")


def test_trigger_substitution():
    assert substitute_trigger("a [trigger] dog by [trigger]", "sks", "x") == "a sks dog by sks"
    assert substitute_trigger("a dog", None, "x") == "a dog"
    with pytest.raises(DataError, match="no --trigger_word"):
        substitute_trigger("a [trigger] dog", None, "img.png: its caption")


@pytest.mark.slow
def test_trainer_reads_a_dataset_folder_with_dropout_and_trigger(tiny_pipeline_dir, tmp_path, monkeypatch):
    import dreamcoeff.train.loop as loop

    names = sorted(p.name for p in make_images(tmp_path / "probe").iterdir())
    folder = _dataset(tmp_path / "ds", [{"file_name": n, "text": f"a photo of [trigger] dog, pose {i}"}
                                        for i, n in enumerate(names)])  # fmt: skip
    seen: list[list[str]] = []
    real = loop.Trainer.dropped_captions

    def spy(self, batch, micro):
        out = real(self, batch, micro)
        seen.append(out)
        return out

    monkeypatch.setattr(loop.Trainer, "dropped_captions", spy)
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--dataset_name", str(folder),
            "--trigger_word", "sks", "--caption_dropout", "0.5", "--output_dir", str(tmp_path / "out"),
            "--resolution", "64", "--report_to", "none", "--checkpointing_steps", "0", "--max_train_steps", "12",
            "--validation_prompt", "a [trigger] dog on the beach", "--num_validation_images", "1",
            "--validation_inference_steps", "1"]  # fmt: skip
    assert main(argv) == 0
    flat = [c for batch in seen for c in batch]
    assert "" in flat and any(c.startswith("a photo of sks dog, pose") for c in flat)
    assert not any("[trigger]" in c for c in flat)
    dropped = sum(c == "" for c in flat) / len(flat)
    assert 0.1 < dropped < 0.9  # about half of 12
    # the same seed draws the same dropout (exact resume)
    seen2: list[list[str]] = []
    monkeypatch.setattr(
        loop.Trainer, "dropped_captions", lambda self, b, m: seen2.append(real(self, b, m)) or seen2[-1]
    )
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "out2")
    assert main(argv) == 0
    assert seen2 == seen
    # --trigger_word missing: one line naming the image
    argv2 = [a for a in argv if a not in ("--trigger_word", "sks")]
    argv2[argv2.index(str(tmp_path / "out2"))] = str(tmp_path / "out3")
    assert main(argv2) == 2


def test_dataset_flags_are_checked(tmp_path, capsys):
    inst = make_images(tmp_path / "inst")
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    assert main([*base, "--instance_dir", str(inst), "--dataset_name", str(inst), "--instance_prompt", "p"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--dataset_name", str(inst), "--caption_dropout", "1.0"]) == 2
    assert "--caption_dropout must be in [0, 1)" in capsys.readouterr().err
