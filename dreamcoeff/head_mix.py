"""`HeadMix`: one attention layer's alpha, living on the diffusers `Attention` module itself.

alpha is a property of the model, like a LoRA's weights, not of the code that happens to compute
attention. So it lives on the attention module as the submodule ``attn.head_mix`` (parameter name
``<module path>.head_mix.alpha``), and processors only read it. Whatever swaps a processor
(attention slicing, fused QKV, IP-Adapter, xformers, a user's ``set_attn_processor``) leaves alpha
in place; `dreamcoeff.processor` then either keeps applying it or says out loud that it cannot
(docs/DESIGN.md, "Where alpha lives").

`CoeffStrength` is alpha's strength, one value object: a global scale times per-target factors
(self- / cross-attention, the UNet's block groups), optionally overridden for one UNet call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from .attention import EXACT_IMPLS, coefficient_matrix

__all__ = ["HeadMix", "CoeffStrength", "COEFF_TARGETS", "check_target_scales", "target_scale_of"]

#: What a strength can dose by target: self- / cross-attention, and the UNet's block groups.
COEFF_TARGETS = ("attn1", "attn2", "down_blocks", "mid_block", "up_blocks")


def check_target_scales(target_scales: Mapping[str, float] | None) -> dict[str, float]:
    """The target scales as floats; unknown target names are a ValueError listing the known ones."""
    unknown = sorted(set(target_scales or {}) - set(COEFF_TARGETS))
    if unknown:
        raise ValueError(f"unknown coeff targets {unknown}: use {', '.join(COEFF_TARGETS)}")
    return {k: float(v) for k, v in (target_scales or {}).items()}


def target_scale_of(module_path: str, target_scales: Mapping[str, float] | None) -> float:
    """A module's strength factor: the product of every target in `target_scales` that names it
    (``attn1`` / ``attn2`` by the module's last name, block groups by its first)."""
    factor = 1.0
    for target, value in (target_scales or {}).items():
        kind = module_path.rsplit(".", 1)[-1] if target in ("attn1", "attn2") else module_path.split(".", 1)[0]
        if kind == target:
            factor *= float(value)
    return factor


@dataclass(frozen=True)
class CoeffStrength:
    """alpha's strength c for every layer: ``scale`` x the product of the ``targets`` naming the layer.

    The precedence rule, written once (`for_call`): a UNet call's ``coeff_scale`` replaces ``scale``
    and its ``coeff_target_scales`` replace ``targets``, each only where given; the stored strength
    comes back after the call. Composition weights of several alpha files are not here: they are
    summed into alpha when the files are loaded (`dreamcoeff.weights.load_coeff_weights`).
    """

    scale: float = 1.0
    targets: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "targets", MappingProxyType(check_target_scales(self.targets)))

    def of_layer(self, module_path: str) -> float:
        """The strength of the attention module at `module_path`."""
        return self.scale * target_scale_of(module_path, self.targets)

    def replaced(self, scale: float | None = None, targets: Mapping[str, float] | None = None) -> CoeffStrength:
        """This strength with `scale` and / or `targets` replaced where given (None keeps the current)."""
        return CoeffStrength(
            self.scale if scale is None else scale, dict(self.targets) if targets is None else dict(targets)
        )

    for_call = replaced  # a call's cross_attention_kwargs override the stored strength by the same rule


class HeadMix(nn.Module):
    """alpha of one attention layer (H x H, zero at the start) and how to apply it.

    ``forward()`` returns the mixing matrix A = I + c * dropout(alpha) of this call, or None where A
    is exactly I (c == 0, or alpha all zero and no gradient wanted) so that the processor runs plain
    attention. Computing A in ``forward`` (rather than reading ``alpha`` from outside) is what lets
    accelerate's offload hooks bring alpha to the execution device for the call.

    dtype policy: alpha stays float32 when the model is cast to fp16 / bf16 (``pipe.to(torch.float16)``,
    ``unet.half()``); it follows device moves, and float64 casts (exactness tests).

    Attributes that survive every processor swap, because they live here:
        dropout: coefficient dropout on alpha's entries (training mode only).
        strength: this layer's strength from the stored `CoeffStrength` (set by `set_coeff_strength`).
        call_strength: the current UNet call's strength (from ``cross_attention_kwargs``), or None.
        attention_impl: the preferred exact implementation where A != I ("auto": none).
        chunk_size: query rows per chunk of the exact path (None: chosen from the shapes).
    """

    def __init__(self, num_heads: int, dropout: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = int(num_heads)
        self.dropout = 0.0
        self.set_dropout(dropout)
        self.strength = 1.0
        self.call_strength: float | None = None
        self.attention_impl = "auto"
        self.chunk_size = chunk_size
        self.alpha = nn.Parameter(torch.zeros(num_heads, num_heads, dtype=torch.float32))

    def set_dropout(self, dropout: float) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"coefficient dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)

    def set_attention_impl(self, impl: str) -> None:
        if impl not in ("auto", *EXACT_IMPLS):
            names = ", ".join(repr(name) for name in ("auto", *EXACT_IMPLS))
            raise ValueError(f"unknown coeff attention impl {impl!r}: use one of {names}")
        self.attention_impl = impl

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, strength={self.strength}"

    def _apply(self, fn, recurse: bool = True):
        # Follow device moves and float64, but never go below float32 (the mixing's own precision).
        super()._apply(fn, recurse)
        if self.alpha.dtype not in (torch.float32, torch.float64):
            self.alpha.data = self.alpha.data.float()
        return self

    def current_strength(self) -> float:
        """The strength of this call: the call's override where one is set, else the stored one."""
        return self.strength if self.call_strength is None else self.call_strength

    def forward(self, strength: float | None = None) -> torch.Tensor | None:
        """A for this call (at `strength` if given, else `current_strength()`), or None where A is exactly I."""
        strength = self.current_strength() if strength is None else float(strength)
        if strength == 0.0:
            return None
        if not torch.compiler.is_compiling() and not (self.alpha.requires_grad and torch.is_grad_enabled()):
            # Checked on every call, no caching on the version counter: writes through `.data`, as
            # some optimizers do, would not bump it and a stale answer would silently drop alpha.
            # Under torch.compile the check would break the graph; the exact path runs instead.
            if not bool(self.alpha.detach().any()):
                return None
        return coefficient_matrix(self.alpha, strength, self.dropout, self.training)
