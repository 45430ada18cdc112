"""The optimizer over a method's parameter groups: AdamW, bitsandbytes' 8-bit AdamW, or Prodigy."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import TrainConfig, UsageError

__all__ = ["build_optimizer", "prodigy_optimizer"]

logger = logging.getLogger("dreamcoeff")


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """`--optimizer` over `groups` (each with its own rate: alpha, the weights, the tokens); a missing
    optional package is a `UsageError` saying what to install."""
    if cfg.optimizer == "prodigy":
        return prodigy_optimizer(groups, cfg)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UsageError(
                "--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag"
            ) from exc
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=cfg.adam_epsilon)
    return torch.optim.AdamW(groups, betas=betas, eps=cfg.adam_epsilon)


def prodigy_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Prodigy (prodigyopt) over the same parameter groups as AdamW. prodigyopt estimates one step size
    d for all groups together; each group's rate multiplies it (1.0 is Prodigy's intended value), so
    alpha, the weights and the tokens keep their own groups and `--coeff_lr` can damp alpha against
    the LoRA weights."""
    try:
        from prodigyopt import Prodigy
    except ImportError as exc:
        raise UsageError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`, or use adamw") from exc
    low = sorted({g["lr"] for g in groups if g["lr"] < 0.1})
    if low:
        logger.warning(
            "Prodigy finds the step size itself; a group's rate multiplies it and is usually 1.0 (got %s): "
            "pass --learning_rate 1.0 --coeff_lr 1.0 (and --text_encoder_lr 1.0) unless you mean to damp it",
            ", ".join(f"{lr:g}" for lr in low),
        )
    return Prodigy(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        beta3=cfg.prodigy_beta3,
        eps=cfg.adam_epsilon,
        decouple=cfg.prodigy_decouple,
        use_bias_correction=cfg.prodigy_use_bias_correction,
        safeguard_warmup=cfg.prodigy_safeguard_warmup,
    )
