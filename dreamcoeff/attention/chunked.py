"""The chunked exact path of mixed attention: query-row chunks, maps recomputed in backward.

An autograd function over chunks of query rows, its backward, and the chunk sizing.

`ChunkedMixedAttention` never holds the B x H x N x L maps of the whole sequence: it walks over chunks
of query rows, and its backward (`chunked_backward`) recomputes each chunk's maps instead of saving
them, so the extra memory of one layer is O(B*H*chunk*L) whatever N is. It runs on any device and in
any dtype; the fused backends (`dispatch`) fall back to `chunked_backward` where their own backward
does not fit.

How it is organised (each choice measured on a 2-core AVX-512 CPU with MKL, see
benchmarks/README.md; the timings quoted are single-thread, H=10, L=4096):
    - Each chunk's B x H x rows x L block lives in flat workspaces allocated once per call and reused
      by every chunk; every step writes in place or into a workspace (out=). No block-sized tensor is
      allocated per step (the first implementation did, and paid for the allocation, the page faults
      and the cold cache lines every time).
    - Softmax runs in place; the softmax backward is the fused kernel softmax's own autograd uses.
    - The scale is applied to the (rows x d) queries, not to the (rows x L) scores.
    - K^T and V^T are made contiguous once per call, (d x L) row-major, so the q K^T and dO V^T GEMMs
      stream their wide operand with unit stride (2.17 vs 2.74 ms per 64-row chunk).
    - dK and dV are accumulated transposed (see backward), and the gradient of A is a batch of small
      GEMMs over the rows instead of one long-inner-dimension GEMM (`_accumulate_coeff_grad_`).
    - Chunks come from a byte budget for one block (`choose_chunk_size`), balanced to equal sizes.
What did not help and is not here: keeping each row's log-sum-exp to rebuild the maps in backward
with one exp (it saves the softmax there but costs two max passes in forward: a wash on CPU);
torch.compile of softmax + mix (no faster than the eager in-place pair, and a minute to compile).
"""

from __future__ import annotations

import os

import torch

from .core import compute_dtype, mask_rows

__all__ = [
    "ChunkedMixedAttention",
    "chunked_backward",
    "choose_chunk_size",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
]

# Budget for one chunk's B x H x rows x L block (in the compute dtype). The forward pass holds two
# such blocks, the backward pass three. Overridable with DREAMCOEFF_CHUNK_BYTES (bytes) for tuning.
# Measured on 2 AVX-512 cores (benchmarks/README.md): 8, 16 and 32 MiB are within noise of each other
# on an idle machine and 64 MiB is slower (out of cache); when the cores are shared with other jobs
# fewer, bigger chunks win clearly (every op is a parallel region whose barrier waits for a
# descheduled thread), so 32 MiB.
DEFAULT_CHUNK_BYTES = int(os.environ.get("DREAMCOEFF_CHUNK_BYTES", 32 * 2**20))
# On CUDA each op of a chunk is a kernel launch: bigger blocks amortise them (memory is plentiful).
DEFAULT_CUDA_CHUNK_BYTES = int(os.environ.get("DREAMCOEFF_CUDA_CHUNK_BYTES", 256 * 2**20))
# Fewest query rows per chunk (unless N is smaller): below this the q k^T and P V GEMMs lose
# efficiency (L3 traffic for K and V per chunk) and the per-chunk overhead grows; it overrides the
# byte budget only for very long keys (L * H * B > budget / 32 floats).
MIN_CHUNK_ROWS = 32


