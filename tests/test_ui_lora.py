"""The UI-ready LoRA file (issue 33 part 2): every LoRA run writes ``<run name>.safetensors`` in kohya's
layout, fp16 by default, with kohya's ``ss_*`` metadata and ``modelspec.*`` tags.

The reader is diffusers' own ``load_lora_weights``, which converts kohya keys itself: it knows
nothing of dreamcoeff's mapping, so equal images mean the mapping is right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from dreamcoeff.kohya import kohya_key, save_kohya_lora
from dreamcoeff.train import main
from dreamcoeff.train.config import parse_args, writes_ui_lora
from tests.helpers import make_images
from tests.trainer_runs import sample_images, trainer_argv


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _render(model_dir, folder=None, weight_name=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    if weight_name:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return sample_images(pipe)


def _module_names(pipe) -> dict[str, str]:
    """Every Linear of the UNet and both text encoders under its kohya name (built from the module
    tree, so a key that names no module is caught)."""
    lpb = pipe.unet.config.layers_per_block
    names = {}
    for path, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in path:
            names[kohya_key(path, lpb)] = "unet." + path
    for prefix, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                names[kohya_key(f"{prefix}.{path}", lpb)] = f"{prefix}.{path}"
    return names


@pytest.mark.slow
def test_lora_run_writes_a_ui_file_diffusers_loads_to_the_same_images(tiny_pipeline_dir, tmp_path):
    inst = make_images(tmp_path / "inst")
    runs = {}
    for precision in ("fp16", "float"):
        out = tmp_path / f"run-{precision}"
        argv = trainer_argv(tiny_pipeline_dir, inst, out, "--tuning", "lora", "--max_train_steps", 3,
                     "--learning_rate", "5e-2", "--lora_alpha", 8, "--seed", 3)  # fmt: skip
        if precision == "float":
            argv += ["--save_precision", "float"]
        assert main(argv) == 0
        runs[precision] = out
    fp16 = runs["fp16"] / "run-fp16.safetensors"
    state = load_file(str(fp16))
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    assert all(k.startswith("lora_unet_") for k in state)
    # every key names a module of the UNet, and every LoRA'd module of the diffusers file is there
    names = _module_names(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir))
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert layers <= set(names), sorted(layers - set(names))[:3]
    diffusers_file = load_file(str(runs["fp16"] / "pytorch_lora_weights.safetensors"))
    assert len(layers) * 2 == len(diffusers_file)
    assert {v.dtype for v in diffusers_file.values()} == {torch.float32}  # the diffusers file stays as it was

    meta = _header(fp16)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert meta["ss_sd_model_name"] == str(tiny_pipeline_dir)
    assert meta["ss_output_name"] == meta["modelspec.title"] == "run-fp16"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert (meta["ss_seed"], meta["ss_max_train_steps"], meta["ss_save_precision"]) == ("3", "3", "fp16")
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert len(meta["sshs_model_hash"]) == 64

    base = _render(tiny_pipeline_dir)
    for precision, out in runs.items():
        ours = _render(tiny_pipeline_dir, out, "pytorch_lora_weights.safetensors")
        theirs = _render(tiny_pipeline_dir, out, f"{out.name}.safetensors")
        assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the images, so equality means something
        if precision == "float":
            np.testing.assert_array_equal(theirs, ours)  # a renaming only: the very same weights
        else:  # fp16 rounds each weight by <= 2^-11 relative: the images move by far less than the LoRA did
            assert np.abs(theirs - ours).max() < 1e-2 * np.abs(ours - base).max() + 1e-3

    out = runs["fp16"]
    assert "run-fp16.safetensors" in json.loads((out / "dreamcoeff_complete.json").read_text())["files"]
    card = (out / "README.md").read_text()
    assert "`run-fp16.safetensors`" in card and "sdxl_base_v1-0" in card and "fp16 tensors" in card


def test_text_encoder_lora_gets_te1_and_te2_keys_diffusers_reads(tiny_pipeline_dir, tmp_path):
    """LoRA on the UNet and both CLIP encoders (random, non-zero up weights) saved both ways: diffusers'
    own files and the UI file render the same images at float precision."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    torch.manual_seed(0)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "te": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets["unet"], init_lora_weights="gaussian"))
    for enc in (pipe.text_encoder, pipe.text_encoder_2):  # (transformers' add_adapter wants a newer PEFT)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets["te"]), enc)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)

    def state(model):  # PEFT's keys without the adapter name, in diffusers' format
        peft = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".lora_" in k}
        return convert_state_dict_to_diffusers(peft)

    unet, te1, te2 = state(pipe.unet), state(pipe.text_encoder), state(pipe.text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=unet, text_encoder_lora_layers=te1, text_encoder_2_lora_layers=te2
    )
    combined = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in te1.items()}}
    combined.update({f"text_encoder_2.{k}": v for k, v in te2.items()})
    # the diffusers file has no adapter config, so its reader scales by 1 (alpha = rank = 2): so must ours
    save_kohya_lora(tmp_path / "ui.safetensors", combined, pipe.unet.config, 2, precision="float")
    unet_only = {k: v for k, v in combined.items() if k.startswith("unet.")}
    save_kohya_lora(tmp_path / "ui_unet.safetensors", unet_only, pipe.unet.config, 2, precision="float")

    keys = set(load_file(str(tmp_path / "ui.safetensors")))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)
    names = _module_names(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir))
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys} <= set(names)

    base = _render(tiny_pipeline_dir)
    ours = _render(tiny_pipeline_dir, tmp_path, "pytorch_lora_weights.safetensors")
    theirs = _render(tiny_pipeline_dir, tmp_path, "ui.safetensors")
    without_te = _render(tiny_pipeline_dir, tmp_path, "ui_unet.safetensors")
    assert np.abs(ours - base).max() > 1e-3
    assert np.abs(theirs - without_te).max() > 1e-3  # the te1 / te2 keys were read, not skipped
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_fp16_overflow_is_refused_with_the_fix(tmp_path):
    state = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.full((2, 8), 1e6)}
    with pytest.raises(ValueError, match="--save_precision bf16 or float"):
        save_kohya_lora(tmp_path / "x.safetensors", state, {"layers_per_block": 2}, 2)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "extra, written",
    [
        (("--tuning", "lora"), True),
        (("--tuning", "coeff+lora"), True),
        (("--tuning", "coeff"), False),
        (("--tuning", "lora", "--use_dora"), False),
        (("--tuning", "lora", "--no-ui_lora"), False),
        (("--tuning", "lora", "--no-output_kohya_format"), False),
        (("--tuning", "lora", "--output_kohya_format"), True),  # the old flag: accepted, now the default
        (("--tuning", "lora", "--ui_lora"), True),
    ],
)
def test_which_runs_write_the_ui_file(extra, written):
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p", *extra]
    assert writes_ui_lora(parse_args(argv)) is written


def test_save_precision_choices():
    argv = ["--pretrained_model_name_or_path", "m", "--instance_dir", "i", "--instance_prompt", "p"]
    assert parse_args(argv).save_precision == "fp16"
    assert parse_args([*argv, "--save_precision", "bf16"]).save_precision == "bf16"
    with pytest.raises(SystemExit):
        parse_args([*argv, "--save_precision", "fp8"])
