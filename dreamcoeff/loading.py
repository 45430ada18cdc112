"""Load a whole training run into a `StableDiffusionXLPipeline` in one call, and take it out again.

A run folder holds whatever its method trained: alpha (`coeff_weights.safetensors`), LoRA
(`pytorch_lora_weights.safetensors`), a full UNet (`unet/`), learned tokens (`<name>_emb.safetensors`).
`load_run` loads each with the library's own loaders (alpha validated all-or-nothing; the tokens
through diffusers' `load_textual_inversion`, as a user would; LoRA through diffusers' loader after
`check_lora_file` has read and checked it, since a hostile file could otherwise leave half an adapter
in the UNet) and returns what it loaded and the prompt text of the learned tokens; `unload_run` gives
the base model back exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .lora import lora_problems, tensor_value_problems, unet_architecture_differences
from .methods import artifacts_in
from .processor import remove_coeff
from .tokens import load_embeddings_into, replace_abstractions, token_abstractions, unload_embeddings
from .weights import load_coeff_weights

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["LoadedRun", "RunLoadError", "check_lora_file", "load_run", "unload_run"]

#: The adapter name `load_run` gives a run's LoRA in the pipeline.
LORA_ADAPTER = "dreamcoeff_run"


class RunLoadError(ValueError):
    """A run folder that holds nothing to load, or parts that do not fit the pipeline."""


@dataclass
class LoadedRun:
    """What `load_run` put into a pipeline (pass it to `unload_run` to take it out again).

    Attributes:
        folder: the run folder.
        parts: the kinds loaded, in order: ``alpha``, ``lora``, ``unet``, ``embeddings``.
        tokens: the learned token strings (``["<s0>", "<s1>"]``), empty without embeddings.
        abstractions: ``{"TOK": "<s0><s1>"}``: what to write in prompts for each token abstraction.
    """

    folder: Path
    parts: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    abstractions: dict[str, str] = field(default_factory=dict)
    base_unet: torch.nn.Module | None = None
    # the UNet parameters' requires_grad flags before the LoRA: PEFT freezes the base layers when it
    # injects an adapter and never unfreezes them, and the flag is not cosmetic (PyTorch's matmul folds
    # batched inputs differently when a weight requires grad, so even no_grad images move in the last bit)
    unet_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    # the same for each text encoder the run's LoRA went into ("text_encoder", "text_encoder_2")
    text_requires_grad: dict[str, dict[str, bool]] = field(default_factory=dict, repr=False)

    @property
    def token(self) -> str | None:
        """The prompt text of the run's (first) learned identifier, e.g. ``<s0><s1>``; None without."""
        if self.abstractions:
            return next(iter(self.abstractions.values()))
        return "".join(self.tokens) or None

    def prompt(self, text: str) -> str:
        """`text` with each token abstraction (``TOK``, as a whole word, as in training) replaced by the
        run's learned tokens."""
        return replace_abstractions(text, self.abstractions)


