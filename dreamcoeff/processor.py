"""`CoeffAttnProcessor` and installing, removing and configuring it on a diffusers UNet.

A diffusers attention processor is the extension point: `Attention.forward` hands it the module and
the hidden states. Ours is an `nn.Module`, so `alpha` is a real parameter that `unet.parameters()`,
optimizers, accelerate and DDP see, under the name `<module path>.processor.alpha`.

The processor computes q, k, v through `attn.to_q` / `to_k` / `to_v` and projects through
`attn.to_out`, so PEFT LoRA adapters on those layers compose with alpha with no extra code.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import EXACT_IMPLS, coefficient_matrix, mixed_attention

if TYPE_CHECKING:  # for the annotations only: importing diffusers' pipelines is slow
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

__all__ = [
    "CoeffAttnProcessor",
    "apply_coeff",
    "install_coeff_processors",
    "remove_coeff",
    "coeff_parameters",
    "coeff_state_dict",
    "coeff_modules",
    "set_coeff_scale",
    "zero_row_sums_",
    "set_plain_attention_backend",
    "set_coeff_attention_impl",
    "set_coeff_target_scales",
    "COEFF_TARGETS",
    "unwrap_unet",
    "attention_modules",
]

_HOOK_ATTR = "_dreamcoeff_scale_hooks"
# The UNet's `set_coeff_attention_impl` setting, for processors installed after it was made.
_IMPL_ATTR = "_dreamcoeff_attention_impl"
_ATTENTION_IMPL_CHOICES = ("auto", *EXACT_IMPLS)


def _xformers_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """xformers' memory-efficient attention on (B, H, N, d) tensors, imported lazily."""
    try:
        import xformers.ops as xops
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "xformers was asked for but is not installed: `pip install xformers` (CUDA only), "
            "or drop --enable_xformers_memory_efficient_attention."
        ) from exc
    b, h, n, d = query.shape
    if mask is not None:
        mask = mask.expand(b, h, n, key.shape[-2])
    out = xops.memory_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=mask
    )
    return out.transpose(1, 2)


class CoeffAttnProcessor(nn.Module):
    """Diffusers attention processor for Coeff-Tuning (exact head-mixing attention).

    Computes O^h = sum_i A[h, i] softmax(Q^i K^i^T * attn.scale + mask) V^h with
    A = I + scale * dropout(alpha), and honours everything `AttnProcessor2_0` does
    (spatial_norm, 4-D input, attention masks, group_norm, norm_cross, norm_q/norm_k,
    to_out, residual_connection, rescale_output_factor).

    Args:
        num_heads: heads of the attention module; `alpha` is num_heads x num_heads.
        dropout: coefficient dropout probability on alpha's elements (training mode only).
        scale: run-time strength c (0 gives the base model, >1 exaggerates).
        chunk_size: query rows per chunk of the exact path (None: chosen from the shapes).

    `attention_impl` ("auto" unless `set_coeff_attention_impl` chose one) is handed to
    `mixed_attention` as the preferred exact implementation where A != I.
    """

    def __init__(self, num_heads: int, dropout: float = 0.0, scale: float = 1.0, chunk_size: int | None = None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"coefficient dropout must be in [0, 1), got {dropout}")
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.scale = float(scale)
        self.chunk_size = chunk_size
        # "sdpa" or "xformers": what runs where A is exactly I (the fast path).
        self.plain_backend = "sdpa"
        # The preferred exact implementation where A != I ("auto": none; see set_coeff_attention_impl).
        self.attention_impl = "auto"
        # Strength for the current UNet call, set from cross_attention_kwargs by a UNet hook.
        self.call_scale: float | None = None
        # Dose by target (set_coeff_target_scales): multiplies the strength; the call's, if given, wins.
        self.target_scale = 1.0
        self.call_target_scale: float | None = None
        self.alpha = nn.Parameter(torch.zeros(num_heads, num_heads, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, scale={self.scale}"

    def is_identity(self, strength: float) -> bool:
        """True where A == I exactly, so plain attention gives the same result (and gradients)."""
        if strength == 0.0:
            return True
        if self.alpha.requires_grad and torch.is_grad_enabled():
            return False  # alpha = 0 still has a gradient to receive
        # Checked on every call (no caching on the version counter: writes through `.data`, as some
        # optimizers do, would not bump it and a stale answer would silently drop alpha).
        return not bool(self.alpha.detach().any())

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
        strength: float,
    ) -> torch.Tensor:
        """The heads' attention on (B, H, N, d) tensors: plain SDPA (or xformers) where A is exactly
        I, else the exact mixed attention with A = I + strength * dropout(alpha)."""
        if self.is_identity(strength):
            if self.plain_backend == "xformers":
                return _xformers_attention(query, key, value, attention_mask)
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
            )
        coeff = coefficient_matrix(self.alpha, strength, self.dropout, self.training)
        return mixed_attention(
            query,
            key,
            value,
            coeff.to(query.device),
            scale,
            attention_mask,
            self.chunk_size,
            prefer=self.attention_impl,
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        coeff_scale: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Attention of `attn` on these hidden states with the heads' maps mixed by A (diffusers' processor call)."""
        if attn.heads != self.num_heads:
            raise ValueError(f"CoeffAttnProcessor built for {self.num_heads} heads used on a module with {attn.heads}")
        if coeff_scale is None:
            coeff_scale = self.call_scale
        strength = self.scale if coeff_scale is None else float(coeff_scale)
        strength *= self.target_scale if self.call_target_scale is None else self.call_target_scale

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask, attn.scale, strength)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * value.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ----------------------------------------------------------------------------------------------
# Installing on a UNet


def unwrap_unet(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module) -> nn.Module:
    """The bare UNet of a pipeline, a DDP / accelerate wrapper or a torch.compile'd module."""
    model = getattr(model_or_pipe, "unet", model_or_pipe)
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def attention_modules(unet: UNet2DConditionModel | DiffusionPipeline | nn.Module) -> dict[str, Attention]:
    """Every diffusers `Attention` module of the model, by module path."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unwrap_unet(unet).named_modules() if isinstance(m, Attention)}


def coeff_modules(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module) -> dict[str, Attention]:
    """Attention modules that currently carry a `CoeffAttnProcessor`, by module path."""
    return {
        name: m
        for name, m in attention_modules(unwrap_unet(model_or_pipe)).items()
        if isinstance(m.processor, CoeffAttnProcessor)
    }


def _matches(path: str, pattern: str) -> bool:
    # Glob patterns match the whole path; plain text matches anywhere ("mid_block", "attn2").
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return pattern in path


def _selected(path: str, targets: Sequence[str], include, exclude) -> bool:
    if path.rsplit(".", 1)[-1] not in targets:
        return False
    if include and not any(_matches(path, p) for p in include):
        return False
    return not (exclude and any(_matches(path, p) for p in exclude))


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def apply_coeff(
    unet: UNet2DConditionModel | DiffusionPipeline | nn.Module,
    targets: Sequence[str] | str = ("attn1", "attn2"),
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    chunk_size: int | None = None,
) -> list[str]:
    """Install `CoeffAttnProcessor` on the matching attention modules of a UNet (or pipeline).

    Args:
        targets: last path component of the modules to tune: "attn1" (self-), "attn2" (cross-attention).
        include / exclude: module-path patterns (globs such as "down_blocks.2.*", or plain substrings).
        dropout: coefficient dropout of the installed processors.
        chunk_size: query rows per chunk of the exact path of new processors (None: from the shapes).

    Modules not selected keep their processor. New processors take the model's
    `set_coeff_attention_impl` setting, if it has one. Re-applying keeps existing alpha (only the dropout
    is updated). Returns the module paths that carry a coeff processor afterwards, in model order.
    """
    unet = unwrap_unet(unet)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in ("attn1", "attn2")]
    if unknown:
        raise ValueError(
            f"unknown coeff target(s) {unknown}: use 'attn1' (self-attention) and/or 'attn2' (cross-attention)"
        )
    include, exclude = _as_list(include), _as_list(exclude)
    selected = [path for path in attention_modules(unet) if _selected(path, targets, include, exclude)]
    if not selected:
        raise ValueError(
            f"apply_coeff matched no attention module (targets={list(targets)}, include={include}, exclude={exclude})"
        )
    install_coeff_processors(unet, selected, dropout=dropout, chunk_size=chunk_size)
    return list(coeff_modules(unet))


def install_coeff_processors(
    unet: UNet2DConditionModel | DiffusionPipeline | nn.Module,
    paths: Iterable[str],
    dropout: float | None = None,
    chunk_size: int | None = None,
) -> None:
    """Install coeff processors on exactly these module paths; existing ones keep their alpha
    (and their dropout unless `dropout` is given; new ones get `dropout or 0.0`, and the model's
    `set_coeff_attention_impl` setting)."""
    unet = unwrap_unet(unet)
    modules = attention_modules(unet)
    impl = getattr(unet, _IMPL_ATTR, "auto")
    for path in paths:
        module = modules[path]
        processor = module.processor
        if isinstance(processor, CoeffAttnProcessor):
            if dropout is not None:
                processor.dropout = float(dropout)
        else:
            processor = CoeffAttnProcessor(module.heads, dropout=dropout or 0.0, chunk_size=chunk_size)
            processor.attention_impl = impl
            # A new nn.Module starts in training mode: follow the host module, or coefficient
            # dropout would act at inference on a model that is in eval().
            processor.to(module.to_q.weight.device).train(module.training)
            module.set_processor(processor)
    _install_scale_hooks(unet)


def remove_coeff(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module) -> list[str]:
    """Put diffusers' default processor back on every coeff module (alpha is discarded)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = unwrap_unet(model_or_pipe)
    removed = list(coeff_modules(unet))
    for path in removed:
        attention_modules(unet)[path].set_processor(AttnProcessor2_0())
    for handle in getattr(unet, _HOOK_ATTR, ()):
        handle.remove()
    if hasattr(unet, _HOOK_ATTR):
        delattr(unet, _HOOK_ATTR)
    return removed


