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
TASKS = ("position", "count", "orientation", "digits")
PAPER = {"linear": "52.9", "alpha": "69.8 (0.002M)", "lora": "72.9", "alpha_lora": "-", "full": "-"}


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
            }
    return out


def table(sel: dict) -> str:
    head = "| method | " + " | ".join(TASKS) + " | mean | trainable (no head) | paper VTAB-1k mean |\n"
    head += "|---" * (len(TASKS) + 4) + "|\n"
    lines = []
    for m in METHODS:
        cells = [sel.get((t, m)) for t in TASKS]
        if not any(cells):
            continue
        txt = [
            f"{100 * c['test']:.1f} +- {100 * c['test_std']:.1f} ({c['seeds']}s, lr {c['lr']:g})" if c else "-"
            for c in cells
        ]
        mean = f"{100 * sum(c['test'] for c in cells) / len(cells):.1f}" if all(cells) else "partial"
        params = next(c for c in cells if c)["trainable_no_head"]
        lines.append(f"| {m} | " + " | ".join(txt) + f" | {mean} | {params} | {PAPER[m]} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    rows = [json.loads(x) for x in (HERE / "results.jsonl").read_text().splitlines() if x.strip()]
    sel = select(rows)
    payload = {
        "runs": rows,
        "selected": [{"task": t, "method": m, **v} for (t, m), v in sorted(sel.items())],
    }
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(HERE / "results.json", lambda tmp: Path(tmp).write_text(text))
    print(table(sel))


if __name__ == "__main__":
    main()
