"""The fused Triton kernels (`dreamcoeff.attention.triton_kernels`), forward and backward, against an
independent float64 reference.

There is no GPU here, so the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy on the
CPU): the same kernel source, every load mask, block loop and dot, executed element for element. What
the interpreter cannot show is speed, register pressure and GPU-only compile limits; those need a
GPU (benchmarks/README.md says what has been measured there). Skipped where triton is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest.py sets it first; here for running this file alone

import pytest
import torch

pytest.importorskip("triton")

from dreamcoeff import attention as dc  # noqa: E402
from dreamcoeff.attention import triton_kernels as ta  # noqa: E402
from dreamcoeff.attention.core import as_additive_mask  # noqa: E402
from tests.attention_cases import (  # noqa: E402
    attention_mask,
    random_attention_inputs,
    ref_grads,
    ref_mixed,
    two_attention_modules,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel is tested in Triton's interpreter mode"
)


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize(
    "b,h,n,l,d,dv",
    [
        (1, 3, 16, 32, 16, 16),  # every size a multiple of the blocks
        (2, 5, 13, 20, 8, 8),  # N and L not multiples of the blocks, d below the 16-wide dot
        (1, 4, 40, 77, 24, 40),  # cross-attention to 77 tokens, d not a power of two, dv != d
        (1, 13, 18, 35, 64, 64),  # 13 heads of 64: padded to 16
        (2, 16, 5, 9, 16, 16),  # exactly 16 heads (no padding), fewer rows than a block
    ],
)
@pytest.mark.parametrize("mask_kind", [None, "additive", "additive_keys", "bool"])
def test_float32_forward_and_backward_match_float64_reference(b, h, n, l, d, dv, mask_kind):
    g = torch.Generator().manual_seed(b * 1000 + h * 100 + n)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, l, d, generator=g)
    v = torch.randn(b, h, l, dv, generator=g)
    a = torch.eye(h) + 0.3 * torch.randn(h, h, generator=g)  # negative coefficients too
    grad_out = torch.randn(b, h, n, dv, generator=g)
    mask = attention_mask(mask_kind, b, h, n, l)
    additive = as_additive_mask(mask, torch.float32)
    expected, expected_grads = ref_grads(q, k, v, a, 0.37, mask, grad_out)
    got, lse = ta.mixed_attention_forward(q, k, v, a, 0.37, additive, return_lse=True)
    assert got.shape == (b, h, n, dv) and got.dtype == torch.float32
    assert rel(got, expected) < 2e-6
    grads = ta.mixed_attention_backward(q, k, v, a, 0.37, additive, lse, grad_out)
    for name, got_grad, exp in zip("qkva", grads, expected_grads):
        assert got_grad.shape == exp.shape and rel(got_grad, exp) < 1e-5, name


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_block_sizes_do_not_change_the_result(block_m, block_n):
    q, k, v, a, _ = random_attention_inputs(2, 6, 45, 70, 16, dtype=torch.float32, seed=3)
    expected = ref_mixed(q, k, v, a, 0.25)
    got = ta.mixed_attention_forward(q, k, v, a, 0.25, block_m=block_m, block_n=block_n)
    assert rel(got, expected) < 2e-6


@pytest.mark.parametrize("group", [16, 32])
def test_output_head_groups(group):
    """20 heads pad to 32: in two groups of 16 output heads (the default) or one of 32, same result.
    (fp16: in float32 more than 16 heads do not fit a GPU program's shared memory, and are refused.)"""
    q, k, v, a, _ = random_attention_inputs(1, 20, 17, 21, 16, dtype=torch.float16, seed=11)
    got = ta.mixed_attention_forward(q, k, v, a, 0.25, group=group)
    assert rel(got, ref_mixed(q, k, v, a, 0.25)) < 2e-3
    with pytest.raises(ValueError, match="group must be"):
        ta.mixed_attention_forward(q, k, v, a, 0.25, group=8)


def test_non_contiguous_inputs_like_the_processor():
    """(B, N, H, d) projections viewed as (B, H, N, d): the kernel reads them through their strides."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 21, 3, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 30, 3, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 30, 3, 16, generator=g).transpose(1, 2)
    a = torch.eye(3) + 0.2 * torch.randn(3, 3, generator=g)
    assert not q.is_contiguous()
    assert rel(ta.mixed_attention_forward(q, k, v, a, 0.3), ref_mixed(q, k, v, a, 0.3)) < 2e-6


def test_fp16_keeps_a_diagonal_alpha_that_fp16_itself_would_round_away():
    """A = (1 + delta) I scales every output by exactly 1 + delta. With delta = 1.3e-3, fp16 (spacing
    2^-10 near 1) stores A's diagonal as 1 + 0.98e-3: a kernel mixing with fp16(A) loses a quarter of
    alpha's effect. The split A = hi + lo keeps it. The effect is read as the least-squares scale
    between the outputs with A and with I, which averages the fp16 rounding of each element away."""
    q, k, v, _, _ = random_attention_inputs(1, 4, 48, 64, 16, dtype=torch.float16, seed=5)
    delta = 1.3e-3
    assert (1 + delta) * torch.ones(1, dtype=torch.float16) == 1 + 2**-10  # what fp16 alone keeps

    def measured_delta(split):
        base = ta.mixed_attention_forward(q, k, v, torch.eye(4), 0.25, split_coeff=split).double()
        scaled = ta.mixed_attention_forward(q, k, v, (1 + delta) * torch.eye(4), 0.25, split_coeff=split).double()
        return ((scaled - base) * base).sum().item() / (base * base).sum().item()

    assert abs(measured_delta(True) - delta) < 0.05 * delta
    assert abs(measured_delta(False) - delta) > 0.2 * delta  # the test can tell the two apart
    q, k, v, a, _ = random_attention_inputs(1, 4, 24, 40, 16, dtype=torch.float16, seed=6)
    assert rel(ta.mixed_attention_forward(q, k, v, a, 0.25), ref_mixed(q, k, v, a, 0.25)) < 2e-3


@pytest.mark.skip(
    reason="Triton's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16); fp16 covers the same path"
)
def test_bfloat16_forward():  # pragma: no cover - kept as the check to run on a GPU
    q, k, v, a, _ = random_attention_inputs(1, 4, 24, 40, 16, dtype=torch.bfloat16, seed=7)
    assert rel(ta.mixed_attention_forward(q, k, v, a, 0.25), ref_mixed(q, k, v, a, 0.25)) < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive_keys"])
def test_impl_triton_values_and_gradients(mask_kind, dtype, tol):
    """mixed_attention(impl="triton") through autograd: output and every gradient as the reference.
    (fp16 runs the Triton backward; float32 the chunked one, as on a GPU.)"""
    q, k, v, a, gout = random_attention_inputs(2, 3, 19, 23, 16, dtype=dtype, seed=8)
    mask = attention_mask(mask_kind, 2, 3, 19, 23)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, scale=0.3, mask=mask, chunk_size=7, impl="triton")
    assert out.dtype == dtype
    out.backward(gout.to(dtype))
    ref_out, ref_g = ref_grads(q, k, v, a, 0.3, mask, gout.to(dtype))
    assert rel(out, ref_out) < tol / 5
    for name, got, exp in zip("qkva", (t.grad for t in leaves), ref_g):
        assert rel(got, exp) < tol, name


@pytest.mark.parametrize("group", [16, 32])
def test_fp16_gradients_with_20_heads(group):
    """SDXL's 20 heads (padded to 32) in fp16, the key-side and dQ kernels in groups of 16 or 32 heads."""
    q, k, v, a, gout = random_attention_inputs(1, 20, 17, 19, 16, dtype=torch.float16, seed=12)
    out, lse = ta.mixed_attention_forward(q, k, v, a, 0.3, return_lse=True)
    grads = ta.mixed_attention_backward(q, k, v, a, 0.3, None, lse, gout.half(), group=group)
    ref_out, ref_g = ref_grads(q, k, v, a, 0.3, None, gout.half())
    assert rel(out, ref_out) < 2e-3
    for name, got, exp in zip("qkva", grads, ref_g):
        assert got.dtype == (torch.float32 if name == "a" else torch.float16)
        assert rel(got, exp) < 3e-3, name


@pytest.mark.parametrize("needs", ["a", "qk", "v"])
def test_partial_gradients(needs):
    """Only some inputs want a gradient: those match the reference, the others stay None."""
    q, k, v, a, gout = random_attention_inputs(2, 3, 11, 9, 16, dtype=torch.float16, seed=13)
    leaves = [t.clone().requires_grad_(name in needs) for name, t in zip("qkva", (q, k, v, a))]
    dc.mixed_attention(*leaves, scale=0.5, impl="triton").backward(gout.half())
    _, ref_g = ref_grads(q, k, v, a, 0.5, None, gout.half())
    for name, t, exp in zip("qkva", leaves, ref_g):
        if name in needs:
            assert rel(t.grad, exp) < 3e-3, name
        else:
            assert t.grad is None


def test_broadcast_grad_out_from_sum():
    """out.sum().backward() hands the backward an expanded dO (every stride 0): read through strides."""
    q, k, v, a, _ = random_attention_inputs(1, 3, 9, 7, 16, dtype=torch.float16, seed=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    dc.mixed_attention(*leaves, impl="triton").sum().backward()
    _, ref_g = ref_grads(q, k, v, a, 0.25, None, torch.ones(1, 3, 9, 16, dtype=torch.float64))
    for name, t, exp in zip("qkva", leaves, ref_g):
        assert rel(t.grad, exp) < 3e-3, name


def test_a_gpu_too_small_for_the_tiles_falls_back_to_the_chunked_path(monkeypatch):
    """Consumer GPUs give a program 99 KiB of shared memory, some launches need up to 196 KiB.
    Chosen through a model's setting (prefer=, what set_coeff_attention_impl hands on), a layer whose
    forward does not fit runs the chunked path (one warning); an explicit impl="triton" raises. A
    backward that does not fit falls back either way."""
    q, k, v, a, gout = random_attention_inputs(1, 3, 9, 7, 16, dtype=torch.float16, seed=14)
    expected_out, expected_grads = ref_grads(q, k, v, a, 0.25, None, gout.half())

    def does_not_fit(*args, **kwargs):
        raise ta.KernelDoesNotFitError("out of resource: shared memory, Required: 200704, Hardware limit: 101376")

    with monkeypatch.context() as patch:
        patch.setattr(ta, "mixed_attention_forward", does_not_fit)
        with pytest.raises(ta.KernelDoesNotFitError):
            dc.mixed_attention(q, k, v, a, impl="triton")
        with pytest.warns(RuntimeWarning, match="runs the chunked path instead"):
            assert rel(dc.mixed_attention(q, k, v, a, prefer="triton"), expected_out) < 2e-3
    monkeypatch.setattr(ta, "mixed_attention_backward", does_not_fit)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, impl="triton")  # the (real) fused forward fits
    with pytest.warns(RuntimeWarning, match="backward of this layer runs the chunked path"):
        out.backward(gout.half())
    for name, t, exp in zip("qkva", leaves, expected_grads):
        assert rel(t.grad, exp) < 3e-3, name


def test_environment_variable_routes_auto_to_triton(monkeypatch):
    """DREAMCOEFF_ATTENTION_IMPL, set by a user, is what "auto" runs where A != I and nothing else chose."""
    a = torch.eye(3) + 0.1
    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL", raising=False)
    assert dc.select_impl(a) == "cpu_fused"  # unset: the fused C++ kernel on the CPU
    monkeypatch.setenv("DREAMCOEFF_ATTENTION_IMPL", "triton")
    assert dc.select_impl(a) == "triton"
    assert dc.select_impl(torch.eye(3)) == "sdpa"  # A == I stays plain SDPA
    q, k, v, _, _ = random_attention_inputs(1, 3, 10, 12, 16, dtype=torch.float32, seed=9)
    torch.testing.assert_close(dc.mixed_attention(q, k, v, a), dc.mixed_attention(q, k, v, a, impl="chunked"))
    # "auto" never fails: where the kernel cannot run (float64, or TRITON_INTERPRET unset on the CPU) it
    # falls back to the chunked path, while an explicit impl="triton" says why it cannot run.
    q64, k64, v64, a64, _ = random_attention_inputs(1, 3, 6, 5, 16, seed=10)
    torch.testing.assert_close(dc.mixed_attention(q64, k64, v64, a64), ref_mixed(q64, k64, v64, a64, 0.25))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(dc.mixed_attention(q, k, v, a), dc.mixed_attention(q, k, v, a, impl="chunked"))
    monkeypatch.setenv("DREAMCOEFF_ATTENTION_IMPL", "fastest")
    with pytest.raises(ValueError, match="DREAMCOEFF_ATTENTION_IMPL='fastest'"):
        dc.select_impl(a)


def test_model_setting_routes_auto_to_triton(monkeypatch):
    """set_coeff_attention_impl(model, "triton"): that model's coeff layers run the fused kernels where
    A != I, ahead of the environment variable; where the kernels cannot take the inputs, chunked."""
    from dreamcoeff.processor import apply_coeff, coeff_parameters, set_coeff_attention_impl

    monkeypatch.setenv("DREAMCOEFF_ATTENTION_IMPL", "chunked")  # the model's setting comes first
    calls = []
    real = ta.mixed_attention_forward
    monkeypatch.setattr(ta, "mixed_attention_forward", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    torch.manual_seed(3)
    model = two_attention_modules(heads=3, dim_head=16)
    apply_coeff(model, targets="attn1")
    with torch.no_grad():
        coeff_parameters(model)[0].normal_(0, 0.1)
    x = torch.randn(1, 10, 48)
    set_coeff_attention_impl(model, "triton")
    with torch.no_grad():
        fused = model["attn1"](x)
        assert calls == [1]
        set_coeff_attention_impl(model, "auto")  # no preference: the environment's "chunked"
        assert rel(model["attn1"](x), fused) < 1e-5
        assert calls == [1]
        set_coeff_attention_impl(model, "triton")
        model.double()  # float64: the kernels cannot take it, the chunked path runs
        model["attn1"](x.double())
        assert calls == [1]


class _Raising:
    """Stands in for a jitted kernel: kernel[grid](...) calls `fn`."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def test_clear_errors(monkeypatch):
    q, k, v, a, _ = random_attention_inputs(1, 2, 4, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32/float16/bfloat16.*impl='chunked'"):
        dc.mixed_attention(q, k, v, a, impl="triton")
    q20, k20, v20, a20, _ = random_attention_inputs(1, 20, 4, 4, 16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float32 with 20 heads.*bf16"):
        dc.mixed_attention(q20, k20, v20, a20, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        dc.mixed_attention(q.float(), k.float(), v.float(), a.float(), impl="triton")

    class OutOfResources(Exception):  # what triton raises when the tiles exceed shared memory
        pass

    def too_big(*args, **kwargs):
        raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    with monkeypatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setattr(ta, "_row_logsumexp_kernel", _Raising(too_big))
        with pytest.raises(RuntimeError, match="does not fit this GPU.*impl='chunked'"):
            ta.mixed_attention_forward(q.float(), k.float(), v.float(), a.float(), 0.5)
    monkeypatch.setattr(ta, "triton", None)
    assert "pip install triton" in ta.triton_unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="pip install triton"):
        ta.mixed_attention_forward(q.float(), k.float(), v.float(), a.float(), 0.5)


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_its_shared_memory(tmp_path):
    """The GPU compile (Triton -> PTX -> cubin with the ptxas in triton's wheel) of the default tiles,
    for SDXL's head counts in bf16/fp16/fp32: what the interpreter cannot check, without a GPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile_check.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, str(script), "--json", str(out)], capture_output=True, text=True, env=env, timeout=900
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())
    kernels = {row["kernel"] for row in rows}
    assert len(rows) == 29 and len(kernels) == 4, [row["launch"] for row in rows]
    for row in rows:
        assert row["registers"] <= 255 and row["shared_bytes"] <= 227 * 1024, row


def test_trainer_flag_sets_the_choice_on_the_unet_or_refuses_clearly(monkeypatch):
    """--coeff_attention_impl: 'chunked'/'triton' become the UNet's setting (set_coeff_attention_impl;
    the environment is never written); 'triton' where it cannot run is a usage error naming the
    reason, before any training."""
    from dreamcoeff.processor import apply_coeff
    from dreamcoeff.train.config import UsageError
    from dreamcoeff.train.runtime import select_attention_impl

    monkeypatch.setenv("DREAMCOEFF_ATTENTION_IMPL", "unset")  # so that teardown restores the original
    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL")
    unet = two_attention_modules()
    apply_coeff(unet, targets="attn1")
    head_mix = unet["attn1"].head_mix
    select_attention_impl("auto", torch.device("cpu"), unet)
    assert head_mix.attention_impl == "auto"
    select_attention_impl("chunked", torch.device("cpu"), unet)
    assert head_mix.attention_impl == "chunked"
    select_attention_impl("triton", torch.device("cpu"), unet)  # TRITON_INTERPRET=1 here: it can run
    assert head_mix.attention_impl == "triton"
    assert "DREAMCOEFF_ATTENTION_IMPL" not in os.environ
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="--coeff_attention_impl triton: .*CUDA tensors"):
        select_attention_impl("triton", torch.device("cpu"), unet)
    monkeypatch.setattr(ta, "triton", None)
    with pytest.raises(UsageError, match="pip install triton"):
        select_attention_impl("triton", torch.device("cuda"), unet)
