"""The attention processors that apply an attention module's alpha (``attn.head_mix``).

Both compute the heads' attention on the text / image tokens with the maps mixed by
A = I + c * dropout(alpha) where the module carries alpha, and exactly what `AttnProcessor2_0` does
where it does not (or where A is exactly I):

- `CoeffAttnProcessor`: diffusers' plain processor, and what it takes over from diffusers' sliced,
  fused-QKV and xformers processors (``slice_size``, ``fused``, ``plain_backend``), so
  `enable_attention_slicing`, `fuse_qkv_projections` and xformers keep alpha.
- `CoeffIPAdapterAttnProcessor`: IP-Adapter's processor (a subclass, so `set_ip_adapter_scale` and
  its weight names are unchanged) whose text branch is mixed by alpha; the image branch is
  IP-Adapter's own, unmixed: alpha was learned on the text-attention maps, and the image tokens'
  maps come from another projection (``to_k_ip``) that alpha never saw.
- `CoeffPAGAttnProcessor`: perturbed-attention guidance's identity self-attention processors
  (`PAGCFGIdentitySelfAttnProcessor2_0` / `PAGIdentitySelfAttnProcessor2_0`): the guided part of the
  batch (unconditional and text, or text alone) is attention mixed by alpha; the perturbed part is
  PAG's identity attention, ``to_out(to_v(x))``, which has no attention map, so there is nothing
  for alpha to mix there and it is PAG's own.

They hold no alpha, so diffusers may build them with no arguments (``processor.__class__()``, as
`load_ip_adapter` does) and swapping them never loses a trained parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from .attention import mixed_attention

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = ["CoeffAttnProcessor", "CoeffIPAdapterAttnProcessor", "CoeffPAGAttnProcessor", "PLAIN_BACKENDS"]

PLAIN_BACKENDS = ("sdpa", "xformers")


def _xformers_attention(query, key, value, mask):
    """xformers' memory-efficient attention on (B, H, N, d) tensors, imported lazily."""
    try:
        import xformers.ops as xops
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "xformers was asked for but is not installed: `pip install xformers` (CUDA only), "
            "or drop --enable_xformers_memory_efficient_attention."
        ) from exc
    b, h, n, _ = query.shape
    if mask is not None:
        mask = mask.expand(b, h, n, key.shape[-2])
    out = xops.memory_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=mask
    )
    return out.transpose(1, 2)


@dataclass
class _Heads:
    """One call's queries, keys and values split into heads, and what the output step needs back."""

    query: torch.Tensor  # (B, H, N, d)
    key: torch.Tensor  # (B, H, L, d)
    value: torch.Tensor  # (B, H, L, dv)
    mask: torch.Tensor | None
    residual: torch.Tensor
    input_shape: tuple[int, ...]
    batch_size: int


