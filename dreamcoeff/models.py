"""SDXL's parts: check a model folder, load its components, encode prompts the way SDXL does.

Shared by the trainer, class-image generation, validation and the sampler, so all of them read a
model and its prompts one way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("dreamcoeff")


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


def load_components(
    name_or_path: str, vae_name_or_path: str | None = None, revision: str | None = None, variant: str | None = None
) -> SDXLComponents:
    """Load SDXL's parts from a hub id or a local folder (the training scheduler is DDPM)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    check_sdxl_folder(name_or_path)
    kw = dict(revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", use_fast=True, **kw)
        tokenizer_2 = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", use_fast=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder="text_encoder_2", variant=variant, **kw
        )
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


def token_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])


def encode_prompt_batch(
    prompts: Sequence[str], tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding of a batch, differentiable (learned tokens train through it):
    penultimate hidden states of both encoders concatenated (B x 77 x D), and the second encoder's
    pooled projection (B x P), in the encoders' dtype on `device`."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        result = encoder(ids, output_hidden_states=True)
        pooled = result[0]  # the last encoder's (projected) pooled output is what SDXL uses
        hidden.append(result.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts(prompts, tokenizers, text_encoders, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SDXL prompt encoding of each distinct prompt (frozen encoders: computed once and cached).
    Returns {prompt: (embeds 77 x D, pooled P)} in float32 on the CPU.

    Prompts longer than the tokenizers' 77 tokens are cut, with a warning naming the prompt.
    """
    out = {}
    for prompt in dict.fromkeys(prompts):
        max_len = tokenizers[0].model_max_length
        n = token_length(tokenizers[0], prompt)
        if n > max_len:
            logger.warning("prompt is %d tokens, CLIP reads %d; the rest is cut: %r", n, max_len, prompt)
        embeds, pooled = encode_prompt_batch([prompt], tokenizers, text_encoders, device)
        out[prompt] = (embeds[0].float().cpu(), pooled[0].float().cpu())
    return out
