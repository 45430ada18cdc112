"""SDXL's parts: check a model folder, load its components, encode prompts the way SDXL does.

Shared by the trainer, class-image generation, validation and the sampler, so all of them read a
model and its prompts one way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

logger = logging.getLogger("dreamcoeff")


class ModelError(ValueError):
    """The base model cannot be used (not found, not SDXL); the message says what to do."""


_SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

#: Suffixes read as one weights file rather than a folder or a hub id.
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
#: Pickle formats (PyTorch's .ckpt / .pt / .pth / .bin): refused, see `check_single_file`.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
#: The parts of an original-layout SDXL base checkpoint (Stability's sgm names), by key prefix.
SDXL_SINGLE_FILE_PARTS = {
    "unet": "model.diffusion_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}
# SDXL's UNet is the one whose class-label embedding (label_emb) carries the text_time conditioning
_SDXL_UNET_MARK = "model.diffusion_model.label_emb.0.0.weight"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _folder_problem(path: Path) -> str | None:
    """Why a local folder is not an SDXL diffusers pipeline folder, or None."""
    index = path / "model_index.json"
    if not index.is_file():
        return f"{path} is not a diffusers pipeline folder (no model_index.json)"
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"{index} is unreadable: {exc}"
    missing = [c for c in _SDXL_COMPONENTS if not spec.get(c) or spec.get(c) == [None, None]]
    if missing:
        return (
            f"{path} is a {spec.get('_class_name', 'pipeline')} without {', '.join(missing)}: not an SDXL model. "
            "dreamcoeff trains Stable Diffusion XL (two text encoders, text_time conditioning)"
        )
    return None


def check_sdxl_folder(name_or_path: str) -> None:
    """Refuse a local folder that is not an SDXL diffusers pipeline (hub ids are checked on load)."""
    path = Path(name_or_path)
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
            raise ModelError(f"--pretrained_model_name_or_path {name_or_path}: no such folder")
        return  # a hub id such as stabilityai/stable-diffusion-xl-base-1.0
    problem = _folder_problem(path)
    if problem:
        if "no model_index.json" in problem:
            problem += (
                "; give an SDXL base model, e.g. stabilityai/stable-diffusion-xl-base-1.0, a folder saved with "
                "save_pretrained, or one .safetensors checkpoint"
            )
        raise ModelError(problem)


def is_single_file(name_or_path: str | os.PathLike | None) -> bool:
    """True for a path to one weights file (by its suffix, or an existing file), not a folder or hub id."""
    if not name_or_path:
        return False
    path = Path(name_or_path)
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or path.is_file()


def read_safetensors_header(path: Path, flag: str) -> dict[str, dict]:
    """The tensor table of a .safetensors file ({name: {dtype, shape, data_offsets}}), read without
    loading a tensor; `ModelError` naming `flag` and the file if it is not one, or is cut short."""
    where = f"{flag} {path}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(length) if 0 < length <= min(_MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise ModelError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if not raw:
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ModelError(f"{where} is a PyTorch pickle file (zip or pickle bytes), not safetensors: {_PICKLE_WHY}")
        raise ModelError(
            f"{where} is not a safetensors file, or it is truncated ({size} bytes; the header is unreadable): "
            "download it again, or give the model's .safetensors release"
        )
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        tensors = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in header.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ModelError(
            f"{where}: its safetensors header is damaged ({type(exc).__name__}): download it again"
        ) from None
    if 8 + length + end > size:
        raise ModelError(
            f"{where} is truncated: its header describes {8 + length + end} bytes, the file has {size}; "
            "the download or copy stopped early, fetch it again"
        )
    if not tensors:
        raise ModelError(f"{where} holds no tensors")
    return tensors


_PICKLE_WHY = (
    "loading a pickle can run code hidden in the file, so dreamcoeff reads only .safetensors (as it does for "
    "every file it loads). Use the model's .safetensors release, or convert the checkpoint once where you trust it"
)


def describe_checkpoint(keys) -> str:
    """What a checkpoint with these tensor names looks like, in words (for error messages)."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def contains(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("model.diffusion_model.joint_blocks.", "joint_blocks.", "text_encoders.clip_g."):
        return "a Stable Diffusion 3 checkpoint (MMDiT joint_blocks), not SDXL"
    if has("model.diffusion_model.double_blocks.", "double_blocks.", "single_blocks.", "double_stream_blocks."):
        return "a Flux-style transformer checkpoint (double_blocks / single_blocks), not SDXL"
    if has("lora_unet_", "lora_te", "unet.", "text_encoder.") and contains("lora_", ".lora."):
        return "a LoRA file, not a base model: load it on top of its base (or train from the base it was made for)"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x checkpoint (one CLIP text encoder, cond_stage_model.transformer), not SDXL"
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H, cond_stage_model.model), not SDXL"
    if has("conditioner.embedders.0.model.") and not has(SDXL_SINGLE_FILE_PARTS["text_encoder_2"]):
        return "an SDXL refiner checkpoint (one OpenCLIP encoder), not an SDXL base: train from the base model"
    if has("model.diffusion_model.input_blocks.") and _SDXL_UNET_MARK not in keys:
        return "a UNet of the original Stable Diffusion layout without SDXL's text_time conditioning (SD 1.x / 2.x)"
    if has("down_blocks.", "mid_block.") and has("conv_in."):
        return "a diffusers-layout state dict of one model (down_blocks / mid_block), not an original checkpoint"
    if has("encoder.", "decoder.", "first_stage_model.", "vae.") and not has("model.diffusion_model."):
        return "a VAE only (encoder / decoder weights), not a base model"
    return f"an unrecognised layout (first tensors: {', '.join(sorted(keys)[:3])})"


