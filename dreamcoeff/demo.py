"""`make demo`: the main job end to end on the embedded default, on a CPU, in a few minutes.

1. takes the micro-world model shipped in the repository (`models/microworld-sdxl-v2`: an
   SDXL-architecture pipeline with SDXL's 10 / 20 attention heads, pretrained on a procedural world of
   coloured shapes, see benchmarks/micro) as `--pretrained_model_name_or_path`: the same loading code
   path as real SDXL;
2. trains Coeff-Tuning alpha, a LoRA rank-4 baseline and both together on the instance images in
   `samples/instance` ("mtz circle": an orange circle on a blue background, the micro-benchmark's
   *validation* concept, on which every method's learning rate was chosen; no test concept was looked
   at to pick it) through the real trainer (`dreamcoeff.train.main`, what `train_dreambooth_coeff.py`
   runs), each at the rate the benchmark chose;
3. renders base / alpha / LoRA / alpha+LoRA side by side on the same prompts and noise with the
   sampler (`dreamcoeff.sample.main`), writes a labelled comparison grid, and prints what it shows.

    python -m dreamcoeff.demo --output_dir demo_out [--steps 500] [--model DIR] [--instance_dir DIR]

The model and the images are the repository's: `make demo` runs from its root, and from any other
folder of a clone the defaults are found next to the package. The pip package does not carry the
53 MB model: installed from a wheel, the demo needs `--model` (a clone's `models/microworld-sdxl-v2`,
or any SDXL-architecture diffusers folder) and says so; it draws its instance images itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

from .io import atomic_write

#: The repository's folders, relative to its root (where `make demo` runs).
SAMPLES = Path("samples") / "instance"
MICRO_MODEL = Path("models") / "microworld-sdxl-v2"
#: The clone this package was imported from, when it was (an editable install or a source checkout);
#: a wheel's copy sits in site-packages, where no models/ folder is beside it.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The demo's concept: the micro-benchmark's recombination *validation* concept (the one every learning
#: rate below was chosen on), so nothing about the demo was picked by looking at test concepts.
CONCEPT = "val-flat-orange-circle"
#: Learning rates chosen on that concept (benchmarks/micro/v2/recombination/select_*.json): alpha's
#: criterion was flat from 1e-4 to 3e-4 (it drew the subject at no rate), ties keep the smaller rate.
COEFF_LR, LORA_LR, COEFF_LORA_LR = "1e-4", "1e-3", "1e-3"
#: What the grid shows, said plainly, from the benchmark's numbers (one seed of one run is an anecdote).
CAPTION = (
    "What the benchmark measured for these runs (this concept, these rates, 500 steps, 10 new-background "
    "images each): LoRA drew the orange circle in 2 of 10, alpha+LoRA in 3, alpha alone in 0 at every rate "
    "from 1e-4 to 3e-2 (it draws what the base model draws; from 3e-3 on it breaks the backgrounds). On this "
    "micro model alpha learns the training images' colours as per-head gains, globally, not bound to the "
    "object (benchmarks/micro/puzzle/README.md). A 12 M-parameter model of coloured shapes, not SDXL: it shows "
    "how the methods behave here, not what they do on photographs."
)
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


def _flags(**settings: object) -> list[str]:
    """Command-line flags from keyword arguments: True gives a bare switch, a list several values."""
    out: list[str] = []
    for name, value in settings.items():
        out.append(f"--{name}")
        if isinstance(value, (list, tuple)):
            out += [str(v) for v in value]
        elif value is not True:
            out.append(str(value))
    return out


def _train_runs(model: Path, instance_dir: Path, output_dir: Path, steps: int) -> dict[str, Path]:
    """Train alpha, the LoRA baseline and both together through the real trainer; each run's folder."""
    from .testing import microworld as mw
    from .train import main as train_main

    concept = mw.concept(CONCEPT)
    common = _flags(
        pretrained_model_name_or_path=model, instance_dir=instance_dir, instance_prompt=concept.instance_prompt,
        resolution=mw.RES, max_train_steps=steps, report_to="none", checkpointing_steps=0,
        overwrite_output_dir=True, seed=0, noise_offset=NOISE_OFFSET,
    )  # fmt: skip
    runs = {
        "alpha": _flags(tuning="coeff", coeff_lr=COEFF_LR),
        "lora": _flags(tuning="lora", rank=4, learning_rate=LORA_LR),
        "alpha_lora": _flags(tuning="coeff+lora", rank=4, coeff_lr=COEFF_LORA_LR, learning_rate=COEFF_LORA_LR),
    }
    folders = {}
    for name, extra in runs.items():
        folders[name] = output_dir / "runs" / name
        print(f"[demo] training {name} ({steps} steps) -> {folders[name]}", flush=True)
        code = train_main(common + extra + _flags(output_dir=folders[name]))
        _reset_accelerate()
        if code:
            raise SystemExit(code)
    return folders


