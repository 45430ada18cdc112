"""Loading SDXL components, installing the trainable adapters, and encoding prompts.

Kept apart from the training loop so the sampler, the demo and the tests share one way of doing it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("dreamcoeff")

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Subfolder of a ``--tuning full`` output (and checkpoint) holding the whole fine-tuned UNet.
FULL_UNET_DIR = "unet"


class ModelError(ValueError):
    """The base model cannot be used (not found, not SDXL); the message says what to do."""


_SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def check_sdxl_folder(name_or_path: str) -> None:
    """Refuse a local folder that is not an SDXL diffusers pipeline (hub ids are checked on load)."""
    path = Path(name_or_path)
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
            raise ModelError(f"--pretrained_model_name_or_path {name_or_path}: no such folder")
        return  # a hub id such as stabilityai/stable-diffusion-xl-base-1.0
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); "
            "give an SDXL base model, e.g. stabilityai/stable-diffusion-xl-base-1.0 or a folder saved with save_pretrained"
        )
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index} is unreadable: {exc}") from exc
    missing = [c for c in _SDXL_COMPONENTS if not spec.get(c) or spec.get(c) == [None, None]]
    if missing:
        raise ModelError(
            f"{path} is a {spec.get('_class_name', 'pipeline')} without {', '.join(missing)}: not an SDXL model. "
            "dreamcoeff trains Stable Diffusion XL (two text encoders, text_time conditioning)"
        )


@dataclass
class SDXLComponents:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_components(name_or_path: str, vae_name_or_path: str | None = None, revision: str | None = None,
                    variant: str | None = None) -> SDXLComponents:
    """Load SDXL's parts from a hub id or a local folder (the training scheduler is DDPM)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    check_sdxl_folder(name_or_path)
    kw = dict(revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", use_fast=True, **kw)
        tokenizer_2 = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", use_fast=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2", variant=variant, **kw)
        if vae_name_or_path:
            vae = AutoencoderKL.from_pretrained(vae_name_or_path, **kw)
        else:
            vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load SDXL from {name_or_path}: {exc}") from exc
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ModelError(f"{name_or_path}: the UNet has no text_time conditioning, so it is not an SDXL UNet")
    return SDXLComponents(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, noise_scheduler)


def add_lora(unet: torch.nn.Module, rank: int, lora_alpha: int | None = None, dropout: float = 0.0) -> None:
    """PEFT LoRA on the attention projections (to_q/k/v/out.0), as diffusers' SDXL LoRA script does."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=lora_alpha or rank, lora_dropout=dropout, init_lora_weights="gaussian",
                   target_modules=LORA_TARGET_MODULES)
    )


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(directory: str | os.PathLike, unet: torch.nn.Module) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically (temp file + rename)."""
    from diffusers import StableDiffusionXLPipeline

    from .weights import atomic_write

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
    state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: LoRA keys that do not fit the UNet: {unexpected[:5]}")


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


def token_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def encode_prompts(prompts, tokenizers, text_encoders, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SDXL prompt encoding: penultimate hidden states of both encoders concatenated, plus the
    second encoder's pooled projection. Returns {prompt: (embeds 77 x D, pooled P)} on the CPU.

    Prompts longer than the tokenizers' 77 tokens are cut, with a warning naming the prompt.
    """
    out = {}
    for prompt in dict.fromkeys(prompts):
        max_len = tokenizers[0].model_max_length
        n = token_length(tokenizers[0], prompt)
        if n > max_len:
            logger.warning("prompt is %d tokens, CLIP reads %d; the rest is cut: %r", n, max_len, prompt)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            result = encoder(ids, output_hidden_states=True)
            pooled = result[0]  # the last encoder's (projected) pooled output is what SDXL uses
            hidden.append(result.hidden_states[-2])
        out[prompt] = (torch.cat(hidden, dim=-1)[0].float().cpu(), pooled[0].float().cpu())
    return out
