"""Features SDXL users expect from a trainer (issue 17): kohya-layout LoRA files, DoRA, Prodigy,
starting from earlier weights. On the tiny pipeline saved as a folder (the real loading path)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from dreamcoeff.kohya import kohya_key, kohya_lora_state_dict
from dreamcoeff.testing.sdxl import sdxl_unet_config
from dreamcoeff.train import main
from tests.helpers import make_images
from tests.trainer_runs import final_adapter_weights, run_killed_after_checkpoint, sample_images, trainer_argv


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _train(model, inst, out, *extra) -> None:
    assert main(trainer_argv(model, inst, out, *extra)) == 0


# ---- kohya layout ----------------------------------------------------------------------------------


def test_kohya_names_follow_sdxl_original_unet_layout():
    """SDXL's original UNet (sgm): input_blocks 4, 5 / 7, 8 hold the attention of the 2nd / 3rd level,
    middle_block.1 the mid attention, output_blocks 0-2 / 3-5 the up levels' (known layout, not ours)."""
    lpb = sdxl_unet_config()["layers_per_block"]
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
        "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_out.0": "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_out_0",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v": "lora_unet_input_blocks_8_1_transformer_blocks_0_attn2_to_v",
        "mid_block.attentions.0.transformer_blocks.3.attn1.to_q": "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_q",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q": "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q",
        "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0": "lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_out_0",
    }  # fmt: skip
    for path, name in expected.items():
        assert kohya_key(path, lpb) == name
    with pytest.raises(ValueError, match="no kohya name"):
        kohya_key("conv_in", lpb)
    state = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.ones(4, 8)}
    out = kohya_lora_state_dict(state, {"layers_per_block": 2}, 4)
    assert set(out) == {
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.alpha",
    }
    with pytest.raises(ValueError, match="no kohya form"):
        kohya_lora_state_dict({"unet.x.lora_magnitude_vector": torch.ones(3)}, {"layers_per_block": 2}, 4)


