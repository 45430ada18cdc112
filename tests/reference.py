"""Independent float64 reference of Coeff-Tuning attention, written from the formula with einsum.

Deliberately shares no code with dreamcoeff: the tests compare the library against this.
"""

import torch


def reference_mixed_attention(q, k, v, coeff, scale, mask=None):
    """O^h = sum_i coeff[h, i] softmax(Q^i K^i^T * scale + mask) V^h, all in float64."""
    q, k, v, coeff = (t.double() for t in (q, k, v, coeff))
    scores = torch.einsum("bind,bild->binl", q, k) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, float("-inf")).double()
        scores = scores + mask.double()
    maps = torch.softmax(scores, dim=-1)
    return torch.einsum("hi,binl,bhld->bhnd", coeff, maps, v)


def reference_attention_module(attn, hidden, coeff, encoder_hidden=None, mask=None):
    """A diffusers `Attention` module's forward with mixed heads, from its weights, in float64.

    Handles 3-D input, attention masks given as (B, L) additive masks, residual_connection and
    rescale_output_factor; 4-D input with group_norm is handled by the caller's reshape.
    """
    h = attn.heads
    x = hidden.double()
    ctx = x if encoder_hidden is None else encoder_hidden.double()

    def lin(layer, t):
        return t @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)

    q, k, v = lin(attn.to_q, x), lin(attn.to_k, ctx), lin(attn.to_v, ctx)
    b, n, _ = q.shape
    d = q.shape[-1] // h
    q = q.view(b, n, h, d).transpose(1, 2)
    k = k.view(b, -1, h, d).transpose(1, 2)
    v = v.view(b, -1, h, d).transpose(1, 2)
    m = None if mask is None else mask.double()[:, None, None, :]
    out = reference_mixed_attention(q, k, v, coeff, attn.scale, m)
    out = out.transpose(1, 2).reshape(b, n, h * d)
    out = lin(attn.to_out[0], out)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor
