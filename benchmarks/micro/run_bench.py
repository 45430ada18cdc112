"""Micro-DreamBench: DreamBooth customisation of the micro-world SDXL pipeline, scored exactly.

    python benchmarks/micro/run_bench.py --jobs 2                                # texture concepts
    python benchmarks/micro/run_bench.py --jobs 2 --concept_set recombination    # flat concepts
    python benchmarks/micro/run_bench.py --quick        # 2 concepts, 1 seed (a smoke run)

`make bench-micro` runs both concept sets (``microworld.CONCEPT_SETS``): ``texture``, two-colour
patterned objects the base model has never drawn, and ``recombination``, one flat colour bound to a
shape, both of which the base model draws, the pair without a name (see SET_DESCRIPTIONS for the
caveat: the untrained model draws an unknown colour word purple).

Methods: Coeff-Tuning alpha (``coeff``), LoRA rank 4 (``lora``), both (``coeff+lora``) and full UNet
fine-tuning (``full``), all through ``train_dreambooth_coeff.py``'s code with the same steps and data.
For every method (``--methods``) the learning rate is first chosen on the set's *validation* concept
(its first) from ``--lr_grid``, by the mean of subject fidelity and requested-background
fidelity (fixed before any result was seen). Then each test concept x seed is trained with
``dreamcoeff.train.main`` (the code behind ``train_dreambooth_coeff.py``) and its evaluation
prompts are sampled and scored with ``microworld``'s exact metrics:

* subject fidelity: the generated object is the concept (shape, its colours, pattern), on the
  evaluation prompts (other backgrounds, sizes, positions) and, as ``subject_train``, on the
  instance prompt itself (what was learned at all, before asking for a new context);
* prompt fidelity: requested background; requested size / position (where the prompt asks);
* background copying: the concept's training background appears although another was requested.

Sanity rows: the base model with the class prompt (no concept), the untrained base model on the
instance prompts themselves (the "0 steps" zero point of every method), and the instance images
scored against the evaluation requests (subject 1, background copying 1), also after a VAE round trip.
Writes ``results.json``, ``RESULTS.md`` and one grid image per method next to this script (texture)
or into ``recombination/`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from dreamcoeff.testing import microworld as mw

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
METRICS = ("subject_train", "subject", "shape", "colours", "pattern", "background", "size", "position", "bg_copy")
METHODS = ("coeff", "lora", "coeff+lora", "full")
#: The sanity row every method's gain is read against: the untrained model on the instance prompts.
ZERO_STEP_ROW = "base model, instance prompts (0 steps)"


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def write_instances(c: mw.Concept, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(c.instance_scenes()):
        Image.fromarray(mw.render(s)).save(folder / f"{i}.png")
    return folder


def train(
    model: str,
    c: mw.Concept,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    out: Path,
    inst: Path,
    noise_offset: float = 0.0,
    extra: tuple[str, ...] = (),
) -> tuple[float, int]:
    """One DreamBooth run through the real trainer; (wall seconds, trainable parameters)."""
    from dreamcoeff.train import main

    flags = train_argv(model, c, method, lr, seed, steps, out, inst, noise_offset, extra)
    t0 = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        rc = main(flags)
    reset_accelerate()
    if rc != 0:
        raise RuntimeError(f"training failed ({method}, {c.name}, lr {lr}, seed {seed})")
    done = json.loads((out / "dreamcoeff_complete.json").read_text())
    return time.time() - t0, int(done["trainable_parameters"])


def train_argv(
    model: str,
    c: mw.Concept,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    out: Path,
    inst: Path,
    noise_offset: float = 0.0,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The trainer's command line of one run of `train` (`extra` last, so its flags win)."""
    flags = [
        "--pretrained_model_name_or_path",
        model,
        "--instance_dir",
        str(inst),
        "--instance_prompt",
        c.instance_prompt,
        "--output_dir",
        str(out),
        "--resolution",
        str(mw.RES),
        "--report_to",
        "none",
        "--checkpointing_steps",
        "0",
        "--max_train_steps",
        str(steps),
        "--seed",
        str(seed),
        "--tuning",
        method,
        "--rank",
        "4",
        "--overwrite_output_dir",
        "--noise_offset",
        str(noise_offset),
    ]
    # One learning rate per method; alpha+LoRA uses it for both parameter groups, full for the whole UNet.
    return flags + ["--coeff_lr", str(lr), "--learning_rate", str(lr), *extra]


