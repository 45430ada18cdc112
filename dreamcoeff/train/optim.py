"""The optimizer over a method's parameter groups: AdamW, bitsandbytes' 8-bit AdamW, or Prodigy."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import TrainConfig, UsageError

__all__ = [
    "build_optimizer",
    "flag_settings",
    "prodigy_optimizer",
    "reapply_flag_settings",
    "update_count",
    "update_count_in",
]

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


# The per-group settings that come from flags (the rest of a group, e.g. Prodigy's running d, is state).
_FLAG_KEYS = ("initial_lr", "weight_decay", "betas", "eps")


def update_count_in(state_dict: dict[str, Any]) -> int | None:
    """The updates an optimizer state records (the largest per-parameter ``step``), or None for an
    optimizer that keeps no count (or has not stepped yet)."""
    steps = [int(v["step"]) for v in state_dict.get("state", {}).values() if isinstance(v, dict) and "step" in v]
    return max(steps) if steps else None


def update_count(optimizer: torch.optim.Optimizer) -> int | None:
    """`update_count_in` of a live optimizer (accelerate's wrapper or a plain one)."""
    return update_count_in(optimizer.state_dict())


def flag_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per group, the settings this run's flags gave it (its base rate, decay, betas, eps), taken
    before a checkpoint's state replaces them (`reapply_flag_settings`)."""
    return [{key: group[key] for key in (*_FLAG_KEYS, "rate_flag") if key in group} for group in optimizer.param_groups]


def reapply_flag_settings(optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]) -> list[str]:
    """After a resume, give back to each group the settings this run's flags ask for: a checkpoint's
    optimizer and scheduler state would otherwise keep the old run's rate (and decay, betas, eps) in
    silence, whatever the flags now say. The schedule's shape (warmup, cycles, power) comes from the
    flags anyway; its position (the step) stays the checkpoint's. Returns one line per change."""
    groups = optimizer.param_groups
    if len(groups) != len(fresh):  # another method's groups: refused before loading (structural flags)
        return []
    changes = []
    for index, (group, wanted) in enumerate(zip(groups, fresh)):
        flag = wanted.get("rate_flag") or f"group {index}"
        for key in _FLAG_KEYS:
            if key in wanted and key in group and group[key] != wanted[key]:
                what = f"{flag}" if key == "initial_lr" else f"{key} of the {flag} group"
                changes.append(f"{what} {wanted[key]} applies from now on (the checkpoint trained with {group[key]})")
                group[key] = wanted[key]
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    if changes and hasattr(inner, "base_lrs") and hasattr(inner, "get_lr"):
        import warnings

        inner.base_lrs = [group["initial_lr"] for group in groups]
        with warnings.catch_warnings():  # get_lr outside step() warns; here it is the point
            warnings.simplefilter("ignore")
            rates = inner.get_lr()
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        inner._last_lr = list(rates)
    return changes
