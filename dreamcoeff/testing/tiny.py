"""A tiny, randomly initialised SDXL pipeline that is built locally, with no network.

Why this exists
---------------
The trainer, the Coeff-Tuning attention processors and the sampling code all work on a real
:class:`diffusers.StableDiffusionXLPipeline`. Testing them against SDXL base (6.9 GB, hub download)
is impossible in CI and on a laptop, and the usual "tiny-random" hub checkpoints need the network as
well. This module therefore builds the *same architecture in miniature* from configs only:

* a :class:`~diffusers.UNet2DConditionModel` with the SDXL layout (``DownBlock2D`` then two
  ``CrossAttnDownBlock2D``, mirrored up blocks, ``text_time`` added conditioning, linear projections,
  more transformer layers in the deepest block, and a *different number of attention heads at each
  resolution* - the property Coeff-Tuning's per-head mixing coefficients depend on);
* an :class:`~diffusers.AutoencoderKL` with 4 blocks, i.e. the SDXL VAE scale factor of 8;
* two CLIP text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``) whose penultimate
  hidden states are concatenated into the UNet's ``cross_attention_dim``, exactly as in SDXL. They
  have *different* widths (32 and 64), so code that mixes the two encoders up fails loudly;
* two byte-level BPE CLIP tokenizers whose ``vocab.json`` / ``merges.txt`` are generated here, so
  that common prompt words (and any extra ``vocab_words``, e.g. a rare identifier like ``sks``) are
  single tokens, as they are for the real CLIP vocabulary;
* an :class:`~diffusers.EulerDiscreteScheduler` configured like SDXL base.

Everything is float32 and initialised under a fixed seed, so the same seed gives bit-identical
weights, and the global torch RNG state of the caller is restored afterwards. Building takes well
under a second and one UNet forward pass a few tens of milliseconds on a CPU. The weights are random:
images are noise, but every code path (LoRA/Coeff-Tuning injection, training steps, save/load,
sampling) runs for real.

Library quirks worth knowing (transformers 5.x):

* ``CLIPTokenizer`` is the *tokenizers*-backed class (``CLIPTokenizerFast`` is an alias of it) and
  ``save_pretrained`` writes only ``tokenizer.json`` + ``tokenizer_config.json``;
  :func:`save_tiny_pipeline` adds ``vocab.json`` / ``merges.txt`` for older readers.
* ``CLIPTextModel`` no longer wraps a ``.text_model`` submodule (its parameters are ``embeddings.*``,
  ``encoder.layers.*``, ``final_layer_norm.*``), while ``CLIPTextModelWithProjection`` still does
  (``text_model.encoder.layers.*``). Use ``get_input_embeddings()`` / module-name suffixes rather
  than hard-coded ``text_model.`` paths (diffusers' ``text_encoder_attn_modules`` breaks on it).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_RESOLUTION",
    "TINY_LATENT_SIZE",
    "TINY_VAE_SCALE_FACTOR",
    "TINY_MAX_LENGTH",
    "TEXT_ENCODER_HIDDEN_SIZE",
    "TEXT_ENCODER_2_HIDDEN_SIZE",
    "TEXT_ENCODER_2_PROJECTION_DIM",
    "ADDITION_TIME_EMBED_DIM",
    "DEFAULT_VOCAB_WORDS",
    "build_tiny_tokenizer_files",
    "build_tiny_tokenizer",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "write_tokenizer_files",
    "tiny_unet_config",
    "tiny_vae_config",
    "tiny_scheduler_config",
    "tiny_text_encoder_configs",
]

# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------

#: Default image side in pixels (SDXL base uses 1024). ``pipe()`` without height/width uses this.
TINY_RESOLUTION = 64
#: VAE downsampling factor, the same as SDXL: 4 VAE blocks -> 2 ** 3.
TINY_VAE_SCALE_FACTOR = 8
#: Latent side at the default resolution; also the UNet's ``sample_size``.
TINY_LATENT_SIZE = TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR
#: CLIP context length. Kept at the real 77 so prompt padding/truncation behaves as in SDXL.
TINY_MAX_LENGTH = 77

#: Width of ``text_encoder`` (CLIP ViT-L in SDXL: 768).
TEXT_ENCODER_HIDDEN_SIZE = 32
#: Width of ``text_encoder_2`` (OpenCLIP bigG in SDXL: 1280). Deliberately != the first encoder.
TEXT_ENCODER_2_HIDDEN_SIZE = 64
#: Pooled, projected output of ``text_encoder_2`` fed to the UNet's ``text_time`` embedding (SDXL: 1280).
#: Deliberately != its hidden size, so using the wrong one is caught.
TEXT_ENCODER_2_PROJECTION_DIM = 32
#: Per-scalar Fourier embedding width of the 6 SDXL micro-conditioning time ids (SDXL: 256).
ADDITION_TIME_EMBED_DIM = 8
#: SDXL passes 6 time ids: original (h, w), crop top-left (y, x), target (h, w).
_NUM_TIME_IDS = 6

#: Words that become single tokens in the generated vocabulary: the DreamBooth prompt templates
#: (subject and class-prior prompts, the live-subject evaluation prompts), rare identifiers used as
#: concept tokens, and common captioning words. Extra words can be passed as ``vocab_words``.
DEFAULT_VOCAB_WORDS: tuple[str, ...] = (
    # the canonical prompt and rare identifier tokens
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "of",
    "sks",
    "ohwx",
    "zwx",
    "xyz",
    "dog",
    "cat",
    "toy",
    "backpack",
    "person",
    "man",
    "woman",
    "boy",
    "girl",
    "bird",
    "car",
    "bowl",
    "vase",
    "teapot",
    "sneaker",
    "shoe",
    "clock",
    "robot",
    "plushie",
    "sunglasses",
    # prepositions / glue
    "on",
    "in",
    "with",
    "and",
    "at",
    "by",
    "top",
    "background",
    "front",
    "next",
    "to",
    "is",
    "for",
    # DreamBooth live-subject evaluation prompts
    "jungle",
    "snow",
    "beach",
    "cobblestone",
    "street",
    "pink",
    "fabric",
    "wooden",
    "floor",
    "city",
    "mountain",
    "blue",
    "house",
    "purple",
    "rug",
    "forest",
    "wearing",
    "red",
    "hat",
    "santa",
    "rainbow",
    "scarf",
    "black",
    "monocle",
    "chef",
    "outfit",
    "firefighter",
    "police",
    "glasses",
    "yellow",
    "shirt",
    "wizard",
    "shiny",
    "wet",
    "cube",
    "shaped",
    # common captioning / style words
    "green",
    "white",
    "orange",
    "brown",
    "gray",
    "small",
    "big",
    "cute",
    "fluffy",
    "sitting",
    "standing",
    "lying",
    "grass",
    "table",
    "sofa",
    "park",
    "water",
    "sky",
    "sunset",
    "portrait",
    "painting",
    "style",
    "high",
    "quality",
    "detailed",
    "close",
    "up",
    "view",
    "studio",
    "lighting",
    "realistic",
    "cartoon",
    "drawing",
    "sketch",
    "watercolor",
    "oil",
    "blurry",
    "low",
    "ugly",
    "bad",
    "worst",
)

# The CLIP pre-tokenizer split pattern (identical to transformers' CLIPTokenizer / CLIPTokenizerFast
# converter): the special tokens, English contractions, runs of letters, single digits, runs of
# other non-space characters.
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

# Per-component seed offsets: each module is initialised from its own seed, so adding or re-ordering
# components never changes the weights of the others.
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def tiny_unet_config() -> dict[str, Any]:
    """Return the ``UNet2DConditionModel`` config of the tiny pipeline (a fresh dict each call).

    SDXL base in miniature (SDXL values in brackets):

    * 3 resolution levels, ``block_out_channels=(32, 64, 128)`` [(320, 640, 1280)], attention only
      in the two lower-resolution levels and the mid block;
    * ``attention_head_dim=(2, 4, 8)`` [(5, 10, 20)] - despite the name diffusers reads this as the
      *number of heads* per block (diffusers issue #2011). The first, attention-free level ignores
      its entry, so the attention layers get 4 heads at 1/2 resolution and 8 heads at 1/4 resolution
      and in the mid block, with a per-head width of 16 [64] everywhere;
    * ``transformer_layers_per_block=(1, 1, 2)`` [(1, 2, 10)]: the deepest level stacks more layers;
    * ``cross_attention_dim = 32 + 64`` [768 + 1280]: the concatenated text encoder hidden states;
    * ``text_time`` added conditioning: ``6 * 8 + 32`` [6 * 256 + 1280] input features.
    """
    return {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "only_cross_attention": False,
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        # 8 groups instead of SDXL's 32 so that the 32-channel level still has 4 channels per group.
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": TEXT_ENCODER_HIDDEN_SIZE + TEXT_ENCODER_2_HIDDEN_SIZE,
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (2, 4, 8),
        "use_linear_projection": True,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": _NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM
        + TEXT_ENCODER_2_PROJECTION_DIM,
    }


def tiny_vae_config() -> dict[str, Any]:
    """Return the ``AutoencoderKL`` config: 4 blocks (scale factor 8 like SDXL), 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 32, 32),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": TINY_RESOLUTION,
        # SDXL's 0.13025 brings the real VAE's latents to ~unit variance. A freshly initialised VAE has
        # posterior log-variance ~0, so `latent_dist.sample()` is already ~unit variance (measured:
        # std 1.02-1.11 for seeds 0-2): 1.0 keeps the diffusion model's inputs at the scale SDXL sees.
        "scaling_factor": 1.0,
        # Matches SDXL base's VAE config; only has an effect for float16 pipelines.
        "force_upcast": True,
    }