def choose_chunk_size(
    batch: int,
    heads: int,
    n_query: int,
    n_key: int,
    budget_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Query rows per chunk so that one float32 B x H x rows x L block stays within the budget.

    At least MIN_CHUNK_ROWS rows (or N). The rows are then balanced over the chunks (4096 rows at a
    204-row budget give 21 chunks of 196 rows, not 20 of 204 and one of 16): same work per chunk,
    no tiny GEMM at the end.
    """
    if budget_bytes is None:
        is_cuda = device is not None and torch.device(device).type == "cuda"
        budget_bytes = DEFAULT_CUDA_CHUNK_BYTES if is_cuda else DEFAULT_CHUNK_BYTES
    per_row = max(1, batch * heads * n_key * 4)
    rows = max(min(n_query, MIN_CHUNK_ROWS), min(n_query, budget_bytes // per_row))
    n_chunks = -(-n_query // rows)
    return -(-n_query // n_chunks)


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


class _Workspace:
    """Flat buffers of one block each, handed out as views of any shape up to that size.

    Allocated once per forward / backward call and reused by every chunk (a fresh block-sized tensor
    per step costs an allocation, page faults and cache misses on memory that is touched once).
    """

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]

    def view(self, index: int, *shape: int) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        return self.buffers[index][:numel].view(shape)


def _probs_into(out: torch.Tensor, q_scaled: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor | None):
    """out <- softmax(q_scaled @ k_t + mask) for one chunk; out is (B, H, rows, L), q already scaled."""
    b, h, rows, d = q_scaled.shape
    flat = out.view(b * h, rows, -1)
    torch.bmm(q_scaled.reshape(b * h, rows, d), k_t.view(b * h, d, -1), out=flat)
    if mask is not None:
        out.add_(mask)
    # In place: the row's max and sum are read before any element of it is written.
    return torch.softmax(out, dim=-1, out=out)


def _mix_into(out: torch.Tensor, coeff: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """out[b, h] <- sum_i coeff[h, i] * maps[b, i]: one (H x H) @ (H x rows*L) GEMM per batch element."""
    b, h = maps.shape[:2]
    if b == 1:
        torch.mm(coeff, maps.view(h, -1), out=out.view(h, -1))
    else:
        torch.bmm(coeff.expand(b, h, h), maps.view(b, h, -1), out=out.view(b, h, -1))
    return out


def _softmax_backward_(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """grad_probs <- probs * (grad_probs - rowsum(grad_probs * probs)), in one fused kernel, in place.

    This is the kernel softmax's own autograd uses; it reads each row twice in cache instead of the
    four passes of the composed expression (and allocates nothing).
    """
    return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype, grad_input=grad_probs)


def _prepare(q, k, scale, cdt):
    """Contiguous compute-dtype operands: the scaled queries, and K^T as (B, H, d, L)."""
    # q * scale (rows x d) instead of scores * scale (rows x L): one pass over the small operand.
    # Always a fresh contiguous tensor (the processor hands in (B, N, H, d) views transposed).
    q_scaled = torch.empty(q.shape, dtype=cdt, device=q.device).copy_(q).mul_(scale)
    k_t = k.to(cdt).transpose(-1, -2).contiguous()
    return q_scaled, k_t


def _accumulate_coeff_grad_(da: torch.Tensor, grad_mixed: torch.Tensor, probs: torch.Tensor) -> None:
    """da[h, i] += sum_{b, n, l} grad_mixed[b, h, n, l] * probs[b, i, n, l].

    As one (H x rows*L) @ (rows*L x H) GEMM per batch element MKL is slow (tiny output, huge inner
    dimension: 2.2 ms for 51 rows at H=10, L=4096); as `rows` GEMMs (H x L) @ (L x H) batched over
    the query rows and summed it is 2.3x faster (1.0 ms).
    """
    for gm, p in zip(grad_mixed, probs):  # over the batch: (H, rows, L) each
        da += torch.bmm(gm.transpose(0, 1), p.transpose(0, 1).transpose(1, 2)).sum(0)


class ChunkedMixedAttention(torch.autograd.Function):
    """Mixed attention over query-row chunks with recomputation of the maps in backward.

    Saved for backward: only q, k, v, coeff and the mask (the inputs), never the maps.
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int):
        cdt = compute_dtype(q.dtype)
        b, h, n, _ = q.shape
        l, dv = k.shape[-2], v.shape[-1]
        q_scaled, k_t = _prepare(q, k, scale, cdt)
        vc = v.to(cdt).contiguous()
        a = coeff.to(cdt)
        rows = min(chunk, n)
        ws = _Workspace(2, b * h * rows * l, cdt, q.device)
        out_chunk = torch.empty(b * h * rows * dv, dtype=cdt, device=q.device)
        out = torch.empty(b, h, n, dv, dtype=cdt, device=q.device)
        for start, stop in _chunks(n, chunk):
            r = stop - start
            probs = _probs_into(ws.view(0, b, h, r, l), q_scaled[:, :, start:stop], k_t, mask_rows(mask, start, stop))
            mixed = _mix_into(ws.view(1, b, h, r, l), a, probs)
            o = out_chunk[: b * h * r * dv].view(b * h, r, dv)
            torch.bmm(mixed.view(b * h, r, l), vc.view(b * h, l, dv), out=o)
            out[:, :, start:stop] = o.view(b, h, r, dv)
        ctx.save_for_backward(q, k, v, coeff, mask)
        ctx.scale, ctx.chunk = scale, chunk
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, coeff, mask = ctx.saved_tensors
        grads = chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, ctx.needs_input_grad[:4], grad_out)
        return (*grads, None, None, None)


