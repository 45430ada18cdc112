"""alpha inside real diffusers pipelines (docs/pipelines.md): each feature keeps alpha exactly or says so.

Every check compares against the output of the plain alpha pipeline (and against the base model, so a
silently dropped alpha fails): "no exception" is never the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from dreamcoeff.attn_processors import CoeffAttnProcessor
from dreamcoeff.processor import (
    AlphaNotAppliedWarning,
    apply_coeff,
    coeff_modules,
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


# ----------------------------------------------------------------------------------------------
# IP-Adapter end to end: diffusers' own load_ip_adapter on a tiny adapter built here


def _tiny_ip_adapter(folder, unet) -> str:
    """A tiny IP-Adapter in the layout diffusers' loader reads: ``image_encoder/`` (a
    CLIPVisionModelWithProjection) beside ``ip-adapter.safetensors`` (``image_proj.proj`` / ``.norm`` and
    ``ip_adapter.<n>.to_k_ip`` / ``to_v_ip`` for the n-th cross-attention layer, n = 1, 3, 5, ...)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=4, image_size=32, patch_size=8,
        )  # fmt: skip
        CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "image_encoder")
        cross = unet.config.cross_attention_dim
        tensors = {
            "image_proj.proj.weight": torch.randn(4 * cross, config.projection_dim) * 0.2,
            "image_proj.proj.bias": torch.randn(4 * cross) * 0.2,
            "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross),
            "image_proj.norm.bias": 0.1 * torch.randn(cross),
        }
        key_id = 1
        modules = dict(unet.named_modules())
        for name in unet.attn_processors:  # the loader's order
            if name.endswith("attn2.processor"):
                hidden = modules[name[: -len(".processor")]].to_k.weight.shape[0]
                for which in ("to_k_ip", "to_v_ip"):
                    tensors[f"ip_adapter.{key_id}.{which}.weight"] = torch.randn(hidden, cross) * 0.3
                key_id += 2
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ip-adapter.safetensors"))
    return str(folder)


def _ip_image():
    from PIL import Image

    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _load_ip(pipe, folder):
    pipe.load_ip_adapter(
        folder, subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder="image_encoder"
    )


def _randomize_alpha(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for alpha in coeff_parameters(model):
            alpha.normal_(0, 0.3)


def test_load_ip_adapter_end_to_end_keeps_alpha_before_and_after(alpha_pipe, tmp_path):
    """diffusers' own load_ip_adapter over alpha and alpha over an IP-Adapter: the same images; scale 0
    is the alpha pipeline exactly; alpha 0 (coeff_scale 0) is diffusers' IP-Adapter pipeline exactly."""
    import warnings

    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe, base, with_alpha = alpha_pipe
    folder = _tiny_ip_adapter(tmp_path, pipe.unet)
    image = _ip_image()
    # The reference: an untouched pipeline with diffusers' IP-Adapter and no alpha.
    plain = build_tiny_pipeline(seed=0)
    plain.set_progress_bar_config(disable=True)
    _load_ip(plain, folder)
    ip_only = _images(plain, ip_adapter_image=image)
    assert np.abs(ip_only - base).max() > 1e-2  # the adapter visibly acts

    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaNotAppliedWarning)  # nothing may be dropped on the way
        _load_ip(pipe, folder)  # after alpha
        after = _images(pipe, ip_adapter_image=image)
        assert keep_alpha_applied(pipe) == {}
        np.testing.assert_allclose(
            _images(pipe, ip_adapter_image=image, cross_attention_kwargs={"coeff_scale": 0.0}), ip_only, atol=1e-5
        )
        pipe.set_ip_adapter_scale(0.0)  # the knob still works: the image branch off, alpha alone left
        np.testing.assert_allclose(_images(pipe, ip_adapter_image=image), with_alpha, atol=1e-5)
        pipe.set_ip_adapter_scale(1.0)

        apply_coeff(plain.unet)  # alpha after the IP-Adapter, the same alpha
        for mine, theirs in zip(coeff_parameters(plain), coeff_parameters(pipe)):
            with torch.no_grad():
                mine.copy_(theirs)
        before = _images(plain, ip_adapter_image=image)
    np.testing.assert_allclose(before, after, atol=1e-5)
    assert np.abs(after - ip_only).max() > 1e-2 and np.abs(after - with_alpha).max() > 1e-2  # both act