def load(model: str, method: str | None, out: Path | None) -> StableDiffusionXLPipeline:
    if method == "full":
        from diffusers import UNet2DConditionModel

        pipe = StableDiffusionXLPipeline.from_pretrained(
            model, unet=UNet2DConditionModel.from_pretrained(out, subfolder="unet")
        )
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if method and "coeff" in method:
        from dreamcoeff import load_coeff_weights

        load_coeff_weights(pipe, out)
    if method and "lora" in method:
        pipe.load_lora_weights(out)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], n: int, seed: int, steps: int, guidance: float) -> list[np.ndarray]:
    images = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(10_000 * seed + i)
        images.extend(
            pipe([p] * n, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np").images
        )
    return images


@torch.no_grad()
def vae_round_trip(pipe, images: list[np.ndarray]) -> list[np.ndarray]:
    """Encode (posterior mode) and decode world images with the pipeline's VAE; uint8 arrays back."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return list(((rec + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8))


def world_accuracy(pipe, args, n: int = 48) -> dict[str, float]:
    """How well the base model draws full world captions: per-attribute accuracy and all-correct."""
    rng = np.random.default_rng(2024)
    scenes = [mw.sample_scene(rng) for _ in range(n)]
    acc: dict[str, list[float]] = {}
    for i in range(0, n, 8):
        batch = scenes[i : i + 8]
        imgs = pipe(
            [mw.caption(sc) for sc in batch],
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
        ).images
        for img, sc in zip(imgs, batch):
            m = mw.matches_scene(img, sc)
            m.pop("pattern")
            m["all"] = all(m.values())
            for k, v in m.items():
                acc.setdefault(k, []).append(float(v))
    out = {k: float(np.mean(v)) for k, v in acc.items()}
    out["n"] = n
    return out


def score(
    images: list[np.ndarray], requests: list[dict], n: int, c: mw.Concept, analyze=mw.analyze
) -> dict[str, float]:
    """Mean subject and prompt fidelity of `images` (`n` per request, in order); `analyze` picks the
    scorer (v1: microworld.analyze, v2: dreamcoeff.testing.scorer.analyze)."""
    acc: dict[str, list[float]] = {k: [] for k in METRICS}
    for j, img in enumerate(images):
        req = requests[j // n]
        a = analyze(img)
        for k, v in mw.subject_match(img, c, a).items():
            acc[k].append(v)
        for k, v in mw.prompt_match(img, req, c.train_background, a).items():
            if v is not None:
                acc[k].append(v)
    return {k: float(np.mean(v)) for k, v in acc.items() if v}


def evaluate_concept(
    pipe, c: mw.Concept, seed: int, images: int, inference_steps: int, guidance: float, prompt_map=None
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Sample and score concept ``c``'s evaluation prompts and its instance prompt with ``pipe``:
    (scores incl. ``subject_train``, the evaluation prompts' images). ``prompt_map`` rewrites each
    prompt before sampling (a run with learned tokens: the identifier becomes its tokens)."""
    reqs = c.eval_prompts()
    prompts = [r["prompt"] for r in reqs] + [c.instance_prompt]
    if prompt_map is not None:
        prompts = [prompt_map(p) for p in prompts]
    # the instance prompt last (its noise seed is its index, so the other prompts' images are
    # unchanged): subject fidelity on the training prompt tells "not learned" from "not transferred"
    imgs = generate(pipe, prompts, images, seed, inference_steps, guidance)
    n = len(reqs) * images
    s = score(imgs[:n], reqs, images, c)
    s["subject_train"] = float(np.mean([mw.subject_match(im, c)["subject"] for im in imgs[n:]]))
    return s, imgs[:n]


def _t975(df: int) -> float:
    table = {
        1: 12.71,
        2: 4.30,
        3: 3.18,
        4: 2.78,
        5: 2.57,
        6: 2.45,
        7: 2.36,
        8: 2.31,
        9: 2.26,
        10: 2.23,
        12: 2.18,
        15: 2.13,
        20: 2.09,
        30: 2.04,
    }
    return table.get(df) or table[min((k for k in table if k >= df), default=30)]


def interval(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(_t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def grid(rows: list[list[np.ndarray]], path: Path) -> None:
    w = max(len(r) for r in rows)
    pad = np.ones((mw.RES, mw.RES, 3), np.float32)
    lines = [np.concatenate([(r[i] if i < len(r) else pad) for i in range(w)], axis=1) for r in rows]
    img = np.concatenate(lines, axis=0)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(img).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "microworld-sdxl"))
    p.add_argument(
        "--concept_set",
        default="texture",
        choices=sorted(mw.CONCEPT_SETS),
        help="which held-out concepts: texture (patterned, never drawn) or recombination (flat colour + shape)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: this folder for texture, recombination/ for the other set)"
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--concepts", default=None, help="test concepts (default: the set's test concepts)")
    p.add_argument(
        "--steps",
        type=int,
        default=500,
        help="optimizer steps per DreamBooth run (all methods; 500, as in diffusers' DreamBooth LoRA examples)",
    )
    p.add_argument(
        "--lr_grid", default="coeff=1e-3,3e-3,1e-2;lora=1e-3,3e-3,1e-2;coeff+lora=1e-3,3e-3,1e-2;full=3e-5,1e-4,3e-4"
    )
    p.add_argument(
        "--noise_offset",
        type=float,
        default=0.1,
        help="the trainer's --noise_offset for every run (the micro model was pretrained with 0.1)",
    )
    p.add_argument("--images", type=int, default=2, help="images per evaluation prompt")
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 test concepts, seed 0, 1 image per prompt")
    p.add_argument("--minutes", type=float, default=None, help="stop starting new test runs after this long")
    p.add_argument(
        "--phase",
        default="sanity,select,test",
        help="comma list of sanity, select, test (to split the work over processes)",
    )
    p.add_argument("--lr_from", nargs="*", default=[], help="part files whose chosen_lr the test phase uses")
    p.add_argument("--tag", default=None, help="write part_TAG.json (and grid rows) instead of the final files")
    p.add_argument("--merge", nargs="*", default=None, help="merge part files into results.json / RESULTS.md")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="split the methods over this many processes (one thread each) and merge the parts",
    )
    args = p.parse_args(argv)
    concept_set = mw.CONCEPT_SETS[args.concept_set]
    if args.concepts is None:
        args.concepts = ",".join(c.name for c in concept_set if c.split == "test")
    if args.out is None:
        args.out = str(HERE if args.concept_set == "texture" else HERE / args.concept_set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        return merge([Path(f) for f in args.merge], out)
    if args.jobs > 1:
        return run_jobs(args, argv if argv is not None else sys.argv[1:], out)
    torch.set_num_threads(args.threads)
    logging.getLogger("dreamcoeff").setLevel(logging.WARNING)
    started = time.time()
    deadline = started + (args.minutes * 60 if args.minutes else math.inf)
    phases = set(args.phase.split(","))
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    concepts = [mw.concept(n) for n in args.concepts.split(",")]
    if args.quick:
        concepts, seeds, args.images = concepts[:2], seeds[:1], 1
    grids = {m: dict(item.split("=") for item in args.lr_grid.split(";"))[m] for m in methods}
    grids = {m: [float(x) for x in v.split(",")] for m, v in grids.items()}
    work = Path(tempfile.mkdtemp(prefix="microbench-"))
    rows_dir = out / "rows"
    grid_rows: dict[str, list] = {m: [] for m in methods}
    res: dict = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("merge",)},
        "lr_selection": {},
        "chosen_lr": {},
        "runs": [],
        "sanity": {},
    }
    for f in args.lr_from:
        res["chosen_lr"].update(json.loads(Path(f).read_text()).get("chosen_lr", {}))

    def evaluate(pipe, c, seed):
        return evaluate_concept(pipe, c, seed, args.images, args.inference_steps, args.guidance)

    def write():
        res["wall_s"] = round(time.time() - started, 1)
        if args.tag:
            (out / f"part_{args.tag}.json").write_text(json.dumps(res, indent=1))
        else:
            _write(res, out, methods)

    try:
        if "sanity" in phases:
            base = load(args.model, None, None)
            res["world_sanity"] = world_accuracy(base, args)
            print("[base] world captions:", res["world_sanity"], flush=True)
            for c in concepts:
                reqs = c.eval_prompts()
                class_reqs = [dict(r, prompt=r["prompt"].replace(c.token, c.shape)) for r in reqs]
                for seed in seeds:
                    imgs = generate(
                        base, [r["prompt"] for r in class_reqs], args.images, seed, args.inference_steps, args.guidance
                    )
                    res["sanity"].setdefault("base model, class prompt", []).append(
                        {"concept": c.name, "seed": seed, **score(imgs, class_reqs, args.images, c)}
                    )
                    # the zero point of every method: the untrained model given the very prompts the
                    # trained ones get (identifier included), scored the same way (evaluate() = 0 steps)
                    s, _ = evaluate(base, c, seed)
                    res["sanity"].setdefault(ZERO_STEP_ROW, []).append({"concept": c.name, "seed": seed, **s})
                inst = [mw.render(s) for s in c.instance_scenes()]
                # each instance image scored against every evaluation request, as drawn and after a
                # round trip through the VAE (the most any method can reach through this decoder)
                for name, images in (
                    ("instance images", inst),
                    ("instance images through the VAE", vae_round_trip(base, inst)),
                ):
                    per = [score([im], [r], 1, c) for r in reqs for im in images]
                    res["sanity"].setdefault(name, []).append(
                        {
                            "concept": c.name,
                            "seed": 0,
                            **{k: float(np.mean([x[k] for x in per if k in x])) for k in per[0]},
                        }
                    )
            del base
            write()

        if "select" in phases:  # learning rate per method, on the validation concept only
            val = next(c for c in concept_set if c.split == "validation")
            res["validation_concept"] = val.name
            inst_val = write_instances(val, work / "inst" / val.name)
            for m in methods:
                best = None
                for lr in grids[m]:
                    run_dir = work / "runs" / f"val-{m}-{lr}"
                    secs, _ = train(args.model, val, m, lr, 0, args.steps, run_dir, inst_val, args.noise_offset)
                    s, _ = evaluate(load(args.model, m, run_dir), val, 0)
                    crit = 0.5 * (s["subject"] + s["background"])
                    res["lr_selection"].setdefault(m, []).append(
                        {"lr": lr, "criterion": crit, "train_s": round(secs, 1), **s}
                    )
                    print(f"[val] {m} lr {lr}: criterion {crit:.3f} {s} ({secs:.0f}s)", flush=True)
                    if best is None or crit > best[0]:  # ties keep the smaller rate
                        best = (crit, lr)
                    shutil.rmtree(run_dir, ignore_errors=True)
                    write()
                res["chosen_lr"][m] = best[1]
                write()

        if "test" in phases:
            # seed-major order, so a time budget still leaves whole seeds over all concepts
            for seed in seeds:
                for c in concepts:
                    inst = write_instances(c, work / "inst" / c.name)
                    for m in methods:
                        if time.time() > deadline:
                            raise TimeoutError
                        lr = res["chosen_lr"][m]
                        run_dir = work / "runs" / f"{c.name}-{m}-{seed}"
                        secs, trainable = train(
                            args.model, c, m, lr, seed, args.steps, run_dir, inst, args.noise_offset
                        )
                        s, imgs = evaluate(load(args.model, m, run_dir), c, seed)
                        res["runs"].append(
                            {
                                "method": m,
                                "concept": c.name,
                                "seed": seed,
                                "lr": lr,
                                "train_s": round(secs, 1),
                                "trainable_parameters": trainable,
                                **s,
                            }
                        )
                        print(f"[test] {m} {c.name} seed {seed}: {s} ({secs:.0f}s)", flush=True)
                        if seed == seeds[0]:
                            row = [mw.render(c.instance_scenes()[0]).astype(np.float32) / 255] + imgs[:: args.images]
                            grid_rows[m].append(row)
                            if args.tag:
                                rows_dir.mkdir(exist_ok=True)
                                grid([row], rows_dir / f"{m.replace('+', '_')}__{c.name}.png")
                        shutil.rmtree(run_dir, ignore_errors=True)
                        write()
    except TimeoutError:
        res["stopped_early"] = f"time budget of {args.minutes} min reached; runs so far are reported"
    finally:
        if not args.tag:
            for m in methods:
                if grid_rows[m]:
                    grid(grid_rows[m], out / f"grid_{m.replace('+', '_')}.png")
        write()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_jobs(args, argv: list[str], out: Path) -> int:
    """Run the benchmark as ``args.jobs`` processes over disjoint method sets (sanity rows in the first;
    every run is seeded, so the split gives the numbers a single process would), then merge."""
    import subprocess

    if args.lr_from or args.tag or args.phase != "sanity,select,test":
        raise SystemExit("--jobs runs every phase itself; drop --lr_from / --tag / --phase")
    methods = args.methods.split(",")
    shares = [methods[i :: args.jobs] for i in range(args.jobs) if methods[i :: args.jobs]]
    passthrough, skip = [], False
    for a in argv:  # drop --jobs / --methods; they are set per part
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--jobs", "--methods", "--threads"):
            skip = "=" not in a
            continue
        passthrough.append(a)
    shutil.rmtree(out / "rows", ignore_errors=True)
    procs = []
    for i, share in enumerate(shares):
        phase = "sanity,select,test" if i == 0 else "select,test"
        cmd = [
            sys.executable,
            __file__,
            *passthrough,
            "--methods",
            ",".join(share),
            "--phase",
            phase,
            "--tag",
            f"job{i}",
            "--threads",
            "1",
        ]
        log = open(out / f"part_job{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"job {i}: {', '.join(share)} (log {out / f'part_job{i}.log'})", flush=True)
    codes = [proc.wait() for proc, _ in procs]
    for _, log in procs:
        log.close()
    if any(codes):
        print(f"a job failed (exit codes {codes}); see the part_job*.log files", flush=True)
        return 1
    parts = [out / f"part_job{i}.json" for i in range(len(shares))]
    code = merge(parts, out)
    for f in parts + [out / f"part_job{i}.log" for i in range(len(shares))]:
        f.unlink(missing_ok=True)
    shutil.rmtree(out / "rows", ignore_errors=True)
    return code


def merge(parts: list[Path], out: Path) -> int:
    """Combine part files of a run split over processes into results.json, RESULTS.md and grids."""
    res: dict = {"lr_selection": {}, "chosen_lr": {}, "runs": [], "sanity": {}, "parts": [p.name for p in parts]}
    methods: list[str] = []
    for f in parts:
        r = json.loads(f.read_text())
        res.setdefault("settings", r["settings"])
        for m in r["settings"]["methods"].split(","):
            if m not in methods:
                methods.append(m)
        res["lr_selection"].update(r["lr_selection"])
        res["chosen_lr"].update(r["chosen_lr"])
        res["runs"] += r["runs"]
        for k, v in r["sanity"].items():
            res["sanity"].setdefault(k, []).extend(v)
        if "validation_concept" in r:
            res["validation_concept"] = r["validation_concept"]
        if "world_sanity" in r:
            res["world_sanity"] = r["world_sanity"]
        if r.get("stopped_early"):
            res["stopped_early"] = r["stopped_early"]
    res["settings"]["methods"] = ",".join(methods)
    res["settings"]["seeds"] = ",".join(str(x) for x in sorted({r["seed"] for r in res["runs"]}))
    res["settings"]["concepts"] = ",".join(dict.fromkeys(r["concept"] for r in res["runs"]))
    res["settings"].pop("tag", None)
    order = [c.name for s in mw.CONCEPT_SETS.values() for c in s]
    for m in methods:
        files = sorted(
            (out / "rows").glob(f"{m.replace('+', '_')}__*.png"), key=lambda f: order.index(f.stem.split("__")[1])
        )
        if files:
            img = np.concatenate([np.asarray(Image.open(f)) for f in files], axis=0)
            Image.fromarray(img).save(out / f"grid_{m.replace('+', '_')}.png")
    _write(res, out, methods)
    return 0


def summarise(rows: list[dict]) -> dict[str, list[float]]:
    out = {}
    for k in METRICS:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = list(interval(vals))
    out["n"] = [len(rows)]
    return out


def _write(res: dict, out: Path, methods: list[str]) -> None:
    res["summary"] = {
        m: summarise([r for r in res["runs"] if r["method"] == m])
        for m in methods
        if any(r["method"] == m for r in res["runs"])
    }
    res["summary_sanity"] = {k: summarise(v) for k, v in res["sanity"].items()}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "RESULTS.md").write_text(report(res, methods))


def _fmt(v) -> str:
    if v is None:
        return "-"
    m, h = v
    return f"{m:.2f}" if math.isnan(h) else f"{m:.2f} ± {h:.2f}"


def table(res: dict) -> str:
    cols = ("subject_train", "subject", "shape", "colours", "pattern", "background", "size", "position", "bg_copy")
    lines = [
        "| row | runs | trainable params | train s/run | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for name, s in list(res.get("summary_sanity", {}).items()) + list(res.get("summary", {}).items()):
        runs = [r for r in res.get("runs", []) if r["method"] == name]
        params = f"{runs[0]['trainable_parameters']:,}" if runs and "trainable_parameters" in runs[0] else "-"
        secs = f"{np.mean([r['train_s'] for r in runs]):.0f}" if runs else "-"
        lines.append(f"| {name} | {s['n'][0]} | {params} | {secs} | " + " | ".join(_fmt(s.get(k)) for k in cols) + " |")
    return "\n".join(lines) + "\n"


SET_DESCRIPTIONS = {
    "texture": "Concepts: two-colour patterned objects (striped, checkered, split, ringed) that never occur in the "
    "pretraining world, where every object is one flat colour: a subject the base model has never drawn.",
    "recombination": 'Concepts: one flat colour bound to one shape ("a qlv circle" = a yellow circle). The world has '
    "and the base model draws both, but never names the pair. Subject = right shape in exactly that "
    "one colour. Every world caption names a colour, so the untrained model draws a prompt without "
    'one with no object or a purple one: compare each method with the "0 steps" row.',
}


def per_concept(res: dict) -> str:
    """Subject fidelity per method (and the 0-step zero point) and test concept: what the means hide."""
    concepts = list(dict.fromkeys(r["concept"] for r in res["runs"]))
    rows = {ZERO_STEP_ROW: res.get("sanity", {}).get(ZERO_STEP_ROW, [])}
    for r in res["runs"]:
        rows.setdefault(r["method"], []).append(r)
    lines = ["| row | " + " | ".join(concepts) + " |", "|---|" + "---|" * len(concepts)]
    for name, rs in rows.items():
        if not rs:
            continue
        cells = []
        for c in concepts:
            vals = [r["subject"] for r in rs if r["concept"] == c]
            cells.append(f"{np.mean(vals):.2f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = """
## What this benchmark can and cannot tell about SDXL

It **can** tell whether a method, run through the same trainer and the same attention-processor code
as on SDXL (two CLIP text encoders, SDXL time ids, per-resolution head counts, self- and
cross-attention), binds a new identifier to a subject (a two-colour patterned object the base model
has never produced, in the texture set; a flat colour + shape pair it draws only when both words are
given, in the recombination set), whether the model still composes it with the rest of the
prompt (background, size, position), and how often it copies the training background, all measured
exactly, with no learned judge. It is cheap enough to rerun on a CPU, so regressions and gross
differences between methods show up.

It **cannot** stand in for SDXL numbers. The micro model has 4 and 8 heads per layer (SDXL 10 and 20),
attention over 64 and 16 image tokens (SDXL 4096 and 1024), a 5.2 M-parameter UNet pretrained for
under an hour on a toy world with a narrow prior, and a VAE that downsamples by 4 instead of 8.
Coeff-Tuning's H x H mixing has far fewer degrees of freedom here than on SDXL (1,696 numbers in 34 layers),
while rank-4 LoRA is a much larger share of this UNet than of SDXL's (see the table). Subjects are
synthetic shapes, not real objects or identities, and a handful of concepts x seeds gives wide
intervals. Every method gets the same 500 steps, batch 1, and one learning rate chosen from a
three-point grid on the validation concept; a method that needs more steps or another rate at this
scale is under-served by that protocol. Treat the ranking as evidence about this micro setting only.

Read the table against the sanity rows. A method's gain is its row minus "base model, instance prompts
(0 steps)": the untrained model given exactly the prompts the trained ones get, identifier included
(this model draws objects whose colour word it does not know in purple, so a purple concept is largely
there before any training). Subject fidelity of any method is bounded by how exactly the
base model draws world objects at all (the "full world captions" line) and by the VAE: "instance
images through the VAE" is the score of the training images themselves after an encode/decode
round trip, the most a method can reach through this decoder.
"""


def report(res: dict, methods: list[str]) -> str:
    s = res["settings"]
    set_name = s.get("concept_set", "texture")
    lines = [
        f"# Micro-DreamBench results: {set_name} concepts",
        "",
        SET_DESCRIPTIONS[set_name],
        "",
        "Generated by `benchmarks/micro/run_bench.py` (`make bench-micro`); raw numbers in `results.json`.",
        "",
        f"Base model `{Path(s['model']).name}`; {s['steps']} DreamBooth steps per run, batch 1, "
        f"noise offset {s.get('noise_offset', 0.0)}, {s['images']} image(s) per evaluation prompt, {s['inference_steps']} Euler steps, guidance {s['guidance']}. "
        "Means with 95% t-intervals over runs (test concept x seed); each run's value is the mean over its "
        "generated images. Subject = shape, colour(s) and pattern all right, on the evaluation prompts "
        "(other backgrounds, sizes, positions); subject_train = the same on the instance prompt itself "
        "(learned at all?); background/size/position = "
        "what the prompt asked for; bg_copy = the concept's training background appears although another "
        "was requested (lower is better).",
        "",
    ]
    if res.get("stopped_early"):
        lines += [f"**Stopped early:** {res['stopped_early']}.", ""]
    lines += [table(res), ""]
    if res.get("runs"):
        lines += [
            "Subject fidelity on the evaluation prompts per test concept (mean over seeds):",
            "",
            per_concept(res),
            "",
        ]
    if res.get("world_sanity"):
        w = res["world_sanity"]
        lines += [
            f"Base model on {w['n']} random full world captions (no concept), fraction right: "
            + ", ".join(f"{k} {v:.2f}" for k, v in w.items() if k != "n")
            + ". This is the ceiling the "
            "customised models work under: the subject can only be as exact as the base model draws.",
            "",
        ]
    if res.get("chosen_lr"):
        lines += [
            "Learning rates chosen on the validation concept (criterion: mean of subject and background "
            "fidelity; alpha+LoRA uses one rate for both groups):",
            "",
        ]
        for m, rows in res["lr_selection"].items():
            tried = ", ".join(f"{r['lr']:g} -> {r['criterion']:.2f}" for r in rows)
            lines.append(f"- {m}: chose {res['chosen_lr'].get(m, '?')} ({tried})")
        lines.append("")
    lines += ["Grids (first image per evaluation prompt, seed of the first run; first column: an instance image):", ""]
    for m in methods:
        lines.append(f"- {m}: `grid_{m.replace('+', '_')}.png`")
    lines += ["", NOTES]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
