"""Which implementation a mixed-attention call runs, and the call itself (`mixed_attention`).

Here too: the autograd wrappers of the fused backends and their fallbacks to the chunked path.

Implementations (`mixed_attention(..., impl=...)`; "auto" picks):
    "sdpa"          A == I exactly and no gradient wanted for A: plain scaled_dot_product_attention.
    "chunked"       the exact path of `dreamcoeff.attention.chunked` (any device, any dtype); "auto" off
                    the CPU.
    "cpu_fused"     CPU: a fused C++ kernel (`dreamcoeff.attention.cpu_kernel`, built on first use;
                    "auto" on the CPU, falling back to "chunked" with a warning where it cannot be
                    built). Each thread takes a block of query rows for all heads through scores,
                    softmax, mix and P V while they are in its caches; its backward recomputes the maps
                    from the saved row log-sum-exp. Forward 5-30% faster than "chunked", the
                    SDXL-shaped UNet's training step 15% and sampling 24% (benchmarks/README.md,
                    "Fused CPU kernel").
    "materialized"  the naive one holding every map (the benchmarks' baseline; never picked by "auto").
    "triton"        CUDA: fused Triton kernels, forward and backward
                    (`dreamcoeff.attention.triton_kernels`): the maps never leave the chip. Opt-in
                    (impl="triton", or as the preferred exact implementation, see below) until it has
                    been timed on a GPU.

What "auto" runs where A != I (or A wants a gradient), first match wins:
    1. `prefer`, the model's setting (`dreamcoeff.processor.set_coeff_attention_impl`, which the
       processor passes on); None or "auto" is no preference;
    2. the environment variable DREAMCOEFF_ATTENTION_IMPL, a user-side override (unset or empty: none);
    3. the default: "cpu_fused" on the CPU, "chunked" elsewhere.
An explicit `impl` other than "auto" overrides all three. A kernel chosen by "auto" (any of the three)
that cannot run falls back to "chunked": with one warning where the CPU kernel cannot be built or
Triton's tiles exceed this GPU's shared memory; silently where the kernel does not apply (Triton not
installed, off CUDA, or for these inputs, such as float64; the CPU kernel on a GPU or turned off with
DREAMCOEFF_CPU_KERNEL=0). The same kernel named explicitly raises, saying why.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .chunked import ChunkedMixedAttention, choose_chunk_size, chunked_backward
from .core import as_additive_mask, compute_dtype, materialized_mixed_attention

__all__ = ["mixed_attention", "select_impl", "IMPLS", "EXACT_IMPLS", "IMPL_ENV"]

IMPLS = ("auto", "sdpa", "chunked", "materialized", "triton", "cpu_fused")
# The implementations that can be preferred for "auto" where A != I (a model's setting or the
# environment): every exact one.
EXACT_IMPLS = ("chunked", "triton", "materialized", "cpu_fused")
# The environment variable a user may set to choose the exact implementation (read, never written).
IMPL_ENV = "DREAMCOEFF_ATTENTION_IMPL"


class _FusedCpuMixedAttention(torch.autograd.Function):
    """The fused C++ kernel forward and backward (`dreamcoeff.attention.cpu_kernel`).

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
            grads = chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, needs, grad_out)
        return (*grads, None, None, None, None)


class _TritonMixedAttention(torch.autograd.Function):
    """Fused Triton kernels forward and backward (`dreamcoeff.attention.triton_kernels`).

    Saved for backward: the inputs and each head's row log-sum-exp (B x H x N floats), never the maps.
    float32 activations take the chunked backward: the backward kernels' float32 tiles exceed a
    GPU program's shared memory (benchmarks/triton_compile_check.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, coeff, mask, scale: float, chunk: int):
        from .triton_kernels import mixed_attention_forward  # lazy: triton is optional

        out, lse = mixed_attention_forward(q, k, v, coeff, scale, mask, return_lse=True)
        ctx.save_for_backward(q, k, v, coeff, mask, lse)
        ctx.scale, ctx.chunk = scale, chunk  # chunk: for the chunked backward, if it is needed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_kernels import KernelDoesNotFitError, mixed_attention_backward

        q, k, v, coeff, mask, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        grads = None
        if q.dtype != torch.float32:
            try:
                grads = mixed_attention_backward(q, k, v, coeff, ctx.scale, mask, lse, grad_out, needs=needs)
            except KernelDoesNotFitError as error:  # the forward fitted, the backward's tiles do not
                _warn_once(f"{error}: the backward of this layer runs the chunked path instead")
        if grads is None:
            grads = chunked_backward(q, k, v, coeff, mask, ctx.scale, ctx.chunk, needs, grad_out)
        return (*grads, None, None, None)


_WARNED: set[str] = set()


def _warn_once(message: str, stacklevel: int = 3) -> None:
    """One warning per distinct message: a fallback taken in every layer and step is said once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _is_exact_identity(coeff: torch.Tensor) -> bool:
    """A == I exactly, and no gradient is wanted for it (else the exact path must run to give one)."""
    if coeff.requires_grad and torch.is_grad_enabled():
        return False
    eye = torch.eye(coeff.shape[0], dtype=coeff.dtype, device=coeff.device)
    return bool(torch.equal(coeff, eye))