def test_unload_ip_adapter_keeps_alpha(alpha_pipe, tmp_path):
    pipe, _, with_alpha = alpha_pipe
    folder = _tiny_ip_adapter(tmp_path, pipe.unet)
    alphas = [a.detach().clone() for a in coeff_parameters(pipe)]
    _load_ip(pipe, folder)
    assert np.abs(_images(pipe, ip_adapter_image=_ip_image()) - with_alpha).max() > 1e-2
    pipe.unload_ip_adapter()
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(coeff_parameters(pipe), alphas))
    assert keep_alpha_applied(pipe) == {}


def test_an_ip_adapter_that_does_not_fit_is_refused_and_leaves_the_alpha_pipeline_as_it_was(alpha_pipe, tmp_path):
    """An IP-Adapter made for another UNet (one layer's to_k_ip of the wrong width): diffusers' loader
    refuses it loudly, and the alpha pipeline is left exactly as it was (processors, alpha, images)."""
    from safetensors.torch import load_file, save_file

    pipe, _, with_alpha = alpha_pipe
    folder = Path(_tiny_ip_adapter(tmp_path, pipe.unet))
    tensors = load_file(str(folder / "ip-adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("to_k_ip.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])
    save_file(tensors, str(folder / "ip-adapter.safetensors"))
    processors = dict(pipe.unet.attn_processors)
    alphas = [a.detach().clone() for a in coeff_parameters(pipe)]
    with pytest.raises((RuntimeError, ValueError), match="size|shape"):
        _load_ip(pipe, str(folder))
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    assert all(torch.equal(a, b) for a, b in zip(coeff_parameters(pipe), alphas))
    assert getattr(pipe.unet, "encoder_hid_proj", None) is None
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-6)
    assert keep_alpha_applied(pipe) == {}


# ----------------------------------------------------------------------------------------------
# ControlNet and inpaint pipelines around the same UNet


def _tiny_controlnet(unet):
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
        with torch.no_grad():  # from_unet zero-initialises the output convs: give them weights so it acts
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.weight.normal_(0, 0.05)
    return controlnet


def test_controlnet_pipeline_keeps_alpha(tiny_pipe):
    """StableDiffusionXLControlNetPipeline around the alpha UNet: conditioning scale 0 is the alpha
    pipeline exactly, coeff_scale 0 is diffusers' ControlNet pipeline without alpha exactly."""
    import warnings

    from diffusers import StableDiffusionXLControlNetPipeline

    controlnet = _tiny_controlnet(tiny_pipe.unet)  # from the base UNet (from_unet after alpha: see below)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(tiny_pipe, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    cn_base = _images(pipe, image=control)
    assert np.abs(cn_base - _images(tiny_pipe)).max() > 1e-2  # the ControlNet visibly acts
    apply_coeff(tiny_pipe.unet)
    _randomize_alpha(tiny_pipe)
    with_alpha = _images(tiny_pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaNotAppliedWarning)
        kept = _images(pipe, image=control)
        np.testing.assert_allclose(
            _images(pipe, image=control, controlnet_conditioning_scale=0.0), with_alpha, atol=1e-5
        )
        np.testing.assert_allclose(
            _images(pipe, image=control, cross_attention_kwargs={"coeff_scale": 0.0}), cn_base, atol=1e-5
        )
    assert np.abs(kept - cn_base).max() > 1e-2 and np.abs(kept - with_alpha).max() > 1e-2
    assert not coeff_parameters(controlnet)  # alpha is the UNet's; the ControlNet copy has none


def test_controlnet_from_unet_after_alpha_is_a_loud_error(alpha_pipe):
    """ControlNetModel.from_unet copies the UNet's blocks with a strict load_state_dict, which refuses
    the head_mix.alpha keys: loud, not silent. Build the ControlNet before apply_coeff (docs/pipelines.md)."""
    from diffusers import ControlNetModel

    pipe, _, _ = alpha_pipe
    with pytest.raises(RuntimeError, match=r"head_mix\.alpha"):
        ControlNetModel.from_unet(pipe.unet)


