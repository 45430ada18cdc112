"""The alpha guard's parts, on the bare tiny UNet (no pipeline call): which layers `keep_alpha_applied`
reports, when its warning fires (once per broken state, again when the state changes), and
`set_plain_attention_backend`'s split between layers with and without alpha.

tests/test_pipelines.py checks the same guard through real pipelines (images against the base model);
these pin the bookkeeping those image checks cannot see, such as a second warning for the same state.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor

from dreamcoeff.attn_processors import CoeffAttnProcessor
from dreamcoeff.processor import (
    AlphaNotAppliedWarning,
    CoeffStrength,
    apply_coeff,
    attention_modules,
    coeff_modules,
    coeff_strength,
    keep_alpha_applied,
    remove_coeff,
    set_coeff_strength,
    set_plain_attention_backend,
    unwrap_unet,
)


class UsersOwn(AttnProcessor2_0):
    """A processor dreamcoeff cannot reproduce (exact types only: a subclass may compute anything)."""


@pytest.fixture
def alpha_unet(tiny_pipe):
    unet = tiny_pipe.unet
    apply_coeff(unet, targets=("attn2",))  # alpha on the cross-attention layers only
    return unet


def _guard_warnings(unet) -> tuple[dict[str, str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped = keep_alpha_applied(unet)
    return dropped, [str(w.message) for w in caught if issubclass(w.category, AlphaNotAppliedWarning)]


def test_dropped_layers_are_reported_by_path_and_class(alpha_unet):
    paths = sorted(coeff_modules(alpha_unet))
    assert paths and all(p.endswith(".attn2") for p in paths)
    first, second = paths[0], paths[1]
    coeff_modules(alpha_unet)[first].set_processor(UsersOwn())
    coeff_modules(alpha_unet)[second].set_processor(SlicedAttnProcessor(1))  # reproducible: taken over
    dropped, messages = _guard_warnings(alpha_unet)
    assert dropped == {first: "UsersOwn"}
    assert len(messages) == 1
    assert f"alpha is NOT applied on 1 of {len(paths)} attention layers" in messages[0]
    assert f"(e.g. {first})" in messages[0] and "their processor (UsersOwn)" in messages[0]
    taken = coeff_modules(alpha_unet)[second].processor
    assert isinstance(taken, CoeffAttnProcessor) and taken.slice_size == 1
    assert isinstance(coeff_modules(alpha_unet)[first].processor, UsersOwn)  # never replaced by guesswork


def test_the_warning_fires_once_per_state_and_again_when_it_changes(alpha_unet):
    layers = coeff_modules(alpha_unet)
    paths = sorted(layers)
    for path in paths:
        layers[path].set_processor(UsersOwn())
    _, messages = _guard_warnings(alpha_unet)
    assert len(messages) == 1 and f"on {len(paths)} of {len(paths)} " in messages[0]
    _, messages = _guard_warnings(alpha_unet)  # the same state: every UNet call runs the guard, one warning
    assert messages == []

    layers[paths[0]].set_processor(AttnProcessor2_0())  # one layer taken over: a new state, a new warning
    dropped, messages = _guard_warnings(alpha_unet)
    assert len(dropped) == len(paths) - 1
    assert len(messages) == 1 and f"on {len(paths) - 1} of {len(paths)} " in messages[0]

    for path in paths:  # all fixed: silent, nothing dropped
        layers[path].set_processor(AttnProcessor2_0())
    assert _guard_warnings(alpha_unet) == ({}, [])

    for path in paths:  # broken exactly as the first time: warned again, not remembered from before the fix
        layers[path].set_processor(UsersOwn())
    _, messages = _guard_warnings(alpha_unet)
    assert len(messages) == 1 and f"on {len(paths)} of {len(paths)} " in messages[0]


def test_two_class_names_are_listed_sorted_once_each(alpha_unet):
    class Another(AttnProcessor2_0):
        pass

    paths = sorted(coeff_modules(alpha_unet))
    for i, path in enumerate(paths):
        coeff_modules(alpha_unet)[path].set_processor(UsersOwn() if i % 2 else Another())
    _, messages = _guard_warnings(alpha_unet)
    assert "their processor (Another, UsersOwn)" in messages[0]


def test_plain_backend_sdpa_splits_layers_with_and_without_alpha(alpha_unet):
    alpha_paths = set(coeff_modules(alpha_unet))
    next(iter(coeff_modules(alpha_unet).values())).set_processor(SlicedAttnProcessor(2))  # set over alpha
    set_plain_attention_backend(alpha_unet, "sdpa")
    processors = alpha_unet.attn_processors
    for key, processor in processors.items():
        path = key.removesuffix(".processor")
        if path in alpha_paths:
            assert isinstance(processor, CoeffAttnProcessor) and processor.plain_backend == "sdpa", path
        else:
            assert type(processor) is AttnProcessor2_0, path
    assert len(alpha_paths) < len(processors)  # both kinds are there (self-attention has no alpha)


def test_plain_backend_xformers_when_installed(alpha_unet, monkeypatch):
    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    alpha_paths = set(coeff_modules(alpha_unet))
    set_plain_attention_backend(alpha_unet, "xformers")
    for key, processor in alpha_unet.attn_processors.items():
        if key.removesuffix(".processor") in alpha_paths:
            assert isinstance(processor, CoeffAttnProcessor) and processor.plain_backend == "xformers"
        else:
            assert type(processor) is XFormersAttnProcessor


def test_plain_backend_refuses_what_it_cannot_do(alpha_unet, monkeypatch):
    before = {k: type(v) for k, v in alpha_unet.attn_processors.items()}
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash': use 'sdpa' or 'xformers'"):
        set_plain_attention_backend(alpha_unet, "flash")
    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ImportError, match=r"needs xformers: `pip install xformers`"):
        set_plain_attention_backend(alpha_unet, "xformers")
    assert {k: type(v) for k, v in alpha_unet.attn_processors.items()} == before  # nothing changed


def test_remove_coeff_keeps_a_users_processor_set_over_alpha_and_drops_the_guard(alpha_unet, unet_inputs):
    paths = sorted(coeff_modules(alpha_unet))
    own = UsersOwn()
    coeff_modules(alpha_unet)[paths[0]].set_processor(own)  # set after alpha: it never applied alpha
    hooks_with_alpha = len(alpha_unet._forward_pre_hooks)
    assert sorted(remove_coeff(alpha_unet)) == paths
    processors = alpha_unet.attn_processors
    assert processors[f"{paths[0]}.processor"] is own  # stays: it was the user's choice
    assert all(type(processors[f"{p}.processor"]) is AttnProcessor2_0 for p in paths[1:])
    assert coeff_modules(alpha_unet) == {}
    assert len(alpha_unet._forward_pre_hooks) < hooks_with_alpha  # the guard went with alpha
    sliced = SlicedAttnProcessor(1)
    alpha_unet.set_attn_processor(sliced)
    with torch.no_grad():
        alpha_unet(**unet_inputs)
    assert all(p is sliced for p in alpha_unet.attn_processors.values())  # nothing takes it over any more


def test_strength_parts_given_later_keep_the_others(alpha_unet):
    set_coeff_strength(alpha_unet, targets={"up_blocks": 0.5})
    new = set_coeff_strength(alpha_unet, scale=2.0)  # the targets set before stay
    assert new == CoeffStrength(scale=2.0, targets={"up_blocks": 0.5}) == coeff_strength(alpha_unet)
    for path, module in coeff_modules(alpha_unet).items():
        assert module.head_mix.strength == (1.0 if path.startswith("up_blocks") else 2.0), path


def test_strength_and_guard_on_a_model_without_alpha(tiny_pipe):
    unet = tiny_pipe.unet
    with pytest.raises(
        ValueError, match=r"^set_coeff_strength: this model has no alpha \(load or apply alpha first\)$"
    ):
        set_coeff_strength(unet, scale=0.5)
    assert keep_alpha_applied(unet) == {}  # nothing to keep, nothing to warn about


def test_include_and_exclude_take_one_pattern_as_a_string(tiny_pipe):
    unet = tiny_pipe.unet
    every = [p for p in attention_modules(unet) if p.endswith(".attn2")]
    mid = apply_coeff(unet, targets=("attn2",), include="mid_block")  # a string is one pattern, not letters
    assert mid and mid == [p for p in every if "mid_block" in p] and len(mid) < len(every)
    remove_coeff(unet)
    rest = apply_coeff(unet, targets=("attn2",), exclude="mid_block")
    assert rest == [p for p in every if "mid_block" not in p]


def test_the_same_broken_state_warns_once_over_many_calls(alpha_unet):
    for module in coeff_modules(alpha_unet).values():
        module.set_processor(UsersOwn())
    counts = [len(_guard_warnings(alpha_unet)[1]) for _ in range(4)]
    assert counts == [1, 0, 0, 0]


def test_the_warning_points_at_the_callers_line(alpha_unet):
    next(iter(coeff_modules(alpha_unet).values())).set_processor(UsersOwn())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_alpha_applied(alpha_unet)
    assert [w.filename for w in caught if issubclass(w.category, AlphaNotAppliedWarning)] == [__file__]


def test_the_warning_and_the_xformers_error_say_what_to_do(alpha_unet, monkeypatch):
    layers = coeff_modules(alpha_unet)
    for module in layers.values():
        module.set_processor(UsersOwn())
    _, messages = _guard_warnings(alpha_unet)
    first = sorted(layers, key=list(attention_modules(alpha_unet)).index)[0]
    assert messages == [
        f"dreamcoeff: alpha is NOT applied on {len(layers)} of {len(layers)} attention layers that carry it "
        f"(e.g. {first}): their processor (UsersOwn) was set after alpha (by set_attn_processor or a library) "
        "and does not apply it, so those layers run as the base model. Keep alpha with a processor dreamcoeff "
        "reproduces (diffusers' default, sliced, fused-QKV, xformers, IP-Adapter, PAG: see docs/pipelines.md), "
        "or call dreamcoeff.remove_coeff(pipe) first if alpha should go."
    ]
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ImportError) as err:
        set_plain_attention_backend(alpha_unet, "xformers")
    assert str(err.value) == (
        "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
        "(CUDA builds only), or leave the flag out (PyTorch SDPA is used)."
    )


def test_a_good_layer_first_does_not_stop_the_takeover_of_later_ones(alpha_unet):
    ordered = [p for p in attention_modules(alpha_unet) if p in coeff_modules(alpha_unet)]
    coeff_modules(alpha_unet)[ordered[-1]].set_processor(SlicedAttnProcessor(1))  # the first ones still apply alpha
    assert keep_alpha_applied(alpha_unet) == {}
    assert isinstance(coeff_modules(alpha_unet)[ordered[-1]].processor, CoeffAttnProcessor)


def test_apply_coeff_passes_its_chunk_size_and_remove_gives_back_the_processor_it_took(tiny_pipe):
    unet = tiny_pipe.unet
    sliced = SlicedAttnProcessor(1)
    unet.set_attn_processor(sliced)
    apply_coeff(unet, targets=("attn2",), chunk_size=7)
    assert {m.head_mix.chunk_size for m in coeff_modules(unet).values()} == {7}
    remove_coeff(unet)
    assert all(p is sliced for p in unet.attn_processors.values())


def test_unwrap_unet_sees_through_wrappers(tiny_pipe):
    unet = tiny_pipe.unet

    class DataParallelLike(torch.nn.Module):  # what DDP and accelerate's wrappers look like: `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = torch.compile(unet)  # an OptimizedModule holding `_orig_mod`; nothing compiles until a call
    assert unwrap_unet(tiny_pipe) is unet
    assert unwrap_unet(DataParallelLike(unet)) is unet
    assert unwrap_unet(compiled) is unet
    assert unwrap_unet(DataParallelLike(torch.compile(DataParallelLike(unet)))) is unet
    assert apply_coeff(DataParallelLike(compiled), targets=("attn2",)) == list(coeff_modules(unet))


def test_an_xformers_processor_set_over_alpha_is_taken_over_keeping_xformers(alpha_unet):
    # building diffusers' xformers processor needs no xformers; only calling it would
    path = sorted(coeff_modules(alpha_unet))[0]
    coeff_modules(alpha_unet)[path].set_processor(XFormersAttnProcessor())
    assert keep_alpha_applied(alpha_unet) == {}
    taken = coeff_modules(alpha_unet)[path].processor
    assert isinstance(taken, CoeffAttnProcessor) and taken.plain_backend == "xformers"
    assert isinstance(taken.__dict__["replaced"], XFormersAttnProcessor)  # what remove_coeff gives back
