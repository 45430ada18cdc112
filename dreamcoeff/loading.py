"""Load a whole training run into a `StableDiffusionXLPipeline` in one call, and take it out again.

A run folder holds whatever its method trained: alpha (`coeff_weights.safetensors`), LoRA
(`pytorch_lora_weights.safetensors`), a full UNet (`unet/`), learned tokens (`<name>_emb.safetensors`).
`load_run` loads each with the library's own loaders (alpha validated all-or-nothing; LoRA and the
tokens through diffusers' `load_lora_weights` / `load_textual_inversion`, as a user would) and
returns what it loaded and the prompt text of the learned tokens; `unload_run` gives the base model
back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .lora import unet_architecture_differences
from .methods import artifacts_in
from .processor import remove_coeff
from .tokens import load_embeddings_into, replace_abstractions, token_abstractions, unload_embeddings
from .weights import load_coeff_weights

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["LoadedRun", "RunLoadError", "load_run", "unload_run"]

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


def load_run(
    pipe: StableDiffusionXLPipeline, run: str | Path, coeff_scale: float = 1.0, lora_scale: float = 1.0
) -> LoadedRun:
    """Load everything a dreamcoeff run folder holds into `pipe`; returns a :class:`LoadedRun`.

    `coeff_scale` is alpha's strength (0 = base), `lora_scale` the LoRA adapter's weight. Files are
    checked before anything changes where the library can (alpha, embeddings' dimensions, the
    UNet's config); if a later part fails, the parts already loaded are taken out again.
    """
    folder = Path(run)
    found = dict(artifacts_in(folder)) if folder.is_dir() else {}
    if not found:
        raise RunLoadError(
            f"{folder} holds no trained files (coeff_weights.safetensors, pytorch_lora_weights.safetensors, "
            "unet/, *_emb.safetensors): has the training finished? checkpoints are in checkpoint-* subfolders"
        )
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
            pipe.load_lora_weights(str(folder), adapter_name=LORA_ADAPTER)
            loaded.parts.append("lora")  # from here on unload_run takes it out again
            pipe.set_adapters([LORA_ADAPTER], adapter_weights=[lora_scale])
    except BaseException:
        unload_run(pipe, loaded)
        raise
    loaded.parts.sort(key=["alpha", "lora", "unet", "embeddings"].index)
    return loaded


def unload_run(pipe: StableDiffusionXLPipeline, loaded: LoadedRun) -> None:
    """Take out what `load_run` loaded: the pipeline computes the base model's images again, bit for bit."""
    if "lora" in loaded.parts:
        pipe.delete_adapters(LORA_ADAPTER)
    if "alpha" in loaded.parts:
        remove_coeff(pipe)
    if "unet" in loaded.parts and loaded.base_unet is not None:
        pipe.unet = loaded.base_unet
        loaded.base_unet = None
    if "embeddings" in loaded.parts:
        unload_embeddings(pipe, loaded.tokens)
    loaded.parts.clear()
