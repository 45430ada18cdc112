"""The learning-curve benchmark's report (benchmarks/micro/curves.py --phase report) on hand-made
curves: its means, its paired differences, which concepts it leaves out, and what it refuses.
No model is trained: the report only reads the curves_*.json files."""

import importlib
import json
import sys
from pathlib import Path

import pytest

MICRO = Path(__file__).resolve().parents[1] / "benchmarks" / "micro"


@pytest.fixture(scope="module")
def curves():
    sys.path.insert(0, str(MICRO))  # curves.py imports its sibling run_bench
    try:
        yield importlib.import_module("curves")
    finally:
        sys.path.remove(str(MICRO))


def point(step, subject, prompt, bg_copy=0.0, subject_train=0.0):
    return {"step": step, "subject": subject, "prompt": prompt, "background": prompt, "bg_copy": bg_copy,
            "subject_train": subject_train}  # fmt: skip


def run(method, concept, points, lr=None, **extra):
    r = {"method": method, "concept": concept, "seed": 0, "points": points, **extra}
    if lr is not None:
        r.update(lr=lr, trainable_parameters=100)
    return r


def write(folder: Path, tag: str, runs: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"curves_{tag}.json").write_text(json.dumps({"horizon": 500, "runs": runs}))


def report(curves, folder: Path, *extra: str) -> str:
    curves.main(["--model", "some/microworld", "--concept_set", "texture", "--out", str(folder), "--phase", "report",
                 *extra])  # fmt: skip
    return (folder / "RESULTS.md").read_text()


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the first table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def section(text: str, heading: str) -> str:
    """From `heading` to the end of the table under it."""
    start = text.index(heading)
    end = text.find("\n\n", text.index("\n|", start))
    return text[start : len(text) if end < 0 else end]


def test_report_means_pairs_and_left_out_concepts(curves, tmp_path):
    out = tmp_path / "bench"
    # two processes' files; concept B lacks LoRA, so the means use A only, the coeff pairs use both
    write(out, "a", [
        run("untrained", "A", [point(0, 0.2, 0.8)]),
        run("untrained", "B", [point(0, 0.6, 0.4)]),
        run("coeff", "A", [point(125, 0.3, 0.8), point(500, 0.5, 0.7, subject_train=0.25)], lr=1e-4),
        run("coeff", "B", [point(125, 0.6, 0.4), point(500, 0.2, 0.5)], lr=1e-4),
    ])  # fmt: skip
    write(out, "b", [
        run("untrained", "A", [point(0, 0.2, 0.8)]),  # every tag's file holds the untrained row: counted once
        run("lora", "A", [point(125, 0.4, 0.6), point(500, 0.9, 0.3, bg_copy=0.5, subject_train=1.0)], lr=3e-4),
    ])  # fmt: skip
    text = report(curves, out)

    assert "Concepts (seed): A (0); left out until every method has them: B (0)" in text
    # summary over A only: subject at 125 / 500 (the horizon), training-prompt subject, prompt, copying at 500
    assert row(text, "untrained")[1:] == ["-", "0.20", "0.00", "0.80", "0.00"]
    assert row(text, "coeff (100)")[1:] == ["0.0001", "0.30 / 0.50", "0.25", "0.70", "0.00"]
    assert row(text, "lora (100)")[1:] == ["0.0003", "0.40 / 0.90", "1.00", "0.30", "0.50"]

    # alpha against untrained, paired over A and B: at 500, A +0.30, B -0.40 (subject), A -0.10, B +0.10 (prompt)
    paired = section(text, "**coeff** against **untrained**")
    assert row(paired, "500")[1:] == ["2", "-0.05 (1/0/1)", "+0.00 (1/0/1)", "+0.00 (0/2/0)"]
    assert row(paired, "125")[1:] == ["2", "+0.05 (1/1/0)", "+0.00 (0/2/0)", "+0.00 (0/2/0)"]
    assert "**coeff+lora d0.1** against" not in text  # a pair is shown only where both methods ran

    per_step = section(text, "## lora (100 trainable)")
    assert row(per_step, "0")[1:] == ["1", "0.20", "0.00", "0.80", "0.80", "0.00"]  # starts from the untrained model
    assert row(per_step, "500")[1:] == ["1", "0.90", "1.00", "0.30", "0.30", "0.50"]

    results = json.loads((out / "results.json").read_text())
    assert {r["concept"] for r in results["runs"]} == {"A"}
    for figure in ("curves.png", "curves_training_prompt.png"):
        assert (out / figure).stat().st_size > 1000


