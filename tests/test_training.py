"""The trainer end to end on the tiny SDXL pipeline saved as a folder (the real loading path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from dreamcoeff import load_coeff_weights, read_coeff_file
from dreamcoeff.train import list_checkpoints, main
from dreamcoeff.train.config import UsageError, parse_args
from tests.helpers import make_images
from tests.trainer_runs import (
    REPO,
    final_adapter_weights,
    run_killed_after_checkpoint,
    sample_images,
    trainer_argv,
)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["coeff", "lora", "coeff+lora"])
def test_each_mode_trains_saves_and_loads(tiny_pipeline_dir, tmp_path, tuning):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    validation = (
        (
            "--validation_prompt",
            "a sks dog",
            "--num_validation_images",
            1,
            "--validation_steps",
            2,
            "--validation_inference_steps",
            2,
        )
        if tuning == "coeff"
        else ()
    )
    assert (
        main(
            trainer_argv(
                tiny_pipeline_dir,
                inst,
                out,
                "--tuning",
                tuning,
                "--max_train_steps",
                3,
                "--coeff_lr",
                "5e-2",
                "--learning_rate",
                "5e-2",
                "--random_flip",
                *validation,
            )
        )
        == 0
    )
    assert (out / "args.json").is_file() and (out / "README.md").is_file()
    if validation:  # every --validation_steps and at the end, fixed seeds
        assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00002", "step_00003"]
        assert [p.name for p in (out / "validation" / "step_00002").iterdir()] == ["prompt00_seed0.png"]
        assert "validation/step_00003/prompt00_seed0.png" in (out / "README.md").read_text()
    card = (out / "README.md").read_text()
    assert "trainable parameters" in card and "sks dog" in card
    settings = card.split("## Settings")[1]  # the run's own non-default flags
    assert "--max_train_steps" in settings and (tuning == "coeff" or f"--tuning {tuning}" in settings)
    assert json.loads((out / "args.json").read_text())["tuning"] == tuning

    base = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    base_images = sample_images(base)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    if "coeff" in tuning:
        tensors, meta = read_coeff_file(out / "coeff_weights.safetensors")
        assert meta["base_model"] == str(tiny_pipeline_dir) and meta["coeff_dropout"] == "0.1"
        assert json.loads(meta["training_args"])["tuning"] == tuning
        assert any(t.abs().max() > 0 for t in tensors.values())
        load_coeff_weights(pipe, out)
    else:
        assert not (out / "coeff_weights.safetensors").exists()
    if "lora" in tuning:
        pipe.load_lora_weights(out)
    else:
        assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert np.abs(sample_images(pipe) - base_images).max() > 1e-4


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")  # 3 images, batch 1: checkpoint at step 2 is mid-epoch
    common = (
        "--tuning",
        "coeff+lora",
        "--max_train_steps",
        5,
        "--checkpointing_steps",
        2,
        "--random_flip",
        "--lr_scheduler",
        "linear",
        "--coeff_lr",
        "1e-2",
        "--learning_rate",
        "1e-2",
        "--lora_dropout",
        "0.1",
        "--coeff_dropout",
        "0.2",
    )
    ref_out = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref_out, *common)) == 0
    reference = final_adapter_weights(ref_out)

    # interrupted run: dies right after writing checkpoint-2
    out = tmp_path / "run"
    run_killed_after_checkpoint(monkeypatch, 2, trainer_argv(tiny_pipeline_dir, inst, out, *common))
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not (out / "coeff_weights.safetensors").exists()

    assert main(trainer_argv(tiny_pipeline_dir, inst, out, *common, "--resume_from_checkpoint", "latest")) == 0
    resumed = final_adapter_weights(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
    # and training did move the weights (the comparison above can fail)
    assert any(v.abs().max() > 1e-4 for k, v in reference.items() if k.endswith(".alpha"))


def _unet_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_full_fine_tuning_saves_the_unet_and_resumes_exactly(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    inst = make_images(tmp_path / "inst")
    common = (
        "--tuning",
        "full",
        "--max_train_steps",
        4,
        "--checkpointing_steps",
        2,
        "--random_flip",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "linear",
    )
    ref_out = tmp_path / "ref"
    assert main(trainer_argv(tiny_pipeline_dir, inst, ref_out, *common)) == 0
    assert not (ref_out / "coeff_weights.safetensors").exists()
    assert not (ref_out / "pytorch_lora_weights.safetensors").exists()
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    tuned = UNet2DConditionModel.from_pretrained(ref_out, subfolder="unet")
    moved = [n for (n, a), b in zip(base.named_parameters(), tuned.parameters()) if not torch.equal(a, b)]
    assert len(moved) > 0.9 * len(list(base.parameters()))  # (nearly) every weight trains
    done = json.loads((ref_out / "dreamcoeff_complete.json").read_text())
    assert done["trainable_parameters"] == done["unet_parameters"] == sum(p.numel() for p in base.parameters())
    assert "UNet2DConditionModel.from_pretrained" in (ref_out / "README.md").read_text()

    # the loaded UNet drives a pipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir, unet=tuned)
    base_images = sample_images(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir))
    assert np.abs(sample_images(pipe) - base_images).max() > 1e-4

    # killed after checkpoint-2 and resumed: the same weights as the uninterrupted run
    out = tmp_path / "run"
    run_killed_after_checkpoint(monkeypatch, 2, trainer_argv(tiny_pipeline_dir, inst, out, *common))
    assert (out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "unet").exists()
    assert main(trainer_argv(tiny_pipeline_dir, inst, out, *common, "--resume_from_checkpoint", "latest")) == 0
    reference, resumed = _unet_weights(ref_out), _unet_weights(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key


@pytest.mark.slow
def test_cache_latents_changes_nothing_but_speed(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    common = ("--max_train_steps", 4, "--center_crop", "--coeff_lr", "1e-2", "--num_train_epochs", 2)
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "a", *common)) == 0
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "b", *common, "--cache_latents")) == 0
    a, b = final_adapter_weights(tmp_path / "a"), final_adapter_weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and any(v.abs().max() > 0 for v in a.values())


@pytest.mark.slow
def test_prior_preservation_generates_and_reuses_class_images(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    class_dir = tmp_path / "class"
    args = trainer_argv(
        tiny_pipeline_dir,
        inst,
        tmp_path / "out",
        "--with_prior_preservation",
        "--class_data_dir",
        class_dir,
        "--class_prompt",
        "a photo of a dog",
        "--num_class_images",
        3,
        "--sample_batch_size",
        2,
        "--class_generation_steps",
        2,
        "--max_train_steps",
        2,
    )
    assert main(args) == 0
    made = sorted(p.name for p in class_dir.iterdir())
    assert made == ["class_00000.png", "class_00001.png", "class_00002.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    first = (class_dir / "class_00000.png").read_bytes()
    (class_dir / "class_00001.png").unlink()  # one missing: only that one is generated again
    args2 = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in args]
    assert main(args2) == 0
    assert (class_dir / "class_00000.png").stat().st_mtime_ns == stamps["class_00000.png"]
    assert (class_dir / "class_00000.png").read_bytes() == first
    assert (class_dir / "class_00001.png").exists()


@pytest.mark.slow
def test_aspect_buckets_keep_portrait_and_landscape(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst", sizes=((64, 128), (128, 64), (96, 48)))
    import dreamcoeff.train.data as data_lib

    seen = []
    real = data_lib.collate_examples

    def spy(batch):
        out = real(batch)
        seen.append(tuple(out["pixel_values"].shape[-2:]))
        return out

    monkeypatch.setattr(data_lib, "collate_examples", spy)
    assert (
        main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 3, "--train_batch_size", 1))
        == 0
    )
    assert any(h > w for h, w in seen) and any(w > h for h, w in seen)
    seen.clear()
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "sq", "--max_train_steps", 2, "--square_crop")) == 0
    assert seen and all(h == w == 64 for h, w in seen)


@pytest.mark.slow
def test_two_processes_agree(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst", sizes=((64, 64),) * 4)
    out = tmp_path / "out"
    # --multi_gpu selects the torchrun launcher; without CUDA the trainer runs the ranks on the CPU (gloo)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "train_dreambooth_coeff.py"),
        *trainer_argv(
            tiny_pipeline_dir, inst, out, "--max_train_steps", 2, "--tuning", "coeff+lora", "--coeff_lr", "1e-2"
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "weights identical on all 2 processes" in res.stderr
    assert any(v.abs().max() > 0 for v in read_coeff_file(out)[0].values())


# ---------------------------------------------------------------------------------------------
# bad input: a clear one-line error naming the file or flag, exit code 2, no traceback


def _run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_and_empty_instance_dir(tiny_pipeline_dir, tmp_path, capsys):
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, tmp_path / "nope", tmp_path / "out"))
    assert "nope" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, tmp_path / "empty", tmp_path / "out"))
    assert "empty" in err
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.txt").write_text("hi")
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, tmp_path / "txt", tmp_path / "out"))
    assert "notes.txt" in err or "no image" in err.lower() or "none with an image extension" in err


@pytest.mark.slow
def test_corrupt_image_named_and_skippable(tiny_pipeline_dir, tmp_path, capsys, caplog):
    inst = make_images(tmp_path / "inst")
    (inst / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1))
    assert "broken.jpg" in err and "--skip_bad_images" in err
    with caplog.at_level("WARNING"):
        assert (
            main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out2", "--max_train_steps", 1, "--skip_bad_images"))
            == 0
        )
    assert "broken.jpg" in caplog.text


@pytest.mark.slow
def test_small_images_upscaled_with_warning(tiny_pipeline_dir, tmp_path, caplog):
    inst = make_images(tmp_path / "inst", sizes=((24, 24), (64, 64)))
    with caplog.at_level("WARNING"):
        assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1)) == 0
    assert "img0.png" in caplog.text and "upscal" in caplog.text.lower()


def test_model_folder_not_sdxl(tmp_path, capsys):
    inst = make_images(tmp_path / "inst")
    (tmp_path / "model").mkdir()
    err = _run_error(capsys, trainer_argv(tmp_path / "model", inst, tmp_path / "out"))
    assert "model_index.json" in err
    (tmp_path / "model" / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
            }
        )
    )
    err = _run_error(capsys, trainer_argv(tmp_path / "model", inst, tmp_path / "out"))
    assert "not an SDXL model" in err and "text_encoder_2" in err


def test_output_dir_with_previous_run_refused(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    out.mkdir()
    (out / "args.json").write_text("{}")
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, inst, out))
    assert "previous run" in err and "--overwrite_output_dir" in err
    assert (out / "args.json").read_text() == "{}"


def test_missing_optional_packages(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    inst = make_images(tmp_path / "inst")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    err = _run_error(capsys, trainer_argv(tiny_pipeline_dir, inst, tmp_path / "a", "--use_8bit_adam"))
    assert "bitsandbytes" in err and "pip install" in err
    err = _run_error(
        capsys, trainer_argv(tiny_pipeline_dir, inst, tmp_path / "b", "--enable_xformers_memory_efficient_attention")
    )
    assert "xformers" in err and "pip install" in err


def test_long_prompt_warns(tiny_pipeline_dir, tmp_path, caplog):
    inst = make_images(tmp_path / "inst", sizes=((64, 64),))
    long_prompt = "a photo of sks dog " + " ".join(["on the red grass"] * 30)
    argv = trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--max_train_steps", 1)
    argv[argv.index("a photo of sks dog")] = long_prompt
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert "CLIP reads 77" in caplog.text


def test_flags_config_file_and_contradictions(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "pretrained_model_name_or_path: m\ninstance_data_dir: d\ninstance_prompt: p\nrank: 8\ncoeff_lr: 0.005\n"
    )
    cfg = parse_args(["--config", str(cfg_file), "--rank", "16"])
    assert cfg.rank == 16 and cfg.coeff_lr == 0.005  # the command line wins, the file fills the rest
    toml = tmp_path / "run.toml"
    toml.write_text('pretrained_model_name_or_path = "m"\ninstance_dir = "d"\ninstance_prompt = "p"\n')
    with pytest.raises(UsageError, match="unknown setting"):
        parse_args(["--config", str(toml)])
    cfg = parse_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--instance_dir",
            "d",
            "--instance_prompt",
            "p",
            "--validation_prompt",
            "a",
            "--validation_prompt",
            "b",
        ]
    )
    assert cfg.instance_data_dir == "d" and cfg.validation_prompt == ["a", "b"]
    with pytest.raises(UsageError, match="--class_prompt"):
        parse_args(
            [
                "--pretrained_model_name_or_path",
                "m",
                "--instance_dir",
                "d",
                "--instance_prompt",
                "p",
                "--with_prior_preservation",
                "--class_data_dir",
                "c",
            ]
        )
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--no_such_flag"])