def coeff_parameters(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module) -> list[nn.Parameter]:
    """The alpha parameters, in model order (hand these to the optimizer)."""
    return [m.processor.alpha for m in coeff_modules(model_or_pipe).values()]


def coeff_state_dict(
    model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module,
) -> dict[str, torch.Tensor]:
    """`{"unet.<module path>.alpha": residual alpha}` (detached), the layout of the weight files."""
    return {f"unet.{path}.alpha": m.processor.alpha.detach() for path, m in coeff_modules(model_or_pipe).items()}


@torch.no_grad()
def zero_row_sums_(alphas: Iterable[torch.Tensor]) -> None:
    """Subtract each row's mean from every alpha in place, so each row of A = I + c * alpha sums to 1.

    Every attention map sums to 1 over its keys, so a row sum of A is its head's output gain; with
    zero row sums alpha can only redistribute between the heads' maps, not scale a head
    (``--coeff_zero_row_sum``, an option beside the paper's unconstrained alpha: see
    benchmarks/micro/puzzle/README.md for why)."""
    for alpha in alphas:
        alpha.sub_(alpha.mean(dim=-1, keepdim=True))


def set_coeff_scale(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module, scale: float) -> None:
    """Set the run-time strength c of every coeff processor (0 = base model, 1 = as trained)."""
    modules = coeff_modules(model_or_pipe)
    if not modules:
        raise ValueError("set_coeff_scale: this model has no coeff processors (load or apply alpha first)")
    for module in modules.values():
        module.processor.scale = float(scale)


