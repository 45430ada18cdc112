"""The mixed-attention math against the independent float64 reference: values, gradients, chunking,
coefficient dropout, and memory that is bounded by the chunk rather than by N."""

import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dreamcoeff import CoeffAttnProcessor, coefficient_matrix, mixed_attention
from dreamcoeff.head_mix import HeadMix
from tests.reference import reference_attention_module, reference_mixed_attention


def _qkv(b=2, h=3, n=10, l=7, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return mk(b, h, n, d), mk(b, h, l, d), mk(b, h, l, d), torch.eye(h, dtype=dtype) + 0.5 * mk(h, h)


@pytest.mark.parametrize("n,l", [(10, 7), (16, 16), (5, 77)])
@pytest.mark.parametrize("chunk", [None, 3, 4, 1000])
def test_matches_reference(n, l, chunk):
    q, k, v, a = _qkv(n=n, l=l)
    out = mixed_attention(q, k, v, a, scale=0.37, chunk_size=chunk)
    ref = reference_mixed_attention(q, k, v, a, 0.37)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_float32_relative_error():
    q, k, v, a = _qkv(n=33, l=21, d=8, dtype=torch.float32)
    out = mixed_attention(q, k, v, a, scale=8**-0.5, chunk_size=5)
    ref = reference_mixed_attention(q, k, v, a, 8**-0.5)
    assert ((out.double() - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize("kind", ["additive_row", "additive_full", "bool"])
def test_masks(kind):
    q, k, v, a = _qkv(n=9, l=6)
    g = torch.Generator().manual_seed(1)
    if kind == "additive_row":
        mask = torch.randn(2, 1, 1, 6, generator=g, dtype=torch.float64)
    elif kind == "additive_full":
        mask = torch.randn(2, 3, 9, 6, generator=g, dtype=torch.float64)
    else:
        mask = torch.rand(2, 1, 9, 6, generator=g) > 0.3
        mask[..., 0] = True  # no fully masked row
    out = mixed_attention(q, k, v, a, scale=0.5, mask=mask, chunk_size=4)
    ref = reference_mixed_attention(q, k, v, a, 0.5, mask)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [2, 3, 10])
def test_gradcheck(chunk):
    q, k, v, a = (t.clone().requires_grad_() for t in _qkv(b=1, h=3, n=7, l=5, d=3))
    mask = torch.randn(1, 1, 1, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v, a: mixed_attention(q, k, v, a, scale=0.4, mask=mask, chunk_size=chunk), (q, k, v, a)
    )


def test_gradients_match_reference_and_chunking():
    base = _qkv(n=13, l=11)
    grads = {}
    for chunk in (None, 4, 5, 13):
        q, k, v, a = (t.clone().requires_grad_() for t in base)
        out = mixed_attention(q, k, v, a, scale=0.3, chunk_size=chunk)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[chunk] = [t.grad for t in (q, k, v, a)]
    q, k, v, a = (t.clone().requires_grad_() for t in base)
    out = reference_mixed_attention(q, k, v, a, 0.3)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    expected = [t.grad for t in (q, k, v, a)]
    for chunk, got in grads.items():
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-9, atol=1e-11), chunk


def test_half_precision_inputs_compute_in_float32():
    q, k, v, a = _qkv(n=12, l=12, d=8, dtype=torch.float32)
    out = mixed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), a, scale=8**-0.5)
    assert out.dtype == torch.bfloat16
    ref = reference_mixed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), a, 8**-0.5)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_coefficient_dropout():
    alpha = torch.full((6, 6), 0.5)
    eye = torch.eye(6)
    # eval: no dropout at all
    assert torch.equal(coefficient_matrix(alpha, 1.0, dropout=0.5, training=False), eye + alpha)
    # training: the identity is never touched, dropped entries are exactly I's, kept ones rescaled
    torch.manual_seed(0)
    samples = torch.stack([coefficient_matrix(alpha, 1.0, dropout=0.5, training=True) for _ in range(4000)])
    residual = samples - eye
    assert set(residual.unique().tolist()) == {0.0, 1.0}  # 0 (dropped) or 0.5 / (1 - 0.5)
    assert ((residual == 0).float().mean() - 0.5).abs() < 0.02
    # expectation preserved: E[A] = I + alpha
    assert torch.allclose(samples.mean(0), eye + alpha, atol=0.03)
    # the diagonal of I survives even where alpha's diagonal is dropped
    assert (samples.diagonal(dim1=1, dim2=2) >= 1.0).all()
    # strength scales only the residual
    assert torch.allclose(coefficient_matrix(alpha, 0.0), eye)
    assert torch.allclose(coefficient_matrix(alpha, 2.0), eye + 2 * alpha)
    assert torch.equal(coefficient_matrix(alpha), eye + alpha)  # full strength unless told


