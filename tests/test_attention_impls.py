"""Every implementation `mixed_attention` can dispatch to, against an independent float64 reference.

The reference below is written from the formula with einsum and shares no code with dreamcoeff. Each
implementation is checked for outputs and for the gradients of q, k, v and the mixing matrix, with
additive and boolean masks, chunk sizes that do and do not divide N, cross-attention (L != N),
batch > 1, non-contiguous inputs (the processor's transposed views) and gradcheck in float64. The
dispatcher must take plain SDPA exactly where the mixing matrix is I and no gradient is wanted.
"""

import pytest
import torch
import torch.nn.functional as F

from dreamcoeff import attention as dc
from dreamcoeff.attention.chunked import ChunkedMixedAttention
from dreamcoeff.processor import CoeffAttnProcessor
from tests.attention_cases import attention_mask, random_attention_inputs, ref_grads, ref_mixed, two_attention_modules

# "sdpa" only for A == I: tested separately below. For "cpu_fused" the chunk is its block of query
# rows; tests/test_cpu_kernel.py shrinks its key tiles too.
DISPATCHABLE = ("chunked", "materialized", "cpu_fused")


@pytest.mark.parametrize("impl", DISPATCHABLE)
@pytest.mark.parametrize(
    "b,h,n,l,chunk",
    [
        (1, 3, 12, 12, 4),  # chunk divides N
        (2, 3, 13, 13, 5),  # chunk does not divide N, batch 2
        (2, 4, 11, 7, 3),  # cross-attention, L < N
        (1, 2, 5, 9, None),  # cross-attention, L > N, chunk from the budget
        (1, 3, 7, 6, 1),  # one row per chunk
        (2, 2, 6, 6, 100),  # chunk larger than N
    ],
)
@pytest.mark.parametrize("mask_kind", [None, "additive", "additive_keys", "bool"])
def test_float64_values_and_grads_match_reference(impl, b, h, n, l, chunk, mask_kind):
    q, k, v, a, gout = random_attention_inputs(b, h, n, l, 8)
    mask = attention_mask(mask_kind, b, h, n, l)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, scale=0.37, mask=mask, chunk_size=chunk, impl=impl)
    out.backward(gout)
    ref_out, ref_g = ref_grads(q, k, v, a, 0.37, mask, gout)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, got, exp in zip("qkva", (t.grad for t in leaves), ref_g):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", ["chunked", "cpu_fused"])
