"""The DreamBooth training loop for SDXL: Coeff-Tuning alpha, LoRA, or both, through one code path.

`train(cfg)` runs everything: output-dir checks, model loading, adapters, prior-preservation class
images, data, accelerate, the loop (checkpoints, validation, divergence guard), final files and a
summary. Every random draw of a step (noise, timesteps, VAE sampling, dropout) is seeded from
(seed, micro-step, rank), and data order and augmentation from (seed, epoch): a resumed run sees
exactly what an uninterrupted one would, and ends with the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_lib
from .config import TrainConfig, UsageError, parse_args
from .models import (
    FULL_UNET_DIR,
    LORA_WEIGHTS_NAME,
    ModelError,
    add_lora,
    encode_prompts,
    load_components,
    load_full_unet_weights,
    load_lora_into_unet,
    save_lora,
)
from .processor import apply_coeff, coeff_parameters, set_plain_attention_backend
from .weights import COEFF_WEIGHTS_NAME, CoeffWeightsError, atomic_write, load_coeff_weights, save_coeff_weights

logger = logging.getLogger("dreamcoeff")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Leftovers of an interrupted write: a checkpoint being written or deleted, an atomic_write temp file.
_LEFTOVER_RE = re.compile(r"^(checkpoint-\d+\.(tmp|old)|\..+\.tmp(\.d)?)$")
STATE_NAME = "dreamcoeff_state.json"
COMPLETE_NAME = "dreamcoeff_complete.json"
# Test-only: seconds to sleep where a kill hurts most (between the files of a checkpoint, between the
# final weights and the model card), so the kill tests can hit those moments. Unset: no effect.
TEST_PAUSE_ENV = "DREAMCOEFF_TEST_SLOW_CHECKPOINT"
# Arguments that may change between a run and its resumption without changing what is trained.
_VOLATILE_ARGS = {"resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_dir", "dataloader_num_workers"}
# Arguments that fix the shape of the trainable weights: a checkpoint cannot be resumed with others.
# (Another base model only gets a warning: the same model may live under another path now.)
_STRUCTURAL_ARGS = ("tuning", "coeff_targets", "rank", "lora_alpha")


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, nothing to resume); the message says what to do."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    trainable_parameters: int
    unet_parameters: int
    wall_time_s: float
    peak_memory_bytes: int
    files: list[Path] = field(default_factory=list)
    final_loss: float | None = None


def _seed_of(*parts) -> int:
    # The data module's stable seed, kept within int64 for torch generators.
    return data_lib.derive_seed(*parts) & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# Output dir and checkpoints


def _test_pause() -> None:
    delay = os.environ.get(TEST_PAUSE_ENV)
    if delay:
        time.sleep(float(delay))


def _has_previous_run(out: Path) -> bool:
    markers = ("args.json", COEFF_WEIGHTS_NAME, LORA_WEIGHTS_NAME, COMPLETE_NAME)
    return out.is_dir() and (any((out / m).exists() for m in markers) or bool(list_checkpoints(out)))


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-N`, never the `.tmp` of one being written), oldest first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting a new run", out)
            return None
        return found[-1][1]
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = out / path
    if not (path / STATE_NAME).is_file():
        raise UsageError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: {path} is not a complete dreamcoeff checkpoint")
    return path


def _prune_checkpoints(out: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never `keep` (the one just written). Each is
    first renamed to `checkpoint-N.old`, so a kill mid-delete never leaves a half-deleted folder
    under a name that `list_checkpoints` accepts."""
    if not limit:
        return
    others = [path for _, path in list_checkpoints(out) if path != keep]
    excess = len(others) + (keep is not None) - limit
    for path in others[: max(0, excess)]:
        trash = path.with_name(path.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _clean_output_dir(out: Path, drop_checkpoints: bool) -> None:
    """Remove what interrupted runs leave behind (checkpoints being written or deleted, temp files
    of atomic writes) and the completion marker of the run about to be continued or replaced; with
    `drop_checkpoints` (--overwrite_output_dir without resuming) also the replaced run's checkpoints,
    so that a later `--resume_from_checkpoint latest` can never continue the old run."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if _LEFTOVER_RE.match(p.name):
            logger.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if drop_checkpoints:
        for _, path in list_checkpoints(out):
            logger.info("--overwrite_output_dir: removing %s of the previous run", path)
            trash = path.with_name(path.name + ".old")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
    (out / COMPLETE_NAME).unlink(missing_ok=True)


def _comparable_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in _VOLATILE_ARGS}


def _check_resume_args(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse a checkpoint whose trainable weights have another shape; warn about other changes."""
    saved_file = checkpoint / "args.json"
    if not saved_file.is_file():
        return
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = json.loads(cfg.to_json())
    clash = [f"--{k} {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in _STRUCTURAL_ARGS
             if k in saved and saved.get(k) != now.get(k)]
    if clash:
        raise UsageError(f"cannot resume from {checkpoint}: it was trained with other settings ("
                         + "; ".join(clash) + "). Use the same flags, or start a new --output_dir")
    changed = sorted(k for k, v in _comparable_args(now).items() if k in saved and saved[k] != v)
    if changed:
        logger.warning("resuming from %s with changed settings: %s; the result will differ from an "
                       "uninterrupted run with the original ones", checkpoint, ", ".join(f"--{k}" for k in changed))


def _completed_run(cfg: TrainConfig, out: Path) -> dict | None:
    """The completion record of a finished run in `out` with the same arguments, else None."""
    try:
        record = json.loads((out / COMPLETE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if _comparable_args(record.get("args", {})) != _comparable_args(json.loads(cfg.to_json())):
        return None
    if not all((out / name).is_file() for name in record.get("files", [])):
        return None
    return record


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk (a rename is only as durable as its data)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _replace(src: Path, dst: Path) -> None:
    """Move a finished file or folder into place. A folder that exists is swapped out first and
    removed only after the new one is in place, so ``dst`` is never missing or half-written."""
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old.tmp")  # a leftover the next run removes
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported by every file system
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Class images for prior preservation


def ensure_class_images(cfg: TrainConfig, components, accelerator) -> list[Path]:
    """Generate the missing class images with the base model (deterministic seeds and names)."""
    from diffusers import StableDiffusionXLPipeline
    from tqdm.auto import tqdm

    class_dir = Path(cfg.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = data_lib.list_images(class_dir, what="class", allow_empty=True)
    missing = cfg.num_class_images - len(existing)
    if missing > 0:
        have = {p.name for p in existing}
        todo = [i for i in range(cfg.num_class_images * 2) if f"class_{i:05d}.png" not in have][:missing]
        mine = todo[accelerator.process_index :: accelerator.num_processes]
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=_sampling_scheduler(components.noise_scheduler),
        )
        pipe.set_progress_bar_config(disable=True)
        bar = tqdm(total=len(mine), desc="class images", disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), cfg.sample_batch_size):
            batch = mine[start : start + cfg.sample_batch_size]
            gens = [torch.Generator("cpu").manual_seed(_seed_of("class", cfg.seed, i)) for i in batch]
            with torch.no_grad(), accelerator.autocast():
                images = pipe(prompt=[cfg.class_prompt] * len(batch), generator=gens, height=cfg.resolution,
                              width=cfg.resolution, num_inference_steps=cfg.class_generation_steps).images
            for i, img in zip(batch, images):
                atomic_write(class_dir / f"class_{i:05d}.png", lambda tmp, img=img: img.save(tmp, format="PNG"))
            bar.update(len(batch))
        bar.close()
        del pipe
    accelerator.wait_for_everyone()
    return data_lib.list_images(class_dir, what="class")[: cfg.num_class_images]


def _sampling_scheduler(noise_scheduler):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(noise_scheduler.config)


# ------------------------------------------------------------------------------------------------
# Validation


def run_validation(cfg, components, unet, accelerator, step: int, out: Path) -> list[Path]:
    from diffusers import StableDiffusionXLPipeline

    prompts = cfg.validation_prompt or []
    if not prompts:
        return []
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=unet,
        scheduler=_sampling_scheduler(components.noise_scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    folder = out / "validation" / f"step_{step:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = unet.training
    unet.eval()
    paths, logged = [], []
    try:
        for p_idx, prompt in enumerate(prompts):
            for k in range(cfg.num_validation_images):
                gen = torch.Generator("cpu").manual_seed(cfg.seed + k)
                with torch.no_grad(), accelerator.autocast():
                    image = pipe(prompt=prompt, generator=gen, height=cfg.resolution, width=cfg.resolution,
                                 num_inference_steps=cfg.validation_inference_steps).images[0]
                path = folder / f"prompt{p_idx:02d}_seed{cfg.seed + k}.png"
                image.save(path)
                paths.append(path)
                logged.append(image)
    finally:
        unet.train(was_training)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in logged]), step, dataformats="NHWC")
    return paths