def _load_full_unet(pipe: StableDiffusionXLPipeline, folder: Path) -> torch.nn.Module:
    """The run's UNet, refused if its (loaded, defaults filled) config is another architecture."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=pipe.unet.dtype)
    differ = unet_architecture_differences(pipe.unet.config, unet.config)
    if differ:
        raise RunLoadError(f"{folder}: this UNet was trained from another base model ({', '.join(differ[:4])} differ)")
    return unet.to(pipe.unet.device)


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


def load_run(
    pipe: StableDiffusionXLPipeline, run: str | Path, coeff_scale: float = 1.0, lora_scale: float = 1.0
) -> LoadedRun:
    """Load everything a dreamcoeff run folder holds into `pipe`; returns a :class:`LoadedRun`.

    `coeff_scale` is alpha's strength (0 = base), `lora_scale` the LoRA adapter's weight. Files are
    checked before anything changes where the library can (alpha, the LoRA file, embeddings'
    dimensions, the UNet's config); if a later part fails, the parts already loaded are taken out again.

    Raises `RunLoadError` (a folder with nothing to load, a LoRA file or UNet that does not fit),
    `CoeffWeightsError` (the alpha file) or `TokenError` (the embeddings file), all ValueErrors whose
    message names the file; the pipeline is then as it was.
    """
    folder = Path(run)
    found = dict(artifacts_in(folder)) if folder.is_dir() else {}
    if not found:
        raise RunLoadError(
            f"{folder} holds no trained files (coeff_weights.safetensors, pytorch_lora_weights.safetensors, "
            "unet/, *_emb.safetensors): has the training finished? checkpoints are in checkpoint-* subfolders"
        )
    if "lora" in found:  # checked before anything changes
        lora_state, lora_meta = check_lora_file(pipe, found["lora"])
    loaded = LoadedRun(folder)
    try:
        if "embeddings" in found:
            loaded.tokens = load_embeddings_into(pipe, found["embeddings"])
            loaded.abstractions = token_abstractions(found["embeddings"])
            loaded.parts.append("embeddings")
        if "unet" in found:
            unet = _load_full_unet(pipe, found["unet"])
            loaded.base_unet, pipe.unet = pipe.unet, unet
            loaded.parts.append("unet")
        if "alpha" in found:
            load_coeff_weights(pipe, found["alpha"], scale=coeff_scale)
            loaded.parts.append("alpha")
        if "lora" in found:
            loaded.unet_requires_grad = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
            try:
                pipe.load_lora_into_unet(lora_state, None, pipe.unet, adapter_name=LORA_ADAPTER, metadata=lora_meta,
                                         _pipeline=pipe)  # fmt: skip
            except (ValueError, TypeError, RuntimeError, KeyError) as exc:
                if LORA_ADAPTER in (pipe.get_list_adapters().get("unet") or []):
                    _remove_run_lora(pipe, loaded.unet_requires_grad)
                raise RunLoadError(f"{found['lora']} could not be loaded: {exc}") from exc
            loaded.parts.append("lora")  # from here on unload_run takes it out again
            for prefix in sorted({k.split(".", 1)[0] for k in lora_state if k.startswith("text_encoder")}):
                encoder = getattr(pipe, prefix)  # --train_text_encoder: the encoders' LoRA too
                loaded.text_requires_grad[prefix] = {n: p.requires_grad for n, p in encoder.named_parameters()}
                pipe.load_lora_into_text_encoder(lora_state, None, encoder, prefix=prefix, adapter_name=LORA_ADAPTER,
                                                 metadata=lora_meta, _pipeline=pipe)  # fmt: skip
            pipe.set_adapters([LORA_ADAPTER], adapter_weights=[lora_scale])
    except BaseException:
        unload_run(pipe, loaded)
        raise
    loaded.parts.sort(key=["alpha", "lora", "unet", "embeddings"].index)
    return loaded


def _remove_run_lora(
    pipe: StableDiffusionXLPipeline, requires_grad: dict[str, bool], text: dict[str, dict[str, bool]] | None = None
) -> None:
    """Delete the run's adapter, and PEFT's wrapper layers with it when no other adapter is left; then
    give every UNet (and text encoder) parameter back the requires_grad flag it had before the adapter came in."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

    pipe.delete_adapters(LORA_ADAPTER)
    if not pipe.get_list_adapters().get("unet"):
        pipe.unet.unload_lora()
    models = [(pipe.unet, requires_grad)]
    for prefix, flags in (text or {}).items():
        encoder = getattr(pipe, prefix)
        if not pipe.get_list_adapters().get(prefix):
            _remove_text_encoder_monkey_patch(encoder)  # the encoder's module tree as it was
        models.append((encoder, flags))
    for model, flags in models:
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])


def unload_run(pipe: StableDiffusionXLPipeline, loaded: LoadedRun) -> None:
    """Take out what `load_run` loaded: the pipeline holds the base model's modules and tensors again.

    Adapters the caller loaded under other names stay; when the run's LoRA was the UNet's last adapter,
    PEFT's wrapper layers go too (deleting an adapter leaves them in place, around no adapter), so the
    UNet's module tree is the base model's, not just its output, and its parameters' requires_grad
    flags are what they were before the load.
    """
    if "lora" in loaded.parts:
        _remove_run_lora(pipe, loaded.unet_requires_grad, loaded.text_requires_grad)
    if "alpha" in loaded.parts:
        remove_coeff(pipe)
    if "unet" in loaded.parts and loaded.base_unet is not None:
        pipe.unet = loaded.base_unet
        loaded.base_unet = None
    if "embeddings" in loaded.parts:
        unload_embeddings(pipe, loaded.tokens)
    loaded.parts.clear()
