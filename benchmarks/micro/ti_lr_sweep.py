"""Choose `--text_encoder_lr` (the learned tokens' rate) on the micro world's validation concepts.

    python benchmarks/micro/ti_lr_sweep.py --rates 1e-3 5e-3 2e-2 --steps 500 --out benchmarks/micro/ti_lr_sweep.json

Learned tokens alone (`--tuning none --train_text_encoder_ti`, the concept's identifier as the token
abstraction, 2 new tokens, random start) on the *validation* concept of each concept set (the first
of `microworld.CONCEPT_SETS[...]`; the test concepts are never looked at), the micro-benchmark's
protocol otherwise (500 steps, offset noise 0.1, seed 0). Each run is sampled on the concept's
evaluation prompts through `dreamcoeff.load_run` and scored with the world's exact metrics; the rate
is chosen, as the benchmark chooses every rate, by the mean of subject fidelity and requested-
background fidelity, averaged over the two sets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import run_bench as RB
import torch
from diffusers import StableDiffusionXLPipeline

from dreamcoeff import load_run
from dreamcoeff.testing import microworld as mw

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[1] / "models" / "microworld-sdxl"


def run_one(model: str, c: mw.Concept, lr: float, steps: int, seed: int, work: Path) -> dict:
    """Train learned tokens for concept `c` at rate `lr`, sample its evaluation prompts, score them."""
    inst = RB.write_instances(c, work / f"{c.name}_inst")
    out = work / f"{c.name}_{lr:g}"
    extra = ("--train_text_encoder_ti", "--token_abstraction", c.identifier, "--text_encoder_lr", str(lr))
    seconds, params = RB.train(model, c, "none", lr, seed, steps, out, inst, noise_offset=0.1, extra=extra)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_run(pipe, out)
    reqs = c.eval_prompts()
    prompts = [loaded.prompt(r["prompt"]) for r in reqs] + [loaded.prompt(c.instance_prompt)]
    imgs = RB.generate(pipe, prompts, 2, seed, 20, 4.0)
    n = len(reqs) * 2
    scores = RB.score(imgs[:n], reqs, 2, c)
    scores["subject_train"] = float(np.mean([mw.subject_match(im, c)["subject"] for im in imgs[n:]]))
    scores["select"] = (scores["subject"] + scores["background"]) / 2
    return {"concept": c.name, "lr": lr, "train_s": round(seconds, 1), "trainable": params, **scores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--rates", type=float, nargs="+", default=[1e-3, 5e-3, 2e-2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "ti_lr_sweep.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ti-sweep-") as tmp:
        for name, concepts in mw.CONCEPT_SETS.items():
            for lr in args.rates:
                t0 = time.time()
                row = {"set": name, **run_one(args.model, concepts[0], lr, args.steps, args.seed, Path(tmp))}
                rows.append(row)
                print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    by_rate = {lr: float(np.mean([r["select"] for r in rows if r["lr"] == lr])) for lr in args.rates}
    best = max(by_rate, key=by_rate.get)
    result = {"args": vars(args), "rows": rows, "select_by_rate": by_rate, "chosen": best}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"chosen --text_encoder_lr {best:g} (mean of subject and background fidelity: {by_rate})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
