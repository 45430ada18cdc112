"""Coeff-Tuning attention as fused Triton kernels, forward and backward (CUDA; triton is optional).

On the CPU the kernels run only in Triton's interpreter, for the tests.

    O^h = sum_i A[h, i] softmax(Q^i K^i^T * scale + M)^i V^h          (docs/DESIGN.md section 1)

The chunked PyTorch path writes every chunk's scores, maps and mixed maps to memory, one pass per
op; on a GPU those passes are HBM round trips, which is why it ran at 13-26x SDPA on an H200
(benchmarks/README.md). Here the maps never leave the chip. The forward is two kernels:

    pass 1 (`_row_logsumexp_kernel`, one head per program): lse^i[n] = log sum_l exp(S^i[n, l]),
            with flash attention's online max and sum over key blocks; writes B x H x N floats.
    pass 2 (`_mixed_attention_fwd_kernel`): one program owns BLOCK_M query rows of one batch element,
            every input head and GROUP output heads; per key block it forms S^i for all heads at once
            (a batched 3-D dot), P^i = exp(S^i - lse^i) (already normalised, so the heads can be
            mixed block by block), the mix as one (GROUP x H) @ (H x BLOCK_M*BLOCK_N) dot, and
            O^h += (A P)^h V^h as a batched 3-D dot.

Pass 1 costs one extra Q K^T product: the mix needs normalised maps before any value is touched, so
the online rescaling flash attention uses for P V cannot be carried through the mix. The mix couples
the heads, so a program holds all of them; with more than 16 (padded) heads the output heads are
split into groups of 16 (registers), each group recomputing the maps.

Precision: scores and accumulators are float32. With fp16/bf16 inputs the maps enter the dots in
the input dtype (as in flash attention), but A is split into a high and a low half in that dtype,
A = A_hi + A_lo, mixed with two dots: A = I + alpha with alpha ~ 1e-3 would round to I in bf16
(spacing 2^-7 near 1), the split keeps ~16 bits of it. float32 inputs use exact float32 ("ieee") dots.

The backward (`mixed_attention_backward`) recomputes the maps tile by tile from q, k, v and the
forward's lse in three launches: rows phase 0 (delta^i = rowsum(P^i dP^i), the softmax backward's
row term, and dA), rows phase 1 (dQ), keys (dK, dV). float32 activations take the chunked backward
(`dreamcoeff.attention.chunked`): the float32 backward tiles exceed a GPU program's shared memory.

Heads are padded to a power of two >= 16 (the mix dot's inner dimension), masked to zero. Tiles come
from `kernel_configs` / `backward_kernel_config`, chosen by benchmarks/triton_compile_check.py's
register, spill and shared-memory counts for sm_90: not yet by GPU timings.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is optional: only `impl="triton"` needs it, and says so when it is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = [
    "KernelDoesNotFitError",
    "triton_unavailable_reason",
    "unsupported_reason",
    "kernel_configs",
    "backward_kernel_config",
    "mixed_attention_forward",
    "mixed_attention_backward",
    "jit_kernels",
]


class KernelDoesNotFitError(RuntimeError):
    """The kernels' tiles need more shared memory (or registers) than this GPU gives one program.

    Measured on sm_90 (227 KiB per program) by benchmarks/triton_compile_check.py; GPUs with less
    (sm_80: 163 KiB, sm_86/89 consumer cards: 99 KiB) refuse the larger launches. `mixed_attention`
    then falls back to the chunked path where it chose the kernels itself (see `dispatch`)."""


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on `device` here, or None when it can."""
    if triton is None:
        return "triton is not installed (pip install triton; it ships with PyTorch's CUDA wheels on Linux)"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not interpret:
        return (
            f"the Triton kernel runs on CUDA tensors (got {device.type}); on the CPU only in Triton's "
            "interpreter (TRITON_INTERPRET=1, for tests: very slow)"
        )
    return None


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take these (B, H, N, d) queries here, or None when it can."""
    reason = triton_unavailable_reason(q.device)
    if reason is None and q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reason = f"the Triton kernel takes float32/float16/bfloat16 activations, got {q.dtype}"
    if reason is None and q.dtype == torch.float32 and q.shape[1] > 16:
        reason = (
            f"float32 with {q.shape[1]} heads does not fit one program's shared memory (more than 16 heads "
            "need bf16/fp16 activations, e.g. --mixed_precision bf16)"
        )
    return reason


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(1, n) - 1).bit_length())


if triton is not None:
    # ---- helpers shared by the kernels (inlined by Triton) ----------------------------------------

    @triton.jit
    def _tile(base, i, j, k, s_i, s_j, s_k, n_i, n_j, n_k):
        """base[i, j, k] as a 3-D tile for index vectors i, j, k; zero where an index is out of range."""
        return tl.load(
            base + i[:, None, None] * s_i + j[None, :, None] * s_j + k[None, None, :] * s_k,
            mask=(i < n_i)[:, None, None] & (j < n_j)[None, :, None] & (k < n_k)[None, None, :],
            other=0.0,
        )

    @triton.jit
    def _row_stat(base, heads, rows, H, N):
        """A per-(head, row) float32 statistic (lse, delta) of one batch element, (heads, rows)."""
        return tl.load(
            base + heads[:, None] * N + rows[None, :], mask=(heads < H)[:, None] & (rows < N)[None, :], other=0.0
        )

    @triton.jit
    def _maps(
        q,
        k_t,
        lse,
        mask_base,
        heads,
        rows,
        cols,
        s_mh,
        s_mn,
        s_ml,
        H,
        N,
        L,
        scale,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """P = exp(Q K^T * scale + M - lse) of a (heads, rows, keys) tile, float32, zero outside the
        real heads, rows and keys; the maps are normalised because lse is the whole row's."""
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale
        if HAS_MASK:
            s += _tile(mask_base, heads, rows, cols, s_mh, s_mn, s_ml, H, N, L)
        ok = (heads < H)[:, None, None] & (rows < N)[None, :, None] & (cols < L)[None, None, :]
        return tl.where(ok, tl.exp(s - lse[:, :, None]), 0.0)

    @triton.jit
    def _mix(
        a_hi,
        a_lo,
        maps,
        HP: tl.constexpr,
        OUT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_A: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """sum_i A[o, i] maps[i] for a (HP, BLOCK_M, BLOCK_N) tile (maps in the values' dtype) and the
        (OUT, HP) rows of A: one (OUT x HP) @ (HP x BLOCK_M*BLOCK_N) dot, two with A split; float32."""
        flat = tl.reshape(maps, [HP, BLOCK_M * BLOCK_N])
        mixed = tl.dot(a_hi, flat, input_precision=PRECISION)
        if SPLIT_A:
            mixed += tl.dot(a_lo, flat, input_precision=PRECISION)
        return tl.reshape(mixed, [OUT, BLOCK_M, BLOCK_N])

    # ---- forward --------------------------------------------------------------------------------

    @triton.jit
    def _row_logsumexp_kernel(
        Q,
        K,
        Mask,
        LSE,
        scale,
        s_qb,
        s_qh,
        s_qn,
        s_qd,
        s_kb,
        s_kh,
        s_kl,
        s_kd,
        s_mb,
        s_mh,
        s_mn,
        s_ml,
        H,
        N,
        L,
        D,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Pass 1, one head per program: lse[b, h, n] = log sum_l exp(S[b, h, n, l]) (flash-style online)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dims[None, :] * s_qd,
            mask=(rows[:, None] < N) & (dims[None, :] < D),
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k_t = tl.load(
                K + b * s_kb + h * s_kh + cols[None, :] * s_kl + dims[:, None] * s_kd,
                mask=(cols[None, :] < L) & (dims[:, None] < D),
                other=0.0,
            )
            s = tl.dot(q, k_t, input_precision=PRECISION) * scale
            if HAS_MASK:
                s += tl.load(
                    Mask + b * s_mb + h * s_mh + rows[:, None] * s_mn + cols[None, :] * s_ml,
                    mask=(rows[:, None] < N) & (cols[None, :] < L),
                    other=0.0,
                )
            s = tl.where(cols[None, :] < L, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with every key masked so far has m_new = -inf: shift by 0 so no inf - inf NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        # A row with every key masked: -inf, and its maps NaN, as torch.softmax gives.
        tl.store(LSE + bh * N + rows, m_i + tl.log(l_i), mask=rows < N)

    @triton.jit
    def _mixed_attention_fwd_kernel(
        Q,
        K,
        V,
        A_HI,
        A_LO,
        Mask,
        LSE,
        Out,
        scale,
        s_qb,
        s_qh,
        s_qn,
        s_qd,
        s_kb,
        s_kh,
        s_kl,
        s_kd,
        s_vb,
        s_vh,
        s_vl,
        s_vd,
        s_mb,
        s_mh,
        s_mn,
        s_ml,
        s_ob,
        s_oh,
        s_on,
        s_od,
        H,
        N,
        L,
        D,
        DV,
        HAS_MASK: tl.constexpr,
        SPLIT_A: tl.constexpr,
        PRECISION: tl.constexpr,
        HP: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """Pass 2: BLOCK_M rows of one batch element, all HP input heads, GROUP output heads."""
        b = tl.program_id(1)
        heads = tl.arange(0, HP)
        outs = tl.program_id(2) * GROUP + tl.arange(0, GROUP)  # this program's output heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        vdims = tl.arange(0, BLOCK_DV)
        Q += b * s_qb
        K += b * s_kb
        V += b * s_vb
        Mask += b * s_mb
        lse = _row_stat(LSE + b * H * N, heads, rows, H, N)
        a_off = outs[:, None] * HP + heads[None, :]  # this group's rows of A (or of its two halves)
        a_hi = tl.load(A_HI + a_off)
        a_lo = tl.load(A_LO + a_off)
        acc = tl.zeros([GROUP, BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            # Q is loaded again in every key block (an L1/L2 hit) rather than held next to acc.
            q = _tile(Q, heads, rows, dims, s_qh, s_qn, s_qd, H, N, D)
            k_t = _tile(K, heads, dims, cols, s_kh, s_kd, s_kl, H, D, L)
            p = _maps(q, k_t, lse, Mask, heads, rows, cols, s_mh, s_mn, s_ml, H, N, L, scale, HAS_MASK, PRECISION)
            mixed = _mix(a_hi, a_lo, p.to(V.dtype.element_ty), HP, GROUP, BLOCK_M, BLOCK_N, SPLIT_A, PRECISION)
            v = _tile(V, outs, cols, vdims, s_vh, s_vl, s_vd, H, L, DV)
            acc += tl.dot(mixed.to(V.dtype.element_ty), v, input_precision=PRECISION)
        tl.store(
            Out + b * s_ob + outs[:, None, None] * s_oh + rows[None, :, None] * s_on + vdims[None, None, :] * s_od,
            acc.to(Out.dtype.element_ty),
            mask=(outs < H)[:, None, None] & (rows < N)[None, :, None] & (vdims < DV)[None, None, :],
        )

    # ---- backward -------------------------------------------------------------------------------
    # dM^h = dO^h V^h^T, dP^i = sum_h A[h, i] dM^h, dS^i = P^i (dP^i - delta^i) with
    # delta^i = rowsum(P^i dP^i); dQ^i = scale dS^i K^i, dK^i = scale dS^i^T Q^i,
    # dV^h = (A P)^h^T dO^h, dA[h, i] = sum dM^h P^i.

    @triton.jit
    def _mixed_attention_bwd_rows_kernel(
        Q,
        K,
        V,
        A_HI,
        A_LO,
        Mask,
        LSE,
        DO,
        DELTA,
        DQ,
        DA,
        scale,
        s_qb,
        s_qh,
        s_qn,
        s_qd,
        s_kb,
        s_kh,
        s_kl,
        s_kd,
        s_vb,
        s_vh,
        s_vl,
        s_vd,
        s_mb,
        s_mh,
        s_mn,
        s_ml,
        s_gb,
        s_gh,
        s_gn,
        s_gd,
        H,
        N,
        L,
        D,
        DV,
        PHASE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SPLIT_A: tl.constexpr,
        PRECISION: tl.constexpr,
        HP: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """Backward, query side: BLOCK_M rows of one batch element, walking over the keys.

        PHASE 0: delta^i for every head and this program's share of dA (per-program partial sums,
                 added on the host: deterministic, no atomics).
        PHASE 1: dQ^i for the GROUP heads i of this program (delta from phase 0).
        """
        b = tl.program_id(1)
        dt = V.dtype.element_ty
        heads = tl.arange(0, HP)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        vdims = tl.arange(0, BLOCK_DV)
        if PHASE == 0:
            ih = heads  # the input heads whose maps this program forms
            OUT: tl.constexpr = HP
        else:
            ih = tl.program_id(2) * GROUP + tl.arange(0, GROUP)
            OUT: tl.constexpr = GROUP
        Q += b * s_qb
        K += b * s_kb
        V += b * s_vb
        Mask += b * s_mb
        g = _tile(DO + b * s_gb, heads, rows, vdims, s_gh, s_gn, s_gd, H, N, DV)  # dO of every head
        q = _tile(Q, ih, rows, dims, s_qh, s_qn, s_qd, H, N, D)
        lse = _row_stat(LSE + b * H * N, ih, rows, H, N)
        at_off = heads[None, :] * HP + ih[:, None]  # A^T rows: [i, h] = A[h, i]
        at_hi = tl.load(A_HI + at_off)
        at_lo = tl.load(A_LO + at_off)
        if PHASE == 0:
            delta = tl.zeros([HP, BLOCK_M], tl.float32)
            da = tl.zeros([HP, HP], tl.float32)
        else:
            delta = _row_stat(DELTA + b * H * N, ih, rows, H, N)
            dq = tl.zeros([GROUP, BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _tile(K, ih, cols, dims, s_kh, s_kl, s_kd, H, L, D)
            p = _maps(
                q,
                tl.permute(k, (0, 2, 1)),
                lse,
                Mask,
                ih,
                rows,
                cols,
                s_mh,
                s_mn,
                s_ml,
                H,
                N,
                L,
                scale,
                HAS_MASK,
                PRECISION,
            )
            v_t = _tile(V, heads, vdims, cols, s_vh, s_vd, s_vl, H, DV, L)
            dm = tl.dot(g, v_t, input_precision=PRECISION).to(dt)  # (HP, BLOCK_M, BLOCK_N)
            dp = _mix(at_hi, at_lo, dm, HP, OUT, BLOCK_M, BLOCK_N, SPLIT_A, PRECISION)
            if PHASE == 0:
                delta += tl.sum(p * dp, 2)
                dm2 = tl.reshape(dm, [HP, BLOCK_M * BLOCK_N])
                p2 = tl.reshape(p.to(dt), [HP, BLOCK_M * BLOCK_N])
                da += tl.dot(dm2, tl.trans(p2), input_precision=PRECISION)  # [h, i] = sum dM^h P^i
            else:
                ds = p * (dp - delta[:, :, None])
                dq += tl.dot(ds.to(dt), k, input_precision=PRECISION)
        if PHASE == 0:
            tl.store(
                DELTA + (b * H + heads[:, None]) * N + rows[None, :],
                delta,
                mask=(heads < H)[:, None] & (rows < N)[None, :],
            )
            program = b * tl.num_programs(0) + tl.program_id(0)
            tl.store(DA + program * HP * HP + heads[:, None] * HP + heads[None, :], da)
        else:
            tl.store(
                DQ + ((b * H + ih[:, None, None]) * N + rows[None, :, None]) * D + dims[None, None, :],
                dq * scale,
                mask=(ih < H)[:, None, None] & (rows < N)[None, :, None] & (dims < D)[None, None, :],
            )

    @triton.jit
    def _mixed_attention_bwd_keys_kernel(
        Q,
        K,
        V,
        A_HI,
        A_LO,
        Mask,
        LSE,
        DO,
        DELTA,
        DK,
        DVAL,
        scale,
        s_qb,
        s_qh,
        s_qn,
        s_qd,
        s_kb,
        s_kh,
        s_kl,
        s_kd,
        s_vb,
        s_vh,
        s_vl,
        s_vd,
        s_mb,
        s_mh,
        s_mn,
        s_ml,
        s_gb,
        s_gh,
        s_gn,
        s_gd,
        H,
        N,
        L,
        D,
        DV,
        DO_DK: tl.constexpr,
        DO_DV: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SPLIT_A: tl.constexpr,
        PRECISION: tl.constexpr,
        HP: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """Backward, key side: BLOCK_N keys of one batch element and GROUP heads, walking over the rows.

        DO_DV: dV^h for the group's output heads h (needs every head's P, for the mix);
        DO_DK: dK^i for the group's input heads i (needs every head's dM, for dP).
        With all heads in one group both run in one launch and share P; with more heads than a group
        they are two launches, each holding half the tiles (shared memory is this kernel's limit).
        """
        b = tl.program_id(1)
        dt = V.dtype.element_ty
        heads = tl.arange(0, HP)
        grp = tl.program_id(2) * GROUP + tl.arange(0, GROUP)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        vdims = tl.arange(0, BLOCK_DV)
        Q += b * s_qb
        K += b * s_kb
        V += b * s_vb
        DO += b * s_gb
        Mask += b * s_mb
        LSE += b * H * N
        a_off = grp[:, None] * HP + heads[None, :]  # A[h in group, i]
        at_off = heads[None, :] * HP + grp[:, None]  # A^T[i in group, h] = A[h, i]
        dk = tl.zeros([GROUP, BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([GROUP, BLOCK_N, BLOCK_DV], tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            if DO_DV:
                q = _tile(Q, heads, rows, dims, s_qh, s_qn, s_qd, H, N, D)
                k_t = _tile(K, heads, dims, cols, s_kh, s_kd, s_kl, H, D, L)
                p = _maps(
                    q,
                    k_t,
                    _row_stat(LSE, heads, rows, H, N),
                    Mask,
                    heads,
                    rows,
                    cols,
                    s_mh,
                    s_mn,
                    s_ml,
                    H,
                    N,
                    L,
                    scale,
                    HAS_MASK,
                    PRECISION,
                )
                mixed = _mix(
                    tl.load(A_HI + a_off),
                    tl.load(A_LO + a_off),
                    p.to(dt),
                    HP,
                    GROUP,
                    BLOCK_M,
                    BLOCK_N,
                    SPLIT_A,
                    PRECISION,
                )
                g_grp = _tile(DO, grp, rows, vdims, s_gh, s_gn, s_gd, H, N, DV)
                dv += tl.dot(tl.permute(mixed.to(dt), (0, 2, 1)), g_grp, input_precision=PRECISION)
            if DO_DK:
                if DO_DV and GROUP == HP:  # the group is every head: its P and Q are already here
                    p_grp = p
                    q_grp = q
                else:
                    q_grp = _tile(Q, grp, rows, dims, s_qh, s_qn, s_qd, H, N, D)
                    k_t_grp = _tile(K, grp, dims, cols, s_kh, s_kd, s_kl, H, D, L)
                    p_grp = _maps(
                        q_grp,
                        k_t_grp,
                        _row_stat(LSE, grp, rows, H, N),
                        Mask,
                        grp,
                        rows,
                        cols,
                        s_mh,
                        s_mn,
                        s_ml,
                        H,
                        N,
                        L,
                        scale,
                        HAS_MASK,
                        PRECISION,
                    )
                g = _tile(DO, heads, rows, vdims, s_gh, s_gn, s_gd, H, N, DV)
                v_t = _tile(V, heads, vdims, cols, s_vh, s_vd, s_vl, H, DV, L)
                dm = tl.dot(g, v_t, input_precision=PRECISION).to(dt)
                dp = _mix(
                    tl.load(A_HI + at_off), tl.load(A_LO + at_off), dm, HP, GROUP, BLOCK_M, BLOCK_N, SPLIT_A, PRECISION
                )
                ds = p_grp * (dp - _row_stat(DELTA + b * H * N, grp, rows, H, N)[:, :, None])
                dk += tl.dot(tl.permute(ds.to(dt), (0, 2, 1)), q_grp, input_precision=PRECISION)
        out_rows = (b * H + grp[:, None, None]) * L + cols[None, :, None]
        out_ok = (grp < H)[:, None, None] & (cols < L)[None, :, None]
        if DO_DK:
            tl.store(DK + out_rows * D + dims[None, None, :], dk * scale, mask=out_ok & (dims < D)[None, None, :])
        if DO_DV:
            tl.store(DVAL + out_rows * DV + vdims[None, None, :], dv, mask=out_ok & (vdims < DV)[None, None, :])


def jit_kernels() -> dict[str, object]:
    """The four @triton.jit kernels by name, as the launches look them up now (empty without triton):
    "row_logsumexp", "fwd", "bwd_rows", "bwd_keys", for benchmarks/triton_compile_check.py."""
    if triton is None:
        return {}
    return {
        "row_logsumexp": _row_logsumexp_kernel,
        "fwd": _mixed_attention_fwd_kernel,
        "bwd_rows": _mixed_attention_bwd_rows_kernel,
        "bwd_keys": _mixed_attention_bwd_keys_kernel,
    }


def kernel_configs(
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    value_dim: int | None = None,
    has_mask: bool = False,
    block_m: int = 16,
    block_n: int = 16,
    group: int | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
    split_coeff: bool | None = None,
) -> tuple[dict, dict]:
    """The compile-time constants and launch options of the two kernels, as (pass 1, pass 2) dicts.

    One place for the tile choices, shared by the launch and by `benchmarks/triton_compile_check.py`
    (which compiles exactly these for sm_90 without a GPU and reads registers, spills, shared memory).
    """
    hp = _pow2(heads)
    group = min(hp, 16) if group is None else group
    if group < 16 or hp % group:
        raise ValueError(f"group must be a power of two >= 16 dividing {hp} (the padded head count), got {group}")
    low_precision = dtype != torch.float32
    precision = "ieee" if not low_precision else "tf32"  # tf32 is ignored for fp16/bf16 dots
    block_d = _pow2(head_dim)
    lse = dict(
        HAS_MASK=has_mask,
        PRECISION=precision,
        BLOCK_M=64,
        BLOCK_N=64 if low_precision else 32,  # fp32: registers
        BLOCK_D=block_d,
        num_warps=4,
    )
    mix = dict(
        HAS_MASK=has_mask,
        SPLIT_A=low_precision if split_coeff is None else (split_coeff and low_precision),
        PRECISION=precision,
        HP=hp,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=_pow2(value_dim or head_dim),
        num_warps=num_warps,
        # float32 tiles need 209 KiB of shared memory at 2 stages (Hopper-class GPUs), 337 KiB at 3.
        num_stages=num_stages if num_stages is not None else (3 if low_precision else 2),
    )
    return lse, mix


def _require_supported(q: torch.Tensor) -> None:
    """Raise, saying why, where `unsupported_reason` finds the kernels cannot take these queries."""
    reason = unsupported_reason(q)
    if reason is not None:
        error = TypeError if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) else RuntimeError
        raise error(f"mixed attention impl='triton' cannot run: {reason}; impl='chunked' runs everywhere")


@contextlib.contextmanager
def _launches_must_fit(what: str):
    """Turn Triton's OutOfResources (tiles beyond the GPU's shared memory) into KernelDoesNotFitError."""
    try:
        yield
    except Exception as error:
        if type(error).__name__ != "OutOfResources":  # triton's class; matched by name, triton is optional
            raise
        raise KernelDoesNotFitError(
            f"the Triton mixed-attention {what} does not fit this GPU ({error}); use bf16/fp16 activations "
            "(--mixed_precision), smaller tiles (block_n, num_stages) or impl='chunked'"
        ) from error


def _coeff_halves(coeff: torch.Tensor, hp: int, q: torch.Tensor, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded to (HP, HP) with zeros, in q's dtype; split into a high and a low half if `split`."""
    h = coeff.shape[0]
    a = torch.zeros(hp, hp, dtype=torch.float32, device=q.device)
    a[:h, :h] = coeff.detach().to(device=q.device, dtype=torch.float32)
    a_hi = a.to(q.dtype)
    return a_hi, ((a - a_hi.float()).to(q.dtype) if split else a_hi)


def _mask_operand(mask: torch.Tensor | None, shape: tuple, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The additive mask as a float32 (B, H, N, L) view and its strides (stride 0 where broadcast);
    without a mask a placeholder pointer that the kernels never read (HAS_MASK is False)."""
    if mask is None:
        return placeholder, (0, 0, 0, 0)
    mask = mask.to(device=placeholder.device, dtype=torch.float32).expand(*shape)
    return mask, mask.stride()


def backward_kernel_config(
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    value_dim: int | None = None,
    has_mask: bool = False,
    block_m: int = 16,
    block_n: int = 16,
    group: int | None = None,
    num_warps: int = 8,
    num_stages: int = 2,
) -> dict:
    """Constants and launch options shared by the three backward launches (see `kernel_configs`)."""
    _, config = kernel_configs(
        dtype,
        heads,
        head_dim,
        value_dim,
        has_mask,
        block_m=block_m,
        block_n=block_n,
        group=group,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return config


def mixed_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeff: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    **tiles,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """O = mixed attention of (B, H, N, d) q, (B, H, L, d) k, (B, H, L, dv) v with the (H, H) coeff.

    q, k, v: float32, float16 or bfloat16 (any strides); mask: None or an additive float mask
    broadcastable to (B, H, N, L). Returns (B, H, N, dv) in q's dtype. No autograd: see
    `dreamcoeff.attention.mixed_attention(impl="triton")`.
    tiles (see `kernel_configs`): block_m query rows and block_n keys per step (powers of two >= 16);
    group output heads per program (None: all heads up to 16, else 16: a smaller group recomputes
    the maps once per group but needs fewer registers); num_warps; num_stages (software pipelining);
    split_coeff (mix with A split into two fp16/bf16 halves; None: for fp16/bf16 inputs, False only
    to measure what the split is worth). The defaults come from the register, spill and shared-memory
    counts of the sm_90 compile (benchmarks/README.md), not yet from GPU timings.
    """
    _require_supported(q)
    if not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    l, dv = k.shape[-2], v.shape[-1]
    lse_config, mix_config = kernel_configs(q.dtype, h, d, dv, mask is not None, **tiles)
    hp = mix_config["HP"]
    a_hi, a_lo = _coeff_halves(coeff, hp, q, mix_config["SPLIT_A"])
    out = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    mask, mask_strides = _mask_operand(mask, (b, h, n, l), lse)
    with _launches_must_fit("kernel"):
        # Pass 1: one head per program.
        _row_logsumexp_kernel[(triton.cdiv(n, lse_config["BLOCK_M"]), b * h)](
            q, k, mask, lse, float(scale), *q.stride(), *k.stride(), *mask_strides, h, n, l, d, **lse_config
        )
        # Pass 2: all heads' maps, mixed, times the values; one program per row block and head group.
        _mixed_attention_fwd_kernel[(triton.cdiv(n, mix_config["BLOCK_M"]), b, hp // mix_config["GROUP"])](
            q,
            k,
            v,
            a_hi,
            a_lo,
            mask,
            lse,
            out,
            float(scale),
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *mask_strides,
            *out.stride(),
            h,
            n,
            l,
            d,
            dv,
            **mix_config,
        )
    return (out, lse) if return_lse else out


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
    **tiles,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dcoeff) of the mixed attention, from the inputs and the forward's lse.

    Three launches, each recomputing the maps block by block (nothing N x L is stored):
    rows phase 0 (delta^i = rowsum(P^i dP^i) and dA), rows phase 1 (dQ), keys (dK, dV; two
    launches above 16 heads). `needs`
    says which of q, k, v, coeff want a gradient (None is returned for the others). Gradients come
    back in the inputs' dtypes (dcoeff in coeff's). tiles: as `backward_kernel_config`.
    """
    _require_supported(q)
    b, h, n, d = q.shape
    l, dv = k.shape[-2], v.shape[-1]
    config = backward_kernel_config(q.dtype, h, d, dv, mask is not None, **tiles)
    hp, grp, block_m, block_n = config["HP"], config["GROUP"], config["BLOCK_M"], config["BLOCK_N"]
    a_hi, a_lo = _coeff_halves(coeff, hp, q, config["SPLIT_A"])
    mask, mask_strides = _mask_operand(mask, (b, h, n, l), lse)
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(b, h, n, **f32)
    row_blocks = triton.cdiv(n, block_m)
    da_parts = torch.empty(b * row_blocks, hp, hp, **f32)
    dq = torch.empty(b, h, n, d, **f32) if needs[0] else None
    # Both buffers whenever either is wanted: a single launch writes both (the other is discarded).
    dk = torch.empty(b, h, l, d, **f32) if needs[1] or needs[2] else None
    dval = torch.empty(b, h, l, dv, **f32) if needs[1] or needs[2] else None
    common = (float(scale), *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), h, n, l, d, dv)
    with _launches_must_fit("backward"):
        # delta is needed by every dS, so phase 0 always runs (it also gives dA).
        _mixed_attention_bwd_rows_kernel[(row_blocks, b, 1)](
            q, k, v, a_hi, a_lo, mask, lse, grad_out, delta, delta, da_parts, *common, PHASE=0, **config
        )
        if dq is not None:
            _mixed_attention_bwd_rows_kernel[(row_blocks, b, hp // grp)](
                q, k, v, a_hi, a_lo, mask, lse, grad_out, delta, dq, da_parts, *common, PHASE=1, **config
            )
        if dk is not None:
            # One launch for dK and dV where a group holds every head, else one each (shared memory).
            passes = [(True, True)] if grp == hp else [(needs[1], False), (False, needs[2])]
            for do_dk, do_dv in passes:
                if do_dk or do_dv:
                    _mixed_attention_bwd_keys_kernel[(triton.cdiv(l, block_n), b, hp // grp)](
                        q,
                        k,
                        v,
                        a_hi,
                        a_lo,
                        mask,
                        lse,
                        grad_out,
                        delta,
                        dk,
                        dval,
                        *common,
                        DO_DK=do_dk,
                        DO_DV=do_dv,
                        **config,
                    )
    da = da_parts.sum(0)[:h, :h].to(coeff.dtype) if needs[3] else None
    return (
        dq.to(q.dtype) if needs[0] else None,
        dk.to(k.dtype) if needs[1] else None,
        dval.to(v.dtype) if needs[2] else None,
        da,
    )
