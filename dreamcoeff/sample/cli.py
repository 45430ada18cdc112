"""Command line: compare training runs on the same prompts and the same noise.

    python -m dreamcoeff.sample --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --run coeff=runs/dog-coeff --run lora=runs/dog-lora --include_base \\
        --prompts dreambooth_live --token sks --class_name dog --seeds 0 1 2 --output grids/dog

(also installed as ``dreamcoeff-sample``). Writes ``images/``, one ``grid_s<seed>.png`` per seed,
``index.html`` and ``manifest.json`` into ``--output``; with ``--metrics``, also ``metrics.csv`` and
``metrics_summary.csv``. A run with learned tokens (``<name>_emb.safetensors``) reads ``{token}`` as
its own tokens (``<s0><s1>``), the other rows as ``--token``. The work is done by the other modules
of :mod:`dreamcoeff.sample`; this one parses arguments, checks them before anything heavy is loaded,
and reports bad input as one clear error (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..locking import LOCK_NAME, FolderBusyError, FolderLock
from . import metrics as M
from .adapters import AdapterSwitcher
from .errors import SamplingError
from .grid import save_grids
from .pipeline import load_base_pipeline, resolve_dtype, resolve_scheduler
from .prompts import PromptTemplate, fill_prompts, find_prompt_file, packaged_prompt_files, read_prompt_templates
from .render import SampleResult, sample_runs
from .report import write_index_html, write_manifest
from .runs import RunSpec, check_target_scales_for, parse_run, parse_target_scales, plan_rows

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["PROG", "build_parser", "run", "main"]

PROG = "dreamcoeff-sample"
_OUTPUT_FILES = ("index.html", "manifest.json", "metrics.csv", "metrics_summary.csv")


def build_parser() -> argparse.ArgumentParser:
    """The ``dreamcoeff-sample`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render the same prompts from the same noise with several training runs "
        "(Coeff-Tuning alpha, LoRA, both) and the base model, side by side, optionally with DreamBooth metrics.",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL base model: hub id, local diffusers folder, or one original-layout .safetensors checkpoint",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="a different VAE (e.g. madebyollin/sdxl-vae-fp16-fix): folder, hub id or one .safetensors file",
    )
    g.add_argument(
        "--base_config_dir",
        default=None,
        help="with a single-file base: a local SDXL diffusers folder whose configs and tokenizers describe it "
        "(no weights needed; never downloaded)",
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    g = p.add_argument_group("runs")
    g.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=PATH[,PATH2]",
        help="a training output folder, or an alpha, LoRA and/or learned-token embeddings file; "
        "repeatable (one row each). Combined concepts: NAME=A+B[,LORA] joins alpha files (or run folders, "
        "whose alpha alone is used) with '+', each with an optional strength FILE@C (default 1.0), e.g. "
        "both=dog.safetensors@1.0+hat.safetensors@0.7: one row with A = I + sum_k C_k alpha_k (a --coeff_scales "
        "sweep scales the sum). The '+' group is the run's only alpha; a LoRA or embeddings file may follow "
        "after a comma as usual",
    )
    g.add_argument("--include_base", action="store_true", help="add a row for the base model without adapters")
    g.add_argument(
        "--coeff_scales",
        type=float,
        nargs="+",
        default=None,
        metavar="C",
        help="alpha strength sweep for runs with alpha: one row per value (0 = base model)",
    )
    g.add_argument(
        "--coeff_target_scales",
        default=None,
        metavar="TARGET=VALUE[,...]",
        help="dose alpha by target in every row with alpha, e.g. attn1=0.5,attn2=1 (targets: attn1, attn2, "
        "down_blocks, mid_block, up_blocks; a layer gets the product of the targets naming it, times the "
        "row's strength; 0 = that target's base attention)",
    )
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA adapters")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); may use {token} and {class}")
    g.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="prompt file: one per line, {token}/{class} placeholders, # comments; or the name of a "
        f"prompt file shipped with dreamcoeff ({', '.join(packaged_prompt_files())})",
    )
    g.add_argument(
        "--token",
        default=None,
        help="the rare identifier that fills {token}, e.g. sks (a run with learned tokens fills it with its own)",
    )
    g.add_argument("--class_name", default=None, help="the subject class that fills {class}, e.g. dog")
    g.add_argument("--negative_prompt", default=None)
    _add_sampling_and_output_args(p)
    return p


def _add_sampling_and_output_args(p: argparse.ArgumentParser) -> None:
    """The sampling, output and metrics groups of :func:`build_parser`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt per seed per row")
    g.add_argument("--num_inference_steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=5.0)
    g.add_argument(
        "--clip_skip",
        type=int,
        default=None,
        help="the pipeline's clip_skip: read the text encoders this many layers before the penultimate one "
        "(default: the --clip_skip the runs trained with, from their args.json; runs that differ are refused)",
    )
    g.add_argument("--height", type=int, default=None, help="default: the model's (1024 for SDXL)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument(
        "--scheduler",
        default=None,
        help="euler, euler_a, heun, ddim, ddpm, pndm, lms, unipc, dpm++, "
        "dpm++_karras or a diffusers class name (default: the model's own)",
    )
    g.add_argument("--batch_size", type=int, default=1, help="images per pipeline call")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 on CPU"
    )
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument(
        "--cpu_offload", action="store_true", help="keep each model on the CPU until it runs (less GPU memory)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output", "--output_dir", dest="output", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output")
    g.add_argument(
        "--grid_tile_size", type=int, default=256, help="largest tile side in the grids (images are kept full size)"
    )
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("metrics (DreamBooth: CLIP-T, CLIP-I, DINO)")
    g.add_argument("--metrics", action="store_true", help="score every image (implied by --clip_model / --dino_model)")
    g.add_argument(
        "--clip_model", default=None, help="CLIP model folder (e.g. openai/clip-vit-large-patch14): CLIP-T, CLIP-I"
    )
    g.add_argument("--dino_model", default=None, help="DINO ViT folder (e.g. facebook/dino-vits16): DINO")
    g.add_argument(
        "--instance_data_dir",
        "--instance_dir",
        dest="instance_dir",
        default=None,
        help="the real subject images, for CLIP-I and DINO",
    )


# ----------------------------------------------------------------------------------------------
# Checks before anything heavy is loaded, in the order a user meets them


def _read_templates(args: argparse.Namespace) -> list[PromptTemplate]:
    """The prompt file's prompts, then every ``--prompt``; placeholders checked, not yet filled."""
    templates: list[PromptTemplate] = []
    if args.prompts:
        templates += read_prompt_templates(find_prompt_file(args.prompts))
    templates += [PromptTemplate(p, f"--prompt {i + 1}").check() for i, p in enumerate(args.prompt)]
    if not templates:
        raise SamplingError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return templates


def _fill_prompts(
    args: argparse.Namespace, templates: Sequence[PromptTemplate], runs: Sequence[RunSpec]
) -> tuple[list[str], dict[str, list[str]]]:
    """The prompts of the base row and of runs without learned tokens (``{token}`` = ``--token``),
    and each run with learned tokens' own (``{token}`` = its tokens)."""
    learned = {r.name: r.learned_token() for r in runs if r.emb_path is not None}
    token_needed = args.include_base or any(r.emb_path is None for r in runs)
    return fill_prompts(templates, args.token, args.class_name, learned, token_needed=token_needed)


def _parse_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Every ``--run``, with its row names and sweep checked before loading anything."""
    runs = [parse_run(spec) for spec in args.run]
    plan_rows(runs, args.include_base, args.coeff_scales)
    given = args.coeff_target_scales
    args.target_scales = check_target_scales_for(runs, None if given is None else parse_target_scales(given))
    return runs


def _resolve_clip_skip(args: argparse.Namespace, runs: Sequence[RunSpec]) -> None:
    """``--clip_skip`` from the runs: the pipeline reads every row's prompts from one layer, so without
    the flag it is the layer the runs trained with (their ``args.json``), and runs trained with
    different layers are refused; a flag that differs from a run's training is kept, with a warning."""
    from ..loading import trained_clip_skip

    saved = {r.name: r.training_args() for r in runs}  # a run without args.json says nothing
    trained = {name: trained_clip_skip(a) for name, a in saved.items() if a is not None}
    listed = ", ".join(f"{name}: {value or 'default'}" for name, value in trained.items())
    if args.clip_skip is None:
        values = set(trained.values())
        if len(values) > 1:
            raise SamplingError(
                f"the runs trained with different --clip_skip ({listed}) and one pipeline setting serves "
                "every row: pass --clip_skip N to choose one, or sample them apart"
            )
        args.clip_skip = values.pop() if values else None
        if args.clip_skip is not None:
            print(f"{PROG}: --clip_skip {args.clip_skip}, as the runs trained ({listed})", file=sys.stderr)
        return
    differ = [name for name, value in trained.items() if value != (args.clip_skip or None)]
    if differ:
        print(
            f"{PROG}: warning: --clip_skip {args.clip_skip}, but {', '.join(differ)} trained otherwise "
            f"({listed}): their rows read the prompts from another layer than in training",
            file=sys.stderr,
        )


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Distinct seeds, counts of at least 1, sizes that are positive multiples of 8."""
    if len(set(args.seeds)) != len(args.seeds):
        raise SamplingError(f"--seeds repeat: {args.seeds}")
    for flag in ("num_inference_steps", "batch_size", "grid_tile_size"):
        if getattr(args, flag) < 1:
            raise SamplingError(f"--{flag} must be at least 1")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise SamplingError(f"--{flag} {value}: must be a positive multiple of 8")


def _check_metric_flags(args: argparse.Namespace) -> tuple[bool, list[Image.Image] | None]:
    """Whether to score the images, and the instance images (loaded now: a bad file fails fast)."""
    want_metrics = bool(args.metrics or args.clip_model or args.dino_model)
    if want_metrics and not (args.clip_model or args.dino_model):
        raise SamplingError("--metrics needs --clip_model (CLIP-T, CLIP-I) and/or --dino_model (DINO)")
    if args.dino_model and not args.instance_dir:
        raise SamplingError("--dino_model compares with the real images: give --instance_data_dir")
    if args.instance_dir and not want_metrics:
        raise SamplingError("--instance_data_dir is only used by the metrics: add --clip_model and/or --dino_model")
    instance_images = M.load_instance_images(args.instance_dir) if args.instance_dir else None
    for flag in ("clip_model", "dino_model"):
        if getattr(args, flag):
            M.check_model_dir(getattr(args, flag), f"--{flag}")
    return want_metrics, instance_images


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise SamplingError(f"--output {output} is a file")
    if output.is_dir() and any(p.name != LOCK_NAME for p in output.iterdir()):  # our own lock is no sample
        if not overwrite:
            raise SamplingError(f"--output {output} is not empty; pass --overwrite to replace earlier samples there")
        if not (output / "manifest.json").is_file() and not (output / "images").is_dir():
            raise SamplingError(f"--output {output} holds files that are not samples; refusing to overwrite them")


def _check_device(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """The device and dtype to sample with; the scheduler name checked."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    if args.cpu_offload and not device.startswith("cuda"):
        raise SamplingError("--cpu_offload needs a CUDA device")
    if args.scheduler:
        resolve_scheduler(args.scheduler)
    return device, dtype


# ----------------------------------------------------------------------------------------------
# The work


def _clear_output(output: Path) -> None:
    """Remove what an earlier sampling wrote (only our own file names)."""
    if (output / "images").is_dir():
        shutil.rmtree(output / "images")
    for name in _OUTPUT_FILES:
        (output / name).unlink(missing_ok=True)
    for grid in output.glob("grid_s*.png"):
        grid.unlink()


def _render(
    args: argparse.Namespace,
    runs: Sequence[RunSpec],
    prompts: tuple[list[str], dict[str, list[str]]],
    device: str,
    dtype: torch.dtype,
    output: Path,
) -> tuple[SampleResult, float]:
    """Load the base model once, check every run's weights against it, then render into ``output``.

    ``prompts`` is ``(prompts, run_prompts)`` as :func:`_fill_prompts` gives them. Returns the result
    and the seconds the base model took to load. The pipeline is freed on return.
    """
    t_load = time.perf_counter()
    pipe = load_base_pipeline(
        args.pretrained_model_name_or_path,
        dtype=dtype,
        device=device,
        vae=args.pretrained_vae_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cpu_offload=args.cpu_offload,
        scheduler=args.scheduler,
        config_dir=args.base_config_dir,
    )
    load_seconds = time.perf_counter() - t_load
    switcher = AdapterSwitcher(pipe, runs)  # every run's weights checked against this UNet
    if output.exists():
        _clear_output(output)
    output.mkdir(parents=True, exist_ok=True)
    result = sample_runs(
        pipe,
        runs,
        prompts[0],
        args.seeds,
        run_prompts=prompts[1],
        include_base=args.include_base,
        coeff_scales=args.coeff_scales,
        coeff_target_scales=args.target_scales,
        lora_scale=args.lora_scale,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        clip_skip=args.clip_skip,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        output_dir=output,
        progress=not args.no_progress,
        switcher=switcher,
    )
    return result, load_seconds


def _free_memory(cuda: bool) -> None:
    """Release the pipeline before any metric model is loaded: peak memory is one or the other."""
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings for the manifest (the sampler adds its own)."""
    return {
        "argv": list(args.argv),
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "pretrained_vae_model_name_or_path": args.pretrained_vae_model_name_or_path,
        "base_config_dir": args.base_config_dir,
        "revision": args.revision,
        "variant": args.variant,
        "token": args.token,
        "class_name": args.class_name,
        "prompt_file": str(find_prompt_file(args.prompts)) if args.prompts else None,
        "cpu_offload": args.cpu_offload,
        "grid_tile_size": args.grid_tile_size,
    }


def _score(
    args: argparse.Namespace, result: SampleResult, output: Path, instance_images: list[Image.Image] | None, device: str
) -> tuple[list[dict[str, float]], list[dict[str, Any]], dict[str, Any]]:
    """The DreamBooth metrics of every image and per row (also written as CSVs), and the settings they used."""
    clip = M.ClipEmbedder(args.clip_model, device) if args.clip_model else None
    dino = M.DinoEmbedder(args.dino_model, device) if args.dino_model else None
    learned = {name: w["embeddings"]["token"] for name, w in result.weights.items() if "embeddings" in w}
    metrics = M.compute_metrics(
        [output / rec.file for rec in result.records],
        [M.metric_text(rec.prompt, learned.get(rec.run, args.token)) for rec in result.records],
        instance_images=instance_images,
        clip=clip,
        dino=dino,
    )
    summary = M.summarize_metrics(result, metrics)
    M.write_metrics_csv(result, metrics, summary, output, token=args.token, run_tokens=learned)
    settings = dict(
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        instance_data_dir=args.instance_dir,
        instance_images=len(instance_images or []),
        clip_t_text="the prompt without the --token word (a run's learned tokens in its rows)",
    )
    return metrics, summary, settings


def _print_summary(
    result: SampleResult, grids: Mapping[int, str], summary: Sequence[Mapping[str, Any]] | None, output: Path
) -> None:
    """What was written, and the metric means per row as a table."""
    print(f"{len(result.records)} images, {len(grids)} grid(s) -> {output}/index.html")
    if summary:
        names = [n for n in M.METRIC_NAMES if any(n in s for s in summary)]
        width = max(len(s["row"]) for s in summary)
        print(f"{'row':<{width}}  " + "  ".join(f"{n:>7}" for n in names))
        for s in summary:
            print(f"{s['row']:<{width}}  " + "  ".join(f"{s[n]:7.4f}" if n in s else f"{'':>7}" for n in names))


@contextlib.contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    """Hold ``--output``'s lock (:mod:`dreamcoeff.locking`) for the body: a second sampler (or a trainer)
    on the same folder stops with a :class:`SamplingError` naming the run that holds it, before anything
    there is read or cleared. A file named like the folder is left to :func:`_check_output` to refuse."""
    if output.exists() and not output.is_dir():
        yield
        return
    lock = FolderLock(output, flag="--output", warn=lambda text: print(f"{PROG}: warning: {text}", file=sys.stderr))
    try:
        lock.acquire()
    except FolderBusyError as exc:
        raise SamplingError(str(exc)) from None
    except OSError as exc:
        raise SamplingError(f"--output {output}: cannot take its lock ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def run(args: argparse.Namespace) -> int:
    """Check every flag, render, then write grids, metrics, ``manifest.json`` and ``index.html``; returns 0.
    ``--output`` is locked for the whole call (one sampler or trainer per folder)."""
    with _output_lock(Path(args.output)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The body of :func:`run`, under the output folder's lock."""
    import torch

    t_start = time.perf_counter()
    # --- everything that needs no model: fail fast -------------------------------------------
    templates = _read_templates(args)
    runs = _parse_runs(args)
    _resolve_clip_skip(args, runs)
    prompts = _fill_prompts(args, templates, runs)
    _check_sampling_flags(args)
    want_metrics, instance_images = _check_metric_flags(args)
    output = Path(args.output)
    _check_output(output, args.overwrite)
    device, dtype = _check_device(args)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # --- the base model, once; then every run's weights against it, before any image ---------
    result, load_seconds = _render(args, runs, prompts, device, dtype, output)
    peak = {"peak_cuda_memory_bytes": torch.cuda.max_memory_allocated()} if cuda else {}
    _free_memory(cuda)

    grids = save_grids(result, output, max_tile_size=args.grid_tile_size)
    settings = _settings(args)
    timing = {"load_seconds": round(load_seconds, 4), **peak}
    metrics = summary = None
    if want_metrics:
        t_metrics = time.perf_counter()
        metrics, summary, metric_settings = _score(args, result, output, instance_images, device)
        settings.update(metric_settings)
        timing["metrics_seconds"] = round(time.perf_counter() - t_metrics, 4)
    timing["total_seconds"] = round(time.perf_counter() - t_start, 4)
    write_manifest(
        result,
        output,
        grids,
        settings=settings,
        metrics=metrics,
        metrics_summary=summary,
        extra={"timing": {**result.timing, **timing}},
    )
    write_index_html(
        result,
        output,
        grids,
        title=f"dreamcoeff samples: {output.name}",
        model=args.pretrained_model_name_or_path,
        metrics_summary=summary,
    )
    _print_summary(result, grids, summary, output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dreamcoeff.sample`` and ``dreamcoeff-sample``; returns the exit code."""
    from ..images import DataError
    from ..io import WriteError
    from ..models import ModelError
    from ..tokens import TokenError
    from ..weights import CoeffWeightsError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _loader_progress_bars(not args.no_progress):
            return run(args)
    except (SamplingError, CoeffWeightsError, TokenError, ModelError, DataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:  # every output file is written under a temporary name, then renamed
        print(
            f"{PROG}: error: {exc}. The files written before it are complete, no partial file is left; "
            "free some space and run the same command again with --overwrite",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _loader_progress_bars(enabled: bool) -> Iterator[None]:
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
