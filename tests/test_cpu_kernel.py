"""The fused CPU kernel (`dreamcoeff.attention.cpu_kernel`, csrc/mixed_attention_cpu.cpp) against the float64
reference of test_attention_impls (einsum, no shared code).

The shapes cross every boundary of the kernel's blocking: several row blocks and key tiles, both with
remainders (the block and tile sizes are shrunk to a few rows / columns), more heads than the mix's
16-head register group, dv != d, cross-attention, masks per row, per key (padding) and broadcast over
keys (stride 0 inside a row), batch 2; with 2 threads the per-worker gradient accumulators and their
fold are exercised too. Then the backward's size rule, determinism, the dispatcher and the fallbacks.
"""

import pytest
import torch

from dreamcoeff import attention as dc
from dreamcoeff.attention import cpu_kernel, dispatch
from tests.attention_cases import attention_mask, random_attention_inputs, ref_grads


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    """A fresh machine has a C++ compiler and ninja (a project dependency): the kernel must build here,
    so a broken build fails loudly instead of every test quietly running the chunked path."""
    reason = cpu_kernel.unavailable_reason("cpu")
    assert reason is None, reason


@pytest.fixture
def small_tiles(monkeypatch):
    """Key tiles of 5 (forward) and 3 (backward) columns: many tiles and a remainder at test sizes."""
    monkeypatch.setattr(cpu_kernel, "FORWARD_TILE_COLS", 5)
    monkeypatch.setattr(cpu_kernel, "BACKWARD_TILE_COLS", 3)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


CASES = [
    # b, h, n, l, d, dv, block_rows, mask
    (1, 3, 13, 13, 8, 8, 4, None),  # blocks and tiles with remainders
    (2, 5, 9, 23, 16, 24, 2, "additive"),  # cross-attention L > N, dv != d, batch 2, per-row mask
    (2, 4, 17, 7, 8, 8, 5, "additive_keys"),  # L < N, key padding (B, 1, 1, L)
    (1, 17, 6, 11, 4, 4, 3, "bool"),  # 17 heads: a 16-head register group and a group of 1
    (1, 20, 5, 9, 8, 8, None, None),  # SDXL's 20 heads (16 + 4), the default block size
    (2, 2, 33, 40, 8, 8, 32, "broadcast_keys"),  # a mask that is constant along the keys (stride 0)
]


def _mask(kind, b, h, n, l):
    if kind == "broadcast_keys":
        g = torch.Generator().manual_seed(2)
        return torch.randn(b, h, n, 1, generator=g, dtype=torch.float64)
    return attention_mask(kind, b, h, n, l)