# ------------------------------------------------------------------------------------------------
# Model card


def write_model_card(cfg: TrainConfig, out: Path, result: TrainResult, validation: list[Path]) -> Path:
    methods = {"coeff": "Coeff-Tuning (alpha)", "lora": f"LoRA rank {cfg.rank}", "coeff+lora": f"Coeff-Tuning + LoRA rank {cfg.rank}",
               "full": "full UNet fine-tuning"}
    share = 100.0 * result.trainable_parameters / max(1, result.unet_parameters)
    load = []
    if "coeff" in cfg.tuning:
        load.append(f"load_coeff_weights(pipe, \"{out}\")  # alpha, strength 1.0")
    if "lora" in cfg.tuning:
        load.append(f"pipe.load_lora_weights(\"{out}\")")
    if cfg.tuning == "full":
        load.append(f"pipe.unet = UNet2DConditionModel.from_pretrained(\"{out}\", subfolder=\"{FULL_UNET_DIR}\", "
                    "torch_dtype=torch.float16).to(\"cuda\")")
    images = "\n".join(f"![{p.name}]({p.relative_to(out).as_posix()})" for p in validation[:8]) or "(no validation prompt given)"
    text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion-xl, dreambooth, coeff-tuning, dreamcoeff{', lora' if 'lora' in cfg.tuning else ''}]
