"""The Pareto-front benchmark (benchmarks/micro/pareto.py) on hand-made scores: the front, its value at a
prompt level, dominance, the ceiling's exclusion, the run order and the figure. No model is trained."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

MICRO = Path(__file__).resolve().parents[1] / "benchmarks" / "micro"


@pytest.fixture(scope="module")
def pareto():
    sys.path.insert(0, str(MICRO))
    try:
        yield importlib.import_module("pareto")
    finally:
        sys.path.remove(str(MICRO))


def test_front_is_the_known_staircase(pareto):
    pts = [(0.1, 0.9), (0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.2), (0.8, 0.1), (0.5, 0.5), (0.0, 0.0)]
    # (0.1, 0.9) is dominated by (0.2, 0.9); (0.4, 0.4) by (0.5, 0.5); (0.8, 0.1) by (0.9, 0.2)
    assert pareto.front(pts) == [(0.2, 0.9), (0.5, 0.5), (0.9, 0.2)]
    assert pareto.front([(0.3, 0.3)]) == [(0.3, 0.3)]


def test_value_at_a_prompt_level(pareto):
    fr = [(0.2, 0.9), (0.5, 0.5), (0.9, 0.2)]
    # step: the best subject among points whose prompt fidelity reaches the level
    assert pareto.front_at(fr, 0.6) == 0.2
    assert pareto.front_at(fr, 0.5) == 0.5
    assert pareto.front_at(fr, 0.1) == 0.9
    assert math.isnan(pareto.front_at(fr, 0.95))
    # linear: on the segment (0.5, 0.5)-(0.9, 0.2), a quarter of the way: 0.5 - 0.3 / 4
    assert pareto.front_at(fr, 0.6, how="linear") == pytest.approx(0.425)
    assert pareto.front_at(fr, 0.5, how="linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step"):
        pareto.front_at(fr, 0.5, how="cubic")


def run(method, concept, seed, lr, points):
    return {"method": method, "concept": concept, "seed": seed, "lr": lr, "scorer": "v2",
            "points": [{"step": s, "background": x, "subject": y, "bg_copy": 0.0} for s, x, y in points]}  # fmt: skip


def test_dominated_method_never_beats_its_dominator(pareto):
    rng = __import__("numpy").random.default_rng(0)
    runs = []
    for seed in range(3):
        for lr in (1e-3, 3e-3):
            pts = [(s, float(rng.uniform(0.2, 0.9)), float(rng.uniform(0.0, 0.8))) for s in (125, 250, 500)]
            runs.append(run("good", "a", seed, lr, pts))
            # every point of "bad" is a point of "good" moved down-left
            runs.append(run("bad", "a", seed, lr, [(s, x - 0.1, y - 0.15) for s, x, y in pts]))
    out = pareto.summarize(runs, {"a": 1.0}, levels=[0.2, 0.4, 0.5, 0.6, 0.7])
    for lv, good in out["methods"]["good"]["at_levels"].items():
        bad = out["methods"]["bad"]["at_levels"][lv]
        for s, v in bad["per_seed"].items():
            if not math.isnan(v):
                assert v <= good["per_seed"][s] + 1e-12, (lv, s)
        if bad["mean"] is not None:
            assert bad["mean"] <= good["mean"] + 1e-12


def test_values_intervals_and_pairs_against_hand_computed(pareto):
    # one concept, two seeds: seed 0's fronts give 0.6 (lora) and 0.8 (alpha+LoRA) at level 0.5,
    # seed 1's 0.4 and 0.5; paired differences 0.2 and 0.1: mean 0.15, half-width 12.71 * sd / sqrt(2)
    runs = [run("lora", "a", 0, 1e-3, [(125, 0.9, 0.1), (250, 0.5, 0.6)]),
            run("lora", "a", 1, 1e-3, [(125, 0.9, 0.2), (250, 0.6, 0.4)]),
            run("coeff+lora d0.1", "a", 0, 1e-3, [(125, 0.7, 0.8), (250, 0.2, 0.9)]),
            run("coeff+lora d0.1", "a", 1, 1e-3, [(125, 0.55, 0.5), (250, 0.3, 0.7)])]  # fmt: skip
    out = pareto.summarize(runs, {"a": 1.0}, levels=[0.5])
    assert out["methods"]["lora"]["at_levels"]["0.5"]["mean"] == pytest.approx(0.5)
    diff = out["pairs"]["coeff+lora d0.1 - lora"]["0.5"]
    sd = math.sqrt(((0.2 - 0.15) ** 2 + (0.1 - 0.15) ** 2) / 1)
    assert diff["mean"] == pytest.approx(0.15) and diff["n"] == 2
    assert diff["ci95"] == pytest.approx(12.71 * sd / math.sqrt(2), abs=1e-4)


def test_flagged_concept_is_left_out(pareto):
    runs = [run("lora", "ok", 0, 1e-3, [(125, 0.8, 0.4)]), run("lora", "bad", 0, 1e-3, [(125, 0.0, 0.0)])]
    out = pareto.summarize(runs, {"ok": 0.8, "bad": 0.2}, levels=[0.5])
    assert out["flagged"] == ["bad"]
    pt = out["methods"]["lora"]["points"][0]
    assert (pt["prompt"], pt["subject"]) == (0.8, 0.4)  # the flagged concept's zeros would halve both
    with pytest.raises(KeyError, match="ceiling"):
        pareto.summarize(runs, {"ok": 0.8}, levels=[0.5])


def test_incomplete_pair_left_out(pareto):
    # seed 1 reached by lora only: it is left out of every mean (like with like)
    runs = [run("lora", "a", 0, 1e-3, [(125, 0.8, 0.4)]), run("coeff", "a", 0, 1e-3, [(125, 0.9, 0.1)]),
            run("lora", "a", 1, 1e-3, [(125, 0.1, 0.1)])]  # fmt: skip
    out = pareto.summarize(runs, {"a": 1.0}, levels=[0.5])
    assert out["left_out"] == [["a", 1]] or out["left_out"] == [("a", 1)]
    assert out["methods"]["lora"]["points"][0]["prompt"] == 0.8


def test_run_order_interleaves_seeds(pareto):
    grids = {"coeff": [1, 2, 3, 4], "lora": [10, 20, 30, 40]}
    order = pareto.plan(["coeff", "lora"], grids, ["c1", "c2"], [0, 1, 2])
    per = 2 * (1 + 8)  # per seed: each concept's untrained row and 8 (method, rate) runs
    assert len(order) == 3 * per
    assert [o[0] for o in order] == [0] * per + [1] * per + [2] * per
    # within a seed, rates by index with the methods interleaved: a stopped part has every method's low rates
    assert order[:5] == [(0, "c1", "untrained", None), (0, "c1", "coeff", 1), (0, "c1", "lora", 10),
                         (0, "c1", "coeff", 2), (0, "c1", "lora", 20)]  # fmt: skip
    assert len(set(order)) == len(order)


def test_shards_split_the_plan_without_overlap_or_gaps(pareto):
    order = pareto.plan(["coeff", "lora"], {"coeff": [1, 2], "lora": [3, 4]}, ["c1", "c2"], [0, 1])
    k0, n0 = pareto.shard_of("0/2")
    k1, n1 = pareto.shard_of("1/2")
    a, b = order[k0::n0], order[k1::n1]
    assert not set(a) & set(b) and sorted(a + b, key=order.index) == order
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit, match="--shard"):
            pareto.shard_of(bad)


def test_report_writes_the_figure_and_tables(pareto, tmp_path):
    from PIL import Image

    root = tmp_path / "pareto" / "recombination"
    for m, lr in (("lora", 1e-3), ("coeff", 1e-4)):
        folder = root / pareto.folder_name(m, lr)
        folder.mkdir(parents=True)
        rows = [run(m, "flat-purple-square", s, lr, [(125, 0.8, 0.2 + 0.1 * s), (250, 0.6, 0.5)]) for s in (0, 1)]
        (folder / "curves_all.json").write_text(json.dumps({"runs": rows}))
    u = root / "untrained"
    u.mkdir()
    rows = [{**run("untrained", "flat-purple-square", s, None, [(0, 0.9, 0.1)])} for s in (0, 1)]
    (u / "curves_all.json").write_text(json.dumps({"runs": rows}))
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"sets": {"recombination": {"flat-purple-square": {"ceiling": 0.8}}}}))
    pareto.main(["report", "--root", str(tmp_path / "pareto"), "--ceilings", str(ceilings)])
    png = root / "pareto_recombination.png"
    with Image.open(png) as im:
        assert im.size[0] > 500 and len(set(im.convert("RGB").getdata())) > 3  # drawn, not blank
    data = json.loads((root / "pareto_recombination.json").read_text())
    assert data["methods"]["lora"]["at_levels"]["0.7"]["mean"] == pytest.approx(0.25)
    assert "prompt >= 0.5" in (root / "pareto_recombination.md").read_text()
    assert data["pairs"]["coeff - untrained"]["0.7"]["mean"] == pytest.approx(0.15)


def test_report_refuses_a_missing_ceiling_file(pareto, tmp_path):
    with pytest.raises(SystemExit, match="ceilings"):
        pareto.ceilings_of(tmp_path / "none.json", "recombination")
