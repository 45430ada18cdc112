"""--dataset_config: several subsets in kohya's TOML layout (issue 33, item 4).

The one-folder flags must keep giving the batches they gave before subsets existed (golden digests
recorded from the code before the change); repeats, per-subset captions, shuffle_caption with
keep_tokens, caption dropout and is_reg subsets are checked against counts and captions written out
here, and every bad file is refused with its line and key before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from dreamcoeff.train import COMPLETE_NAME, data, main
from dreamcoeff.train.config import parse_args
from dreamcoeff.train.dataset_config import key_lines, read_dataset_config
from dreamcoeff.train.errors import UsageError
from dreamcoeff.train.step import with_class_batch
from tests.conftest import SHARED_DREAMBOOTH
from tests.helpers import make_images
from tests.trainer_runs import final_adapter_weights

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")

FLAGS = {"resolution": 64, "batch_size": 2, "enable_bucket": True}
QUIET = dict(resolution=64, seed=5, warn=lambda m: None)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def read(path: Path, **kw):
    return read_dataset_config(path, defaults=kw.pop("defaults", {}), flags=kw.pop("flags", FLAGS), **kw)


def folders(root: Path) -> tuple[Path, Path, Path]:
    a = make_images(root / "a", sizes=((64, 64), (80, 64), (64, 96)), seed=1)  # img0..img2
    b = make_images(root / "b", sizes=((64, 64), (72, 72)), seed=2)  # img0..img1
    reg = make_images(root / "reg", sizes=((64, 64), (70, 64), (64, 64)), seed=3)
    return a, b, reg


# --------------------------------------------------------------------------------------------
# The one-folder flags: exactly the batches of before
# --------------------------------------------------------------------------------------------


def _flag_batches(root: Path, subsets_of=None) -> list[dict]:
    """Two epochs of batches as the trainer forms them (sampler, collate, class batch, caption dropout),
    from the flags, or from `subsets_of(inst, cls, classes)` instead."""
    inst = make_images(root / "inst", sizes=((64, 64), (80, 64), (64, 96), (72, 72)), seed=1)
    (inst / "img1.txt").write_text("a photo of sks dog, sitting, red")
    cls = make_images(root / "cls", sizes=((64, 64), (70, 64), (64, 64)), seed=2)
    out = []
    for buckets, classes in ((True, False), (False, True)):
        kwargs = dict(caption_ext=".txt", random_flip=True, use_buckets=buckets, repeats=2, seed=5, warn=lambda m: None)
        if subsets_of is not None:
            kwargs["subsets"] = subsets_of(inst, cls, classes)
        ds = data.DreamBoothDataset(
            data.list_images(inst),
            "a photo of sks dog",
            resolution=64,
            class_images=data.list_images(cls) if classes else (),
            class_prompt="a photo of a dog" if classes else None,
            **kwargs,
        )
        sampler = data.BucketBatchSampler(ds, 2, seed=5, indices=ds.instance_indices)
        cfg = types.SimpleNamespace(seed=5, caption_dropout=0.4, train_batch_size=2)
        accelerator = types.SimpleNamespace(process_index=0, num_processes=1)
        micro = 0
        for epoch in range(2):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            for idx in sampler:
                micro += 1
                batch = data.collate_examples([ds[i] for i in idx])
                if classes:
                    batch = with_class_batch(batch, ds, cfg, micro, accelerator)
                rates = [ds.dropout_rate(i, cfg.caption_dropout) for i in batch["indices"]]
                dropped = data.drop_captions(batch["captions"], rates, cfg.seed, micro, 0)
                out.append(dict(indices=batch["indices"], captions=batch["captions"], dropped=dropped,
                                time_ids=batch["add_time_ids"].tolist(), is_class=batch["is_class"].tolist(),
                                pixels=hashlib.sha256(batch["pixel_values"].numpy().tobytes()).hexdigest()[:16]))  # fmt: skip
    return out


def test_one_folder_flags_give_the_batches_they_gave_before(tmp_path):
    batches = _flag_batches(tmp_path)
    pixels = [b.pop("pixels") for b in batches]
    assert len(batches) == 16
    # Recorded from the trainer before --dataset_config existed (commit 19eee5f): indices, captions, the
    # caption-dropout draws, SDXL's time ids (crops, flips, buckets), class batches. Change them and
    # every resumed or repeated run of the one-folder flags changes.
    structure = hashlib.sha256(json.dumps(batches, sort_keys=True).encode()).hexdigest()
    assert structure == "3ad31dc46ad5dfe4497885461ecd22282768a0fa042fd74c49ff49236ce71dc9"
    # The pixels too (this one also moves if Pillow's LANCZOS resize ever changes)
    assert hashlib.sha256(json.dumps(pixels).encode()).hexdigest() == (
        "d6bf51a034cf294328607a3e2e24697a6ec1db1e548a46e6924f026100d7cbbf"
    )


def test_the_same_folders_as_a_config_give_the_same_batches(tmp_path):
    def from_config(inst, cls, classes):
        reg = f'\n[[datasets.subsets]]\nimage_dir = "{cls}"\nis_reg = true\n' if classes else ""
        toml = write_toml(tmp_path / f"d{classes}.toml", f"""
            [general]
            caption_extension = ".txt"
            [[datasets]]
            [[datasets.subsets]]
            image_dir = "{inst}"
            num_repeats = 2
            class_tokens = "a photo of sks dog"
            caption_dropout_rate = 0.4
            {reg}""")  # fmt: skip
        flags = dict(FLAGS, enable_bucket=not classes)
        return list(read(toml, flags=flags, class_prompt="a photo of a dog").subsets)

    assert _flag_batches(tmp_path / "config", from_config) == _flag_batches(tmp_path / "flags")


# --------------------------------------------------------------------------------------------
# Repeats, captions, shuffling, dropout
# --------------------------------------------------------------------------------------------


def test_repeats_set_the_samples_per_epoch(tmp_path):
    a, b, reg = folders(tmp_path)
    toml = write_toml(tmp_path / "d.toml", f"""
        [general]
        num_repeats = 3        # b inherits it
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{a}"
          class_tokens = "sks dog"
          num_repeats = 2
          [[datasets.subsets]]
          image_dir = "{b}"
          class_tokens = "sks dog"
          [[datasets.subsets]]
          image_dir = "{reg}"
          class_tokens = "dog"
          is_reg = true
          num_repeats = 1
        """)  # fmt: skip
    ds = data.DreamBoothDataset((), "", subsets=read(toml).subsets, **QUIET)
    assert len(ds.instance_indices) == 3 * 2 + 2 * 3 and len(ds.class_indices) == 3
    sampler = data.BucketBatchSampler(ds, 2, seed=5, indices=ds.instance_indices)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = Counter(str(ds.examples[i].image_path) for batch in sampler for i in batch)
        want = {str(p): 2 for p in data.list_images(a)} | {str(p): 3 for p in data.list_images(b)}
        assert seen == want  # every instance image `num_repeats` times per epoch, no class image


def test_captions_per_subset(tmp_path):
    a, b, reg = folders(tmp_path)
    (a / "img0.txt").write_text("sks dog on a sofa")
    (a / "img1.caption").write_text("not read: a's extension is .txt")
    (b / "img1.caption").write_text("sks dog, from b")  # b reads kohya's default extension
    (reg / "img2.txt").write_text("a dog in the snow")
    toml = write_toml(tmp_path / "d.toml", f"""
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{a}"
        caption_extension = "txt"
        class_tokens = "sks dog"
        [[datasets.subsets]]
        image_dir = "{b}"
        [[datasets.subsets]]
        image_dir = "{reg}"
        is_reg = true
        caption_extension = ".txt"
        """)  # fmt: skip
    parsed = read(toml, instance_prompt="a photo of sks dog", class_prompt="a photo of a dog")
    ds = data.DreamBoothDataset((), "", subsets=parsed.subsets, **QUIET)
    got = {(e.image_path.parent.name, e.image_path.name): e.caption for e in ds.examples}
    assert got == {
        ("a", "img0.png"): "sks dog on a sofa",
        ("a", "img1.png"): "sks dog",  # class_tokens where the caption file is missing
        ("a", "img2.png"): "sks dog",
        ("b", "img0.png"): "a photo of sks dog",  # no class_tokens: --instance_prompt
        ("b", "img1.png"): "sks dog, from b",
        ("reg", "img0.png"): "a photo of a dog",  # --class_prompt
        ("reg", "img1.png"): "a photo of a dog",
        ("reg", "img2.png"): "a dog in the snow",
    }
    assert [e.is_class for e in ds.examples] == [False] * 5 + [True] * 3


def test_shuffle_caption_keeps_the_first_keep_tokens(tmp_path):
    a, _, _ = folders(tmp_path)
    tags = ["sks dog", "red collar", "sitting", "on grass", "sunny", "photo"]
    for img in data.list_images(a):
        img.with_suffix(".txt").write_text(",".join(tags))  # no spaces: shuffled tags are stripped, joined with ", "
    toml = write_toml(tmp_path / "d.toml", f"""
        [general]
        shuffle_caption = true
        keep_tokens = 2
        caption_extension = ".txt"
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{a}"
        """)  # fmt: skip
    ds = data.DreamBoothDataset((), "", subsets=read(toml).subsets, **QUIET)
    firsts, orders = Counter(), set()
    for epoch in range(200):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            got = ds[i]["caption"].split(", ")
            assert got[:2] == tags[:2] and sorted(got[2:]) == sorted(tags[2:])
            assert got == ds.caption(i, epoch).split(", ")  # the item's caption is the seeded one
            firsts[got[2]] += 1
            orders.add(tuple(got))
    assert len(orders) > 20  # 24 orders of the 4 shuffled tags
    assert all(105 < firsts[t] < 195 for t in tags[2:]), firsts  # uniform: 600 draws, 150 each (sd about 11)
    # seeded: another dataset with the same seed shuffles alike, another seed does not
    again = data.DreamBoothDataset((), "", subsets=read(toml).subsets, **QUIET)
    other = data.DreamBoothDataset((), "", subsets=read(toml).subsets, **{**QUIET, "seed": 6})
    assert [again.caption(i, 3) for i in range(3)] == [ds.caption(i, 3) for i in range(3)]
    assert [other.caption(i, e) for i in range(3) for e in range(5)] != [
        ds.caption(i, e) for i in range(3) for e in range(5)
    ]
    # keep_tokens 0 with shuffling off: the caption as written
    plain = write_toml(
        tmp_path / "p.toml", f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{a}"\ncaption_extension = ".txt"\n'
    )
    ds = data.DreamBoothDataset((), "", subsets=read(plain).subsets, **QUIET)
    assert ds[0]["caption"] == ",".join(tags)


def test_shuffled_captions_are_encoded_like_the_pipeline_encodes_them(tiny_pipe):
    from dreamcoeff.train.text import TextConditioning

    components = types.SimpleNamespace(tokenizer=tiny_pipe.tokenizer, tokenizer_2=tiny_pipe.tokenizer_2,
                                       text_encoder=tiny_pipe.text_encoder, text_encoder_2=tiny_pipe.text_encoder_2)  # fmt: skip
    text = TextConditioning(components, torch.device("cpu"), torch.float32, ["a photo of sks dog"])
    prompts = ["sks dog, red, sitting", "sks dog, sitting, red"]  # not cached: two orders of one caption
    embeds, pooled = text(prompts)
    with torch.no_grad():  # diffusers' own SDXL prompt encoding, the independent reference
        want, _, want_pooled, _ = tiny_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=1e-5)
    assert set(text.embeddings) == {"a photo of sks dog"}  # shuffled orders are not kept


def test_caption_dropout_rate_per_subset(tmp_path):
    a, b, reg = folders(tmp_path)
    toml = write_toml(tmp_path / "d.toml", f"""
        [general]
        caption_dropout_rate = 0.25   # b inherits it
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{a}"
        class_tokens = "sks dog"
        caption_dropout_rate = 0.6
        [[datasets.subsets]]
        image_dir = "{b}"
        class_tokens = "sks dog"
        [[datasets.subsets]]
        image_dir = "{reg}"
        class_tokens = "dog"
        is_reg = true
        """)  # fmt: skip
    ds = data.DreamBoothDataset((), "", subsets=read(toml).subsets, **QUIET)
    groups = {"a": [], "b": [], "reg": []}
    indices = list(range(len(ds)))
    for micro in range(1, 601):
        rates = [ds.dropout_rate(i, 0.0) for i in indices]
        dropped = data.drop_captions([ds.examples[i].caption for i in indices], rates, 5, micro, 0)
        for i, caption in zip(indices, dropped):
            groups[ds.examples[i].image_path.parent.name].append(caption == "")
    rate = {k: sum(v) / len(v) for k, v in groups.items()}
    assert abs(rate["a"] - 0.6) < 0.05 and abs(rate["b"] - 0.25) < 0.05, rate  # 1800 / 1200 draws
    assert rate["reg"] == 0.0  # class images keep their prompt, as with --class_dir
    # an is_reg subset may not ask for dropout itself
    bad = write_toml(
        tmp_path / "bad.toml", toml.read_text().replace("is_reg = true", "is_reg = true\ncaption_dropout_rate = 0.1")
    )
    with pytest.raises(UsageError, match=r"bad.toml line 15: caption_dropout_rate: regularisation images"):
        read(bad)


def test_reg_subsets_are_prior_preservation_like_class_dir(tmp_path):
    inst, _, cls = folders(tmp_path)
    toml = write_toml(tmp_path / "d.toml", f"""
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{inst}"
        num_repeats = 2
        [[datasets.subsets]]
        image_dir = "{cls}"
        is_reg = true
        """)  # fmt: skip
    common = dict(center_crop=False, random_flip=True, use_buckets=False, **QUIET)
    flags = data.DreamBoothDataset(data.list_images(inst), "a photo of sks dog", class_images=data.list_images(cls),
                                   class_prompt="a photo of a dog", repeats=2, **common)  # fmt: skip
    parsed = read(toml, flags=dict(FLAGS, enable_bucket=False), instance_prompt="a photo of sks dog",
                  class_prompt="a photo of a dog")  # fmt: skip
    config = data.DreamBoothDataset((), "", subsets=parsed.subsets, **common)
    assert (config.instance_indices, config.class_indices) == (flags.instance_indices, flags.class_indices)
    cfg = types.SimpleNamespace(seed=5, train_batch_size=2)
    for accelerator in (types.SimpleNamespace(process_index=r, num_processes=2) for r in range(2)):
        for micro in range(1, 8):
            got, want = (
                with_class_batch(data.collate_examples([ds[i] for i in (0, 1)]), ds, cfg, micro, accelerator)
                for ds in (config, flags)
            )
            assert got["indices"] == want["indices"] and got["captions"] == want["captions"]
            assert torch.equal(got["pixel_values"], want["pixel_values"])
            assert torch.equal(got["is_class"], want["is_class"]) and got["is_class"][2:].all()


def test_the_shipped_example_is_a_valid_config(tmp_path, monkeypatch):
    example = Path(__file__).resolve().parents[1] / "examples" / "dataset.toml"
    monkeypatch.chdir(tmp_path)  # its image_dir paths are relative, read from the current directory
    for name, n in (("dog", 2), ("dog_close_ups", 1), ("dogs", 3)):
        make_images(tmp_path / "photos" / name, sizes=((64, 64),) * n)
    parsed = read(example, flags={"resolution": 1024, "batch_size": 1, "enable_bucket": False})
    assert [(len(s.images), s.repeats, s.is_class, s.prompt) for s in parsed.subsets] == [
        (2, 10, False, "sks dog"),
        (1, 5, False, "sks dog"),
        (3, 1, True, "dog"),
    ]
    assert [s.shuffle_caption for s in parsed.subsets] == [True, True, False] and parsed.subsets[0].keep_tokens == 1


def test_real_photos_in_place():
    folder = SHARED_DREAMBOOTH / "dog"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        toml = write_toml(Path(tmp) / "d.toml", f"""
            [[datasets]]
            [[datasets.subsets]]
            image_dir = "{folder}"
            class_tokens = "a photo of sks dog"
            num_repeats = 4
            """)  # fmt: skip
        (subset,) = read(toml).subsets
    assert subset.images == tuple(data.list_images(folder)) and subset.repeats == 4 and subset.prompt


# --------------------------------------------------------------------------------------------
# Bad files: the line and the key, before any model
# --------------------------------------------------------------------------------------------

GOOD = """\
[general]
shuffle_caption = false
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  class_tokens = "sks dog"
"""


@pytest.mark.parametrize(
    "change, line, message",
    [
        (('image_dir = "{a}"', 'image_dir = "{a}/nope"'), 6, "image_dir: {a}/nope does not exist"),
        (("num_repeats = 2", "num_repeats = 0"), 7, "num_repeats: must be at least 1, got 0"),
        (("num_repeats = 2", 'num_repeats = "2"'), 7, "num_repeats: must be an integer, got '2' (str)"),
        (("num_repeats = 2", "num_repeats = 2.5"), 7, "num_repeats: must be an integer, got 2.5"),
        (("num_repeats = 2", "num_repats = 2"), 7, "num_repats: unknown key (known here: caption_dropout_rate,"),
        (("shuffle_caption = false", 'shuffle_caption = "yes"'), 2, "shuffle_caption: must be true or false"),
        (("shuffle_caption = false", 'image_dir = "x"'), 2, "image_dir: image_dir belongs in a [[datasets.subsets]]"),
        (("resolution = 64", "resolution = 1024"), 4, "resolution: says 1024, but --resolution is 64"),
        (("resolution = 64", "batch_size = 4"), 4, "batch_size: says 4, but --train_batch_size is 1"),
        (("resolution = 64", "keep_tokens = -1"), 4, "keep_tokens: must be at least 0, got -1"),
        (("resolution = 64", "caption_dropout_rate = 1.0"), 4, "caption_dropout_rate: must be in [0, 1), got 1.0"),
        (('class_tokens = "sks dog"', 'class_tokens = "sks dog'), 8, "not valid TOML"),  # tomllib: "at line 8"
    ],
)
def test_bad_config_names_the_line_and_key_before_any_model(tmp_path, capsys, change, line, message):
    a, _, _ = folders(tmp_path)
    text = GOOD.format(a=a).replace(change[0].format(a=a), change[1].format(a=a))
    toml = tmp_path / "bad.toml"
    toml.write_text(text, encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_config", str(toml),
            "--resolution", "64", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2  # a model that does not exist: the config was refused before anything loaded it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-model" not in err, err
    assert message.format(a=a) in err, err
    where = f"at line {line}" if message == "not valid TOML" else f"{toml} line {line}"
    assert where in err, err


def test_other_bad_configs(tmp_path, capsys):
    a, _, reg = folders(tmp_path)
    base = ["--pretrained_model_name_or_path", "m", "--resolution", "64", "--output_dir", str(tmp_path / "o")]

    def refused(text: str, *extra: str) -> str:
        toml = tmp_path / "x.toml"
        toml.write_text(textwrap.dedent(text), encoding="utf-8")
        assert main([*base, "--dataset_config", str(toml), *extra]) == 2
        return capsys.readouterr().err

    assert "no [[datasets]] table" in refused("[general]\nkeep_tokens = 1\n")
    assert "x.toml line 1: this dataset has no [[datasets.subsets]]" in refused("[[datasets]]\nresolution = 64\n")
    assert "x.toml line 2: this subset has no image_dir" in refused(
        "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1\n"
    )
    assert "x.toml line 1: seed: unknown key" in refused("seed = 3\n")
    one = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{a}"\n'
    # no caption for an image: the subset's line, the image, and what to add
    assert "x.toml line 2: " in (err := refused(one)) and "img0.png has no .caption caption file" in err
    assert "class_tokens" in err
    assert "not both" in refused(one, "--instance_dir", str(a))
    with_reg = one + f'class_tokens = "sks dog"\n[[datasets.subsets]]\nimage_dir = "{reg}"\nis_reg = true\n'
    err = refused(with_reg, "--with_prior_preservation", "--class_prompt", "a dog", "--class_data_dir", str(reg))
    assert "drop --class_data_dir" in err
    assert "x.toml line 5" in refused(with_reg, "--with_prior_preservation")  # the reg images have no caption
    with_reg += 'class_tokens = "a dog"\n'
    assert "x.toml line 5 (" in (err := refused(with_reg)) and "is_reg subsets are prior preservation's class" in err
    only_reg = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{reg}"\nis_reg = true\nclass_tokens = "dog"\n'
    assert "every subset is is_reg" in refused(only_reg, "--with_prior_preservation")
    assert "enable_bucket: says true" in refused(
        "[general]\nenable_bucket = true\n" + with_reg, "--with_prior_preservation"
    )
    # a good file passes the checks: the flags parse
    (tmp_path / "x.toml").write_text(with_reg, encoding="utf-8")
    cfg = parse_args([*base, "--dataset_config", str(tmp_path / "x.toml"), "--with_prior_preservation"])
    assert cfg.dataset_config and cfg.with_prior_preservation


def test_key_lines_follow_tables_and_comments():
    text = '# c\n[general]\n  a = 1 # x\n[[datasets]]\n"b" = 2\n  [[ datasets.subsets ]]\nc=3\n[[datasets.subsets]]\nc = 4\n[[datasets]]\n[[datasets.subsets]]\nd = 5\n'
    lines = key_lines(text)
    assert lines[(("general",), "a")] == 3 and lines[(("datasets", 0), "b")] == 5
    assert lines[(("datasets", 0, "subsets", 0), "c")] == 7 and lines[(("datasets", 0, "subsets", 1), "c")] == 9
    assert lines[(("datasets", 1, "subsets", 0), "d")] == 12 and lines[(("datasets", 1), None)] == 10


# --------------------------------------------------------------------------------------------
# Training from a TOML file
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_from_a_config_equals_the_flags_and_counts_repeats(tiny_pipeline_dir, tmp_path):
    inst, b, cls = folders(tmp_path)
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--resolution", "64", "--report_to", "none",
              "--checkpointing_steps", "0", "--train_batch_size", "2", "--random_flip", "--coeff_lr", "1e-2",
              "--with_prior_preservation", "--class_prompt", "a photo of a dog", "--seed", "3"]  # fmt: skip
    toml = write_toml(tmp_path / "d.toml", f"""
        [[datasets]]
        batch_size = 2
        [[datasets.subsets]]
        image_dir = "{inst}"
        num_repeats = 2
        class_tokens = "a photo of sks dog"
        [[datasets.subsets]]
        image_dir = "{cls}"
        is_reg = true
        """)  # fmt: skip
    assert main([*common, "--dataset_config", str(toml), "--output_dir", str(tmp_path / "toml")]) == 0
    flags = ["--instance_dir", str(inst), "--instance_prompt", "a photo of sks dog", "--repeats", "2",
             "--class_data_dir", str(cls), "--num_class_images", "3"]  # fmt: skip
    assert main([*common, *flags, "--output_dir", str(tmp_path / "flags")]) == 0
    got, want = final_adapter_weights(tmp_path / "toml"), final_adapter_weights(tmp_path / "flags")
    assert got.keys() == want.keys() and got and all(torch.equal(got[k], want[k]) for k in want)
    assert any(want[k].abs().max() > 0 for k in want)  # it trained
    steps = json.loads((tmp_path / "toml" / COMPLETE_NAME).read_text())["global_step"]
    assert steps == 3 * 2 // 2  # one epoch: 3 images x 2 repeats, 2 a batch
    card = (tmp_path / "toml" / "README.md").read_text(encoding="utf-8")
    assert f"the subsets of --dataset_config {toml}" in card and "'the is_reg subsets'" not in card

    # several subsets, shuffled captions, dropout, buckets: one epoch is their repeats' sum of batches
    for img in data.list_images(b):
        img.with_suffix(".txt").write_text("sks dog, red, on grass, sunny")
    many = write_toml(tmp_path / "many.toml", f"""
        [general]
        shuffle_caption = true
        keep_tokens = 1
        caption_extension = ".txt"
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{inst}"
        class_tokens = "sks dog"
        caption_dropout_rate = 0.3
        [[datasets.subsets]]
        image_dir = "{b}"
        num_repeats = 3
        """)  # fmt: skip
    argv = [*common[: common.index("--with_prior_preservation")], "--train_batch_size", "1",
            "--dataset_config", str(many), "--output_dir", str(tmp_path / "many")]  # fmt: skip
    assert main(argv) == 0
    steps = json.loads((tmp_path / "many" / COMPLETE_NAME).read_text())["global_step"]
    assert steps == 3 + 2 * 3


# --------------------------------------------------------------------------------------------
# Resuming: the file's contents are recorded, not only its path
# --------------------------------------------------------------------------------------------


def test_an_edited_config_is_noticed_on_resume_and_by_a_completed_run(tmp_path, caplog):
    from dreamcoeff.train.card import TrainResult
    from dreamcoeff.train.checkpoints import (
        DATASET_CONFIG_DIGEST,
        check_resume_args,
        completed_run,
        run_args_json,
        write_completion_record,
    )

    a, _, _ = folders(tmp_path)
    toml = write_toml(tmp_path / "d.toml", f"""
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{a}"
        class_tokens = "sks dog"
        """)  # fmt: skip
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "m", "--dataset_config", str(toml), "--output_dir", str(out)]
    cfg = parse_args(argv)
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "args.json").write_text(run_args_json(cfg), encoding="utf-8")
    saved = json.loads((checkpoint / "args.json").read_text(encoding="utf-8"))
    assert saved[DATASET_CONFIG_DIGEST] == hashlib.sha256(toml.read_bytes()).hexdigest()
    write_completion_record(cfg, TrainResult(out, 2, 1, 1, 0.0, 0))
    # args.json given back as --config is the same run (its digest is no flag)
    assert parse_args(["--config", str(checkpoint / "args.json")]) == cfg

    with caplog.at_level("WARNING", logger="dreamcoeff"):
        check_resume_args(cfg, checkpoint)
    assert "changed settings" not in caplog.text
    assert completed_run(cfg, out) is not None  # the same file: nothing to do

    toml.write_text(toml.read_text(encoding="utf-8").replace('"sks dog"', '"sks dog"\nnum_repeats = 3'))
    edited = parse_args(argv)
    assert edited == cfg  # the same flags: only the contents tell them apart
    with caplog.at_level("WARNING", logger="dreamcoeff"):
        check_resume_args(edited, checkpoint)
    new = hashlib.sha256(toml.read_bytes()).hexdigest()
    assert f"the contents of --dataset_config {toml} (SHA-256 {saved[DATASET_CONFIG_DIGEST][:12]} in the " \
           f"checkpoint, {new[:12]} now)" in caplog.text  # fmt: skip
    assert completed_run(edited, out) is None  # no longer complete: a resume trains on


def test_runs_without_a_config_record_no_digest(tmp_path):
    from dreamcoeff.train.checkpoints import DATASET_CONFIG_DIGEST, run_args

    inst = make_images(tmp_path / "inst")
    cfg = parse_args(["--pretrained_model_name_or_path", "m", "--instance_dir", str(inst), "--instance_prompt", "p"])
    assert DATASET_CONFIG_DIGEST not in run_args(cfg)  # args.json of earlier runs compare as before


@pytest.mark.slow
def test_a_resume_after_editing_the_config_warns(tiny_pipeline_dir, tmp_path, caplog):
    a, _, _ = folders(tmp_path)
    toml = write_toml(tmp_path / "d.toml", f"""
        [[datasets]]
        [[datasets.subsets]]
        image_dir = "{a}"
        class_tokens = "sks dog"
        """)  # fmt: skip
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--dataset_config", str(toml),
            "--output_dir", str(out), "--resolution", "64", "--report_to", "none", "--checkpointing_steps", "1"]  # fmt: skip
    assert main([*argv, "--max_train_steps", "2"]) == 0
    digest = hashlib.sha256(toml.read_bytes()).hexdigest()
    for args in (out / "args.json", out / "checkpoint-2" / "args.json"):  # the run's and its checkpoint's
        assert json.loads(args.read_text(encoding="utf-8"))["dataset_config_sha256"] == digest
    toml.write_text(toml.read_text(encoding="utf-8").replace('"sks dog"', '"sks dog"\nnum_repeats = 2'))
    with caplog.at_level("WARNING", logger="dreamcoeff"):
        assert main([*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    assert f"with changed settings: the contents of --dataset_config {toml} (SHA-256 {digest[:12]}" in caplog.text
