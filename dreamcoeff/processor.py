"""Installing alpha on a diffusers UNet, keeping it applied, configuring and removing it.

alpha lives on each attention module (``attn.head_mix``, `dreamcoeff.head_mix.HeadMix`); the
processors of `dreamcoeff.attn_processors` apply it. Diffusers and its users swap processors all
the time (attention slicing, fused QKV, IP-Adapter, xformers, `set_attn_processor`), so a guard on
the UNet's forward checks, before every call, that each layer with alpha has a processor that
applies it:

- a processor whose behaviour ours reproduces exactly (diffusers' default, sliced, fused-QKV,
  xformers and IP-Adapter processors) is taken over: replaced by the alpha-applying equivalent,
  which remembers it (`remove_coeff` puts it back);
- any other processor cannot apply alpha: an `AlphaNotAppliedWarning` names how many layers run
  without alpha, which processor, and what to do. Never a silent drop.

docs/DESIGN.md ("Where alpha lives") gives the reasons and the alternatives rejected; docs/pipelines.md
lists every pipeline feature and the test that shows what it does with alpha.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import EXACT_IMPLS
from .attn_processors import PLAIN_BACKENDS, CoeffAttnProcessor, CoeffIPAdapterAttnProcessor, CoeffPAGAttnProcessor
from .head_mix import COEFF_TARGETS, CoeffStrength, HeadMix, check_target_scales, target_scale_of

if TYPE_CHECKING:  # for the annotations only: importing diffusers' pipelines is slow
    from diffusers.models.attention_processor import Attention

__all__ = [
    "CoeffAttnProcessor",
    "CoeffIPAdapterAttnProcessor",
    "CoeffPAGAttnProcessor",
    "CoeffStrength",
    "AlphaNotAppliedWarning",
    "apply_coeff",
    "install_coeff_processors",
    "remove_coeff",
    "keep_alpha_applied",
    "coeff_parameters",
    "coeff_state_dict",
    "coeff_modules",
    "coeff_strength",
    "set_coeff_strength",
    "set_coeff_scale",
    "set_coeff_target_scales",
    "zero_row_sums_",
    "keep_structure_",
    "COEFF_STRUCTURES",
    "set_plain_attention_backend",
    "set_coeff_attention_impl",
    "COEFF_TARGETS",
    "check_target_scales",
    "target_scale_of",
    "unwrap_unet",
    "attention_modules",
]

Model = "UNet2DConditionModel | DiffusionPipeline | nn.Module"

# State kept on the UNet (object.__setattr__: plain attributes, never submodules or parameters).
_HOOK_ATTR = "_dreamcoeff_hooks"
_LAYERS_ATTR = "_dreamcoeff_layers"  # [(path, Attention)] of the layers with alpha, in model order
_STRENGTH_ATTR = "_dreamcoeff_strength"
_IMPL_ATTR = "_dreamcoeff_attention_impl"
_WARNED_ATTR = "_dreamcoeff_warned"
_ATTENTION_IMPL_CHOICES = ("auto", *EXACT_IMPLS)


class AlphaNotAppliedWarning(UserWarning):
    """Some layers that carry alpha run a processor that does not apply it."""


def unwrap_unet(model_or_pipe: Model) -> nn.Module:
    """The bare UNet of a pipeline, a DDP / accelerate wrapper or a torch.compile'd module."""
    model = getattr(model_or_pipe, "unet", model_or_pipe)
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def attention_modules(unet: Model) -> dict[str, Attention]:
    """Every diffusers `Attention` module of the model, by module path."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unwrap_unet(unet).named_modules() if isinstance(m, Attention)}


def coeff_modules(model_or_pipe: Model) -> dict[str, Attention]:
    """Attention modules that carry alpha (``attn.head_mix``), by module path, in model order."""
    return {name: m for name, m in attention_modules(model_or_pipe).items() if isinstance(_head_mix(m), HeadMix)}


def _head_mix(module: nn.Module) -> HeadMix | None:
    return module._modules.get("head_mix")


def _layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    layers = getattr(unet, _LAYERS_ATTR, None)
    if layers is None:
        layers = list(coeff_modules(unet).items())
        object.__setattr__(unet, _LAYERS_ATTR, layers)
    return layers


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


# ----------------------------------------------------------------------------------------------
# Which processors alpha can be kept through


def _taking_over(
    processor, module: Attention
) -> CoeffAttnProcessor | CoeffIPAdapterAttnProcessor | CoeffPAGAttnProcessor | None:
    """The alpha-applying processor that computes what `processor` computes on `module`, or None
    where there is none.

    Exact types only: a subclass may compute something else, and then alpha is reported dropped."""
    from diffusers.models import attention_processor as ap

    kind = type(processor)
    if kind in (ap.AttnProcessor2_0, ap.AttnProcessor, ap.FusedAttnProcessor2_0):
        new = CoeffAttnProcessor(fused=kind is ap.FusedAttnProcessor2_0)
    elif kind is ap.SlicedAttnProcessor:
        new = CoeffAttnProcessor(slice_size=processor.slice_size)
    elif kind is ap.XFormersAttnProcessor:
        new = CoeffAttnProcessor(plain_backend="xformers")
    elif kind in (ap.IPAdapterAttnProcessor2_0, ap.IPAdapterAttnProcessor):
        new = CoeffIPAdapterAttnProcessor.taking_over(processor)
    elif kind in (ap.PAGCFGIdentitySelfAttnProcessor2_0, ap.PAGIdentitySelfAttnProcessor2_0):
        if not CoeffPAGAttnProcessor.reproduces(module):
            return None
        new = CoeffPAGAttnProcessor(cfg=kind is ap.PAGCFGIdentitySelfAttnProcessor2_0)
    else:
        return None
    new.__dict__["replaced"] = processor
    return new


def keep_alpha_applied(model_or_pipe: Model) -> dict[str, str]:
    """Make every layer with alpha run a processor that applies it, where that can be done exactly.

    Processors diffusers put there (slicing, fused QKV, xformers, IP-Adapter, PAG, the default) are taken
    over; returns ``{path: processor class name}`` of the layers where alpha is NOT applied (a
    processor dreamcoeff cannot reproduce), after warning once about them with an
    `AlphaNotAppliedWarning`. Runs before every UNet call (a forward pre-hook); call it yourself to
    check a model without running it."""
    unet = unwrap_unet(model_or_pipe)
    dropped = {}
    for path, module in _layers(unet):
        processor = module.processor
        if getattr(processor, "applies_head_mix", False):
            continue
        replacement = _taking_over(processor, module)
        if replacement is None:
            dropped[path] = type(processor).__name__
        else:
            module.set_processor(replacement)
    _warn_dropped(unet, dropped)
    return dropped


def _warn_dropped(unet: nn.Module, dropped: Mapping[str, str]) -> None:
    state = frozenset(dropped.items())
    if not dropped or getattr(unet, _WARNED_ATTR, None) == state:
        object.__setattr__(unet, _WARNED_ATTR, state if dropped else None)
        return
    object.__setattr__(unet, _WARNED_ATTR, state)
    names = ", ".join(sorted(set(dropped.values())))
    warnings.warn(
        f"dreamcoeff: alpha is NOT applied on {len(dropped)} of {len(_layers(unet))} attention layers that "
        f"carry it (e.g. {next(iter(dropped))}): their processor ({names}) was set after alpha (by "
        "set_attn_processor or a library) and does not apply it, so those layers run as the base model. "
        "Keep alpha with a processor dreamcoeff reproduces (diffusers' default, sliced, fused-QKV, xformers, "
        "IP-Adapter, PAG: see docs/pipelines.md), or call dreamcoeff.remove_coeff(pipe) first if alpha should go.",
        AlphaNotAppliedWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------
# Installing and removing


def apply_coeff(
    unet: Model,
    targets: Sequence[str] | str = ("attn1", "attn2"),
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    chunk_size: int | None = None,
) -> list[str]:
    """Put a zero alpha on the matching attention modules of a UNet (or pipeline).

    Args:
        targets: last path component of the modules to tune: "attn1" (self-), "attn2" (cross-attention).
        include / exclude: module-path patterns (globs such as "down_blocks.2.*", or plain substrings).
        dropout: coefficient dropout of the new alpha.
        chunk_size: query rows per chunk of the exact path of new alpha (None: from the shapes).

    Modules not selected keep their processor. New alpha takes the model's `set_coeff_attention_impl`
    setting, if it has one. Re-applying keeps existing alpha (only the dropout is updated). Returns the
    module paths that carry alpha afterwards, in model order.
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
    unet: Model, paths: Iterable[str], dropout: float | None = None, chunk_size: int | None = None
) -> None:
    """Put alpha on exactly these module paths and an alpha-applying processor on each.

    Existing alpha is kept (and its dropout unless `dropout` is given); new alpha is zero, with
    `dropout or 0.0`, the model's `set_coeff_attention_impl` setting and its current strength. A
    processor that cannot apply alpha (a user's own) is replaced by `CoeffAttnProcessor`, with a
    warning, and comes back on `remove_coeff`."""
    unet = unwrap_unet(unet)
    modules = attention_modules(unet)
    impl = getattr(unet, _IMPL_ATTR, "auto")
    strength = coeff_strength(unet)
    replaced = []
    for path in paths:
        module = modules[path]
        head_mix = _head_mix(module)
        if head_mix is None:
            head_mix = HeadMix(module.heads, dropout=dropout or 0.0, chunk_size=chunk_size)
            head_mix.set_attention_impl(impl)
            head_mix.strength = strength.of_layer(path)
            # A new module starts in training mode: follow the host, or coefficient dropout would
            # act at inference on a model that is in eval().
            module.head_mix = head_mix.to(module.to_q.weight.device).train(module.training)
        elif dropout is not None:
            head_mix.set_dropout(dropout)
        if not getattr(module.processor, "applies_head_mix", False):
            new = _taking_over(module.processor, module)
            if new is None:
                replaced.append(type(module.processor).__name__)
                new = CoeffAttnProcessor()
                new.__dict__["replaced"] = module.processor
            module.set_processor(new)
    if replaced:
        warnings.warn(
            f"dreamcoeff: {len(replaced)} attention layers had a processor that cannot apply alpha "
            f"({', '.join(sorted(set(replaced)))}); it was replaced by CoeffAttnProcessor and comes back "
            "with remove_coeff()",
            AlphaNotAppliedWarning,
            stacklevel=3,
        )
    object.__setattr__(unet, _LAYERS_ATTR, None)
    _install_hooks(unet)


