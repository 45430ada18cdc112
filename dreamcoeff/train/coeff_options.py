"""alpha's constraints in training: ``--coeff_structure`` and ``--coeff_zero_row_sum``, their checks, and
the projection that holds them.

Both are projected steps: after every optimizer step (and once at the start, so that a
``--init_coeff_weights`` file or a resumed checkpoint begins inside them) alpha is replaced by its
exact projection onto the allowed subspace. Whatever the optimizer does to the masked entries (Adam's
moments, weight decay, coefficient dropout's rescaling) never reaches the weights: those entries are
exactly 0 in every step's forward pass, checkpoint and output file.

- ``--coeff_structure diagonal``: a gain per head on its own map, no mixing (H free entries per layer);
- ``--coeff_structure off_diagonal``: mixing between heads, the head's own map kept at weight 1
  (H (H - 1) free entries);
- ``--coeff_zero_row_sum``: each row of A = I + c * alpha sums to 1 (no head's output gain changes);
  with ``off_diagonal`` both hold (H (H - 2) free); with ``diagonal`` nothing would be left, so that
  pair is refused.

The issue-35 ablation (does alpha's mixing matter, or only its per-head gains) trains these beside the
paper's full alpha: benchmarks/micro/v3/README.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..methods import METHODS
from ..processor import COEFF_STRUCTURES, keep_structure_, zero_row_sums_
from .errors import UsageError

#: The trainer's `config.TrainConfig`, by another name: config.py imports this module for its checks,
#: so this one must not import config (the layout test counts even a hint-only import as a cycle).
TrainConfig = Any

logger = logging.getLogger("dreamcoeff")

__all__ = [
    "constrain_alpha_",
    "free_alpha_entries",
    "start_constrained",
    "validate_coeff_constraints",
    "validate_coeff_options",
]


def validate_coeff_constraints(tuning: str, structure: str, zero_row_sum: bool) -> None:
    """`UsageError` where the constraint flags do not fit: a constraint without alpha to constrain, an
    unknown structure, or diagonal with zero row sums (which leaves alpha nothing: it would stay 0)."""
    if structure not in COEFF_STRUCTURES:
        raise UsageError(f"--coeff_structure {structure!r}: choose one of {', '.join(COEFF_STRUCTURES)}")
    coeff = METHODS[tuning].coeff
    for flag, used in (("--coeff_zero_row_sum", zero_row_sum), (f"--coeff_structure {structure}", structure != "full")):
        if used and not coeff:
            raise UsageError(f"{flag} constrains alpha: it needs --tuning coeff or coeff+lora, not {tuning}")
    if structure == "diagonal" and zero_row_sum:
        raise UsageError(
            "--coeff_structure diagonal with --coeff_zero_row_sum leaves nothing to train (a diagonal alpha whose "
            "rows sum to zero is zero): drop one of the two; --coeff_structure off_diagonal --coeff_zero_row_sum "
            "is mixing with neither a head's own gain nor its output gain"
        )


def validate_coeff_options(cfg: TrainConfig) -> None:
    """alpha's flags (`UsageError`): dropout in range, the constraints, and the flags that need an alpha."""
    if not 0.0 <= cfg.coeff_dropout < 1.0:
        raise UsageError(f"--coeff_dropout must be in [0, 1), got {cfg.coeff_dropout}")
    validate_coeff_constraints(cfg.tuning, cfg.coeff_structure, cfg.coeff_zero_row_sum)
    if cfg.init_coeff_weights and not METHODS[cfg.tuning].coeff:
        raise UsageError(f"--init_coeff_weights needs --tuning coeff or coeff+lora, not --tuning {cfg.tuning}")
    if cfg.validation_coeff_scales and not METHODS[cfg.tuning].coeff:
        raise UsageError("--validation_coeff_scales sweeps alpha's strength: it needs --tuning coeff or coeff+lora")


@torch.no_grad()
def constrain_alpha_(alphas: Sequence[torch.Tensor], structure: str, zero_row_sum: bool) -> None:
    """Project every alpha in place onto the subspace `structure` and (with `zero_row_sum`) zero row
    sums allow: the exact orthogonal projection, so an alpha already inside is left bit for bit."""
    keep_structure_(alphas, structure)
    if not zero_row_sum:
        return
    if structure == "full":
        zero_row_sums_(alphas)
        return
    # off_diagonal (diagonal is refused by the checks): each row's sum is spread over its H - 1 free
    # entries alone, so the diagonal stays exactly 0 while the row sums become 0
    for alpha in alphas:
        free = ~torch.eye(alpha.shape[-1], dtype=torch.bool, device=alpha.device)
        alpha.sub_(alpha.sum(dim=-1, keepdim=True) / max(alpha.shape[-1] - 1, 1) * free)


def free_alpha_entries(alphas: Sequence[torch.Tensor], structure: str, zero_row_sum: bool) -> int:
    """How many of alpha's entries training can move under the constraints: H x H per layer for the
    full matrix, H for the diagonal, H (H - 1) for the off-diagonal, H fewer again with zero row sums
    (one equation per row). The count the run card and the logs report as trainable, so a restricted
    alpha is not credited with entries the projection holds at 0."""
    per_row = {"full": lambda h: h, "diagonal": lambda h: 1, "off_diagonal": lambda h: h - 1}
    if structure not in per_row:
        raise ValueError(f"unknown alpha structure {structure!r}: choose one of {COEFF_STRUCTURES}")
    total = 0
    for alpha in alphas:
        heads = alpha.shape[-1]
        rows = alpha.numel() // heads
        total += rows * max(per_row[structure](heads) - (1 if zero_row_sum else 0), 0)
    return total


@torch.no_grad()
def start_constrained(alphas: Sequence[torch.Tensor], cfg: TrainConfig) -> None:
    """Apply the constraints to alpha before the first step (a fresh alpha of zeros is unchanged; an
    ``--init_coeff_weights`` file trained without them is projected, with a warning saying so)."""
    if cfg.coeff_structure == "full" and not cfg.coeff_zero_row_sum:
        return
    before = [a.detach().clone() for a in alphas]
    constrain_alpha_(alphas, cfg.coeff_structure, cfg.coeff_zero_row_sum)
    moved = max((float((a - b).abs().max()) for a, b in zip(alphas, before) if a.numel()), default=0.0)
    if moved > 0:
        logger.warning(
            "--init_coeff_weights %s lies outside --coeff_structure %s%s: projected onto it (largest change %.3g)",
            cfg.init_coeff_weights,
            cfg.coeff_structure,
            " with --coeff_zero_row_sum" if cfg.coeff_zero_row_sum else "",
            moved,
        )
