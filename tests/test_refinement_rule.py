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


def test_committed_rates_follow_the_rule(refinement):
    saved = json.loads((MICRO / "v2" / "refinement" / "rates.json").read_text())
    assert saved["scorer"] == "v2"
    assert refinement.select(saved["candidates"]) == saved["selection"]
