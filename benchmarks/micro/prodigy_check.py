"""Does Prodigy find a usable learning rate for alpha (and LoRA) by itself? (issue 17)

    python benchmarks/micro/prodigy_check.py --model models/microworld-sdxl-v2 --out benchmarks/micro/v2/recombination

alpha is sensitive to its learning rate (the v2 rate selection: subject 0.0 everywhere, background
intact up to 3e-4 and broken from 3e-3 on). This trains alpha, LoRA r4 and alpha+LoRA with
``--optimizer prodigy`` (every group's rate 1.0, Prodigy's intended setting) on the recombination
set's validation concept with the selection's protocol (500 steps, seed 0), scores them with the
same criterion, and reads the step size Prodigy settled on per parameter group (``d`` in the
checkpoint's optimizer state) to set beside the AdamW grid in ``select_*.json``.
Writes ``prodigy.json``. About 5 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import curves as C
import torch

from dreamcoeff.testing import microworld as mw

HERE = Path(__file__).resolve().parent
PRODIGY = ("--optimizer", "prodigy")


def prodigy_steps(run: Path, step: int) -> list[float]:
    """Prodigy's d (its step-size estimate) per parameter group in a run's checkpoint."""
    state = torch.load(run / f"checkpoint-{step}" / "optimizer.bin", map_location="cpu", weights_only=False)
    return [float(g["d"]) for g in state["param_groups"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cargs = argparse.Namespace(model=args.model, images=2, inference_steps=20, guidance=4.0, noise_offset=0.1)
    val = next(c for c in mw.CONCEPT_SETS["recombination"] if c.split == "validation")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prodigy-") as tmp:
        inst = C.RB.write_instances(val, Path(tmp) / "inst")
        for method in ("coeff", "lora", "coeff+lora"):
            run = Path(tmp) / method
            secs, params = C.RB.train(args.model, val, method, 1.0, 0, args.steps, run, inst, 0.1,
                                      PRODIGY + ("--checkpointing_steps", str(args.steps)))  # fmt: skip
            s = C.score_folder(cargs, run, val, 0)
            crit = round(0.5 * (s["subject"] + s["background"]), 9)
            d = prodigy_steps(run, args.steps)
            groups = (["alpha"] if "coeff" in method else []) + (["LoRA"] if "lora" in method else [])
            rows.append({"method": method, "optimizer": "prodigy", "lr": 1.0, "criterion": crit, "train_s": round(secs, 1),
                         "trainable_parameters": params, "d": dict(zip(groups, d)), **s})  # fmt: skip
            print(f"[prodigy] {method}: criterion {crit:.2f}, subject {s['subject']:.2f}, background "
                  f"{s['background']:.2f}, d {dict(zip(groups, d))}", flush=True)  # fmt: skip
    out = Path(args.out) / "prodigy.json"
    out.write_text(json.dumps({"validation_concept": val.name, "steps": args.steps, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
