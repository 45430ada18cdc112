"""Micro-DreamBench v3: Pareto fronts of subject fidelity against prompt fidelity over learning rates,
checkpoints and seeds (issue 35, item 3).

    python benchmarks/micro/pareto.py run --concept_set recombination \\
        --methods "coeff,lora,coeff+lora d0.1" --seeds 0,1,2 --minutes 70
    python benchmarks/micro/pareto.py report --concept_set recombination

``run`` trains every (method, rate) of a rate grid (:data:`GRIDS`, 4 rates about 3x apart, from where
the method under-fits to where it copies or destroys the training background) on every test concept
of the set whose ceiling reaches the threshold, with curves.py's training and scoring (scorer v2,
images kept), checkpoints scored at ``--points``. Each (method, rate) has its own folder
``v3/pareto/SET/METHOD@RATE/`` (curves.py's ``curves_all.json`` format plus ``images/``); the untrained
model is scored once per (concept, seed) in ``v3/pareto/SET/untrained/``. The order interleaves seeds
(seed 0 of every concept, rate and method first, then seed 1, ...) and, within a seed, methods and rates
per concept, so a part stopped by ``--minutes`` leaves balanced data; rerunning the command resumes.

``report`` reads every run, and per (method, rate, checkpoint, seed) takes the mean over the kept
concepts (a concept flagged by its ceiling is left out, :func:`scorer.mean_over_concepts`): x = prompt
fidelity = the fraction of images on the requested background (an image that copies the training
background is never on the requested one, so this is "background right and no bg_copy"), y = subject
fidelity. It draws ``pareto_SET.png`` (each method's points, mean over seeds, and its front: the
upper-right staircase) and writes ``pareto_SET.json`` / ``.md``: each method's subject fidelity at
prompt fidelity levels (the front's value: the best subject among its points with prompt at least
the level) with a t interval over seeds (one front per seed), and paired differences per seed.
No choice is made on test concepts: the grids come from the validation runs of v2 (and, for the
head-mixing ablation ``coeff diag`` / ``coeff offdiag`` / ``coeff zrs`` of issue 35 item 4, from the
puzzle's runs and the ViT ablation: v3/README.md "Rate grids"). ``run --dry_run`` lists the plan;
``report --methods ... --name ...`` reports some methods on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # curves.py and run_bench.py are siblings, not a package

#: Each method's rate grid (README "Rate grids": the v2 validation runs behind each end).
GRIDS: dict[str, list[float]] = {
    "coeff": [1e-4, 3e-4, 1e-3, 3e-3],
    # the head-mixing ablation (issue 35 item 4), on one set beside "coeff"
    "coeff diag": [1e-3, 3e-3, 1e-2, 3e-2],
    "coeff offdiag": [1e-4, 3e-4, 1e-3, 3e-3],
    "coeff zrs": [3e-4, 1e-3, 3e-3, 1e-2],
    "lora": [3e-4, 1e-3, 3e-3, 1e-2],
    "coeff+lora d0.1": [3e-4, 1e-3, 3e-3, 1e-2],
    "full": [1e-5, 3e-5, 1e-4, 3e-4],
    "coeff+ti": [1e-4, 3e-4, 1e-3, 3e-3],
    "lora+ti": [3e-4, 1e-3, 3e-3, 1e-2],
}
#: The learned tokens' rate where tokens train beside alpha or LoRA (v2's choice for tokens alone, validation).
TOKEN_RATE = 2e-2
LEVELS = (0.5, 0.6, 0.7)
#: (a, b): the paired differences a - b at matched prompt fidelity (each where both methods ran): alpha
#: beside LoRA, alpha against nothing, full alpha against each restricted one (does mixing matter), and
#: what trains beside the same learned tokens
PAIRS = (
    ("coeff+lora d0.1", "lora"),
    ("coeff", "untrained"),
    ("coeff", "coeff diag"),
    ("coeff", "coeff offdiag"),
    ("coeff", "coeff zrs"),
    ("coeff+ti", "lora+ti"),
    ("lora+ti", "lora"),
)
DEFAULT_ROOT = HERE / "v3" / "pareto"
RUN_METHODS = "coeff,lora,coeff+lora d0.1"  # run's default --methods


def folder_name(method: str, lr: float) -> str:
    """``METHOD@RATE`` with spaces as underscores (``coeff+lora_d0.1@0.001``)."""
    return f"{method.replace(' ', '_')}@{lr:g}"


def plan(methods: Sequence[str], grids: dict[str, list[float]], concepts: Sequence[str], seeds: Sequence[int]):
    """The run order: (seed, concept, method, rate), seeds outermost so that a stopped part holds whole
    seeds first; within a seed each concept's untrained row, then rates by index, methods interleaved."""
    out = []
    for seed in seeds:
        for c in concepts:
            out.append((seed, c, "untrained", None))
            width = max(len(grids[m]) for m in methods)
            for i in range(width):
                out += [(seed, c, m, grids[m][i]) for m in methods if i < len(grids[m])]
    return out