def select_impl(coeff: torch.Tensor, impl: str = "auto", prefer: str | None = None) -> str:
    """The implementation `mixed_attention` runs for this mixing matrix ("auto" resolved).

    An explicit `impl` (not "auto") is returned as it is. "auto": SDPA where coeff is exactly I (and
    needs no gradient); else `prefer` (one of EXACT_IMPLS; None or "auto": no preference), else what
    DREAMCOEFF_ATTENTION_IMPL names, else the fused C++ kernel on the CPU and the chunked path
    elsewhere (the module docstring has the whole rule). Whether the kernel can run is checked by
    `mixed_attention`, which falls back to "chunked" for anything "auto" chose.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown mixed-attention impl {impl!r}: use one of {IMPLS}")
    if prefer not in (None, "auto") and prefer not in EXACT_IMPLS:
        names = ", ".join(repr(name) for name in ("auto", *EXACT_IMPLS))
        raise ValueError(f"unknown preferred mixed-attention impl {prefer!r}: use one of {names}")
    if impl != "auto":
        return impl
    if torch.compiler.is_compiling():
        # Under torch.compile the identity test would break the graph and the C++ kernel is opaque
        # to it: the chunked path is plain PyTorch, which dynamo traces (docs/pipelines.md).
        return "chunked"
    if _is_exact_identity(coeff):
        return "sdpa"
    if prefer not in (None, "auto"):
        return prefer
    exact = os.environ.get(IMPL_ENV, "")
    if not exact:
        return "cpu_fused" if coeff.device.type == "cpu" else "chunked"
    if exact not in EXACT_IMPLS:
        names = ", ".join(repr(name) for name in EXACT_IMPLS)
        raise ValueError(f"{IMPL_ENV}={exact!r}: use one of {names} (or unset it)")
    return exact


def _runnable(impl: str, q: torch.Tensor, explicit: bool) -> str:
    """`impl` where it can run on these queries; else "chunked" if "auto" chose it, or an error saying why.

    A Triton kernel that cannot take the inputs is left to raise in its launch when explicit (with the
    reason); the CPU kernel's build is checked here.
    """
    if impl == "triton" and not explicit:
        from .triton_kernels import unsupported_reason  # lazy: triton is optional

        if unsupported_reason(q) is not None:  # "auto" never fails: the chunked path runs everywhere
            return "chunked"
    if impl == "cpu_fused":
        from .cpu_kernel import unavailable_reason

        reason = unavailable_reason(q.device)
        if reason is not None:
            if explicit:
                raise RuntimeError(f"impl='cpu_fused': {reason}")
            if q.device.type == "cpu" and "turned off" not in reason:
                # stacklevel: the warning points at the caller of mixed_attention
                _warn_once(f"{reason}; mixed attention runs the chunked PyTorch path instead (slower)", stacklevel=4)
            return "chunked"
    return impl


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    *,
    prefer: str | None = None,
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
        impl: "auto" (SDPA where coeff is exactly I and needs no gradient; else `prefer`, or what
            DREAMCOEFF_ATTENTION_IMPL names, or "cpu_fused" on the CPU where it builds and "chunked"
            elsewhere), or one of "chunked", "sdpa" (only for coeff == I), "materialized" (naive,
            holds every map), "triton" (fused kernels on CUDA, needs triton), "cpu_fused" (the fused
            C++ kernel, `dreamcoeff.attention.cpu_kernel`). An explicit impl that cannot run raises.
        prefer: the preferred exact implementation for impl="auto" where coeff != I (one of
            EXACT_IMPLS; None or "auto": none), ahead of DREAMCOEFF_ATTENTION_IMPL: what a model's
            `set_coeff_attention_impl` setting becomes. Where it cannot run the layer runs "chunked"
            instead of raising (the module docstring says when that is said with a warning).

    Returns (B, H, N, dv) in q's dtype. Differentiable w.r.t. q, k, v and coeff; every backward
    recomputes the maps block by block, so no B x H x N x L tensor is ever stored.
    """
    b, h, n, _ = q.shape
    if coeff.shape != (h, h):
        raise ValueError(f"coeff must be ({h}, {h}) for {h} heads, got {tuple(coeff.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    explicit = impl != "auto"
    impl = _runnable(select_impl(coeff, impl, prefer), q, explicit)
    if impl == "sdpa":
        if not _is_exact_identity(coeff):
            raise ValueError("impl='sdpa' computes plain attention: only valid where coeff is exactly I")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if impl == "materialized":
        return materialized_mixed_attention(q, k, v, coeff, scale, mask)
    mask = as_additive_mask(mask, compute_dtype(q.dtype))
    chunk = chunk_size or choose_chunk_size(b, h, n, k.shape[-2], device=q.device)
    if impl == "cpu_fused":
        return _FusedCpuMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk), chunk_size)
    if impl == "triton":
        from .triton_kernels import KernelDoesNotFitError

        try:
            return _TritonMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk))
        except KernelDoesNotFitError as error:
            if explicit:
                raise
            _warn_once(f"{error}: this layer runs the chunked path instead")
    return ChunkedMixedAttention.apply(q, k, v, coeff, mask, scale, int(chunk))
