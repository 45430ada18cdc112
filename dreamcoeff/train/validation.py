"""Images made with the model during training: prior-preservation class images and validation images.

Both build a `StableDiffusionXLPipeline` around the components being trained (no second copy of the
model) with an Euler sampler, and draw from fixed seeds, so two runs' images compare like for like.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import WriteError, atomic_write
from .checkpoints import TrainingError
from .config import TrainConfig
from .data import list_images, seed_of
from .validation_prompts import ValidationPrompt, validation_prompts

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..models import SDXLComponents


def ensure_class_images(cfg: TrainConfig, components: SDXLComponents, accelerator: Accelerator) -> list[Path]:
    """Generate the missing class images with the base model (deterministic seeds and names)."""
    from tqdm.auto import tqdm

    class_dir = Path(cfg.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_images(class_dir, what="class", allow_empty=True)
    missing = cfg.num_class_images - len(existing)
    if missing > 0:
        have = {p.name for p in existing}
        todo = [i for i in range(cfg.num_class_images * 2) if f"class_{i:05d}.png" not in have][:missing]
        mine = todo[accelerator.process_index :: accelerator.num_processes]
        pipe = sampling_pipeline(components, components.unet)
        bar = tqdm(total=len(mine), desc="class images", disable=not accelerator.is_local_main_process)
        for start in range(0, len(mine), cfg.sample_batch_size):
            batch = mine[start : start + cfg.sample_batch_size]
            gens = [torch.Generator("cpu").manual_seed(seed_of("class", cfg.seed, i)) for i in batch]
            with torch.no_grad(), accelerator.autocast():
                images = pipe(
                    prompt=[cfg.class_prompt] * len(batch),
                    generator=gens,
                    height=cfg.resolution,
                    width=cfg.resolution,
                    num_inference_steps=cfg.class_generation_steps,
                    clip_skip=cfg.clip_skip,
                ).images
            for i, img in zip(batch, images):
                atomic_write(class_dir / f"class_{i:05d}.png", lambda tmp, img=img: img.save(tmp, format="PNG"))
            bar.update(len(batch))
        bar.close()
        del pipe
    accelerator.wait_for_everyone()
    return list_images(class_dir, what="class")[: cfg.num_class_images]


def sampling_scheduler(noise_scheduler):
    """The Euler sampler of the model's own noise schedule (what SDXL's pipelines default to)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(noise_scheduler.config)


def sampling_pipeline(components: SDXLComponents, unet: torch.nn.Module):
    """A `StableDiffusionXLPipeline` around the components being trained (no copy), Euler, quiet."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=sampling_scheduler(components.noise_scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_validation(
    cfg: TrainConfig,
    components: SDXLComponents,
    unet: torch.nn.Module,
    accelerator: Accelerator,
    step: int,
    out: Path,
    prompts: list[ValidationPrompt | str] | None = None,
) -> list[Path]:
    """Render every validation prompt with fixed seeds into `validation/step_NNNNN/` (and TensorBoard,
    wandb). `prompts` are the validation prompts as the model reads them (learned tokens in place of
    the abstraction); default ``--validation_prompt`` and ``--validation_prompts``. A prompt's own
    options (a prompt file's ``--n --w --h --d --l --s``) win over the ``--validation_*`` flags."""
    prompts = validation_prompts(cfg) if prompts is None else prompts
    prompts = [ValidationPrompt(p) if isinstance(p, str) else p for p in prompts]
    if not prompts:
        return []
    pipe = sampling_pipeline(components, unet)
    folder = out / "validation" / f"step_{step:05d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(
            f"cannot create the validation folder {folder}: {exc.strerror or exc}{_resume_hint('fix that path')}"
        ) from exc
    was_training = unet.training
    unet.eval()
    paths: list[Path] = []
    logged: list[tuple[int, str, object]] = []  # (prompt index, caption, image)
    # --validation_coeff_scales: each prompt and seed at every alpha strength (None: as trained)
    strengths = cfg.validation_coeff_scales or [None]
    strips: list[list] = []
    row_labels: list[str] = []
    try:
        for p_idx, vp in enumerate(prompts):
            settings = _render_settings(cfg, vp)
            base_seed = cfg.seed if vp.seed is None else vp.seed
            for k in range(cfg.num_validation_images):
                seed = base_seed + k
                strips.append([])
                row_labels.append(f"{vp.prompt} (seed {seed})")
                for c in strengths:
                    gen = torch.Generator("cpu").manual_seed(seed)  # the same noise at every strength
                    kwargs = {} if c is None else {"cross_attention_kwargs": {"coeff_scale": c}}
                    with torch.no_grad(), accelerator.autocast():
                        image = pipe(prompt=vp.prompt, generator=gen, **settings, **kwargs).images[0]
                    suffix = "" if c is None else f"_c{c:g}"
                    path = folder / f"prompt{p_idx:02d}_seed{seed}{suffix}.png"
                    _write_png(image, path)
                    paths.append(path)
                    caption = vp.prompt + ("" if c is None else f" (alpha x {c:g})") + f", seed {seed}"
                    logged.append((p_idx, caption, image))
                    strips[-1].append(image)
    finally:
        unet.train(was_training)
    strip = None
    if cfg.validation_coeff_scales:
        strip = _strength_strip(cfg, row_labels, strips, folder, step)
        paths.append(folder / "strengths.png")
    _log_images(accelerator, step, logged, strip)
    return paths


