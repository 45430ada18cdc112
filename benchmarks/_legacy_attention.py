"""The chunked mixed attention as first committed (git 85341f2), kept as the "before" of the
benchmarks (its helpers that have not changed since are imported from the library). It is exact and
chunked with recomputation in backward, but it allocates fresh block-sized tensors at every step of
every chunk, scales the (rows x L) scores rather than the (rows x d) queries, composes the softmax
backward from four passes, computes the coefficient gradient as one long-inner-dimension GEMM, and
accumulates dK / dV with a transposed wide operand. Not used by the library; only benchmarks/ imports it.
"""

from __future__ import annotations

import os

import torch

# Unchanged since 85341f2: shared with the library rather than copied.
from dreamcoeff.attention.core import as_additive_mask, compute_dtype, mask_rows

__all__ = ["mixed_attention", "choose_chunk_size", "DEFAULT_CHUNK_BYTES"]

# Budget for one chunk's B x H x chunk x L float32 score block. The backward pass holds about four
# such blocks at once. Overridable with DREAMCOEFF_CHUNK_BYTES (bytes) for tuning.
DEFAULT_CHUNK_BYTES = int(os.environ.get("DREAMCOEFF_CHUNK_BYTES", 32 * 2**20))


def choose_chunk_size(batch: int, heads: int, n_query: int, n_key: int, budget_bytes: int | None = None) -> int:
    """Query rows per chunk so that one float32 B x H x chunk x L block stays within the budget."""
    budget = DEFAULT_CHUNK_BYTES if budget_bytes is None else budget_bytes
    per_row = max(1, batch * heads * n_key * 4)
    return int(max(1, min(n_query, budget // per_row)))


def _mix(coeff: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """out[b, h] = sum_i coeff[h, i] * maps[b, i]: one (H x H) @ (H x n*L) GEMM per batch element."""
    b, h, n, l = maps.shape
    return torch.matmul(coeff, maps.reshape(b, h, n * l)).view(b, h, n, l)


def _chunk_probs(q_chunk, k, mask_chunk, scale):
    """softmax(q k^T * scale + mask) for one chunk of query rows, in the compute dtype."""
    if mask_chunk is None:
        scores = torch.matmul(q_chunk, k.transpose(-1, -2)).mul_(scale)
    else:
        # baddbmm-style fusion: scale * (q @ k^T) + mask in one pass over the block.
        scores = torch.matmul(q_chunk, k.transpose(-1, -2)).mul_(scale).add_(mask_chunk)
    return torch.softmax(scores, dim=-1)


class _ChunkedMixedAttention(torch.autograd.Function):
    """Mixed attention over query-row chunks with recomputation of the maps in backward.

    Saved for backward: only q, k, v, coeff and the mask (the inputs), never the maps.
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int):
        cdt = compute_dtype(q.dtype)
        kc, vc, a = k.to(cdt), v.to(cdt), coeff.to(cdt)
        b, h, n, _ = q.shape
        out = torch.empty(b, h, n, v.shape[-1], dtype=cdt, device=q.device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            probs = _chunk_probs(q[:, :, start:stop].to(cdt), kc, mask_rows(mask, start, stop), scale)
            mixed = _mix(a, probs)
            del probs
            out[:, :, start:stop] = torch.matmul(mixed, vc)
            del mixed
        ctx.save_for_backward(q, k, v, coeff, mask)
        ctx.scale, ctx.chunk = scale, chunk
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, coeff, mask = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        cdt = compute_dtype(q.dtype)
        kc, vc, a = k.to(cdt), v.to(cdt), coeff.to(cdt)
        a_t = a.t().contiguous()
        grad_out = grad_out.to(cdt)
        b, h, n, _ = q.shape
        need_q, need_k, need_v, need_a = ctx.needs_input_grad[:4]
        dq = torch.empty(q.shape, dtype=cdt, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device) if need_v else None
        da = torch.zeros(a.shape, dtype=cdt, device=a.device) if need_a else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            q_chunk = q[:, :, start:stop].to(cdt)
            g_chunk = grad_out[:, :, start:stop]
            probs = _chunk_probs(q_chunk, kc, mask_rows(mask, start, stop), scale)
            if need_v:
                dv += torch.matmul(_mix(a, probs).transpose(-1, -2), g_chunk)
            grad_mixed = torch.matmul(g_chunk, vc.transpose(-1, -2))  # dL/d(A P), B x H x n x L
            if need_a:
                rows = probs.shape[-2] * probs.shape[-1]
                # dA[h, i] = sum_{b, n, l} dMixed[b, h, n, l] * P[b, i, n, l]
                da += torch.matmul(grad_mixed.reshape(b, h, rows), probs.reshape(b, h, rows).transpose(1, 2)).sum(0)
            if need_q or need_k:
                grad_probs = _mix(a_t, grad_mixed)  # dL/dP^i = sum_h A[h, i] dMixed^h
                del grad_mixed
                # softmax backward, in place: dS = P * (dP - rowsum(dP * P))
                row_dot = (grad_probs * probs).sum(dim=-1, keepdim=True)
                grad_scores = grad_probs.sub_(row_dot).mul_(probs).mul_(scale)
                del probs
                if need_q:
                    dq[:, :, start:stop] = torch.matmul(grad_scores, kc)
                if need_k:
                    dk += torch.matmul(grad_scores.transpose(-1, -2), q_chunk)
                del grad_scores
        return (
            dq.to(q.dtype) if need_q else None,
            dk.to(k.dtype) if need_k else None,
            dv.to(v.dtype) if need_v else None,
            da.to(coeff.dtype) if need_a else None,
            None,
            None,
            None,
        )


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact Coeff-Tuning attention O^h = sum_i coeff[h, i] softmax(Q^i K^i^T * scale + mask) V^h.

    Args:
        q: (B, H, N, d) queries; k: (B, H, L, d) keys; v: (B, H, L, dv) values.
        coeff: (H, H) mixing matrix A (see `coefficient_matrix`), float32 or float64.
        scale: score scale, 1/sqrt(d) when None (pass `attn.scale`).
        mask: additive float mask or boolean keep-mask broadcastable to (B, H, N, L).
        chunk_size: query rows per chunk; chosen from the shapes and DEFAULT_CHUNK_BYTES when None.

    Returns (B, H, N, dv) in q's dtype. Differentiable w.r.t. q, k, v and coeff; the backward pass
    recomputes the maps chunk by chunk, so no B x H x N x L tensor is ever stored.
    """
    b, h, n, _ = q.shape
    if coeff.shape != (h, h):
        raise ValueError(f"coeff must be ({h}, {h}) for {h} heads, got {tuple(coeff.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = as_additive_mask(mask, compute_dtype(q.dtype))
    chunk = chunk_size or choose_chunk_size(b, h, n, k.shape[-2])
    return _ChunkedMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk))
