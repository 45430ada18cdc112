"""The files of the methods that change UNet weights: PEFT LoRA (diffusers' format) and the full UNet.

LoRA is PEFT's, installed on the attention projections as diffusers' SDXL LoRA script does, and
saved in the layout `pipe.load_lora_weights` reads; a `--tuning full` run saves the whole UNet with
`save_pretrained`. `methods` says which tuning method uses which of these files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import atomic_write

__all__ = [
    "FULL_UNET_DIR",
    "LORA_TARGET_MODULES",
    "LORA_WEIGHTS_NAME",
    "add_lora",
    "load_full_unet_weights",
    "load_lora_into_unet",
    "lora_state_dict",
    "save_lora",
    "unet_architecture_differences",
]

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Subfolder of a ``--tuning full`` output (and checkpoint) holding the whole fine-tuned UNet.
FULL_UNET_DIR = "unet"


def add_lora(unet: torch.nn.Module, rank: int, lora_alpha: int | None = None, dropout: float = 0.0) -> None:
    """PEFT LoRA on the attention projections (to_q/k/v/out.0), as diffusers' SDXL LoRA script does."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=lora_alpha or rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(directory: str | os.PathLike, unet: torch.nn.Module) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically (temp file + rename)."""
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite LoRA weights (e.g. {bad[0]}): the run diverged")

    def write(tmp: str) -> None:
        tmp_dir = Path(tmp + ".d")
        tmp_dir.mkdir()
        try:
            StableDiffusionXLPipeline.save_lora_weights(tmp_dir, unet_lora_layers=state, safe_serialization=True)
            os.replace(tmp_dir / LORA_WEIGHTS_NAME, tmp)
        finally:
            for p in tmp_dir.glob("*"):
                p.unlink()
            tmp_dir.rmdir()

    return atomic_write(directory / LORA_WEIGHTS_NAME, write)


def load_lora_into_unet(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a `pytorch_lora_weights.safetensors` into a UNet that already has the adapter (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: LoRA keys that do not fit the UNet: {unexpected[:5]}")


#: Config entries of a saved UNet that say where and by which version it was written, not what it is.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "_use_default_values")


def unet_architecture_differences(base_config: Mapping, config: Mapping) -> list[str]:
    """The keys in which a saved full UNet's `config` (its config.json) describes another architecture
    than the base UNet's config; keys the file lacks, paths and versions do not count. Values are
    compared as JSON holds them, so a tuple in a config built in code equals the list in a file."""

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    return sorted(
        k
        for k in base_config
        if k not in _VOLATILE_CONFIG_KEYS and k in config and plain(config[k]) != plain(base_config[k])
    )


def load_full_unet_weights(unet: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy the weights of a UNet saved with ``save_pretrained`` into ``unet`` in place (resume of
    ``--tuning full``: the optimizer keeps referring to the same parameters)."""
    from safetensors.torch import load_file

    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{folder}: no diffusion_pytorch_model.safetensors (not a --tuning full checkpoint)")
    state = load_file(str(path))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