instance_prompt: {json.dumps(cfg.instance_prompt)}
---

# {methods[cfg.tuning]} DreamBooth of `{cfg.pretrained_model_name_or_path}`

Trained with [dreamcoeff](https://pypi.org/project/dreamcoeff/) on the images in `{cfg.instance_data_dir}`.

| | |
|---|---|
| method | {methods[cfg.tuning]} |
| instance prompt | `{cfg.instance_prompt}` |
| trainable parameters | {result.trainable_parameters:,} ({share:.4f}% of the UNet's {result.unet_parameters:,}) |
| steps | {result.global_step} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}) |
| learning rates | alpha {cfg.coeff_lr}, {'UNet' if cfg.tuning == 'full' else 'LoRA'} {cfg.learning_rate} ({cfg.lr_scheduler}) |
| coeff targets / dropout | {cfg.coeff_targets} / {cfg.coeff_dropout} |
| resolution | {cfg.resolution} ({'square crops' if cfg.square_crop or cfg.with_prior_preservation else 'aspect buckets'}) |
| prior preservation | {f'yes: {cfg.class_prompt!r}, weight {cfg.prior_loss_weight}' if cfg.with_prior_preservation else 'no'} |
| mixed precision | {cfg.mixed_precision or 'no'} |
| wall time | {result.wall_time_s:.0f} s |

## Use

```python
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from dreamcoeff import load_coeff_weights

pipe = StableDiffusionXLPipeline.from_pretrained("{cfg.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
{chr(10).join(load)}
image = pipe({json.dumps(cfg.instance_prompt or 'a photo of sks dog')}, cross_attention_kwargs={{"coeff_scale": 1.0}}).images[0]
```