def check_single_file(
    path: str | os.PathLike, flag: str = "--pretrained_model_name_or_path", need_vae: bool = True
) -> set[str]:
    """Refuse, before any weights are read, a single file that is not an SDXL base checkpoint in the
    original layout (``model.diffusion_model.*``, ``conditioner.embedders.0.transformer.*``,
    ``conditioner.embedders.1.model.*``, ``first_stage_model.*``): a pickle, a truncated file, another
    model family; the VAE may be missing where another VAE is given (`need_vae` False). Returns the
    file's tensor names."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{flag} {path} is a pickle checkpoint ({path.suffix}): {_PICKLE_WHY}")
    if not path.is_file():
        raise ModelError(f"{flag} {path}: no such file")
    keys = set(read_safetensors_header(path, flag))
    parts = {name: any(k.startswith(p) for k in keys) for name, p in SDXL_SINGLE_FILE_PARTS.items()}
    if not parts["unet"] or _SDXL_UNET_MARK not in keys or not (parts["text_encoder"] or parts["text_encoder_2"]):
        raise ModelError(
            f"{flag} {path} is {describe_checkpoint(keys)}; dreamcoeff trains from an SDXL base checkpoint"
        )
    missing = [name for name in ("text_encoder", "text_encoder_2") if not parts[name]]
    if need_vae and not parts["vae"]:
        missing.append("vae (or give --pretrained_vae_model_name_or_path)")
    if missing:
        raise ModelError(
            f"{flag} {path} is an SDXL checkpoint without {', '.join(missing)} "
            f"(no {' / '.join(SDXL_SINGLE_FILE_PARTS[m.split()[0]] + '*' for m in missing)} tensors): "
            "give a complete checkpoint (UNet, both text encoders, VAE) or the model's diffusers folder"
        )
    return keys


def check_single_file_vae(path: str | os.PathLike, flag: str = "--pretrained_vae_model_name_or_path") -> None:
    """Refuse a single-file VAE that is a pickle, truncated, or holds no VAE (original or diffusers names)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{flag} {path} is a pickle checkpoint ({path.suffix}): {_PICKLE_WHY}")
    if not path.is_file():
        raise ModelError(f"{flag} {path}: no such file")
    keys = set(read_safetensors_header(path, flag))
    if not any(f"{p}encoder.conv_in.weight" in keys for p in ("", "first_stage_model.", "vae.")):
        raise ModelError(f"{flag} {path} is {describe_checkpoint(keys)}; give an SDXL VAE (encoder and decoder)")


def check_config_folder(config_dir: str | os.PathLike | None, model: str) -> Path:
    """The local diffusers folder whose configs and tokenizers describe a single-file `model`; refused
    (with what to give instead) if missing or not SDXL. Its weights are not needed and not read."""
    if not config_dir:
        raise ModelError(
            f"{model} is a single-file checkpoint: its configs and tokenizers come from a local folder, never the "
            "hub. Pass --base_config_dir with an SDXL diffusers folder (e.g. a local copy of "
            "stabilityai/stable-diffusion-xl-base-1.0; model_index.json, the */config.json files, scheduler/, "
            "tokenizer/ and tokenizer_2/ suffice, no weights)"
        )
    path = Path(config_dir).expanduser()
    if not path.is_dir():
        raise ModelError(f"--base_config_dir {config_dir}: no such folder (a local SDXL diffusers folder)")
    problem = _folder_problem(path)
    if problem:
        raise ModelError(f"--base_config_dir: {problem}")
    return path