def chunked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    chunk: int,
    needs: tuple[bool, bool, bool, bool],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dcoeff) of mixed attention, recomputing each chunk's maps (None where
    `needs`, the requires-grad flags of q, k, v, coeff, is False).

    `mask` is additive (`as_additive_mask`) or None; `chunk` query rows per chunk. Also the backward
    the fused backends fall back to where their own does not fit.
    """
    cdt = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    l, dv = k.shape[-2], v.shape[-1]
    bh = b * h
    need_q, need_k, need_v, need_a = needs
    need_qk = need_q or need_k

    q_scaled, k_t = _prepare(q, k, scale, cdt)
    kc = k.to(cdt).contiguous() if need_q else None
    v_t = v.to(cdt).transpose(-1, -2).contiguous()
    a = coeff.to(cdt)
    a_t = a.t().contiguous()
    g = grad_out.to(cdt).contiguous()

    dq = torch.empty(b, h, n, d, dtype=cdt, device=q.device) if need_q else None
    # dK and dV are accumulated transposed, (B, H, d, L): the update dK^T += (q*scale)^T dS then
    # reads the wide dS block untransposed, about 25% faster than dK += dS^T (q*scale) (MKL, fp32).
    dk_t = torch.zeros(b, h, d, l, dtype=cdt, device=k.device) if need_k else None
    dv_t = torch.zeros(b, h, dv, l, dtype=cdt, device=v.device) if need_v else None
    da = torch.zeros(a.shape, dtype=cdt, device=a.device) if need_a else None
    rows = min(chunk, n)
    ws = _Workspace(3 if need_qk else 2, b * h * rows * l, cdt, q.device)
    dq_chunk = torch.empty(bh * rows * d, dtype=cdt, device=q.device) if need_q else None

    for start, stop in _chunks(n, chunk):
        r = stop - start
        q_chunk = q_scaled[:, :, start:stop]
        g_chunk = g[:, :, start:stop].view(bh, r, dv)
        probs = _probs_into(ws.view(0, b, h, r, l), q_chunk, k_t, mask_rows(mask, start, stop))
        if need_v:
            # dV^h += (A P)^h^T dO^h; the mixed maps are recomputed into the second buffer.
            mixed = _mix_into(ws.view(1, b, h, r, l), a, probs)
            dv_t.view(bh, dv, l).baddbmm_(g_chunk.transpose(1, 2), mixed.view(bh, r, l))
        if not (need_a or need_qk):
            continue
        # dL/d(A P)^h = dO^h V^h^T, into the second buffer (the mixed maps are no longer needed).
        grad_mixed = ws.view(1, b, h, r, l)
        torch.bmm(g_chunk, v_t.view(bh, dv, l), out=grad_mixed.view(bh, r, l))
        if need_a:
            _accumulate_coeff_grad_(da, grad_mixed, probs)
        if need_qk:
            grad_scores = _mix_into(ws.view(2, b, h, r, l), a_t, grad_mixed)  # dP^i = sum_h A[h, i] dMixed^h
            _softmax_backward_(grad_scores, probs)  # now dL/dS (of the scaled scores)
            grad_scores = grad_scores.view(bh, r, l)
            if need_q:
                dqc = dq_chunk[: bh * r * d].view(bh, r, d)
                torch.bmm(grad_scores, kc.view(bh, l, d), out=dqc)
                torch.mul(dqc.view(b, h, r, d), scale, out=dq[:, :, start:stop])
            if need_k:
                # S = (q * scale) k^T, so dK = dS^T (q * scale): the scale rides on the small operand.
                dk_t.view(bh, d, l).baddbmm_(q_chunk.reshape(bh, r, d).transpose(1, 2), grad_scores)
    return (
        dq.to(q.dtype) if need_q else None,
        dk_t.transpose(-1, -2).to(k.dtype, memory_format=torch.contiguous_format) if need_k else None,
        dv_t.transpose(-1, -2).to(v.dtype, memory_format=torch.contiguous_format) if need_v else None,
        da.to(coeff.dtype) if need_a else None,
    )
