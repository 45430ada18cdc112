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


# ---- the ablation and LoRA + learned tokens (issue 35 items 3-4) ---------------------------------------

NEW = ("coeff diag", "coeff offdiag", "coeff zrs", "lora+ti")


@pytest.fixture(scope="module")
def curves():
    sys.path.insert(0, str(MICRO))
    try:
        yield importlib.import_module("curves")
    finally:
        sys.path.remove(str(MICRO))


def test_every_grid_method_can_run_and_grids_span_a_factor_3(pareto, curves):
    for m in NEW:
        assert m in pareto.GRIDS and m in curves.METHODS
    for m, grid in pareto.GRIDS.items():
        assert m in curves.METHODS, m  # cmd_run refuses a method curves.py cannot train
        assert len(grid) >= 4 and grid == sorted(grid)
        assert all(2.5 <= b / a <= 4.0 for a, b in zip(grid, grid[1:])), (m, grid)  # "a factor of about 3"
    # folders: one per (method, rate), none shared by two methods
    names = [pareto.folder_name(m, lr) for m, grid in pareto.GRIDS.items() for lr in grid]
    assert len(set(names)) == len(names)
    assert pareto.folder_name("coeff diag", 1e-3) == "coeff_diag@0.001"
    assert pareto.folder_name("lora+ti", 3e-4) == "lora+ti@0.0003"
    # curves.py's own default stays the v2 set: the new methods are run by name
    assert not set(NEW) & set(curves.DEFAULT_METHODS)


def test_plan_of_the_ablation(pareto):
    methods = ["coeff", "coeff diag", "coeff offdiag", "coeff zrs"]
    order = pareto.plan(methods, pareto.GRIDS, ["c1"], [0, 1, 2])
    assert len(order) == 3 * (1 + 16)
    first = order[:6]
    assert first == [(0, "c1", "untrained", None), (0, "c1", "coeff", 1e-4), (0, "c1", "coeff diag", 1e-3),
                     (0, "c1", "coeff offdiag", 1e-4), (0, "c1", "coeff zrs", 3e-4), (0, "c1", "coeff", 3e-4)]  # fmt: skip
    for m in methods:  # every rate of every method, once per seed
        assert sorted(lr for s, _, mm, lr in order if mm == m and s == 1) == pareto.GRIDS[m]


def test_run_dry_run_lists_new_methods_and_writes_nothing(pareto, tmp_path, capsys):
    pareto.main(["run", "--concept_set", "recombination", "--methods", "coeff diag,lora+ti", "--seeds", "0",
                 "--root", str(tmp_path / "root"), "--dry_run"])  # fmt: skip
    out = capsys.readouterr().out
    assert "coeff_diag@0.03" in out and "lora+ti@0.01" in out and "coeff_diag@0.0001" not in out
    assert not (tmp_path / "root").exists()
    with pytest.raises(SystemExit, match="unknown methods"):
        pareto.main(["run", "--methods", "coeff diagonal", "--root", str(tmp_path / "root"), "--dry_run"])