def _render_settings(cfg: TrainConfig, vp: ValidationPrompt) -> dict:
    """The pipeline arguments of one validation prompt: its own options, else the flags."""
    settings = {
        "height": vp.height or cfg.validation_height or cfg.resolution,
        "width": vp.width or cfg.validation_width or cfg.resolution,
        "num_inference_steps": vp.steps or cfg.validation_inference_steps,
        "guidance_scale": cfg.validation_guidance_scale if vp.guidance_scale is None else vp.guidance_scale,
    }
    if cfg.clip_skip is not None:  # the pipeline's clip_skip, as the prompts were encoded in training
        settings["clip_skip"] = cfg.clip_skip
    negative = cfg.validation_negative_prompt if vp.negative_prompt is None else vp.negative_prompt
    if negative is not None:  # none given: the pipeline's own default (zeros for SDXL base), as before
        settings["negative_prompt"] = negative
    return settings


def _log_images(accelerator: Accelerator, step: int, logged: list[tuple[int, str, object]], strip) -> None:
    """The validation images (and the strength strip) to TensorBoard and wandb. TensorBoard gets one
    ``validation`` batch where all images have one size, else one batch per prompt."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            sizes = {image.size for _, _, image in logged}
            groups: dict[str, list] = {}
            for p_idx, _, image in logged:
                groups.setdefault("validation" if len(sizes) == 1 else f"validation/prompt{p_idx:02d}", []).append(
                    np.asarray(image)
                )
            for tag, images in groups.items():
                tracker.writer.add_images(tag, np.stack(images), step, dataformats="NHWC")
            if strip is not None:
                tracker.writer.add_image("validation/strengths", np.asarray(strip), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            values = {"validation": [wandb.Image(image, caption=caption) for _, caption, image in logged]}
            if strip is not None:
                values["validation/strengths"] = wandb.Image(strip, caption=f"step {step}: alpha strengths")
            tracker.log(values, step=step)


def _strength_strip(cfg: TrainConfig, rows: list[str], strips: list[list], folder: Path, step: int):
    """One labelled grid per validation step, saved as ``strengths.png`` and returned: a row per prompt
    and seed, a column per alpha strength."""
    from ..grids import make_grid

    cols = [f"alpha x {c:g}" + (" (base model)" if c == 0 else "") for c in cfg.validation_coeff_scales]
    grid = make_grid(strips, rows, cols, title=f"step {step}: the same seeds at each alpha strength")
    _write_png(grid, folder / "strengths.png")
    return grid


def _write_png(image, path: Path) -> None:
    """A validation picture, written atomically; a failed write (full disk) ends the run with one line.

    Checkpoints written before are whole (each is staged, then renamed), so the run resumes from the last.
    """
    try:
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    except WriteError as exc:
        raise TrainingError(f"{exc}{_resume_hint('free some space')}") from exc


def _resume_hint(fix: str) -> str:
    """What to do after a validation write failed: the checkpoints are whole (each is staged, then renamed)."""
    return (
        f". Checkpoints already written are intact; {fix} and rerun with --resume_from_checkpoint latest "
        "(or lower --validation_steps / --num_validation_images)"
    )


def log_alpha(accelerator: Accelerator, unet: torch.nn.Module, step: int) -> dict[str, float]:
    """alpha as people read it, at a validation step: the mean |alpha| of every UNet block's self-
    and cross-attention as scalars (`accelerator.log`), and the overview picture of
    `dreamcoeff.inspection` (per-layer bars by block, heatmaps of the layers that moved most, one
    diverging scale) to TensorBoard and wandb. Returns the scalars."""
    import numpy as np

    from ..inspection import overview_image, summarize
    from ..processor import coeff_state_dict

    tensors = {k: v.detach().float().cpu() for k, v in coeff_state_dict(unet).items()}
    if not tensors:
        return {}
    groups: dict[str, list[float]] = {}
    for s in summarize(tensors):
        groups.setdefault(f"alpha/mean_abs/{s.block}/{s.kind}", []).append(s.mean_abs)
    scalars = {k: float(np.mean(v)) for k, v in groups.items()}
    accelerator.log(scalars, step=step)
    trackers = [t for t in accelerator.trackers if t.name in ("tensorboard", "wandb")]
    if trackers:
        image = overview_image(tensors, title=f"alpha at step {step}")
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("alpha/overview", np.asarray(image), step, dataformats="HWC")
            else:
                import wandb

                tracker.log({"alpha/overview": wandb.Image(image)}, step=step)
    return scalars
