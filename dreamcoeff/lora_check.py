"""The run loader's LoRA file check: a run's LoRA file, read with diffusers' reader and checked against a
pipeline's UNet (and text encoders) before anything is loaded.

Part of the run loader (`dreamcoeff.loading` re-exports `RunLoadError` and `check_lora_file`); its own
module only to keep each file one readable size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .lora import lora_problems, tensor_value_problems

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["RunLoadError", "check_lora_file"]


class RunLoadError(ValueError):
    """A run folder that holds nothing to load, or parts that do not fit the pipeline."""


_LORA_PARAM = re.compile(
    r"^unet\.(?P<module>.+?)\.(?P<kind>lora[._](?:down|up|A|B)\.weight|lora_magnitude_vector(?:\.weight)?)$"
)


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_lora_file(pipe: StableDiffusionXLPipeline, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A run's LoRA file, read with diffusers' reader (safetensors only) and checked against the UNet
    before anything is loaded: UNet LoRA keys only, a down and an up matrix per module whose sizes fit
    the module and each other, finite float values, and diffusers' adapter metadata of plain values.
    Returns (state dict, the adapter metadata rebuilt from what was checked, or None when the file has
    none); raises `RunLoadError` naming the file."""
    try:
        state, alphas, metadata = pipe.lora_state_dict(
            str(path.parent), weight_name=path.name, use_safetensors=True, return_lora_metadata=True
        )
    except Exception as exc:  # noqa: BLE001 - safetensors, json and diffusers' converters raise many types
        raise RunLoadError(f"{path} is not a LoRA file diffusers can read ({type(exc).__name__}: {exc})") from None
    if not state:
        raise RunLoadError(f"{path} holds no LoRA weights")
    if alphas:  # kohya's per-module alphas: not what dreamcoeff writes
        raise RunLoadError(f"{path} is a kohya-style LoRA (network alphas); load it with pipe.load_lora_weights")
    # --train_text_encoder runs: the text encoders' LoRA beside the UNet's, checked on its own
    text_state = {k: v for k, v in state.items() if k.startswith(("text_encoder.", "text_encoder_2."))}
    unet_state = {k: v for k, v in state.items() if k not in text_state}
    problems = [f"{k}: not a UNet LoRA weight of diffusers' format" for k in unet_state if not _LORA_PARAM.match(k)]
    problems += tensor_value_problems(state)
    text_ranks: dict[str, dict[str, int]] = {}
    if not problems:
        problems = lora_problems(pipe.unet, unet_state) + _text_encoder_problems(pipe, text_state, text_ranks)
    ranks: dict[str, int] = {}
    if not problems:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in unet_state.items():
            m = _LORA_PARAM.match(key)
            kind = "magnitude" if "magnitude" in m["kind"] else "down" if m["kind"][5] in "dA" else "up"
            modules.setdefault(m["module"], {})[kind] = value
        for name, parts in modules.items():
            down, up = parts.get("down"), parts.get("up")
            if down is None or up is None or down.ndim != up.ndim or down.ndim not in (2, 4):
                problems.append(f"{name}: needs one down and one up matrix of the same kind")
            elif down.shape[0] != up.shape[1] or down.shape[0] < 1:
                problems.append(f"{name}: down matrix of rank {down.shape[0]}, up matrix of rank {up.shape[1]}")
            elif "magnitude" in parts and tuple(parts["magnitude"].shape) != (up.shape[0],):
                problems.append(f"{name}: DoRA magnitudes of shape {tuple(parts['magnitude'].shape)}")
            else:
                ranks[name] = int(down.shape[0])
        doras = {name for name, parts in modules.items() if "magnitude" in parts}
        if doras and doras != set(modules):
            problems.append(f"DoRA magnitudes for {len(doras)} of {len(modules)} modules")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise RunLoadError(f"{path} does not fit this UNet ({len(problems)} problem(s)):\n  " + "\n  ".join(shown))
    if metadata is None:
        return state, None
    # diffusers builds PEFT's LoraConfig from this metadata as it stands (any rank, init method, modules
    # to save, target patterns); only the plain settings are taken, the rest follows from the tensors.
    meta = (
        {k[len("unet.") :]: v for k, v in metadata.items() if k.startswith("unet.")}
        if isinstance(metadata, dict)
        else None
    )
    alpha = meta.get("lora_alpha", None) if meta is not None else None
    pattern = meta.get("alpha_pattern") or {} if meta is not None else None
    if not (
        meta is not None
        and _number(alpha)
        and isinstance(pattern, dict)
        and all(isinstance(k, str) and k and _number(v) for k, v in pattern.items())
        and type(meta.get("use_dora", False)) is bool
        and meta.get("use_dora", False) == bool(doras)
        and type(meta.get("use_rslora", False)) is bool
    ):
        raise RunLoadError(
            f"{path}: its LoRA adapter metadata is not a valid LoRA config (lora_alpha, alpha_pattern, use_dora)"
        )
    for key in pattern:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:
            raise RunLoadError(f"{path}: alpha_pattern key {key!r} is not a valid pattern") from None
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    clean = {
        "r": common,
        "rank_pattern": {f"^{name}": r for name, r in ranks.items() if r != common},
        "lora_alpha": alpha,
        "alpha_pattern": pattern,
        "use_dora": bool(doras),
        "use_rslora": meta.get("use_rslora", False),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
    }
    clean = {f"unet.{k}": v for k, v in clean.items()}
    for prefix, found in text_ranks.items():  # one rank per encoder (what dreamcoeff writes)
        alpha = metadata.get(f"{prefix}.lora_alpha")
        if not _number(alpha) or len(set(found.values())) != 1:
            raise RunLoadError(f"{path}: its {prefix} LoRA needs one rank and a numeric lora_alpha in its metadata")
        te = {"r": next(iter(found.values())), "lora_alpha": alpha, "target_modules": sorted(found)}
        clean.update({f"{prefix}.{k}": v for k, v in {**te, "lora_dropout": 0.0, "use_dora": False}.items()})
    return state, clean


