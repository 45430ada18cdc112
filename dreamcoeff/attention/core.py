"""The math of Coeff-Tuning attention: the mixing matrix, dtype and mask helpers, the naive reference.

For one attention layer with H heads (docs/DESIGN.md section 1):

    P^i    = softmax(Q^i K^i^T * scale + M)          # map of head i, rows sum to 1
    O^h    = sum_i A[h, i] * P^i @ V^h               # head h mixes ALL maps, applied to ITS OWN values
    A      = I + strength * dropout(alpha)           # `coefficient_matrix`

Mixing the maps first (A @ P, H^2*N*L multiply-adds) and then multiplying by V (H*N*L*d) is the
cheap order; mixing the per-head outputs P^i V^h instead would cost H^2*N*L*d.

`materialized_mixed_attention` is that formula written out, holding every map (the benchmarks'
baseline); `mixed_attention` (`dreamcoeff.attention.dispatch`) is the one to use. Scores, softmax and
mixing run in float32 when the activations are fp16/bf16 (float64 stays float64, for gradcheck):
`compute_dtype`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "coefficient_matrix",
    "compute_dtype",
    "as_additive_mask",
    "mask_rows",
    "materialized_mixed_attention",
]


def coefficient_matrix(
    alpha: torch.Tensor, strength: float = 1.0, dropout: float = 0.0, training: bool = False
) -> torch.Tensor:
    """Return the head-mixing matrix A = I + strength * dropout(alpha).

    Dropout zeroes elements of the residual `alpha` only (never the identity), in training mode only,
    with the inverted-dropout rescaling of `torch.nn.functional.dropout`, so E[A] = I + strength*alpha.
    The result is float32 (float64 if alpha is float64) and differentiable w.r.t. alpha.
    """
    dtype = torch.float64 if alpha.dtype == torch.float64 else torch.float32
    residual = alpha.to(dtype)
    if training and dropout > 0.0:
        residual = F.dropout(residual, p=dropout, training=True)
    eye = torch.eye(alpha.shape[0], dtype=dtype, device=alpha.device)
    return eye + strength * residual


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores, softmax and mixing run in for activations of `dtype`: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bring a mask to 4-D additive form (SDPA semantics: a boolean True means 'attend')."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def mask_rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The query rows start:stop of a 4-D mask (all of it where the mask broadcasts over the rows)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def materialized_mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Straightforward mixed attention holding all B x H x N x L maps (plain autograd).

    Used as the 'naive' baseline of the benchmarks; `mixed_attention` is the one to use.
    Shapes: q (B, H, N, d), k (B, H, L, d), v (B, H, L, dv), coeff (H, H) -> (B, H, N, dv).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cdt = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    mask = as_additive_mask(mask, cdt)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    mixed = torch.einsum("hi,binl->bhnl", coeff.to(cdt), probs)
    return torch.matmul(mixed, v.to(cdt)).to(q.dtype)