class _HeadMixingAttention:
    """What both processors share: diffusers' input steps, the (mixed) attention, the output steps."""

    #: Marks a processor that applies ``attn.head_mix`` (checked by dreamcoeff.processor's guard).
    applies_head_mix = True

    def _configure(self, slice_size: int | None, fused: bool, plain_backend: str) -> None:
        if plain_backend not in PLAIN_BACKENDS:
            raise ValueError(f"unknown attention backend {plain_backend!r}: use 'sdpa' or 'xformers'")
        if slice_size is not None and int(slice_size) < 1:
            raise ValueError(f"slice_size must be a positive number of heads, got {slice_size}")
        self.slice_size = None if slice_size is None else int(slice_size)
        self.fused = bool(fused)
        self.plain_backend = plain_backend
        # The processor this one took over from (restored by remove_coeff); never a registered submodule.
        self.__dict__["replaced"] = None

    def _heads(self, attn: Attention, hidden_states, encoder_hidden_states, attention_mask, temb) -> _Heads:
        """`AttnProcessor2_0`'s steps up to attention: spatial / group norm, 4-D input, the mask,
        q / k / v (through `to_q` / `to_k` / `to_v`, or the fused `to_qkv` / `to_kv`), norm_q / norm_k."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_shape = tuple(hidden_states.shape)
        if hidden_states.ndim == 4:
            b, c, h, w = input_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if self.fused and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif self.fused:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return _Heads(query, key, value, attention_mask, residual, input_shape, batch_size)

    def _plain(self, query, key, value, mask, scale: float) -> torch.Tensor:
        """Plain attention: SDPA (in slices of `slice_size` heads where slicing is on) or xformers."""
        if self.plain_backend == "xformers":
            return _xformers_attention(query, key, value, mask)
        if self.slice_size is None or self.slice_size >= query.shape[1]:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        parts = []
        for start in range(0, query.shape[1], self.slice_size):
            stop = start + self.slice_size
            part_mask = None if mask is None else mask[:, start:stop]  # (B, H, N, L) after `_heads`
            parts.append(
                F.scaled_dot_product_attention(
                    query[:, start:stop], key[:, start:stop], value[:, start:stop], attn_mask=part_mask, scale=scale
                )
            )
        return torch.cat(parts, dim=1)

    def _attend(self, attn: Attention, heads: _Heads, coeff_scale: float | None = None) -> torch.Tensor:
        """(B, H, N, dv) attention of these heads, mixed by the module's alpha where A != I
        (at strength `coeff_scale` where given: a direct call's override)."""
        head_mix = attn._modules.get("head_mix")
        coeff = None if head_mix is None else head_mix(coeff_scale)
        q, k, v, mask = heads.query, heads.key, heads.value, heads.mask
        if coeff is None:
            return self._plain(q, k, v, mask, attn.scale)
        coeff = coeff.to(q.device)
        mixed = lambda q, k, v, m: mixed_attention(
            q, k, v, coeff, attn.scale, m, head_mix.chunk_size, prefer=head_mix.attention_impl
        )
        if self.slice_size is None or q.shape[0] == 1:
            return mixed(q, k, v, mask)
        # Mixing needs every head of a query row at once, so slicing cannot split heads; it splits
        # the batch instead (the exact path already works in chunks of query rows).
        rows = [
            mixed(q[i : i + 1], k[i : i + 1], v[i : i + 1], None if mask is None else mask[i : i + 1])
            for i in range(q.shape[0])
        ]
        return torch.cat(rows, dim=0)

    @staticmethod
    def _output(attn: Attention, heads: _Heads, hidden_states: torch.Tensor) -> torch.Tensor:
        """`AttnProcessor2_0`'s steps after attention: heads joined, `to_out`, 4-D shape, residual, rescale."""
        hidden_states = hidden_states.to(heads.query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if len(heads.input_shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(heads.input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + heads.residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _joined(heads: _Heads, out: torch.Tensor) -> torch.Tensor:
        return out.transpose(1, 2).reshape(heads.batch_size, -1, out.shape[1] * out.shape[-1])


class CoeffAttnProcessor(_HeadMixingAttention):
    """Diffusers attention processor that applies the module's alpha (exact head-mixing attention).

    Computes O^h = sum_i A[h, i] softmax(Q^i K^i^T * attn.scale + mask) V^h with
    A = I + c * dropout(alpha) from ``attn.head_mix``, and honours everything `AttnProcessor2_0`
    does (spatial_norm, 4-D input, attention masks, group_norm, norm_cross, norm_q / norm_k, to_out,
    residual_connection, rescale_output_factor). On a module without alpha it is `AttnProcessor2_0`.

    Args:
        slice_size: heads per slice of plain attention (what `enable_attention_slicing` asked for);
            the mixed path slices the batch instead. None: no slicing.
        fused: read q / k / v from the fused `to_qkv` / `to_kv` (after `fuse_qkv_projections`).
        plain_backend: "sdpa" or "xformers": what runs where A is exactly I.
    """

    def __init__(self, slice_size: int | None = None, fused: bool = False, plain_backend: str = "sdpa"):
        self._configure(slice_size, fused, plain_backend)

    def __repr__(self) -> str:
        return f"CoeffAttnProcessor(slice_size={self.slice_size}, fused={self.fused}, plain_backend={self.plain_backend!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        coeff_scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention of `attn` on these hidden states, the heads' maps mixed by its alpha (diffusers' call)."""
        heads = self._heads(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._output(attn, heads, self._joined(heads, self._attend(attn, heads, coeff_scale)))


class CoeffIPAdapterAttnProcessor(_HeadMixingAttention, IPAdapterAttnProcessor2_0):
    """IP-Adapter's processor with the text branch mixed by the module's alpha.

    Same constructor, weights (``to_k_ip`` / ``to_v_ip``), ``scale`` and masks as
    `IPAdapterAttnProcessor2_0`; `taking_over` builds one that shares an existing processor's weights.
    """

    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=(4,), scale=1.0):
        IPAdapterAttnProcessor2_0.__init__(self, hidden_size, cross_attention_dim, num_tokens, scale)
        self._configure(None, False, "sdpa")

    @classmethod
    def taking_over(cls, ip: IPAdapterAttnProcessor2_0) -> CoeffIPAdapterAttnProcessor:
        """A processor sharing `ip`'s image projections and scales (no copy of the weights)."""
        with torch.device("meta"):  # the new projections are replaced at once: allocate nothing
            new = cls(ip.hidden_size, ip.cross_attention_dim, list(ip.num_tokens), list(ip.scale))
        new.to_k_ip, new.to_v_ip, new.scale = ip.to_k_ip, ip.to_v_ip, ip.scale
        return new

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | list | None = None,
        coeff_scale: float | None = None,
    ) -> torch.Tensor:
        """IP-Adapter's attention: text branch mixed by alpha, plus each image branch times its scale."""
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        elif encoder_hidden_states is not None:  # the old single-tensor form: image tokens at the end
            end = encoder_hidden_states.shape[1] - self.num_tokens[0]
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
        else:
            ip_hidden_states = []
        heads = self._heads(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = self._joined(heads, self._attend(attn, heads, coeff_scale)).to(heads.query.dtype)
        out = out + self._image_branches(attn, heads, ip_hidden_states, ip_adapter_masks)
        return self._output(attn, heads, out)

    def _image_branches(self, attn: Attention, heads: _Heads, ip_hidden_states, ip_adapter_masks) -> torch.Tensor:
        """Sum over the adapters of scale x attention to their image tokens (masked per image if asked)."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        if ip_adapter_masks is None:
            masks = [None] * len(self.scale)
        else:
            masks = (
                list(ip_adapter_masks) if isinstance(ip_adapter_masks, list) else list(ip_adapter_masks.unsqueeze(1))
            )
            if not len(masks) == len(self.scale) == len(ip_hidden_states):
                raise ValueError(
                    f"{len(masks)} ip_adapter_masks for {len(self.scale)} IP-Adapters and "
                    f"{len(ip_hidden_states)} image embeddings: give one mask entry per IP-Adapter"
                )
        total = torch.zeros((), dtype=heads.query.dtype, device=heads.query.device)
        for states, scale, to_k, to_v, mask in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip, masks):
            scales = scale if isinstance(scale, list) else [scale]
            if all(s == 0 for s in scales):
                continue
            images = [(states, scales[0], None)]
            if mask is not None:
                per_image = scales if len(scales) > 1 else scales * mask.shape[1]
                images = [(states[:, i], per_image[i], mask[:, i]) for i in range(mask.shape[1])]
            for image_states, image_scale, image_mask in images:
                key = to_k(image_states).view(heads.batch_size, -1, attn.heads, heads.query.shape[-1]).transpose(1, 2)
                value = to_v(image_states).view(heads.batch_size, -1, attn.heads, heads.query.shape[-1]).transpose(1, 2)
                # IP-Adapter's default score scale (1/sqrt(d)), as diffusers' processor uses
                branch = self._joined(heads, F.scaled_dot_product_attention(heads.query, key, value))
                branch = branch.to(heads.query.dtype)
                if image_mask is not None:
                    down = IPAdapterMaskProcessor.downsample(
                        image_mask, heads.batch_size, branch.shape[1], branch.shape[2]
                    )
                    branch = branch * down.to(dtype=branch.dtype, device=branch.device)
                total = total + image_scale * branch
        return total


class CoeffPAGAttnProcessor(_HeadMixingAttention):
    """PAG's identity self-attention processor with the guided branches mixed by the module's alpha.

    The batch is ``[unconditional, text, perturbed]`` (``cfg=True``, what
    `PAGCFGIdentitySelfAttnProcessor2_0` receives) or ``[text, perturbed]`` (``cfg=False``,
    `PAGIdentitySelfAttnProcessor2_0`). The guided part runs `CoeffAttnProcessor`'s attention (alpha
    applied); the perturbed part is PAG's identity attention ``to_out(to_v(group_norm(x)))``: every
    query attends only to itself, there is no map for alpha to mix, so it is PAG's output unchanged.
    Taken over only where `reproduces` holds, i.e. where PAG's guided branch is exactly the plain
    processor's (see there); elsewhere PAG's processor stays and alpha is reported not applied.
    """

    def __init__(self, cfg: bool = True):
        self._configure(None, False, "sdpa")
        self.cfg = bool(cfg)

    def __repr__(self) -> str:
        return f"CoeffPAGAttnProcessor(cfg={self.cfg})"

    @staticmethod
    def reproduces(attn: Attention) -> bool:
        """Whether PAG's processor on `attn` computes plain attention on its guided branch.

        PAG's processors skip ``norm_q`` / ``norm_k`` and ``attn.scale`` (they call SDPA with its
        default 1/sqrt(d)), apply ``spatial_norm`` before splitting the batch, and ignore
        ``encoder_hidden_states``; so they are reproduced only on self-attention without those
        (every SDXL UNet self-attention layer), never by changing what PAG computes."""
        head_dim = attn.inner_dim // attn.heads
        return (
            not attn.is_cross_attention
            and attn.spatial_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
            and abs(attn.scale - head_dim**-0.5) <= 1e-7 * head_dim**-0.5
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        coeff_scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """PAG's attention: the guided part mixed by alpha, the perturbed part PAG's identity attention."""
        parts = hidden_states.chunk(3 if self.cfg else 2)
        guided, perturbed = torch.cat(parts[:-1]), parts[-1]
        # PAG ignores encoder_hidden_states on these layers (self-attention only): so do we.
        heads = self._heads(attn, guided, None, attention_mask, temb)
        guided = self._output(attn, heads, self._joined(heads, self._attend(attn, heads, coeff_scale)))
        return torch.cat([guided, self._identity_attention(attn, perturbed, heads.query.dtype)])

    @staticmethod
    def _identity_attention(attn: Attention, hidden_states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """PAG's perturbed branch: attention with the identity map is the values themselves, then to_out."""
        residual, input_shape = hidden_states, tuple(hidden_states.shape)
        if hidden_states.ndim == 4:
            b, c, h, w = input_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = attn.to_v(hidden_states).to(dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(input_shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
