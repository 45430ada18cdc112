"""alpha inside real diffusers pipelines (docs/pipelines.md): each feature keeps alpha exactly or says so.

Every check compares against the output of the plain alpha pipeline (and against the base model, so a
silently dropped alpha fails): "no exception" is never the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from dreamcoeff.attn_processors import CoeffAttnProcessor
from dreamcoeff.processor import (
    AlphaNotAppliedWarning,
    apply_coeff,
    coeff_parameters,
    keep_alpha_applied,
    remove_coeff,
)


def _images(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo", num_inference_steps=2, generator=generator, output_type="np", height=64, width=64, **kwargs
    ).images


@pytest.fixture
def alpha_pipe(tiny_pipe):
    """The tiny pipeline with a random alpha on every attention layer, its base and alpha images."""
    base = _images(tiny_pipe)
    apply_coeff(tiny_pipe.unet)
    torch.manual_seed(1)
    with torch.no_grad():
        for alpha in coeff_parameters(tiny_pipe):
            alpha.normal_(0, 0.3)
    with_alpha = _images(tiny_pipe)
    assert np.abs(with_alpha - base).max() > 1e-2  # alpha visibly changes the images
    return tiny_pipe, base, with_alpha


@pytest.mark.parametrize("slice_size", ["auto", "max", 1])
def test_attention_slicing_keeps_alpha(alpha_pipe, slice_size):
    pipe, _, with_alpha = alpha_pipe
    pipe.enable_attention_slicing(slice_size)
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)
    pipe.disable_attention_slicing()
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


def test_fused_qkv_keeps_alpha_and_unfuse_gives_it_back(alpha_pipe):
    pipe, _, with_alpha = alpha_pipe
    pipe.fuse_qkv_projections()
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)
    assert all(p.fused for p in pipe.unet.attn_processors.values())  # really the fused projections
    pipe.unfuse_qkv_projections()
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
def test_diffusers_default_processors_set_over_alpha_keep_it(alpha_pipe, processor):
    pipe, _, with_alpha = alpha_pipe
    pipe.unet.set_attn_processor(processor())
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


def test_an_unknown_processor_is_reported_with_the_count_never_silent(alpha_pipe):
    pipe, base, _ = alpha_pipe

    class UsersOwn(AttnProcessor2_0):
        pass

    pipe.unet.set_attn_processor(UsersOwn())
    with pytest.warns(AlphaNotAppliedWarning, match=r"NOT applied on 34 of 34 .*UsersOwn"):
        images = _images(pipe)
    np.testing.assert_allclose(images, base, atol=1e-6)  # the warning tells the truth: base model
    assert len(keep_alpha_applied(pipe)) == 34


def test_remove_coeff_restores_the_processors_that_were_there(tiny_pipe):
    tiny_pipe.unet.set_attn_processor(SlicedAttnProcessor(1))
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    apply_coeff(tiny_pipe.unet)
    assert all(isinstance(p, CoeffAttnProcessor) for p in tiny_pipe.unet.attn_processors.values())
    remove_coeff(tiny_pipe)
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before
    assert not any("head_mix" in name for name, _ in tiny_pipe.unet.named_parameters())


def test_processors_can_be_built_the_way_diffusers_builds_them():
    processor = CoeffAttnProcessor()
    assert type(processor)() is not processor  # what load_ip_adapter does: processor.__class__()


def test_half_precision_casts_keep_alpha_float32(alpha_pipe):
    pipe, _, _ = alpha_pipe
    pipe.unet.half()
    assert all(a.dtype == torch.float32 for a in coeff_parameters(pipe))
    pipe.unet.double()
    assert all(a.dtype == torch.float64 for a in coeff_parameters(pipe))


def test_model_cpu_offload_keeps_alpha(alpha_pipe):
    pipe, _, with_alpha = alpha_pipe
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


def test_img2img_from_pipe_keeps_alpha(alpha_pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe, _, _ = alpha_pipe
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kept = _images(img2img, image=init, strength=0.9)
    plain = _images(img2img, image=init, strength=0.9, cross_attention_kwargs={"coeff_scale": 0.0})
    assert np.abs(kept - plain).max() > 1e-3  # alpha is applied in the img2img pipeline
    assert keep_alpha_applied(img2img) == {}


def test_torch_compile_has_no_graph_break(tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet.eval()
    apply_coeff(unet)
    with torch.no_grad():
        for alpha in coeff_parameters(unet):
            alpha.normal_(0, 0.3)
        eager = unet(**unet_inputs).sample
        explained = torch._dynamo.explain(unet)(**unet_inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    torch._dynamo.reset()
    assert torch.isfinite(eager).all()


def _ip_layer():
    """One cross-attention layer with a random IP-Adapter processor, in a module so apply_coeff finds it."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn2 = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=24).eval()
    ip = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24, num_tokens=(4,), scale=1.0)
    holder.attn2.set_processor(ip.eval())
    inputs = (torch.randn(2, 10, 32), (torch.randn(2, 7, 24), [torch.randn(2, 4, 24)]))
    return holder, ip, inputs


def test_ip_adapter_is_taken_over_with_alpha_on_the_text_branch_only():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from dreamcoeff.attn_processors import CoeffIPAdapterAttnProcessor

    holder, ip, (x, states) = _ip_layer()
    attn = holder.attn2
    with torch.no_grad():
        ip_on = attn(x, states)
        ip.scale = [0.0]
        ip_off = attn(x, states)
        ip.scale = [1.0]
        apply_coeff(holder, targets="attn2")
        ours = attn.processor
        assert isinstance(ours, CoeffIPAdapterAttnProcessor) and isinstance(ours, IPAdapterAttnProcessor2_0)
        assert ours.to_k_ip is ip.to_k_ip  # the adapter's own weights, shared
        torch.testing.assert_close(attn(x, states), ip_on, atol=1e-6, rtol=0)  # alpha = 0: IP-Adapter exactly
        attn.head_mix.alpha.normal_(0, 0.5)
        mixed = attn(x, states)
        ours.scale = [0.0]  # what set_ip_adapter_scale writes: the knob still works
        text_only = attn(x, states)
        attn.set_processor(CoeffAttnProcessor())
        torch.testing.assert_close(text_only, attn(x, states[0]), atol=1e-6, rtol=0)  # alpha kept on the text
    # out = to_out(mixed text + image branch): the image branch is IP-Adapter's own, unmixed
    torch.testing.assert_close(mixed - text_only, ip_on - ip_off, atol=1e-5, rtol=0)
    assert (mixed - ip_on).abs().max() > 1e-3  # and alpha is really applied beside the IP-Adapter
    remove_coeff(holder)
    assert attn.processor is ip or isinstance(attn.processor, AttnProcessor2_0)
