"""Tests for dreamcoeff.testing.tiny: the offline, tiny SDXL pipeline the rest of the suite builds on."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.models.attention import BasicTransformerBlock

from dreamcoeff.testing.tiny import (
    DEFAULT_VOCAB_WORDS,
    TINY_LATENT_SIZE,
    TINY_MAX_LENGTH,
    TINY_RESOLUTION,
    TINY_VAE_SCALE_FACTOR,
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_unet_config,
)

MODEL_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipe", seed=0)


def _assert_same_weights(a: StableDiffusionXLPipeline, b: StableDiffusionXLPipeline) -> None:
    for name in MODEL_NAMES:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs"


def _unet_inputs(batch: int = 2, latent: int = TINY_LATENT_SIZE) -> dict:
    """Fixed SDXL-shaped UNet inputs, from a private generator."""
    g = torch.Generator().manual_seed(1234)
    cfg = tiny_unet_config()
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.tensor([999, 10][:batch] + [500] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, TINY_MAX_LENGTH, cfg["cross_attention_dim"], generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        },
    }


def _images(p: StableDiffusionXLPipeline, **kwargs) -> np.ndarray:
    args = {
        "prompt": PROMPT,
        "num_inference_steps": 2,
        "height": TINY_RESOLUTION,
        "width": TINY_RESOLUTION,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }
    args.update(kwargs)
    return p(**args).images


# ---------------------------------------------------------------------------------------------------
# Determinism and speed
# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_weights_and_keeps_global_rng(pipe):
    torch.manual_seed(4321)
    state = torch.get_rng_state()
    again = build_tiny_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), state), "building must not disturb the caller's RNG"
    _assert_same_weights(pipe, again)

    other = build_tiny_pipeline(seed=1)
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)
    # get_input_embeddings(): transformers 5's CLIPTextModel has no `.text_model` wrapper any more.
    assert not torch.equal(
        pipe.text_encoder.get_input_embeddings().weight, other.text_encoder.get_input_embeddings().weight
    )


def test_build_is_fast_float32_eval():
    build_tiny_pipeline(seed=3)  # warm up lazy imports
    start = time.perf_counter()
    p = build_tiny_pipeline(seed=3)
    assert time.perf_counter() - start < 3.0
    for name in MODEL_NAMES:
        model = getattr(p, name)
        assert model.dtype == torch.float32, name
        assert not model.training, name  # like from_pretrained


def test_default_dtype_of_caller_does_not_leak():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = build_tiny_pipeline(seed=0)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert all(getattr(p, n).dtype == torch.float32 for n in MODEL_NAMES)


# ---------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------


def test_components_are_consistent_like_sdxl(pipe):
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.use_linear_projection
    # SDXL concatenates the penultimate hidden states of both text encoders.
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert te1.hidden_size != te2.hidden_size  # so mixing them up cannot go unnoticed
    # 6 micro-conditioning ids + the pooled, projected text_encoder_2 output.
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert pipe.unet.add_embedding.linear_1.in_features == unet.projection_class_embeddings_input_dim
    assert max(unet.transformer_layers_per_block) > 1
    assert te1.max_position_embeddings == te2.max_position_embeddings == TINY_MAX_LENGTH
    assert te1.vocab_size == len(pipe.tokenizer) and te2.vocab_size == len(pipe.tokenizer_2)
    assert te1.eos_token_id == pipe.tokenizer.eos_token_id

    assert pipe.vae_scale_factor == TINY_VAE_SCALE_FACTOR == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.default_sample_size * pipe.vae_scale_factor == TINY_RESOLUTION

    sched = pipe.scheduler
    assert isinstance(sched, EulerDiscreteScheduler)
    sc = sched.config
    assert (sc.beta_start, sc.beta_end, sc.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sc.num_train_timesteps, sc.prediction_type, sc.steps_offset, sc.timestep_spacing) == (
        1000,
        "epsilon",
        1,
        "leading",
    )

    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.image_encoder is None and pipe.feature_extractor is None


def test_unet_has_self_and_cross_attention_at_several_resolutions_with_different_heads(pipe):
    unet = pipe.unet
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(b.attn1 is not None and b.attn2 is not None for b in blocks)
    cross_dim = unet.config.cross_attention_dim
    for b in blocks:
        assert not b.attn1.is_cross_attention and b.attn2.is_cross_attention
        assert b.attn2.to_k.in_features == cross_dim

    # Record the token count each attention layer actually sees = the resolution it works at.
    heads_by_tokens: dict[tuple[str, int], set[int]] = defaultdict(set)
    hooks = []
    for b in blocks:
        for kind in ("attn1", "attn2"):
            attn = getattr(b, kind)
            hooks.append(
                attn.register_forward_hook(
                    lambda mod, args, out, kind=kind: heads_by_tokens[(kind, args[0].shape[1])].add(mod.heads)
                )
            )
    try:
        with torch.no_grad():
            unet(**_unet_inputs(batch=2, latent=2 * TINY_LATENT_SIZE))
    finally:
        for h in hooks:
            h.remove()

    for kind in ("attn1", "attn2"):
        resolutions = {tokens for (k, tokens) in heads_by_tokens if k == kind}
        heads = set().union(*(h for (k, _), h in heads_by_tokens.items() if k == kind))
        assert len(resolutions) >= 2, (kind, resolutions)
        assert len(heads) >= 2, (kind, heads)
    assert sum(1 for m in unet.modules() if m.__class__.__name__ == "Attention") == 2 * len(blocks)


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_tokenizer_pads_to_77_and_keeps_words_whole(pipe, name):
    tok = getattr(pipe, name)
    assert tok.model_max_length == TINY_MAX_LENGTH
    ids = tok(
        PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, TINY_MAX_LENGTH)
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    words = PROMPT.split()
    assert tokens[: len(words) + 2] == ["<|startoftext|>", *[w + "</w>" for w in words], "<|endoftext|>"]
    assert set(tokens[len(words) + 1 :]) == {"<|endoftext|>"}  # padded with EOS like SDXL's tokenizer
    # every listed word is one token (case-insensitive like CLIP)
    for word in DEFAULT_VOCAB_WORDS:
        assert len(tok(word.upper(), add_special_tokens=False).input_ids) == 1, word
    # truncation to 77
    long = tok(" ".join(["dog"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id


def test_extra_vocab_words_become_single_tokens(pipe):
    p = build_tiny_pipeline(seed=0, vocab_words=["qzxv", "ohwx man"])
    assert len(pipe.tokenizer("qzxv", add_special_tokens=False).input_ids) > 1
    assert len(p.tokenizer("qzxv", add_special_tokens=False).input_ids) == 1
    assert p.text_encoder.config.vocab_size == len(p.tokenizer) > len(pipe.tokenizer)
    embeds, _, pooled, _ = p.encode_prompt("a photo of qzxv dog", do_classifier_free_guidance=False)
    assert embeds.shape == (1, TINY_MAX_LENGTH, p.unet.config.cross_attention_dim)
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


# ---------------------------------------------------------------------------------------------------
# Running, saving, loading
# ---------------------------------------------------------------------------------------------------


def test_pipeline_makes_finite_images_of_the_right_shape(pipe):
    images = _images(pipe)
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0

    latents = _images(pipe, output_type="latent", height=128, width=128)
    assert latents.shape == (1, 4, 16, 16)

    # (the calls above use CFG with no negative prompt: the force_zeros_for_empty_prompt path)
    # default size, CFG off, 2 images per prompt
    images = _images(pipe, height=None, width=None, guidance_scale=1.0, negative_prompt=None, num_images_per_prompt=2)
    assert images.shape == (2, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(images).all()


def test_save_load_round_trip_is_exact(pipe, saved_dir):
    assert (saved_dir / "model_index.json").is_file()
    assert (saved_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved_dir / "text_encoder_2" / "model.safetensors").is_file()
    assert (saved_dir / "tokenizer" / "vocab.json").is_file()
    assert (saved_dir / "tokenizer_2" / "merges.txt").is_file()

    loaded = StableDiffusionXLPipeline.from_pretrained(saved_dir)
    _assert_same_weights(pipe, loaded)
    assert loaded.config.force_zeros_for_empty_prompt is True
    assert loaded.scheduler.config.timestep_spacing == "leading"
    assert loaded.image_encoder is None and loaded.feature_extractor is None

    for name in ("tokenizer", "tokenizer_2"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        assert b.model_max_length == TINY_MAX_LENGTH and len(a) == len(b)
        text = [PROMPT, "A RED cat's toy on the beach, 2 dogs!!", ""]
        assert (
            a(text, padding="max_length", max_length=77).input_ids
            == b(text, padding="max_length", max_length=77).input_ids
        )

    with torch.no_grad():
        inputs = _unet_inputs()
        assert torch.equal(pipe.unet(**inputs).sample, loaded.unet(**inputs).sample)

    assert np.array_equal(_images(pipe), _images(loaded))
