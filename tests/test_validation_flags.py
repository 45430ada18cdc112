"""Validation that users can steer: negative prompt, guidance, size, a kohya-style prompt file, step 0, wandb."""

import inspect
from pathlib import Path

import pytest
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from dreamcoeff.train import list_checkpoints, main
from dreamcoeff.train.config import TrainConfig, UsageError, parse_args
from dreamcoeff.train.validation import _log_images, _render_settings
from dreamcoeff.train.validation_prompts import (
    ValidationPrompt,
    parse_prompt_line,
    parse_prompt_text,
    read_prompt_file,
    validation_prompts,
)
from tests.helpers import make_images
from tests.trainer_runs import run_killed_after_checkpoint, trainer_argv


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# ---- the prompt file ------------------------------------------------------------------------------


def test_line_with_every_kohya_option():
    vp = parse_prompt_line("a photo of sks dog --n blurry, low quality --w 1024 --h 768 --d 42 --l 6.5 --s 30")
    assert vp == ValidationPrompt(
        "a photo of sks dog",
        negative_prompt="blurry, low quality",
        width=1024,
        height=768,
        seed=42,
        guidance_scale=6.5,
        steps=30,
    )
    assert parse_prompt_line("  a sks dog  ") == ValidationPrompt("a sks dog")