## Validation images

{images}
"""
    return atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# The loop


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trackers(report_to: str) -> list[str] | None:
    if report_to in (None, "", "none"):
        return None
    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    usable = []
    for name in wanted:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
        try:
            __import__(module)
            usable.append(name)
        except ImportError:
            logger.info("--report_to %s: %s is not installed, logging to the console only", report_to, module)
    return usable or None


def train(cfg: TrainConfig) -> TrainResult:
    """Run one DreamBooth training described by `cfg`; returns where everything went."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from tqdm.auto import tqdm

    started = time.time()
    out = Path(cfg.output_dir)
    resuming = bool(cfg.resume_from_checkpoint)
    if _has_previous_run(out) and not (cfg.overwrite_output_dir or resuming):
        raise UsageError(
            f"--output_dir {out} holds a previous run; pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint latest to continue it, or choose another --output_dir"
        )
    if resuming and cfg.resume_from_checkpoint == "latest":
        record = _completed_run(cfg, out)
        if record is not None:
            logger.info("%s holds a completed run with these arguments (%d steps): nothing to do",
                        out, record["global_step"])
            print(f"dreamcoeff: {out} is already complete ({record['global_step']} steps); nothing to do", flush=True)
            return TrainResult(out, int(record["global_step"]), int(record.get("trainable_parameters", 0)),
                               int(record.get("unet_parameters", 0)), time.time() - started, 0,
                               [out / name for name in record.get("files", [])], record.get("final_loss"))
    # Check the data and the checkpoint to resume before loading gigabytes of model.
    instance_paths = data_lib.list_images(cfg.instance_data_dir, what="instance")
    resume_path = resolve_resume(cfg, out)
    if resume_path is not None:
        _check_resume_args(cfg, resume_path)

    # `accelerate launch --multi_gpu` (torchrun) on a machine without CUDA: run the processes on
    # the CPU with gloo instead of silently training N independent single-process copies.
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_distributed,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=_trackers(cfg.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _clean_output_dir(out, drop_checkpoints=cfg.overwrite_output_dir and resume_path is None)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)

    components = load_components(cfg.pretrained_model_name_or_path, cfg.pretrained_vae_model_name_or_path,
                                 cfg.revision, cfg.variant)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    unet, vae = components.unet, components.vae
    for model in (unet, vae, components.text_encoder, components.text_encoder_2):
        model.requires_grad_(False)
    # The SDXL VAE overflows in fp16 (NaN latents): keep it in float32 unless a fixed VAE is given.
    vae.to(device, dtype=torch.float32 if cfg.pretrained_vae_model_name_or_path is None else weight_dtype)
    # Full fine-tuning keeps float32 master weights (accelerate autocasts the forward); adapters
    # train in float32 on a UNet frozen in the mixed-precision dtype.
    unet.to(device, dtype=torch.float32 if cfg.tuning == "full" else weight_dtype)
    components.text_encoder.to(device, dtype=weight_dtype)
    components.text_encoder_2.to(device, dtype=weight_dtype)

    class_paths: list[Path] = []
    if cfg.with_prior_preservation:
        class_paths = ensure_class_images(cfg, components, accelerator)

    # Adapters. Both are created in float32 on a (possibly half-precision) frozen UNet.
    if "lora" in cfg.tuning:
        add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if "coeff" in cfg.tuning:
        targets = ("attn1", "attn2") if cfg.coeff_targets == "both" else (cfg.coeff_targets,)
        apply_coeff(unet, targets=targets, dropout=cfg.coeff_dropout, chunk_size=cfg.coeff_chunk_size)
    if cfg.tuning == "full":
        unet.requires_grad_(True)
    if cfg.enable_xformers_memory_efficient_attention:
        set_plain_attention_backend(unet, "xformers")
    select_attention_impl(cfg.coeff_attention_impl, accelerator.device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    coeff_params = coeff_parameters(unet) if "coeff" in cfg.tuning else []
    coeff_ids = {id(p) for p in coeff_params}
    # LoRA's A/B matrices, or every UNet weight with --tuning full: the --learning_rate group.
    weight_params = [p for p in unet.parameters() if p.requires_grad and id(p) not in coeff_ids]
    trainable = sum(p.numel() for p in coeff_params + weight_params)
    unet_total = sum(p.numel() for p in unet.parameters())

    # Data (prior preservation uses square crops so instance and class images share a batch).
    use_buckets = not (cfg.square_crop or cfg.with_prior_preservation)
    dataset = data_lib.DreamBoothDataset(
        instance_paths, cfg.instance_prompt or "", resolution=cfg.resolution, class_images=class_paths,
        class_prompt=cfg.class_prompt, caption_ext=cfg.caption_ext, center_crop=cfg.center_crop,
        random_flip=cfg.random_flip, use_buckets=use_buckets, repeats=cfg.repeats, seed=cfg.seed,
        skip_bad_images=cfg.skip_bad_images, warn=logger.warning,
    )
    sampler = data_lib.BucketBatchSampler(dataset, cfg.train_batch_size, seed=cfg.seed,
                                          indices=dataset.instance_indices)
    dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data_lib.collate_examples,
                                             num_workers=cfg.dataloader_num_workers)

    # Prompts are encoded once: the text encoders are frozen.
    captions = [ex.caption for ex in dataset.examples]
    tokenizers = [components.tokenizer, components.tokenizer_2]
    encoders = [components.text_encoder, components.text_encoder_2]
    embeddings = encode_prompts(captions, tokenizers, encoders, device)

    # Optimizer: alpha and LoRA (or the full UNet) in separate groups with their own learning rates.
    groups = []
    if coeff_params:
        groups.append({"params": coeff_params, "lr": cfg.coeff_lr, "weight_decay": 0.0})
    if weight_params:
        groups.append({"params": weight_params, "lr": cfg.learning_rate, "weight_decay": cfg.adam_weight_decay})
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UsageError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag") from exc
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)

    batches_per_epoch = math.ceil(len(sampler) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)

    def save_hook(models, weights, output_dir):
        # Save only the trainable adapters, not the multi-GB frozen UNet.
        if accelerator.is_main_process:
            for model in models:
                bare = accelerator.unwrap_model(model)
                if "coeff" in cfg.tuning:
                    save_coeff_weights(Path(output_dir) / COEFF_WEIGHTS_NAME, bare)
                    _test_pause()
                if "lora" in cfg.tuning:
                    save_lora(output_dir, bare)
                if cfg.tuning == "full":
                    bare.save_pretrained(Path(output_dir) / FULL_UNET_DIR, safe_serialization=True)
            (Path(output_dir) / "args.json").write_text(cfg.to_json(), encoding="utf-8")
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            bare = accelerator.unwrap_model(models.pop())
            if "coeff" in cfg.tuning:
                load_coeff_weights(bare, Path(input_dir) / COEFF_WEIGHTS_NAME)
                for p in coeff_parameters(bare):
                    p.requires_grad_(True)
            if "lora" in cfg.tuning:
                load_lora_into_unet(bare, Path(input_dir) / LORA_WEIGHTS_NAME)
            if cfg.tuning == "full":
                load_full_unet_weights(bare, Path(input_dir) / FULL_UNET_DIR)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    bare_unet = accelerator.unwrap_model(unet)

    if accelerator.is_main_process:
        atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(cfg.to_json(), encoding="utf-8"))
        if accelerator.trackers:
            accelerator.init_trackers("dreamcoeff", config={k: v for k, v in asdict(cfg).items()
                                                              if isinstance(v, (int, float, str, bool))})

    global_step = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state = json.loads((resume_path / STATE_NAME).read_text())
        global_step = int(state["global_step"])
        # The load hook copies into the existing alpha parameters, so the optimizer still holds them.
        assert all(a is b for a, b in zip(coeff_params, coeff_parameters(bare_unet)))
        logger.info("resumed from %s at step %d", resume_path, global_step)

    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * cfg.gradient_accumulation_steps

    latent_cache: dict = {}
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    prediction_type = components.noise_scheduler.config.prediction_type
    noise_scheduler = components.noise_scheduler
    bad_steps, step_bad, last_loss = 0, False, None
    validation_paths: list[Path] = []

    bar = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    step_times: list[float] = []
    done = global_step >= max_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        # accelerate sets the epoch of the sampler / dataset from its own counter when iteration
        # starts; give it ours, so resuming in a later epoch reproduces that epoch's order.
        for obj in (loader, dataloader, sampler, dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        micro = (epoch * batches_per_epoch + (skip_batches if epoch == first_epoch else 0))
        for batch in loader:
            t0 = time.perf_counter()
            step_seed = _seed_of(cfg.seed, micro, accelerator.process_index)
            torch.manual_seed(step_seed)  # coefficient / LoRA dropout
            gen = torch.Generator(device).manual_seed(step_seed)
            micro += 1
            if cfg.with_prior_preservation:
                batch = _with_class_batch(batch, dataset, cfg, micro, accelerator)
            with accelerator.accumulate(unet):
                latents = _encode_latents(vae, batch, dataset, cfg, latent_cache, gen, device) 
                latents = ((latents - shift) * scaling).to(weight_dtype)
                noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
                if cfg.noise_offset:
                    noise = noise + cfg.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=device, dtype=latents.dtype)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen,
                                          device=device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                embeds = torch.stack([embeddings[c][0] for c in batch["captions"]]).to(device, weight_dtype)
                pooled = torch.stack([embeddings[c][1] for c in batch["captions"]]).to(device, weight_dtype)
                time_ids = batch["add_time_ids"].to(device, weight_dtype)
                pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                            return_dict=False)[0]
                if prediction_type == "epsilon":
                    target = noise
                elif prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ModelError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler")
                per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
                    per_example = per_example * weights
                is_class = batch["is_class"].to(device)
                loss = per_example[~is_class].mean()
                if is_class.any():
                    loss = loss + cfg.prior_loss_weight * per_example[is_class].mean()

                finite = accelerator.reduce(torch.isfinite(loss).float().reshape(1), reduction="sum").item()
                if finite == accelerator.num_processes:
                    accelerator.backward(loss)
                else:
                    step_bad = True
                if accelerator.sync_gradients:
                    params = coeff_params + weight_params
                    norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if not step_bad else torch.tensor(float("nan"))
                    if step_bad or not torch.isfinite(torch.as_tensor(norm)):
                        bad_steps += 1
                        optimizer.zero_grad(set_to_none=True)
                        logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                                       global_step + 1, bad_steps)
                        if bad_steps >= cfg.max_bad_steps:
                            bar.close()
                            kept = list_checkpoints(out)
                            kept_text = (f"the last good checkpoint, {kept[-1][1]}, is kept" if kept else
                                         "no checkpoint had been written (see --checkpointing_steps)")
                            raise TrainingError(
                                f"{bad_steps} consecutive steps had a non-finite loss or gradient: the run diverged. "
                                f"Lower the learning rate (--coeff_lr {cfg.coeff_lr}, --learning_rate {cfg.learning_rate}), "
                                f"or use --mixed_precision bf16 instead of fp16; {kept_text}, "
                                "and no final weights were written"
                            )
                    else:
                        bad_steps = 0
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_bad = False
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            step_times.append(time.perf_counter() - t0)
            last_loss = float(loss.detach().item()) if torch.isfinite(loss) else float("nan")
            logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}")
            bar.update(1)
            accelerator.log(logs, step=global_step)

            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                if bad_steps:  # the same on every rank: the loss check is reduced, the gradients synced
                    logger.warning("step %d was skipped: no checkpoint saved, the last good one is kept", global_step)
                else:
                    save_checkpoint(accelerator, out, global_step, cfg.checkpoints_total_limit)
            if cfg.validation_prompt and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                validation_paths = run_validation(cfg, components, bare_unet, accelerator, global_step, out)
            if global_step >= max_steps:
                done = True
                break
    bar.close()

    accelerator.wait_for_everyone()
    _check_ranks_agree(accelerator, coeff_params + weight_params)
    files: list[Path] = []
    if accelerator.is_main_process:
        meta = {"base_model": cfg.pretrained_model_name_or_path, "training_args": asdict(cfg)}
        # Every weight file is written in full beside the output first, then all are renamed into
        # place: a failed write (full disk) leaves the previous run's files intact and matching.
        staging = out / ".final.tmp.d"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            staged = []
            if "coeff" in cfg.tuning:
                staged.append(save_coeff_weights(staging / COEFF_WEIGHTS_NAME, bare_unet, meta))
            if "lora" in cfg.tuning:
                staged.append(save_lora(staging, bare_unet))
            if cfg.tuning == "full":
                bare_unet.save_pretrained(staging / FULL_UNET_DIR, safe_serialization=True)
                staged.append(staging / FULL_UNET_DIR)
            for path in staged:
                _replace(path, out / path.name)
                files.append(out / path.name)
            _fsync_dir(out)
        except (OSError, CoeffWeightsError) as exc:
            if _write_error(exc) is None:
                raise
            raise TrainingError(_write_failed(out, _write_error(exc))) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _test_pause()
        if cfg.validation_prompt and (global_step % cfg.validation_steps or not validation_paths):
            validation_paths = run_validation(cfg, components, bare_unet, accelerator, global_step, out)
    accelerator.end_training()
    result = TrainResult(out, global_step, trainable, unet_total, time.time() - started, _peak_memory(device), files,
                         last_loss)
    if accelerator.is_main_process:
        try:
            files.append(write_model_card(cfg, out, result, validation_paths))
            files.append(out / "args.json")
            # Written last: a run is complete only once every file is in place.
            record = {"global_step": global_step, "trainable_parameters": trainable, "unet_parameters": unet_total,
                      "final_loss": last_loss, "files": [p.name for p in files], "args": json.loads(cfg.to_json())}
            atomic_write(out / COMPLETE_NAME, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2), encoding="utf-8"))
        except OSError as exc:
            raise TrainingError(_write_failed(out, exc)) from exc
        _print_summary(result, step_times)
    return result