def test_report_orders_pairs_and_draws_the_new_methods(pareto, tmp_path):
    from PIL import Image

    # one concept, two seeds; at level 0.5 each seed's front value is the subject of its one point
    values = {"coeff": (0.6, 0.5), "coeff diag": (0.3, 0.4), "coeff offdiag": (0.5, 0.5), "coeff zrs": (0.2, 0.1),
              "coeff+ti": (0.7, 0.6), "lora+ti": (0.8, 0.9), "lora": (0.5, 0.2)}  # fmt: skip
    runs = [run(m, "a", s, 1e-3, [(125, 0.6, v[s])]) for m, v in values.items() for s in (0, 1)]
    runs += [run("untrained", "a", s, None, [(0, 0.9, 0.0)]) for s in (0, 1)]
    out = pareto.summarize(runs, {"a": 1.0}, levels=[0.5])
    assert list(out["methods"]) == ["untrained", "coeff", "coeff diag", "coeff offdiag", "coeff zrs", "lora",
                                    "coeff+ti", "lora+ti"]  # fmt: skip
    for (a, b), want in {("coeff", "coeff diag"): 0.2, ("coeff", "coeff offdiag"): 0.05,
                         ("coeff", "coeff zrs"): 0.4, ("coeff+ti", "lora+ti"): -0.2,
                         ("lora+ti", "lora"): 0.5}.items():  # fmt: skip
        got = out["pairs"][f"{a} - {b}"]["0.5"]
        assert got["mean"] == pytest.approx(want) and got["n"] == 2, (a, b)
    assert "coeff+lora d0.1 - lora" not in out["pairs"]  # a pair is reported only where both ran
    assert "| coeff - coeff diag |" in pareto.markdown(out, "t")
    png = tmp_path / "p.png"
    pareto.draw(out, png, "t")
    with Image.open(png) as im:
        colours = set(im.convert("RGB").getdata())
    for m in ("coeff diag", "coeff offdiag", "coeff zrs", "lora+ti"):
        rgb = tuple(int(pareto.COLOURS[m][i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, m  # drawn in its own colour, not the fallback
    assert len({pareto.COLOURS[m] for m in pareto.GRIDS} | {pareto.COLOURS["untrained"]}) == len(pareto.GRIDS) + 1


def test_report_of_some_methods_waits_only_for_those(pareto, tmp_path):
    root = tmp_path / "pareto" / "recombination"
    rows = {"coeff": [run("coeff", "a", s, 1e-4, [(125, 0.8, 0.3)]) for s in (0, 1)],
            "coeff diag": [run("coeff diag", "a", 0, 1e-3, [(125, 0.7, 0.1)])],  # seed 1 not reached yet
            "untrained": [run("untrained", "a", s, None, [(0, 0.9, 0.0)]) for s in (0, 1)]}  # fmt: skip
    for m, rs in rows.items():
        folder = root / ("untrained" if m == "untrained" else pareto.folder_name(m, rs[0]["lr"]))
        folder.mkdir(parents=True)
        (folder / "curves_all.json").write_text(json.dumps({"runs": rs}))
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"sets": {"recombination": {"a": {"ceiling": 0.8}}}}))
    base = ["report", "--root", str(tmp_path / "pareto"), "--ceilings", str(ceilings), "--levels", "0.5"]
    pareto.main(base)
    everything = json.loads((root / "pareto_recombination.json").read_text())
    assert everything["seeds"] == [0] and everything["left_out"] == [["a", 1]]  # like with like
    pareto.main([*base, "--methods", "coeff", "--name", "coeff_alone"])
    alone = json.loads((root / "coeff_alone.json").read_text())
    assert alone["seeds"] == [0, 1] and list(alone["methods"]) == ["untrained", "coeff"]
    assert json.loads((root / "pareto_recombination.json").read_text()) == everything  # not overwritten
    pareto.main([*base, "--methods", "coeff", "--seeds", "1", "--name", "seed_1"])  # a report of some seeds
    assert json.loads((root / "seed_1.json").read_text())["seeds"] == [1]


def test_new_methods_build_the_right_trainer_command(curves, tmp_path):
    """Each new method's argv (curves.run_flags into run_bench.train_argv) parsed by the trainer's own
    parser and checks: the settings each method stands for, and nothing trained."""
    from types import SimpleNamespace

    from dreamcoeff.testing import microworld as mw
    from dreamcoeff.train.config import parse_args

    c = mw.concept("flat-purple-square")
    args = SimpleNamespace(out=str(tmp_path / "none"), rate={"ti": 2e-2}, alpha_rate=None)
    want = {
        "coeff diag": dict(tuning="coeff", coeff_structure="diagonal", coeff_zero_row_sum=False, coeff_lr=3e-2),
        "coeff offdiag": dict(tuning="coeff", coeff_structure="off_diagonal", coeff_zero_row_sum=False, coeff_lr=3e-2),
        "coeff zrs": dict(tuning="coeff", coeff_structure="full", coeff_zero_row_sum=True, coeff_lr=3e-2),
        "lora+ti": dict(tuning="lora", coeff_structure="full", learning_rate=3e-2, train_text_encoder_ti=True,
                        text_encoder_lr=2e-2, token_abstraction=c.identifier, rank=4),
        "coeff": dict(tuning="coeff", coeff_structure="full", coeff_zero_row_sum=False, train_text_encoder_ti=False),
    }  # fmt: skip
    for method, fields in want.items():
        tuning, lr, extra, recorded = curves.run_flags(args, method, 3e-2, c, 125)
        argv = curves.RB.train_argv("model", c, tuning, lr, 0, 500, tmp_path / "o", tmp_path / "inst", 0.1, extra)
        cfg = parse_args(argv)
        for name, value in fields.items():
            assert getattr(cfg, name) == value, (method, name)
        assert cfg.checkpointing_steps == 125 and cfg.max_train_steps == 500
        assert recorded == ({"token_lr": 2e-2} if method == "lora+ti" else {})