def check_base_model(
    name_or_path: str,
    vae_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    config_dir: str | None = None,
) -> None:
    """The cheap checks of the base model (and VAE) flags, reading headers and configs only: what
    `load_components` and the sampler do first, and the trainer's preflight, before anything heavy."""
    if is_single_file(name_or_path):
        check_single_file(name_or_path, need_vae=not vae_name_or_path)
        check_config_folder(config_dir, name_or_path)
        for flag, value in (("--revision", revision), ("--variant", variant)):
            if value:
                raise ModelError(
                    f"{flag} {value}: applies to diffusers folders and hub ids; {name_or_path} is one file"
                )
    else:
        check_sdxl_folder(name_or_path)
    if is_single_file(vae_name_or_path):
        check_single_file_vae(vae_name_or_path)
    elif config_dir and not is_single_file(name_or_path):  # a flag that would do nothing is a mistake
        raise ModelError(
            f"--base_config_dir describes a single-file checkpoint, and {name_or_path} is a folder or hub id "
            "with its own configs: drop --base_config_dir"
        )


class BaseModelFlags(Protocol):
    """The base-model settings `base_model_flags` reads (the trainer's `TrainConfig` has them all)."""

    pretrained_model_name_or_path: str
    pretrained_vae_model_name_or_path: str | None
    revision: str | None
    variant: str | None
    base_config_dir: str | None


def base_model_flags(flags: BaseModelFlags) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(model, VAE, revision, variant, config folder): the arguments of `check_base_model` and
    `load_components`, in their order."""
    return (
        flags.pretrained_model_name_or_path,
        flags.pretrained_vae_model_name_or_path,
        flags.revision,
        flags.variant,
        flags.base_config_dir,
    )


def load_vae(vae_name_or_path: str, config_source: str, revision: str | None = None) -> torch.nn.Module:
    """A replacement VAE: a diffusers folder or hub id, or one .safetensors file whose architecture is
    the ``vae/config.json`` of `config_source` (the config folder, else the base's folder or cached hub
    id; read locally, never downloaded)."""
    from diffusers import AutoencoderKL

    if not is_single_file(vae_name_or_path):
        return AutoencoderKL.from_pretrained(vae_name_or_path, revision=revision)
    check_single_file_vae(vae_name_or_path)
    try:
        vae = AutoencoderKL.from_single_file(
            str(Path(vae_name_or_path).expanduser()), config=config_source, subfolder="vae", local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - the converters raise KeyError, RuntimeError, ValueError, ...
        raise ModelError(
            f"--pretrained_vae_model_name_or_path {vae_name_or_path}: could not load it with the VAE config of "
            f"{config_source} ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    _refuse_unloaded(vae, vae_name_or_path, "vae")
    return vae


def _refuse_unloaded(model: torch.nn.Module, path: str, part: str) -> None:
    """diffusers' single-file loader builds the model empty (on the meta device) and fills in what the
    file holds; a tensor the file lacks stays empty and would fail later, far from the cause."""
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ModelError(
            f"{path}: the file has no weights for {len(empty)} tensors of the {part} its config describes "
            f"(e.g. {empty[0]}): --base_config_dir describes another architecture than this checkpoint"
        )


def load_single_file_pipeline(
    path: str, config_dir: str, *, vae: torch.nn.Module | None = None, torch_dtype: torch.dtype | None = None, **kw
):
    """An SDXL pipeline from one original-layout .safetensors checkpoint, with diffusers'
    ``from_single_file`` and the configs and tokenizers of the local folder `config_dir` (offline).
    `kw` are the pipeline's own options (e.g. ``add_watermarker``). Raises `ModelError`."""
    from diffusers import StableDiffusionXLPipeline

    keys = check_single_file(path, need_vae=vae is None)
    folder = check_config_folder(config_dir, path)
    parts = {"vae": vae} if vae is not None else {}
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(Path(path).expanduser()),
            config=str(folder),
            local_files_only=True,
            torch_dtype=torch_dtype,
            **parts,
            **kw,
        )
    except Exception as exc:  # noqa: BLE001 - the converters raise KeyError, RuntimeError, ValueError, ...
        raise ModelError(
            f"could not load {path} with the configs of --base_config_dir {folder} "
            f"({type(exc).__name__}: {str(exc)[:300]}); the folder must describe this checkpoint's architecture"
        ) from None
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _refuse_unloaded(getattr(pipe, part), path, part)
    left_out = _left_out(keys, pipe, vae_from_file=vae is None)
    if left_out:
        raise ModelError(
            f"{path} holds more than the configs of --base_config_dir {folder} have room for ({'; '.join(left_out)}): "
            "the folder describes a smaller architecture than this checkpoint"
        )
    return pipe


