"""The tuning methods (coeff, lora, coeff+lora, full): what each installs, trains and saves.

One small object per method answers every question the trainer, the model card and the sampler
have about it, so no code tests method names (``"coeff" in tuning``). A method is a set of
*parts*: alpha (Coeff-Tuning's H x H matrices), LoRA (PEFT, on the attention projections) and the
whole UNet (full fine-tuning), plus learned identifier tokens (pivotal tuning, `tokens.py`), which
compose with any of them. Each part has one file (or folder) in an output directory and in a
checkpoint, its own parameter group and learning rate, and its own save; reading the files back (a
checkpoint on resume, an earlier run's files, a run into a pipeline) is the run loader's
(`dreamcoeff.loading`), which asks the method which parts it has. Adding a method (DoRA, ...) means
adding a part or an entry to `METHODS`, not editing the loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .lora import (
    FULL_UNET_DIR,
    LORA_WEIGHTS_NAME,
    add_lora,
    lora_state_dict,
    save_lora,
    text_encoders_lora_state,
)
from .processor import apply_coeff, coeff_parameters
from .tokens import EMBEDDINGS_SUFFIX
from .weights import COEFF_WEIGHTS_NAME, save_coeff_weights

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from .tokens import LearnedTokens

__all__ = [
    "ARTIFACTS",
    "METHODS",
    "Artifact",
    "InstallSettings",
    "OptimizerSettings",
    "TuningMethod",
    "artifacts_in",
    "get_method",
]


# The settings a method reads, as the shapes it needs rather than the trainer's config class: the
# methods layer sits below `train/` and must not import it, not even for type hints (docs/DESIGN.md
# section 5). The trainer's config dataclass has these fields, so it satisfies both protocols as it is.
class InstallSettings(Protocol):
    """What `TuningMethod.install` reads: LoRA's shape and alpha's targets, dropout and chunking."""

    rank: int
    lora_alpha: int | None
    lora_dropout: float
    use_dora: bool
    coeff_targets: str
    coeff_dropout: float
    coeff_chunk_size: int | None


class OptimizerSettings(Protocol):
    """What `TuningMethod.parameter_groups` reads: each group's learning rate and the weight decay."""

    coeff_lr: float
    learning_rate: float
    adam_weight_decay: float
    text_encoder_lr: float


@dataclass(frozen=True)
class Artifact:
    """A trained part's file (or folder) inside an output directory or a checkpoint.

    Attributes:
        kind: ``"alpha"``, ``"lora"``, ``"unet"`` or ``"embeddings"``.
        name: the file or folder name; for embeddings the suffix of ``<run name>_emb.safetensors``.
        marker: for a folder, the file that must be inside it for the folder to count.
        suffix_only: `name` is a suffix (the file is named after its run).
    """

    kind: str
    name: str
    marker: str | None = None
    suffix_only: bool = False

    def find(self, folder: str | Path) -> Path | None:
        """The artifact's path in `folder` if it is there (a folder only with its marker), else None.
        For a name known only by its suffix, the file named after the folder is preferred."""
        folder = Path(folder)
        if self.suffix_only:
            named = folder / (folder.resolve().name + self.name)
            found = sorted(folder.glob("*" + self.name)) if folder.is_dir() else []
            return named if named.is_file() else (found[0] if found else None)
        path = folder / self.name
        found = (path / self.marker).is_file() if self.marker else path.is_file()
        return path if found else None


ALPHA = Artifact("alpha", COEFF_WEIGHTS_NAME)
LORA = Artifact("lora", LORA_WEIGHTS_NAME)
FULL_UNET = Artifact("unet", FULL_UNET_DIR, marker="config.json")
EMBEDDINGS = Artifact("embeddings", EMBEDDINGS_SUFFIX, suffix_only=True)
#: Every kind of trained file, in the order the sampler and the trainer report them.
ARTIFACTS: tuple[Artifact, ...] = (ALPHA, LORA, FULL_UNET, EMBEDDINGS)