@pytest.mark.parametrize("built", ["directly", "from_pipe"])
def test_inpaint_pipeline_keeps_alpha(alpha_pipe, built):
    """The SDXL inpaint pipeline around the alpha UNet: coeff_scale 0 equals inpainting with an
    untouched pipeline; with alpha it differs from that and warns about nothing."""
    import warnings

    from diffusers import StableDiffusionXLInpaintPipeline

    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe, _, _ = alpha_pipe

    def inpainter(source):
        if built == "directly":
            parts = {k: v for k, v in source.components.items()}
            return StableDiffusionXLInpaintPipeline(**parts)
        return StableDiffusionXLInpaintPipeline.from_pipe(source)

    g = torch.Generator().manual_seed(6)
    init, mask = torch.rand(1, 3, 64, 64, generator=g), torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    base_pipe = build_tiny_pipeline(seed=0)
    reference = inpainter(base_pipe)
    reference.set_progress_bar_config(disable=True)
    base = _images(reference, image=init, mask_image=mask, strength=0.9)
    inpaint = inpainter(pipe)
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint.unet is pipe.unet
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaNotAppliedWarning)
        kept = _images(inpaint, image=init, mask_image=mask, strength=0.9)
        off = _images(inpaint, image=init, mask_image=mask, strength=0.9, cross_attention_kwargs={"coeff_scale": 0.0})
    np.testing.assert_allclose(off, base, atol=1e-5)
    assert np.abs(kept - base).max() > 1e-2  # alpha applied in the inpaint pipeline


# ----------------------------------------------------------------------------------------------
# LoRA beside alpha through diffusers' own calls


def _tiny_lora(unet, rank=2) -> dict[str, torch.Tensor]:
    """A LoRA state dict in diffusers' layout (``unet.<module>.lora_A/B.weight``) on every attention projection."""
    g = torch.Generator().manual_seed(21)
    lora = {}
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            out_f, in_f = module.weight.shape
            lora[f"unet.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
            lora[f"unet.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    return lora


def _alpha_plus_merged_lora(alpha_source, lora, weight):
    """The independent reference: a fresh pipeline with W + weight * B A written into its weights by
    hand (no peft), then the same alpha."""
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    modules = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for key, a in lora.items():
            if key.endswith("lora_A.weight"):
                name = key[len("unet.") : -len(".lora_A.weight")]
                b = lora[f"unet.{name}.lora_B.weight"]
                modules[name].weight += weight * (b.double() @ a.double()).float()
    apply_coeff(pipe.unet)
    with torch.no_grad():
        for mine, theirs in zip(coeff_parameters(pipe), coeff_parameters(alpha_source)):
            mine.copy_(theirs)
    return _images(pipe)


def test_lora_calls_leave_alpha_untouched(alpha_pipe):
    """load_lora_weights, set_adapters with a weight, fuse_lora / unfuse_lora, unload_lora_weights:
    alpha's tensors stay equal and the images are the alpha + LoRA (or alpha-only) reference."""
    import warnings

    pipe, _, with_alpha = alpha_pipe
    alphas = [a.detach().clone() for a in coeff_parameters(pipe)]

    def alpha_untouched():
        assert all(torch.equal(a, b) for a, b in zip(coeff_parameters(pipe), alphas))
        assert keep_alpha_applied(pipe) == {}

    lora = _tiny_lora(pipe.unet)
    full, half = _alpha_plus_merged_lora(pipe, lora, 1.0), _alpha_plus_merged_lora(pipe, lora, 0.5)
    assert np.abs(full - with_alpha).max() > 1e-2 and np.abs(half - full).max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlphaNotAppliedWarning)
        pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="a")
        alpha_untouched()
        np.testing.assert_allclose(_images(pipe), full, atol=1e-4)
        pipe.set_adapters(["a"], adapter_weights=[0.5])
        alpha_untouched()
        np.testing.assert_allclose(_images(pipe), half, atol=1e-4)
        pipe.set_adapters(["a"], adapter_weights=[1.0])
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
        alpha_untouched()
        np.testing.assert_allclose(_images(pipe), full, atol=1e-4)
        pipe.unfuse_lora(components=["unet"])
        alpha_untouched()
        np.testing.assert_allclose(_images(pipe), full, atol=1e-4)
        pipe.unload_lora_weights()
        alpha_untouched()
        np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sequential CPU offload


def _parameter_to_indexed_cpu_stays_a_parameter() -> bool:
    """enable_sequential_cpu_offload(device="cpu") hands accelerate the device "cpu:0" (diffusers always
    adds an index). accelerate onloads each weight as ``Parameter(value).to("cpu:0")``; where torch
    copies a CPU tensor moved to "cpu:0" (torch 2.13 does), the copy is a plain Tensor, and the next
    offload's ``type(param)(value, requires_grad=...)`` is ``torch.Tensor(...)``: a TypeError."""
    return type(torch.nn.Parameter(torch.zeros(1)).to("cpu:0")) is torch.nn.Parameter