_LAYER_KEYS = {
    "text_encoder": re.compile(r"^conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\."),
    "text_encoder_2": re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\."),
}


def _left_out(keys: set[str], pipe, vae_from_file: bool) -> list[str]:
    """What of the file the loaded models have no place for. diffusers only warns about tensors a
    config has no room for, so a config folder with fewer blocks or layers than the file would give a
    truncated model silently; the UNet and VAE map one to one, the encoders are compared by layers."""
    problems = []
    for part in ("unet", "vae") if vae_from_file else ("unet",):
        prefix = SDXL_SINGLE_FILE_PARTS[part]
        in_file, in_model = sum(k.startswith(prefix) for k in keys), len(getattr(pipe, part).state_dict())
        if in_file > in_model:
            problems.append(f"{part}: {in_file} tensors in the file, {in_model} in the model")
    for part, pattern in _LAYER_KEYS.items():
        found = [int(m[1]) for m in map(pattern.match, keys) if m]
        want = getattr(pipe, part).config.num_hidden_layers
        if found and max(found) + 1 != want:
            problems.append(f"{part}: {max(found) + 1} layers in the file, {want} in the config")
    return problems


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
    name_or_path: str,
    vae_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    config_dir: str | None = None,
) -> SDXLComponents:
    """Load SDXL's parts from a hub id, a local folder, or one original-layout .safetensors
    checkpoint (its configs from the local folder `config_dir`); the training scheduler is DDPM."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    check_base_model(name_or_path, vae_name_or_path, revision, variant, config_dir)
    kw = dict(revision=revision)
    single = is_single_file(name_or_path)
    try:
        vae = None
        if vae_name_or_path:
            vae = load_vae(vae_name_or_path, str(config_dir) if config_dir or single else name_or_path, revision)
        if single:
            pipe = load_single_file_pipeline(name_or_path, config_dir, vae=vae, add_watermarker=False)
            scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler")
            parts = (pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet)
            return _checked_sdxl(SDXLComponents(*parts, scheduler), name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", use_fast=True, **kw)
        tokenizer_2 = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", use_fast=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder="text_encoder_2", variant=variant, **kw
        )
        if vae is None:
            vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load SDXL from {name_or_path}: {exc}") from exc
    parts = SDXLComponents(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, noise_scheduler)
    return _checked_sdxl(parts, name_or_path)


def _checked_sdxl(parts: SDXLComponents, name_or_path: str) -> SDXLComponents:
    """`parts`, refused unless the UNet has SDXL's text_time conditioning."""
    if getattr(parts.unet.config, "addition_embed_type", None) != "text_time":
        raise ModelError(f"{name_or_path}: the UNet has no text_time conditioning, so it is not an SDXL UNet")
    return parts


def token_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])


def encode_prompt_batch(
    prompts: Sequence[str],
    tokenizers: Sequence[Any],
    text_encoders: Sequence[torch.nn.Module],
    device: torch.device,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding of a batch, differentiable (learned tokens and text-encoder LoRA train
    through it): penultimate hidden states of both encoders concatenated (B x 77 x D), and the second
    encoder's pooled projection (B x P), in the encoders' dtype on `device`.

    `clip_skip` skips that many more layers, as the SDXL pipeline's ``encode_prompt(clip_skip=N)``
    does: ``hidden_states[-(N + 2)]`` (the pooled projection stays the last layer's there too)."""
    layer = -2 if clip_skip is None else -(clip_skip + 2)
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
        hidden.append(result.hidden_states[layer])
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts(
    prompts, tokenizers, text_encoders, device, clip_skip: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SDXL prompt encoding of each distinct prompt (frozen encoders: computed once and cached).
    Returns {prompt: (embeds 77 x D, pooled P)} in float32 on the CPU; `clip_skip` as in
    `encode_prompt_batch`.

    Prompts longer than the tokenizers' 77 tokens are cut, with a warning naming the prompt.
    """
    out = {}
    for prompt in dict.fromkeys(prompts):
        max_len = tokenizers[0].model_max_length
        n = token_length(tokenizers[0], prompt)
        if n > max_len:
            logger.warning("prompt is %d tokens, CLIP reads %d; the rest is cut: %r", n, max_len, prompt)
        embeds, pooled = encode_prompt_batch([prompt], tokenizers, text_encoders, device, clip_skip)
        out[prompt] = (embeds[0].float().cpu(), pooled[0].float().cpu())
    return out
