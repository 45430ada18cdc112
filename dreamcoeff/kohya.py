"""The UI-ready LoRA file: kohya's key layout, ``ss_*`` training metadata and ``modelspec.*`` tags.

kohya's sd-scripts name SDXL's layers as Stability's original UNet does (``input_blocks.4.1`` for
diffusers' ``down_blocks.1.attentions.0``), joined with underscores behind a ``lora_unet_`` prefix
(``lora_te1_`` / ``lora_te2_`` for the two CLIP text encoders, whose module paths stay as they are),
with ``lora_down`` / ``lora_up`` for PEFT's A / B and one ``alpha`` scalar per layer (the scale is
alpha / rank). AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI read that layout natively, and
diffusers' ``pipe.load_lora_weights`` reads it too (tests/test_ui_lora.py loads it back that way).
A1111 lists a LoRA as SDXL's only when ``ss_base_model_version`` starts with ``sdxl_``; the file is
saved in ``--save_precision`` (fp16 by default, as kohya and the UIs' downloads are).

Only LoRA goes into this file: Coeff-Tuning's alpha mixes the heads' attention maps inside the
attention, which no weight of the UNet can express, so it needs dreamcoeff's processor
(`load_coeff_weights`) and has no kohya form.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

__all__ = [
    "SAVE_PRECISIONS",
    "kohya_file_name",
    "kohya_key",
    "kohya_lora_state_dict",
    "save_kohya_lora",
    "ui_metadata",
]

#: --save_precision -> the dtype of every tensor of the UI file
SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
#: what kohya's sdxl_train_network.py writes, and what A1111 tests (``startswith("sdxl_")``)
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
#: Stability's model spec 1.0.0 (kohya's library/sai_model_spec.py): an SDXL LoRA
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
# diffusers-format key endings (old and PEFT forms) -> kohya's
_ENDINGS = (
    (".lora.down.weight", "lora_down"),
    (".lora.up.weight", "lora_up"),
    (".lora_linear_layer.down.weight", "lora_down"),
    (".lora_linear_layer.up.weight", "lora_up"),
    (".lora_A.weight", "lora_down"),
    (".lora_B.weight", "lora_up"),
)
_TEXT_ENCODER_PREFIXES = (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_"))


def kohya_file_name(output_dir: str | os.PathLike) -> str:
    """``<run name>.safetensors``, the name A1111 and ComfyUI list the LoRA under (``_kohya`` added
    where the run's name would collide with one of dreamcoeff's own files)."""
    from .lora import LORA_WEIGHTS_NAME
    from .weights import COEFF_WEIGHTS_NAME

    name = Path(output_dir).resolve().name + ".safetensors"
    return (
        name.replace(".safetensors", "_kohya.safetensors") if name in (LORA_WEIGHTS_NAME, COEFF_WEIGHTS_NAME) else name
    )


def _sgm_path(module_path: str, layers_per_block: int) -> str:
    """diffusers' module path of an attention layer -> Stability's original (SGM) one.

    Each down level holds ``layers_per_block`` resnet/attention pairs then a downsampler (so
    ``layers_per_block + 1`` input blocks per level, after ``input_blocks.0``, the conv_in); each up
    level holds one more pair than a down level."""
    if m := _BLOCK.match(module_path):
        kind, level, layer, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        per_level = layers_per_block + 1
        index = 1 + level * per_level + layer if kind == "down_blocks" else level * per_level + layer
        return f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{index}.1.{rest}"
    if m := _MID.match(module_path):
        return f"middle_block.1.{m.group(1)}"
    raise ValueError(f"no kohya name for the UNet module {module_path!r} (LoRA outside the attention blocks)")


def kohya_key(module_path: str, layers_per_block: int) -> str:
    """The kohya name of a LoRA'd UNet module, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.

    A text encoder's module (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, or
    ``text_encoder_2.``) keeps its path: ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``."""
    for prefix, theirs in _TEXT_ENCODER_PREFIXES:
        if module_path.startswith(prefix):
            path = module_path.removeprefix(prefix)
            if not path.startswith(("text_model.", "text_projection")):
                # transformers 5 flattens CLIP's module tree; the UIs know the classic `text_model.` one
                path = "text_model." + path
            return theirs + path.replace(".", "_")
    return "lora_unet_" + _sgm_path(module_path.removeprefix("unet."), layers_per_block).replace(".", "_")


def kohya_lora_state_dict(
    diffusers_state: Mapping[str, torch.Tensor], unet_config: Mapping, lora_alpha: float
) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (UNet keys ``<module>.lora.down.weight`` / ``.lora.up.weight``,
    with or without the ``unet.`` prefix; text-encoder keys behind ``text_encoder.`` / ``text_encoder_2.``)
    in kohya's layout, with each layer's ``alpha``."""
    layers_per_block = unet_config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise ValueError(
            f"kohya's layout assumes one layers_per_block for every level; this UNet has {layers_per_block!r}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in diffusers_state.items():
        for ours, theirs in _ENDINGS:
            if key.endswith(ours):
                name = kohya_key(key[: -len(ours)], layers_per_block)
                out[f"{name}.{theirs}.weight"] = tensor
                out[f"{name}.alpha"] = torch.tensor(float(lora_alpha))
                break
        else:
            raise ValueError(f"LoRA key {key!r} has no kohya form (DoRA magnitudes and biases are not exported)")
    return out


def ui_metadata(
    training_args: Mapping[str, Any], rank: int, lora_alpha: float, title: str, prediction_type: str = "epsilon"
) -> dict[str, str]:
    """The header A1111 and ComfyUI read: kohya's ``ss_*`` training metadata (A1111's Lora tab shows it
    and files the LoRA under SDXL by ``ss_base_model_version``) and Stability's ``modelspec.*`` tags.
    Every value is a string, as safetensors headers require."""
    a = dict(training_args)
    te = bool(a.get("train_text_encoder"))  # LoRA on both text encoders (lora_te1_ / lora_te2_ keys)
    res = a.get("resolution", 1024)
    now = time.time()
    ss = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{lora_alpha:g}",
        "ss_network_dropout": str(a.get("lora_dropout", 0.0)),
        "ss_network_args": json.dumps({}),
        "ss_base_model_version": SDXL_BASE_MODEL_VERSION,
        "ss_v2": "False",
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(bool(a.get("rescale_betas_zero_snr", False))),
        "ss_sd_model_name": str(a.get("pretrained_model_name_or_path")),
        "ss_output_name": title,
        "ss_training_comment": f"dreamcoeff --tuning {a.get('tuning')} (only the LoRA part is in this file)",
        "ss_resolution": f"({res}, {res})",
        "ss_learning_rate": str(a.get("learning_rate")),
        "ss_unet_lr": str(a.get("learning_rate")),
        "ss_text_encoder_lr": str(a.get("text_encoder_lora_lr") or a.get("learning_rate")) if te else "None",
        "ss_network_train_unet_only": str(not te),
        "ss_clip_skip": str(a.get("clip_skip")),
        "ss_lr_scheduler": str(a.get("lr_scheduler")),
        "ss_lr_warmup_steps": str(a.get("lr_warmup_steps")),
        "ss_max_train_steps": str(a.get("max_train_steps")),
        "ss_batch_size_per_device": str(a.get("train_batch_size")),
        "ss_gradient_accumulation_steps": str(a.get("gradient_accumulation_steps")),
        "ss_mixed_precision": str(a.get("mixed_precision") or "no"),
        "ss_save_precision": str(a.get("save_precision", "fp16")),
        "ss_optimizer": str(a.get("optimizer")),
        "ss_seed": str(a.get("seed")),
        "ss_noise_offset": str(a.get("noise_offset")),
        "ss_min_snr_gamma": str(a.get("snr_gamma")),
        "ss_loss_type": str(a.get("loss_type", "l2")),
        "ss_huber_c": str(a.get("huber_c", 0.1)),
        "ss_debiased_estimation": str(bool(a.get("debiased_estimation_loss", False))),
        "ss_min_timestep": str(a.get("min_timestep", 0)),
        "ss_max_timestep": str(a.get("max_timestep")),
        "ss_prior_loss_weight": str(a.get("prior_loss_weight")),
        "ss_training_finished_at": f"{now:.0f}",
    }
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": f"LoRA trained with dreamcoeff on {a.get('pretrained_model_name_or_path')}",
    }
    if a.get("instance_prompt"):
        spec["modelspec.trigger_phrase"] = str(a["instance_prompt"])
    return {**ss, **spec}