def test_text_skips_blank_lines_and_comments():
    text = "# my prompts\n\na sks dog --d 3\n   \n  # indented comment\na sks dog on the beach --l 7\n"
    assert parse_prompt_text(text) == [
        ValidationPrompt("a sks dog", seed=3),
        ValidationPrompt("a sks dog on the beach", guidance_scale=7.0),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("a dog --x 3", "unknown option --x (known: --n negative prompt, --w width"),
        ("a dog --w wide", "option --w (width) needs a whole number, got 'wide'"),
        ("a dog --l high", "option --l (guidance scale) needs a number, got 'high'"),
        ("a dog --d 1.5", "option --d (seed) needs a whole number"),
        ("a dog --w 1020", "--w 1020: the width must be a positive multiple of 8"),
        ("a dog --h 0", "--h 0: the height must be a positive multiple of 8"),
        ("a dog --s 0", "--s 0: steps must be >= 1"),
        ("a dog --n", "option --n (negative prompt) needs a value"),
        ("--w 512 a dog", "the line starts with an option"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# first line is a comment\na good prompt --w 512\n{line}\n", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        read_prompt_file(path)
    text = str(err.value)
    assert text.startswith(f"--validation_prompts {path}, line 3: ") and message in text, text
    assert "\n" not in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no prompts in it"):
        read_prompt_file(tmp_path / "empty.txt")


# ---- flags ----------------------------------------------------------------------------------------

BASE = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "a photo of TOK dog"]


def test_flags_parse_and_are_checked(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a TOK dog --n TOK cat --w 64\n", encoding="utf-8")
    cfg = parse_args(
        [
            *BASE,
            "--validation_prompts",
            str(prompts),
            "--validation_negative_prompt",
            "blurry",
            "--validation_guidance_scale",
            "7.5",
            "--validation_height",
            "512",
            "--validation_width",
            "768",
            "--validation_at_start",
            "--validation_coeff_scales",  # a prompt file alone is enough for the strength strips
            "0",
            "1",
        ]
    )
    assert (cfg.validation_negative_prompt, cfg.validation_guidance_scale) == ("blurry", 7.5)
    assert (cfg.validation_height, cfg.validation_width, cfg.validation_at_start) == (512, 768, True)
    for flag, value, message in [
        ("--validation_height", "500", "--validation_height must be a positive multiple of 8"),
        ("--validation_width", "0", "--validation_width must be a positive multiple of 8"),
        ("--validation_guidance_scale", "-1", "--validation_guidance_scale must be >= 0"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_args([*BASE, flag, value])
    prompts.write_text("a TOK dog\na TOK dog --q 1\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 2: unknown option --q"):  # refused before any model loads
        parse_args([*BASE, "--validation_prompts", str(prompts)])


def test_both_lists_in_order_with_the_tokens_in_place(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a TOK dog on the beach --n a TOK cat --d 7\n", encoding="utf-8")
    cfg = TrainConfig(validation_prompt=["a TOK dog"], validation_prompts=str(prompts))
    assert validation_prompts(cfg, lambda s: s.replace("TOK", "<s0><s1>")) == [
        ValidationPrompt("a <s0><s1> dog"),
        ValidationPrompt("a <s0><s1> dog on the beach", negative_prompt="a <s0><s1> cat", seed=7),
    ]


def test_defaults_render_as_before():
    """No new flag given: the pipeline gets what it got before (its own default guidance, no negative
    prompt, the training resolution, --validation_inference_steps)."""
    cfg = TrainConfig(resolution=64, validation_inference_steps=3)
    default_cfg = inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default
    assert _render_settings(cfg, ValidationPrompt("p")) == {
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "guidance_scale": default_cfg,
    }
    cfg = TrainConfig(
        resolution=64, validation_negative_prompt="ugly", validation_height=48, validation_guidance_scale=2
    )
    own = ValidationPrompt("p", negative_prompt="blurry", width=32, guidance_scale=0.0, steps=5)
    assert _render_settings(cfg, own) == {
        "height": 48,
        "width": 32,
        "num_inference_steps": 5,
        "guidance_scale": 0.0,
        "negative_prompt": "blurry",
    }


def test_tensorboard_batches_by_size():
    """TensorBoard stacks a batch per call: one ``validation`` batch when every image has one size
    (as before), else one per prompt; the strength strip is its own image."""
    added = []

    class Writer:
        def add_images(self, tag, array, step, dataformats):
            added.append((tag, array.shape, step, dataformats))

        def add_image(self, tag, array, step, dataformats):
            added.append((tag, array.shape, step, dataformats))

    class Tracker:
        name, writer = "tensorboard", Writer()

    class Accelerator:
        trackers = [Tracker()]

    square, wide = Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))
    _log_images(Accelerator(), 3, [(0, "a", square), (1, "b", square)], None)
    assert added == [("validation", (2, 8, 8, 3), 3, "NHWC")]
    added.clear()
    _log_images(Accelerator(), 4, [(0, "a", square), (0, "a", square), (1, "b", wide)], Image.new("RGB", (5, 4)))
    assert added == [
        ("validation/prompt00", (2, 8, 8, 3), 4, "NHWC"),
        ("validation/prompt01", (1, 8, 16, 3), 4, "NHWC"),
        ("validation/strengths", (4, 5, 3), 4, "HWC"),
    ]


# ---- end to end on the tiny pipeline ---------------------------------------------------------------


def _record_pipeline_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = StableDiffusionXLPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "generator"})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", recording)
    return calls


def test_prompt_file_flags_tokens_strips_and_step_zero(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# kohya-style options\na photo of TOK dog --n blurry TOK --w 64 --h 48 --d 42 --l 6.5 --s 2\n",
        encoding="utf-8",
    )
    calls = _record_pipeline_calls(monkeypatch)
    argv = trainer_argv(tiny_pipeline_dir, inst, out, "--max_train_steps", 1, "--validation_steps", 1)
    argv[argv.index("--instance_prompt") + 1] = "a photo of TOK dog"
    argv += [
        "--train_text_encoder_ti",
        "--validation_prompt",
        "a TOK dog",
        "--validation_prompts",
        str(prompts),
        "--validation_negative_prompt",
        "ugly",
        "--validation_guidance_scale",
        "3",
        "--validation_width",
        "32",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "1",
        "--validation_coeff_scales",
        "0",
        "1",
        "--validation_at_start",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00000", "step_00001"]
    for step in ("step_00000", "step_00001"):
        names = sorted(p.name for p in (out / "validation" / step).iterdir())
        assert names == [
            "prompt00_seed0_c0.png",
            "prompt00_seed0_c1.png",
            "prompt01_seed42_c0.png",
            "prompt01_seed42_c1.png",
            "strengths.png",
        ]
    with Image.open(out / "validation" / "step_00001" / "prompt00_seed0_c1.png") as im:
        assert im.size == (32, 64)  # --validation_width 32, height from --resolution
    with Image.open(out / "validation" / "step_00001" / "prompt01_seed42_c1.png") as im:
        assert im.size == (64, 48)  # the line's --w / --h
    flag_call = {
        "prompt": "a <s0><s1> dog",
        "height": 64,
        "width": 32,
        "num_inference_steps": 1,
        "guidance_scale": 3.0,
        "negative_prompt": "ugly",
    }
    line_call = {
        "prompt": "a photo of <s0><s1> dog",
        "height": 48,
        "width": 64,
        "num_inference_steps": 2,
        "guidance_scale": 6.5,
        "negative_prompt": "blurry <s0><s1>",
    }
    expected = []
    for _ in range(2):  # step 0 and step 1, each prompt at alpha x 0 and x 1
        for call in (flag_call, line_call):
            expected += [{**call, "cross_attention_kwargs": {"coeff_scale": c}} for c in (0.0, 1.0)]
    assert calls == expected


def test_step_zero_is_not_redone_on_resume(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    common = [
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        1,
        "--validation_steps",
        5,
        "--validation_prompt",
        "a sks dog",
        "--num_validation_images",
        1,
        "--validation_inference_steps",
        1,
        "--validation_at_start",
    ]
    argv = trainer_argv(tiny_pipeline_dir, inst, out)
    argv[argv.index("--checkpointing_steps") : argv.index("--checkpointing_steps") + 2] = []
    run_killed_after_checkpoint(monkeypatch, 1, [*argv, *map(str, common)])
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00000"]
    stamp = (out / "validation" / "step_00000" / "prompt00_seed0.png").stat().st_mtime_ns
    calls = _record_pipeline_calls(monkeypatch)
    assert main([*argv, *map(str, common), "--resume_from_checkpoint", "latest"]) == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00000", "step_00002"]
    assert (out / "validation" / "step_00000" / "prompt00_seed0.png").stat().st_mtime_ns == stamp
    assert len(calls) == 1  # only the final validation


def test_wandb_gets_the_validation_images(tiny_pipeline_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    inst = make_images(tmp_path / "inst")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog on the beach --w 48\n", encoding="utf-8")
    argv = trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1, "--validation_steps", 1)
    argv[argv.index("--report_to") + 1] = "wandb"
    argv += ["--validation_prompt", "a sks dog", "--validation_prompts", str(prompts)]
    argv += ["--num_validation_images", "1", "--validation_inference_steps", "1", "--validation_at_start"]
    try:
        assert main(argv) == 0
    finally:
        if wandb.run is not None:
            wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    images = sorted(p.name for p in (runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    # media/images/validation_<step>_<hash>.png: at step 0 (--validation_at_start) and step 1
    assert {name.split("_")[1] for name in images} == {"0", "1"}, images
    assert len(images) == 4  # two prompts of different sizes: one file each
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the logged history, captions included
    assert b"a sks dog on the beach, seed 0" in record and b"a sks dog, seed 0" in record


def test_full_disk_while_writing_a_validation_image_is_one_line_and_keeps_the_checkpoint(
    tiny_pipeline_dir, tmp_path, monkeypatch, capsys
):
    """A validation picture that cannot be written (ENOSPC half-way through) ends the run with one line and
    exit 2, leaves no partial or temporary picture, and the checkpoint written at that step stays loadable."""
    import errno

    from dreamcoeff import read_coeff_file

    real_save = Image.Image.save

    def save_half_then_fail(self, fp, *args, **kwargs):
        if "validation" in str(fp):
            Path(fp).write_bytes(b"\x89PNG half a picture")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    out = tmp_path / "out"
    argv = trainer_argv(tiny_pipeline_dir, make_images(tmp_path / "inst"), out, "--max_train_steps", 2)
    argv[argv.index("--checkpointing_steps") + 1] = "1"
    argv += ["--validation_steps", "1", "--validation_prompt", "a sks dog", "--num_validation_images", "1",
             "--validation_inference_steps", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: could not write ") and "No space left on device" in err[-1]
    assert "prompt00_seed" in err[-1] and "--resume_from_checkpoint latest" in err[-1]
    left = [p.name for p in (out / "validation").rglob("*") if p.is_file()]
    assert left == [], left
    (step, ckpt), *_ = list_checkpoints(out)
    assert step == 1 and read_coeff_file(ckpt / "coeff_weights.safetensors")


def test_a_validation_folder_that_cannot_be_made_is_one_line(tiny_pipeline_dir, tmp_path, capsys):
    """`validation/` taken by a file (or unwritable): one line naming the folder and what to do, exit 2."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "validation").write_text("not a folder")
    argv = trainer_argv(tiny_pipeline_dir, make_images(tmp_path / "inst"), out, "--max_train_steps", 1)
    argv += ["--validation_steps", "1", "--validation_prompt", "a sks dog", "--num_validation_images", "1",
             "--validation_inference_steps", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: cannot create the validation folder {out / 'validation' / 'step_00001'}: ")
    assert "fix that path and rerun with --resume_from_checkpoint latest" in err[-1], err[-1]


@pytest.mark.slow
def test_a_validation_failure_on_the_main_process_stops_every_rank_at_once(tiny_pipeline_dir, tmp_path):
    """Validation runs on the main process alone. When it fails there, the other rank must stop at the same
    step with a line saying why, not run on into its next collective and hang there until torchrun kills it
    (or the process group's timeout ends)."""
    from tests.trainer_runs import make_square_images, run_trainer_to_end

    out = tmp_path / "out"
    out.mkdir()
    (out / "validation").write_text("not a folder")  # the main process cannot make validation/step_00002
    argv = trainer_argv(
        tiny_pipeline_dir, make_square_images(tmp_path / "inst", sizes=((64, 64),) * 4), out, "--max_train_steps", 6
    )
    argv += ["--validation_steps", "2", "--validation_prompt", "a sks dog", "--num_validation_images", "1",
             "--validation_inference_steps", "1"]  # fmt: skip
    rc, log = run_trainer_to_end(argv, tmp_path / "two.log", processes=2)
    assert rc != 0, log[-3000:]
    assert log.count("error: cannot create the validation folder") == 1, log[-3000:]  # the main process's error
    assert "error: process 1: stopping because the main process failed in validation at step 2" in log, log[-3000:]
    # torchrun's report: the main process exited 2 (torchrun may still SIGTERM the other rank while it
    # tears down after printing its line: the launcher ends every rank once one has failed)
    assert "exitcode  : 2" in log, log[-3000:]