def tiny_scheduler_config() -> dict[str, Any]:
    """Return the ``EulerDiscreteScheduler`` config of SDXL base (scheduler_config.json)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def tiny_text_encoder_configs(
    vocab_size: int, bos_token_id: int, eos_token_id: int
) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """Return the configs of ``text_encoder`` (CLIPTextModel) and ``text_encoder_2`` (with projection).

    Two layers each, the minimum for SDXL's "penultimate hidden state" to differ from the embeddings.
    ``eos_token_id`` must be the tokenizer's real id: CLIP pools the hidden state at the first EOS token
    (only the legacy ``eos_token_id == 2`` configs use ``argmax(input_ids)`` instead).
    """
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "max_position_embeddings": TINY_MAX_LENGTH,
        "num_hidden_layers": 2,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    text_encoder = CLIPTextConfig(
        hidden_size=TEXT_ENCODER_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_ENCODER_HIDDEN_SIZE,
        num_attention_heads=4,
        projection_dim=TEXT_ENCODER_HIDDEN_SIZE,
        hidden_act="quick_gelu",  # as OpenAI CLIP ViT-L (SDXL text_encoder)
        **common,
    )
    text_encoder_2 = CLIPTextConfig(
        hidden_size=TEXT_ENCODER_2_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_ENCODER_2_HIDDEN_SIZE,
        num_attention_heads=4,
        projection_dim=TEXT_ENCODER_2_PROJECTION_DIM,
        hidden_act="gelu",  # as OpenCLIP bigG (SDXL text_encoder_2)
        **common,
    )
    return text_encoder, text_encoder_2


# --------------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE vocabulary generated from a word list
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries, CLIP's order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _clip_pretokenize(text: str) -> list[str]:
    """Split ``text`` into byte-level "words" exactly like CLIPTokenizer does before BPE."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one pre-tokenized word, CLIP style (last symbol carries ``</w>``)."""
    symbols = list(word[:-1]) + [word[-1] + _END_OF_WORD]
    while len(symbols) > 1:
        pairs = list(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_tiny_tokenizer_files(vocab_words: Iterable[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Generate a CLIP-style ``vocab.json`` mapping and ``merges.txt`` lines.

    Layout follows the real CLIP vocabulary: the 256 byte-level characters, the same 256 with the
    ``</w>`` end-of-word suffix, the merged tokens in merge order, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the last two ids.

    Merges are generated greedily, one word at a time: run BPE with the merges so far, and while the
    word is still split, append a merge of its first two symbols. A new merge has the lowest priority,
    so it only fires once every older merge is exhausted; words already reduced to a single token are
    therefore never affected by merges added later, and every word of ``DEFAULT_VOCAB_WORDS`` and
    ``vocab_words`` ends up as exactly one token (``"dog"`` -> ``"dog</w>"``). Multi-word strings are
    split like CLIP does (so ``"ohwx man"`` adds ``ohwx`` and ``man``).
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + _END_OF_WORD for c in byte_chars]
    known = set(vocab_list)
    ranks: dict[tuple[str, str], int] = {}

    words: dict[str, None] = {}  # ordered set: the vocabulary must not depend on hash order
    for text in list(DEFAULT_VOCAB_WORDS) + list(vocab_words or ()):
        for word in _clip_pretokenize(text):
            words.setdefault(word, None)

    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(ranks)
            token = pair[0] + pair[1]
            if token not in known:
                known.add(token)
                vocab_list.append(token)
            symbols = _bpe(word, ranks)

    vocab_list += [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def write_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tiny_tokenizer(vocab_words: Iterable[str] | None = None) -> CLIPTokenizer:
    """Build a CLIP tokenizer from freshly generated ``vocab.json`` / ``merges.txt``.

    The files are written to a temporary folder and loaded with ``CLIPTokenizer.from_pretrained``,
    the same code path as a hub SDXL checkpoint. ``model_max_length`` is 77, and the pipeline pads
    with ``padding="max_length"`` to it.
    """
    vocab, merges = build_tiny_tokenizer_files(vocab_words)
    with tempfile.TemporaryDirectory(prefix="dreamcoeff-tiny-tok-") as tmp:
        write_tokenizer_files(Path(tmp), vocab, merges)
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=TINY_MAX_LENGTH,
            bos_token=_BOS,
            eos_token=_EOS,
            unk_token=_EOS,
            pad_token=_EOS,
        )
    # transformers records the (now deleted) temporary folder as the name; say what it is instead.
    tokenizer.name_or_path = "dreamcoeff-tiny-clip-tokenizer"

    # Guard the contract "every listed word is one token" (cheap, and catches a vocabulary bug or a
    # change in the CLIP pre-tokenizer immediately instead of as a confusing training failure).
    words = list(DEFAULT_VOCAB_WORDS) + list(vocab_words or ())
    ids = tokenizer(words, add_special_tokens=False).input_ids
    split = [w for w, i in zip(words, ids) if len(i) != len(_clip_pretokenize(w))]
    if split:
        raise RuntimeError(f"tiny tokenizer splits words that should be single tokens: {split[:10]}")
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_tiny_pipeline(seed: int = 0, vocab_words: Iterable[str] | None = None) -> StableDiffusionXLPipeline:
    """Build a tiny random-weight SDXL pipeline, offline, in float32, on the CPU.

    Args:
        seed: Weights are a pure function of ``seed`` (and of the library versions): the same seed
            gives bit-identical weights. Each component uses its own derived seed. The caller's global
            torch RNG state is saved and restored, so building never disturbs ``torch.manual_seed``.
        vocab_words: Extra words (e.g. a concept identifier) to make single tokens, on top of
            :data:`DEFAULT_VOCAB_WORDS`. Changing them changes the vocabulary size and hence the
            token-embedding tables, i.e. the text encoder weights.

    Returns:
        A ``StableDiffusionXLPipeline`` with ``force_zeros_for_empty_prompt=True``, no watermarker,
        ``image_encoder``/``feature_extractor`` left ``None``, and all models in eval mode (as
        ``from_pretrained`` would return them). Its default height/width is :data:`TINY_RESOLUTION`.
    """
    vocab_words = list(vocab_words or ())
    tokenizer = build_tiny_tokenizer(vocab_words)
    # SDXL ships two tokenizer folders; here they are identical but must be separate objects.
    tokenizer_2 = build_tiny_tokenizer(vocab_words)
    te_config, te2_config = tiny_text_encoder_configs(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )

    # Module constructors draw their initial weights from the global CPU generator. Seeding it inside
    # fork_rng makes the build deterministic and hands the caller back its own RNG state afterwards.
    # The default dtype is pinned too, so a caller's torch.set_default_dtype cannot leak in.
    with torch.random.fork_rng(devices=[]), _default_dtype(torch.float32):
        torch.manual_seed(seed + _SEED_OFFSETS["unet"])
        unet = UNet2DConditionModel(**tiny_unet_config())
        torch.manual_seed(seed + _SEED_OFFSETS["vae"])
        vae = AutoencoderKL(**tiny_vae_config())
        torch.manual_seed(seed + _SEED_OFFSETS["text_encoder"])
        text_encoder = CLIPTextModel(te_config)
        torch.manual_seed(seed + _SEED_OFFSETS["text_encoder_2"])
        text_encoder_2 = CLIPTextModelWithProjection(te2_config)

    scheduler = EulerDiscreteScheduler(**tiny_scheduler_config())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        # SDXL would watermark its outputs when invisible-watermark is installed. The flag is not saved
        # in model_index.json, so with that package present a from_pretrained reload needs
        # add_watermarker=False as well to reproduce this pipeline's images exactly.
        add_watermarker=False,
    )
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return pipe


def save_tiny_pipeline(path: str | Path, seed: int = 0, vocab_words: Iterable[str] | None = None) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors) into folder ``path``.

    The folder loads back with ``StableDiffusionXLPipeline.from_pretrained(path)`` and gives the same
    outputs. Besides transformers 5's ``tokenizer.json``, each tokenizer folder also gets the classic
    ``vocab.json`` / ``merges.txt`` pair, as in the SDXL hub repository, so that older transformers
    (slow ``CLIPTokenizer``) and other tools can read it too.

    Returns:
        The folder, as a ``Path``.
    """
    path = Path(path)
    pipe = build_tiny_pipeline(seed=seed, vocab_words=vocab_words)
    pipe.save_pretrained(path, safe_serialization=True)
    vocab, merges = build_tiny_tokenizer_files(vocab_words)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(path / sub, vocab, merges)
    return path
