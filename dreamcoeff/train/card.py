"""What a finished run tells its user: the model card (`README.md` of the output) and the summary.

`TrainResult` is what `train()` returns; the card and the summary are made from it and the config.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write
from ..methods import TuningMethod, get_method
from ..models import is_single_file
from ..tokens import TokenPlan, embeddings_file_name
from .config import FIELDS, TrainConfig, defaults, writes_ui_lora


@dataclass
class TrainResult:
    """Where a run's files went and what it cost."""

    output_dir: Path
    global_step: int
    trainable_parameters: int
    unet_parameters: int
    wall_time_s: float
    peak_memory_bytes: int
    files: list[Path] = field(default_factory=list)
    final_loss: float | None = None


def base_loader(cfg: TrainConfig) -> str:
    """The Python call that loads the run's base: a folder / hub id, or the single file with its config folder."""
    if cfg.base_config_dir and is_single_file(cfg.pretrained_model_name_or_path):
        return (
            f'StableDiffusionXLPipeline.from_single_file("{cfg.pretrained_model_name_or_path}", '
            f'config="{cfg.base_config_dir}", local_files_only=True, torch_dtype=torch.float16)'
        )
    return (
        f'StableDiffusionXLPipeline.from_pretrained("{cfg.pretrained_model_name_or_path}", torch_dtype=torch.float16)'
    )


def other_tools(cfg: TrainConfig, out: Path, method: TuningMethod) -> str:
    """The model card's section on using the run's files in ComfyUI and AUTOMATIC1111."""
    from ..kohya import kohya_file_name

    lines = ["## ComfyUI and AUTOMATIC1111", ""]
    if writes_ui_lora(cfg):
        name = kohya_file_name(out)
        lines += [
            f"`{name}` is the LoRA ready for the UIs: kohya's key layout, {cfg.save_precision} tensors, kohya's",
            "`ss_*` metadata (`ss_base_model_version` sdxl_base_v1-0, so A1111 lists it as an SDXL LoRA) and",
            "`modelspec.*` tags. ComfyUI: copy it into `models/loras/` and load it with a *LoraLoaderModelOnly*",
            "(or *Load LoRA*) node. A1111 / Forge: copy it into `models/Lora/` and write",
            f"`<lora:{Path(name).stem}:1>` in the prompt. diffusers' `pipe.load_lora_weights` reads it too.",
        ]
    elif method.lora and cfg.use_dora:
        lines += ["DoRA has no UI-ready file here (A1111 and ComfyUI read DoRA magnitudes differently); use the"]
        lines += ["diffusers-format `pytorch_lora_weights.safetensors` above."]
    elif method.lora:
        lines += ["This run skipped the UI-ready LoRA file (`--no-ui_lora`); train without it to get one."]
    if method.coeff:
        lines += [
            "",
            "alpha (`coeff_weights.safetensors`) has no such form: it mixes the heads' attention maps inside",
            "every attention, which no weight of the UNet can express, so it cannot be merged into the model or a",
            "LoRA file, and it needs dreamcoeff's processor (`load_coeff_weights` above, in diffusers). In ComfyUI",
            "and A1111 only the LoRA part of a run is used.",
        ]
    if method.tokens:
        lines += [
            "",
            "The learned tokens' file holds `clip_l` and `clip_g` embeddings (the layout of SDXL embeddings).",
        ]
    if not method.lora and not method.coeff and not method.tokens:
        lines += ["The full UNet folder loads in diffusers; convert it to a single checkpoint for other tools."]
    return "\n".join(lines) + "\n"


def schedule_text(cfg: TrainConfig) -> str:
    """The learning-rate schedule as the card's table shows it, with the arguments that shape it."""
    text = f"{cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up steps"
    if cfg.lr_scheduler == "cosine_with_restarts":
        text += f", {cfg.lr_num_cycles} cycles"
    if cfg.lr_scheduler == "polynomial":
        text += f", power {cfg.lr_power:g}"
    return text


