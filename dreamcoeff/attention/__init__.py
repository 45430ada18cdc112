"""Exact Coeff-Tuning attention, O^h = sum_i A[h, i] softmax(Q^i K^i^T s + M) V^h, on every backend.

    core            the mixing matrix A = I + c * dropout(alpha), dtype and mask helpers, the naive
                    reference holding every map (`materialized_mixed_attention`)
    chunked         the exact path over query-row chunks with recomputation in backward (any device)
    dispatch        `mixed_attention`: which implementation runs ("auto", a model's preference, the
                    DREAMCOEFF_ATTENTION_IMPL environment variable), the fused backends' autograd
                    wrappers and their fallbacks
    cpu_kernel      builds and calls the fused C++ CPU kernel (csrc/mixed_attention_cpu.cpp)
    triton_kernels  the fused Triton kernels (CUDA; optional, imported lazily)

`mixed_attention` is the one to call; `dreamcoeff.processor.CoeffAttnProcessor` calls it.
"""

from .chunked import DEFAULT_CHUNK_BYTES, DEFAULT_CUDA_CHUNK_BYTES, MIN_CHUNK_ROWS, choose_chunk_size
from .core import coefficient_matrix, materialized_mixed_attention
from .dispatch import EXACT_IMPLS, IMPL_ENV, IMPLS, mixed_attention, select_impl

__all__ = [
    "coefficient_matrix",
    "materialized_mixed_attention",
    "mixed_attention",
    "choose_chunk_size",
    "select_impl",
    "IMPLS",
    "EXACT_IMPLS",
    "IMPL_ENV",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
]