def test_coefficient_dropout_uses_its_own_rate():
    """A rate other than torch's default 0.5 (mutation testing found p could be dropped unnoticed)."""
    alpha = torch.full((40, 40), 0.9)
    torch.manual_seed(0)
    residual = torch.stack([coefficient_matrix(alpha, 1.0, dropout=0.1, training=True) for _ in range(200)])
    residual -= torch.eye(40)
    assert abs((residual == 0).float().mean().item() - 0.1) < 0.01  # 320,000 draws: sd 0.0005
    assert torch.allclose(residual[residual != 0], torch.tensor(0.9 / 0.9))  # kept entries scaled by 1/(1-p)


def test_dropout_in_processor_only_in_training():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=4, dim_head=4)
    proc = HeadMix(4, dropout=0.9)
    attn.head_mix = proc  # alpha lives on the module
    attn.set_processor(CoeffAttnProcessor())
    with torch.no_grad():
        proc.alpha.normal_(0, 0.5)
    x = torch.randn(2, 5, 16)
    attn.eval()
    with torch.no_grad():
        a, b = attn(x), attn(x)
    assert torch.equal(a, b)
    attn.train()
    with torch.no_grad():
        c = attn(x)
    assert not torch.allclose(a, c)


def _module(**kw):
    torch.manual_seed(0)
    return Attention(**kw).double()


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_processor_matches_reference(cross, with_mask):
    attn = _module(query_dim=16, heads=4, dim_head=4, cross_attention_dim=12 if cross else None, bias=True)
    proc = HeadMix(4).double()
    attn.head_mix = proc  # alpha lives on the module
    attn.set_processor(CoeffAttnProcessor())
    with torch.no_grad():
        proc.alpha.copy_(torch.randn(4, 4, dtype=torch.float64) * 0.7)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    ctx = torch.randn(2, 6, 12, dtype=torch.float64) if cross else None
    length = 6 if cross else 9
    mask = None
    if with_mask:
        mask = torch.zeros(2, length, dtype=torch.float64)
        mask[0, -2:] = -10000.0  # diffusers-style additive padding mask
    out = attn(x, encoder_hidden_states=ctx, attention_mask=None if mask is None else mask[:, None, :])
    ref = reference_attention_module(attn, x, torch.eye(4, dtype=torch.float64) + proc.alpha, ctx, mask)
    assert ((out - ref).norm() / ref.norm()) <= 1e-10


def test_processor_4d_input_group_norm_residual_rescale():
    # VAE-style attention: 4-D input, group norm, residual connection, output rescale.
    attn = _module(
        query_dim=8,
        heads=2,
        dim_head=4,
        norm_num_groups=2,
        residual_connection=True,
        rescale_output_factor=1.7,
        bias=True,
    )
    proc = HeadMix(2).double()
    attn.head_mix = proc  # alpha lives on the module
    attn.set_processor(CoeffAttnProcessor())
    with torch.no_grad():
        proc.alpha.copy_(torch.tensor([[0.3, -0.8], [0.5, 0.2]], dtype=torch.float64))
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    out = attn(x)
    seq = x.view(2, 8, 15).transpose(1, 2)
    normed = attn.group_norm(seq.transpose(1, 2)).transpose(1, 2)
    # reference: run on the normed sequence, residual from the raw input
    no_res = reference_attention_module(attn, normed, torch.eye(2, dtype=torch.float64) + proc.alpha)
    no_res = no_res * attn.rescale_output_factor
    if attn.residual_connection:
        no_res = no_res - normed  # reference_attention_module added the normed input, undo
    expected = (no_res.transpose(1, 2).reshape(2, 8, 3, 5) + x) / attn.rescale_output_factor
    assert ((out - expected).norm() / expected.norm()) <= 1e-10