def loss_text(cfg: TrainConfig) -> str:
    """--loss_type (with --huber_c), --snr_gamma, --debiased_estimation_loss, --noise_offset in words."""
    parts = [cfg.loss_type if cfg.loss_type == "l2" else f"{cfg.loss_type} (c = {cfg.huber_c:g})"]
    if cfg.snr_gamma is not None:
        parts.append(f"Min-SNR gamma {cfg.snr_gamma:g}")
    if cfg.debiased_estimation_loss:
        parts.append("debiased estimation")
    if cfg.noise_offset:
        parts.append(f"noise offset {cfg.noise_offset:g}")
    return ", ".join(parts)


def noise_text(cfg: TrainConfig) -> str:
    """The prediction target, the zero-terminal-SNR rescale and the timestep range in words."""
    parts = [f"prediction {cfg.prediction_type or 'as the model scheduler says'}"]
    if cfg.rescale_betas_zero_snr:
        parts.append("zero terminal SNR")
    if cfg.max_timestep is None:
        parts.append(f"timesteps from {cfg.min_timestep} to the scheduler's last")
    else:
        parts.append(f"timesteps [{cfg.min_timestep}, {cfg.max_timestep})")
    return ", ".join(parts)


def coeff_structure_text(cfg: TrainConfig) -> str:
    """Which of alpha's entries trained (--coeff_structure, --coeff_zero_row_sum) in words."""
    text = {"full": "full H x H", "diagonal": "diagonal only (per-head gains)", "off_diagonal": "off-diagonal only"}
    rows = ", rows summing to zero" if cfg.coeff_zero_row_sum else ""
    return text[cfg.coeff_structure] + rows


def settings_text(cfg: TrainConfig) -> str:
    """Every setting that differs from its default, as the flags that set it (the card's "Settings").

    Generated from the config itself, so a new flag shows up here with no change to the card; the paths
    and the output folder are the run's own (args.json beside the card holds every value, defaults too).
    """
    lines = []
    repeated = {n for n, f in FIELDS.items() if f.metadata.get("action") == "append"}  # one flag per value
    for name, default in defaults().items():
        value = getattr(cfg, name)
        if value == default:
            continue
        if value is None:  # no flag gives None back: say so rather than print a value that does not parse
            lines.append(f"# --{name} unset (default {default})")
        elif value is True:
            lines.append(f"--{name}")
        elif value is False:  # an on-by-default switch turned off
            lines.append(f"--no-{name}")
        elif isinstance(value, (list, tuple)) and name in repeated:
            lines += [f"--{name} {shlex.quote(v) if isinstance(v, str) else v}" for v in value]
        elif isinstance(value, (list, tuple)):
            lines.append(f"--{name} " + " ".join(shlex.quote(v) if isinstance(v, str) else str(v) for v in value))
        else:
            lines.append(f"--{name} {shlex.quote(value) if isinstance(value, str) else value}")
    return "\n".join(lines) or "(all defaults)"


def write_model_card(
    cfg: TrainConfig, out: Path, result: TrainResult, validation: list[Path], plan: TokenPlan | None = None
) -> Path:
    """Write the run's `README.md`: method, trainable parameters, settings, how to load, images."""
    method = get_method(cfg.tuning, tokens=cfg.train_text_encoder_ti)
    title = method.title(cfg.rank)
    share = 100.0 * result.trainable_parameters / max(1, result.unet_parameters)
    load = method.load_lines(out)
    prompt = cfg.instance_prompt or "a photo of sks dog"
    tokens_row = "no"
    if plan is not None:
        load += method.token_load_lines(out, embeddings_file_name(out), plan.all_tokens)
        prompt = plan.replace(prompt)
        groups = ", ".join(f"{name} -> {''.join(toks)}" for name, toks in plan.tokens.items())
        when = f"first {cfg.train_text_encoder_ti_frac:g} of the steps" if method.trains_unet else "every step"
        tokens_row = f"{groups} (learning rate {cfg.text_encoder_lr}, {when})"
    rates = [f"alpha {cfg.coeff_lr}"] if method.coeff else []
    rates += [f"{method.weights_label} {cfg.learning_rate}"] if method.lora or method.full else []
    rates += [f"tokens {cfg.text_encoder_lr}"] if method.tokens else []
    te_rate = cfg.text_encoder_lora_lr if cfg.text_encoder_lora_lr is not None else cfg.learning_rate
    rates += [f"text encoders' LoRA {te_rate}"] if cfg.train_text_encoder else []
    te_row = (
        f"LoRA rank {cfg.rank} on both CLIP encoders (q/k/v/out_proj), first {cfg.train_text_encoder_frac:g} of the "
        "steps; in both LoRA files (`text_encoder.` / `text_encoder_2.`, `lora_te1_` / `lora_te2_`)"
        if cfg.train_text_encoder
        else "frozen"
    )
    skip = f", clip_skip={cfg.clip_skip}" if cfg.clip_skip is not None else ""
    images = (
        "\n".join(f"![{p.name}]({p.relative_to(out).as_posix()})" for p in validation[:8])
        or "(no validation prompt given)"
    )
    text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