def remove_coeff(model_or_pipe: Model) -> list[str]:
    """Take alpha off every module (it is discarded) and put back the processor each one would have
    without it: the one dreamcoeff took over (e.g. IP-Adapter's, sliced, xformers), else diffusers'
    default. A processor that never applied alpha stays. Returns the module paths that had alpha."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = unwrap_unet(model_or_pipe)
    removed = coeff_modules(unet)
    for module in removed.values():
        processor = module.processor
        if getattr(processor, "applies_head_mix", False):
            module.set_processor(processor.__dict__.get("replaced") or AttnProcessor2_0())
        del module.head_mix
    for handle in getattr(unet, _HOOK_ATTR, None) or ():
        handle.remove()
    for attr in (_HOOK_ATTR, _LAYERS_ATTR, _STRENGTH_ATTR, _WARNED_ATTR):
        if attr in unet.__dict__:
            object.__delattr__(unet, attr)
    return list(removed)


def coeff_parameters(model_or_pipe: Model) -> list[nn.Parameter]:
    """The alpha parameters, in model order (hand these to the optimizer)."""
    return [m.head_mix.alpha for m in coeff_modules(model_or_pipe).values()]


def coeff_state_dict(model_or_pipe: Model) -> dict[str, torch.Tensor]:
    """`{"unet.<module path>.alpha": residual alpha}` (detached), the layout of the weight files."""
    return {f"unet.{path}.alpha": m.head_mix.alpha.detach() for path, m in coeff_modules(model_or_pipe).items()}


@torch.no_grad()
def zero_row_sums_(alphas: Iterable[torch.Tensor]) -> None:
    """Subtract each row's mean from every alpha in place, so each row of A = I + c * alpha sums to 1.

    Every attention map sums to 1 over its keys, so a row sum of A is its head's output gain; with
    zero row sums alpha can only redistribute between the heads' maps, not scale a head
    (``--coeff_zero_row_sum``, an option beside the paper's unconstrained alpha: see
    benchmarks/micro/puzzle/README.md for why)."""
    for alpha in alphas:
        alpha.sub_(alpha.mean(dim=-1, keepdim=True))


#: alpha's structures (``--coeff_structure``): the paper's full H x H matrix, its diagonal alone (a gain
#: per head on its own map, no mixing), or its off-diagonal alone (mixing between heads, no own-map gain).
COEFF_STRUCTURES = ("full", "diagonal", "off_diagonal")


@torch.no_grad()
def keep_structure_(alphas: Iterable[torch.Tensor], structure: str) -> None:
    """Set the entries of every alpha outside `structure` to exactly 0, in place.

    ``"full"`` keeps everything; ``"diagonal"`` zeroes the off-diagonal entries (A = I + c * alpha is
    then a gain per head); ``"off_diagonal"`` zeroes the diagonal (a head's own map keeps weight 1
    and alpha only adds the others'). Applied after every optimizer step, this is the exact
    projection onto the subspace: the masked entries are zero, the free ones untouched."""
    if structure not in COEFF_STRUCTURES:
        raise ValueError(f"unknown alpha structure {structure!r}: choose one of {COEFF_STRUCTURES}")
    if structure == "full":
        return
    for alpha in alphas:
        eye = torch.eye(alpha.shape[-1], dtype=torch.bool, device=alpha.device)
        alpha.masked_fill_(~eye if structure == "diagonal" else eye, 0.0)


# ----------------------------------------------------------------------------------------------
# Strength: one value object per UNet, set by one function


def coeff_strength(model_or_pipe: Model) -> CoeffStrength:
    """The model's stored alpha strength (scale 1, no target factors until set)."""
    return getattr(unwrap_unet(model_or_pipe), _STRENGTH_ATTR, None) or CoeffStrength()


def set_coeff_strength(
    model_or_pipe: Model,
    strength: CoeffStrength | None = None,
    *,
    scale: float | None = None,
    targets: Mapping[str, float] | None = None,
) -> CoeffStrength:
    """Set alpha's strength for every following call, and return it.

    Either a whole `CoeffStrength`, or `scale` (0 = base model, 1 = as trained) and / or `targets`
    (e.g. ``{"attn1": 0.5, "up_blocks": 0.0}``; ``{}`` clears them) replacing those parts of the
    current one. A layer's strength is scale x the product of the targets that name it. Per call:
    ``cross_attention_kwargs={"coeff_scale": s, "coeff_target_scales": {...}}`` (`CoeffStrength.for_call`).
    """
    unet = unwrap_unet(model_or_pipe)
    layers = _layers(unet)
    if not layers:
        raise ValueError("set_coeff_strength: this model has no alpha (load or apply alpha first)")
    new = strength if strength is not None else coeff_strength(unet).replaced(scale, targets)
    object.__setattr__(unet, _STRENGTH_ATTR, new)
    for path, module in layers:
        module.head_mix.strength = new.of_layer(path)
    return new


def set_coeff_scale(model_or_pipe: Model, scale: float) -> None:
    """Set the run-time strength c of every alpha layer (0 = base model, 1 = as trained)."""
    set_coeff_strength(model_or_pipe, scale=scale)


def set_coeff_target_scales(model_or_pipe: Model, target_scales: Mapping[str, float] | None) -> None:
    """Dose alpha by target (keys `COEFF_TARGETS`) for every following call; ``None`` or ``{}``: factor 1."""
    set_coeff_strength(model_or_pipe, targets=target_scales or {})


# ----------------------------------------------------------------------------------------------
# Backends


def set_plain_attention_backend(model_or_pipe: Model, backend: str) -> None:
    """Choose what computes plain attention: "sdpa" (default) or "xformers".

    Layers without alpha get diffusers' processor for that backend; alpha layers keep alpha and use
    the backend only on their identity fast path (the mixed path is always ours)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if backend not in PLAIN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: use 'sdpa' or 'xformers'")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
                "(CUDA builds only), or leave the flag out (PyTorch SDPA is used)."
            ) from exc
    keep_alpha_applied(model_or_pipe)
    for module in attention_modules(model_or_pipe).values():
        if getattr(module.processor, "applies_head_mix", False):
            module.processor.plain_backend = backend
        else:
            module.set_processor(XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0())


def set_coeff_attention_impl(model_or_pipe: Model, impl: str) -> None:
    """Choose the exact implementation this model's alpha layers run where A != I.

    impl: "auto" (the default: no preference, so the DREAMCOEFF_ATTENTION_IMPL environment variable if
    set, else the fused C++ kernel on the CPU and the chunked path elsewhere), "chunked", "cpu_fused",
    "triton" or "materialized". Anything else is a ValueError listing these.

    The setting is per model: it is stored on every layer's alpha and on the UNet itself, so alpha
    installed later (`apply_coeff`, `load_coeff_weights`) gets it too and other models keep theirs.
    A kernel that cannot run for some layer falls back to "chunked" there
    (`dreamcoeff.attention.dispatch` says when, with a warning). Where A == I the plain backend runs.
    """
    if impl not in _ATTENTION_IMPL_CHOICES:
        names = ", ".join(repr(name) for name in _ATTENTION_IMPL_CHOICES)
        raise ValueError(f"unknown coeff attention impl {impl!r}: use one of {names}")
    unet = unwrap_unet(model_or_pipe)
    object.__setattr__(unet, _IMPL_ATTR, impl)
    for module in coeff_modules(unet).values():
        module.head_mix.set_attention_impl(impl)


# ----------------------------------------------------------------------------------------------
# The UNet's door: the guard and the per-call strength


def _install_hooks(unet: nn.Module) -> None:
    """Before every UNet call: keep alpha applied (`keep_alpha_applied`), and take ``coeff_scale`` /
    ``coeff_target_scales`` out of ``cross_attention_kwargs`` into each layer's call strength (so the
    layers without alpha never see arguments they do not declare); after it, clear them."""
    if getattr(unet, _HOOK_ATTR, None):
        return
    touched: list[HeadMix] = []

    def pre_hook(module, args, kwargs):
        keep_alpha_applied(module)
        cak = kwargs.get("cross_attention_kwargs")
        if not cak or ("coeff_scale" not in cak and "coeff_target_scales" not in cak):
            return None
        cak = dict(cak)
        call = coeff_strength(module).for_call(cak.pop("coeff_scale", None), cak.pop("coeff_target_scales", None))
        for path, attn in _layers(module):
            attn.head_mix.call_strength = call.of_layer(path)
            touched.append(attn.head_mix)
        kwargs["cross_attention_kwargs"] = cak or None
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        while touched:  # only what this call changed: walking the UNet each call costs on small models
            touched.pop().call_strength = None

    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]
    object.__setattr__(unet, _HOOK_ATTR, handles)
