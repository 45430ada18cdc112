"""The micro-world generator and its exact metrics (fast: no model is run)."""

import numpy as np
import pytest

from dreamcoeff.testing import microworld as mw


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_cap, a_sc = mw.world_batch(3, 16)
    b_img, b_cap, b_sc = mw.world_batch(3, 16)
    c_img, _, _ = mw.world_batch(4, 16)
    assert a_img.shape == (16, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    assert not np.array_equal(a_img, c_img)


def test_captions_describe_the_scene():
    imgs, caps, scenes = mw.world_batch(0, 64, drop_prob=0.0)
    for cap, s in zip(caps, scenes):
        assert cap == f"a {s.size} {s.colour} {s.shape} at the {s.position} on a {s.background} background"
        assert s.colour != s.background
    _, caps, scenes = mw.world_batch(1, 200)
    assert any(s.size not in c for c, s in zip(caps, scenes))  # size words are sometimes dropped
    for c, s in zip(caps, scenes):
        assert f"{s.colour} {s.shape}" in c and f"{s.background} background" in c


def test_world_covers_its_vocabulary_and_every_word_is_one_token():
    _, caps, scenes = mw.world_batch(0, 400)
    assert {s.shape for s in scenes} == set(mw.SHAPES)
    assert {s.background for s in scenes} == set(mw.BACKGROUNDS)
    assert {s.pattern for s in scenes} == {"solid"}  # patterned objects are held out
    words = {w for c in caps for w in c.split()}
    assert words <= set(mw.VOCAB_WORDS)
    from dreamcoeff.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(mw.VOCAB_WORDS)
    for w in mw.VOCAB_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_metrics_recover_every_attribute_of_clean_world_images():
    imgs, _, scenes = mw.world_batch(11, 300)
    for img, s in zip(imgs, scenes):
        got = mw.matches_scene(img, s)
        assert all(got.values()), (s, got, mw.analyze(img))
    # float images in [0, 1] (pipeline output_type="np") are read the same way
    assert mw.analyze(imgs[0].astype(np.float32) / 255.0)["shape"] == scenes[0].shape


ALL_CONCEPTS = mw.CONCEPTS + mw.RECOMBINATION_CONCEPTS


def test_concept_sets_are_well_formed():
    for name, cs in mw.CONCEPT_SETS.items():
        assert [c.split for c in cs] == ["validation"] + ["test"] * (len(cs) - 1), name
        assert len({c.identifier for c in cs}) == len(cs), name  # one identifier per concept of a set
        assert all(c.train_background not in c.colours for c in cs)
        assert all(mw.concept(c.name) is c for c in cs)
    assert all(c.pattern != "solid" and c.colour2 not in (None, c.colour) for c in mw.CONCEPTS)
    assert all(c.pattern == "solid" and c.colour2 is None for c in mw.RECOMBINATION_CONCEPTS)
    assert {c.shape for c in mw.RECOMBINATION_CONCEPTS} == set(mw.SHAPES)
    with pytest.raises(KeyError, match="no micro-world concept"):
        mw.concept("nope")


@pytest.mark.parametrize("c", ALL_CONCEPTS, ids=lambda c: c.name)
def test_concepts_are_recognised_and_prompts_scored(c):
    for s in c.instance_scenes():
        img = mw.render(s)
        assert s.background == c.train_background
        assert mw.subject_match(img, c)["subject"] == 1.0
        assert all(mw.matches_scene(img, s).values())
    for req in c.eval_prompts():
        assert req["background"] != c.train_background and c.token in req["prompt"]
        s = c.scene(req["size"] or "large", req["position"] or "center", req["background"])
        img = mw.render(s)
        pm = mw.prompt_match(img, req, c.train_background)
        assert pm["background"] == 1.0 and pm["bg_copy"] == 0.0
        assert all(v in (None, 1.0) for k, v in pm.items() if k != "bg_copy")
        assert mw.subject_match(img, c)["subject"] == 1.0
        # the same concept on its training background is counted as background copying
        copied = mw.render(c.scene("large", "center", c.train_background))
        assert mw.prompt_match(copied, req, c.train_background)["bg_copy"] == 1.0


def test_other_concepts_and_plain_objects_do_not_match():
    for c in ALL_CONCEPTS:
        for other in ALL_CONCEPTS:
            if other.colours == c.colours and other.shape == c.shape and other.pattern == c.pattern:
                continue
            img = mw.render(other.scene("large", "center", "white" if "white" not in other.colours else "black"))
            assert mw.subject_match(img, c)["subject"] == 0.0, (c.name, other.name)
        if c.colour2:
            # the class prompt's usual output: a flat object of the right shape and one of the colours
            flat = mw.render(mw.Scene(c.shape, c.colour, "large", "center", "checkered"))
            sm = mw.subject_match(flat, c)
            assert sm["shape"] == 1.0 and sm["subject"] == 0.0


@pytest.mark.parametrize("c", mw.RECOMBINATION_CONCEPTS, ids=lambda c: c.name)
def test_flat_concept_needs_its_one_colour_and_its_shape(c):
    bg = "checkered"
    # the class prompt's output in another colour: right shape, wrong colour
    other = next(col for col in mw.OBJECT_COLOURS if col != c.colour)
    sm = mw.subject_match(mw.render(mw.Scene(c.shape, other, "large", "center", bg)), c)
    assert sm == {"shape": 1.0, "colours": 0.0, "pattern": 0.0, "subject": 0.0}
    # the right colour on another shape
    shape = next(s for s in mw.SHAPES if s != c.shape)
    sm = mw.subject_match(mw.render(mw.Scene(shape, c.colour, "large", "center", bg)), c)
    assert sm["colours"] == 1.0 and sm["pattern"] == 1.0 and sm["subject"] == 0.0
    # the right shape in its colour plus a second one (striped) is not the flat concept
    striped = mw.Scene(c.shape, c.colour, "large", "center", bg, colour2=other, pattern="striped")
    assert mw.subject_match(mw.render(striped), c)["subject"] == 0.0
    assert mw.subject_match(mw.render(c.scene("small", "left", bg)), c)["subject"] == 1.0


def test_metrics_are_not_fooled_by_degenerate_images():
    blank = np.zeros((64, 64, 3), np.uint8)
    a = mw.analyze(blank)
    assert a["background"] == "black" and not a["object"]
    assert mw.subject_match(blank, mw.CONCEPTS[1])["subject"] == 0.0
    req = {"background": "black", "size": "small", "position": "left"}
    pm = mw.prompt_match(blank, req)
    assert pm["background"] == 1.0 and pm["size"] == 0.0 and pm["position"] == 0.0
    grey = np.full((64, 64, 3), 128, np.uint8)
    assert mw.analyze(grey)["background"] is None and not mw.analyze(grey)["object"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = mw.analyze(noise)
    assert a["background"] is None
    for c in ALL_CONCEPTS:
        assert mw.subject_match(noise, c)["subject"] == 0.0
    # a few stray pixels are not an object
    dots = mw.background_image("blue")
    dots[10, 10] = dots[40, 50] = (255, 255, 255)
    assert not mw.analyze(dots)["object"]


def test_metrics_tolerate_mild_noise():
    rng = np.random.default_rng(1)
    imgs, _, scenes = mw.world_batch(5, 100)
    noisy = np.clip(imgs.astype(int) + rng.normal(0, 12, imgs.shape), 0, 255).astype(np.uint8)
    ok = [all(mw.matches_scene(i, s).values()) for i, s in zip(noisy, scenes)]
    assert np.mean(ok) >= 0.95


MODEL = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "microworld-sdxl"


def test_micro_unet_keeps_the_sdxl_layout():
    cfg = mw.micro_unet_config()
    assert cfg["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert cfg["addition_embed_type"] == "text_time"
    assert cfg["block_out_channels"][-1] % cfg["attention_head_dim"][-1] == 0


@pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="micro-world pipeline not shipped")
def test_shipped_micro_pipeline_is_small_and_loads():
    from diffusers import StableDiffusionXLPipeline

    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024, size
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    for w in mw.VOCAB_WORDS:
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1
    heads = {m.heads for name, m in pipe.unet.named_modules() if name.endswith(("attn1", "attn2"))}
    assert heads == {4, 8}


def _pretrain(out, *extra):
    import importlib.util
    import sys

    path = MODEL.parents[1] / "benchmarks" / "micro" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("micro_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("micro_pretrain", module)
    spec.loader.exec_module(module)
    return module.main(
        [
            "--out",
            str(out / "model"),
            "--log",
            str(out / "log.json"),
            "--vae_steps",
            "2",
            "--steps",
            "2",
            "--batch",
            "4",
            "--vae_batch",
            "4",
            "--eval_samples",
            "0",
            "--save_every",
            "0",
            "--threads",
            "1",
            *extra,
        ]
    )


@pytest.mark.slow
def test_pretraining_script_reproduces_its_weights(tmp_path):
    """The check behind "rerun pretrain.py with the logged settings and get the shipped model":
    two runs agree bit for bit, and --check_against notices a run that differs."""
    import json

    import torch

    threads = torch.get_num_threads()
    try:
        assert _pretrain(tmp_path / "a") == 0
        log = json.loads((tmp_path / "a" / "log.json").read_text())
        assert {
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors",
        } <= set(log["weights_sha256"])
        assert _pretrain(tmp_path / "b", "--check_against", str(tmp_path / "a" / "log.json")) == 0
        assert _pretrain(tmp_path / "c", "--seed", "1", "--check_against", str(tmp_path / "a" / "log.json")) == 1
    finally:
        torch.set_num_threads(threads)


MODEL_V2 = MODEL.with_name("microworld-sdxl-v2")


def test_micro_v2_has_sdxl_attention_geometry():
    """v2: 10 heads at the middle level, 20 at the deepest, head size 8, SDXL's layout otherwise."""
    import torch
    from diffusers import UNet2DConditionModel

    from dreamcoeff import apply_coeff, coeff_modules, coeff_parameters

    cfg = mw.micro_unet_config("v2")
    assert cfg["down_block_types"] == mw.micro_unet_config("v1")["down_block_types"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    apply_coeff(unet)
    modules = coeff_modules(unet)
    assert {m.heads for m in modules.values()} == {10, 20}
    assert {m.inner_dim // m.heads for m in modules.values()} == {8}
    assert sum(p.numel() for p in coeff_parameters(unet)) == 10_600
    with pytest.raises(ValueError, match="unknown micro-world model version"):
        mw.micro_unet_config("v3")


@pytest.mark.slow
def test_pretraining_in_parts_reproduces_an_uninterrupted_run(tmp_path):
    """v2 with the v1 model's trained VAE: a run stopped after 2 of 4 steps and rerun with the same
    command (--state) ends with the same weights as one run straight through."""
    import torch

    threads = torch.get_num_threads()
    v2 = ("--model_version", "v2", "--vae_from", str(MODEL), "--steps", "4", "--save_every", "2")
    try:
        assert _pretrain(tmp_path / "a", *v2) == 0
        state = ("--state", str(tmp_path / "b.state"))
        assert _pretrain(tmp_path / "b", *v2, *state, "--stop_after", "2") == 0
        assert (tmp_path / "b.state").is_file() and not (tmp_path / "b" / "log.json").exists()
        check = ("--check_against", str(tmp_path / "a" / "log.json"))
        assert _pretrain(tmp_path / "b", *v2, *state, *check) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not (MODEL_V2 / "model_index.json").is_file(), reason="micro-world v2 pipeline not shipped")
def test_shipped_micro_v2_pipeline_matches_its_log():
    import hashlib
    import json

    from diffusers import StableDiffusionXLPipeline

    size = sum(f.stat().st_size for f in MODEL_V2.rglob("*") if f.is_file())
    assert size <= 60 * 1024 * 1024, size
    log = json.loads((MODEL.parents[1] / "benchmarks" / "micro" / "v2" / "pretrain_log.json").read_text())
    for name, digest in log["weights_sha256"].items():
        assert hashlib.sha256((MODEL_V2 / name).read_bytes()).hexdigest() == digest, name
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL_V2)
    heads = {m.heads for name, m in pipe.unet.named_modules() if name.endswith(("attn1", "attn2"))}
    assert heads == {10, 20}
    v1 = StableDiffusionXLPipeline.from_pretrained(MODEL)
    assert pipe.vae.config.scaling_factor == v1.vae.config.scaling_factor  # the same VAE, the same latents


@pytest.mark.slow
def test_benchmark_runs_every_method_and_writes_its_tables(tmp_path):
    """The plumbing of `make bench-micro` on an untrained micro pipeline: two jobs, tiny budgets."""
    import json
    import subprocess
    import sys

    _pretrain(tmp_path / "pre", "--vae_steps", "1", "--steps", "1")
    script = MODEL.parents[1] / "benchmarks" / "micro" / "run_bench.py"
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(script),
        "--model",
        str(tmp_path / "pre" / "model"),
        "--out",
        str(out),
        "--jobs",
        "2",
        "--quick",
        "--steps",
        "2",
        "--inference_steps",
        "2",
        "--concept_set",
        "recombination",
        "--concepts",
        "flat-purple-square",
        "--lr_grid",
        "coeff=1e-2;lora=1e-3;coeff+lora=1e-3;full=1e-4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["noise_offset"] == 0.1  # the base model's pretraining offset, kept for fine-tuning
    assert sorted(r["method"] for r in res["runs"]) == sorted(["coeff", "lora", "coeff+lora", "full"])
    for row in res["runs"]:
        assert row["concept"] == "flat-purple-square" and row["seed"] == 0 and row["train_s"] > 0
        assert {
            "subject_train",
            "subject",
            "shape",
            "colours",
            "pattern",
            "background",
            "size",
            "position",
            "bg_copy",
        } <= set(row)
    params = {r["method"]: r["trainable_parameters"] for r in res["runs"]}
    assert params["coeff"] < params["lora"] < params["coeff+lora"] < params["full"]
    assert params["coeff+lora"] == params["coeff"] + params["lora"]
    assert set(res["sanity"]) == {
        "base model, class prompt",
        "base model, instance prompts (0 steps)",
        "instance images",
        "instance images through the VAE",
    }
    assert "subject_train" in res["sanity"]["base model, instance prompts (0 steps)"][0]
    assert res["sanity"]["instance images"][0]["subject"] == 1.0  # the metric recognises the drawn concept
    assert res["validation_concept"] == "val-flat-orange-circle"  # rates are chosen within the set
    table = (out / "RESULTS.md").read_text()
    assert table.startswith("# Micro-DreamBench results: recombination concepts")
    for m in ("coeff", "lora", "coeff+lora", "full"):
        assert f"| {m} | 1 |" in table and (out / f"grid_{m.replace('+', '_')}.png").is_file()
    assert not list(out.glob("part_*"))


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL_V2 / "model_index.json").is_file(), reason="micro-world v2 pipeline not shipped")
def test_demo_runs_on_the_shipped_model(tmp_path):
    """`make demo` end to end with 2 training steps: all three runs trained, one grid per seed, the caption."""
    from accelerate.state import AcceleratorState, PartialState

    from dreamcoeff.demo import main

    try:
        assert (
            main(
                [
                    "--output_dir",
                    str(tmp_path),
                    "--steps",
                    "2",
                    "--model",
                    str(MODEL_V2),
                    "--instance_dir",
                    str(MODEL.parents[1] / "samples" / "instance"),
                ]
            )
            == 0
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    assert (tmp_path / "runs" / "alpha" / "coeff_weights.safetensors").is_file()
    assert (tmp_path / "runs" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "runs" / "alpha_lora" / "coeff_weights.safetensors").is_file()
    assert "alpha alone" in (tmp_path / "grid" / "CAPTION.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "grid").glob("grid_*.png")) == ["grid_s0.png", "grid_s1.png"]


def test_demo_finds_the_repository_model_from_any_folder_and_says_what_to_do_without_one(tmp_path, monkeypatch):
    """From a folder other than the clone's root the defaults are the clone's own; a folder without a
    pipeline stops before any training with the flag to pass, and writes nothing."""
    from dreamcoeff import demo

    monkeypatch.chdir(tmp_path)
    assert demo.find_default(demo.MICRO_MODEL) == MODEL.parents[1] / demo.MICRO_MODEL
    assert demo.find_default(demo.SAMPLES) == MODEL.parents[1] / demo.SAMPLES
    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path / "site-packages")  # as from a wheel: no clone beside it
    assert demo.find_default(demo.MICRO_MODEL) == demo.MICRO_MODEL
    with pytest.raises(SystemExit) as stop:
        demo.main(["--output_dir", str(tmp_path / "out")])
    message = str(stop.value)
    assert "not with the pip package" in message and "--model <clone>/models/microworld-sdxl-v2" in message
    assert not (tmp_path / "out").exists()


def test_committed_demo_images_are_the_demo_concepts_scenes(tmp_path):
    """samples/instance is what `python -m dreamcoeff.demo --make_samples` draws for the demo's concept."""
    from PIL import Image

    from dreamcoeff.demo import CONCEPT, SAMPLES, make_sample_images

    drawn = make_sample_images(tmp_path)
    committed = sorted((MODEL.parents[1] / SAMPLES).glob("*.png"))
    assert [p.name for p in committed] == [p.name for p in drawn]
    for a, b in zip(committed, drawn):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a
    assert mw.subject_match(np.asarray(Image.open(committed[0]).convert("RGB")), mw.concept(CONCEPT))["subject"] == 1.0