# ------------------------------------------------------------------------------------------------
# report: fronts, values at prompt levels, intervals
# ------------------------------------------------------------------------------------------------


def front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front (both coordinates larger is better) as the upper-right staircase's corners,
    in increasing x (so decreasing y); ties keep one copy."""
    pts = sorted({(float(x), float(y)) for x, y in points}, key=lambda p: (-p[0], -p[1]))
    out, best = [], -math.inf
    for x, y in pts:
        if y > best:
            out.append((x, y))
            best = y
    return out[::-1]


def front_at(fr: Sequence[tuple[float, float]], level: float, how: str = "step") -> float:
    """The front's subject fidelity at prompt fidelity `level`. ``step``: the best y among points with
    x >= level (attainable by a real checkpoint; a dominated method can never exceed its dominator);
    ``linear``: linear between the neighbouring corners. NaN where no point reaches `level`."""
    reach = [(x, y) for x, y in fr if x >= level - 1e-12]
    if not reach:
        return float("nan")
    if how == "step":
        return max(y for _, y in reach)
    if how != "linear":
        raise ValueError(f"how={how!r}: choose 'step' or 'linear'")
    below = [(x, y) for x, y in fr if x < level - 1e-12]
    (x1, y1) = reach[0]
    if not below or abs(x1 - level) < 1e-12:
        return y1
    x0, y0 = below[-1]
    return y0 + (y1 - y0) * (level - x0) / (x1 - x0)


def t_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t half-width over the finite values (NaN: a seed whose front never reached the level)."""
    import run_bench as RB

    v = [float(x) for x in values if np.isfinite(x)]
    if not v:
        return {"mean": None, "ci95": None, "n": 0}
    mean, half = RB.interval(v)
    return {"mean": round(mean, 4), "ci95": None if not np.isfinite(half) else round(half, 4), "n": len(v)}


def load_runs(root: Path) -> list[dict]:
    """Every run under ``root/*/curves_*.json`` with its folder's rate (``lr`` None for untrained)."""
    runs = []
    for f in sorted(root.glob("*/curves_*.json")):
        for r in json.loads(f.read_text())["runs"]:
            runs.append({**r, "lr": r.get("lr")})
    return runs


def seed_points(runs: list[dict], ceilings: dict[str, float]) -> tuple[dict, dict]:
    """{(method, lr, seed): [(prompt, subject, step), ...]}, each point the mean over the kept concepts;
    and what was used: concepts kept / flagged, (concept, seed) pairs left out. A (concept, seed) pair is
    used only where every (method, rate) present has reached it (a part may stop mid-seed), so every
    point of a seed averages the same concepts."""
    from dreamcoeff.testing import scorer as sc

    cells = {(r["method"], r["lr"]) for r in runs}
    have: dict[tuple[str, int], set] = {}
    for r in runs:
        have.setdefault((r["concept"], r["seed"]), set()).add((r["method"], r["lr"]))
    complete = {pair for pair, got in have.items() if got == cells}
    by: dict[tuple, dict[int, dict[str, dict]]] = {}
    for r in runs:
        if (r["concept"], r["seed"]) not in complete:
            continue
        for p in r["points"]:
            by.setdefault((r["method"], r["lr"], r["seed"]), {}).setdefault(p["step"], {})[r["concept"]] = p
    out: dict[tuple, list] = {}
    flagged: set[str] = set()
    for key, steps in by.items():
        for step, per in sorted(steps.items()):
            x = sc.mean_over_concepts({c: p["background"] for c, p in per.items()}, ceilings)
            y = sc.mean_over_concepts({c: p["subject"] for c, p in per.items()}, ceilings)
            flagged |= set(x["flagged"])
            if x["n"]:
                out.setdefault(key, []).append((x["mean"], y["mean"], step))
    used = {"complete": sorted(complete), "left_out": sorted(set(have) - complete), "flagged": sorted(flagged)}
    return out, used


