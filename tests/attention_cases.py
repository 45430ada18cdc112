"""Attention test cases shared by the implementation tests: a float64 reference written from the formula
(einsum, no code shared with dreamcoeff), random inputs and masks, and the smallest model the processor
functions take. Support module, not a test file: test files import from here, never from each other.
"""

import torch


def ref_mixed(q, k, v, coeff, scale, mask=None):
    """O^h = sum_i coeff[h, i] softmax(Q^i K^i^T scale + M) V^h in float64 (boolean mask: True = keep)."""
    q, k, v, coeff = (t.detach().double() for t in (q, k, v, coeff))
    s = torch.einsum("bind,bild->binl", q, k) * scale
    if mask is not None:
        s = s + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask).double()
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hi,binl,bhld->bhnd", coeff.double(), p, v)


def ref_grads(q, k, v, coeff, scale, mask, grad_out):
    """Reference output and the float64 autograd gradients of q, k, v and coeff."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, coeff)]
    with torch.enable_grad():
        s = torch.einsum("bind,bild->binl", leaves[0], leaves[1]) * scale
        if mask is not None:
            s = s + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask).double()
        out = torch.einsum("hi,binl,bhld->bhnd", leaves[3], torch.softmax(s, dim=-1), leaves[2])
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in leaves]


def random_attention_inputs(b, h, n, l, d, dtype=torch.float64, seed=0, identity=False):
    """[q, k, v] in `dtype`, a mixing matrix near I (exactly I with `identity`) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, l, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, l, d, generator=g, dtype=torch.float64)
    a = torch.eye(h, dtype=torch.float64)
    if not identity:
        a = a + 0.3 * torch.randn(h, h, generator=g, dtype=torch.float64)  # negative entries too
    gout = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)] + [a.to(torch.float64 if dtype == torch.float64 else torch.float32), gout]


def attention_mask(kind, b, h, n, l, seed=1):
    """None, or a random mask of `kind`: "additive" (per row and head), "additive_keys" (key padding), "bool"."""
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "additive":  # per query row and head, finite
        return torch.randn(b, h, n, l, generator=g, dtype=torch.float64) * 2
    if kind == "additive_keys":  # key padding as diffusers builds it: (B, 1, 1, L), -10000 on padded keys
        m = torch.zeros(b, 1, 1, l, dtype=torch.float64)
        m[..., l // 2 + 1 :] = -10000.0
        return m
    if kind == "bool":  # keep-mask per row; every row keeps its first key so no row is all -inf
        keep = torch.rand(b, 1, n, l, generator=g) > 0.4
        keep[..., 0] = True
        return keep
    raise ValueError(kind)


def two_attention_modules(heads=3, dim_head=4):
    """The smallest 'model' the processor functions take: two attention modules named like a UNet's."""
    from diffusers.models.attention_processor import Attention

    width = heads * dim_head
    return torch.nn.ModuleDict(
        {name: Attention(query_dim=width, heads=heads, dim_head=dim_head) for name in ("attn1", "attn2")}
    )
