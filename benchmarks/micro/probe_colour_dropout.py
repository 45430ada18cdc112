"""Probe (not part of the benchmark): does alpha customize once the class prompt draws the concept's variants?

    python benchmarks/micro/probe_colour_dropout.py [WORK_DIR]     # ~20 minutes on 2 cores

The recombination set's reading (README, Micro-DreamBench) is that alpha cannot bind "qlv circle" to
yellow because in this world colour only arrives through a colour word: every pretraining caption names
one, so "a qlv circle" is out of distribution and comes out purple. On SDXL, "a dog" already draws many
dogs and DreamBooth narrows that down. This probe builds that case and looks:

1. continues pretraining the shipped model for ``CONTINUE_STEPS`` steps (same loss, offset noise, rate
   schedule as pretrain.py) on world batches whose colour word is dropped from the caption with
   probability ``COLOUR_DROP`` ("a circle on a blue background" for a circle of any colour);
2. measures what the continued model draws for the class prompts (colours of the objects);
3. for two recombination test concepts (yellow circle, red triangle), scores the untrained continued
   model on the instance prompts (0 steps) and after 500 steps of alpha (1e-3, 3e-3) and LoRA r4 (1e-3),
   with run_bench's trainer call and scoring (seed 0, 2 images per evaluation prompt).

One seed, two concepts, a continued (not re-pretrained) model: a test of a reading, not a result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pretrain as PT
import run_bench as RB
import torch

from dreamcoeff.testing import microworld as mw

# sibling scripts (pretrain, run_bench) import as modules: Python puts this folder on sys.path
HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[1] / "models" / "microworld-sdxl"
CONTINUE_STEPS = 600
COLOUR_DROP = 0.3
CONCEPTS = ("flat-yellow-circle", "flat-red-triangle")
RUNS = (("coeff", 1e-3), ("coeff", 3e-3), ("lora", 1e-3))


def main(work: str = "/tmp/probe_colour_dropout") -> int:
    torch.set_num_threads(2)
    work_dir = Path(work)
    model = work_dir / "continued"
    log: dict = {"continue_steps": CONTINUE_STEPS, "colour_drop": COLOUR_DROP}
    t0 = time.time()
    if not (model / "model_index.json").is_file():
        # the same continuation as `pretrain.py --continue_from` (the refinement set's v2r model)
        pipe, _ = PT.continue_pretraining(MODEL, CONTINUE_STEPS, COLOUR_DROP, log, lr=1e-3 * 0.3, batch=32)
        PT.save(pipe, model)
    log["continue_s"] = round(time.time() - t0, 1)
    base = RB.load(str(model), None, None)
    log["class_prompt_colours"] = PT.class_prompt_colours(base)
    print("class prompts on the continued model:", log["class_prompt_colours"], flush=True)
    log["runs"] = []
    for name in CONCEPTS:
        c = mw.concept(name)
        inst = RB.write_instances(c, work_dir / "inst" / name)

        def evaluate(pipe):  # run_bench's scoring at its defaults: seed 0, 2 images, 20 steps, guidance 4
            return RB.evaluate_concept(pipe, c, 0, 2, 20, 4.0)[0]

        rows = [("0 steps", None, evaluate(base))]
        for method, lr in RUNS:
            out = work_dir / "runs" / f"{name}-{method}-{lr}"
            RB.train(str(model), c, method, lr, 0, 500, out, inst, 0.1)
            rows.append((method, lr, evaluate(RB.load(str(model), method, out))))
        for method, lr, s in rows:
            log["runs"].append({"concept": name, "method": method, "lr": lr, **s})
            print(
                f"{name} {method} {lr or ''}: subject {s['subject']:.2f} colours {s['colours']:.2f} "
                f"subject_train {s['subject_train']:.2f} background {s['background']:.2f}",
                flush=True,
            )
    log["wall_s"] = round(time.time() - t0, 1)
    (work_dir / "probe_colour_dropout.json").write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