def set_plain_attention_backend(
    model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module, backend: str
) -> None:
    """Choose what computes plain attention: "sdpa" (default) or "xformers".

    Layers without alpha get diffusers' processor for that backend; coeff processors keep their
    alpha and use the backend only on their identity fast path (the mixed path is always ours).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}: use 'sdpa' or 'xformers'")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
                "(CUDA builds only), or leave the flag out (PyTorch SDPA is used)."
            ) from exc
    for module in attention_modules(model_or_pipe).values():
        if isinstance(module.processor, CoeffAttnProcessor):
            module.processor.plain_backend = backend
        else:
            module.set_processor(XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0())


#: What `set_coeff_target_scales` doses: self- / cross-attention, and the UNet's block groups.
COEFF_TARGETS = ("attn1", "attn2", "down_blocks", "mid_block", "up_blocks")


def target_scale_of(module_path: str, target_scales: Mapping[str, float] | None) -> float:
    """A module's strength factor: the product of every target in `target_scales` that names it
    (``attn1`` / ``attn2`` by the module's last name, block groups by its first)."""
    factor = 1.0
    for target, value in (target_scales or {}).items():
        kind = module_path.rsplit(".", 1)[-1] if target in ("attn1", "attn2") else module_path.split(".", 1)[0]
        if kind == target:
            factor *= float(value)
    return factor


def check_target_scales(target_scales: Mapping[str, float] | None) -> dict[str, float]:
    """The target scales as floats; unknown target names are a ValueError listing the known ones."""
    unknown = sorted(set(target_scales or {}) - set(COEFF_TARGETS))
    if unknown:
        raise ValueError(f"unknown coeff targets {unknown}: use {', '.join(COEFF_TARGETS)}")
    return {k: float(v) for k, v in (target_scales or {}).items()}


def set_coeff_target_scales(
    model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module, target_scales: Mapping[str, float] | None
) -> None:
    """Dose alpha by target, for every following call: e.g. ``{"attn1": 0.5, "up_blocks": 0.0}``.

    Keys are `COEFF_TARGETS`; a layer's strength is the global (or per-call) strength times the
    product of the targets that name it, so strength 0 for a target gives that target's base
    attention exactly. ``None`` or ``{}`` sets every layer back to factor 1. Per call:
    ``cross_attention_kwargs={"coeff_target_scales": {...}}``.
    """
    scales = check_target_scales(target_scales)
    modules = coeff_modules(model_or_pipe)
    if not modules:
        raise ValueError("set_coeff_target_scales: this model has no coeff processors (load or apply alpha first)")
    for path, module in modules.items():
        module.processor.target_scale = target_scale_of(path, scales)


def set_coeff_attention_impl(model_or_pipe: UNet2DConditionModel | DiffusionPipeline | nn.Module, impl: str) -> None:
    """Choose the exact implementation this model's coeff layers run where A != I.

    impl: "auto" (the default: no preference, so the DREAMCOEFF_ATTENTION_IMPL environment variable if
    set, else the fused C++ kernel on the CPU and the chunked path elsewhere), "chunked", "cpu_fused",
    "triton" or "materialized". Anything else is a ValueError listing these.

    The setting is per model: it is stored on every `CoeffAttnProcessor` of the UNet and on the UNet
    itself, so processors installed later (`apply_coeff`, `load_coeff_weights`) get it too, pipelines
    sharing the UNet use it, and other models keep theirs. Each processor hands it to
    `mixed_attention` as `prefer`: ahead of the environment variable, behind an explicit `impl=`. A
    kernel that cannot run for some layer (Triton for these inputs or this GPU, a CPU kernel that
    does not build) falls back to "chunked" there (`dreamcoeff.attention.dispatch` says when with a
    warning); check availability first where that should be an error, as the trainer's
    --coeff_attention_impl does.
    Where A == I the plain backend runs as before (`set_plain_attention_backend`).
    """
    if impl not in _ATTENTION_IMPL_CHOICES:
        names = ", ".join(repr(name) for name in _ATTENTION_IMPL_CHOICES)
        raise ValueError(f"unknown coeff attention impl {impl!r}: use one of {names}")
    unet = unwrap_unet(model_or_pipe)
    object.__setattr__(unet, _IMPL_ATTR, impl)
    for module in coeff_modules(unet).values():
        module.processor.attention_impl = impl


def _install_scale_hooks(unet: nn.Module) -> None:
    """Take `coeff_scale` out of `cross_attention_kwargs` at the UNet's door.

    `StableDiffusionXLPipeline(..., cross_attention_kwargs={"coeff_scale": s})` reaches every
    attention module; diffusers warns once per call for each processor that does not declare the
    argument (layers alpha does not target). The pre-hook hands the strength to the coeff
    processors for the duration of this forward and removes it from the kwargs.
    """
    if getattr(unet, _HOOK_ATTR, None):
        return

    touched: list[CoeffAttnProcessor] = []

    def pre_hook(module, args, kwargs):
        cak = kwargs.get("cross_attention_kwargs")
        if not cak or ("coeff_scale" not in cak and "coeff_target_scales" not in cak):
            return None
        cak = dict(cak)
        scale = cak.pop("coeff_scale", None)
        targets = cak.pop("coeff_target_scales", None)
        targets = None if targets is None else check_target_scales(targets)
        for path, m in coeff_modules(module).items():
            m.processor.call_scale = None if scale is None else float(scale)
            m.processor.call_target_scale = None if targets is None else target_scale_of(path, targets)
            touched.append(m.processor)
        kwargs["cross_attention_kwargs"] = cak or None
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        # Only the processors this call changed: walking the whole UNet on every call costs
        # a noticeable share of a small model's forward.
        while touched:
            processor = touched.pop()
            processor.call_scale = processor.call_target_scale = None

    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]
    object.__setattr__(unet, _HOOK_ATTR, handles)
