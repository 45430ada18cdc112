"""The sampling loop: every row renders every prompt for every seed from the same initial latents.

One base pipeline, its adapters switched per row by an :class:`~.adapters.AdapterSwitcher`; the
initial noise of a seed is drawn on a CPU generator exactly as diffusers draws it, so a row without
adapters reproduces ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` and the
differences between rows come from the weights alone. The rows of a run with learned tokens render
that run's own prompt texts (``{token}`` filled with its tokens); the other rows share one set.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..io import atomic_write
from .adapters import AdapterSwitcher
from .errors import SamplingError
from .prompts import prompt_tag
from .quiet import quiet_diffusers_noise
from .runs import Row, RunSpec, check_target_scales_for, plan_rows

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from tqdm import tqdm

__all__ = ["ImageRecord", "SampleResult", "initial_latents", "sample_runs"]


@dataclass
class ImageRecord:
    """One generated image: which row, prompt and seed, and where it was written."""

    row: str
    run: str | None
    coeff_scale: float | None
    lora: bool
    prompt_index: int
    prompt: str
    seed: int
    file: str | None = None  # relative to the output directory
    image: Image.Image | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The record without its image, as written to the manifest and into the PNG's text chunk."""
        return {
            k: getattr(self, k) for k in ("row", "run", "coeff_scale", "lora", "prompt_index", "prompt", "seed", "file")
        }


@dataclass
class SampleResult:
    """What :func:`sample_runs` made: rows x prompts x seeds images and how they were made."""

    rows: list[Row]
    prompts: list[str]
    seeds: list[int]
    records: list[ImageRecord]
    settings: dict[str, Any]
    weights: dict[str, dict[str, Any]]
    timing: dict[str, Any]
    output_dir: Path | None = None

    def image(self, record: ImageRecord) -> Image.Image:
        """The record's image, from memory or from its file."""
        if record.image is not None:
            return record.image
        if record.file is None or self.output_dir is None:
            raise ValueError(f"image of {record.row} p{record.prompt_index} seed {record.seed} was not kept")
        with Image.open(self.output_dir / record.file) as img:
            return img.convert("RGB")

    def find(self, row: str, prompt_index: int, seed: int) -> ImageRecord:
        """The record of one row, prompt and seed (KeyError if there is none)."""
        for r in self.records:
            if (r.row, r.prompt_index, r.seed) == (row, prompt_index, seed):
                return r
        raise KeyError((row, prompt_index, seed))

    def grid_rows(self, seed: int) -> list[list[ImageRecord]]:
        """Records of one seed as rows (in row order) x prompts."""
        index = {(r.row, r.prompt_index): r for r in self.records if r.seed == seed}
        return [[index[(row.name, p)] for p in range(len(self.prompts))] for row in self.rows]


