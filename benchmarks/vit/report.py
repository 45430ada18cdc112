"""Turn benchmarks/vit/results.jsonl into results.json and the markdown table of the README.

Per (task, method) the rate is the one with the best validation accuracy averaged over the seeds
that rate has; test accuracy at that rate is reported as mean +- std over seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from dreamcoeff.io import atomic_write  # noqa: E402

METHODS = ("linear", "alpha", "lora", "alpha_lora", "full")
ABLATION = ("alpha", "alpha_diag", "alpha_offdiag", "alpha_zero_row_sum")  # issue 35 part 4
# alpha's free entries over the 4 layers (the first ablation runs recorded offdiag's as 576: all 144)
FREE = {"alpha_diag": 4 * 12, "alpha_offdiag": 4 * 132, "alpha_zero_row_sum": 4 * 132}
T95_2DF = 4.303  # Student's t, 95% two-sided, 2 degrees of freedom (3 seeds, paired)
TASKS = ("position", "count", "orientation", "digits")
PAPER = {"linear": "52.9", "alpha": "69.8 (0.002M)", "lora": "72.9", "alpha_lora": "-", "full": "-"}
PAIRS = (  # (better?, worse?) pairs of the claims: paired over seeds, at each method's selected rates
    ("alpha", "linear"),
    ("lora", "alpha"),
    ("alpha_lora", "lora"),
    ("alpha", "alpha_diag"),
    ("alpha", "alpha_offdiag"),
    ("alpha", "alpha_zero_row_sum"),
)


def select(rows: list[dict]) -> dict:
    """{(task, method): summary at the rate with the best mean validation accuracy}."""
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["method"], r["lr"])].append(r)
    out = {}
    for (task, method, lr), runs in by.items():
        val = statistics.mean(r["val"] for r in runs)
        best = out.get((task, method))
        if best is None or val > best["val"]:
            tests = [r["test"] for r in runs]
            out[(task, method)] = {
                "lr": lr,
                "val": val,
                "test": statistics.mean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "seeds": len(runs),
                "trainable": runs[0]["trainable"],
                "trainable_no_head": runs[0]["trainable_no_head"],
                "alpha_abs_mean": runs[0]["alpha_abs_mean"],
                "alpha_free": FREE.get(method, runs[0].get("alpha_free")),
                "test_by_seed": {r["seed"]: r["test"] for r in runs},
            }
    return out


def table(sel: dict, methods=METHODS) -> str:
    head = "| method | " + " | ".join(TASKS) + " | mean | trainable (no head) | paper VTAB-1k mean |\n"
    head += "|---" * (len(TASKS) + 4) + "|\n"
    lines = []
    for m in methods:
        cells = [sel.get((t, m)) for t in TASKS]
        if not any(cells):
            continue
        txt = [
            f"{100 * c['test']:.1f} +- {100 * c['test_std']:.1f} ({c['seeds']}s, lr {c['lr']:g})" if c else "-"
            for c in cells
        ]
        mean = f"{100 * sum(c['test'] for c in cells) / len(cells):.1f}" if all(cells) else "partial"
        first = next(c for c in cells if c)
        params = first["trainable_no_head"]
        if first.get("alpha_free") not in (None, 0, params) and "lora" not in m:
            params = f"{params} ({first['alpha_free']} free)"
        lines.append(f"| {m} | " + " | ".join(txt) + f" | {mean} | {params} | {PAPER.get(m, '-')} |")
    return head + "\n".join(lines) + "\n"


def seed_means(sel: dict, method: str) -> dict[int, float] | None:
    """Per seed, the mean test accuracy over the tasks at the method's selected rates (None if a
    task or a seed is missing)."""
    cells = [sel.get((t, method)) for t in TASKS]
    if not all(cells):
        return None
    seeds = set.intersection(*(set(c["test_by_seed"]) for c in cells))
    return {s: statistics.mean(c["test_by_seed"][s] for c in cells) for s in sorted(seeds)} or None


def paired(sel: dict) -> list[dict]:
    """Each claim's difference (first - second) of the per-seed means, with a 95% t interval."""
    out = []
    for a, b in PAIRS:
        ma, mb = seed_means(sel, a), seed_means(sel, b)
        if not ma or not mb:
            continue
        seeds = sorted(set(ma) & set(mb))
        diffs = [ma[s] - mb[s] for s in seeds]
        mean = statistics.mean(diffs)
        half = T95_2DF * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) == 3 else None
        out.append({"first": a, "second": b, "seeds": seeds, "diffs": diffs, "mean": mean, "ci95_half": half})
    return out


def paired_table(rows: list[dict]) -> str:
    head = "| difference (mean of 4 tasks, points) | per seed | mean | 95% interval (t, 2 df) |\n|---|---|---|---|\n"
    lines = []
    for r in rows:
        per = ", ".join(f"{100 * d:+.1f}" for d in r["diffs"])
        ci = (
            f"[{100 * (r['mean'] - r['ci95_half']):+.1f}, {100 * (r['mean'] + r['ci95_half']):+.1f}]"
            if r["ci95_half"] is not None
            else "-"
        )
        lines.append(f"| {r['first']} - {r['second']} | {per} | {100 * r['mean']:+.1f} | {ci} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    rows = [json.loads(x) for x in (HERE / "results.jsonl").read_text().splitlines() if x.strip()]
    sel = select(rows)
    payload = {
        "runs": rows,
        "selected": [{"task": t, "method": m, **v} for (t, m), v in sorted(sel.items())],
        "paired": paired(sel),
    }
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(HERE / "results.json", lambda tmp: Path(tmp).write_text(text))
    print(table(sel))
    print(table(sel, ABLATION))
    print(paired_table(payload["paired"]))


if __name__ == "__main__":
    main()