@pytest.mark.skipif(
    not _parameter_to_indexed_cpu_stays_a_parameter(),
    reason=f"torch {torch.__version__}: Parameter.to('cpu:0') returns a plain Tensor, so accelerate's "
    "sequential offload on the CPU fails with a TypeError in set_module_tensor_to_device even without alpha "
    "(docs/pipelines.md); test_accelerate_cpu_offload_moves_alpha_with_its_hooks covers the same hooks",
)
def test_sequential_cpu_offload_keeps_alpha(alpha_pipe):
    pipe, _, with_alpha = alpha_pipe
    pipe.enable_sequential_cpu_offload(device="cpu")
    np.testing.assert_allclose(_images(pipe), with_alpha, atol=1e-5)


def test_accelerate_cpu_offload_moves_alpha_with_its_hooks(alpha_pipe):
    """What enable_sequential_cpu_offload does per model (accelerate.cpu_offload: every module's own
    tensors on "meta" between calls, brought in by a hook around its forward), with the device
    "cpu" that torch does not copy to: alpha (a parameter of attn.head_mix, read through its forward)
    moves with the hooks and the images are the alpha pipeline's."""
    from accelerate import cpu_offload

    pipe, base, with_alpha = alpha_pipe
    alphas = [a.detach().clone() for a in coeff_parameters(pipe)]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name)
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert all(a.device.type == "meta" for a in coeff_parameters(pipe))  # really offloaded
    images = _images(pipe)
    np.testing.assert_allclose(images, with_alpha, atol=1e-5)
    assert np.abs(images - base).max() > 1e-2
    hook = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.head_mix._hf_hook
    assert torch.equal(hook.weights_map["alpha"], alphas[0])


# ----------------------------------------------------------------------------------------------
# Perturbed-attention guidance (PAG)


def _pag_layer(cfg: bool, qk_norm: str | None = None):
    """One self-attention layer running diffusers' PAG processor, in a module so apply_coeff finds it,
    and a batch laid out as PAG lays it out ([uncond, text, perturbed] or [text, perturbed])."""
    from diffusers.models.attention_processor import (
        Attention,
        PAGCFGIdentitySelfAttnProcessor2_0,
        PAGIdentitySelfAttnProcessor2_0,
    )

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn1 = Attention(query_dim=32, heads=4, dim_head=8, qk_norm=qk_norm).eval()
    pag = PAGCFGIdentitySelfAttnProcessor2_0() if cfg else PAGIdentitySelfAttnProcessor2_0()
    holder.attn1.processor = pag  # what diffusers' PAGMixin does: plain assignment
    return holder, pag, torch.randn((3 if cfg else 2) * 2, 10, 32)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_pag_processor_is_taken_over_with_alpha_on_the_guided_branches(cfg):
    """On one layer, against diffusers' PAG processor itself: at alpha 0 our take-over is PAG exactly;
    with alpha the perturbed branch (identity attention: no map to mix) is still PAG's, and the guided
    branches are the float64 mixed-attention reference."""
    from dreamcoeff.attn_processors import CoeffPAGAttnProcessor
    from tests.reference import reference_attention_module

    holder, pag, x = _pag_layer(cfg)
    attn = holder.attn1
    guided = x.shape[0] // (3 if cfg else 2) * (2 if cfg else 1)  # rows of the unperturbed branches
    with torch.no_grad():
        theirs = attn(x)
        apply_coeff(holder, targets="attn1")
        assert isinstance(attn.processor, CoeffPAGAttnProcessor) and attn.processor.cfg is cfg
        torch.testing.assert_close(attn(x), theirs, atol=1e-6, rtol=0)  # alpha = 0: PAG exactly
        attn.head_mix.alpha.normal_(0, 0.5)
        ours = attn(x)
        coeff = torch.eye(4, dtype=torch.float64) + attn.head_mix.alpha.double()
        reference = reference_attention_module(attn, x[:guided], coeff)
    torch.testing.assert_close(ours[guided:], theirs[guided:], atol=1e-6, rtol=0)  # PAG's perturbed branch
    torch.testing.assert_close(ours[:guided].double(), reference, atol=1e-5, rtol=0)  # alpha on the guided ones
    assert (ours[:guided] - theirs[:guided]).abs().max() > 1e-3
    # PAG installs its processor by assignment before each call: the guard takes it over again.
    attn.processor = pag
    assert keep_alpha_applied(holder) == {} and isinstance(attn.processor, CoeffPAGAttnProcessor)
    remove_coeff(holder)
    assert attn.processor is pag  # what was there comes back


