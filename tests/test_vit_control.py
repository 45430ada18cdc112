"""The ViT positive control's model (benchmarks/vit/vit.py): with alpha = 0 the mixed path is the
plain SDPA path, alpha gets a non-zero gradient, and a non-zero alpha changes the output."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "vit"))
import vit  # noqa: E402


def _pair():
    torch.manual_seed(0)
    plain = vit.ViT(5).double()
    mixed = vit.ViT(5).double()
    mixed.load_state_dict(plain.state_dict())
    mixed.enable_alpha()
    return plain, mixed.double()


def test_alpha_zero_equals_plain_attention_and_gets_gradients():
    plain, mixed = _pair()
    x = torch.randn(3, 3, vit.IMAGE, vit.IMAGE, dtype=torch.float64)
    ref = plain(x)
    out = mixed(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    grads = [b.attn.alpha.grad for b in mixed.blocks]
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert all(b.attn.alpha.shape == (vit.HEADS, vit.HEADS) for b in mixed.blocks)


def test_alpha_matches_hand_written_head_mixing():
    """One layer against an independent einsum: O^h = sum_i A[h, i] softmax(Q^i K^i^T s) V^h."""
    torch.manual_seed(1)
    layer = vit.Attention().double()
    layer.enable_alpha()
    with torch.no_grad():
        layer.alpha.normal_(0, 0.3)
    layer.eval()
    x = torch.randn(2, 7, vit.WIDTH, dtype=torch.float64)
    b, n, c = x.shape
    q, k, v = layer.qkv(x).view(b, n, 3, vit.HEADS, c // vit.HEADS).permute(2, 0, 3, 1, 4)
    maps = torch.softmax(q @ k.transpose(-1, -2) * (c // vit.HEADS) ** -0.5, -1)
    a = torch.eye(vit.HEADS, dtype=torch.float64) + layer.alpha
    mixed = torch.einsum("hi,binl->bhnl", a, maps) @ v
    ref = layer.proj(mixed.transpose(1, 2).reshape(b, n, c))
    # float32-level, not float64-level, agreement: the CPU's default exact path (the fused kernel)
    # gave differences of ~1e-8 on float64 inputs here, far above float64 rounding.
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.alpha.zero_()
    assert (layer(x) - ref).abs().max() > 1e-3  # the check can fail: alpha's mixing is visible


def test_ablation_kinds_restrict_alpha_as_documented():
    """The head-mixing ablation: 'diag' is a gain per head (head h's own output scaled by 1 + a_hh, no
    other head's map), 'offdiag' never scales a head's own map, 'zero_row_sum' keeps each head's total
    map weight at 1; each against an independent computation from the plain layer's heads."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, vit.WIDTH, dtype=torch.float64)
    b, n, c = x.shape
    plain = vit.Attention().double().eval()
    q, k, v = plain.qkv(x).view(b, n, 3, vit.HEADS, c // vit.HEADS).permute(2, 0, 3, 1, 4)
    maps = torch.softmax(q @ k.transpose(-1, -2) * (c // vit.HEADS) ** -0.5, -1)
    raw = torch.randn(vit.HEADS, vit.HEADS, dtype=torch.float64) * 0.3
    eye = torch.eye(vit.HEADS, dtype=torch.float64)
    wanted = {
        "diag": eye + torch.diag(torch.diagonal(raw)),
        "offdiag": eye + raw - torch.diag(torch.diagonal(raw)),
        "zero_row_sum": eye + raw - raw.mean(dim=1, keepdim=True),
    }
    for kind, a in wanted.items():
        layer = vit.Attention().double().eval()
        layer.load_state_dict(plain.state_dict(), strict=False)
        layer.enable_alpha(kind)
        with torch.no_grad():
            layer.alpha.copy_(raw)
        ref = plain.proj((torch.einsum("hi,binl->bhnl", a, maps) @ v).transpose(1, 2).reshape(b, n, c))
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6, msg=kind)
    assert torch.allclose(wanted["zero_row_sum"].sum(1), torch.ones(vit.HEADS, dtype=torch.float64))
    heads_out = torch.einsum("hi,binl->bhnl", wanted["diag"], maps) @ v
    torch.testing.assert_close(heads_out, (maps @ v) * (1 + torch.diagonal(raw)).view(1, -1, 1, 1))