def artifacts_in(folder: str | Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of every trained file in a training output folder (or checkpoint)."""
    return [(a.kind, path) for a in ARTIFACTS if (path := a.find(folder)) is not None]


@dataclass(frozen=True)
class TuningMethod:
    """One ``--tuning`` choice.

    Attributes:
        name: the flag value (``coeff``, ``lora``, ``coeff+lora``, ``full``).
        title_template: its human name, with ``{rank}`` for the LoRA rank.
        coeff: trains Coeff-Tuning's alpha.
        lora: trains LoRA on the attention projections.
        full: trains every UNet weight.
        tokens: also learns identifier tokens in both text encoders (``--train_text_encoder_ti``).
    """

    name: str
    title_template: str
    coeff: bool = False
    lora: bool = False
    full: bool = False
    tokens: bool = False

    # ---- what it is -------------------------------------------------------------------------------

    def title(self, rank: int) -> str:
        """A human name for model cards and summaries, e.g. ``Coeff-Tuning + LoRA rank 4``."""
        title = self.title_template.format(rank=rank)
        if self.tokens and self.trains_unet:
            title += " + learned tokens"
        return title

    def with_tokens(self, tokens: bool = True) -> TuningMethod:
        """This method with (or without) learned identifier tokens."""
        return replace(self, tokens=tokens)

    @property
    def trains_unet(self) -> bool:
        """Whether any UNet part trains (``--tuning none`` trains only tokens)."""
        return self.coeff or self.lora or self.full

    @property
    def weights_label(self) -> str:
        """What ``--learning_rate`` trains for this method (model card)."""
        return "UNet" if self.full else "LoRA"

    @property
    def tags(self) -> list[str]:
        """Model-card tags beyond the common ones."""
        return (["lora"] if self.lora else []) + (["textual_inversion"] if self.tokens else [])

    def unet_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the UNet is held in: full fine-tuning keeps float32 master weights (accelerate
        autocasts the forward); adapters train in float32 on a UNet frozen in `weight_dtype`."""
        return torch.float32 if self.full else weight_dtype

    # ---- training -----------------------------------------------------------------------------------

    def install(self, unet: UNet2DConditionModel, cfg: InstallSettings) -> None:
        """Add this method's trainable parts to a frozen UNet (adapters in float32)."""
        if self.lora:
            add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, use_dora=cfg.use_dora)
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if self.coeff:
            targets = ("attn1", "attn2") if cfg.coeff_targets == "both" else (cfg.coeff_targets,)
            apply_coeff(unet, targets=targets, dropout=cfg.coeff_dropout, chunk_size=cfg.coeff_chunk_size)
        if self.full:
            unet.requires_grad_(True)

    def trainable_parameters(self, unet: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """``(alpha parameters, weight parameters)``: the weights are LoRA's A/B matrices, or every
        UNet weight with full fine-tuning (the ``--learning_rate`` group)."""
        coeff = coeff_parameters(unet) if self.coeff else []
        ids = {id(p) for p in coeff}
        weights = [p for p in unet.parameters() if p.requires_grad and id(p) not in ids]
        return coeff, weights

    def parameter_groups(
        self, unet: torch.nn.Module, cfg: OptimizerSettings, tokens: LearnedTokens | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer groups: alpha with ``--coeff_lr`` and no weight decay (decay would pull it to
        the base model), the weights with ``--learning_rate`` and ``--adam_weight_decay``, the
        token rows with ``--text_encoder_lr`` and no decay (decay pulls an embedding towards zero,
        which is no word at all). ``rate_flag`` names each group's flag (messages on resume)."""
        coeff, weights = self.trainable_parameters(unet)
        groups = []
        if coeff:
            groups.append({"params": coeff, "lr": cfg.coeff_lr, "weight_decay": 0.0, "rate_flag": "--coeff_lr"})
        if weights:
            groups.append(
                {
                    "params": weights,
                    "lr": cfg.learning_rate,
                    "weight_decay": cfg.adam_weight_decay,
                    "rate_flag": "--learning_rate",
                }
            )
        if self.tokens and tokens is not None:
            groups.append(
                {
                    "params": list(tokens.rows),
                    "lr": cfg.text_encoder_lr,
                    "weight_decay": 0.0,
                    "rate_flag": "--text_encoder_lr",
                }
            )
        return groups

    # ---- files --------------------------------------------------------------------------------------

    def save(
        self,
        unet: torch.nn.Module,
        folder: str | Path,
        metadata: Mapping[str, Any] | None = None,
        tokens: LearnedTokens | None = None,
        tokens_name: str | None = None,
        kohya_name: str | None = None,
        text_encoders: Sequence[torch.nn.Module] = (),
    ) -> list[Path]:
        """Write every trained part into `folder` (each file atomically); returns their paths.

        `metadata` goes into the alpha file's header (the final files carry the training arguments);
        the learned tokens go to `tokens_name` (``<run name>_emb.safetensors``); with `kohya_name`
        the LoRA also goes there in kohya's key layout, UI-ready (``--save_precision``, ss_* metadata).
        `text_encoders` (both, with a LoRA adapter: ``--train_text_encoder``) put their LoRA into both
        LoRA files (``text_encoder.`` / ``text_encoder_2.`` keys; ``lora_te1_`` / ``lora_te2_`` in kohya's).
        """
        folder = Path(folder)
        written = []
        if self.tokens and tokens is not None:
            written.append(tokens.save(folder / (tokens_name or folder.name + EMBEDDINGS_SUFFIX)))
        if self.coeff:
            written.append(save_coeff_weights(folder / COEFF_WEIGHTS_NAME, unet, metadata))
        if self.lora:
            written.append(save_lora(folder, unet, text_encoders))
            if kohya_name:
                from .kohya import save_kohya_lora

                lora_alpha = unet.peft_config["default"].lora_alpha
                args = dict((metadata or {}).get("training_args") or {})
                ui = dict(precision=args.get("save_precision", "fp16"), training_args=args)
                ui["prediction_type"] = (metadata or {}).get("prediction_type", "epsilon")
                state = {**lora_state_dict(unet), **text_encoders_lora_state(text_encoders)}
                written.append(save_kohya_lora(folder / kohya_name, state, unet.config, lora_alpha, **ui))
        if self.full:
            unet.save_pretrained(folder / FULL_UNET_DIR, safe_serialization=True)
            written.append(folder / FULL_UNET_DIR)
        return written

    def load_lines(self, out: str | Path) -> list[str]:
        """Python lines that load this method's files into a `pipe` (model card)."""
        lines = []
        if self.coeff:
            lines.append(f'load_coeff_weights(pipe, "{out}")  # alpha, strength 1.0')
        if self.lora:
            lines.append(f'pipe.load_lora_weights("{out}")')
        if self.full:
            lines.append(
                f'pipe.unet = UNet2DConditionModel.from_pretrained("{out}", subfolder="{FULL_UNET_DIR}", '
                'torch_dtype=torch.float16).to("cuda")'
            )
        return lines

    def token_load_lines(self, out: str | Path, embeddings_name: str, tokens: list[str]) -> list[str]:
        """The diffusers lines that load this run's learned tokens (model card)."""
        if not self.tokens:
            return []
        path = Path(out) / embeddings_name
        return [
            "from safetensors.torch import load_file",
            f'state = load_file("{path}")',
            f'pipe.load_textual_inversion(state["clip_l"], token={tokens!r}, text_encoder=pipe.text_encoder, '
            "tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion(state["clip_g"], token={tokens!r}, text_encoder=pipe.text_encoder_2, '
            "tokenizer=pipe.tokenizer_2)",
        ]


METHODS: dict[str, TuningMethod] = {
    m.name: m
    for m in (
        TuningMethod("coeff", "Coeff-Tuning (alpha)", coeff=True),
        TuningMethod("lora", "LoRA rank {rank}", lora=True),
        TuningMethod("coeff+lora", "Coeff-Tuning + LoRA rank {rank}", coeff=True, lora=True),
        TuningMethod("full", "full UNet fine-tuning", full=True),
        # learned tokens only (with --train_text_encoder_ti): textual inversion in both encoders
        TuningMethod("none", "learned tokens (pivotal tuning)"),
    )
}


def get_method(name: str, tokens: bool = False) -> TuningMethod:
    """The method of a ``--tuning`` value (with learned tokens if `tokens`); a ValueError lists the
    choices for an unknown one."""
    try:
        method = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown tuning method {name!r}: use one of {', '.join(METHODS)}") from None
    return method.with_tokens(tokens) if tokens else method
