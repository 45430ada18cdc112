"""CoeffAttnProcessor on the tiny SDXL UNet and pipeline: exactness at alpha = 0, LoRA composition,
save / load, refusals, strength, and the real SDXL layout on the meta device."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dreamcoeff import (
    CoeffAttnProcessor,
    CoeffWeightsError,
    apply_coeff,
    coeff_modules,
    coeff_parameters,
    coeff_state_dict,
    load_coeff_weights,
    remove_coeff,
    save_coeff_weights,
    set_coeff_scale,
)
from dreamcoeff.testing.sdxl import SDXL_BASE_UNET_CONFIG
from dreamcoeff.testing.tiny import build_tiny_pipeline
from tests.helpers import assert_same_tensors, assert_unet_untouched, snapshot_tensors, snapshot_unet


def _unet_out(unet, inputs, **extra):
    with torch.no_grad():
        return unet(**inputs, **extra).sample


def _randomize(unet, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _images(pipe, **kw):
    out = pipe(
        prompt="a photo of sks dog",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("targets", [("attn1",), ("attn2",), ("attn1", "attn2")])
@pytest.mark.parametrize("with_mask", [False, True])
def test_alpha_zero_equals_default_processors(tiny_pipe, unet_inputs, targets, with_mask):
    unet = tiny_pipe.unet
    unet.set_attn_processor(AttnProcessor2_0())
    extra = {}
    if with_mask:
        mask = torch.ones(2, 77)
        mask[0, 20:] = 0  # padding of the first prompt
        extra["encoder_attention_mask"] = mask
    base = _unet_out(unet, unet_inputs, **extra)
    paths = apply_coeff(unet, targets=targets)
    assert paths and all(p.rsplit(".", 1)[-1] in targets for p in paths)
    # eval: alpha is exactly 0, so A is I and the plain SDPA path runs: bit for bit the base.
    unet.eval()
    assert torch.equal(_unet_out(unet, unet_inputs, **extra), base)
    # training (alpha needs grad): the exact path runs with A = I. It sums in another order than
    # SDPA, so float32 rounding (measured up to 1.1e-6 on outputs of size ~1) is all that may differ.
    unet.train()
    out = unet(**unet_inputs, **extra).sample.detach()
    assert (out - base).abs().max() <= 1e-5
    # and a non-zero alpha really changes the output (the test above can fail)
    _randomize(unet)
    unet.eval()
    assert (_unet_out(unet, unet_inputs, **extra) - base).abs().max() > 1e-3


def test_alpha_zero_pipeline_images_equal(tiny_pipe):
    base = _images(tiny_pipe)
    apply_coeff(tiny_pipe.unet)
    assert torch.equal(_images(tiny_pipe), base)


def test_apply_selection_and_reapply_keeps_alpha(tiny_pipe):
    unet = tiny_pipe.unet
    paths = apply_coeff(unet, targets="attn2", include=["down_blocks.*"], exclude=["transformer_blocks.1"])
    assert paths and all(p.startswith("down_blocks.") and p.endswith("attn2") for p in paths)
    assert not any("transformer_blocks.1." in p for p in paths)
    untouched = [m for p, m in unet.attn_processors.items() if "up_blocks" in p]
    assert untouched and not any(isinstance(m, CoeffAttnProcessor) for m in untouched)
    _randomize(unet)
    before = snapshot_tensors(coeff_state_dict(unet))
    apply_coeff(unet, targets="attn2", include=["down_blocks.*"], exclude=["transformer_blocks.1"], dropout=0.1)
    assert_same_tensors(coeff_state_dict(unet), before)
    assert all(m.head_mix.dropout == 0.1 for m in coeff_modules(unet).values())
    # alpha are real parameters of the UNet
    names = {n for n, _ in unet.named_parameters()}
    assert all(f"{p}.head_mix.alpha" in names for p in paths)
    with pytest.raises(ValueError, match="matched no attention module"):
        apply_coeff(unet, include=["no_such_block"])
    with pytest.raises(ValueError, match="unknown coeff target"):
        apply_coeff(unet, targets=("attn3",))


def test_scale_and_per_call_strength(tiny_pipe, unet_inputs, caplog):
    unet = tiny_pipe.unet
    base = _unet_out(unet, unet_inputs)
    apply_coeff(unet, targets="attn2")  # attn1 keeps diffusers' processor
    _randomize(unet)
    full = _unet_out(unet, unet_inputs)
    assert torch.allclose(_unet_out(unet, unet_inputs, cross_attention_kwargs={"coeff_scale": 0.0}), base, atol=1e-6)
    assert torch.allclose(_unet_out(unet, unet_inputs), full)  # per-call strength does not stick
    set_coeff_scale(unet, 0.0)
    assert torch.allclose(_unet_out(unet, unet_inputs), base, atol=1e-6)
    set_coeff_scale(tiny_pipe, 1.0)
    assert torch.allclose(_unet_out(unet, unet_inputs), full)
    # strength 2 doubles the residual: A = I + 2 alpha equals alpha' = 2 alpha at strength 1
    double = _unet_out(unet, unet_inputs, cross_attention_kwargs={"coeff_scale": 2.0})
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.mul_(2)
    assert torch.allclose(double, _unet_out(unet, unet_inputs), atol=1e-6)
    # through the pipeline, with no warning from the processors that do not know coeff_scale
    with caplog.at_level("WARNING"):
        images0 = _images(tiny_pipe, cross_attention_kwargs={"coeff_scale": 0.0})
    assert "not expected" not in caplog.text
    remove_coeff(tiny_pipe)
    assert torch.allclose(images0, _images(tiny_pipe), atol=1e-6)


def test_remove_restores_default(tiny_pipe, unet_inputs):
    base = _unet_out(tiny_pipe.unet, unet_inputs)
    apply_coeff(tiny_pipe.unet)
    _randomize(tiny_pipe.unet)
    removed = remove_coeff(tiny_pipe)
    assert removed and not coeff_modules(tiny_pipe)
    assert not any("alpha" in n for n, _ in tiny_pipe.unet.named_parameters())
    assert torch.equal(_unet_out(tiny_pipe.unet, unet_inputs), base)


def test_gradients_flow_to_alpha(tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet
    apply_coeff(unet, dropout=0.1)
    unet.train()
    unet(**unet_inputs).sample.square().mean().backward()
    grads = [p.grad for p in coeff_parameters(unet)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_lora_composes_with_alpha(tiny_pipe, unet_inputs):
    from peft import LoraConfig

    unet = tiny_pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():  # make LoRA non-trivial (lora_B starts at zero)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora_out = _unet_out(unet, unet_inputs)
    apply_coeff(unet)
    assert torch.allclose(_unet_out(unet, unet_inputs), lora_out, atol=1e-6)  # alpha = 0: LoRA unchanged
    unet.train()
    unet(**unet_inputs).sample.square().mean().backward()
    lora_grads = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
    alpha_grads = [p.grad for p in coeff_parameters(unet)]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert sum(g.abs().sum() for g in lora_grads) > 0
    assert all(g is not None for g in alpha_grads) and sum(g.abs().sum() for g in alpha_grads) > 0
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.endswith(".alpha") for n in trainable)


def test_save_load_roundtrip(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    base_images = _images(tiny_pipe)
    apply_coeff(unet, targets=("attn1", "attn2"), dropout=0.2)
    _randomize(unet)
    tuned_images = _images(tiny_pipe)
    assert not torch.allclose(tuned_images, base_images, atol=1e-4)
    path = save_coeff_weights(
        tmp_path / "coeff_weights.safetensors", unet, {"base_model": "tiny", "training_args": {"lr": 1e-3}}
    )
    assert not list(tmp_path.glob("*.tmp"))

    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
        some = fh.get_tensor(next(iter(keys)))
    assert meta["format"] == "dreamcoeff" and meta["format_version"] == "1"
    assert meta["base_model"] == "tiny" and meta["coeff_dropout"] == "0.2" and meta["targets"] == "attn1,attn2"
    assert json.loads(meta["training_args"]) == {"lr": 1e-3}
    assert keys == {f"unet.{p}.alpha" for p in coeff_modules(unet)}
    assert some.dtype == torch.float32

    fresh = build_tiny_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    loaded = load_coeff_weights(fresh, path)
    assert set(loaded) == set(coeff_modules(unet))
    assert torch.equal(_images(fresh), tuned_images)
    load_coeff_weights(fresh, tmp_path, scale=0.0)  # a directory works too
    assert torch.allclose(_images(fresh), base_images, atol=1e-6)


def _saved(tmp_path, name, tensors, metadata):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_load_refusals_leave_pipeline_untouched(tiny_pipe, tmp_path):
    meta = {"format": "dreamcoeff", "format_version": "1"}
    good_key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.alpha"
    heads = 4
    cases = {
        "unknown module": (
            _saved(tmp_path, "a.safetensors", {"unet.down_blocks.9.attn1.alpha": torch.zeros(4, 4)}, meta),
            "no attention module",
        ),
        "head count": (
            _saved(tmp_path, "b.safetensors", {good_key: torch.zeros(heads + 1, heads + 1)}, meta),
            f"{heads + 1} heads in the file, {heads} in the UNet",
        ),
        "not dreamcoeff": (
            _saved(tmp_path, "c.safetensors", {good_key: torch.zeros(heads, heads)}, {"format": "pt"}),
            "not a dreamcoeff alpha file",
        ),
        "non-finite": (
            _saved(tmp_path, "d.safetensors", {good_key: torch.full((heads, heads), float("nan"))}, meta),
            "non-finite",
        ),
        "bad key": (
            _saved(tmp_path, "e.safetensors", {"text_encoder.x.alpha": torch.zeros(2, 2)}, meta),
            "not a 'unet.<attention module>.alpha' key",
        ),
        "not square": (_saved(tmp_path, "f.safetensors", {good_key: torch.zeros(4, 3)}, meta), "expected square"),
        "missing": (tmp_path / "missing.safetensors", "not found"),
    }
    pickle_path = tmp_path / "alpha.bin"
    torch.save({good_key: torch.zeros(heads, heads)}, pickle_path)
    cases["pickle"] = (pickle_path, "pickle")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    cases["garbage"] = (garbage, "not a valid safetensors file")
    truncated = tmp_path / "trunc.safetensors"
    full = _saved(tmp_path, "full.safetensors", {good_key: torch.zeros(heads, heads)}, meta).read_bytes()
    truncated.write_bytes(full[:-10])
    cases["truncated"] = (truncated, "corrupt or truncated")

    # one with a valid part and an invalid part: nothing of it may be applied
    mixed = _saved(
        tmp_path,
        "g.safetensors",
        {good_key: torch.ones(heads, heads), "unet.up_blocks.7.attn2.alpha": torch.zeros(2, 2)},
        meta,
    )
    cases["partly valid"] = (mixed, "does not fit this UNet")

    apply_coeff(tiny_pipe.unet, targets="attn2")
    _randomize(tiny_pipe.unet)
    snap = snapshot_unet(tiny_pipe)
    for path, message in cases.values():
        with pytest.raises(CoeffWeightsError, match=message):
            load_coeff_weights(tiny_pipe, path)
        assert_unet_untouched(tiny_pipe, snap)


def test_save_refuses_nan_and_keeps_previous_file(tiny_pipe, tmp_path):
    apply_coeff(tiny_pipe.unet)
    _randomize(tiny_pipe.unet)
    path = save_coeff_weights(tmp_path, tiny_pipe.unet)
    before = path.read_bytes()
    with torch.no_grad():
        coeff_parameters(tiny_pipe.unet)[0][0, 0] = float("inf")
    with pytest.raises(CoeffWeightsError, match="non-finite"):
        save_coeff_weights(path, tiny_pipe.unet)
    assert path.read_bytes() == before


def test_failed_write_leaves_previous_file(tiny_pipe, tmp_path, monkeypatch):
    apply_coeff(tiny_pipe.unet)
    path = save_coeff_weights(tmp_path / "w.safetensors", tiny_pipe.unet)
    before = path.read_bytes()
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    _randomize(tiny_pipe.unet)
    with pytest.raises(CoeffWeightsError, match="No space left"):
        save_coeff_weights(path, tiny_pipe.unet)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_loads_into_pretrained_folder(tiny_pipeline_dir, tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    apply_coeff(pipe.unet)
    _randomize(pipe.unet)
    images = _images(pipe)
    save_coeff_weights(tmp_path, pipe.unet)
    again = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    again.set_progress_bar_config(disable=True)
    load_coeff_weights(again, tmp_path)
    assert torch.equal(_images(again), images)


def test_real_sdxl_layout_on_meta_device():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    paths = apply_coeff(unet)
    assert len(paths) == 140
    assert sum(p.numel() for p in coeff_parameters(unet)) == 50_000
    heads = {m.heads for m in coeff_modules(unet).values()}
    assert heads == {10, 20}
    assert len(apply_coeff(unet, targets="attn2")) == 140  # re-apply keeps all, returns all coeff modules


def test_load_keeps_dropout_and_parameters_of_existing_processors(tiny_pipe, tmp_path):
    """Resuming loads alpha into the live processors: same Parameter objects (the optimizer holds
    them) and the training dropout unchanged."""
    apply_coeff(tiny_pipe.unet, dropout=0.2)
    params = coeff_parameters(tiny_pipe.unet)
    _randomize(tiny_pipe.unet)
    save_coeff_weights(tmp_path, tiny_pipe.unet)
    with torch.no_grad():
        for p in params:
            p.zero_()
    load_coeff_weights(tiny_pipe.unet, tmp_path)
    after = coeff_parameters(tiny_pipe.unet)
    assert all(a is b for a, b in zip(params, after)) and any(p.abs().max() > 0 for p in after)
    assert all(m.head_mix.dropout == 0.2 for m in coeff_modules(tiny_pipe.unet).values())


def test_gradient_checkpointing_gives_the_same_gradients(unet_inputs):
    grads = []
    for checkpointing in (False, True):
        pipe = build_tiny_pipeline(seed=0)
        unet = pipe.unet
        unet.requires_grad_(False)
        apply_coeff(unet, dropout=0.0)
        _randomize(unet, std=0.1)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet(**unet_inputs).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in coeff_parameters(unet)]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_head_mix_settings_and_their_errors():
    """`HeadMix`'s constructor, setters and dtype rule, each against the value it was given (issue 34
    item 2: mutants of these lines survived every model-level test)."""
    from types import MappingProxyType

    from dreamcoeff.head_mix import CoeffStrength, HeadMix, check_target_scales

    one = HeadMix(1)  # a one-head layer is a valid layer (alpha 1 x 1)
    assert one.num_heads == 1 and one.alpha.shape == (1, 1)
    with pytest.raises(ValueError) as err:
        HeadMix(0)
    assert str(err.value) == "num_heads must be >= 1, got 0"
    mix = HeadMix(3, dropout=0.25, chunk_size=16)
    assert (mix.num_heads, mix.dropout, mix.chunk_size, mix.attention_impl) == (3, 0.25, 16, "auto")
    assert mix.extra_repr() == "num_heads=3, dropout=0.25, strength=1.0"
    assert mix.alpha.dtype == torch.float32 and not mix.alpha.any()
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError) as err:
            mix.set_dropout(bad)
        assert str(err.value) == f"coefficient dropout must be in [0, 1), got {bad}"
    with pytest.raises(ValueError) as err:
        mix.set_attention_impl("fast")
    assert str(err.value) == (
        "unknown coeff attention impl 'fast': use one of 'auto', 'chunked', 'triton', 'materialized', 'cpu_fused'"
    )
    # alpha never goes below float32, and follows float64
    assert mix.half().alpha.dtype == torch.float32 and mix.to(torch.bfloat16).alpha.dtype == torch.float32
    assert mix.double().alpha.dtype == torch.float64

    with pytest.raises(ValueError) as err:
        check_target_scales({"attn3": 1.0})
    assert str(err.value) == "unknown coeff targets ['attn3']: use attn1, attn2, down_blocks, mid_block, up_blocks"
    given = {"attn1": 2}
    strength = CoeffStrength(1, given)
    given["attn1"] = 5  # the caller's dict is copied, and the copy is read-only
    assert type(strength.scale) is float and isinstance(strength.targets, MappingProxyType)
    assert dict(strength.targets) == {"attn1": 2.0} and type(strength.targets["attn1"]) is float
    with pytest.raises(TypeError):
        strength.targets["attn1"] = 3.0
