"""The refinement set's selection rule (benchmarks/micro/refinement.py, written in benchmarks/micro/README.md
before any rate was measured) on hand-made rates, and its candidates."""

import importlib
import json
import sys
from pathlib import Path

import pytest

from dreamcoeff.testing import microworld as mw

MICRO = Path(__file__).resolve().parents[1] / "benchmarks" / "micro"


@pytest.fixture(scope="module")
def refinement():
    sys.path.insert(0, str(MICRO))
    try:
        yield importlib.import_module("refinement")
    finally:
        sys.path.remove(str(MICRO))


def rows(rates: dict[str, float], ceiling: float = 1.0) -> list[dict]:
    return [{"name": n, "rate": r, "ceiling": ceiling} for n, r in rates.items()]


def test_candidates_are_the_flat_pairs_outside_the_recombination_set(refinement):
    cands = refinement.candidates()
    assert len(cands) == 4 * 8 - len(mw.RECOMBINATION_CONCEPTS)
    taken = {(c.shape, c.colour) for c in mw.RECOMBINATION_CONCEPTS}
    assert not any((c.shape, c.colour) in taken for c in cands)
    assert all(c.train_background != c.colour and c.pattern == "solid" for c in cands)
    assert next(c for c in cands if c.name == "flat-blue-circle").train_background == "white"


def test_band_then_wide_band_closest_to_half_and_the_median_validates(refinement):
    rates = {"a": 0.5, "b": 0.3, "c": 0.7, "d": 0.45, "e": 0.25, "f": 0.9, "g": 0.1, "h": 0.8}
    sel = refinement.select(rows(rates))
    chosen = {sel["validation"]["name"], *(t["name"] for t in sel["test"])}
    # a, b, c, d in [0.3, 0.7]; two places left for [0.2, 0.8]: e (0.25) and h (0.8); f and g never
    assert chosen == {"a", "b", "c", "d", "e", "h"}
    # rates sorted: e .25, b .3, d .45, a .5, c .7, h .8 -> lower median d
    assert sel["validation"] == {"name": "d", "identifier": "mtz", "rate": 0.45}
    assert [t["identifier"] for t in sel["test"]] == ["sks", "zwx", "ohwx", "qlv", "vbk"]
    assert [t["name"] for t in sel["test"]] == ["a", "b", "c", "e", "h"]


def test_more_than_six_keeps_the_closest_and_low_ceilings_are_not_taken(refinement):
    rates = {n: r for n, r in zip("abcdefgh", (0.5, 0.52, 0.55, 0.4, 0.6, 0.65, 0.3, 0.7))}
    sel = refinement.select(rows(rates))
    assert {sel["validation"]["name"], *(t["name"] for t in sel["test"])} == set("abcdef")
    low = rows({"x": 0.5, "y": 0.5, "z": 0.5}, ceiling=0.4) + rows({"w": 0.5, "v": 0.6})
    assert refinement.select(low) == {"made": False, "chosen": ["w", "v"], "why": "fewer than 3 qualify"}


@pytest.mark.parametrize("model", ["v2", "v2r"])
def test_committed_rates_follow_the_rule(refinement, model):
    saved = json.loads((MICRO / model / "refinement" / "rates.json").read_text())
    assert saved["scorer"] == "v2" and saved["model"] == f"microworld-sdxl-{model}"
    assert len(saved["candidates"]) == 26
    assert refinement.select(saved["candidates"]) == saved["selection"]
    assert saved["selection"]["made"] is False  # on both base models the rule makes no set (micro README)


def test_sharded_sampling_gives_the_images_and_rates_of_one_process(refinement, tmp_path):
    """Two shards, then the merge pass, against one unsharded run (1 image, 1 sampler step, an
    untrained micro pipeline): every image equal, the same candidate rows and selection."""
    import numpy as np
    import torch

    from dreamcoeff.testing.tiny import build_tiny_tokenizer_files, write_tokenizer_files

    model = tmp_path / "model"
    mw.build_micro_pipeline(seed=0).save_pretrained(model, safe_serialization=True)
    vocab, merges = build_tiny_tokenizer_files(mw.VOCAB_WORDS)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(model / sub, vocab, merges)
    common = ["--model", str(model), "--images", "1", "--inference_steps", "1"]
    threads = torch.get_num_threads()
    try:
        assert refinement.main([*common, "--out", str(tmp_path / "one" / "rates.json")]) == 0
        split = [*common, "--out", str(tmp_path / "two" / "rates.json")]
        assert refinement.main([*split, "--shard", "0/2"]) == 0
        assert refinement.main([*split, "--shard", "1/2"]) == 0
        assert not (tmp_path / "two" / "rates.json").exists()  # a shard only samples
        assert refinement.main(split) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = (np.load(tmp_path / d / "rates_images.npz") for d in ("one", "two"))
    committed = np.load(MICRO / "v2" / "refinement" / "rates_images.npz")  # v2's run: the same prompts
    assert sorted(one.files) == sorted(two.files) == sorted(committed.files)
    for k in one.files:
        assert np.array_equal(one[k], two[k]), k
    a, b = (json.loads((tmp_path / d / "rates.json").read_text()) for d in ("one", "two"))
    assert a["candidates"] == b["candidates"] and a["selection"] == b["selection"]