library_name: diffusers
tags: [{", ".join(["stable-diffusion-xl", "dreambooth", "coeff-tuning", "dreamcoeff"] + method.tags)}]
instance_prompt: {json.dumps(cfg.instance_prompt)}
---

# {title} DreamBooth of `{cfg.pretrained_model_name_or_path}`

Trained with [dreamcoeff](https://pypi.org/project/dreamcoeff/) on the images in `{cfg.instance_data_dir or cfg.dataset_name or f"the subsets of --dataset_config {cfg.dataset_config}"}`.

| | |
|---|---|
| method | {title} |
| instance prompt | `{cfg.instance_prompt}` |
| trainable parameters | {result.trainable_parameters:,} ({share:.4f}% of the UNet's {result.unet_parameters:,}) |
| steps | {result.global_step} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}) |
| learning rates | {", ".join(rates)} ({schedule_text(cfg)}) |
| loss | {loss_text(cfg)} |
| noise schedule | {noise_text(cfg)} |
| coeff targets / dropout / structure | {cfg.coeff_targets} / {cfg.coeff_dropout} / {coeff_structure_text(cfg)} |
| learned tokens | {tokens_row} |
| text encoders | {te_row} |
| clip skip | {cfg.clip_skip if cfg.clip_skip is not None else "none (the penultimate layer, SDXL's default)"} |
| resolution | {cfg.resolution} ({"square crops" if cfg.square_crop or cfg.with_prior_preservation else "aspect buckets"}) |
| prior preservation | {f"yes: {cfg.class_prompt or 'the is_reg subsets'!r}, weight {cfg.prior_loss_weight}" if cfg.with_prior_preservation else "no"} |
| mixed precision | {cfg.mixed_precision or "no"} |
| wall time | {result.wall_time_s:.0f} s |

## Use

```python
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from dreamcoeff import load_coeff_weights

pipe = {base_loader(cfg)}.to("cuda")
{chr(10).join(load)}
image = pipe({json.dumps(prompt)}, cross_attention_kwargs={{"coeff_scale": 1.0}}{skip}).images[0]
```

Or all of it in one call: `dreamcoeff.load_run(pipe, "{out}")` (and `dreamcoeff.unload_run(pipe, loaded)` to go back
to the base model).

{other_tools(cfg, out, method)}
## Settings

Every setting that differs from dreamcoeff's defaults (all values, defaults too: `args.json`):

```
{settings_text(cfg)}
```

## Validation images

{images}
"""
    return atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def print_summary(result: TrainResult, step_times: list[float]) -> None:
    """The end-of-run summary on stdout: steps, speed, parameters, time, memory, files."""
    share = 100.0 * result.trainable_parameters / max(1, result.unet_parameters)
    speed = (len(step_times) / sum(step_times)) if step_times else 0.0
    lines = [
        "",
        "dreamcoeff: training finished",
        f"  steps              {result.global_step} ({speed:.2f} steps/s)",
        f"  trainable params   {result.trainable_parameters:,} ({share:.4f}% of the UNet)",
        f"  wall time          {result.wall_time_s:.1f} s",
        f"  peak memory        {result.peak_memory_bytes / 2**30:.2f} GiB",
        f"  output             {result.output_dir}",
    ] + [f"    {p.name}" for p in result.files]
    print("\n".join(lines), flush=True)