def initial_latents(
    pipe: StableDiffusionXLPipeline, seed: int, height: int, width: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise for ``seed`` and the CPU generator that drew it (for later step noise).

    Drawn exactly as diffusers draws it from ``generator=torch.Generator().manual_seed(seed)``, so a
    row without adapters reproduces ``pipe(prompt, generator=...)`` and does not depend on the device,
    the batch size or which other prompts, seeds or rows are rendered.
    """
    dtype = dtype or pipe.unet.dtype
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=dtype), generator


def _sync(pipe: StableDiffusionXLPipeline) -> None:
    device = getattr(pipe, "_execution_device", None)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, enabled: bool) -> contextlib.AbstractContextManager[tqdm | None]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="img", desc="sampling", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


@dataclass(frozen=True)
class _Job:
    """What every row renders the same way: prompts, (prompt, seed) batches, call settings, output.

    ``run_prompts`` holds the prompt texts of the runs whose rows render their own (learned tokens);
    ``target_scales`` doses every alpha row by target (None: not dosed); ``clip_skip`` is the
    pipeline's (None: SDXL's penultimate layer).
    """

    prompts: list[str]
    run_prompts: dict[str, list[str]]
    batches: list[list[tuple[int, int]]]
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    dtype: torch.dtype
    output_dir: Path | None
    keep_images: bool
    target_scales: dict[str, float] | None = None
    clip_skip: int | None = None

    @property
    def images_per_row(self) -> int:
        return sum(len(b) for b in self.batches)

    def prompts_of(self, row: Row) -> list[str]:
        """The prompt texts ``row`` renders."""
        return self.run_prompts.get(row.run.name, self.prompts) if row.run is not None else self.prompts


def _checked_run_prompts(
    runs: Sequence[RunSpec], prompts: Sequence[str], run_prompts: Mapping[str, Sequence[str]] | None
) -> dict[str, list[str]]:
    """``run_prompts`` as lists: only names of `runs`, as many prompts as `prompts` each."""
    names = {r.name for r in runs}
    checked = {}
    for name, texts in (run_prompts or {}).items():
        if name not in names:
            raise SamplingError(f"run_prompts names {name!r}, which is not one of the runs")
        if len(texts) != len(prompts):
            raise SamplingError(f"run {name!r} has {len(texts)} prompts, the others {len(prompts)}")
        checked[name] = [str(t) for t in texts]
    return checked


def _checked_inputs(
    pipe: StableDiffusionXLPipeline,
    runs: Sequence[RunSpec],
    prompts: Sequence[str],
    seeds: Sequence[int],
    include_base: bool,
    coeff_scales: Sequence[float] | None,
    batch_size: int,
    num_inference_steps: int,
    height: int | None,
    width: int | None,
) -> tuple[list[str], list[int], int, int, list[Row]]:
    """(prompts, seeds, height, width, rows), checked; :class:`SamplingError` for bad input."""
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise SamplingError("no prompts to render")
    if not seeds:
        raise SamplingError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise SamplingError(f"seeds repeat: {seeds}")
    if batch_size < 1 or num_inference_steps < 1:
        raise SamplingError("batch_size and num_inference_steps must be at least 1")
    factor = pipe.vae_scale_factor
    default_size = pipe.default_sample_size * factor
    height, width = int(height or default_size), int(width or default_size)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise SamplingError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    return prompts, seeds, height, width, plan_rows(runs, include_base, coeff_scales)


def _save_record(row: Row, prompt_index: int, seed: int, image: Image.Image, job: _Job) -> ImageRecord:
    """The image's record; the image written to ``images/`` (with the record as PNG text) and/or kept."""
    record = ImageRecord(
        row=row.name,
        run=row.run.name if row.run else None,
        coeff_scale=row.coeff_scale,
        lora=row.has_lora,
        prompt_index=prompt_index,
        prompt=job.prompts_of(row)[prompt_index],
        seed=seed,
    )
    if job.output_dir is not None:
        record.file = f"images/{row.slug}_{prompt_tag(prompt_index, len(job.prompts))}_s{seed}.png"
        info = PngInfo()
        info.add_text("dreamcoeff", json.dumps(record.to_json()))
        # temporary name, then renamed: a full disk never leaves half an image under its name
        atomic_write(job.output_dir / record.file, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    if job.keep_images:
        record.image = image
    return record


def _render_batch(
    pipe: StableDiffusionXLPipeline, row: Row, batch: list[tuple[int, int]], job: _Job
) -> list[ImageRecord]:
    """One pipeline call for a batch of (prompt index, seed), each from its seed's initial latents."""
    drawn = [initial_latents(pipe, seed, job.height, job.width, job.dtype) for _, seed in batch]
    prompts = job.prompts_of(row)
    out = pipe(
        prompt=[prompts[p] for p, _ in batch],
        negative_prompt=[job.negative_prompt] * len(batch) if job.negative_prompt else None,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        height=job.height,
        width=job.width,
        latents=torch.cat([lat for lat, _ in drawn]),
        generator=[g for _, g in drawn],
        output_type="pil",
        clip_skip=job.clip_skip,
    )
    return [_save_record(row, p, seed, image, job) for (p, seed), image in zip(batch, out.images, strict=True)]


def _render_row(
    pipe: StableDiffusionXLPipeline, switcher: AdapterSwitcher, row: Row, job: _Job, lora_scale: float, bar: tqdm | None
) -> tuple[list[ImageRecord], dict[str, float]]:
    """Every image of one row (its adapters switched in first) and the row's timing."""
    t0 = time.perf_counter()
    switcher.activate(row, lora_scale, job.target_scales)
    t1 = time.perf_counter()
    if bar is not None:
        bar.set_postfix_str(row.name)
    records: list[ImageRecord] = []
    for batch in job.batches:
        records.extend(_render_batch(pipe, row, batch, job))
        if bar is not None:
            bar.update(len(batch))
    _sync(pipe)
    t2 = time.perf_counter()
    timing = {
        "switch_seconds": round(t1 - t0, 4),
        "sampling_seconds": round(t2 - t1, 4),
        "seconds_per_image": round((t2 - t1) / job.images_per_row, 4),
    }
    return records, timing


def _render_rows(
    pipe: StableDiffusionXLPipeline,
    switcher: AdapterSwitcher,
    rows: Sequence[Row],
    job: _Job,
    lora_scale: float,
    progress: bool,
) -> tuple[list[ImageRecord], dict[str, dict[str, float]]]:
    """Every row in turn, with a progress bar; the switcher is closed at the end, also on errors."""
    records: list[ImageRecord] = []
    row_timing: dict[str, dict[str, float]] = {}
    pipe.set_progress_bar_config(disable=True)
    try:
        with _progress(len(rows) * job.images_per_row, progress) as bar, quiet_diffusers_noise():
            for row in rows:
                row_records, row_timing[row.name] = _render_row(pipe, switcher, row, job, lora_scale, bar)
                records.extend(row_records)
    finally:
        switcher.close()
    return records, row_timing


def _settings(
    pipe: StableDiffusionXLPipeline,
    job: _Job,
    seeds: list[int],
    include_base: bool,
    coeff_scales: Sequence[float] | None,
    lora_scale: float,
    batch_size: int,
) -> dict[str, Any]:
    """How the images were made, for the manifest (``run_prompts`` only where a run has its own)."""
    settings = {
        "prompts": job.prompts,
        "seeds": seeds,
        "include_base": include_base,
        "coeff_scales": None if coeff_scales is None else [float(s) for s in coeff_scales],
        "coeff_target_scales": job.target_scales,
        "lora_scale": float(lora_scale),
        "negative_prompt": job.negative_prompt,
        "num_inference_steps": int(job.num_inference_steps),
        "guidance_scale": float(job.guidance_scale),
        "clip_skip": job.clip_skip,
        "height": job.height,
        "width": job.width,
        "batch_size": int(batch_size),
        "dtype": str(job.dtype).replace("torch.", ""),
        "device": str(getattr(pipe, "_execution_device", pipe.device)),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "latents": "torch.randn on a CPU torch.Generator seeded with the seed, shared by every row",
    }
    if job.run_prompts:
        settings["run_prompts"] = job.run_prompts
    return settings


def _switcher_for(
    pipe: StableDiffusionXLPipeline, runs: Sequence[RunSpec], switcher: AdapterSwitcher | None
) -> AdapterSwitcher:
    """The switcher handed in (checked to be for this pipeline and these runs), else a new one."""
    if switcher is None:
        return AdapterSwitcher(pipe, runs)
    if switcher.pipe is not pipe or set(switcher.runs) != {r.name for r in runs}:
        raise ValueError("sample_runs: the switcher was built for another pipeline or other runs")
    return switcher


def _batches(prompt_count: int, seeds: Sequence[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Every (prompt index, seed), seed by seed, in batches of ``batch_size``."""
    items = [(p, s) for s in seeds for p in range(prompt_count)]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def sample_runs(
    pipe: StableDiffusionXLPipeline,
    runs: Sequence[RunSpec],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    include_base: bool = False,
    coeff_scales: Sequence[float] | None = None,
    lora_scale: float = 1.0,
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    output_dir: str | Path | None = None,
    keep_images: bool | None = None,
    progress: bool = True,
    switcher: AdapterSwitcher | None = None,
    run_prompts: Mapping[str, Sequence[str]] | None = None,
    coeff_target_scales: Mapping[str, float] | None = None,
    clip_skip: int | None = None,
) -> SampleResult:
    """Render every prompt for every seed with every run's adapters, from shared initial noise.

    Args:
        pipe: a base ``StableDiffusionXLPipeline`` (any alpha on it is removed first; its models are
            frozen). Left as the base model afterwards, with the LoRA adapters loaded here deleted.
        runs: the runs to compare (see :func:`~.runs.parse_run`); rows come from :func:`~.runs.plan_rows`.
        prompts: final prompt texts (placeholders already filled, see :func:`~.prompts.read_prompt_file`).
        run_prompts: run name -> the prompt texts of that run's rows, in the order of ``prompts``
            (learned tokens: ``{token}`` is its tokens, see :func:`~.prompts.fill_prompts`).
        seeds: one image per prompt per seed per row; the seed fixes the initial latents and any
            step noise (ancestral schedulers), identically for every row.
        include_base / coeff_scales: a base row first / an alpha strength sweep for alpha runs.
        coeff_target_scales: dose every alpha row by target, e.g. ``{"attn1": 0.5, "up_blocks": 0}``
            (see :func:`dreamcoeff.processor.set_coeff_target_scales`; a sweep scales the global
            strength on top). Rows without alpha are unaffected.
        lora_scale: strength of the LoRA adapters.
        clip_skip: the pipeline's ``clip_skip`` (use the value the runs trained with, ``--clip_skip``).
        height / width: default to the pipeline's default size (1024 for SDXL base).
        batch_size: images per pipeline call (every row uses the same batches).
        output_dir: where to write ``images/<row>_p<prompt>_s<seed>.png`` as they are made.
        keep_images: keep PIL images in the records (default: only when nothing is written).
        switcher: an :class:`~.adapters.AdapterSwitcher` already built on ``pipe`` for ``runs`` (to
            validate the weights before other work); built here otherwise. Closed at the end either way.

    Everything (rows, weights of every run against this UNet, sizes) is validated before the first
    image; errors are :class:`SamplingError`.
    """
    try:  # a switcher handed in is closed on bad input too
        prompts, seeds, height, width, rows = _checked_inputs(
            pipe, runs, prompts, seeds, include_base, coeff_scales, batch_size, num_inference_steps, height, width
        )
        run_prompts = _checked_run_prompts(runs, prompts, run_prompts)  # after the rows: names checked there
        target_scales = check_target_scales_for(runs, coeff_target_scales)
        if clip_skip is not None and clip_skip < 0:
            raise SamplingError(f"--clip_skip must be >= 0, got {clip_skip}")
    except BaseException:
        if switcher is not None:
            switcher.close()
        raise
    output_dir = Path(output_dir) if output_dir is not None else None
    keep_images = output_dir is None if keep_images is None else keep_images
    switcher = _switcher_for(pipe, runs, switcher)
    started = time.perf_counter()
    if output_dir is not None:
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
    job = _Job(
        prompts, run_prompts, _batches(len(prompts), seeds, batch_size), negative_prompt, num_inference_steps,
        guidance_scale, height, width, pipe.unet.dtype, output_dir, keep_images, target_scales, clip_skip,
    )  # fmt: skip
    records, row_timing = _render_rows(pipe, switcher, rows, job, lora_scale, progress)
    settings = _settings(pipe, job, seeds, include_base, coeff_scales, lora_scale, batch_size)
    timing = {
        "prepare_adapters_seconds": round(switcher.prepare_seconds, 4),
        "sampling_seconds": round(time.perf_counter() - started, 4),
        "rows": row_timing,
    }
    return SampleResult(rows, prompts, seeds, records, settings, switcher.weights, timing, output_dir)
