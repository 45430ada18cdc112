"""Micro-DreamBench v2: learning curves, from the untrained model to overfitting, for every method.

    python benchmarks/micro/curves.py --model models/microworld-sdxl-v2 --concept_set recombination \\
        --out benchmarks/micro/v2/recombination --phase select,horizon,curves,report

One point per method is not enough to see the paper's claim (LoRA overfits: it keeps the training
background or ignores the prompt, Coeff-Tuning keeps following it), so every method is trained long
enough to overfit and scored along the way:

1. ``select``: each method's learning rate on the set's *validation* concept only (500 steps, the
   v1 protocol), by the mean of subject fidelity and requested-background fidelity; alpha's grid
   spans two decades so that its best rate is not at an end of it.
2. ``horizon``: LoRA (at its chosen rate) on the validation concept, scored every 250 steps up to
   ``--max_steps``: the horizon is the first point where it copies the training background in at
   least 30% of the new-background images, or ``--max_steps`` if it never does (stated in the
   results).
3. ``curves``: every method x test concept x seed trained to the horizon, checkpoints scored at
   125, 250, 500, 1000, 2000, ... steps: subject fidelity, prompt fidelity (background, size,
   position) and background copying. Each (method, concept, seed) is written as soon as it is done,
   so the phase resumes where a stopped part ended (parts of at most ~2 h: ``--minutes``).
4. ``report``: RESULTS.md (tables per step) and one figure, subject fidelity against prompt
   fidelity, a line per method through its checkpoints (``curves.png``). With scorer v2 every
   concept's ceiling (``v2/ceilings.json``) stands beside its scores, and a concept flagged there is
   left out of the means.

Scorers (issue 35): ``--scorer v2`` (dreamcoeff/testing/scorer.py: the subject on its object region)
for a new folder, v1 (microworld.analyze) where the folder's runs were scored by v1, so an old folder
continues as it was; every run records its ``scorer``. The sampled images of every checkpoint are kept
(``images/CONCEPT-METHOD-SEED.npz``, uint8, one array per step), and ``--rescore`` scores them again
with ``--scorer`` into ``OUT/rescored-SCORER/`` without training (report that folder with
``--phase report --out OUT/rescored-SCORER``).

Methods: untrained (0 steps), alpha, LoRA r4, alpha+LoRA with coefficient dropout 0 / 0.1 / 0.2,
learned tokens alone (TI), alpha + TI, full fine-tuning; trainable parameters in every row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import run_bench as RB
import torch
from diffusers import StableDiffusionXLPipeline

from dreamcoeff import load_run
from dreamcoeff.testing import microworld as mw
from dreamcoeff.testing import scorer as sc

HERE = Path(__file__).resolve().parent

#: name -> (--tuning, extra flags, which learning-rate flag the selection sweeps)
METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "coeff": ("coeff", (), "coeff_lr"),
    # the head-mixing ablation (issue 35 item 4): alpha's diagonal alone (per-head gains), its off-diagonal
    # alone (mixing), and alpha with zero row sums (mixing that keeps every head's output gain)
    "coeff diag": ("coeff", ("--coeff_structure", "diagonal"), "coeff_lr"),
    "coeff offdiag": ("coeff", ("--coeff_structure", "off_diagonal"), "coeff_lr"),
    "coeff zrs": ("coeff", ("--coeff_zero_row_sum",), "coeff_lr"),
    "lora": ("lora", (), "learning_rate"),
    "coeff+lora d0": ("coeff+lora", ("--coeff_dropout", "0"), "both"),
    "coeff+lora d0.1": ("coeff+lora", ("--coeff_dropout", "0.1"), "both"),
    "coeff+lora d0.2": ("coeff+lora", ("--coeff_dropout", "0.2"), "both"),
    "ti": ("none", ("--train_text_encoder_ti",), "text_encoder_lr"),
    "coeff+ti": ("coeff", ("--train_text_encoder_ti",), "coeff_lr"),
    "lora+ti": ("lora", ("--train_text_encoder_ti",), "learning_rate"),
    "full": ("full", (), "learning_rate"),
}
#: curves.py's own default --methods: the v2 curves' (the later ones are the v3 Pareto sweep's, named there)
DEFAULT_METHODS = ("coeff", "lora", "coeff+lora d0", "coeff+lora d0.1", "coeff+lora d0.2", "ti", "coeff+ti", "full")
LR_GRIDS = {
    "coeff_lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "learning_rate": [3e-4, 1e-3, 3e-3],
    "both": [3e-4, 1e-3, 3e-3],
    "text_encoder_lr": [1e-3, 5e-3, 2e-2, 5e-2, 1e-1],
    "full": [3e-5, 1e-4, 3e-4],
}
#: Methods whose rate is not selected on their own: the dropout ablation holds alpha+LoRA's rate (chosen at
#: the paper's middle setting, dropout 0.1) fixed and varies only the dropout, as the paper's table does.
RATE_FROM = {"coeff+lora d0": "coeff+lora d0.1", "coeff+lora d0.2": "coeff+lora d0.1"}
#: Methods that train the learned tokens beside something else take the tokens' rate chosen for tokens
#: alone, so that the only difference between "ti" and "coeff+ti" is alpha (its own rate is swept), and
#: between "coeff+ti" and "lora+ti" what trains beside the same tokens.
TOKEN_RATE_FROM = {"coeff+ti": "ti", "lora+ti": "ti"}
POINTS = (125, 250, 500, 1000, 2000, 4000, 8000)
BG_COPY_OVERFIT = 0.3


def lr_grid(method: str) -> list[float]:
    tuning, _, knob = METHODS[method]
    return LR_GRIDS["full" if tuning == "full" else knob]


def token_rate(method: str, lr: float, chosen: dict[str, float]) -> float | None:
    """The learned tokens' rate in `method`'s runs (None: no tokens)."""
    if METHODS[method][2] == "text_encoder_lr":
        return lr
    if method in TOKEN_RATE_FROM:
        source = TOKEN_RATE_FROM[method]
        if source not in chosen:
            raise SystemExit(f"{method} takes the tokens' rate chosen for {source}: select {source} first")
        return chosen[source]
    return None


def flags(method: str, concept: mw.Concept, tokens: float | None) -> tuple[str, ...]:
    """The trainer flags of `method` whose learned tokens (if any) train at rate `tokens` (beyond
    run_bench.train's common ones)."""
    _, extra, _ = METHODS[method]
    out = list(extra)
    if "--train_text_encoder_ti" in extra:
        out += ["--token_abstraction", concept.identifier]
    if tokens is not None:
        out += ["--text_encoder_lr", str(tokens)]
    return tuple(out)


def run_flags(args, method: str, lr: float, c: mw.Concept, every: int) -> tuple[str, float, tuple[str, ...], dict]:
    """One run of `method` at rate `lr` as run_bench.train takes it: (--tuning, the shared rate, the extra
    flags (a checkpoint every `every` steps), what to record beside the run's own `lr`)."""
    tuning, _, knob = METHODS[method]
    base_lr = lr if knob != "text_encoder_lr" else 1e-3  # the other groups' rate where tokens train alone
    tokens = token_rate(method, lr, chosen_rates(Path(args.out), args.rate))
    extra = flags(method, c, tokens) + ("--checkpointing_steps", str(every))
    alpha = args.alpha_rate if knob == "both" else None  # alpha+LoRA: alpha at its own rate (a stress test)
    info = {}
    if alpha is not None:
        extra += ("--coeff_lr", str(alpha))  # after run_bench's shared --coeff_lr, so it wins
        info["alpha_lr"] = alpha
    if method in TOKEN_RATE_FROM:  # the tokens' rate is not the run's own `lr` (another method's choice)
        info["token_lr"] = tokens
    return tuning, base_lr, extra, info


def train_run(args, method: str, lr: float, c: mw.Concept, seed: int, steps: int, every: int, out: Path) -> dict:
    """Train one run with a checkpoint every `every` steps (all kept); wall time and parameters."""
    tuning, base_lr, extra, recorded = run_flags(args, method, lr, c, every)
    inst = RB.write_instances(c, out.parent / f"inst-{c.name}")
    secs, params = RB.train(args.model, c, tuning, base_lr, seed, steps, out, inst, args.noise_offset, extra)
    info = {"train_s": round(secs, 1), "trainable_parameters": params}
    return {**info, **recorded}


def sample_concept(args, pipe, c: mw.Concept, seed: int, prompt_map=None) -> np.ndarray:
    """The concept's evaluation prompts' images, then its instance prompt's (``--images`` each), as
    uint8 (the noise seeds of run_bench.evaluate_concept, so v1 scores are the ones it gives)."""
    prompts = [r["prompt"] for r in c.eval_prompts()] + [c.instance_prompt]
    if prompt_map is not None:
        prompts = [prompt_map(p) for p in prompts]
    imgs = RB.generate(pipe, prompts, args.images, seed, args.inference_steps, args.guidance)
    # rounded as microworld._as_float reads a float image, so scoring the saved uint8 changes nothing
    return np.clip(np.round(np.stack(imgs) * 255.0), 0, 255).astype(np.uint8)


def score_images(imgs: np.ndarray, c: mw.Concept, per_prompt: int, scorer: str) -> dict:
    """Scores of `sample_concept`'s images with scorer `scorer`: run_bench's metrics, subject on the
    training prompt, and ``prompt`` (mean of requested background, size and position)."""
    reqs = c.eval_prompts()
    n = len(reqs) * per_prompt
    if len(imgs) != n + per_prompt:
        raise ValueError(f"{len(imgs)} images for {c.name}, expected {n + per_prompt} ({per_prompt} per prompt)")
    analyze = sc.analyzer(scorer)
    s = RB.score(list(imgs[:n]), reqs, per_prompt, c, analyze)
    s["subject_train"] = float(np.mean([mw.subject_match(im, c, analyze(im))["subject"] for im in imgs[n:]]))
    s["prompt"] = float(np.mean([s[k] for k in ("background", "size", "position") if k in s]))
    return s


def score_folder(args, folder: Path, c: mw.Concept, seed: int, keep: dict | None = None, step: int = 0) -> dict:
    """Load a run folder or checkpoint with load_run and score the concept's evaluation prompts; the
    images go into `keep` under ``step_STEP``."""
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(pipe, folder)
    imgs = sample_concept(args, pipe, c, seed, loaded.prompt)
    if keep is not None:
        keep[f"step_{step}"] = imgs
    return score_images(imgs, c, args.images, args.scorer)


def untrained(args, c: mw.Concept, seed: int, keep: dict | None = None) -> dict:
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    imgs = sample_concept(args, pipe, c, seed)
    if keep is not None:
        keep["step_0"] = imgs
    return score_images(imgs, c, args.images, args.scorer)


def images_path(out: Path, method: str, concept: str, seed: int) -> Path:
    """Where a curve's sampled images are kept: one npz per (method, concept, seed), a uint8 array per step."""
    return out / "images" / f"{concept}-{method.replace(' ', '_')}-{seed}.npz"


def save_images(path: Path, images: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **images)
    tmp.replace(path)


def folder_scorer(out: Path) -> str | None:
    """The scorer of the runs already in `out`'s curves_*.json (rows without one are v1's), or None."""
    found = {r.get("scorer", "v1") for f in out.glob("curves_*.json") for r in load_json(f, {"runs": []})["runs"]}
    if len(found) > 1:
        raise SystemExit(f"{out}: runs scored by {sorted(found)}; a folder holds one scorer's runs (use --rescore)")
    return next(iter(found), None)


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def save_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def chosen_rates(out: Path, fixed: dict[str, float] | None = None) -> dict[str, float]:
    """Every method's chosen rate from ``select*.json`` (one file per process with --tag), where `fixed`
    (``--rate METHOD=LR``, a stress test's set rates) does not give one."""
    chosen: dict[str, float] = {}
    for f in sorted(out.glob("select*.json")):
        chosen.update(load_json(f, {"chosen": {}})["chosen"])
    chosen.update(fixed or {})
    for m, source in RATE_FROM.items():
        if m not in chosen and source in chosen:
            chosen[m] = chosen[source]
    return chosen


def phase_select(args, out: Path, work: Path, deadline: float) -> None:
    path = out / (f"select_{args.tag}.json" if args.tag else "select.json")
    sel = load_json(path, {"rows": [], "chosen": {}})
    val = next(c for c in mw.CONCEPT_SETS[args.concept_set] if c.split == "validation")
    for m in args.methods:
        # every rate of the grid is trained once: a rerun after the grid grew trains only the new rates
        for lr in lr_grid(m):
            if any(r["method"] == m and r["lr"] == lr for r in sel["rows"]):
                continue
            if time.time() > deadline:
                print("[select] time budget reached; rerun the same command to continue", flush=True)
                return
            run = work / f"sel-{m.replace(' ', '_')}-{lr:g}"
            info = train_run(args, m, lr, val, 0, args.select_steps, args.select_steps, run)
            s = score_folder(args, run, val, 0)
            # rounded: 0.5 * (0.4 + 0.8) is 0.6000000000000001, which would break the tie rule below
            crit = round(0.5 * (s["subject"] + s["background"]), 9)
            sel["rows"].append({"method": m, "lr": lr, "criterion": crit, **info, **s, "scorer": args.scorer})
            print(f"[select] {m} lr {lr:g}: {crit:.3f} ({info['train_s']:.0f} s)", flush=True)
            shutil.rmtree(run, ignore_errors=True)
            save_json(path, sel)
        rows = sorted((r["lr"], r["criterion"]) for r in sel["rows"] if r["method"] == m and r["lr"] in lr_grid(m))
        best = max(rows, key=lambda r: (r[1], -r[0]))  # ties keep the smaller rate
        sel["chosen"][m] = best[0]
        sel["validation_concept"] = val.name
        save_json(path, sel)


def phase_horizon(args, out: Path, work: Path) -> int:
    path = out / "horizon.json"
    hz = load_json(path, None)
    if hz is not None:
        return hz["horizon"]
    lr = chosen_rates(out, args.rate).get("lora", 1e-3)
    val = next(c for c in mw.CONCEPT_SETS[args.concept_set] if c.split == "validation")
    run = work / "horizon-lora"
    every = args.horizon_every
    train_run(args, "lora", lr, val, 0, args.max_steps, every, run)
    rows, horizon = [], args.max_steps
    for step in range(every, args.max_steps + 1, every):
        s = score_folder(args, run / f"checkpoint-{step}", val, 0)
        rows.append({"step": step, **s})
        print(f"[horizon] lora step {step}: bg_copy {s['bg_copy']:.2f} subject {s['subject']:.2f}", flush=True)
        if s["bg_copy"] >= BG_COPY_OVERFIT:
            horizon = min([p for p in args.points if p >= step] or [step])
            break
    reached = rows[-1]["bg_copy"] >= BG_COPY_OVERFIT
    save_json(path, {"lr": lr, "rows": rows, "horizon": horizon, "overfit_reached": reached, "scorer": args.scorer,
                     "rule": f"first LoRA checkpoint with bg_copy >= {BG_COPY_OVERFIT}, else --max_steps"})  # fmt: skip
    shutil.rmtree(run, ignore_errors=True)
    return horizon


def phase_curves(args, out: Path, work: Path, horizon: int, deadline: float) -> None:
    path = out / f"curves_{args.tag or 'all'}.json"
    res = load_json(path, {"horizon": horizon, "runs": []})
    chosen = chosen_rates(out, args.rate)

    def done() -> set[tuple[str, str, int]]:
        """Done by any process (every tag's file, read afresh), so parts can split the work differently."""
        return {(r["method"], r["concept"], r["seed"]) for f in out.glob("curves_*.json")
                for r in load_json(f, {"runs": []})["runs"]}  # fmt: skip

    points = [p for p in args.points if p <= horizon]
    every = int(np.gcd.reduce(points))
    concepts = [c for c in mw.CONCEPT_SETS[args.concept_set] if c.split == "test"][: args.concepts]
    for seed in args.seeds:
        for c in concepts:
            for m in ["untrained", *args.methods]:
                if (m, c.name, seed) in done():
                    continue
                if time.time() > deadline:
                    print("[curves] time budget reached; rerun the same command to continue", flush=True)
                    return
                kept: dict[str, np.ndarray] = {}
                if m == "untrained":
                    row = {
                        "method": m,
                        "concept": c.name,
                        "seed": seed,
                        "points": [{"step": 0, **untrained(args, c, seed, kept)}],
                    }
                else:
                    run = work / f"{c.name}-{m.replace(' ', '_')}-{seed}"
                    info = train_run(args, m, chosen[m], c, seed, max(points), every, run)
                    pts = [{"step": p, **score_folder(args, run / f"checkpoint-{p}", c, seed, kept, p)} for p in points]
                    row = {"method": m, "concept": c.name, "seed": seed, "lr": chosen[m], **info, "points": pts}
                    shutil.rmtree(run, ignore_errors=True)
                row["scorer"] = args.scorer
                save_images(images_path(out, m, c.name, seed), kept)  # before the row: a listed run has its images
                res["runs"].append(row)
                save_json(path, res)
                print(f"[curves] {m} {c.name} seed {seed}: " + ", ".join(
                    f"{p['step']}: s {p['subject']:.2f} p {p['prompt']:.2f} bg {p['bg_copy']:.2f}" for p in row["points"]), flush=True)  # fmt: skip


def mean_curves(runs: list[dict]) -> dict[str, list[dict]]:
    """Per method, the mean of each metric at each step over concepts and seeds."""
    by: dict[str, dict[int, list[dict]]] = {}
    for r in runs:
        for p in r["points"]:
            by.setdefault(r["method"], {}).setdefault(p["step"], []).append(p)
    out = {}
    for m, steps in by.items():
        out[m] = [{"step": s, "n": len(v), **{k: float(np.mean([x[k] for x in v])) for k in ("subject", "prompt",
                  "background", "bg_copy", "subject_train")}} for s, v in sorted(steps.items())]  # fmt: skip
    return out


def load_runs(folder: Path) -> list[dict]:
    """Every (method, concept, seed) run of `folder`'s ``curves_*.json`` once (the untrained row is in
    every tag's file)."""
    runs, seen = [], set()
    for f in sorted(folder.glob("curves_*.json")):
        for r in load_json(f, {"runs": []})["runs"]:
            key = (r["method"], r["concept"], r["seed"])
            if key not in seen:
                seen.add(key)
                runs.append(r)
    return runs


def folder_scorer_of(runs: list[dict]) -> str:
    """The one scorer of `runs` (rows without one are v1's): means never mix scorers."""
    found = {r.get("scorer", "v1") for r in runs}
    if len(found) > 1:
        raise SystemExit(f"[report] runs scored by {sorted(found)}: rescore them into one folder (--rescore)")
    return found.pop()


def concept_ceilings(args, scorer: str) -> dict[str, float]:
    """{concept: ceiling} from ``--ceilings`` for this scorer (v1's beside v2's), where it was made for ``--model``."""
    data = load_json(Path(args.ceilings), None)
    if data is None or data.get("model") != Path(args.model).name:
        return {}
    key = "ceiling" if scorer == "v2" else "ceiling_v1"
    return {c: row[key] for rows in data["sets"].values() for c, row in rows.items()}


def phase_rescore(args, out: Path) -> Path:
    """Score every run's saved images again with ``--scorer`` into ``OUT/rescored-SCORER/`` (no training);
    runs without saved images (trained before they were kept) are listed and left out."""
    dest = out / f"rescored-{args.scorer}"
    dest.mkdir(exist_ok=True)
    missing, done = [], 0
    for f in sorted(out.glob("curves_*.json")):
        res = load_json(f, {"runs": []})
        runs = []
        for r in res["runs"]:
            path = images_path(out, r["method"], r["concept"], r["seed"])
            if not path.is_file():
                missing.append(f"{r['method']} / {r['concept']} / seed {r['seed']}")
                continue
            c = mw.concept(r["concept"])
            with np.load(path) as saved:
                # images per prompt from the first step's array: 6 prompts (5 evaluation + the instance one)
                per_prompt = len(saved[f"step_{r['points'][0]['step']}"]) // (len(c.eval_prompts()) + 1)
                pts = [{"step": p["step"], **score_images(saved[f"step_{p['step']}"], c, per_prompt, args.scorer)}
                       for p in r["points"]]  # fmt: skip
            runs.append({**r, "points": pts, "scorer": args.scorer, "rescored_from": r.get("scorer", "v1")})
            done += 1
        save_json(dest / f.name, {**res, "runs": runs})
    print(f"[rescore] {done} runs rescored with scorer {args.scorer} into {dest}"
          + (f"; no saved images for {len(missing)}: {', '.join(missing)}" if missing else ""))  # fmt: skip
    return dest


def rates_of(run: dict) -> tuple[float | None, float | None, float | None]:
    """A run's (rate, tokens' rate from another method, alpha's own rate): what one method must share."""
    return run.get("lr"), run.get("token_lr"), run.get("alpha_lr")


def phase_report(args, out: Path) -> None:
    runs = load_runs(out)
    if args.pair_with:  # a control run at another rate, reported beside the main folder's other arm
        own = {r["method"] for r in runs}
        runs += [r for r in load_runs(Path(args.pair_with))
                 if r["method"] not in own and (r["method"] in args.methods or r["method"] == "untrained")]  # fmt: skip
    if not runs:
        print("[report] no curves yet")
        return
    # tables and legends in one order whatever process wrote which file (stable: concepts keep theirs)
    order = ["untrained", *METHODS]
    runs.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    for m in {r["method"] for r in runs}:
        rates = {rates_of(r) for r in runs if r["method"] == m}
        if len(rates) > 1:
            raise SystemExit(f"[report] {m} was trained at different rates {sorted(rates, key=str)}: move the "
                             "runs of a superseded rate out of the curves_*.json files")  # fmt: skip
    # like with like: only the (concept, seed) pairs every method has reached (a part may end mid-concept)
    methods = {r["method"] for r in runs}
    pairs = {(r["concept"], r["seed"]) for r in runs}
    complete = {pair for pair in pairs if all(any((r["concept"], r["seed"]) == pair and r["method"] == m
                                                  for r in runs) for m in methods)}  # fmt: skip
    left_out = sorted(pairs - complete)
    every_run, runs = runs, [r for r in runs if (r["concept"], r["seed"]) in complete]
    scorer = folder_scorer_of(runs)
    ceilings = concept_ceilings(args, scorer)
    # scorer v2: a concept whose ceiling is under the threshold is reported, not averaged in (README rule)
    flagged = sorted(
        {r["concept"] for r in runs if scorer == "v2" and ceilings.get(r["concept"], 1.0) < sc.CEILING_THRESHOLD}
    )
    meant = [r for r in runs if r["concept"] not in flagged]
    if not meant:
        print(f"[report] every complete concept is flagged by its ceiling ({flagged}): no means to report")
        return
    curves = mean_curves(meant)
    base = curves.get("untrained", [{}])[0]
    lines = [f"# Learning curves: {args.concept_set} set, model {Path(args.model).name}", "",
             "Mean over test concepts and seeds; `prompt` = mean of requested background, size and position.",
             f"Concepts (seed): {', '.join(f'{c} ({sd})' for c, sd in sorted(complete))}"
             + (f"; left out until every method has them: {', '.join(f'{c} ({sd})' for c, sd in left_out)}" if left_out else ""),
             "", f"Scorer {scorer}. " + (("Ceilings (instance images through the VAE, `v2/ceilings.json`): "
             + ", ".join(f"{c} {ceilings[c]:.1f}" for c in sorted({r['concept'] for r in runs}) if c in ceilings) + ". ")
             if ceilings else "No ceilings for this model. ")
             + (f"Flagged (ceiling below {sc.CEILING_THRESHOLD}), in the per-concept table only, not in any mean: "
             f"{', '.join(flagged)}." if flagged else ""), ""]  # fmt: skip
    # a paired comparison needs only its two methods: every (concept, seed) both have reached
    lines += summary_tables(curves, runs, ceilings) + paired_tables(
        [r for r in every_run if r["concept"] not in flagged]
    )
    for m, pts in curves.items():
        params = next((r.get("trainable_parameters") for r in runs if r["method"] == m), None)
        lines += [f"## {m}" + (f" ({params:,} trainable)" if params else ""), "",
                  "| step | n | subject | subject_train | prompt | background | bg_copy |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in ([] if m == "untrained" else [dict(base, step=0)]) + pts:
            lines.append(f"| {p['step']} | {p.get('n', '')} | {p['subject']:.2f} | {p['subject_train']:.2f} | "
                         f"{p['prompt']:.2f} | {p['background']:.2f} | {p['bg_copy']:.2f} |")  # fmt: skip
        lines.append("")
    (out / "RESULTS.md").write_text("\n".join(lines))
    title = f"{args.concept_set}, {Path(args.model).name}"
    draw_curves(curves, out / "curves.png", title)
    # the same lines with the subject scored on the training prompt: learned, or learned only where trained?
    draw_curves(curves, out / "curves_training_prompt.png", title, x="subject_train")
    save_json(out / "results.json", {"curves": curves, "runs": runs, "scorer": scorer, "ceilings": ceilings,
                                     "flagged": flagged})  # fmt: skip
    print(f"[report] {out / 'RESULTS.md'}, {out / 'curves.png'}, {out / 'curves_training_prompt.png'}")


def summary_tables(
    curves: dict[str, list[dict]], runs: list[dict], ceilings: dict[str, float] | None = None
) -> list[str]:
    """Markdown: each method at a few steps (means), then every concept at the last step, with the rates
    (and each concept's ceiling in its column's heading where there is one)."""
    last = max(p["step"] for pts in curves.values() for p in pts)
    shown = sorted({s for s in (125, 500, 2000, last) if s <= last})  # a 500-step horizon: 125 / 500
    params = {r["method"]: r.get("trainable_parameters") for r in runs}
    rates = {r["method"]: rates_of(r) for r in runs}
    lines = ["## Summary", "",
             f"| method (trainable) | rate | subject at {' / '.join(map(str, shown))} | subject on the training "
             f"prompt at {last} | prompt at {last} | bg_copy at {last} |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m, pts in curves.items():
        at = {p["step"]: p for p in pts}
        lr, tok, alpha = rates.get(m, (None, None, None))
        rate = "-" if lr is None else f"{lr:g}" + ("" if tok is None else f", tokens {tok:g}")
        rate += "" if alpha is None else f", alpha {alpha:g}"
        name = m + (f" ({params[m]:,})" if params.get(m) else "")
        subj = " / ".join(f"{at[s]['subject']:.2f}" if s in at else "-" for s in shown) if m != "untrained" \
            else f"{pts[0]['subject']:.2f}"  # fmt: skip
        end = at.get(last, pts[-1])
        lines.append(
            f"| {name} | {rate} | {subj} | {end['subject_train']:.2f} | {end['prompt']:.2f} | {end['bg_copy']:.2f} |"
        )
    concepts = sorted({r["concept"] for r in runs})
    ceilings = ceilings or {}
    heads = [c + (f" (ceiling {ceilings[c]:.1f})" if c in ceilings else "") for c in concepts]
    lines += ["", f"Per concept at step {last} (mean over seeds): subject / prompt / bg_copy", "",
              "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(concepts)]  # fmt: skip
    for m in curves:
        cells = []
        for c in concepts:
            pts = [p for r in runs if r["method"] == m and r["concept"] == c for p in r["points"]]
            final = max(p["step"] for p in pts)
            end = [p for p in pts if p["step"] == final]
            cells.append(" / ".join(f"{np.mean([p[k] for p in end]):.2f}" for k in ("subject", "prompt", "bg_copy")))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


#: (with alpha, without): the comparisons the paper's claims are about, made concept by concept
PAIRS = (("coeff", "untrained"), ("coeff+lora d0", "lora"), ("coeff+lora d0.1", "lora"),
         ("coeff+lora d0.2", "lora"), ("coeff+ti", "ti"))  # fmt: skip


def paired_tables(runs: list[dict]) -> list[str]:
    """Markdown: each (with alpha, without) pair's differences at every step, paired by (concept, seed):
    the mean difference and how many pairs went up / stayed / went down, for subject, prompt and copying."""
    point = {(r["method"], r["concept"], r["seed"], p["step"]): p for r in runs for p in r["points"]}
    lines = ["## With alpha minus without, paired by concept and seed", "",
             "Each cell: mean difference (pairs higher / equal / lower). For bg_copy, lower is better. Every "
             "(concept, seed) that both methods of a pair have reached counts, also those left out of the means.",
             ""]  # fmt: skip
    for with_alpha, without in PAIRS:
        keys = sorted({(c, sd, st) for m, c, sd, st in point if m == with_alpha})
        if not keys or not any(m == without for m, *_ in point):
            continue
        lines += [f"**{with_alpha}** against **{without}**", "",
                  "| step | pairs | subject | prompt | bg_copy |", "|---|---|---|---|---|"]  # fmt: skip
        for step in sorted({st for _, _, st in keys}):
            diffs = {k: [] for k in ("subject", "prompt", "bg_copy")}
            for c, sd, st in keys:
                if st != step:
                    continue
                other = point.get((without, c, sd, st)) or point.get((without, c, sd, 0))  # untrained: step 0
                if other is None:
                    continue
                for k in diffs:
                    diffs[k].append(point[(with_alpha, c, sd, st)][k] - other[k])
            if not diffs["subject"]:
                continue
            cells = [f"{round(float(np.mean(d)), 2) + 0.0:+.2f} ({sum(x > 1e-9 for x in d)}/{sum(abs(x) <= 1e-9 for x in d)}/"
                     f"{sum(x < -1e-9 for x in d)})" for d in diffs.values()]  # fmt: skip
            lines.append(f"| {step} | {len(diffs['subject'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


#: The figure's panels: each comparison on its own axes, so that lines that agree do not hide each other.
PANELS = (
    ("alpha, LoRA, alpha+LoRA (three coefficient dropouts)",
     ("untrained", "coeff", "lora", "coeff+lora d0", "coeff+lora d0.1", "coeff+lora d0.2")),
    ("learned tokens with and without alpha; full fine-tuning", ("untrained", "coeff", "ti", "coeff+ti", "full")),
)  # fmt: skip
COLOURS = {"untrained": "#000000", "coeff": "#d62728", "lora": "#1f77b4", "coeff+lora d0": "#9ecae1",
           "coeff+lora d0.1": "#6a3d9a", "coeff+lora d0.2": "#17becf", "ti": "#ff7f0e", "coeff+ti": "#2ca02c",
           "full": "#7f7f7f"}  # fmt: skip


def draw_curves(curves: dict[str, list[dict]], path: Path, title: str, size: int = 520, x: str = "subject") -> None:
    """Subject fidelity (x; `x="subject_train"`: on the training prompt) against prompt fidelity (y), one line per method through its checkpoints
    (small dots, the last one large and labelled with its step), a panel per comparison (`PANELS`); the
    untrained model is the black square every line starts from. Axes span the data, in steps of 0.1."""
    from PIL import Image, ImageDraw

    from dreamcoeff.grids import label_font

    points = [p for pts in curves.values() for p in pts]
    lo_x, hi_x = (
        np.floor(min(p[x] for p in points) * 10) / 10,
        np.ceil(max(p[x] for p in points) * 10) / 10,
    )
    lo_y, hi_y = (
        np.floor(min(p["prompt"] for p in points) * 10) / 10,
        np.ceil(max(p["prompt"] for p in points) * 10) / 10,
    )
    hi_x, hi_y = max(hi_x, lo_x + 0.1), max(hi_y, lo_y + 0.1)
    panel_w, legend_h, top = size + 70, 90, 36
    img = Image.new("RGB", (panel_w * len(PANELS) + 20, size + legend_h + top + 40), "white")
    d = ImageDraw.Draw(img)
    f, small = label_font(14), label_font(11)
    x_label = "subject fidelity" + (" on the training prompt" if x == "subject_train" else "")
    d.text((10, 6), f"prompt fidelity against {x_label} along training: {title}", fill="black", font=f)
    start = curves.get("untrained", [None])[0]
    for k, (heading, methods) in enumerate(PANELS):
        x0, y0, w, h = 60 + k * panel_w, top + 42, size - 20, size - 40

        def xy(sx: float, py: float, x0=x0, y0=y0, w=w, h=h) -> tuple[float, float]:
            return x0 + (sx - lo_x) / (hi_x - lo_x) * w, y0 + (1 - (py - lo_y) / (hi_y - lo_y)) * h

        d.text((x0, top), heading, fill="black", font=f)
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        for t in np.arange(lo_x, hi_x + 1e-9, 0.1):
            d.text((xy(t, lo_y)[0] - 10, y0 + h + 4), f"{t:.1f}", fill="black", font=small)
        for t in np.arange(lo_y, hi_y + 1e-9, 0.1):
            d.text((x0 - 30, xy(lo_x, t)[1] - 7), f"{t:.1f}", fill="black", font=small)
        d.text((x0 + w / 2 - 4 * len(x_label), y0 + h + 20), x_label, fill="black", font=f)
        d.text((x0 - 55, y0 - 18), "prompt fidelity", fill="black", font=small)
        shown = [m for m in methods if m in curves]
        for m in shown:
            colour, pts = COLOURS.get(m, "#bcbd22"), curves[m]
            line = ([start] if start and m != "untrained" else []) + pts
            coords = [xy(p[x], p["prompt"]) for p in line]
            if len(coords) > 1:
                d.line(coords, fill=colour, width=3)
            for p, (cx, cy) in zip(line[1:] if m != "untrained" else [], coords[1:]):
                r = 6 if p is line[-1] else 3
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
                if p is line[-1]:
                    d.text((cx + 7, cy - 7), str(p["step"]), fill=colour, font=small)
        if start:
            cx, cy = xy(start[x], start["prompt"])
            d.rectangle([cx - 6, cy - 6, cx + 6, cy + 6], fill="black")
        for j, m in enumerate(shown):
            lx, ly = x0 + (j % 2) * (w // 2), y0 + h + 48 + (j // 2) * 22
            d.line([(lx, ly + 8), (lx + 24, ly + 8)], fill=COLOURS.get(m, "#bcbd22"), width=4)
            d.text((lx + 30, ly), m + (" (black square)" if m == "untrained" else ""), fill="black", font=f)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--concept_set", default="recombination", choices=sorted(mw.CONCEPT_SETS))
    p.add_argument("--out", required=True)
    p.add_argument("--phase", default="select,horizon,curves,report")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--concepts", type=int, default=5, help="how many of the set's test concepts")
    p.add_argument("--select_steps", type=int, default=500)
    p.add_argument("--max_steps", type=int, default=4000, help="the horizon if LoRA never overfits")
    p.add_argument("--points", default=",".join(map(str, POINTS)), help="steps scored along each curve")
    p.add_argument("--horizon_every", type=int, default=250, help="LoRA's validation checkpoints in the horizon phase")
    p.add_argument("--noise_offset", type=float, default=0.1)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=110, help="end this part after about this long")
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=R1,R2,...",
                   help=f"replace a rate grid (knobs: {', '.join(LR_GRIDS)}), e.g. to check beyond a grid's end "
                   "in another --out folder")  # fmt: skip
    p.add_argument("--rate", action="append", default=[], metavar="METHOD=LR",
                   help="set a method's rate instead of selecting it (a stress test in its own --out folder, e.g. "
                   "LoRA at a rate where it overfits); alpha+LoRA d0 / d0.2 follow d0.1's unless set")  # fmt: skip
    p.add_argument("--alpha_rate", type=float, default=None,
                   help="alpha+LoRA runs: alpha's rate (--coeff_lr) instead of the shared one, e.g. LoRA stressed "
                   "at a high --rate with alpha at the rate it had in the main benchmark")  # fmt: skip
    p.add_argument("--pair_with", default=None, metavar="DIR",
                   help="report: add DIR's runs of the --methods this folder lacks (and the untrained row), e.g. "
                   "the main benchmark's LoRA beside alpha+LoRA trained here at LoRA's rate")  # fmt: skip
    p.add_argument("--tag", default=None, help="select_TAG.json / curves_TAG.json: split methods over processes")
    p.add_argument("--scorer", default=None, choices=sc.SCORER_VERSIONS,
                   help="v2 (dreamcoeff/testing/scorer.py) for a new --out folder; default: the scorer of the runs "
                   "already there (v1 for folders made before v2), else v2")  # fmt: skip
    p.add_argument("--rescore", action="store_true",
                   help="no training: score every run's saved images (OUT/images/) again with --scorer into "
                   "OUT/rescored-SCORER/")  # fmt: skip
    p.add_argument("--ceilings", default=str(HERE / "v2" / "ceilings.json"),
                   help="report: each concept's ceiling (benchmarks/micro/ceilings.py); flagged concepts are left "
                   "out of the means (scorer v2)")  # fmt: skip
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.points = [int(s) for s in args.points.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    fixed_rates = {}
    for spec in args.rate:
        method, _, lr = spec.rpartition("=")
        try:
            value = float(lr)
        except ValueError:
            value = None
        if method not in METHODS or value is None:
            p.error(f"--rate {spec!r}: expected METHOD=LR (a number) with METHOD one of {list(METHODS)}")
        fixed_rates[method] = value
    args.rate = fixed_rates
    for spec in args.grid:
        knob, _, rates = spec.partition("=")
        if knob not in LR_GRIDS or not rates:
            p.error(f"--grid {spec!r}: expected KNOB=R1,R2,... with KNOB one of {list(LR_GRIDS)}")
        LR_GRIDS[knob] = [float(r) for r in rates.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        args.scorer = args.scorer or "v2"
        phase_rescore(args, out)
        return 0
    existing = folder_scorer(out)
    if args.scorer is None:
        args.scorer = existing or "v2"
    elif existing is not None and existing != args.scorer and "curves" in args.phase.split(","):
        p.error(f"--scorer {args.scorer}: the runs in {out} were scored by {existing}; continue them with "
                f"--scorer {existing}, or use --rescore (saved images) or a new --out")  # fmt: skip
    phases = args.phase.split(",")
    deadline = time.time() + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="curves-") as tmp:
        work = Path(tmp)
        if "select" in phases:
            phase_select(args, out, work, deadline)
        horizon = (
            phase_horizon(args, out, work)
            if "horizon" in phases
            else load_json(out / "horizon.json", {}).get("horizon", args.max_steps)
        )
        if "curves" in phases:
            phase_curves(args, out, work, horizon, deadline)
    if "report" in phases:
        phase_report(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
