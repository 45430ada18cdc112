"""pretrain.py's continuation mode (``--continue_from``, ``--colour_drop``): the refinement set's v2r model.

The references are independent of the code under test: the colour words are counted in the captions
against the scenes the world generator returns, and the continued folder is compared with the untouched
source folder (the VAE must be byte-identical, the UNet must not).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dreamcoeff.testing import microworld as mw

ROOT = Path(__file__).resolve().parents[1]


def _pretrain_module():
    path = ROOT / "benchmarks" / "micro" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("micro_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("micro_pretrain", module)
    spec.loader.exec_module(module)
    return module


def test_colour_words_are_dropped_at_the_stated_rate():
    """Over 4,000 world captions, the share that no longer names the object's colour is 0.3 within
    4 standard errors, and a dropped caption is the world caption with only the colour word gone."""
    pt = _pretrain_module()
    dropped, total = 0, 0
    for seed in range(125):
        rng = np.random.default_rng(seed)  # world scenes and captions without rendering the images
        scenes = [mw.sample_scene(rng) for _ in range(32)]
        caps = [mw.caption(s, with_size=bool(seed % 2)) for s in scenes]
        out = pt.drop_colour_words(caps, scenes, seed, 0.3)
        for before, after, s in zip(caps, out, scenes):
            total += 1
            if f" {s.colour} " not in f" {after} ":
                dropped += 1
                assert after.split() == [w for w in before.split() if w != s.colour], (before, after)
            else:
                assert after == before
    se = np.sqrt(0.3 * 0.7 / total)
    assert abs(dropped / total - 0.3) < 4 * se, dropped / total
    # the drop draws from its own stream: the same seed gives the same captions, and p=0 changes none
    _, caps, scenes = mw.world_batch(7, 32)
    assert pt.drop_colour_words(caps, scenes, 7, 0.3) == pt.drop_colour_words(caps, scenes, 7, 0.3)
    assert pt.drop_colour_words(caps, scenes, 7, 0.0) == caps


def test_continuation_writes_a_loadable_folder_with_the_source_vae(tmp_path):
    """A 2-step continuation of an (untrained) micro pipeline: the folder loads as an SDXL pipeline,
    its VAE is the source's byte for byte (frozen), its UNet is not, and the log counts the drop."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pt = _pretrain_module()
    threads = torch.get_num_threads()
    src = tmp_path / "src"
    pt.save(mw.build_micro_pipeline(seed=0), src)
    out, log_path = tmp_path / "cont", tmp_path / "log.json"
    argv = ["--continue_from", str(src), "--colour_drop", "1.0", "--steps", "2", "--batch", "4", "--lr", "3e-4",
            "--eval_samples", "0", "--save_every", "0", "--threads", "1", "--out", str(out), "--log", str(log_path)]  # fmt: skip
    try:
        assert pt.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    log = json.loads(log_path.read_text())
    assert log["colour_drop_counts"] == {"captions": 8, "dropped": 8}  # p = 1: every caption loses its colour
    assert log["continued_from_sha256"] == pt.weight_hashes(src)
    vae = "vae/diffusion_pytorch_model.safetensors"
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert log["weights_sha256"][vae] == log["continued_from_sha256"][vae]
    assert log["weights_sha256"][unet] != log["continued_from_sha256"][unet]
    assert [c["step"] for c in log["unet_curve"]] == [1] and log["unet_steps"] == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == StableDiffusionXLPipeline.from_pretrained(src).vae.config.scaling_factor

    # in two parts (--state, stopped after step 1, the same command again): the same weights and counts
    half = [a if a != str(out) else str(tmp_path / "parts") for a in argv]
    half = [a if a != str(log_path) else str(tmp_path / "parts.json") for a in half]
    half = [a if a != "1.0" else "0.5" for a in half] + ["--state", str(tmp_path / "s.state")]
    straight = [a if a != "1.0" else "0.5" for a in argv]
    straight = [a if a != str(log_path) else str(tmp_path / "straight.json") for a in straight]
    try:
        assert pt.main(straight) == 0
        assert pt.main([*half, "--stop_after", "1"]) == 0 and not (tmp_path / "parts.json").exists()
        assert pt.main(half) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("straight.json", "parts.json"))
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["colour_drop_counts"] == b["colour_drop_counts"] and a["colour_drop_counts"]["captions"] == 8


def test_continuation_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    pt = _pretrain_module()
    with pytest.raises(SystemExit, match="not a pipeline folder"):
        pt.main(["--continue_from", str(tmp_path), "--out", str(tmp_path / "o"), "--log", str(tmp_path / "l.json")])
    with pytest.raises(SystemExit):
        pt.main(["--continue_from", str(tmp_path), "--colour_drop", "1.5"])


V2R_LOG = ROOT / "benchmarks" / "micro" / "v2r" / "pretrain_log.json"


@pytest.mark.skipif(not V2R_LOG.is_file(), reason="the v2r model is not finished and shipped yet")
def test_shipped_v2r_matches_its_log_and_keeps_the_v2_vae():
    """The committed v2r folder: every weight file's sha256 is the log's, the VAE is v2's byte for byte
    (the continuation freezes it), 600 steps at a 0.3 colour drop."""
    import hashlib

    log = json.loads(V2R_LOG.read_text())
    model, v2 = ROOT / "models" / "microworld-sdxl-v2r", ROOT / "models" / "microworld-sdxl-v2"
    for name, digest in log["weights_sha256"].items():
        assert hashlib.sha256((model / name).read_bytes()).hexdigest() == digest, name
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (model / vae).read_bytes() == (v2 / vae).read_bytes()
    assert log["unet_steps"] == 600 and log["args"]["colour_drop"] == 0.3
    counts = log["colour_drop_counts"]
    assert counts["captions"] == 600 * 32 and abs(counts["dropped"] / counts["captions"] - 0.3) < 0.02