_TEXT_LORA = re.compile(
    r"^(?P<prefix>text_encoder(?:_2)?)\.(?P<module>.+?)\.(?:lora_linear_layer|lora)\.(?P<kind>down|up)\.weight$"
)


def _text_encoder_problems(pipe, state: dict[str, torch.Tensor], ranks: dict[str, dict[str, int]]) -> list[str]:
    """What is wrong with a LoRA file's text-encoder keys for `pipe`'s encoders (each must name a
    Linear of its encoder, down / up matrices whose sizes fit it); fills `ranks` (prefix -> module -> rank)."""
    problems, pairs = [], {}
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    modules = {p: dict(e.named_modules()) for p, e in encoders.items() if e is not None}
    for key, value in state.items():
        m = _TEXT_LORA.match(key)
        found = modules.get(m["prefix"], {}) if m else {}
        path = m["module"] if m else ""
        if path not in found:  # a file written with transformers 4's `text_model.` module tree
            path = path.removeprefix("text_model.")
        layer = getattr(found.get(path), "base_layer", found.get(path))
        if not m or not isinstance(layer, torch.nn.Linear) or value.ndim != 2:
            problems.append(f"{key}: not a LoRA weight of a Linear layer of {m['prefix'] if m else 'a text encoder'}")
        elif value.shape[int(m["kind"] == "down")] != (
            layer.in_features if m["kind"] == "down" else layer.out_features
        ):
            problems.append(f"{key}: shape {tuple(value.shape)} does not fit '{path}'")
        else:
            pairs.setdefault((m["prefix"], path), {})[m["kind"]] = value
    for (prefix, path), parts in pairs.items():
        if set(parts) != {"down", "up"} or parts["down"].shape[0] != parts["up"].shape[1]:
            problems.append(f"{prefix}.{path}: needs one down and one up matrix of the same rank")
        else:
            ranks.setdefault(prefix, {})[path] = int(parts["down"].shape[0])
    return problems
