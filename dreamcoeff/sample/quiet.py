"""Quiet loading: silence diffusers' and PEFT's notices that say nothing to a user of the sampler."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_lora_loading", "quiet_diffusers_noise", "quiet_token_loading"]


@contextlib.contextmanager
def quiet_lora_loading() -> Iterator[None]:
    """Silence diffusers' "no LoRA keys for the text encoder" and PEFT's "multiple adapters" notices."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Already found a `peft_config` attribute.*")
            yield
    finally:
        dlogging.set_verbosity(level)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def quiet_diffusers_noise() -> Iterator[None]:
    """Drop diffusers' per-call chatter that says nothing to a user of this tool: with a float16
    SDXL VAE (force_upcast) every decode casts it to float32 and back, logging a warning each time,
    and 0.42 deprecates the ``torch_dtype`` argument that older releases need."""
    drop = _DropMessages("should be kept in float32")
    target = logging.getLogger("diffusers.models.modeling_utils")
    target.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`upcast_vae` is deprecated.*")
            warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated.*")
            yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def quiet_token_loading() -> Iterator[None]:
    """Silence transformers' notice on how ``resize_token_embeddings`` initialises the new rows
    (``load_textual_inversion`` overwrites them with the learned ones at once)."""
    from transformers.utils import logging as tlogging

    level = tlogging.get_verbosity()
    tlogging.set_verbosity_error()
    try:
        yield
    finally:
        tlogging.set_verbosity(level)
