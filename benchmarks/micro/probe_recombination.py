"""Probe (not part of the benchmark): can a method bind an identifier to a *recombination* of what the
base model already draws, here a flat purple diamond, rather than to a texture it has never drawn?

    python benchmarks/micro/probe_recombination.py      # ~4 minutes on 2 cores

Trains alpha (1e-3, 3e-3) and LoRA r4 (1e-3) for 500 steps on 5 images of "a vbk diamond" (flat
purple, white background; the world has purple and diamonds but no identifier for the pair), with
run_bench's trainer call, then samples "a vbk diamond on a <green|red|blue|black> background" (4 images
each, seed 0) and prints the fraction of images whose object is purple only, is a diamond, and whose
background is the requested one. References: the base model with the class prompt, and the untrained
base model with the instance prompts themselves (0 steps). One concept and one seed: a pointer, not a
result. Read the 0-step row first: prompts that name no colour come out purple from this base model,
so purple concepts are mostly there before any training (found after the probe's first run, see
benchmarks/micro/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import run_bench as RB
import torch
from PIL import Image

from dreamcoeff.testing import microworld as mw

# sibling scripts (pretrain, run_bench) import as modules: Python puts this folder on sys.path
HERE = Path(__file__).resolve().parent
MODEL = str(HERE.parents[1] / "models" / "microworld-sdxl")
BACKGROUNDS = ("green", "red", "blue", "black")
IMAGES = 4


def measure(pipe, prompts: list[str]) -> dict[str, float]:
    images = RB.generate(pipe, prompts, IMAGES, 0, 20, 4.0)
    wanted = [p.split(" on a ")[1].split()[0] for p in prompts for _ in range(IMAGES)]
    found = [mw.analyze(im) for im in images]
    return {
        "purple_only": float(np.mean([a.get("colours") == ["purple"] for a in found])),
        "diamond": float(np.mean([a.get("shape") == "diamond" for a in found])),
        "background": float(np.mean([a["background"] == w for a, w in zip(found, wanted)])),
    }


def main(work: str = "/tmp/probe_recombination") -> None:
    torch.set_num_threads(2)
    c = mw.Concept("flat-purple-diamond", "vbk", "diamond", "purple", None, "solid", "white", "test")
    inst = Path(work) / "instance"
    inst.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(c.instance_scenes()):
        Image.fromarray(mw.render(scene)).save(inst / f"{i}.png")
    prompts = [f"a {c.token} on a {bg} background" for bg in BACKGROUNDS]
    base = RB.load(MODEL, None, None)
    print("base, class prompt", measure(base, [p.replace(f"{c.identifier} ", "") for p in prompts]))
    print("base, instance prompts (0 steps)", measure(base, prompts))
    for method, lr in (("coeff", 1e-3), ("coeff", 3e-3), ("lora", 1e-3)):
        out = Path(work) / f"{method}_{lr}"
        secs, _ = RB.train(MODEL, c, method, lr, 0, 500, out, inst, 0.1)
        print(method, lr, measure(RB.load(MODEL, method, out), prompts), f"(trained in {secs:.0f}s)", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
