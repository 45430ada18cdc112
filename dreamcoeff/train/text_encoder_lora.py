"""LoRA on both CLIP text encoders (``--train_text_encoder``), and the checks of the text-side flags.

The adapters are PEFT's, on each encoder's attention projections (q/k/v/out_proj), with the UNet
LoRA's rank and alpha, as diffusers' ``train_dreambooth_lora_sdxl.py`` installs them; without
dropout (the encoders stay in eval mode, as validation and inference read them, so ``--lora_dropout``
is the UNet's only). They
have their own parameter group (``--text_encoder_lora_lr``, default ``--learning_rate``: the
``--text_encoder_lr`` flag stays the learned tokens' rate) and train for the first
``--train_text_encoder_frac`` of the steps; then they freeze and the captions are cached again
(`text.TextConditioning`). They are saved into the run's LoRA files beside the UNet's
(``text_encoder.`` / ``text_encoder_2.`` keys in diffusers' file, ``lora_te1_`` / ``lora_te2_`` in
the UI file) and into every checkpoint. EMA (``--use_ema``) averages the UNet's weights only.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from ..lora import add_text_encoder_lora
from ..methods import METHODS
from .errors import UsageError

if TYPE_CHECKING:
    from ..models import SDXLComponents

#: The trainer's `config.TrainConfig`, by another name: config.py imports this module for its checks,
#: so this one must not import config (not even for hints: the layout test counts those as a cycle).
TrainConfig = Any

logger = logging.getLogger("dreamcoeff")

__all__ = ["TextEncoderLora", "validate_text_side", "validate_tokens"]


class TextEncoderLora:
    """The LoRA adapters of both text encoders of one run, and when they stop training.

    Attributes:
        encoders: the two encoders carrying the adapters (CLIP ViT-L, OpenCLIP bigG).
        params: their LoRA A/B matrices (float32), the parameters this part trains.
        frozen: the adapters no longer train (their share of the steps is over), or there are none.
        steps: the optimizer steps they train for (set by `set_schedule`).
    """

    def __init__(self, encoders: list[torch.nn.Module], params: list[torch.nn.Parameter]):
        self.encoders, self.params = encoders, params
        self.frozen = not params  # without --train_text_encoder: nothing to train, ever
        self.steps: int | None = None

    @classmethod
    def install(cls, components: SDXLComponents, cfg: TrainConfig) -> TextEncoderLora:
        """With ``--train_text_encoder``: the adapters on both (frozen) encoders of `components`; else an
        empty part (no encoders, no parameters, no group), so callers need no special case."""
        if not cfg.train_text_encoder:
            return cls([], [])
        encoders = [components.text_encoder, components.text_encoder_2]
        params = [p for e in encoders for p in add_text_encoder_lora(e, cfg.rank, cfg.lora_alpha)]
        if cfg.gradient_checkpointing:  # the encoders' activations too, as for the UNet
            for encoder in encoders:
                # non-reentrant: the encoders' inputs (token embeddings of frozen tables) need no grad for
                # the LoRA inside to get one; transformers checkpoints only in train mode (CLIP's dropout is 0)
                kwargs = {"use_reentrant": False}
                if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5's name
                    encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:  # transformers 4
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                encoder.train()
        return cls(encoders, params)

    def parameter_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """One optimizer group: ``--text_encoder_lora_lr`` (else ``--learning_rate``), LoRA's weight decay."""
        if not self.params:
            return []
        rate = cfg.text_encoder_lora_lr if cfg.text_encoder_lora_lr is not None else cfg.learning_rate
        flag = "--text_encoder_lora_lr" if cfg.text_encoder_lora_lr is not None else "--learning_rate (text encoders)"
        return [{"params": self.params, "lr": rate, "weight_decay": cfg.adam_weight_decay, "rate_flag": flag}]

    def set_schedule(self, max_steps: int, fraction: float) -> None:
        """The adapters train for the first ``ceil(fraction * max_steps)`` optimizer steps (all of them
        at 1.0: no freeze, and no caching again, after the last step)."""
        self.steps = math.ceil(fraction * max_steps) if fraction < 1.0 else None

    def freeze_if_due(self, step: int) -> bool:
        """Freeze the adapters once `step` reaches their share of the steps; True if this call froze them.
        Frozen parameters get no gradient, so AdamW leaves them (and their decay) alone from then on."""
        if self.frozen or self.steps is None or step < self.steps:
            return False
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        self.frozen = True
        logger.info("step %d: text-encoder LoRA frozen (--train_text_encoder_frac)", step)
        return True


def validate_text_side(cfg: TrainConfig) -> None:
    """The text-side flags: learned tokens, the text encoders' LoRA, ``--clip_skip``."""
    validate_tokens(cfg)
    if cfg.clip_skip is not None and cfg.clip_skip < 0:
        raise UsageError(
            f"--clip_skip must be >= 0, got {cfg.clip_skip} (1 reads the layer before SDXL's default "
            "penultimate one; 0 is the default itself)"
        )
    if not cfg.train_text_encoder:
        for flag in ("text_encoder_lora_lr",):
            if getattr(cfg, flag) is not None:
                raise UsageError(f"--{flag} is the rate of the text encoders' LoRA: add --train_text_encoder")
        return
    method = METHODS[cfg.tuning]
    if not method.lora:
        raise UsageError(
            "--train_text_encoder adds LoRA to both text encoders, saved in the run's LoRA files: it needs "
            f"--tuning lora or coeff+lora, not --tuning {cfg.tuning}"
        )
    if cfg.use_dora:
        raise UsageError("--train_text_encoder with --use_dora is not supported: drop one of the two flags")
    if not 0.0 < cfg.train_text_encoder_frac <= 1.0:
        raise UsageError(f"--train_text_encoder_frac must be in (0, 1], got {cfg.train_text_encoder_frac}")
    if cfg.text_encoder_lora_lr is not None and cfg.text_encoder_lora_lr <= 0:
        raise UsageError("--text_encoder_lora_lr must be > 0")


def validate_tokens(cfg: TrainConfig) -> None:
    """The learned-token flags: what is asked must be trainable and the abstraction must be used."""
    from ..tokens import TokenError, TokenPlan

    if cfg.tuning == "none" and not cfg.train_text_encoder_ti:
        raise UsageError("--tuning none trains nothing by itself: add --train_text_encoder_ti (learned tokens only)")
    if not cfg.train_text_encoder_ti:
        return
    try:
        plan = TokenPlan.make(cfg.token_abstraction, cfg.num_new_tokens_per_abstraction)
    except TokenError as exc:
        raise UsageError(str(exc)) from None
    missing = plan.missing_from(cfg.instance_prompt or "")
    if cfg.instance_prompt and missing:
        raise UsageError(
            f"--instance_prompt {cfg.instance_prompt!r} does not contain the token abstraction {missing[0]!r}: "
            f"write it where the subject's name goes, e.g. 'a photo of {missing[0]} dog'"
        )
    if not 0.0 < cfg.train_text_encoder_ti_frac <= 1.0:
        raise UsageError(f"--train_text_encoder_ti_frac must be in (0, 1], got {cfg.train_text_encoder_ti_frac}")
    if cfg.text_encoder_lr <= 0:
        raise UsageError("--text_encoder_lr must be > 0")