@pytest.mark.parametrize("b,h,n,l,d,dv,block_rows,mask_kind", CASES)
def test_float64_values_and_every_gradient(b, h, n, l, d, dv, block_rows, mask_kind, small_tiles, threads):
    q, k, v, a, _ = random_attention_inputs(b, h, n, l, d, seed=h + n)
    v = torch.randn(b, h, l, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gout = torch.randn(b, h, n, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mask = _mask(mask_kind, b, h, n, l)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, scale=0.41, mask=mask, chunk_size=block_rows, impl="cpu_fused")
    out.backward(gout)
    ref_out, ref_g = ref_grads(q, k, v, a, 0.41, mask, gout)
    torch.testing.assert_close(out, ref_out, rtol=1e-11, atol=1e-11)
    for name, got, exp in zip("qkva", (t.grad for t in leaves), ref_g):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_compute_at_realistic_row_length(dtype, threads):
    """L = 300 keys, 10 heads of 64, several blocks: float32-level error (bf16 inputs computed in float32)."""
    q, k, v, a, gout = random_attention_inputs(2, 10, 70, 300, 64, dtype=dtype, seed=11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, chunk_size=16, impl="cpu_fused")
    assert out.dtype == dtype
    out.backward(gout.to(dtype))
    ref_out, ref_g = ref_grads(q, k, v, a, 0.125, None, gout.to(dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert rel(out, ref_out) < tol
    for name, got, exp in zip("qkva", (t.grad for t in leaves), ref_g):
        assert rel(got, exp) < 5 * tol, name


def test_repeatable_bit_for_bit_with_two_threads():
    """dK, dV and dA sum over the threads' row blocks in a fixed order: the same bits every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v, a, gout = random_attention_inputs(2, 6, 90, 50, 16, dtype=torch.float32, seed=12)
        runs = []
        for _ in range(3):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
            out = dc.mixed_attention(*leaves, chunk_size=8, impl="cpu_fused")
            out.backward(gout.float())
            runs.append([out.detach()] + [t.grad for t in leaves])
        for other in runs[1:]:
            for x, y in zip(runs[0], other):
                assert torch.equal(x, y)
    finally:
        torch.set_num_threads(before)


def test_big_maps_take_the_chunked_backward(monkeypatch):
    """Past FUSED_BACKWARD_MAX_BYTES the backward is the chunked one (same gradients); the forward stays fused."""
    # The default limit (4 MiB): fused for L = 1024 with 10 heads, 256 with 20 and cross-attention; not
    # for SDXL's 1024 px self-attention (L = 4096 with 10 heads, 1024 with 20), where chunked was faster.
    fits = lambda h, n, l: cpu_kernel.fused_backward_fits(torch.empty(1, h, n, 1), torch.empty(1, h, l, 1))  # noqa: E731
    assert fits(10, 1024, 1024) and fits(20, 256, 256) and fits(20, 1024, 77) and fits(10, 4096, 77)
    assert not fits(10, 4096, 4096) and not fits(20, 1024, 1024)
    calls = []
    real = dispatch.chunked_backward
    monkeypatch.setattr(dispatch, "chunked_backward", lambda *args: calls.append(1) or real(*args))
    q, k, v, a, gout = random_attention_inputs(1, 3, 12, 10, 8, seed=13)
    ref_out, ref_g = ref_grads(q, k, v, a, 0.3, None, gout)
    for limit, chunked in ((1 << 30, False), (0, True)):
        monkeypatch.setattr(cpu_kernel, "FUSED_BACKWARD_MAX_BYTES", limit)
        calls.clear()
        leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
        dc.mixed_attention(*leaves, scale=0.3, impl="cpu_fused").backward(gout)
        assert bool(calls) == chunked
        for got, exp in zip((t.grad for t in leaves), ref_g):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_saves_only_inputs_and_the_row_log_sum_exp():
    b, h, n, d = 1, 2, 256, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    a = (torch.eye(h) + 0.1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        dc.mixed_attention(q, k, v, a, impl="cpu_fused")
    assert (b, h, n) in saved and all(torch.Size(s).numel() <= b * h * n * d for s in saved)


def test_auto_uses_it_on_the_cpu_and_falls_back_where_it_cannot_build(monkeypatch):
    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL", raising=False)
    q, k, v, a, _ = random_attention_inputs(1, 3, 10, 12, 8, seed=14)
    a = a.requires_grad_()
    assert dc.select_impl(a) == "cpu_fused"
    expected = dc.mixed_attention(q, k, v, a, impl="chunked")
    torch.testing.assert_close(dc.mixed_attention(q, k, v, a), expected, rtol=1e-12, atol=1e-12)

    # A machine where the build failed: "auto" warns once and runs the chunked path; the explicit
    # impl and the trainer flag say why.
    monkeypatch.setitem(cpu_kernel._state, "loaded", False)
    monkeypatch.setitem(cpu_kernel._state, "error", "the fused CPU kernel could not be built: no compiler")
    monkeypatch.setattr(dispatch, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="could not be built: no compiler; mixed attention runs the chunked"):
        torch.testing.assert_close(dc.mixed_attention(q, k, v, a), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="impl='cpu_fused': .*no compiler"):
        dc.mixed_attention(q, k, v, a, impl="cpu_fused")
    # Preferred by a model's setting (set_coeff_attention_impl) it falls back like "auto", with the warning.
    monkeypatch.setattr(dispatch, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="could not be built: no compiler; mixed attention runs the chunked"):
        torch.testing.assert_close(dc.mixed_attention(q, k, v, a, prefer="cpu_fused"), expected, rtol=1e-12, atol=1e-12)

    from dreamcoeff.train.config import UsageError
    from dreamcoeff.train.runtime import select_attention_impl

    with pytest.raises(UsageError, match="--coeff_attention_impl cpu_fused: .*no compiler"):
        select_attention_impl("cpu_fused", torch.device("cpu"), torch.nn.Module())


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DREAMCOEFF_CPU_KERNEL", "0")
    assert "DREAMCOEFF_CPU_KERNEL=0" in cpu_kernel.unavailable_reason("cpu")
    q, k, v, a, _ = random_attention_inputs(1, 2, 5, 6, 4, seed=15)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        out = dc.mixed_attention(q, k, v, a)
    torch.testing.assert_close(out, dc.mixed_attention(q, k, v, a, impl="chunked"))
    assert "not on cuda" in cpu_kernel.unavailable_reason("cuda")


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed half-way leaves torch's lock file; without this every later start would wait on it."""
    import os
    import time

    import torch.utils.cpp_extension as ce

    monkeypatch.setattr(ce, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_kernel._clear_stale_lock("dreamcoeff_cpu_test")
    assert lock.exists()  # could be a build running right now
    old = time.time() - cpu_kernel.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    cpu_kernel._clear_stale_lock("dreamcoeff_cpu_test")
    assert not lock.exists()
