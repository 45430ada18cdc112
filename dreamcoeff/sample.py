"""Command line: compare training runs on the same prompts and the same noise.

    python -m dreamcoeff.sample --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --run coeff=runs/dog-coeff --run lora=runs/dog-lora --include_base \\
        --prompts prompts/dreambooth_live.txt --token sks --class_name dog --seeds 0 1 2 --output grids/dog

(also installed as ``dreamcoeff-sample``). Writes ``images/``, one ``grid_s<seed>.png`` per seed,
``index.html`` and ``manifest.json`` into ``--output``; with ``--metrics``, also ``metrics.csv`` and
``metrics_summary.csv``. The work is done by :mod:`dreamcoeff.sampling`; this module parses
arguments, checks them before anything heavy is loaded, and reports bad input as one clear error
(exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import time
from pathlib import Path

PROG = "dreamcoeff-sample"
_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
_OUTPUT_FILES = ("index.html", "manifest.json", "metrics.csv", "metrics_summary.csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render the same prompts from the same noise with several training runs "
        "(Coeff-Tuning alpha, LoRA, both) and the base model, side by side, optionally with DreamBooth metrics.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="SDXL base model: hub id or local diffusers folder")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="a different VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    g = p.add_argument_group("runs")
    g.add_argument("--run", action="append", default=[], metavar="NAME=PATH[,PATH2]",
                   help="a training output folder, or an alpha and/or LoRA file; repeatable (one row each)")
    g.add_argument("--include_base", action="store_true", help="add a row for the base model without adapters")
    g.add_argument("--coeff_scales", type=float, nargs="+", default=None, metavar="C",
                   help="alpha strength sweep for runs with alpha: one row per value (0 = base model)")
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA adapters")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); may use {token} and {class}")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file: one per line, {token}/{class} placeholders, # comments "
                   "(a bare name such as dreambooth_live looks in the repository's prompts/)")
    g.add_argument("--token", default=None, help="the rare identifier that fills {token}, e.g. sks")
    g.add_argument("--class_name", default=None, help="the subject class that fills {class}, e.g. dog")
    g.add_argument("--negative_prompt", default=None)
    g = p.add_argument_group("sampling")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt per seed per row")
    g.add_argument("--num_inference_steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=5.0)
    g.add_argument("--height", type=int, default=None, help="default: the model's (1024 for SDXL)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--scheduler", default=None, help="euler, euler_a, heun, ddim, ddpm, pndm, lms, unipc, dpm++, "
                   "dpm++_karras or a diffusers class name (default: the model's own)")
    g.add_argument("--batch_size", type=int, default=1, help="images per pipeline call")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--cpu_offload", action="store_true", help="keep each model on the CPU until it runs (less GPU memory)")
    g = p.add_argument_group("output")
    g.add_argument("--output", "--output_dir", dest="output", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output")
    g.add_argument("--grid_tile_size", type=int, default=256, help="largest tile side in the grids (images are kept full size)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("metrics (DreamBooth: CLIP-T, CLIP-I, DINO)")
    g.add_argument("--metrics", action="store_true", help="score every image (implied by --clip_model / --dino_model)")
    g.add_argument("--clip_model", default=None, help="CLIP model folder (e.g. openai/clip-vit-large-patch14): CLIP-T, CLIP-I")
    g.add_argument("--dino_model", default=None, help="DINO ViT folder (e.g. facebook/dino-vits16): DINO")
    g.add_argument("--instance_data_dir", "--instance_dir", dest="instance_dir", default=None,
                   help="the real subject images, for CLIP-I and DINO")
    return p


def _resolve_prompt_file(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    for candidate in (_PROMPTS_DIR / name, _PROMPTS_DIR / f"{name}.txt"):
        if candidate.is_file():
            return candidate
    return path  # read_prompt_file reports it missing


def _check_output(output: Path, overwrite: bool) -> None:
    from .sampling import SamplingError

    if output.exists() and not output.is_dir():
        raise SamplingError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise SamplingError(f"--output {output} is not empty; pass --overwrite to replace earlier samples there")
        if not (output / "manifest.json").is_file() and not (output / "images").is_dir():
            raise SamplingError(f"--output {output} holds files that are not samples; refusing to overwrite them")


def _clear_output(output: Path) -> None:
    """Remove what an earlier sampling wrote (only our own file names)."""
    if (output / "images").is_dir():
        shutil.rmtree(output / "images")
    for name in _OUTPUT_FILES:
        (output / name).unlink(missing_ok=True)
    for grid in output.glob("grid_s*.png"):
        grid.unlink()


def run(args: argparse.Namespace) -> int:
    import torch

    from . import metrics as M
    from . import sampling as S

    t_start = time.perf_counter()
    # --- everything that needs no model: fail fast -------------------------------------------
    prompts: list[str] = []
    if args.prompts:
        prompts += S.read_prompt_file(_resolve_prompt_file(args.prompts), args.token, args.class_name)
    prompts += [S.format_prompt(p, args.token, args.class_name, where=f"--prompt {i + 1}") for i, p in enumerate(args.prompt)]
    if not prompts:
        raise S.SamplingError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    runs = [S.parse_run(spec) for spec in args.run]
    S.plan_rows(runs, args.include_base, args.coeff_scales)  # names, sweep: checked before loading anything
    if len(set(args.seeds)) != len(args.seeds):
        raise S.SamplingError(f"--seeds repeat: {args.seeds}")
    for flag in ("num_inference_steps", "batch_size", "grid_tile_size"):
        if getattr(args, flag) < 1:
            raise S.SamplingError(f"--{flag} must be at least 1")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise S.SamplingError(f"--{flag} {value}: must be a positive multiple of 8")
    want_metrics = args.metrics or args.clip_model or args.dino_model
    if want_metrics and not (args.clip_model or args.dino_model):
        raise S.SamplingError("--metrics needs --clip_model (CLIP-T, CLIP-I) and/or --dino_model (DINO)")
    if args.dino_model and not args.instance_dir:
        raise S.SamplingError("--dino_model compares with the real images: give --instance_data_dir")
    if args.instance_dir and not want_metrics:
        raise S.SamplingError("--instance_data_dir is only used by the metrics: add --clip_model and/or --dino_model")
    instance_images = M.load_instance_images(args.instance_dir) if args.instance_dir else None
    for flag in ("clip_model", "dino_model"):
        if getattr(args, flag):
            M.check_model_dir(getattr(args, flag), f"--{flag}")
    output = Path(args.output)
    _check_output(output, args.overwrite)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = S.resolve_dtype(args.dtype, device)
    if args.cpu_offload and not device.startswith("cuda"):
        raise S.SamplingError("--cpu_offload needs a CUDA device")
    if args.scheduler:
        S.resolve_scheduler(args.scheduler)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # --- the base model, once; then every run's weights against it, before any image ---------
    t_load = time.perf_counter()
    pipe = S.load_base_pipeline(
        args.pretrained_model_name_or_path, dtype=dtype, device=device, vae=args.pretrained_vae_model_name_or_path,
        revision=args.revision, variant=args.variant, cpu_offload=args.cpu_offload, scheduler=args.scheduler,
    )
    load_seconds = time.perf_counter() - t_load
    switcher = S.AdapterSwitcher(pipe, runs)  # every run's weights checked against this UNet
    if output.exists():
        _clear_output(output)
    output.mkdir(parents=True, exist_ok=True)
    result = S.sample_runs(
        pipe, runs, prompts, args.seeds,
        include_base=args.include_base, coeff_scales=args.coeff_scales, lora_scale=args.lora_scale,
        negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, height=args.height, width=args.width, batch_size=args.batch_size,
        output_dir=output, progress=not args.no_progress, switcher=switcher,
    )
    peak = {"peak_cuda_memory_bytes": torch.cuda.max_memory_allocated()} if cuda else {}
    del pipe, switcher  # free the pipeline before any metric model is loaded: peak memory is one or the other
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    grids = S.save_grids(result, output, max_tile_size=args.grid_tile_size)
    settings = {
        "argv": list(args.argv),
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "pretrained_vae_model_name_or_path": args.pretrained_vae_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "token": args.token,
        "class_name": args.class_name,
        "prompt_file": str(_resolve_prompt_file(args.prompts)) if args.prompts else None,
        "cpu_offload": args.cpu_offload,
        "grid_tile_size": args.grid_tile_size,
    }
    timing = {"load_seconds": round(load_seconds, 4), **peak}
    metrics = summary = None
    if want_metrics:
        t_metrics = time.perf_counter()
        clip = M.ClipEmbedder(args.clip_model, device) if args.clip_model else None
        dino = M.DinoEmbedder(args.dino_model, device) if args.dino_model else None
        metrics = M.compute_metrics(
            [output / rec.file for rec in result.records],
            [M.metric_text(rec.prompt, args.token) for rec in result.records],
            instance_images=instance_images, clip=clip, dino=dino,
        )
        summary = M.summarize_metrics(result, metrics)
        M.write_metrics_csv(result, metrics, summary, output, token=args.token)
        settings.update(clip_model=args.clip_model, dino_model=args.dino_model, instance_data_dir=args.instance_dir,
                        instance_images=len(instance_images or []),
                        clip_t_text="the prompt without the --token word")
        timing["metrics_seconds"] = round(time.perf_counter() - t_metrics, 4)
    timing["total_seconds"] = round(time.perf_counter() - t_start, 4)
    S.write_manifest(result, output, grids, settings=settings, metrics=metrics, metrics_summary=summary,
                     extra={"timing": {**result.timing, **timing}})
    S.write_index_html(result, output, grids, title=f"dreamcoeff samples: {output.name}",
                       model=args.pretrained_model_name_or_path, metrics_summary=summary)

    print(f"{len(result.records)} images, {len(grids)} grid(s) -> {output}/index.html")
    if summary:
        names = [n for n in S.METRIC_NAMES if any(n in s for s in summary)]
        width = max(len(s["row"]) for s in summary)
        print(f"{'row':<{width}}  " + "  ".join(f"{n:>7}" for n in names))
        for s in summary:
            print(f"{s['row']:<{width}}  " + "  ".join(f"{s[n]:7.4f}" if n in s else f"{'':>7}" for n in names))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dreamcoeff.sample`` and ``dreamcoeff-sample``; returns the exit code."""
    from .data import DataError
    from .models import ModelError
    from .sampling import SamplingError
    from .weights import CoeffWeightsError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _loader_progress_bars(not args.no_progress):
            return run(args)
    except (SamplingError, CoeffWeightsError, ModelError, DataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _loader_progress_bars(enabled: bool):
    """With --no_progress, also silence diffusers' and transformers' loading bars (restored after)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    if not enabled:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar() if was[0] else dlog.disable_progress_bar()
        tlog.enable_progress_bar() if was[1] else tlog.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