def _hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor bytes, which the header does not change) and
    ``sshs_legacy_hash`` (8 hex digits of 64 KiB at 1 MiB, of the file with only the ``ss_*`` header),
    so A1111 shows the hash kohya's tools would give without rehashing the file."""
    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


def save_kohya_lora(
    path: str | os.PathLike,
    diffusers_state: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    lora_alpha: float,
    training_args: Mapping[str, Any] | None = None,
    precision: str = "fp16",
    prediction_type: str = "epsilon",
) -> Path:
    """Write the UI-ready file atomically (temp file + rename): the very weights of the diffusers-format
    file, renamed, cast to `precision` (``fp16`` / ``bf16`` / ``float``), with the UI metadata."""
    from safetensors.torch import save_file

    if precision not in SAVE_PRECISIONS:
        raise ValueError(f"--save_precision must be one of {sorted(SAVE_PRECISIONS)}, got {precision!r}")
    dtype = SAVE_PRECISIONS[precision]
    state = {k: v.detach().to("cpu", torch.float32) for k, v in diffusers_state.items()}
    kohya = {k: v.to(dtype).contiguous() for k, v in kohya_lora_state_dict(state, unet_config, lora_alpha).items()}
    overflow = [k for k, v in kohya.items() if not torch.isfinite(v).all()]
    if overflow:  # finite in float32 (save_lora checked), so the cast overflowed
        raise ValueError(
            f"a LoRA weight ({overflow[0]}) does not fit {precision}: rerun with --save_precision bf16 or float"
        )
    rank = next((int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")), 0)
    meta = ui_metadata(training_args or {}, rank, lora_alpha, Path(path).stem, prediction_type)
    meta = {**meta, **_hashes(kohya, meta), "format": "pt"}
    return atomic_write(Path(path), lambda tmp: save_file(kohya, tmp, metadata=meta))