def test_pag_processor_that_cannot_be_reproduced_is_reported():
    """PAG's processors skip norm_q / norm_k: on a layer with them, PAG's guided branch is not plain
    attention, so it is not taken over and alpha is reported not applied, never dropped in silence."""
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    holder, pag, _ = _pag_layer(True, qk_norm="layer_norm")
    with pytest.warns(AlphaNotAppliedWarning, match="replaced by CoeffAttnProcessor"):
        apply_coeff(holder, targets="attn1")
    holder.attn1.processor = pag
    with pytest.warns(AlphaNotAppliedWarning, match=r"NOT applied on 1 of 1 .*PAGCFGIdentitySelfAttnProcessor2_0"):
        assert keep_alpha_applied(holder) == {"attn1": "PAGCFGIdentitySelfAttnProcessor2_0"}
    assert isinstance(holder.attn1.processor, PAGCFGIdentitySelfAttnProcessor2_0)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_pag_pipeline_keeps_alpha(alpha_pipe, guidance_scale):
    """StableDiffusionXLPAGPipeline (from_pipe, PAG on the mid block) around the alpha UNet: coeff_scale 0
    is diffusers' own PAG pipeline on an untouched model; pag_scale 0 (diffusers then runs plain CFG) is
    the plain alpha pipeline; with both on, the images differ from each; nothing is warned."""
    import functools
    import warnings

    from diffusers import StableDiffusionXLPAGPipeline

    from dreamcoeff.attn_processors import CoeffPAGAttnProcessor
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe, _, with_alpha = alpha_pipe
    plain = build_tiny_pipeline(seed=0)
    reference = StableDiffusionXLPAGPipeline.from_pipe(plain, pag_applied_layers=["mid"])
    reference.set_progress_bar_config(disable=True)
    pag_only = _images(reference, guidance_scale=guidance_scale, pag_scale=3.0)
    no_pag = _images(plain, guidance_scale=guidance_scale)
    assert np.abs(pag_only - no_pag).max() > 1e-2  # PAG visibly acts on the tiny model

    pag = StableDiffusionXLPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    seen = []
    original = CoeffPAGAttnProcessor.__call__

    @functools.wraps(original)  # Attention.forward reads the processor's signature
    def spy(self, attn, *args, **kwargs):
        seen.append(self.cfg)
        return original(self, attn, *args, **kwargs)

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("error", AlphaNotAppliedWarning)  # the PAG layers must not lose alpha
        mp.setattr(CoeffPAGAttnProcessor, "__call__", spy)
        kept = _images(pag, guidance_scale=guidance_scale, pag_scale=3.0)
        assert seen and set(seen) == {guidance_scale > 1}  # PAG's layers ran our take-over
        off = _images(pag, guidance_scale=guidance_scale, pag_scale=3.0, cross_attention_kwargs={"coeff_scale": 0.0})
        pag_zero = _images(pag, guidance_scale=guidance_scale, pag_scale=0.0)
        # alpha really acts on PAG's own layers (the mid block's self-attention): zero it there alone
        pag_layers = [
            m.head_mix.alpha
            for p, m in coeff_modules(pipe).items()
            if p.startswith("mid_block.") and p.endswith("attn1")
        ]
        assert pag_layers
        saved = [a.detach().clone() for a in pag_layers]
        with torch.no_grad():
            for a in pag_layers:
                a.zero_()
            not_on_pag_layers = _images(pag, guidance_scale=guidance_scale, pag_scale=3.0)
            for a, s in zip(pag_layers, saved):
                a.copy_(s)
    assert np.abs(kept - not_on_pag_layers).max() > 1e-4
    np.testing.assert_array_equal(off, pag_only)  # exactly: same ops in the same order
    alpha_only = with_alpha if guidance_scale == 5.0 else _images(pipe, guidance_scale=guidance_scale)
    np.testing.assert_array_equal(pag_zero, alpha_only)
    assert np.abs(kept - pag_only).max() > 1e-2 and np.abs(kept - alpha_only).max() > 1e-2
    # diffusers puts the processors back after the call: ours again, alpha applied everywhere
    assert all(isinstance(p, CoeffAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert keep_alpha_applied(pipe) == {}
