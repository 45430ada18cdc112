"""Tests of the prompt-grid sampler (the dreamcoeff.sample package) and its CLI (dreamcoeff.sample.cli).

Everything runs on the tiny SDXL pipeline (64 px, 2 steps) and on tiny CLIP / ViT models built from
configs, so nothing is downloaded.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcoeff import (
    apply_coeff,
    coeff_modules,
    coeff_parameters,
    load_coeff_weights,
    remove_coeff,
    save_coeff_weights,
)
from dreamcoeff import sample as S
from dreamcoeff.sample import main
from dreamcoeff.sample import metrics as M
from dreamcoeff.testing.tiny import build_tiny_pipeline, build_tiny_tokenizer, tiny_unet_config

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "dreamcoeff" / "prompts"  # packaged prompt files
SHARED_PROMPTS = REPO.parent / "shared" / "dreambooth" / "prompts_and_classes.txt"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, busy 2-core machine two OpenMP threads wait on each other
    at every op (measured: a 2-step tiny pipeline call takes 1-14 s instead of 0.1-0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config())


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Training output folders as the trainer writes them: coeff/ (alpha + args.json) and lora/."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("runs")
    g = torch.Generator().manual_seed(1)
    unet = _tiny_unet()
    apply_coeff(unet)
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    (root / "coeff").mkdir()
    save_coeff_weights(root / "coeff", unet, metadata={"training_args": {"coeff_lr": 1e-2}})
    (root / "coeff" / "args.json").write_text(json.dumps({"coeff_lr": 1e-2, "max_train_steps": 10}))

    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )

    unet = _tiny_unet()  # a --tuning full output: the whole UNet, perturbed
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(root / "full" / "unet")
    return root


@pytest.fixture(scope="module")
def foreign_weights(tmp_path_factory):
    """An alpha file and a LoRA file made for another UNet (other head counts / widths / modules)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("foreign")
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    save_file(
        {
            f"unet.{block}.attn1.alpha": torch.zeros(10, 10),  # the tiny UNet has 4 heads here
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.alpha": torch.zeros(5, 5),  # no such module
        },
        str(root / "coeff_weights.safetensors"),
        metadata={"format": "dreamcoeff", "format_version": "1"},
    )
    (root / "lora").mkdir()
    save_file(
        {
            f"unet.{block}.attn1.to_q.lora.down.weight": torch.zeros(4, 640),  # to_q takes 64 features
            f"unet.{block}.attn1.to_q.lora.up.weight": torch.zeros(640, 4),
        },
        str(root / "lora" / "pytorch_lora_weights.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """Tiny CLIP (with the tiny tokenizer) and ViT folders, saved like hub checkpoints."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("metric_models")
    tok = build_tiny_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tok),
                max_position_embeddings=77,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                **small,
            ),
            vision_config=dict(image_size=32, patch_size=8, **small),
            projection_dim=16,
        )
    )
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **small), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _frozen_tiny_pipe():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    # The sampler freezes its models (PyTorch's CPU linear kernels differ by ~1e-7 with and without
    # requires_grad); a reference pipeline must do the same to compare bit for bit.
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False)
    return pipe


# ----------------------------------------------------------------------------------------------
# prompts


def test_read_prompt_file_fills_placeholders_and_skips_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(
        "# a comment {nope}\n\na {token} {class}  in the   snow\n   # indented comment\nliteral {{braces}} {class}\n"
    )
    assert S.read_prompt_file(f, "sks", "dog") == ["a sks dog in the snow", "literal {braces} dog"]
    assert M.metric_text("a sks dog in the snow", "sks") == "a dog in the snow"
    assert M.metric_text("a sksy dog", "sks") == "a sksy dog"


@pytest.mark.parametrize(
    "text, token, message",
    [
        ("# only a comment\n\n   \n", "sks", "holds no prompts"),
        ("a {token} dog\na {tokn} {class}\n", "sks", r"p\.txt:2: unknown placeholder \{tokn\}"),
        ("a {0} dog\n", "sks", r"unknown placeholder \{0\}"),
        ("a {token} dog {\n", "sks", "literal braces"),
        ("a {token!r} dog\n", "sks", "format spec"),
        ("a {token} dog\n", None, r"uses \{token\} but no value was given \(--token\)"),
    ],
)
def test_read_prompt_file_errors(tmp_path, text, token, message):
    f = tmp_path / "p.txt"
    f.write_text(text)
    with pytest.raises(S.SamplingError, match=message):
        S.read_prompt_file(f, token, "dog")


def test_missing_prompt_file(tmp_path):
    with pytest.raises(S.SamplingError, match="does not exist"):
        S.read_prompt_file(tmp_path / "nope.txt", "sks", "dog")


def _paper_prompts(section: str) -> list[str]:
    text = SHARED_PROMPTS.read_text()
    start = text.index(section)
    end = text.index("Live Subject Prompts") if section == "Object Prompts" else len(text)
    return [p.format("sks", "dog") for p in re.findall(r"'([^']*)'\.format", text[start:end])]


@pytest.mark.parametrize(
    "name, section", [("dreambooth_objects.txt", "Object Prompts"), ("dreambooth_live.txt", "Live Subject Prompts")]
)
def test_shipped_dreambooth_prompt_files(name, section):
    prompts = S.read_prompt_file(PROMPTS / name, "sks", "dog")
    assert len(prompts) == 25 and len(set(prompts)) == 25
    assert all("sks dog" in p for p in prompts)
    if SHARED_PROMPTS.is_file():
        assert prompts == _paper_prompts(section)


def test_cli_finds_shipped_prompt_files_by_name(tmp_path):
    from dreamcoeff.sample.prompts import find_prompt_file as _resolve_prompt_file

    assert _resolve_prompt_file("dreambooth_live") == PROMPTS / "dreambooth_live.txt"
    assert _resolve_prompt_file("validation.txt") == PROMPTS / "validation.txt"
    local = tmp_path / "validation.txt"
    local.write_text("a dog\n")
    assert _resolve_prompt_file(str(local)) == local  # an existing path wins


def test_old_prompts_path_falls_back_to_the_packaged_file(tmp_path, monkeypatch):
    """The README's ``--prompts prompts/dreambooth_live.txt`` (files once in the repository) works from any folder."""
    monkeypatch.chdir(tmp_path)
    assert S.find_prompt_file("prompts/dreambooth_live.txt") == PROMPTS / "dreambooth_live.txt"
    assert S.find_prompt_file("../prompts/validation") == PROMPTS / "validation.txt"
    assert S.find_prompt_file("elsewhere/validation.txt") == Path("elsewhere/validation.txt")  # only a prompts/ folder
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "validation.txt").write_text("a {class}\n")
    assert S.read_prompt_file(S.find_prompt_file("prompts/validation.txt"), None, "dog") == [
        "a dog"
    ]  # a real file wins
    with pytest.raises(S.SamplingError, match="does not exist"):
        S.read_prompt_file(S.find_prompt_file("prompts/nope.txt"), "sks", "dog")
    assert S.packaged_prompt_files() == ["dreambooth_live", "dreambooth_objects", "validation"]


