"""The math of Coeff-Tuning attention, in one place.

For one attention layer with H heads (DESIGN.md section 1):

    P^i    = softmax(Q^i K^i^T * scale + M)          # map of head i, rows sum to 1
    O^h    = sum_i A[h, i] * P^i @ V^h               # head h mixes ALL maps, applied to ITS OWN values
    A      = I + strength * dropout(alpha)           # `coefficient_matrix`

Mixing the maps first (A @ P, H^2*N*L multiply-adds) and then multiplying by V (H*N*L*d) is the
cheap order; mixing the per-head outputs P^i V^h instead would cost H^2*N*L*d.

`mixed_attention` never holds the B x H x N x L maps of the whole sequence: it walks over chunks of
query rows, and its autograd function recomputes each chunk's maps in the backward pass instead of
saving them, so the extra memory of one layer is O(B*H*chunk*L) whatever N is. Scores, softmax and
mixing run in float32 when the activations are fp16/bf16 (float64 stays float64, for gradcheck).

Implementations (`mixed_attention(..., impl=...)`; "auto" picks):
    "sdpa"          A == I exactly and no gradient wanted for A: plain scaled_dot_product_attention.
    "chunked"       the exact path above (any device, any dtype); "auto" off the CPU.
    "cpu_fused"     CPU: a fused C++ kernel (`dreamcoeff.cpu_kernel`, built on first use; "auto" on the
                    CPU, falling back to "chunked" with a warning where it cannot be built). Each thread
                    takes a block of query rows for all heads through scores, softmax, mix and P V while
                    they are in its caches; its backward recomputes the maps from the saved row
                    log-sum-exp. Forward 5-30% faster than "chunked", the SDXL-shaped UNet's
                    training step 15% and sampling 24% (benchmarks/README.md, "Fused CPU kernel").
    "materialized"  the naive one holding every map (the benchmarks' baseline; never picked by "auto").
    "triton"        CUDA: fused Triton kernels, forward and backward (`dreamcoeff.triton_attention`):
                    the maps never leave the chip. Opt-in (impl="triton", or DREAMCOEFF_ATTENTION_IMPL=triton
                    for what "auto" picks where A != I, falling back to "chunked" for inputs the kernel
                    cannot take) until it has been timed on a GPU.

How the chunked path is organised (each choice measured on a 2-core AVX-512 CPU with MKL, see
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
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "coefficient_matrix",
    "materialized_mixed_attention",
    "mixed_attention",
    "choose_chunk_size",
    "select_impl",
    "IMPLS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
]

IMPLS = ("auto", "sdpa", "chunked", "materialized", "triton", "cpu_fused")
# What "auto" runs where A != I, per device type, unless DREAMCOEFF_ATTENTION_IMPL names one.
EXACT_IMPLS = ("chunked", "triton", "materialized", "cpu_fused")

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
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
    cdt = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    mask = _as_additive_mask(mask, cdt)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    mixed = torch.einsum("hi,binl->bhnl", coeff.to(cdt), probs)
    return torch.matmul(mixed, v.to(cdt)).to(q.dtype)


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


def _mask_rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


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


class _ChunkedMixedAttention(torch.autograd.Function):
    """Mixed attention over query-row chunks with recomputation of the maps in backward.

    Saved for backward: only q, k, v, coeff and the mask (the inputs), never the maps.
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int):
        cdt = _compute_dtype(q.dtype)
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
            probs = _probs_into(ws.view(0, b, h, r, l), q_scaled[:, :, start:stop], k_t, _mask_rows(mask, start, stop))
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
        grads = _chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, ctx.needs_input_grad[:4], grad_out)
        return (*grads, None, None, None)


def _chunked_backward(q, k, v, coeff, mask, scale: float, chunk: int, needs, grad_out):
    """Gradients (dq, dk, dv, dcoeff) of mixed attention, recomputing each chunk's maps (None where
    `needs`, the requires-grad flags of q, k, v, coeff, is False)."""
    cdt = _compute_dtype(q.dtype)
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
        probs = _probs_into(ws.view(0, b, h, r, l), q_chunk, k_t, _mask_rows(mask, start, stop))
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


class _FusedCpuMixedAttention(torch.autograd.Function):
    """The fused C++ kernel forward and backward (`dreamcoeff.cpu_kernel`).

    Saved for backward: the inputs and each head's row log-sum-exp (B x H x N), never the maps. Where
    the fused backward's per-thread maps outgrow the caches (`cpu_kernel.fused_backward_fits`) the
    backward runs the chunked path, which was faster there.
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int, block_rows: int | None):
        from .cpu_kernel import mixed_attention_forward

        out, lse = mixed_attention_forward(q, k, v, coeff, scale, mask, block_rows=block_rows)
        ctx.save_for_backward(q, k, v, coeff, mask, lse)
        # chunk: for the chunked backward, if it is taken; block_rows: the caller's chunk_size or None
        ctx.scale, ctx.chunk, ctx.block_rows = scale, chunk, block_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .cpu_kernel import fused_backward_fits, mixed_attention_backward

        q, k, v, coeff, mask, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if fused_backward_fits(q, k, ctx.block_rows):
            grads = mixed_attention_backward(
                q, k, v, coeff, ctx.scale, mask, lse, grad_out, needs=needs, block_rows=ctx.block_rows
            )
        else:
            grads = _chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, needs, grad_out)
        return (*grads, None, None, None, None)


class _TritonMixedAttention(torch.autograd.Function):
    """Fused Triton kernels forward and backward (`dreamcoeff.triton_attention`).

    Saved for backward: the inputs and each head's row log-sum-exp (B x H x N floats), never the maps.
    float32 activations take the chunked backward: the backward kernels' float32 tiles exceed a
    GPU program's shared memory (benchmarks/triton_compile_check.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int):
        from .triton_attention import mixed_attention_forward  # lazy: triton is optional

        out, lse = mixed_attention_forward(q, k, v, coeff, scale, mask, return_lse=True)
        ctx.save_for_backward(q, k, v, coeff, mask, lse)
        ctx.scale, ctx.chunk = scale, chunk  # chunk: for the chunked backward, if it is needed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_attention import KernelDoesNotFitError, mixed_attention_backward

        q, k, v, coeff, mask, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        grads = None
        if q.dtype != torch.float32:
            try:
                grads = mixed_attention_backward(q, k, v, coeff, ctx.scale, mask, lse, grad_out, needs=needs)
            except KernelDoesNotFitError as error:  # the forward fitted, the backward's tiles do not
                _warn_once(f"{error}: the backward of this layer runs the chunked path instead")
        if grads is None:
            grads = _chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, needs, grad_out)
        return (*grads, None, None, None)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per distinct message: a fallback taken in every layer and step is said once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _is_exact_identity(coeff: torch.Tensor) -> bool:
    """A == I exactly, and no gradient is wanted for it (else the exact path must run to give one)."""
    if coeff.requires_grad and torch.is_grad_enabled():
        return False
    eye = torch.eye(coeff.shape[0], dtype=coeff.dtype, device=coeff.device)
    return bool(torch.equal(coeff, eye))