@pytest.mark.parametrize("chunk", [2, 5])
@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
def test_gradcheck_chunked(impl, chunk, mask_kind):
    q, k, v, a, _ = random_attention_inputs(2, 3, 5, 4, 3, seed=3)
    mask = attention_mask(mask_kind, 2, 3, 5, 4, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    fn = lambda q, k, v, a: dc.mixed_attention(q, k, v, a, scale=0.6, mask=mask, chunk_size=chunk, impl=impl)  # noqa: E731
    # fast_mode checks random directions (v^T J u) instead of every column of the Jacobian: the same
    # power to catch a wrong backward for a fraction of the forward evaluations.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("impl", ["chunked", "cpu_fused"])
def test_gradcheck_chunked_full_jacobian(impl):
    q, k, v, a, _ = random_attention_inputs(1, 2, 3, 4, 2, seed=10)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    fn = lambda q, k, v, a: dc.mixed_attention(q, k, v, a, scale=0.6, chunk_size=2, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["chunked", "cpu_fused"])
@pytest.mark.parametrize("needs", ["a", "v", "qk", "qa", "kv", "q", "k"])
def test_partial_gradients(impl, needs):
    """Only some inputs require grad (e.g. alpha-only training of a frozen projection): same grads."""
    q, k, v, a, gout = random_attention_inputs(1, 3, 9, 7, 4, seed=5)
    leaves = [t.clone().requires_grad_(name in needs) for name, t in zip("qkva", (q, k, v, a))]
    dc.mixed_attention(*leaves, scale=0.5, chunk_size=4, impl=impl).backward(gout)
    _, ref_g = ref_grads(q, k, v, a, 0.5, None, gout)
    for name, t, exp in zip("qkva", leaves, ref_g):
        if name in needs:
            torch.testing.assert_close(t.grad, exp, rtol=1e-9, atol=1e-10, msg=f"grad of {name}")
        else:
            assert t.grad is None


def test_non_contiguous_inputs_like_the_processor():
    """The processor passes (B, N, H, d) projections viewed as (B, H, N, d): transposed, not contiguous."""
    b, n, l, h, d = 2, 10, 6, 3, 4
    g = torch.Generator().manual_seed(6)
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, l, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(b, l, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    a = torch.eye(h, dtype=torch.float64) + 0.2 * torch.randn(h, h, generator=g, dtype=torch.float64)
    gout = torch.randn(b, n, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]  # clone keeps the strides
    assert not leaves[0].is_contiguous()
    out = dc.mixed_attention(*leaves, scale=0.4, chunk_size=3)
    out.backward(gout)
    ref_out, ref_g = ref_grads(q, k, v, a, 0.4, None, gout)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, exp in zip((t.grad for t in leaves), ref_g):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_against_float64(dtype):
    """fp32/bf16/fp16 activations: output in the input dtype, computed in float32 inside."""
    q, k, v, a, gout = random_attention_inputs(2, 4, 33, 20, 8, dtype=dtype, seed=7)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves, chunk_size=10)
    assert out.dtype == dtype
    out.backward(gout.to(dtype))
    ref_out, ref_g = ref_grads(q, k, v, a, 8**-0.5, None, gout.to(dtype))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(out, ref_out) < tol
    for name, got, exp in zip("qkva", (t.grad for t in leaves), ref_g):
        assert rel(got, exp) < 2 * tol, name


def test_float32_large_rows_accuracy():
    """A realistic row length (L = 300) in float32: relative error at float32 level."""
    q, k, v, a, gout = random_attention_inputs(1, 5, 64, 300, 16, dtype=torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
    out = dc.mixed_attention(*leaves)
    out.backward(gout.float())
    ref_out, ref_g = ref_grads(q, k, v, a, 0.25, None, gout)
    assert ((out.double() - ref_out).norm() / ref_out.norm()) < 1e-5
    for got, exp in zip((t.grad for t in leaves), ref_g):
        assert ((got.double() - exp).norm() / exp.norm()) < 1e-4


# --------------------------------------------------------------------------------------------------
# Dispatch


def test_auto_picks_sdpa_only_for_exact_identity_without_grad(monkeypatch):
    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL", raising=False)
    h = 3
    eye = torch.eye(h)
    assert dc.select_impl(eye) == "sdpa"
    assert dc.select_impl(eye + 1e-7 * torch.randn(h, h)) == "cpu_fused"  # the exact path, on the CPU
    assert dc.select_impl(eye.clone().requires_grad_()) == "cpu_fused"  # alpha = 0 still needs a gradient
    with torch.no_grad():
        assert dc.select_impl(eye.clone().requires_grad_()) == "sdpa"
    assert dc.select_impl(eye, "chunked") == "chunked"
    with pytest.raises(ValueError, match="unknown"):
        dc.select_impl(eye, "triton-please")


@pytest.mark.parametrize("mask_kind", [None, "additive_keys", "bool"])
def test_identity_fast_path_is_sdpa_and_exact(mask_kind, monkeypatch):
    q, k, v, a, _ = random_attention_inputs(2, 3, 9, 6, 4, dtype=torch.float32, identity=True)
    mask = attention_mask(mask_kind, 2, 3, 9, 6)
    mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.45)
    calls = []

    def no_chunked(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the exact path ran where A == I")

    monkeypatch.setattr(ChunkedMixedAttention, "apply", no_chunked)
    out = dc.mixed_attention(q, k, v, a, scale=0.45, mask=mask)
    assert not calls
    assert torch.equal(out, expected)  # bit for bit: it *is* SDPA
    # and it agrees with the exact formula
    torch.testing.assert_close(out.double(), ref_mixed(q, k, v, a, 0.45, mask), rtol=1e-5, atol=1e-5)


def test_sdpa_impl_refuses_a_non_identity_matrix():
    q, k, v, a, _ = random_attention_inputs(1, 2, 4, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly I"):
        dc.mixed_attention(q, k, v, a, impl="sdpa")


def test_processor_dispatches_to_sdpa_at_identity_and_to_the_exact_path_otherwise(monkeypatch):
    """CoeffAttnProcessor: alpha == 0 without grad (or strength 0) -> SDPA; training or alpha != 0 -> exact."""
    from diffusers.models.attention_processor import Attention

    import dreamcoeff.attn_processors as proc
    from dreamcoeff.head_mix import HeadMix

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=4, dim_head=4)
    p = HeadMix(4)
    attn.head_mix = p
    attn.set_processor(CoeffAttnProcessor())
    x = torch.randn(2, 6, 16)
    calls = []
    real = proc.mixed_attention
    monkeypatch.setattr(proc, "mixed_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    with torch.no_grad():
        attn(x)
    assert calls == []  # alpha == 0, inference: plain SDPA
    attn(x).sum().backward()
    assert calls == [1]  # alpha == 0 but trainable: exact path, so alpha gets its gradient
    assert p.alpha.grad is not None
    with torch.no_grad():
        p.alpha.add_(0.1)
        attn(x)
        assert calls == [1, 1]  # alpha != 0: exact path
        attn(x, coeff_scale=0.0)
        assert calls == [1, 1]  # strength 0: the base model, SDPA


def test_precedence_explicit_impl_then_preference_then_environment_then_default(monkeypatch):
    """impl= beats prefer= (a model's setting), which beats DREAMCOEFF_ATTENTION_IMPL, which beats the
    device default; all but an explicit impl apply only where A != I."""
    a = torch.eye(3) + 0.1
    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL", raising=False)
    assert dc.select_impl(a) == "cpu_fused"  # the default on the CPU
    assert dc.select_impl(a, prefer="auto") == "cpu_fused"  # "auto" is no preference
    monkeypatch.setenv("DREAMCOEFF_ATTENTION_IMPL", "materialized")
    assert dc.select_impl(a) == "materialized"  # the environment, where nothing else is said
    assert dc.select_impl(a, prefer="chunked") == "chunked"  # the model's setting comes first
    assert dc.select_impl(a, "cpu_fused", prefer="chunked") == "cpu_fused"  # an explicit impl first of all
    assert dc.select_impl(torch.eye(3), prefer="chunked") == "sdpa"  # A == I stays plain SDPA
    with pytest.raises(ValueError, match="unknown preferred mixed-attention impl 'sdpa'"):
        dc.select_impl(a, prefer="sdpa")  # only exact implementations can be preferred


def test_set_coeff_attention_impl_rejects_an_unknown_name():
    from dreamcoeff.processor import apply_coeff, set_coeff_attention_impl

    model = two_attention_modules()
    apply_coeff(model, targets="attn1")
    with pytest.raises(ValueError, match="unknown coeff attention impl 'fastest': use one of 'auto', 'chunked'"):
        set_coeff_attention_impl(model, "fastest")
    with pytest.raises(ValueError, match="'sdpa'"):
        set_coeff_attention_impl(model, "sdpa")
    assert model["attn1"].head_mix.attention_impl == "auto"  # unchanged


def test_the_setting_is_per_model_and_reaches_later_processors(monkeypatch):
    """A model set to "chunked" runs the chunked path; another model in the same process keeps "auto"
    (the fused CPU kernel here, where it builds); processors installed after the setting get it too."""
    from dreamcoeff.attention.cpu_kernel import unavailable_reason
    from dreamcoeff.processor import apply_coeff, coeff_parameters, set_coeff_attention_impl

    monkeypatch.delenv("DREAMCOEFF_ATTENTION_IMPL", raising=False)
    torch.manual_seed(0)
    chunked_model, auto_model = two_attention_modules(), two_attention_modules()
    for model in (chunked_model, auto_model):
        apply_coeff(model, targets="attn1")
        with torch.no_grad():
            for alpha in coeff_parameters(model):
                alpha.normal_(0, 0.1)  # A != I: the exact path
    set_coeff_attention_impl(chunked_model, "chunked")
    calls = []
    real = ChunkedMixedAttention.apply
    monkeypatch.setattr(ChunkedMixedAttention, "apply", lambda *args: calls.append(1) or real(*args))
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        chunked_model["attn1"](x)
        assert calls == [1]
        auto_model["attn1"](x)
        assert len(calls) == (1 if unavailable_reason("cpu") is None else 2)  # "auto": the fused kernel
    assert auto_model["attn1"].head_mix.attention_impl == "auto"
    apply_coeff(chunked_model, targets=("attn1", "attn2"))  # installed after the setting
    assert chunked_model["attn2"].head_mix.attention_impl == "chunked"
    apply_coeff(auto_model, targets=("attn1", "attn2"))
    assert auto_model["attn2"].head_mix.attention_impl == "auto"


# --------------------------------------------------------------------------------------------------
# Chunking


@pytest.mark.parametrize(
    "b,h,n,l,budget",
    [(1, 10, 4096, 4096, 32 * 2**20), (2, 20, 1024, 1024, 32 * 2**20), (2, 10, 4096, 77, 8 * 2**20), (1, 2, 10, 5, 1)],
)
def test_choose_chunk_size_within_budget_balanced_and_covering(b, h, n, l, budget):
    rows = dc.choose_chunk_size(b, h, n, l, budget_bytes=budget)
    assert 1 <= rows <= n
    assert rows >= min(n, dc.MIN_CHUNK_ROWS)
    if rows > dc.MIN_CHUNK_ROWS:
        assert b * h * rows * l * 4 <= budget
    n_chunks = -(-n // rows)
    last = n - (n_chunks - 1) * rows
    assert 0 < last <= rows and rows - last < n_chunks  # balanced: no small tail chunk


def test_chunk_budget_does_not_change_results():
    q, k, v, a, gout = random_attention_inputs(2, 3, 50, 40, 8, dtype=torch.float64, seed=9)
    outs = []
    for chunk in (None, 7, 16, 50):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, a)]
        out = dc.mixed_attention(*leaves, chunk_size=chunk)
        out.backward(gout)
        outs.append([out.detach()] + [t.grad for t in leaves])
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
