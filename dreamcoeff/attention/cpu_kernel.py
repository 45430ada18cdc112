"""The fused CPU kernel for exact mixed attention (`csrc/mixed_attention_cpu.cpp`), built on first use.

`torch.utils.cpp_extension.load` compiles the C++ source once per machine (about 20 s; it needs a C++
compiler and ninja, `pip install ninja`) into PyTorch's extension cache (`TORCH_EXTENSIONS_DIR`,
default `~/.cache/torch_extensions`), with the vector instructions PyTorch itself uses on this CPU.
Where it cannot be built or loaded, `unavailable_reason` says why and `mixed_attention` runs the
chunked PyTorch path instead. `DREAMCOEFF_CPU_KERNEL=0` turns it off.

What it computes and why it is faster is in the C++ file's header; measurements in
benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = [
    "unavailable_reason",
    "mixed_attention_forward",
    "mixed_attention_backward",
    "FORWARD_BLOCK_ROWS",
    "FORWARD_TILE_COLS",
    "BACKWARD_BLOCK_ROWS",
    "BACKWARD_TILE_COLS",
    "FUSED_BACKWARD_MAX_BYTES",
    "fused_backward_fits",
]

SOURCE = Path(__file__).with_name("csrc") / "mixed_attention_cpu.cpp"

# Query rows per block and key columns per tile (benchmarks/README.md, "Fused CPU kernel": 64 x 512
# forward and 32 x 256 backward were the fastest of the sizes tried at SDXL's shapes on 2 AVX-512 cores).
FORWARD_BLOCK_ROWS, FORWARD_TILE_COLS = 64, 512
BACKWARD_BLOCK_ROWS, BACKWARD_TILE_COLS = 32, 256
# The fused backward holds two H x rows x L blocks of maps per thread (P and dM). Beyond this size they
# live in L3 and its tile passes become memory-bound; the chunked backward was faster at L = 4096 with
# 10 heads (10.5 MB: fwd+bwd 1.65x SDPA with the chunked backward, 1.8-1.9x fused) and at L = 1024 with
# 20 heads (5.2 MB: 1.62x against 2.00x), the fused one at L = 1024 with 10 heads (2.6 MB: 1.48x
# against 1.78x) and for cross-attention (L = 77). Above it the backward runs the chunked path (the
# forward stays fused). Measurements: benchmarks/README.md, "Fused CPU kernel".
FUSED_BACKWARD_MAX_BYTES = int(os.environ.get("DREAMCOEFF_CPU_FUSED_BACKWARD_MAX_BYTES", 4 * 2**20))

_CAPABILITY_FLAGS = {
    # What ATen's own CPU kernels are built with for each capability (vec.h picks the matching
    # Vectorized<T> from the CPU_CAPABILITY_* macro).
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}

_state: dict[str, object] = {"loaded": False, "error": None}
# A build takes well under a minute; a lock file older than this was left by a killed build.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(name: str) -> None:
    """torch's builder waits, without a timeout, for the lock file of a build in another process; a
    process killed while building (a stopped training run) leaves it behind, and every later start
    would hang. A lock much older than any build is removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private, hence the broad except

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
    except Exception:
        pass


def _build() -> None:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, [])
    # The capability is part of the name: a cache shared by machines with different CPUs (a network
    # home directory) must not hand an AVX-512 build to an AVX2 machine.
    name = f"dreamcoeff_cpu_{capability.lower() if flags else 'default'}"
    _clear_stale_lock(name)
    # Said only when loading takes a while (a build): a cached load is quick and stays silent.
    notice = threading.Timer(
        1.0,
        lambda: print(
            f"dreamcoeff: building the fused CPU attention kernel {name} (once per machine, about 20 s)",
            file=sys.stderr,
            flush=True,
        ),
    )
    notice.daemon = True
    notice.start()
    try:
        # -fopenmp: at::parallel_for is a header template around `#pragma omp parallel`; without it
        # the blocks would run on one thread. The library binds to the libgomp torch already loaded.
        # -ffp-contract=fast: a * b + c as one FMA (ISO C++ mode turns that off by default).
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast", *flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        notice.cancel()


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None where the fused CPU kernel can run on `device` (building it on first call), else why not."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the fused CPU kernel runs on the CPU, not on {torch.device(device).type}"
    if os.environ.get("DREAMCOEFF_CPU_KERNEL", "1") == "0":
        return "the fused CPU kernel is turned off (DREAMCOEFF_CPU_KERNEL=0)"
    if not _state["loaded"] and _state["error"] is None:
        try:
            _build()
            _state["loaded"] = True
        except Exception as error:  # no compiler, no ninja, a BLAS without sgemm_: fall back, say why
            message = str(error).strip().splitlines()
            _state["error"] = (
                f"the fused CPU kernel could not be built: {message[-1] if message else type(error).__name__}"
            )
    return None if _state["loaded"] else str(_state["error"])


def _operands(q, k, v, coeff, mask):
    """Contiguous compute-dtype (float32, or float64 for float64 inputs) operands; mask expanded."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, coeff = (t.to(cdt).contiguous() for t in (q, k, v, coeff))
    if mask is not None:  # additive, broadcastable: expanded as a view (stride-0 dims stay free)
        b, h, n = q.shape[:3]
        mask = mask.to(cdt).expand(b, h, n, k.shape[-2])
    return q, k, v, coeff, mask


def mixed_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    block_rows: int | None = None,
    tile_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (B, H, N, dv) in q's dtype, each row's log-sum-exp (B, H, N) for the backward).

    `mask` is additive (see `dreamcoeff.attention.core.as_additive_mask`) and broadcastable to (B, H, N, L).
    block_rows / tile_cols: query rows per block, key columns per tile (None: the module defaults).
    """
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    qc, kc, vc, ac, mc = _operands(q, k, v, coeff, mask)
    rows, cols = block_rows or FORWARD_BLOCK_ROWS, tile_cols or FORWARD_TILE_COLS
    out, lse = torch.ops.dreamcoeff_cpu.forward(qc, kc, vc, ac, mc, float(scale), int(rows), int(cols))
    return out.to(q.dtype), lse


def fused_backward_fits(q: torch.Tensor, k: torch.Tensor, block_rows: int | None = None) -> bool:
    """Whether the fused backward's per-thread maps stay within FUSED_BACKWARD_MAX_BYTES."""
    heads, n_query, n_key = q.shape[1], q.shape[2], k.shape[-2]
    block_rows = block_rows or BACKWARD_BLOCK_ROWS
    itemsize = 8 if q.dtype == torch.float64 else 4
    return 2 * heads * min(block_rows, n_query) * n_key * itemsize <= FUSED_BACKWARD_MAX_BYTES


def mixed_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    block_rows: int | None = None,
    tile_cols: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Fused backward from the forward's log-sum-exp: (dq, dk, dv, dcoeff) in the inputs' dtypes
    (None where `needs`, the requires-grad flags of q, k, v, coeff, is False)."""
    qc, kc, vc, ac, mc = _operands(q, k, v, coeff, mask)
    g = grad_out.to(qc.dtype).contiguous()
    rows, cols = block_rows or BACKWARD_BLOCK_ROWS, tile_cols or BACKWARD_TILE_COLS
    grads = torch.ops.dreamcoeff_cpu.backward(
        qc, kc, vc, ac, mc, lse.contiguous(), g, float(scale), *map(bool, needs), int(rows), int(cols)
    )
    return tuple(grad.to(like.dtype) if need else None for grad, like, need in zip(grads, (q, k, v, coeff), needs))