def _render_grid(model: Path, runs: dict[str, Path], grid_dir: Path) -> None:
    """Base and every run on the concept's evaluation prompts, same seeds and noise, one grid per seed."""
    from .sample import main as sample_main
    from .testing import microworld as mw

    concept = mw.concept(CONCEPT)
    print(f"[demo] sampling base / {' / '.join(runs)} side by side -> {grid_dir}", flush=True)
    prompts = ["a {token} {class}"] + [r["prompt"].replace(concept.token, "{token} {class}")
                                       for r in concept.eval_prompts()]  # fmt: skip
    argv = _flags(pretrained_model_name_or_path=model, include_base=True)
    for name, folder in runs.items():
        argv += _flags(run=f"{name}={folder}")
    for prompt in prompts:
        argv += _flags(prompt=prompt)
    argv += _flags(
        token=concept.identifier, class_name=concept.shape, seeds=[0, 1], num_inference_steps=20, guidance_scale=4,
        height=mw.RES, width=mw.RES, output=grid_dir, overwrite=True,
    )  # fmt: skip
    code = sample_main(argv)
    if code:
        raise SystemExit(code)


def find_default(relative: Path) -> Path:
    """A repository path (`models/...`, `samples/...`): under the current folder, else in the clone the
    package was imported from; the current folder's path when neither has it (the caller says what is
    missing)."""
    for root in (Path.cwd(), REPO_ROOT):
        if (root / relative).exists():
            return root / relative
    return relative


def missing_model_message(model: Path) -> str:
    """What to do when the demo's base model is not there: where the default lives and the flag to use."""
    return (
        f"demo: no diffusers pipeline at {model} (no model_index.json). The demo's model "
        f"({MICRO_MODEL}, 53 MB) ships with the repository, not with the pip package: run `make demo` in a "
        "clone, or pass --model <clone>/models/microworld-sdxl-v2 (any SDXL-architecture diffusers folder "
        "works; `make pretrain-micro-v2` re-creates the default in build/microworld-sdxl-v2)"
    )


def run_demo(output_dir: Path, steps: int = 500, model: Path = MICRO_MODEL, samples: Path = SAMPLES) -> Path:
    """Train the demo's runs on its concept and write the comparison grid; returns its path."""
    started = time.time()
    if not (model / "model_index.json").is_file():
        raise SystemExit(missing_model_message(model))
    output_dir.mkdir(parents=True, exist_ok=True)
    instance_dir = samples if any(samples.glob("*.png")) else None
    if instance_dir is None:
        instance_dir = output_dir / "instance"
        make_sample_images(instance_dir)
    runs = _train_runs(model, instance_dir, output_dir, steps)
    grid_dir = output_dir / "grid"
    _render_grid(model, runs, grid_dir)
    grids = sorted(grid_dir.glob("grid_*.png"))
    print(f"[demo] done in {time.time() - started:.0f} s. Comparison grid(s):", flush=True)
    for g in grids:
        print(f"  {g}")
    print(f"  overview: {grid_dir / 'index.html'}")
    print(f"[demo] {CAPTION}")
    atomic_write(grid_dir / "CAPTION.txt", lambda tmp: Path(tmp).write_text(CAPTION + "\n", encoding="utf-8"))
    return grids[0] if grids else grid_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m dreamcoeff.demo` (what `make demo` runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument(
        "--steps", type=int, default=500, help="training steps of each run (the micro-benchmark's protocol)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"base pipeline folder (default: the repository's {MICRO_MODEL}, found under the current folder "
        "or beside the package in a clone)",
    )
    parser.add_argument(
        "--instance_dir",
        default=None,
        help=f"the demo concept's instance images (default: the repository's {SAMPLES}; drawn into the output "
        "folder when empty or missing)",
    )
    parser.add_argument("--make_samples", action="store_true", help="(re)draw --instance_dir's images and exit")
    args = parser.parse_args(argv)
    if args.make_samples:
        for p in make_sample_images(Path(args.instance_dir or SAMPLES)):
            print(p)
        return 0
    model = Path(args.model) if args.model else find_default(MICRO_MODEL)
    samples = Path(args.instance_dir) if args.instance_dir else find_default(SAMPLES)
    run_demo(Path(args.output_dir), args.steps, model, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
