"""`make demo`: the main job end to end on the embedded default, on a CPU, in a few minutes.

1. builds the tiny SDXL-architecture pipeline and saves it as a diffusers folder (the same
   `--pretrained_model_name_or_path` code path as real SDXL);
2. trains Coeff-Tuning alpha and a LoRA rank-4 baseline on the instance images in `samples/instance`
   through the real trainer (`dreamcoeff.training.main`, what `train_dreambooth_coeff.py` runs);
3. renders base / alpha / LoRA side by side on the same prompts and noise with the sampler
   (`dreamcoeff.sample.main`) and writes a labelled comparison grid.

    python -m dreamcoeff.demo --output_dir demo_out [--steps 150]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "instance"
TOKEN, CLASS_NAME = "sks", "ball"


def make_sample_images(folder: Path, count: int = 5, size: int = 96, seed: int = 7) -> list[Path]:
    """The demo's subject, drawn procedurally: an orange ball with a blue stripe on a teal floor,
    at different positions and sizes (the committed files in samples/instance come from here)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        img = Image.new("RGB", (size, size), (40, 150, 150))
        draw = ImageDraw.Draw(img)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(rng.integers(r + 2, size - r - 2)) for _ in range(2))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 140, 30))
        draw.rectangle([cx - r + r // 3, cy - r // 5, cx + r - r // 3, cy + r // 5], fill=(30, 60, 200))
        path = folder / f"ball_{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def _reset_accelerate() -> None:
    # Two trainings in one process: accelerate keeps a process-wide state object.
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def run_demo(output_dir: Path, steps: int = 150, resolution: int = 64) -> Path:
    from .sample import main as sample_main
    from .tiny import save_tiny_pipeline
    from .training import main as train_main

    started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    instance_dir = SAMPLES if any(SAMPLES.glob("*.png")) else None
    if instance_dir is None:
        instance_dir = output_dir / "instance"
        make_sample_images(instance_dir)
    base = output_dir / "base-model"
    if not (base / "model_index.json").is_file():
        print(f"[demo] building the tiny SDXL pipeline -> {base}", flush=True)
        save_tiny_pipeline(base, vocab_words=[TOKEN, CLASS_NAME, "orange", "teal", "stripe"])

    common = [
        "--pretrained_model_name_or_path", str(base), "--instance_dir", str(instance_dir),
        "--instance_prompt", f"a photo of {TOKEN} {CLASS_NAME}", "--resolution", str(resolution),
        "--max_train_steps", str(steps), "--train_batch_size", "2", "--random_flip", "--report_to", "none",
        "--checkpointing_steps", "0", "--overwrite_output_dir", "--seed", "0",
    ]
    runs = {
        "alpha": ["--tuning", "coeff", "--coeff_lr", "1e-2"],
        "lora": ["--tuning", "lora", "--rank", "4", "--learning_rate", "1e-3"],
    }
    for name, extra in runs.items():
        print(f"[demo] training {name} ({steps} steps) -> {output_dir / 'runs' / name}", flush=True)
        code = train_main(common + extra + ["--output_dir", str(output_dir / "runs" / name)])
        _reset_accelerate()
        if code:
            raise SystemExit(code)

    grid_dir = output_dir / "grid"
    print(f"[demo] sampling base / alpha / lora side by side -> {grid_dir}", flush=True)
    code = sample_main([
        "--pretrained_model_name_or_path", str(base), "--include_base",
        "--run", f"alpha={output_dir / 'runs' / 'alpha'}", "--run", f"lora={output_dir / 'runs' / 'lora'}",
        "--prompt", "a photo of {token} {class}", "--prompt", "a {token} {class} on the beach",
        "--prompt", "a photo of a {class}", "--token", TOKEN, "--class_name", CLASS_NAME,
        "--seeds", "0", "1", "--num_inference_steps", "20", "--height", str(resolution), "--width", str(resolution),
        "--output", str(grid_dir), "--overwrite",
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each run")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--make_samples", action="store_true", help="(re)draw samples/instance and exit")
    args = parser.parse_args(argv)
    if args.make_samples:
        for p in make_sample_images(SAMPLES):
            print(p)
        return 0
    run_demo(Path(args.output_dir), args.steps, args.resolution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