@pytest.mark.slow
def test_kohya_file_loads_in_diffusers_to_the_same_images(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "myrun"
    _train(tiny_pipeline_dir, inst, out, "--tuning", "coeff+lora", "--max_train_steps", 3, "--learning_rate", "5e-2",
           "--output_kohya_format", "--lora_alpha", 8, "--save_precision", "float")  # fmt: skip
    kohya = out / "myrun.safetensors"
    assert kohya.is_file()
    state = load_file(str(kohya))
    assert all(k.startswith("lora_unet_") for k in state)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    diffusers_file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(state) == len(diffusers_file) * 3 // 2  # down + up per layer, plus one alpha each
    assert "myrun.safetensors" in json.loads((out / "dreamcoeff_complete.json").read_text())["files"]

    def render(weight_name=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
        if weight_name:
            pipe.load_lora_weights(str(out), weight_name=weight_name)
        return sample_images(pipe)

    base, ours, theirs = render(), render("pytorch_lora_weights.safetensors"), render("myrun.safetensors")
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the images, so equality below means something
    np.testing.assert_array_equal(theirs, ours)
    card = (out / "README.md").read_text()
    assert "ComfyUI" in card and "A1111" in card and "myrun.safetensors" in card
    assert "dreamcoeff's processor" in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--tuning", "coeff", "--output_kohya_format"), "--output_kohya_format needs a LoRA mode"),
        (("--tuning", "coeff", "--use_dora"), "--use_dora needs a LoRA mode"),
        (("--tuning", "lora", "--use_dora", "--output_kohya_format"), "does not write DoRA"),
        (("--tuning", "lora", "--init_coeff_weights", "x"), "--init_coeff_weights needs --tuning coeff"),
        (("--tuning", "coeff", "--init_lora_weights", "x"), "--init_lora_weights needs a LoRA mode"),
        (("--optimizer", "prodigy", "--use_8bit_adam"), "--use_8bit_adam is AdamW's"),
        (("--optimizer", "prodigy", "--prodigy_beta3", "1.5"), "--prodigy_beta3 must be in"),
        (("--tuning", "coeff", "--init_coeff_weights", "x", "--resume_from_checkpoint", "latest"), "start a new run"),
    ],
)
def test_contradicting_flags_are_refused(tmp_path, capsys, extra, message):
    inst = make_images(tmp_path / "inst")
    assert main(trainer_argv(tmp_path / "model", inst, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


def test_prodigy_switches_have_no_forms():
    from dreamcoeff.train.config import parse_args

    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p"]
    assert parse_args(argv).prodigy_decouple is True
    assert parse_args([*argv, "--no-prodigy_decouple"]).prodigy_decouple is False
    assert parse_args([*argv, "--no-prodigy_safeguard_warmup"]).prodigy_safeguard_warmup is False


# ---- DoRA ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dora_trains_saves_in_diffusers_format_and_resumes_exactly(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")
    common = ("--tuning", "lora", "--use_dora", "--max_train_steps", 4, "--checkpointing_steps", 2,
              "--learning_rate", "5e-2")  # fmt: skip
    ref = tmp_path / "ref"
    _train(tiny_pipeline_dir, inst, ref, *common)
    weights = final_adapter_weights(ref)
    magnitudes = [k for k in weights if "magnitude" in k]
    assert magnitudes, sorted(weights)[:4]
    # the magnitudes trained (they start at the base weights' column norms)
    from dreamcoeff.lora import add_lora, lora_state_dict

    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir).unet
    add_lora(fresh, 4, use_dora=True)
    start = {"unet." + k: v for k, v in lora_state_dict(fresh).items()}
    assert max((weights[k] - start[k]).abs().max().item() for k in magnitudes) > 1e-4

    # diffusers reads the file back as DoRA layers holding exactly the trained weights
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(str(ref), adapter_name="default")
    loaded = lora_state_dict(pipe.unet)
    assert pipe.unet.peft_config["default"].use_dora
    for k, v in loaded.items():
        torch.testing.assert_close(v, weights["unet." + k], rtol=0, atol=0)

    out = tmp_path / "run"
    run_killed_after_checkpoint(monkeypatch, 2, trainer_argv(tiny_pipeline_dir, inst, out, *common))
    _train(tiny_pipeline_dir, inst, out, *common, "--resume_from_checkpoint", "latest")
    resumed = final_adapter_weights(out)
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], rtol=0, atol=1e-6)


# ---- Prodigy ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prodigy_trains_alpha_and_lora_in_own_groups_and_resumes_exactly(tiny_pipeline_dir, tmp_path, monkeypatch):
    pytest.importorskip("prodigyopt")
    import dreamcoeff.train.optim as optim

    groups_seen = []
    real = optim.prodigy_optimizer

    def spy(groups, cfg):
        opt = real(groups, cfg)
        groups_seen.append([len(g["params"]) for g in opt.param_groups])
        return opt

    monkeypatch.setattr(optim, "prodigy_optimizer", spy)
    inst = make_images(tmp_path / "inst")
    common = ("--tuning", "coeff+lora", "--optimizer", "prodigy", "--coeff_lr", "1.0", "--learning_rate", "1.0",
              "--max_train_steps", 4, "--checkpointing_steps", 2)  # fmt: skip
    ref = tmp_path / "ref"
    _train(tiny_pipeline_dir, inst, ref, *common)
    assert len(groups_seen[0]) == 2  # alpha and LoRA in their own groups (their rates multiply Prodigy's d)
    weights = final_adapter_weights(ref)
    assert any(v.abs().max() > 1e-6 for k, v in weights.items() if k.endswith(".alpha"))

    out = tmp_path / "run"
    run_killed_after_checkpoint(monkeypatch, 2, trainer_argv(tiny_pipeline_dir, inst, out, *common))
    _train(tiny_pipeline_dir, inst, out, *common, "--resume_from_checkpoint", "latest")
    resumed = final_adapter_weights(out)
    for key in weights:  # Prodigy's d estimates are part of the checkpoint
        torch.testing.assert_close(resumed[key], weights[key], rtol=0, atol=1e-6)


