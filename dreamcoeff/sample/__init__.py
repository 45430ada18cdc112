"""Prompt-grid sampling: what did each run learn, on the same prompts and the same noise.

One base SDXL pipeline is loaded once. Each *run* (a training output: an alpha file, a LoRA file,
both, or a fully fine-tuned UNet, each optionally with learned identifier tokens) becomes one or
more *rows*; every row renders every prompt for every seed from the same initial latents, so that
the differences between rows come from the method alone:

    base              the pre-trained model (``include_base``)
    coeff             alpha at strength 1 (or ``coeff@0.5`` ... with a ``coeff_scales`` sweep), optionally
                      dosed by target (``coeff_target_scales``, e.g. self-attention only)
    dog+hat           several alpha files combined, A = I + sum_k c_k alpha_k (``--run both=dog+hat@0.7``)
    lora              the LoRA adapter
    both              alpha and LoRA together
    ti                a run with learned tokens: loaded for its rows only, ``{token}`` is its own

Everything is validated before the first image: missing paths, files for another architecture (the
error names the run), empty prompt files, unknown placeholders, duplicated names.

One module per job:

    prompts    prompt files: finding one (a path or a packaged name), reading it, placeholders
    runs       ``--run`` specs -> :class:`RunSpec`; the rows to render (:func:`plan_rows`)
    pipeline   loading the base pipeline; scheduler and dtype names
    quiet      silencing diffusers' and PEFT's notices while loading and sampling
    adapters   :class:`AdapterSwitcher`: every run's adapters on one pipeline, one row's at a time
    render     the sampling loop (:func:`sample_runs`) and its records
    grid       labelled comparison grids (:func:`make_grid`, also used by the trainer's demo)
    report     ``manifest.json`` and ``index.html``
    metrics    the DreamBooth metrics CLIP-T, CLIP-I, DINO and their CSVs
    cli        the command line ``python -m dreamcoeff.sample`` / ``dreamcoeff-sample``

The names below are re-exported here, so ``from dreamcoeff import sample as S; S.sample_runs(...)``
works without knowing the module layout.
"""

from .adapters import AdapterSwitcher, lora_problems
from .cli import build_parser, main, run
from .errors import SamplingError
from .grid import label_font, make_grid, save_grids, wrap_text
from .metrics import METRIC_NAMES
from .pipeline import SCHEDULERS, load_base_pipeline, resolve_dtype, resolve_scheduler, set_scheduler
from .prompts import (
    PLACEHOLDERS,
    PromptTemplate,
    fill_prompts,
    find_prompt_file,
    format_prompt,
    packaged_prompt_files,
    read_prompt_file,
    read_prompt_templates,
)
from .render import ImageRecord, SampleResult, initial_latents, sample_runs
from .report import write_index_html, write_manifest
from .runs import Row, RunSpec, parse_run, parse_target_scales, plan_rows

__all__ = [
    "SamplingError",
    "METRIC_NAMES",
    "PLACEHOLDERS",
    "format_prompt",
    "read_prompt_file",
    "find_prompt_file",
    "packaged_prompt_files",
    "PromptTemplate",
    "read_prompt_templates",
    "fill_prompts",
    "RunSpec",
    "parse_run",
    "parse_target_scales",
    "Row",
    "plan_rows",
    "AdapterSwitcher",
    "ImageRecord",
    "SampleResult",
    "load_base_pipeline",
    "SCHEDULERS",
    "set_scheduler",
    "resolve_scheduler",
    "resolve_dtype",
    "lora_problems",
    "initial_latents",
    "sample_runs",
    "wrap_text",
    "label_font",
    "make_grid",
    "save_grids",
    "write_manifest",
    "write_index_html",
    "build_parser",
    "run",
    "main",
]