def method_rank(method: str) -> tuple[int, str]:
    """The report's order: untrained, then :data:`GRIDS`' order (an ablation beside its method), then others."""
    order = ["untrained", *GRIDS]
    return (order.index(method) if method in order else len(order), method)


def summarize(runs: list[dict], ceilings: dict[str, float], levels: Sequence[float] = LEVELS) -> dict:
    """The report's numbers: per method the mean points over seeds, the mean front, per-seed front values
    at each level with t intervals, and the paired differences of :data:`PAIRS`."""
    pts, used = seed_points(runs, ceilings)
    methods = sorted({m for m, _, _ in pts}, key=method_rank)
    seeds = sorted({s for _, _, s in pts})
    res: dict = {"levels": list(levels), "seeds": seeds, **used, "methods": {}}
    per_seed_value: dict[str, dict[int, list[float]]] = {}
    for m in methods:
        mean_pts = []
        for lr in sorted({lr for mm, lr, _ in pts if mm == m}, key=lambda v: -1 if v is None else v):
            got = [pts[(m, lr, s)] for s in seeds if (m, lr, s) in pts]
            for step in sorted({p[2] for g in got for p in g}):
                xs = [p for g in got for p in g if p[2] == step]
                mean_pts.append({"lr": lr, "step": step, "n_seeds": len(xs),
                                 "prompt": float(np.mean([p[0] for p in xs])),
                                 "subject": float(np.mean([p[1] for p in xs]))})  # fmt: skip
        vals = {}
        for s in seeds:
            own = [(x, y) for (mm, _, ss), g in pts.items() if mm == m and ss == s for x, y, _ in g]
            if own:
                fr = front(own)
                vals[s] = [front_at(fr, lv) for lv in levels]
        per_seed_value[m] = vals
        res["methods"][m] = {
            "points": mean_pts,
            "front": front((p["prompt"], p["subject"]) for p in mean_pts),
            "at_levels": {
                f"{lv:g}": {
                    **t_interval([v[i] for v in vals.values()]),
                    "per_seed": {str(s): v[i] for s, v in vals.items()},
                }
                for i, lv in enumerate(levels)
            },  # fmt: skip
        }
    res["pairs"] = {}
    for a, b in PAIRS:
        if a in per_seed_value and b in per_seed_value:
            common = sorted(set(per_seed_value[a]) & set(per_seed_value[b]))
            res["pairs"][f"{a} - {b}"] = {
                f"{lv:g}": t_interval([per_seed_value[a][s][i] - per_seed_value[b][s][i] for s in common])
                for i, lv in enumerate(levels)
            }
    return res


COLOURS = {"untrained": "#000000", "coeff": "#d62728", "lora": "#1f77b4", "coeff+lora d0.1": "#6a3d9a",
           "full": "#7f7f7f", "coeff+ti": "#2ca02c", "lora+ti": "#17becf",
           "coeff diag": "#ff7f0e", "coeff offdiag": "#e377c2", "coeff zrs": "#8c564b"}  # fmt: skip
#: Point shapes: alpha's restricted forms apart from full alpha's dots also where colours are hard to tell
#: apart; the untrained model is a square
MARKERS = {"untrained": "square", "coeff diag": "diamond", "coeff offdiag": "triangle", "coeff zrs": "cross"}