def _write_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write (save_coeff_weights wraps it in a CoeffWeightsError)."""
    return exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc.__cause__, OSError) else None


def _write_failed(out: Path, exc: OSError) -> str:
    return (f"could not write the final files in {out}: {exc.strerror or exc}. Files already there are intact "
            "(each is written under a temporary name, then renamed); free some space and rerun with "
            "--resume_from_checkpoint latest")


def save_checkpoint(accelerator, out: Path, step: int, limit: int | None) -> Path:
    """accelerate state + adapters into `checkpoint-N.tmp`, flushed to disk, then renamed: a kill
    mid-write never leaves a folder that `latest` would pick. Old checkpoints go only after the new
    one is complete, and the new one is never among them. A failed write (full disk) removes the
    partial folder and stops the run with a `TrainingError`; the earlier checkpoints are intact."""
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _test_pause()
            (tmp / STATE_NAME).write_text(json.dumps({"global_step": step}))
            _fsync_tree(tmp)
            old = None
            if final.exists():  # resumed from an earlier checkpoint: this step is being redone
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _prune_checkpoints(out, limit, keep=final)
    except (OSError, CoeffWeightsError) as exc:
        cause = _write_error(exc)
        if cause is None:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"could not write checkpoint {final}: {cause.strerror or cause}. The earlier checkpoints are intact; "
            "free some space and rerun with --resume_from_checkpoint latest"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def _check_ranks_agree(accelerator, params) -> None:
    """Every process must end with the same weights (DDP keeps them in step); say so, or fail."""
    if accelerator.num_processes == 1 or not params:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    gathered = accelerator.gather(flat.unsqueeze(0))
    spread = (gathered - gathered[0:1]).abs().max().item()
    if spread > 0:
        raise TrainingError(f"trainable weights differ across {accelerator.num_processes} processes (max diff {spread:g})")
    logger.info("weights identical on all %d processes", accelerator.num_processes)


def _with_class_batch(batch, dataset, cfg, micro: int, accelerator):
    """Append class images to an instance batch: a fixed permutation of the class images walked in
    order across steps and ranks, so a resumed run draws the same ones."""
    import random

    class_idx = list(dataset.class_indices)
    bs = len(batch["captions"])
    pos = ((micro - 1) * accelerator.num_processes + accelerator.process_index) * bs
    cycle = pos // len(class_idx)
    order = list(class_idx)
    random.Random(_seed_of("class-order", cfg.seed, cycle)).shuffle(order)
    picks = [order[(pos + j) % len(order)] for j in range(bs)]
    items = [dataset[i] for i in picks]
    extra = data_lib.collate_examples(items)
    return {
        "pixel_values": torch.cat([batch["pixel_values"], extra["pixel_values"].to(batch["pixel_values"].device)]),
        "add_time_ids": torch.cat([batch["add_time_ids"], extra["add_time_ids"].to(batch["add_time_ids"].device)]),
        "captions": list(batch["captions"]) + extra["captions"],
        "is_class": torch.cat([batch["is_class"], extra["is_class"].to(batch["is_class"].device)]),
        "indices": list(batch["indices"]) + extra["indices"],
    }


@torch.no_grad()
def _encode_latents(vae, batch, dataset, cfg, cache: dict, gen, device):
    """VAE latents of the batch, sampled from the posterior; with --cache_latents the posterior of
    each augmentation variant (image, crop, flip) is computed once."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pixels = batch["pixel_values"].to(device, vae.dtype)
    if not cfg.cache_latents:
        return vae.encode(pixels).latent_dist.sample(generator=gen)
    keys = [dataset.augmentation_key(i) for i in batch["indices"]]
    todo = [j for j, k in enumerate(keys) if k not in cache]
    if todo:
        params = vae.encode(pixels[todo]).latent_dist.parameters
        for j, p in zip(todo, params):
            cache[keys[j]] = p.cpu()
    params = torch.stack([cache[k] for k in keys]).to(device)
    return DiagonalGaussianDistribution(params).sample(generator=gen)


def _print_summary(result: TrainResult, step_times: list[float]) -> None:
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


def select_attention_impl(impl: str, device: torch.device) -> None:
    """--coeff_attention_impl: exported as DREAMCOEFF_ATTENTION_IMPL, what `mixed_attention`'s "auto"
    runs where A != I, so validation and sampling in this process use it too ("auto" leaves it)."""
    if impl == "auto":
        return
    if impl == "triton":
        from .triton_attention import triton_unavailable_reason  # lazy: triton is optional

        reason = triton_unavailable_reason(torch.device(device))
        if reason is not None:
            raise UsageError(f"--coeff_attention_impl triton: {reason}; or drop the flag (chunked PyTorch runs everywhere)")
    if impl == "cpu_fused":
        from .cpu_kernel import unavailable_reason

        reason = unavailable_reason(torch.device(device))
        if reason is not None:
            raise UsageError(f"--coeff_attention_impl cpu_fused: {reason}; or drop the flag")
    os.environ["DREAMCOEFF_ATTENTION_IMPL"] = impl


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_dreambooth_coeff.py`: clean one-line errors for bad input."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (UsageError, data_lib.DataError, ModelError, CoeffWeightsError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if "xformers" in str(exc) or "bitsandbytes" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
