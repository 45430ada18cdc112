"""`make demo`: the main job end to end on the embedded default, on a CPU, in a few minutes.

1. takes the micro-world model shipped in the repository (`models/microworld-sdxl`: an SDXL-architecture pipeline
   pretrained on a procedural world of coloured shapes, see benchmarks/micro) as
   `--pretrained_model_name_or_path`: the same loading code path as real SDXL;
2. trains Coeff-Tuning alpha and a LoRA rank-4 baseline on the instance images in `samples/instance`
   ("qlv circle": a yellow circle on a red background; untrained, the model draws "a qlv circle" as
   a purple one, its colour for prompts that name none) through the real trainer
   (`dreamcoeff.train.main`, what `train_dreambooth_coeff.py` runs);
3. renders base / alpha / LoRA side by side on the same prompts and noise with the sampler
   (`dreamcoeff.sample.main`) and writes a labelled comparison grid.

    python -m dreamcoeff.demo --output_dir demo_out [--steps 500] [--model DIR] [--instance_dir DIR]

The model and the images are the repository's (`make demo` runs from its root); the defaults are
paths relative to the current folder, and a missing model says where to get it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

#: The repository's folders, relative to its root (where `make demo` runs).
SAMPLES = Path("samples") / "instance"
MICRO_MODEL = Path("models") / "microworld-sdxl"
#: The demo's concept: a test concept of the micro-benchmark's recombination set
#: (microworld.RECOMBINATION_CONCEPTS) that the untrained model does not already draw (purple is its
#: default colour, so not "flat-purple-square") and that LoRA learned in the benchmark.
CONCEPT = "flat-yellow-circle"
#: Learning rates chosen on the recombination set's validation concept
#: (benchmarks/micro/recombination/RESULTS.md).
COEFF_LR, LORA_LR = "1e-3", "1e-3"
#: The micro model was pretrained with offset noise 0.1 (benchmarks/micro/pretrain.py); fine-tuning
#: keeps it, as SDXL fine-tunes often keep SDXL's 0.0357.
NOISE_OFFSET = "0.1"


def make_sample_images(folder: Path) -> list[Path]:
    """The demo's instance images: the concept's 5 training scenes (the committed files in
    samples/instance come from here)."""
    from .testing import microworld as mw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(mw.concept(CONCEPT).instance_scenes()):
        path = folder / f"{CONCEPT}_{i:02d}.png"
        Image.fromarray(mw.render(scene)).save(path)
        paths.append(path)
    return paths


def _reset_accelerate() -> None:
    # Two trainings in one process: accelerate keeps a process-wide state object.
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def run_demo(output_dir: Path, steps: int = 500, model: Path = MICRO_MODEL, samples: Path = SAMPLES) -> Path:
    """Train alpha and LoRA on the demo's concept and write the comparison grid; returns its path."""
    from .testing import microworld as mw
    from .sample import main as sample_main
    from .train import main as train_main

    started = time.time()
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"demo: no model at {model}; it ships with the repository (run from the repository's "
                         "root, pass --model DIR, or re-create it with `make pretrain-micro`)")
    output_dir.mkdir(parents=True, exist_ok=True)
    instance_dir = samples if any(samples.glob("*.png")) else None
    if instance_dir is None:
        instance_dir = output_dir / "instance"
        make_sample_images(instance_dir)
    concept = mw.concept(CONCEPT)
    common = [
        "--pretrained_model_name_or_path", str(model), "--instance_dir", str(instance_dir),
        "--instance_prompt", concept.instance_prompt, "--resolution", str(mw.RES),
        "--max_train_steps", str(steps), "--report_to", "none",
        "--checkpointing_steps", "0", "--overwrite_output_dir", "--seed", "0",
        "--noise_offset", NOISE_OFFSET,
    ]
    runs = {
        "alpha": ["--tuning", "coeff", "--coeff_lr", COEFF_LR],
        "lora": ["--tuning", "lora", "--rank", "4", "--learning_rate", LORA_LR],
    }
    for name, extra in runs.items():
        print(f"[demo] training {name} ({steps} steps) -> {output_dir / 'runs' / name}", flush=True)
        code = train_main(common + extra + ["--output_dir", str(output_dir / "runs" / name)])
        _reset_accelerate()
        if code:
            raise SystemExit(code)

    grid_dir = output_dir / "grid"
    print(f"[demo] sampling base / alpha / lora side by side -> {grid_dir}", flush=True)
    prompts = [r["prompt"].replace(concept.token, "{token} {class}") for r in concept.eval_prompts()]
    code = sample_main([
        "--pretrained_model_name_or_path", str(model), "--include_base",
        "--run", f"alpha={output_dir / 'runs' / 'alpha'}", "--run", f"lora={output_dir / 'runs' / 'lora'}",
        *[a for p in ["a {token} {class}", *prompts] for a in ("--prompt", p)],
        "--token", concept.identifier, "--class_name", concept.shape,
        "--seeds", "0", "1", "--num_inference_steps", "20", "--guidance_scale", "4",
        "--height", str(mw.RES), "--width", str(mw.RES), "--output", str(grid_dir), "--overwrite",
    ])
    if code:
        raise SystemExit(code)
    grids = sorted(grid_dir.glob("grid_*.png"))
    print(f"[demo] done in {time.time() - started:.0f} s. Comparison grid(s):", flush=True)
    for g in grids:
        print(f"  {g}")
    print(f"  overview: {grid_dir / 'index.html'}")
    return grids[0] if grids else grid_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m dreamcoeff.demo` (what `make demo` runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument("--steps", type=int, default=500, help="training steps of each run (the micro-benchmark's protocol)")
    parser.add_argument("--model", default=str(MICRO_MODEL), help="base pipeline folder (default: the shipped micro-world model)")
    parser.add_argument("--instance_dir", default=str(SAMPLES),
                        help="the demo concept's instance images (drawn into the output folder when empty or missing)")
    parser.add_argument("--make_samples", action="store_true", help="(re)draw --instance_dir's images and exit")
    args = parser.parse_args(argv)
    if args.make_samples:
        for p in make_sample_images(Path(args.instance_dir)):
            print(p)
        return 0
    run_demo(Path(args.output_dir), args.steps, Path(args.model), Path(args.instance_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