def marker(d, shape: str, cx: float, cy: float, r: float, colour: str) -> None:
    """One point of the figure: ``dot`` (default), ``square``, ``diamond``, ``triangle`` or ``cross``."""
    if shape == "square":
        d.rectangle([cx - 6, cy - 6, cx + 6, cy + 6], fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - r - 1), (cx + r + 1, cy), (cx, cy + r + 1), (cx - r - 1, cy)], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r - 1), (cx + r + 1, cy + r), (cx - r - 1, cy + r)], fill=colour)
    elif shape == "cross":
        d.line([(cx - r - 1, cy - r - 1), (cx + r + 1, cy + r + 1)], fill=colour, width=2)
        d.line([(cx - r - 1, cy + r + 1), (cx + r + 1, cy - r - 1)], fill=colour, width=2)
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def draw(summary: dict, path: Path, title: str, size: int = 560) -> None:
    """One panel: x = prompt fidelity, y = subject fidelity, both 0..1; each method's points (rate x
    checkpoint, mean over seeds; larger dots for later checkpoints) and its front as a staircase."""
    from PIL import Image, ImageDraw

    from dreamcoeff.grids import label_font

    left, top, w, h = 70, 40, size, size
    img = Image.new("RGB", (left + w + 230, top + h + 60), "white")
    d = ImageDraw.Draw(img)
    f, small = label_font(14), label_font(11)
    d.text((10, 8), f"subject against prompt fidelity, rates x checkpoints: {title}", fill="black", font=f)

    def xy(px: float, sy: float) -> tuple[float, float]:
        return left + px * w, top + (1 - sy) * h

    d.rectangle([left, top, left + w, top + h], outline="black")
    for t in np.arange(0, 1.0001, 0.1):
        d.text((xy(t, 0)[0] - 8, top + h + 4), f"{t:.1f}", fill="black", font=small)
        d.text((left - 28, xy(0, t)[1] - 6), f"{t:.1f}", fill="black", font=small)
    d.text((left + w / 2 - 150, top + h + 22), "prompt fidelity (requested background, no bg_copy)", fill="black",
           font=f)  # fmt: skip
    d.text((4, top - 16), "subject fidelity", fill="black", font=small)
    steps = sorted({p["step"] for m in summary["methods"].values() for p in m["points"]}) or [0]
    for j, (m, info) in enumerate(summary["methods"].items()):
        colour = COLOURS.get(m, "#bcbd22")
        fr = info["front"]
        if fr:  # staircase: across from the y axis to each corner, then down to the next corner's height
            line = [xy(0, fr[0][1])]
            for (x0, y0), (_, y1) in zip(fr, fr[1:]):
                line += [xy(x0, y0), xy(x0, y1)]
            line.append(xy(*fr[-1]))
            d.line(line, fill=colour, width=2)
        for p in info["points"]:
            cx, cy = xy(p["prompt"], p["subject"])
            r = 2 + 4 * steps.index(p["step"]) / max(len(steps) - 1, 1)
            marker(d, MARKERS.get(m, "dot"), cx, cy, r, colour)
        ly = top + 10 + 22 * j
        d.line([(left + w + 20, ly + 8), (left + w + 44, ly + 8)], fill=colour, width=4)
        marker(d, MARKERS.get(m, "dot"), left + w + 32, ly + 8, 4, colour)
        d.text((left + w + 50, ly), m, fill="black", font=f)
    d.text((left + w + 20, top + 10 + 22 * (len(summary["methods"]) + 1)),
           f"dots: larger = later\ncheckpoint ({', '.join(map(str, steps))})", fill="black", font=small)  # fmt: skip
    img.save(path)


