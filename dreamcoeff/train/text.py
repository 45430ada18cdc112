"""A step's text conditioning: cached prompt embeddings, or live ones while the text side trains.

With frozen text encoders every caption is encoded once (a caption shuffled by a subset's
``shuffle_caption`` is encoded at its step). While `--train_text_encoder_ti` tokens train
(the first `--train_text_encoder_ti_frac` of the steps) or the encoders' LoRA does
(`--train_text_encoder`, the first `--train_text_encoder_frac`), each step encodes its captions
through both encoders with gradients flowing to the new rows and the LoRA weights only; when a
share is over that part freezes (the rows are written into the encoders), and once nothing on the
text side trains the captions are cached again. `--clip_skip` applies to every encoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..models import SDXLComponents, encode_prompt_batch, encode_prompts
from .errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..tokens import LearnedTokens
    from .text_encoder_lora import TextEncoderLora

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
        lora: TextEncoderLora | None = None,
        clip_skip: int | None = None,
    ):
        self.tokenizers = [components.tokenizer, components.tokenizer_2]
        self.encoders = [components.text_encoder, components.text_encoder_2]
        self.device, self.weight_dtype = device, weight_dtype
        self.captions = list(captions)
        self.tokens, self.lora, self.clip_skip = tokens, lora, clip_skip
        self.token_steps: int | None = None
        layers = min(e.config.num_hidden_layers for e in self.encoders)
        if clip_skip is not None and clip_skip + 1 > layers:  # hidden_states[-(N + 2)] must exist
            raise UsageError(f"--clip_skip {clip_skip} skips more layers than the text encoders have ({layers})")
        self.embeddings = self.encode_all(self.captions)

    def encode_all(self, captions: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`models.encode_prompts` of `captions` through the encoders as they are now (no gradients)."""
        return encode_prompts(captions, self.tokenizers, self.encoders, self.device, self.clip_skip)

    def set_schedule(self, max_steps: int, fraction: float) -> None:
        """The tokens train for the first ``ceil(fraction * max_steps)`` optimizer steps."""
        self.token_steps = math.ceil(fraction * max_steps)

    @property
    def training_tokens(self) -> bool:
        """Whether learned tokens are training now."""
        return self.tokens is not None and not self.tokens.frozen

    @property
    def training_lora(self) -> bool:
        """Whether the text encoders' LoRA is training now."""
        return self.lora is not None and not self.lora.frozen  # (an empty part is frozen)

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters training on the text side now (the new rows, the encoders' LoRA, or none)."""
        rows = list(self.tokens.rows) if self.training_tokens else []
        return rows + (list(self.lora.params) if self.training_lora else [])

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds B x 77 x D, pooled B x P)`` for a batch's captions, in the frozen weights' dtype."""
        if self.training_tokens or self.training_lora:
            embeds, pooled = encode_prompt_batch(captions, self.tokenizers, self.encoders, self.device, self.clip_skip)
            return embeds.to(self.weight_dtype), pooled.to(self.weight_dtype)
        table = self.embeddings
        missing = [c for c in captions if c not in table]
        if missing:  # shuffle_caption's orders: encoded for this step only (caching every order would grow without end)
            table = {**table, **self.encode_all(missing)}
        embeds = torch.stack([table[c][0] for c in captions]).to(self.device, self.weight_dtype)
        pooled = torch.stack([table[c][1] for c in captions]).to(self.device, self.weight_dtype)
        return embeds, pooled

    def sync_gradients(self, accelerator: Accelerator) -> None:
        """Average the rows' and the encoders' LoRA gradients over processes (they are not in the
        DDP-wrapped UNet)."""
        if accelerator.num_processes == 1:
            return
        for param in self.trainable():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            param.grad = accelerator.reduce(grad, reduction="mean")

    def freeze_if_due(self, step: int) -> bool:
        """At the end of the tokens' (or the encoders' LoRA's) share of the steps: freeze that part;
        once nothing on the text side trains, cache the captions again. True if anything froze."""
        froze = False
        if self.training_tokens and self.token_steps is not None and step >= self.token_steps:
            self.tokens.freeze()
            logger.info("step %d: learned tokens frozen (--train_text_encoder_ti_frac)", step)
            froze = True
        if self.lora is not None and self.lora.freeze_if_due(step):
            froze = True
        if froze and not (self.training_tokens or self.training_lora):
            self.embeddings = self.encode_all(self.captions)
            logger.info("step %d: the text side is frozen; prompts cached again", step)
        return froze
