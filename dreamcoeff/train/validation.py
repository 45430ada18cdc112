"""Images made with the model during training: prior-preservation class images and validation images.

Both build a `StableDiffusionXLPipeline` around the components being trained (no second copy of the
model) with an Euler sampler, and draw from fixed seeds, so two runs' images compare like for like.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import atomic_write
from .config import TrainConfig
from .data import list_images, seed_of

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
    prompts: list[str] | None = None,
) -> list[Path]:
    """Render every validation prompt with fixed seeds into `validation/step_NNNNN/` (and TensorBoard).
    `prompts` are the validation prompts as the model reads them (learned tokens in place of the
    abstraction); default ``--validation_prompt``."""
    prompts = (cfg.validation_prompt or []) if prompts is None else prompts
    if not prompts:
        return []
    pipe = sampling_pipeline(components, unet)
    folder = out / "validation" / f"step_{step:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = unet.training
    unet.eval()
    paths, logged = [], []
    # --validation_coeff_scales: each prompt and seed at every alpha strength (None: as trained)
    strengths = cfg.validation_coeff_scales or [None]
    strips: list[list] = []
    try:
        for p_idx, prompt in enumerate(prompts):
            for k in range(cfg.num_validation_images):
                strips.append([])
                for c in strengths:
                    gen = torch.Generator("cpu").manual_seed(cfg.seed + k)  # the same noise at every strength
                    kwargs = {} if c is None else {"cross_attention_kwargs": {"coeff_scale": c}}
                    with torch.no_grad(), accelerator.autocast():
                        image = pipe(
                            prompt=prompt,
                            generator=gen,
                            height=cfg.resolution,
                            width=cfg.resolution,
                            num_inference_steps=cfg.validation_inference_steps,
                            **kwargs,
                        ).images[0]
                    suffix = "" if c is None else f"_c{c:g}"
                    path = folder / f"prompt{p_idx:02d}_seed{cfg.seed + k}{suffix}.png"
                    image.save(path)
                    paths.append(path)
                    logged.append(image)
                    strips[-1].append(image)
    finally:
        unet.train(was_training)
    if cfg.validation_coeff_scales:
        paths.append(_strength_strip(cfg, prompts, strips, folder, step))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in logged]), step, dataformats="NHWC")
    return paths


def _strength_strip(cfg: TrainConfig, prompts: list[str], strips: list[list], folder: Path, step: int) -> Path:
    """One labelled grid per validation step: a row per prompt and seed, a column per alpha strength."""
    from ..grids import make_grid

    rows = [f"{p} (seed {cfg.seed + k})" for p in prompts for k in range(cfg.num_validation_images)]
    cols = [f"alpha x {c:g}" + (" (base model)" if c == 0 else "") for c in cfg.validation_coeff_scales]
    grid = make_grid(strips, rows, cols, title=f"step {step}: the same seeds at each alpha strength")
    path = folder / "strengths.png"
    grid.save(path)
    return path


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