def markdown(summary: dict, title: str) -> str:
    """The tables: subject at each prompt level per method (mean +- t half-width over seeds, n seeds),
    then the paired differences."""
    levels = summary["levels"]
    lines = [f"# Pareto fronts: {title}", "",
             f"Seeds {summary['seeds']}; flagged by the ceiling (not in the means): {summary['flagged'] or 'none'}; "
             f"(concept, seed) pairs left out until every (method, rate) has them: {summary['left_out'] or 'none'}.",
             "", "Subject fidelity on the front at prompt fidelity >= level (best checkpoint x rate reaching it), "
             "mean +- 95% t half-width over seeds (n seeds whose front reached the level).", "",
             "| method | " + " | ".join(f"prompt >= {lv:g}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]  # fmt: skip

    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "not reached"
        return f"{v['mean']:.2f}" + ("" if v["ci95"] is None else f" +- {v['ci95']:.2f}") + f" (n {v['n']})"

    for m, info in summary["methods"].items():
        lines.append(f"| {m} | " + " | ".join(cell(info["at_levels"][f"{lv:g}"]) for lv in levels) + " |")
    if summary["pairs"]:
        lines += ["", "Paired by seed (each seed's fronts):", "",
                  "| difference | " + " | ".join(f"prompt >= {lv:g}" for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]  # fmt: skip
        for name, vals in summary["pairs"].items():
            lines.append(f"| {name} | " + " | ".join(cell(vals[f"{lv:g}"]) for lv in levels) + " |")
    return "\n".join(lines) + "\n"


def ceilings_of(path: Path, concept_set: str) -> dict[str, float]:
    """{concept: ceiling} of `concept_set` from a ceilings.py json (scorer v2)."""
    if not path.is_file():
        raise SystemExit(f"{path}: no ceilings file; run benchmarks/micro/ceilings.py first (or pass --ceilings)")
    data = json.loads(path.read_text())
    if concept_set not in data.get("sets", {}):
        raise SystemExit(f"{path} has no ceilings for the {concept_set} set: compute them with ceilings.py")
    return {c: row["ceiling"] for c, row in data["sets"][concept_set].items()}


def cmd_report(args) -> dict:
    root = Path(args.root) / args.concept_set
    runs = load_runs(root)
    if args.methods is not None:  # only these (and the untrained rows): their (concept, seed) pairs alone decide
        runs = [r for r in runs if r["method"] in {"untrained", *args.methods}]
    if args.seeds is not None:  # only these seeds: their (concept, seed) pairs alone decide
        runs = [r for r in runs if r["seed"] in args.seeds]
    if not runs:
        raise SystemExit(f"{root}: no runs yet (pareto.py run --concept_set {args.concept_set})")
    scorers = {r.get("scorer", "v1") for r in runs}
    if scorers != {"v2"}:
        raise SystemExit(f"{root}: runs scored by {sorted(scorers)}; the fronts need scorer v2 throughout")
    summary = summarize(runs, ceilings_of(Path(args.ceilings), args.concept_set), args.levels)
    summary["concept_set"] = args.concept_set
    name = args.name or f"pareto_{args.concept_set}"
    title = args.concept_set if args.methods is None else f"{args.concept_set} ({', '.join(args.methods)})"
    (root / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (root / f"{name}.md").write_text(markdown(summary, title))
    draw(summary, root / f"{name}.png", title)
    print(f"[report] {root / f'{name}.png'}, .json, .md")
    return summary


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------


def shard_of(spec: str) -> tuple[int, int]:
    """``K/N`` -> (K, N): this process runs the plan's items whose index is K modulo N."""
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit()) or not 0 <= int(k) < int(n):
        raise SystemExit(f"--shard {spec!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes")
    return int(k), int(n)


@contextlib.contextmanager
def locked(root: Path):
    """Hold ``root/.lock`` while a row is appended: two shards may append to one folder's json."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def done_in(folder: Path) -> set[tuple[str, int]]:
    f = folder / "curves_all.json"
    return {(r["concept"], r["seed"]) for r in json.loads(f.read_text())["runs"]} if f.is_file() else set()


def cmd_run(args) -> None:
    import curves as CV
    import torch

    from dreamcoeff.testing import microworld as mw
    from dreamcoeff.testing import scorer as sc

    torch.set_num_threads(args.threads)
    root = Path(args.root) / args.concept_set
    ceilings = ceilings_of(Path(args.ceilings), args.concept_set)
    tests = [c for c in mw.CONCEPT_SETS[args.concept_set] if c.split == "test"]
    # a flagged concept is never averaged in, so it is not trained (its ceiling is not a method choice)
    concepts = [c.name for c in tests if ceilings.get(c.name, 0.0) >= sc.CEILING_THRESHOLD]
    if args.concepts:
        wanted = [c.strip() for c in args.concepts.split(",") if c.strip()]
        if not set(wanted) <= set(concepts):
            raise SystemExit(f"--concepts {sorted(set(wanted) - set(concepts))}: not among this set's kept "
                             f"test concepts {concepts}")  # fmt: skip
        concepts = [c for c in concepts if c in wanted]
    shard, shards = shard_of(args.shard)
    unknown = [m for m in args.methods if m not in GRIDS or m not in CV.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {[m for m in GRIDS if m in CV.METHODS]}")
    points = sorted(args.points)
    every = int(np.gcd.reduce(points))
    deadline = time.time() + args.minutes * 60
    order = plan(args.methods, GRIDS, concepts, args.seeds)[shard::shards]
    print(
        f"[run] shard {shard}/{shards}: {len(order)} items ({len(concepts)} concepts: {', '.join(concepts)}); points {points}",
        flush=True,
    )
    if args.dry_run:  # the plan, with what is already done: nothing trained, nothing written
        for seed, cname, m, lr in order:
            folder = root / ("untrained" if m == "untrained" else folder_name(m, lr))
            print(f"  seed {seed} {cname} {folder.name}{' (done)' if (cname, seed) in done_in(folder) else ''}")
        return
    with tempfile.TemporaryDirectory(prefix="pareto-") as tmp:
        for seed, cname, m, lr in order:
            folder = root / ("untrained" if m == "untrained" else folder_name(m, lr))
            if (cname, seed) in done_in(folder):
                continue
            if time.time() > deadline:
                print("[run] time budget reached; rerun the same command to continue", flush=True)
                return
            folder.mkdir(parents=True, exist_ok=True)
            c = mw.concept(cname)
            ns = SimpleNamespace(model=args.model, out=str(folder), rate={m: lr, "ti": args.token_rate},
                                 alpha_rate=None, noise_offset=args.noise_offset, images=args.images,
                                 inference_steps=args.inference_steps, guidance=args.guidance, scorer="v2")  # fmt: skip
            kept: dict[str, np.ndarray] = {}
            t0 = time.time()
            if m == "untrained":
                row = {"method": m, "concept": cname, "seed": seed,
                       "points": [{"step": 0, **CV.untrained(ns, c, seed, kept)}]}  # fmt: skip
            else:
                run = Path(tmp) / f"{cname}-{folder.name}-{seed}"
                info = CV.train_run(ns, m, lr, c, seed, max(points), every, run)
                pts = [{"step": p, **CV.score_folder(ns, run / f"checkpoint-{p}", c, seed, kept, p)} for p in points]
                row = {"method": m, "concept": cname, "seed": seed, "lr": lr, **info, "points": pts}
                CV.shutil.rmtree(run, ignore_errors=True)
            row.update(scorer="v2", wall_s=round(time.time() - t0, 1))
            CV.save_images(CV.images_path(folder, m, cname, seed), kept)  # before the row: a listed run has images
            with locked(root):
                res = CV.load_json(folder / "curves_all.json", {"horizon": max(points), "runs": []})
                res["runs"].append(row)
                CV.save_json(folder / "curves_all.json", res)
            print(f"[run] {m} @ {lr} {cname} seed {seed} ({row['wall_s']:.0f} s): " + ", ".join(
                f"{p['step']}: s {p['subject']:.2f} bg {p['background']:.2f} copy {p['bg_copy']:.2f}"
                for p in row["points"]), flush=True)  # fmt: skip
    print("[run] plan complete", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--concept_set", default="recombination", choices=("recombination", "texture", "refinement"))
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="results go to ROOT/SET/METHOD@RATE/")
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--methods", default=None, help=f"comma-separated, of {list(GRIDS)}; run: default "
                   f"{RUN_METHODS!r}; report: default every method under the root (a report of some methods "
                   "uses the (concept, seed) pairs those have reached, not waiting for the others)")  # fmt: skip
    p.add_argument("--grid", action="append", default=[], metavar="METHOD=R1,R2,...", help="replace a rate grid")
    p.add_argument("--seeds", default=None, help="run: default 0,1,2; report: default every seed under the root "
                   "(a report of some seeds remakes one made before later seeds arrived)")  # fmt: skip
    p.add_argument("--points", default="125,250,500,1000", help="checkpoints scored; the last is the horizon")
    p.add_argument("--token_rate", type=float, default=TOKEN_RATE, help="learned tokens' rate beside alpha")
    p.add_argument("--noise_offset", type=float, default=0.1)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--concepts", default="", help="run only these kept test concepts (comma-separated)")
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th item from the K-th (N processes in parallel)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry_run", action="store_true", help="run: list the plan's items (and which are done), then exit")
    p.add_argument("--minutes", type=float, default=110, help="end this part after about this long")
    p.add_argument("--name", default=None, help="report: file names NAME.png/.json/.md (default pareto_SET)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="report: prompt fidelity levels")
    p.add_argument("--ceilings", default=str(HERE / "v2" / "ceilings.json"))
    args = p.parse_args(argv)
    if args.methods is None and args.command == "run":
        args.methods = RUN_METHODS
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds is None and args.command == "run":
        args.seeds = "0,1,2"
    if args.seeds is not None:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    args.points = [int(s) for s in args.points.split(",")]
    args.levels = [float(s) for s in args.levels.split(",")]
    for spec in args.grid:
        m, _, rates = spec.partition("=")
        if m not in GRIDS or not rates:
            p.error(f"--grid {spec!r}: expected METHOD=R1,R2,... with METHOD one of {list(GRIDS)}")
        GRIDS[m] = [float(r) for r in rates.split(",")]
    if args.command == "run":
        cmd_run(args)
    else:
        cmd_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