def test_processor_norm_cross_and_qk_norm():
    attn = _module(
        query_dim=16,
        heads=4,
        dim_head=4,
        cross_attention_dim=12,
        cross_attention_norm="layer_norm",
        qk_norm="layer_norm",
    )
    default_out = None
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ctx = torch.randn(2, 6, 12, dtype=torch.float64)
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn.set_processor(AttnProcessor2_0())
    default_out = attn(x, encoder_hidden_states=ctx)
    proc = HeadMix(4).double()
    attn.head_mix = proc  # alpha lives on the module
    attn.set_processor(CoeffAttnProcessor())
    with torch.no_grad():
        assert torch.allclose(attn(x, encoder_hidden_states=ctx), default_out, atol=1e-12)
        # with mixing: compare against the library math fed with the module's own normalised q, k
        proc.alpha.fill_(0.2)
        out = attn(x, encoder_hidden_states=ctx)
        c = attn.norm_encoder_hidden_states(ctx)
        q = attn.norm_q(attn.to_q(x).view(2, 5, 4, 4).transpose(1, 2))
        k = attn.norm_k(attn.to_k(c).view(2, 6, 4, 4).transpose(1, 2))
        v = attn.to_v(c).view(2, 6, 4, 4).transpose(1, 2)
        o = reference_mixed_attention(q, k, v, torch.eye(4, dtype=torch.float64) + 0.2, attn.scale)
        expected = attn.to_out[0](o.transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, expected, atol=1e-12)


def test_saved_tensors_hold_no_maps():
    """Autograd keeps only the inputs for backward: nothing of size N x L."""
    b, h, n, d = 1, 2, 512, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    a = (torch.eye(h) + 0.1).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixed_attention(q, k, v, a, chunk_size=64)
    assert saved and max(saved) <= b * h * n * d


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from dreamcoeff.attention import mixed_attention, materialized_mixed_attention
    torch.set_num_threads(1)
    b, h, n, d = 1, 2, int(sys.argv[2]), 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    a = (torch.eye(h) + 0.1).requires_grad_()
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # Reset the peak-RSS counter (VmHWM) so that import-time peaks do not hide ours.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS:")
    if sys.argv[1] == "naive":
        out = materialized_mixed_attention(q, k, v, a)
    else:
        out = mixed_attention(q, k, v, a, chunk_size=int(sys.argv[1]), impl=sys.argv[3])
    out.square().sum().backward()
    print(status("VmHWM:") - before)
    """
)


def _peak_extra_bytes(chunk: str, n: int, impl: str = "chunked") -> int:
    cmd = [sys.executable, "-c", _PEAK_SCRIPT, chunk, str(n), impl]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_bounded_by_chunk_not_n():
    n = 4096
    full_map = 2 * n * n * 4  # one B x H x N x L float32 map
    small, large, naive = _peak_extra_bytes("128", n), _peak_extra_bytes("1024", n), _peak_extra_bytes("naive", n)
    block = lambda rows: 2 * rows * n * 4  # noqa: E731 - one chunk's block
    # a handful of chunk blocks (scores, probs, mixed, grads) and nothing of size N x L
    assert small < 6 * block(128) + 8 * 2**20, small
    assert small < full_map / 4
    assert large > small  # grows with the chunk
    assert naive > 2 * full_map  # the materialised path holds several full maps
    # The fused CPU kernel: per-thread blocks of 64 (forward) / 32 (backward) rows, nothing of N x L.
    fused = _peak_extra_bytes("0", n, "cpu_fused")
    assert fused < 6 * block(64) + 8 * 2**20, fused
    assert fused < full_map / 4


def test_chunked_mixes_every_batch_element_values_and_gradients():
    """Batch > 1 takes the batched GEMM (a batch of 1 the plain one): forward and backward of the
    chunked path against the float64 reference."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(3, 4, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    coeff = (torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    out = mixed_attention(q, k, v, coeff, scale=0.4, chunk_size=3, impl="chunked")
    ref = reference_mixed_attention(q, k, v, coeff, 0.4)
    assert torch.allclose(out, ref, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, coeff))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v, coeff))
    assert all(torch.allclose(g, e, atol=1e-10) for g, e in zip(grads, expected))
