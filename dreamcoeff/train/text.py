"""A step's text conditioning: cached prompt embeddings, or live ones while learned tokens train.

With frozen text encoders every caption is encoded once (a caption shuffled by a subset's
``shuffle_caption`` is encoded at its step). While `--train_text_encoder_ti` tokens train
(the first `--train_text_encoder_ti_frac` of the steps) each step encodes its captions through both
encoders with gradients flowing to the new rows only; when that share is over the rows are written
into the encoders, frozen, and the captions are cached again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..models import SDXLComponents, encode_prompt_batch, encode_prompts

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..tokens import LearnedTokens

logger = logging.getLogger("dreamcoeff")


class TextConditioning:
    """Prompt embeddings for the training steps (see the module docstring)."""

    def __init__(
        self,
        components: SDXLComponents,
        device: torch.device,
        weight_dtype: torch.dtype,
        captions: Sequence[str],
        tokens: LearnedTokens | None = None,
    ):
        self.tokenizers = [components.tokenizer, components.tokenizer_2]
        self.encoders = [components.text_encoder, components.text_encoder_2]
        self.device, self.weight_dtype = device, weight_dtype
        self.captions = list(captions)
        self.tokens = tokens
        self.token_steps: int | None = None
        self.embeddings = encode_prompts(self.captions, self.tokenizers, self.encoders, device)

    def set_schedule(self, max_steps: int, fraction: float) -> None:
        """The tokens train for the first ``ceil(fraction * max_steps)`` optimizer steps."""
        self.token_steps = math.ceil(fraction * max_steps)

    @property
    def training_tokens(self) -> bool:
        """Whether learned tokens are training now."""
        return self.tokens is not None and not self.tokens.frozen

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters training on the text side now (the new rows, or none)."""
        return list(self.tokens.rows) if self.training_tokens else []

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds B x 77 x D, pooled B x P)`` for a batch's captions, in the frozen weights' dtype."""
        if self.training_tokens:
            embeds, pooled = encode_prompt_batch(captions, self.tokenizers, self.encoders, self.device)
            return embeds.to(self.weight_dtype), pooled.to(self.weight_dtype)
        table = self.embeddings
        missing = [c for c in captions if c not in table]
        if missing:  # shuffle_caption's orders: encoded for this step only (caching every order would grow without end)
            table = {**table, **encode_prompts(missing, self.tokenizers, self.encoders, self.device)}
        embeds = torch.stack([table[c][0] for c in captions]).to(self.device, self.weight_dtype)
        pooled = torch.stack([table[c][1] for c in captions]).to(self.device, self.weight_dtype)
        return embeds, pooled

    def sync_gradients(self, accelerator: Accelerator) -> None:
        """Average the rows' gradients over processes (they are not in the DDP-wrapped UNet)."""
        if accelerator.num_processes == 1 or not self.training_tokens:
            return
        for row in self.tokens.rows:
            grad = row.grad if row.grad is not None else torch.zeros_like(row)
            row.grad = accelerator.reduce(grad, reduction="mean")

    def freeze_if_due(self, step: int) -> bool:
        """At the end of the tokens' share of the steps: freeze them and cache the captions again."""
        if not self.training_tokens or self.token_steps is None or step < self.token_steps:
            return False
        self.tokens.freeze()
        self.embeddings = encode_prompts(self.captions, self.tokenizers, self.encoders, self.device)
        logger.info("step %d: learned tokens frozen (--train_text_encoder_ti_frac); prompts cached again", step)
        return True