def test_shipped_validation_prompts():
    prompts = S.read_prompt_file(PROMPTS / "validation.txt", "sks", "dog")
    assert 3 <= len(prompts) <= 8
    assert prompts[0] == "a photo of sks dog"
    assert all("sks dog" in p for p in prompts)


# ----------------------------------------------------------------------------------------------
# runs and rows


def test_parse_run_finds_weights(run_dirs):
    coeff = S.parse_run(f"c={run_dirs / 'coeff'}")
    assert (coeff.name, coeff.kind, coeff.alpha_path.name, coeff.lora_path) == (
        "c",
        "alpha",
        "coeff_weights.safetensors",
        None,
    )
    assert coeff.training_args() == {"coeff_lr": 1e-2, "max_train_steps": 10}
    both = S.parse_run(f"both={run_dirs / 'coeff' / 'coeff_weights.safetensors'},{run_dirs / 'lora'}")
    assert both.kind == "alpha+lora"
    # a weight file is recognised by its header, whatever its name
    lora = S.parse_run(str(run_dirs / "lora" / "pytorch_lora_weights.safetensors"))
    assert (lora.name, lora.kind) == ("lora", "lora")
    assert S.parse_run(str(run_dirs / "coeff")).name == "coeff"


def test_parse_run_errors(run_dirs, tmp_path):
    with pytest.raises(S.SamplingError, match=r"run 'dog': .*missing does not exist"):
        S.parse_run(f"dog={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SamplingError, match=r"run 'e': .*holds neither"):
        S.parse_run(f"e={tmp_path / 'empty'}")
    with pytest.raises(S.SamplingError, match="run name 'a b'"):
        S.parse_run(f"a b={run_dirs / 'coeff'}")
    with pytest.raises(S.SamplingError, match="two alpha files"):
        S.parse_run(f"x={run_dirs / 'coeff'},{run_dirs / 'coeff'}")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(S.SamplingError, match="not a readable safetensors file"):
        S.parse_run(f"j={tmp_path / 'junk.safetensors'}")


def test_plan_rows(run_dirs):
    coeff = S.parse_run(f"coeff={run_dirs / 'coeff'}")
    lora = S.parse_run(f"lora={run_dirs / 'lora'}")
    rows = S.plan_rows([coeff, lora], include_base=True, coeff_scales=[0, 0.5])
    assert [(r.name, r.coeff_scale, r.has_lora) for r in rows] == [
        ("base", None, False),
        ("coeff@0", 0.0, False),
        ("coeff@0.5", 0.5, False),
        ("lora", None, True),
    ]
    assert [r.slug for r in rows] == ["base", "coeff_c0", "coeff_c0.5", "lora"]
    assert [r.name for r in S.plan_rows([coeff])] == ["coeff"]
    with pytest.raises(S.SamplingError, match="'coeff' is given twice"):
        S.plan_rows([coeff, S.parse_run(f"coeff={run_dirs / 'lora'}")])
    with pytest.raises(S.SamplingError, match="taken by --include_base"):
        S.plan_rows([S.parse_run(f"base={run_dirs / 'coeff'}")], include_base=True)
    with pytest.raises(S.SamplingError, match="no run has an alpha file"):
        S.plan_rows([lora], coeff_scales=[0, 1])
    with pytest.raises(S.SamplingError, match="nothing to sample"):
        S.plan_rows([])


def test_scheduler_and_dtype_names():
    assert S.resolve_scheduler("euler_a")[0].__name__ == "EulerAncestralDiscreteScheduler"
    assert S.resolve_scheduler("dpm++_karras")[1] == {"use_karras_sigmas": True}
    assert S.resolve_scheduler("DDIMScheduler")[0].__name__ == "DDIMScheduler"
    with pytest.raises(S.SamplingError, match="unknown --scheduler 'AutoencoderKL'"):
        S.resolve_scheduler("AutoencoderKL")
    assert S.resolve_dtype("auto", "cuda") == torch.float16 and S.resolve_dtype("auto", "cpu") == torch.float32
    assert S.resolve_dtype("bf16", "cpu") == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# grids


def _solid(color, size=64):
    return Image.new("RGB", (size, size), color)


def _has_text(region: Image.Image) -> bool:
    return bool((np.asarray(region.convert("L")) < 128).any())


def test_make_grid_size_tiles_and_labels():
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    cols = ["p00: a sks dog", "p01: a sks dog in the snow", "p02: a cube shaped sks dog"]
    grid = make = S.make_grid(images, ["base\nbase model", "coeff\nalpha c=1"], cols, title="seed 0")
    layout = grid.info["grid_layout"]
    (x0, y0), (tw, th), gap = layout["origin"], layout["tile_size"], layout["gap"]
    assert (tw, th) == (128, 128)  # 64-px tiles are upscaled x2 for legibility
    assert grid.size == (x0 + 3 * tw + 3 * gap, y0 + 2 * th + 2 * gap)
    assert x0 > 40 and y0 > 30  # room for row labels, title and column labels
    for r in range(2):
        for c in range(3):
            left, top = x0 + c * (tw + gap), y0 + r * (th + gap)
            tile = grid.crop((left, top, left + tw, top + th))
            assert np.array_equal(np.asarray(tile), np.asarray(images[r][c].resize((tw, th), Image.Resampling.NEAREST)))
    # every column and every row has its label drawn
    for c in range(3):
        left = x0 + c * (tw + gap)
        assert _has_text(make.crop((left, y0 // 3, left + tw, y0)))
    for r in range(2):
        top = y0 + r * (th + gap)
        assert _has_text(grid.crop((0, top, x0 - gap, top + th)))
    # different labels draw differently; no labels, no margins
    other = S.make_grid(images, ["lora\nLoRA", "both\nalpha c=1 + LoRA"], cols, title="seed 0")
    assert other.size[1] == grid.size[1]
    assert not np.array_equal(
        np.asarray(other.crop((0, y0, x0, grid.size[1]))), np.asarray(grid.crop((0, y0, x0, grid.size[1])))
    )
    bare = S.make_grid(images)
    assert bare.size == (3 * tw + 4 * gap, 2 * th + 3 * gap)


def test_make_grid_wraps_long_labels_instead_of_widening():
    images = [[_solid((255, 0, 0)), _solid((0, 0, 255))]]
    short = S.make_grid(images, ["run"], ["a dog", "a cat"])
    long_text = "a sks dog wearing a black top hat and a monocle on top of a purple rug in a forest"
    long = S.make_grid(images, ["run"], [long_text, "a cat"])
    assert long.size[0] == short.size[0]
    assert long.size[1] > short.size[1] + 2 * 12  # at least two more lines
    font = S.label_font(12)
    lines = S.wrap_text(long_text, font, 128 - 8)
    assert len(lines) >= 4 and all(font.getlength(line) <= 120 for line in lines)
    assert " ".join(lines) == long_text
    # large tiles are scaled down to max_tile_size, text stays inside the canvas
    big = S.make_grid([[_solid((0, 255, 0), 1024)]], ["row"], ["col"], max_tile_size=256)
    assert big.info["grid_layout"]["tile_size"] == (256, 256)
    with pytest.raises(ValueError, match="2 column labels for 1 columns"):
        S.make_grid([[_solid((0, 0, 0))]], None, ["a", "b"])
    with pytest.raises(ValueError, match="different lengths"):
        S.make_grid([[_solid((0, 0, 0))], []])


# ----------------------------------------------------------------------------------------------
# sampling: same noise for every row, adapters switched in and out exactly


def test_sample_runs_switches_adapters_exactly(run_dirs):
    pipe = _frozen_tiny_pipe()
    lora = S.parse_run(f"lora={run_dirs / 'lora'}")
    coeff = S.parse_run(f"coeff={run_dirs / 'coeff'}")
    both = S.parse_run(f"both={run_dirs / 'coeff'},{run_dirs / 'lora'}")
    prompt, seed = "a sks dog in the snow", 3
    result = S.sample_runs(
        pipe,
        [lora, coeff, both],
        [prompt],
        [seed],
        include_base=True,
        coeff_scales=[0, 1],
        num_inference_steps=2,
        progress=False,
    )
    assert [r.name for r in result.rows] == ["base", "lora", "coeff@0", "coeff@1", "both@0", "both@1"]
    img = {r.name: _pixels(result.image(result.find(r.name, 0, seed))) for r in result.rows}

    # alpha at strength 0 is the base model, even right after a LoRA row
    assert np.array_equal(img["coeff@0"], img["base"])
    assert np.array_equal(img["both@0"], img["lora"])
    for name in ("lora", "coeff@1", "both@1"):
        assert np.abs(img[name] - img["base"]).max() > 20, name
    assert np.abs(img["both@1"] - img["lora"]).max() > 20
    assert np.abs(img["both@1"] - img["coeff@1"]).max() > 20

    # the rows equal what a fresh pipeline with only those weights gives; base = plain diffusers seeding
    def fresh(alpha=False, with_lora=False):
        ref = _frozen_tiny_pipe()
        if with_lora:
            ref.load_lora_weights(str(run_dirs / "lora"), adapter_name="only")
        if alpha:
            load_coeff_weights(ref, run_dirs / "coeff")
        out = ref(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
        return _pixels(out)

    assert np.array_equal(img["base"], fresh())
    assert np.array_equal(img["lora"], fresh(with_lora=True))
    assert np.array_equal(img["both@1"], fresh(alpha=True, with_lora=True))

    # the pipeline is handed back as the base model
    assert not coeff_modules(pipe)
    assert not any(pipe.get_list_adapters().values())
    again = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.array_equal(_pixels(again), img["base"])


def test_sample_runs_swaps_in_a_fully_fine_tuned_unet(run_dirs):
    from diffusers import UNet2DConditionModel

    pipe = _frozen_tiny_pipe()
    base_unet = pipe.unet
    full = S.parse_run(f"full={run_dirs / 'full'}")
    assert full.kind == "unet" and full.unet_path == run_dirs / "full" / "unet"
    lora = S.parse_run(f"lora={run_dirs / 'lora'}")
    coeff = S.parse_run(f"coeff={run_dirs / 'coeff'}")
    prompt, seed = "a sks dog", 5
    result = S.sample_runs(
        pipe, [full, lora, coeff], [prompt], [seed], include_base=True, num_inference_steps=2, progress=False
    )
    assert [r.name for r in result.rows] == ["base", "full", "lora", "coeff"]
    assert result.rows[1].description == "full UNet"
    img = {r.name: _pixels(result.image(result.find(r.name, 0, seed))) for r in result.rows}
    assert np.abs(img["full"] - img["base"]).max() > 20

    ref = _frozen_tiny_pipe()
    ref.unet = UNet2DConditionModel.from_pretrained(run_dirs / "full" / "unet").requires_grad_(False)
    expected = ref(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.array_equal(img["full"], _pixels(expected))
    ref = _frozen_tiny_pipe()  # the LoRA row after the full row is untouched by the swap
    ref.load_lora_weights(str(run_dirs / "lora"), adapter_name="only")
    expected = ref(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.array_equal(img["lora"], _pixels(expected))

    assert pipe.unet is base_unet  # handed back as the base model
    again = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.array_equal(_pixels(again), img["base"])
    assert result.weights["full"]["unet"]["parameters"] == sum(p.numel() for p in base_unet.parameters())


def test_full_unet_of_another_architecture_refused(run_dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tiny_unet_config()
    cfg["block_out_channels"] = (32, 64, 96)
    UNet2DConditionModel(**cfg).save_pretrained(tmp_path / "other" / "unet")
    pipe = _frozen_tiny_pipe()
    with pytest.raises(S.SamplingError, match=r"run 'other': the UNet in .* another architecture .*block_out_channels"):
        S.sample_runs(
            pipe, [S.parse_run(f"other={tmp_path / 'other'}")], ["a dog"], [0], num_inference_steps=2, progress=False
        )
    with pytest.raises(S.SamplingError, match="cannot be combined with alpha or LoRA"):
        S.parse_run(f"mixed={run_dirs / 'full'},{run_dirs / 'lora'}")


def test_sample_runs_validates_every_run_before_sampling(run_dirs, foreign_weights):
    pipe = _frozen_tiny_pipe()
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    good = S.parse_run(f"good={run_dirs / 'lora'}")
    bad_alpha = S.parse_run(f"sdxl-alpha={foreign_weights / 'coeff_weights.safetensors'}")
    with pytest.raises(S.SamplingError, match=r"(?s)run 'sdxl-alpha': .*10 heads in the file, 4 in the UNet"):
        S.sample_runs(pipe, [good, bad_alpha], ["a dog"], [0], num_inference_steps=2, progress=False)
    bad_lora = S.parse_run(f"sdxl-lora={foreign_weights / 'lora'}")
    with pytest.raises(
        S.SamplingError, match=r"(?s)run 'sdxl-lora': LoRA .* does not fit this UNet.*input size 640, but .* takes 64"
    ):
        S.sample_runs(pipe, [good, bad_lora], ["a dog"], [0], num_inference_steps=2, progress=False)
    assert calls == []  # no image was started
    assert not any(pipe.get_list_adapters().values()) and not coeff_modules(pipe)


# ----------------------------------------------------------------------------------------------
# learned tokens (pivotal tuning): loaded for their run's rows only, {token} filled per row


def _embeddings_file(path: Path, widths=(32, 64), count=2, seed=0, abstractions=None) -> Path:
    """An embeddings file as diffusers' advanced script writes it (clip_l / clip_g rows; the tiny
    pipeline's encoders are 32 and 64 wide), with dreamcoeff's metadata if ``abstractions`` is given."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {k: 3.0 * torch.randn(count, w, generator=g) for k, w in zip(("clip_l", "clip_g"), widths)}
    meta = None
    if abstractions is not None:
        tokens = [t for group in abstractions.values() for t in group]
        meta = {"tokens": json.dumps(tokens), "token_abstractions": json.dumps(abstractions)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def test_parse_run_with_learned_tokens(run_dirs, tmp_path):
    emb = _embeddings_file(tmp_path / "ti" / "ti_emb.safetensors", abstractions={"TOK": ["<s0>", "<s1>"]})
    ti = S.parse_run(f"ti={tmp_path / 'ti'}")
    assert (ti.kind, ti.emb_path, ti.alpha_path) == ("tokens", emb, None)
    assert ti.learned_tokens() == (["<s0>", "<s1>"], {"TOK": "<s0><s1>"}) and ti.learned_token() == "<s0><s1>"
    # an embeddings file is told apart by its clip_l / clip_g keys, alone or beside other files of its run
    assert S.parse_run(str(emb)).kind == "tokens"
    both = S.parse_run(f"x={run_dirs / 'coeff' / 'coeff_weights.safetensors'},{emb}")
    assert (both.kind, both.emb_path) == ("alpha+tokens", emb)
    assert S.parse_run(f"f={run_dirs / 'full'},{emb}").kind == "unet+tokens"  # they compose with a full UNet
    plain = _embeddings_file(tmp_path / "plain_emb.safetensors", count=3)  # no metadata: <s0><s1><s2>
    assert S.parse_run(f"p={plain}").learned_token() == "<s0><s1><s2>"
    with pytest.raises(S.SamplingError, match="two embeddings files"):
        S.parse_run(f"y={tmp_path / 'ti'},{plain}")
    rows = S.plan_rows([both, ti], include_base=True, coeff_scales=[0, 1])
    assert [(r.name, r.has_tokens, r.description) for r in rows] == [
        ("base", False, "base model"),
        ("x@0", True, "alpha c=0 + learned tokens"),
        ("x@1", True, "alpha c=1 + learned tokens"),
        ("ti", True, "learned tokens"),
    ]


def test_fill_prompts_per_row(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a {token} {class}\n# note\na {class}\n")
    templates = S.read_prompt_templates(f)
    assert [t.text for t in templates] == ["a {token} {class}", "a {class}"]
    assert S.fill_prompts(templates, "sks", "dog", {"ti": "<s0><s1>"}) == (
        ["a sks dog", "a dog"],
        {"ti": ["a <s0><s1> dog", "a dog"]},
    )
    # no --token: fine where only runs with learned tokens read {token}; the labels keep the placeholder
    assert S.fill_prompts(templates, None, "dog", {"ti": "<s0><s1>"}, token_needed=False)[0] == [
        "a {token} dog",
        "a dog",
    ]
    with pytest.raises(S.SamplingError, match=r"p\.txt:1: .*uses \{token\} but no value was given \(--token\)"):
        S.fill_prompts(templates, None, "dog", {"ti": "<s0><s1>"})
    (tmp_path / "bad.txt").write_text("a {tokn}\n")
    with pytest.raises(S.SamplingError, match=r"unknown placeholder \{tokn\}"):
        S.read_prompt_templates(tmp_path / "bad.txt")


def test_sample_runs_loads_learned_tokens_for_their_rows_only(run_dirs, tmp_path):
    """The tokens are in the encoders for the ti row only: the base row before it and the alpha row
    after it equal fresh pipelines without them; the ti row equals diffusers' own loader."""
    from dreamcoeff.tokens import load_embeddings_into

    emb = _embeddings_file(tmp_path / "ti" / "ti_emb.safetensors", abstractions={"TOK": ["<s0>", "<s1>"]})
    pipe = _frozen_tiny_pipe()
    vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    ti, coeff = S.parse_run(f"ti={tmp_path / 'ti'}"), S.parse_run(f"coeff={run_dirs / 'coeff'}")
    seed = 2
    result = S.sample_runs(
        pipe,
        [ti, coeff],
        ["a sks dog"],
        [seed],
        include_base=True,
        num_inference_steps=2,
        progress=False,
        run_prompts={"ti": ["a <s0><s1> dog"]},
    )
    assert [(r.row, r.prompt) for r in result.records] == [
        ("base", "a sks dog"),
        ("ti", "a <s0><s1> dog"),
        ("coeff", "a sks dog"),
    ]
    img = {r.name: _pixels(result.image(result.find(r.name, 0, seed))) for r in result.rows}

    def fresh(prompt, tokens=False, alpha=False):
        ref = _frozen_tiny_pipe()
        if tokens:
            load_embeddings_into(ref, emb)
        if alpha:
            load_coeff_weights(ref, run_dirs / "coeff")
        return _pixels(ref(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0])

    assert np.array_equal(img["base"], fresh("a sks dog"))
    assert np.array_equal(img["ti"], fresh("a <s0><s1> dog", tokens=True))
    assert np.array_equal(img["coeff"], fresh("a sks dog", alpha=True))
    assert np.abs(img["ti"] - fresh("a <s0><s1> dog")).max() > 20  # the tokens did something
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab and "<s0>" not in pipe.tokenizer.get_vocab()
    info = result.weights["ti"]["embeddings"]
    assert (info["tokens"], info["token"], info["dims"]) == (["<s0>", "<s1>"], "<s0><s1>", {"clip_l": 32, "clip_g": 64})
    assert len(info["sha256"]) == 64 and result.settings["run_prompts"] == {"ti": ["a <s0><s1> dog"]}
    with pytest.raises(S.SamplingError, match="run 'coeff' has 2 prompts, the others 1"):
        S.sample_runs(pipe, [coeff], ["a dog"], [0], progress=False, run_prompts={"coeff": ["a", "b"]})


def test_cli_learned_tokens_without_token_and_bad_embeddings(tiny_pipeline_dir, tmp_path, capsys):
    good = _embeddings_file(tmp_path / "good" / "good_emb.safetensors")
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--num_inference_steps", "2",
              "--no_progress", "--prompt", "a {token} dog"]  # fmt: skip
    # only a run with learned tokens reads {token}: no --token needed
    assert main(common + ["--run", f"ti={good}", "--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [im["prompt"] for im in manifest["images"]] == ["a <s0><s1> dog"]
    assert manifest["settings"]["prompts"] == ["a {token} dog"] and manifest["runs"]["ti"]["kind"] == "tokens"
    # the base row does read it
    assert main(common + ["--run", f"ti={good}", "--include_base", "--output", str(tmp_path / "o2")]) == 2
    assert re.search(r"uses \{token\} but no value was given \(--token\)", capsys.readouterr().err)

    bad = _embeddings_file(tmp_path / "bad" / "x_emb.safetensors", widths=(16, 64))
    junk = tmp_path / "junk" / "junk_emb.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"not a safetensors file")
    for spec, message in (
        (
            f"bad={bad}",
            rf"run 'bad': {re.escape(str(bad))}: clip_l rows have 16 numbers, this pipeline's encoder has 32",
        ),
        (f"junk={junk.parent}", rf"run 'junk': {re.escape(str(junk))} is not a readable safetensors file"),
    ):
        argv = common + ["--token", "sks", "--include_base", "--run", f"ti={good}", "--run", spec]
        assert main(argv + ["--output", str(tmp_path / "o3")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
        assert len(errors) == 1 and errors[0].startswith("dreamcoeff-sample: error: "), errors
        assert re.search(message, errors[0]), errors[0]
        assert not (tmp_path / "o3").exists()  # checked before any image (or the output folder) was made


@pytest.fixture(scope="module")
def ti_run(tiny_pipeline_dir, tmp_path_factory):
    """A tiny pivotal-tuning run trained by the trainer: alpha and two learned tokens (<s0><s1>)."""
    from accelerate.state import AcceleratorState, PartialState

    from dreamcoeff.train import main as train
    from tests.helpers import make_images

    root = tmp_path_factory.mktemp("ti")
    inst = make_images(root / "inst", ((64, 64),) * 3, 0)
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--instance_dir", inst, "--output_dir", root / "ti",
            "--instance_prompt", "a photo of TOK dog", "--resolution", 64, "--report_to", "none", "--seed", 0,
            "--checkpointing_steps", 0, "--tuning", "coeff", "--train_text_encoder_ti", "--max_train_steps", 2,
            "--coeff_lr", "5e-2", "--text_encoder_lr", "5e-2"]  # fmt: skip
    try:
        assert train([str(a) for a in argv]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    return root / "ti"


@pytest.mark.slow
def test_cli_trained_run_with_learned_tokens(tiny_pipeline_dir, run_dirs, ti_run, tmp_path, capsys):
    """A trained ti run beside the base model and an alpha-only run: {token} is <s0><s1> in the ti
    row and --token elsewhere; the base and alpha rows are bit-identical to an invocation without the
    ti run; the ti row is what load_run gives on a fresh pipeline."""
    import hashlib

    from dreamcoeff import load_run

    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--num_inference_steps", "2",
              "--no_progress", "--include_base", "--prompt", "a {token} dog", "--token", "sks",
              "--seeds", "0"]  # fmt: skip
    with_ti, without = tmp_path / "with", tmp_path / "without"
    code = main(common + ["--run", f"ti={ti_run}", "--run", f"plain={run_dirs / 'coeff'}", "--output", str(with_ti)])
    assert code == 0, capsys.readouterr().err
    assert main(common + ["--run", f"plain={run_dirs / 'coeff'}", "--output", str(without)]) == 0

    manifest = json.loads((with_ti / "manifest.json").read_text())
    prompts = {im["row"]: im["prompt"] for im in manifest["images"]}
    assert prompts == {"base": "a sks dog", "ti": "a <s0><s1> dog", "plain": "a sks dog"}
    emb = ti_run / "ti_emb.safetensors"
    info = manifest["runs"]["ti"]
    assert info["kind"] == "alpha+tokens" and info["embeddings"]["token"] == "<s0><s1>"
    assert info["embeddings"]["sha256"] == hashlib.sha256(emb.read_bytes()).hexdigest()
    assert info["alpha"]["sha256"] == hashlib.sha256((ti_run / "coeff_weights.safetensors").read_bytes()).hexdigest()
    assert manifest["settings"]["prompts"] == ["a sks dog"]
    assert manifest["settings"]["run_prompts"] == {"ti": ["a <s0><s1> dog"]}
    assert json.loads((without / "manifest.json").read_text())["images"][0]["prompt"] == "a sks dog"

    def px(path):
        return _pixels(Image.open(path))

    for row in ("base", "plain"):  # the rows before and after the ti row
        assert np.array_equal(px(with_ti / f"images/{row}_p00_s0.png"), px(without / f"images/{row}_p00_s0.png")), row

    pipe = S.load_base_pipeline(str(tiny_pipeline_dir))  # as the sampler loads it (its own scheduler, fp32 on CPU)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(pipe, ti_run)
    out = pipe(loaded.prompt("a TOK dog"), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    ti_image = px(with_ti / "images/ti_p00_s0.png")
    assert np.array_equal(ti_image, _pixels(out.images[0]))
    assert np.abs(ti_image - px(with_ti / "images/base_p00_s0.png")).max() > 0


# ----------------------------------------------------------------------------------------------
# metrics


def test_metrics_finite_and_identical_for_identical_images(metric_models, instance_dir):
    clip_dir, dino_dir = metric_models
    clip, dino = M.ClipEmbedder(str(clip_dir)), M.DinoEmbedder(str(dino_dir))
    refs = M.load_instance_images(instance_dir)
    rng = np.random.default_rng(1)
    a, b = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    texts = ["a dog in the snow", "a dog in the snow", "a dog in the snow", "a red dog"]
    m = M.compute_metrics([a, b, a.copy(), a], texts, instance_images=refs, clip=clip, dino=dino)
    assert all(set(x) == {"clip_t", "clip_i", "dino"} for x in m)
    assert all(math.isfinite(v) and -1.0001 <= v <= 1.0001 for x in m for v in x.values())
    assert m[0] == m[2]  # identical image and text: identical numbers
    assert all(m[0][k] != m[1][k] for k in m[0])  # a different image scores differently
    assert m[3]["clip_t"] != m[0]["clip_t"] and m[3]["clip_i"] == m[0]["clip_i"]
    # CLIP-I is the mean similarity to the instance images: an instance image scores highest with itself
    self_score = M.compute_metrics([refs[0]], instance_images=refs, clip=clip)[0]["clip_i"]
    assert self_score > m[0]["clip_i"] and "clip_t" not in M.compute_metrics([a], instance_images=refs, clip=clip)[0]


# ----------------------------------------------------------------------------------------------
# the command line


def _html_refs(text: str) -> set[str]:
    return {html.unescape(m) for m in re.findall(r'(?:src|href)="([^"]+)"', text)}


def test_cli_end_to_end(tiny_pipeline_dir, run_dirs, metric_models, instance_dir, tmp_path, capsys):
    clip_dir, dino_dir = metric_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# two DreamBooth prompts\na {token} {class} in the jungle\na {token} {class} wearing a red hat\n"
    )
    out = tmp_path / "out"
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--num_inference_steps", "2", "--no_progress"]
    code = main(
        common
        + [
            "--run",
            f"coeff={run_dirs / 'coeff'}",
            "--run",
            f"lora={run_dirs / 'lora'}",
            "--include_base",
            "--prompts",
            str(prompts),
            "--token",
            "sks",
            "--class_name",
            "dog",
            "--seeds",
            "0",
            "1",
            "--coeff_scales",
            "0",
            "1",
            "--negative_prompt",
            "blurry",
            "--output",
            str(out),
            "--clip_model",
            str(clip_dir),
            "--dino_model",
            str(dino_dir),
            "--instance_dir",
            str(instance_dir),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = ["base", "coeff_c0", "coeff_c1", "lora"]
    expected = {f"images/{r}_p{p:02d}_s{s}.png" for r in rows for p in range(2) for s in (0, 1)}
    assert {f"images/{f.name}" for f in (out / "images").iterdir()} == expected

    manifest = json.loads((out / "manifest.json").read_text())
    assert {im["file"] for im in manifest["images"]} == expected
    assert manifest["settings"]["prompts"] == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert manifest["settings"]["seeds"] == [0, 1] and manifest["settings"]["num_inference_steps"] == 2
    assert manifest["settings"]["negative_prompt"] == "blurry"
    assert manifest["settings"]["pretrained_model_name_or_path"] == str(tiny_pipeline_dir)
    assert [r["name"] for r in manifest["rows"]] == ["base", "coeff@0", "coeff@1", "lora"]
    assert all(r["sampling_seconds"] > 0 for r in manifest["rows"])
    assert len(manifest["runs"]["coeff"]["alpha"]["sha256"]) == 64
    assert manifest["runs"]["coeff"]["training_args"]["max_train_steps"] == 10
    assert manifest["runs"]["lora"]["lora"]["rank"] == 4
    assert {g["file"] for g in manifest["grids"]} == {"grid_s0.png", "grid_s1.png"}

    # grids: rows = 4 rows, columns = 2 prompts of 128-px tiles
    for seed in (0, 1):
        with Image.open(out / f"grid_s{seed}.png") as grid:
            assert 2 * 128 < grid.size[0] < 2 * 128 + 400 and 4 * 128 < grid.size[1] < 4 * 128 + 300

    page = (out / "index.html").read_text()
    assert expected | {"grid_s0.png", "grid_s1.png"} <= _html_refs(page)
    assert "a sks dog wearing a red hat" in page and "blurry" in page

    # same seed, same noise: alpha at strength 0 is the base row; other rows differ
    def px(name):
        return _pixels(Image.open(out / name))

    for s in (0, 1):
        for p in range(2):
            assert np.array_equal(px(f"images/coeff_c0_p{p:02d}_s{s}.png"), px(f"images/base_p{p:02d}_s{s}.png"))
            assert not np.array_equal(px(f"images/lora_p{p:02d}_s{s}.png"), px(f"images/base_p{p:02d}_s{s}.png"))

    # metrics: finite, identical images score identically, averaged per row, also in CSVs
    by_file = {im["file"]: im["metrics"] for im in manifest["images"]}
    assert all(math.isfinite(v) for m in by_file.values() for v in m.values())
    assert by_file["images/coeff_c0_p01_s1.png"] == by_file["images/base_p01_s1.png"]
    assert by_file["images/coeff_c1_p01_s1.png"] != by_file["images/base_p01_s1.png"]
    summary = {m["row"]: m for m in manifest["metrics"]}
    assert set(summary) == {"base", "coeff@0", "coeff@1", "lora"}
    assert summary["base"]["clip_t"] == pytest.approx(
        np.mean([m["clip_t"] for f, m in by_file.items() if "/base_" in f])
    )
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 16 and lines[0].endswith("clip_t,clip_i,dino")
    assert "a dog in the jungle" in (out / "metrics.csv").read_text()  # CLIP-T text: no identifier
    assert len((out / "metrics_summary.csv").read_text().splitlines()) == 1 + 4

    # another invocation, other rows / prompts / seeds: the base image of a (prompt, seed) is unchanged
    out2 = tmp_path / "out2"
    code = main(
        common
        + [
            "--include_base",
            "--prompt",
            "a sks dog wearing a red hat",
            "--seeds",
            "1",
            "--negative_prompt",
            "blurry",
            "--output",
            str(out2),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(px(out2 / "images/base_p00_s1.png"), px("images/base_p01_s1.png"))
    assert not (out2 / "metrics.csv").exists()

    # an earlier output is only replaced on request
    assert main(common + ["--include_base", "--prompt", "a dog", "--output", str(out2)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(common + ["--include_base", "--prompt", "a dog", "--output", str(out2), "--overwrite"]) == 0
    assert sorted(f.name for f in (out2 / "images").iterdir()) == ["base_p00_s0.png"]


@pytest.mark.parametrize(
    "case",
    [
        "missing_run",
        "duplicate_name",
        "empty_prompts",
        "unknown_placeholder",
        "no_prompts",
        "foreign_alpha",
        "foreign_lora",
        "nan_lora",
    ],
)
def test_cli_bad_input_is_one_clear_error(case, tiny_pipeline_dir, run_dirs, foreign_weights, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {token} {class}\n")
    args = {
        "missing_run": (["--run", f"coeff={tmp_path / 'runs' / 'nope'}"], r"run 'coeff': .*nope does not exist"),
        "duplicate_name": (
            ["--run", f"x={run_dirs / 'coeff'}", "--run", f"x={run_dirs / 'lora'}"],
            "'x' is given twice",
        ),
        "empty_prompts": (["--run", f"c={run_dirs / 'coeff'}", "--prompts", "EMPTY"], "holds no prompts"),
        "unknown_placeholder": (
            ["--run", f"c={run_dirs / 'coeff'}", "--prompt", "a {subject}"],
            r"unknown placeholder \{subject\}",
        ),
        "no_prompts": (["--include_base", "--prompts", None], "no prompts"),
        "foreign_alpha": (
            ["--run", f"old={foreign_weights / 'coeff_weights.safetensors'}"],
            r"run 'old': .*does not fit this UNet",
        ),
        "foreign_lora": (["--run", f"old={foreign_weights / 'lora'}"], r"run 'old': LoRA .*does not fit this UNet"),
        "nan_lora": (["--run", f"bad={tmp_path / 'nan_lora'}"], r"run 'bad': LoRA .*\n  unet\..*: non-finite values"),
    }
    if case == "nan_lora":  # the trained run's LoRA with one NaN
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        shutil.copytree(run_dirs / "lora", tmp_path / "nan_lora")
        lora_file = tmp_path / "nan_lora" / "pytorch_lora_weights.safetensors"
        state = load_file(lora_file)
        first = sorted(state)[0]
        state[first] = state[first].clone()
        state[first].view(-1)[0] = float("nan")
        with safe_open(str(lora_file), "pt") as fh:
            metadata = fh.metadata()
        save_file(state, lora_file, metadata=metadata)
    extra, message = args[case]
    if "EMPTY" in extra:
        (tmp_path / "empty.txt").write_text("# nothing\n")
        extra[extra.index("EMPTY")] = str(tmp_path / "empty.txt")
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny_pipeline_dir),
        "--token",
        "sks",
        "--class_name",
        "dog",
        "--prompts",
        str(prompts),
        "--num_inference_steps",
        "2",
        "--no_progress",
        "--output",
        str(tmp_path / "out"),
    ]
    if None in extra:  # drop --prompts
        argv = [a for i, a in enumerate(argv) if a != "--prompts" and (i == 0 or argv[i - 1] != "--prompts")]
        extra = [e for e in extra if e not in ("--prompts", None)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "dreamcoeff-sample: error: " in err and "Traceback" not in err
    assert not (tmp_path / "out" / "images").exists()  # nothing was generated


# ----------------------------------------------------------------------------------------------
# dosing alpha by target (--coeff_target_scales) and combined concepts (--run both=dog+hat@0.7)


@pytest.fixture(scope="module")
def alpha_files(tmp_path_factory):
    """Random alpha, no training: dog (self- and cross-attention), dog_attn1 (dog's self-attention
    layers alone), hat (cross-attention only, another seed), and a run folder holding hat."""
    root = tmp_path_factory.mktemp("alpha_files")
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(7)
    apply_coeff(unet)
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    dog = {k: m.head_mix.alpha.detach().clone() for k, m in coeff_modules(unet).items()}
    save_coeff_weights(root / "dog.safetensors", unet)
    remove_coeff(unet)
    apply_coeff(unet, targets=("attn1",))
    with torch.no_grad():
        for name, module in coeff_modules(unet).items():
            module.head_mix.alpha.copy_(dog[name])
    save_coeff_weights(root / "dog_attn1.safetensors", unet)
    remove_coeff(unet)
    apply_coeff(unet, targets=("attn2",))
    with torch.no_grad():
        for p in coeff_parameters(unet):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_coeff_weights(root / "hat.safetensors", unet)
    (root / "hat_run").mkdir()
    save_coeff_weights(root / "hat_run", unet)
    return root


def test_parse_target_scales():
    assert S.parse_target_scales("attn1=0.5, attn2=1") == {"attn1": 0.5, "attn2": 1.0}
    assert S.parse_target_scales("up_blocks=0") == {"up_blocks": 0.0}
    for text, message in [
        ("attn3=1", r"unknown target 'attn3' in 'attn3=1'; use attn1, attn2, down_blocks, mid_block, up_blocks"),
        ("attn1=half", r"'half' in 'attn1=half' is not a number"),
        ("attn1=0.5,attn2", r"'attn2' is not TARGET=VALUE"),
        ("attn1=nan", r"'nan' in 'attn1=nan' must be a finite number"),
        ("attn1=1,attn1=0", r"'attn1' is given twice"),
        ("", "give TARGET=VALUE pairs"),
    ]:
        with pytest.raises(S.SamplingError, match=message):
            S.parse_target_scales(text)


def test_parse_run_combined_alpha(alpha_files, run_dirs, tmp_path):
    dog, hat = alpha_files / "dog.safetensors", alpha_files / "hat.safetensors"
    both = S.parse_run(f"both={dog}+{hat}@0.7")
    assert both.alpha_mix == ((dog, 1.0), (hat, 0.7)) and both.alpha_path is None
    assert both.kind == "alpha" and both.has_alpha
    # a run folder gives its alpha; a LoRA file may follow after a comma
    mixed = S.parse_run(f"m={dog}@1.5+{alpha_files / 'hat_run'}@-0.5,{run_dirs / 'lora'}")
    assert mixed.alpha_mix == ((dog, 1.5), (alpha_files / "hat_run" / "coeff_weights.safetensors", -0.5))
    assert mixed.kind == "alpha+lora"
    rows = S.plan_rows([both], coeff_scales=[0, 1])
    assert [(r.name, r.coeff_scale, r.description) for r in rows] == [
        ("both@0", 0.0, "2 alphas c=0"),
        ("both@1", 1.0, "2 alphas c=1"),
    ]
    lora_file = run_dirs / "lora" / "pytorch_lora_weights.safetensors"
    for spec, message in [
        (f"b={dog}+{tmp_path / 'nope.safetensors'}", r"run 'b': .*nope\.safetensors does not exist"),
        (
            f"b={dog}+{hat}@strong",
            r"run 'b': .*hat\.safetensors@strong does not exist \(and 'strong' is not a strength",
        ),
        (f"b={dog}+{hat}@inf", r"run 'b': strength 'inf' of .*hat\.safetensors must be a finite number"),
        (f"b={dog}+{lora_file}", r"run 'b': .*pytorch_lora_weights\.safetensors holds no alpha .*only alpha files"),
        (f"b={run_dirs / 'coeff'},{dog}+{hat}", r"run 'b': alpha is given twice"),
        (f"b={dog}+{hat},{run_dirs / 'coeff'}", r"run 'b': two alpha files"),
        (f"b={dog}++{hat}", r"run 'b': .* has an empty part"),
        (f"{dog}+{hat}", r"combined alpha files need a row name"),
    ]:
        with pytest.raises(S.SamplingError, match=message):
            S.parse_run(spec)


def _render_fresh(prompt, seed, alpha=None, scale=1.0, target_scales=None):
    """The image a fresh frozen pipeline renders with ``load_coeff_weights(alpha, scale, target_scales)``."""
    ref = _frozen_tiny_pipe()
    if alpha is not None:
        load_coeff_weights(ref, alpha, scale=scale, target_scales=target_scales)
    return _pixels(ref(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0])


def test_sample_runs_doses_alpha_rows_by_target(alpha_files):
    """attn1=0,attn2=0 gives the base row bit for bit at every swept strength; attn2=0 gives the
    file with dog's attn1 layers alone, at each strength of the sweep; the base row is untouched."""
    pipe = _frozen_tiny_pipe()
    dog = S.parse_run(f"dog={alpha_files / 'dog.safetensors'}")
    dog1 = S.parse_run(f"dog1={alpha_files / 'dog_attn1.safetensors'}")
    prompt, seed = "a sks dog", 4

    def render(runs, targets, scales):
        result = S.sample_runs(
            pipe,
            runs,
            [prompt],
            [seed],
            include_base=True,
            coeff_scales=scales,
            coeff_target_scales=targets,
            num_inference_steps=2,
            progress=False,
        )
        assert result.settings["coeff_target_scales"] == targets
        return {r.name: _pixels(result.image(result.find(r.name, 0, seed))) for r in result.rows}

    off = render([dog], {"attn1": 0.0, "attn2": 0.0}, [0.5, 1])
    assert np.array_equal(off["base"], _render_fresh(prompt, seed))
    assert np.array_equal(off["dog@0.5"], off["base"]) and np.array_equal(off["dog@1"], off["base"])

    self_only = render([dog, dog1], {"attn2": 0}, [0.5, 1])
    assert np.array_equal(self_only["base"], off["base"])
    for c in ("0.5", "1"):
        assert np.array_equal(self_only[f"dog@{c}"], self_only[f"dog1@{c}"]), c
        assert np.abs(self_only[f"dog@{c}"] - self_only["base"]).max() > 20, c
    expected = _render_fresh(prompt, seed, alpha_files / "dog.safetensors", 0.5, {"attn2": 0.0})
    assert np.array_equal(self_only["dog@0.5"], expected)
    assert not coeff_modules(pipe)
    with pytest.raises(S.SamplingError, match="unknown coeff targets"):
        S.sample_runs(pipe, [dog], [prompt], [seed], coeff_target_scales={"attn3": 1.0}, progress=False)


def test_sample_runs_combined_concepts(alpha_files):
    """A row of two alpha files at strengths 1.0 and 0.7 equals load_coeff_weights(pipe, [dog, hat],
    scale=[1.0, 0.7]) on a fresh pipeline; the record names each file with its hash and strength."""
    dog, hat = alpha_files / "dog.safetensors", alpha_files / "hat.safetensors"
    pipe = _frozen_tiny_pipe()
    both = S.parse_run(f"both={dog}+{hat}@0.7")
    single = S.parse_run(f"dog={dog}")
    prompt, seed = "a sks dog wearing a hat", 1
    result = S.sample_runs(pipe, [single, both], [prompt], [seed], num_inference_steps=2, progress=False)
    img = {r.name: _pixels(result.image(result.find(r.name, 0, seed))) for r in result.rows}
    assert np.array_equal(img["both"], _render_fresh(prompt, seed, [dog, hat], [1.0, 0.7]))
    assert np.array_equal(img["dog"], _render_fresh(prompt, seed, dog))
    assert np.abs(img["both"] - img["dog"]).max() > 20
    info = result.weights["both"]["alpha"]
    assert info["combined"] and info["layers"] == info["files"][0]["layers"] > info["files"][1]["layers"]
    assert [(Path(f["path"]).name, f["strength"]) for f in info["files"]] == [
        ("dog.safetensors", 1.0),
        ("hat.safetensors", 0.7),
    ]
    assert [f["sha256"] for f in info["files"]][0] == result.weights["dog"]["alpha"]["sha256"]
    assert all(len(f["sha256"]) == 64 for f in info["files"])
    assert not coeff_modules(pipe)


def _cli_argv(tiny_pipeline_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(tiny_pipeline_dir),
        "--prompt",
        "a sks dog",
        "--num_inference_steps",
        "2",
        "--no_progress",
        "--output",
        str(out),
        *extra,
    ]


def test_cli_target_scales_and_combined_row(tiny_pipeline_dir, alpha_files, run_dirs, tmp_path, capsys):
    dog, hat = alpha_files / "dog.safetensors", alpha_files / "hat.safetensors"
    out = tmp_path / "out"
    argv = _cli_argv(
        tiny_pipeline_dir,
        out,
        "--include_base",
        "--run",
        f"both={dog}@1.0+{hat}@0.7",
        "--run",
        f"lora={run_dirs / 'lora'}",
        "--coeff_target_scales",
        "attn1=0,attn2=0",
        "--coeff_scales",
        "1",
        "2",
    )
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["coeff_target_scales"] == {"attn1": 0.0, "attn2": 0.0}
    files = manifest["runs"]["both"]["alpha"]["files"]
    assert [(Path(f["path"]).name, f["strength"]) for f in files] == [
        ("dog.safetensors", 1.0),
        ("hat.safetensors", 0.7),
    ]
    assert all(len(f["sha256"]) == 64 for f in files)

    def px(name):
        return _pixels(Image.open(out / "images" / name))

    for row in ("both_c1", "both_c2"):  # every target dosed to 0: the base model
        assert np.array_equal(px(f"{row}_p00_s0.png"), px("base_p00_s0.png")), row
    assert not np.array_equal(px("lora_p00_s0.png"), px("base_p00_s0.png"))  # LoRA rows are not dosed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--coeff_target_scales", "attn3=1"], r"unknown target 'attn3' in 'attn3=1'"),
        (["--coeff_target_scales", "attn1=lots"], r"'lots' in 'attn1=lots' is not a number"),
        (["--coeff_target_scales", "attn1"], r"'attn1' is not TARGET=VALUE"),
        (["--coeff_target_scales", "attn1=0", "--run", "LORA"], r"no run has an alpha file"),
        (["--run", "both=DOG+MISSING"], r"run 'both': .*missing\.safetensors does not exist"),
    ],
)
def test_cli_bad_target_scales_and_combinations_fail_before_loading(
    extra, message, tiny_pipeline_dir, alpha_files, run_dirs, tmp_path, capsys, monkeypatch
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dreamcoeff.sample.cli.load_base_pipeline", no_model)
    subs = {
        "LORA": f"lora={run_dirs / 'lora'}",
        "both=DOG+MISSING": f"both={alpha_files / 'dog.safetensors'}+{tmp_path / 'missing.safetensors'}",
    }
    extra = [subs.get(e, e) for e in extra]
    if "--run" not in extra:
        extra += ["--run", f"dog={alpha_files / 'dog.safetensors'}"]
    assert main(_cli_argv(tiny_pipeline_dir, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("dreamcoeff-sample: error: ") and err.count("\n") == 1, err


def test_cli_combined_file_that_does_not_fit_is_one_line(
    tiny_pipeline_dir, alpha_files, foreign_weights, tmp_path, capsys
):
    foreign = foreign_weights / "coeff_weights.safetensors"
    argv = _cli_argv(
        tiny_pipeline_dir, tmp_path / "out", "--run", f"mix={alpha_files / 'dog.safetensors'}+{foreign}@0.5"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"run 'mix': combined alpha: {re.escape(str(foreign))} does not fit this UNet", err), err
    assert "10 heads in the file, 4 in the UNet" in err or "has no attention module" in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out" / "images").exists()