def test_summary_lists_methods_in_one_order_whoever_wrote_them(curves, tmp_path):
    """Untrained first, then the benchmark's method order, not the order of the processes' files."""
    out = tmp_path / "bench"
    write(
        out, "a", [run("full", "A", [point(125, 0.1, 0.7)], lr=3e-5), run("lora", "A", [point(125, 0.4, 0.6)], lr=3e-4)]
    )
    write(out, "b", [run("untrained", "A", [point(0, 0.2, 0.8)]), run("coeff", "A", [point(125, 0.3, 0.8)], lr=1e-4)])
    summary = section(report(curves, out), "## Summary")
    firsts = [line.split("|")[1].strip().split(" (")[0] for line in summary.splitlines()[4:]]
    assert firsts == ["untrained", "coeff", "lora", "full"]


def test_report_refuses_a_method_trained_at_two_rates(curves, tmp_path):
    out = tmp_path / "bench"
    write(out, "a", [
        run("untrained", "A", [point(0, 0.2, 0.8)]),
        run("coeff", "A", [point(125, 0.3, 0.8)], lr=1e-4),
        run("coeff", "B", [point(125, 0.3, 0.8)], lr=1e-3),
    ])  # fmt: skip
    with pytest.raises(SystemExit, match="coeff was trained at different rates"):
        report(curves, out)
    assert not (out / "RESULTS.md").exists()


def test_pair_with_takes_only_the_methods_a_control_folder_lacks(curves, tmp_path):
    main, control = tmp_path / "main", tmp_path / "control"
    write(main, "a", [
        run("untrained", "A", [point(0, 0.2, 0.8)]),
        run("lora", "A", [point(125, 0.4, 0.6)], lr=3e-4),
        run("coeff+lora d0.1", "A", [point(125, 0.1, 0.1)], lr=3e-4),
    ])  # fmt: skip
    # the control trains alpha+LoRA at another rate; LoRA and the untrained row come from the main folder
    write(control, "a", [run("coeff+lora d0.1", "A", [point(125, 0.5, 0.7)], lr=1e-3)])
    text = report(curves, control, "--pair_with", str(main), "--methods", "lora,coeff+lora d0.1")
    assert row(text, "coeff+lora d0.1 (100)")[1:3] == ["0.001", "0.50"]
    assert row(text, "lora (100)")[1:3] == ["0.0003", "0.40"]
    assert row(section(text, "**coeff+lora d0.1** against **lora**"), "125")[1:3] == ["1", "+0.10 (1/0/0)"]


# ---- scorer v2: ceilings beside the scores, flagged concepts out of the means, one scorer per report ----


def ceilings_file(folder: Path, ceilings: dict[str, float]) -> Path:
    path = folder / "ceilings.json"
    rows = {c: {"ceiling": v, "ceiling_v1": v, "flagged": v < 0.6} for c, v in ceilings.items()}
    path.write_text(json.dumps({"model": "microworld", "threshold": 0.6, "scorer": "v2", "sets": {"texture": rows}}))
    return path