def select_impl(coeff: torch.Tensor, impl: str = "auto") -> str:
    """The implementation `mixed_attention` runs for this mixing matrix ("auto" resolved).

    "auto": SDPA where coeff is exactly I (and needs no gradient); else what DREAMCOEFF_ATTENTION_IMPL
    names, or by default the fused C++ kernel on the CPU and the chunked path elsewhere. (Whether the
    kernel can run is checked by `mixed_attention`, which falls back to "chunked".)
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown mixed-attention impl {impl!r}: use one of {IMPLS}")
    if impl != "auto":
        return impl
    if _is_exact_identity(coeff):
        return "sdpa"
    exact = os.environ.get("DREAMCOEFF_ATTENTION_IMPL", "")
    if not exact:
        return "cpu_fused" if coeff.device.type == "cpu" else "chunked"
    if exact not in EXACT_IMPLS:
        names = ", ".join(repr(name) for name in EXACT_IMPLS)
        raise ValueError(f"DREAMCOEFF_ATTENTION_IMPL={exact!r}: use one of {names} (or unset it)")
    return exact


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Exact Coeff-Tuning attention O^h = sum_i coeff[h, i] softmax(Q^i K^i^T * scale + mask) V^h.

    Args:
        q: (B, H, N, d) queries; k: (B, H, L, d) keys; v: (B, H, L, dv) values.
        coeff: (H, H) mixing matrix A (see `coefficient_matrix`), float32 or float64.
        scale: score scale, 1/sqrt(d) when None (pass `attn.scale`).
        mask: additive float mask or boolean keep-mask broadcastable to (B, H, N, L).
        chunk_size: query rows per chunk ("chunked"; chosen from the shapes and DEFAULT_CHUNK_BYTES when
            None) or per block ("cpu_fused"; its own defaults when None). Results do not depend on it
            beyond rounding.
        impl: "auto" (SDPA where coeff is exactly I and needs no gradient; else what
            DREAMCOEFF_ATTENTION_IMPL names, or "cpu_fused" on the CPU where it builds and "chunked"
            elsewhere), or one of "chunked", "sdpa" (only for coeff == I), "materialized" (naive,
            holds every map), "triton" (fused kernels on CUDA, needs triton), "cpu_fused" (the fused
            C++ kernel, `dreamcoeff.cpu_kernel`).

    Returns (B, H, N, dv) in q's dtype. Differentiable w.r.t. q, k, v and coeff; every backward
    recomputes the maps block by block, so no B x H x N x L tensor is ever stored.
    """
    b, h, n, _ = q.shape
    if coeff.shape != (h, h):
        raise ValueError(f"coeff must be ({h}, {h}) for {h} heads, got {tuple(coeff.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    requested, impl = impl, select_impl(coeff, impl)
    if impl == "triton" and requested == "auto":
        from .triton_attention import unsupported_reason  # lazy: triton is optional

        if unsupported_reason(q) is not None:  # "auto" never fails: the chunked path runs everywhere
            impl = "chunked"
    if impl == "cpu_fused":
        from .cpu_kernel import unavailable_reason

        reason = unavailable_reason(q.device)
        if reason is not None:
            if requested != "auto":
                raise RuntimeError(f"impl='cpu_fused': {reason}")
            if q.device.type == "cpu" and "turned off" not in reason:
                _warn_once(f"{reason}; mixed attention runs the chunked PyTorch path instead (slower)")
            impl = "chunked"
    if impl == "sdpa":
        if not _is_exact_identity(coeff):
            raise ValueError("impl='sdpa' computes plain attention: only valid where coeff is exactly I")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if impl == "materialized":
        return materialized_mixed_attention(q, k, v, coeff, scale, mask)
    mask = _as_additive_mask(mask, _compute_dtype(q.dtype))
    chunk = chunk_size or choose_chunk_size(b, h, n, k.shape[-2], device=q.device)
    if impl == "cpu_fused":
        return _FusedCpuMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk), chunk_size)
    if impl == "triton":
        from .triton_attention import KernelDoesNotFitError

        try:
            return _TritonMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk))
        except KernelDoesNotFitError as error:
            if requested != "auto":
                raise
            _warn_once(f"{error}: this layer runs the chunked path instead")
    return _ChunkedMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk))
