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