def test_report_flags_concepts_under_their_ceiling_and_keeps_them_out_of_means(curves, tmp_path):
    out = tmp_path / "bench"
    write(out, "a", [
        run("untrained", "A", [point(0, 0.2, 0.8)], scorer="v2"),
        run("untrained", "B", [point(0, 0.0, 0.4)], scorer="v2"),
        run("coeff", "A", [point(125, 0.4, 0.8), point(500, 0.6, 0.7)], lr=1e-4, scorer="v2"),
        run("coeff", "B", [point(125, 0.0, 0.2), point(500, 0.0, 0.1)], lr=1e-4, scorer="v2"),
    ])  # fmt: skip
    text = report(curves, out, "--ceilings", str(ceilings_file(tmp_path, {"A": 1.0, "B": 0.4})))
    assert "Scorer v2. Ceilings (instance images through the VAE, `v2/ceilings.json`): A 1.0, B 0.4." in text
    assert "not in any mean: B." in text
    # the means are A's alone: B's 0.0 / 0.1 would pull them to 0.30 / 0.40
    assert row(text, "coeff (100)")[2:] == ["0.40 / 0.60", "0.00", "0.70", "0.00"]
    # B is still in the per-concept table, under its ceiling
    assert "| method | A (ceiling 1.0) | B (ceiling 0.4) |" in text
    assert row(text, "coeff")[1:] == ["0.60 / 0.70 / 0.00", "0.00 / 0.10 / 0.00"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["scorer"] == "v2" and saved["flagged"] == ["B"]


def test_report_of_v1_runs_shows_v1_ceilings_and_keeps_every_concept(curves, tmp_path):
    out = tmp_path / "bench"
    write(out, "a", [
        run("untrained", "A", [point(0, 0.2, 0.8)]),
        run("untrained", "B", [point(0, 0.0, 0.4)]),
    ])  # fmt: skip
    text = report(curves, out, "--ceilings", str(ceilings_file(tmp_path, {"A": 1.0, "B": 0.4})))
    assert "Scorer v1." in text and "not in any mean" not in text
    assert row(text, "untrained")[2] == "0.10"  # the mean of A and B


def test_report_refuses_runs_of_two_scorers(curves, tmp_path):
    out = tmp_path / "bench"
    write(out, "a", [run("untrained", "A", [point(0, 0.2, 0.8)])])
    write(out, "b", [run("coeff", "A", [point(125, 0.4, 0.8)], lr=1e-4, scorer="v2")])
    with pytest.raises(SystemExit, match="runs scored by \\['v1', 'v2'\\]"):
        report(curves, out)


def test_saved_images_are_rescored_without_training(curves, tmp_path, capsys):
    import numpy as np

    from dreamcoeff.testing import microworld as mw

    c = mw.concept("flat-purple-square")
    teal = []
    for req in c.eval_prompts():  # the subject, as asked, on a background the world does not have
        s = c.scene(req["size"] or "large", req["position"] or "center", "white")
        img = mw.render(s)
        img[~mw.shape_mask(c.shape, *s.center, s.radius)] = (0, 128, 128)
        teal += [img, img]
    trained = [mw.render(c.scene("large", "center", c.train_background))] * 2
    out = tmp_path / "bench"
    write(out, "a", [
        run("coeff", c.name, [point(125, 0.0, 0.0)], lr=1e-4),
        run("lora", c.name, [point(125, 0.0, 0.0)], lr=1e-4),  # trained before images were kept
    ])  # fmt: skip
    curves.save_images(curves.images_path(out, "coeff", c.name, 0), {"step_125": np.stack(teal + trained)})
    for scorer, subject in (("v2", 1.0), ("v1", 0.0)):
        curves.main(["--out", str(out), "--rescore", "--scorer", scorer])
        assert "no saved images for 1: lora / flat-purple-square / seed 0" in capsys.readouterr().out
        runs = json.loads((out / f"rescored-{scorer}" / "curves_a.json").read_text())["runs"]
        assert [r["method"] for r in runs] == ["coeff"] and runs[0]["scorer"] == scorer
        p = runs[0]["points"][0]
        # v2 reads the subject on its region; v1 reads the whole teal image as the object
        assert p["step"] == 125 and p["subject"] == subject and p["background"] == 0.0 and p["bg_copy"] == 0.0
        assert p["subject_train"] == 1.0  # the training scene on its own background, both scorers
    # a folder of v1 runs is continued with v1, a new one starts with v2
    with pytest.raises(SystemExit):
        curves.main(["--out", str(out), "--phase", "curves", "--scorer", "v2", "--methods", "coeff"])
    assert f"the runs in {out} were scored by v1; continue them with --scorer v1" in capsys.readouterr().err