def test_prodigy_missing_gives_install_hint(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    inst = make_images(tmp_path / "inst")
    rc = main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "out", "--optimizer", "prodigy", "--max_train_steps", 1))
    assert rc == 2
    assert "pip install prodigyopt" in capsys.readouterr().err


# ---- starting from earlier weights -----------------------------------------------------------------


@pytest.mark.slow
def test_init_weights_start_a_new_run_from_earlier_files(tiny_pipeline_dir, tmp_path, capsys):
    inst = make_images(tmp_path / "inst")
    first = tmp_path / "first"
    _train(tiny_pipeline_dir, inst, first, "--tuning", "coeff+lora", "--max_train_steps", 3, "--coeff_lr", "5e-2",
           "--learning_rate", "5e-2")  # fmt: skip
    start = final_adapter_weights(first)

    # a run with tiny rates ends next to where it started: next to the first run's weights, not at zero
    second = tmp_path / "second"
    _train(tiny_pipeline_dir, inst, second, "--tuning", "coeff+lora", "--max_train_steps", 1, "--coeff_lr", "1e-9",
           "--learning_rate", "1e-9", "--init_coeff_weights", first / "coeff_weights.safetensors",
           "--init_lora_weights", first)  # fmt: skip
    after = final_adapter_weights(second)
    assert max(v.abs().max().item() for k, v in start.items() if k.endswith(".alpha")) > 1e-3
    for key in start:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-5)
    assert json.loads((second / "dreamcoeff_complete.json").read_text())["global_step"] == 1

    # files that do not fit are refused in one line naming the flag and what differs
    rc = main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "r8", "--tuning", "lora", "--rank", 8, "--max_train_steps", 1,
                    "--init_lora_weights", first))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--init_lora_weights" in err and "shapes differ" in err and "--rank" in err
    rc = main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "t2", "--tuning", "coeff", "--coeff_targets", "attn2",
                    "--max_train_steps", 1, "--init_coeff_weights", first))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--init_coeff_weights" in err and "--coeff_targets" in err
    rc = main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "nf", "--tuning", "lora", "--max_train_steps", 1,
                    "--init_lora_weights", tmp_path / "nowhere"))  # fmt: skip
    assert rc == 2 and "no such LoRA file" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file

    nan_file = tmp_path / "nan" / "pytorch_lora_weights.safetensors"
    nan_file.parent.mkdir()
    state = load_file(first / "pytorch_lora_weights.safetensors")
    key = sorted(state)[-1]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, nan_file)
    rc = main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "fromnan", "--tuning", "lora", "--max_train_steps", 1,
                    "--init_lora_weights", nan_file))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--init_lora_weights" in err and "non-finite" in err and key.removeprefix("unet.") in err
    assert not (tmp_path / "fromnan" / "pytorch_lora_weights.safetensors").exists()


# ---- alpha without head gains ----------------------------------------------------------------------


def test_zero_row_sums_makes_rows_of_A_sum_to_one():
    from dreamcoeff.processor import zero_row_sums_

    alpha = torch.randn(10, 10, dtype=torch.float64)
    before = alpha.clone()
    zero_row_sums_([alpha])
    torch.testing.assert_close(alpha.sum(1), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)
    # the projection removes exactly the row means, nothing else
    torch.testing.assert_close(before - alpha, before.mean(1, keepdim=True).expand(10, 10), rtol=0, atol=1e-12)
    A = torch.eye(10, dtype=torch.float64) + 0.7 * alpha
    torch.testing.assert_close(A.sum(1), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_coeff_zero_row_sum_trains_gain_free_alpha(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "zrs"
    _train(tiny_pipeline_dir, inst, out, "--tuning", "coeff", "--coeff_zero_row_sum", "--max_train_steps", 3,
           "--coeff_lr", "5e-2", "--coeff_dropout", "0")  # fmt: skip
    alphas = {k: v for k, v in final_adapter_weights(out).items() if k.endswith(".alpha")}
    assert max(v.abs().max().item() for v in alphas.values()) > 1e-2  # it trained
    assert max(v.sum(1).abs().max().item() for v in alphas.values()) < 1e-5
