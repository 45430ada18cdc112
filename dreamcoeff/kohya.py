"""LoRA files in the kohya / A1111 / ComfyUI key layout (``--output_kohya_format``).

kohya's sd-scripts name SDXL's layers as Stability's original UNet does (``input_blocks.4.1`` for
diffusers' ``down_blocks.1.attentions.0``), joined with underscores behind a ``lora_unet_`` prefix,
with ``lora_down`` / ``lora_up`` for PEFT's A / B and one ``alpha`` scalar per layer (the scale is
alpha / rank). AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI read that layout natively, and
diffusers' ``pipe.load_lora_weights`` reads it too (the test of this module loads it back that way).

Only LoRA goes into this file: Coeff-Tuning's alpha mixes the heads' attention maps inside the
attention, which no weight of the UNet can express, so it needs dreamcoeff's processor
(`load_coeff_weights`) and has no kohya form.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import atomic_write

__all__ = ["kohya_file_name", "kohya_key", "kohya_lora_state_dict", "save_kohya_lora"]

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


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
    """The kohya name of a LoRA'd UNet module, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``."""
    return "lora_unet_" + _sgm_path(module_path, layers_per_block).replace(".", "_")


def kohya_lora_state_dict(
    diffusers_state: Mapping[str, torch.Tensor], unet_config: Mapping, lora_alpha: float
) -> dict[str, torch.Tensor]:
    """A diffusers-format UNet LoRA state dict (``<module>.lora.down.weight`` / ``.lora.up.weight``, with
    or without the ``unet.`` prefix) in kohya's layout, with each layer's ``alpha``."""
    layers_per_block = unet_config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise ValueError(
            f"kohya's layout assumes one layers_per_block for every level; this UNet has {layers_per_block!r}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in diffusers_state.items():
        key = key.removeprefix("unet.")
        for ours, theirs in ((".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up")):
            if key.endswith(ours):
                name = kohya_key(key[: -len(ours)], layers_per_block)
                out[f"{name}.{theirs}.weight"] = tensor
                out[f"{name}.alpha"] = torch.tensor(float(lora_alpha))
                break
        else:
            raise ValueError(f"LoRA key {key!r} has no kohya form (DoRA magnitudes and biases are not exported)")
    return out


def save_kohya_lora(
    path: str | os.PathLike, diffusers_state: Mapping[str, torch.Tensor], unet_config: Mapping, lora_alpha: float
) -> Path:
    """Write the kohya-layout file atomically (temp file + rename), in float32: the very weights of
    the diffusers-format file, only renamed."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in diffusers_state.items()}
    kohya = kohya_lora_state_dict(state, unet_config, lora_alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_alpha": f"{lora_alpha:g}", "format": "pt"}
    return atomic_write(Path(path), lambda tmp: save_file(kohya, tmp, metadata=meta))
