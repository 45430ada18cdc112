"""One micro-batch's loss: VAE latents, seeded noise and timesteps, SDXL's denoising loss, prior batch.

Every random draw here comes from the generator the loop seeds from (seed, micro-step, rank), so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..models import ModelError
from . import data
from .config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .latent_cache import LatentCache


def with_class_batch(
    batch: dict[str, Any], dataset: data.DreamBoothDataset, cfg: TrainConfig, micro: int, accelerator: Accelerator
) -> dict[str, Any]:
    """Append class images to an instance batch: a fixed permutation of the class images walked in
    order across steps and ranks, so a resumed run draws the same ones."""
    class_idx = list(dataset.class_indices)
    bs = len(batch["captions"])
    pos = ((micro - 1) * accelerator.num_processes + accelerator.process_index) * bs
    cycle = pos // len(class_idx)
    order = list(class_idx)
    random.Random(data.seed_of("class-order", cfg.seed, cycle)).shuffle(order)
    picks = [order[(pos + j) % len(order)] for j in range(bs)]
    items = [dataset[i] for i in picks]
    extra = data.collate_examples(items)
    merged = {
        "pixel_values": torch.cat([batch["pixel_values"], extra["pixel_values"].to(batch["pixel_values"].device)]),
        "add_time_ids": torch.cat([batch["add_time_ids"], extra["add_time_ids"].to(batch["add_time_ids"].device)]),
        "captions": list(batch["captions"]) + extra["captions"],
        "is_class": torch.cat([batch["is_class"], extra["is_class"].to(batch["is_class"].device)]),
        "indices": list(batch["indices"]) + extra["indices"],
    }
    if "loss_mask" in batch:
        merged["loss_mask"] = torch.cat([batch["loss_mask"], extra["loss_mask"].to(batch["loss_mask"].device)])
    return merged


@torch.no_grad()
def encode_latents(
    vae: torch.nn.Module,
    batch: dict[str, Any],
    dataset: data.DreamBoothDataset,
    cache: LatentCache | None,
    gen: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """VAE latents of the batch, sampled from the posterior. With a `cache` (--cache_latents: in
    memory, per run; --cache_latents_to_disk: on disk, across runs) the posterior of each
    augmentation variant (image, crop, flip) is encoded once and reused."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pixels = batch["pixel_values"].to(device, vae.dtype)
    if cache is None:
        return vae.encode(pixels).latent_dist.sample(generator=gen)
    keys = [cache.key_of(dataset, i) for i in batch["indices"]]
    found = [cache.get(k) for k in keys]
    todo = [j for j, f in enumerate(found) if f is None]
    if todo:
        params = vae.encode(pixels[todo]).latent_dist.parameters
        for j, p in zip(todo, params):
            found[j] = cache.put(keys[j], p)
    params = torch.stack(found).to(device, vae.dtype)
    return DiagonalGaussianDistribution(params).sample(generator=gen)


def training_scheduler(noise_scheduler, cfg: TrainConfig, warn=None):
    """The model's DDPM scheduler with --prediction_type and --rescale_betas_zero_snr applied (the same
    object when neither changes it). A --prediction_type that differs from the model's scheduler wins,
    with a warning: the weights then learn a target the base model was not trained on."""
    changes: dict[str, Any] = {}
    theirs = noise_scheduler.config.prediction_type
    if cfg.prediction_type and cfg.prediction_type != theirs:
        if warn is not None:
            warn(
                f"--prediction_type {cfg.prediction_type} wins over the model's scheduler, which says {theirs!r}: "
                "training and validation use it; the base model was trained for the other target"
            )
        changes["prediction_type"] = cfg.prediction_type
    if cfg.rescale_betas_zero_snr:
        # the last timestep is pure noise: sampling must start there (trailing spacing, Lin et al. 2023)
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not changes:
        return noise_scheduler
    return type(noise_scheduler).from_config(noise_scheduler.config, **changes)


def sample_timesteps(noise_scheduler, cfg: TrainConfig, bsz: int, gen: torch.Generator, device) -> torch.Tensor:
    """One timestep per example, uniform in [--min_timestep, --max_timestep) (default [0, 1000))."""
    total = noise_scheduler.config.num_train_timesteps
    high = total if cfg.max_timestep is None else cfg.max_timestep
    if high > total:
        raise ModelError(f"--max_timestep {high} is beyond the model's scheduler's {total} training timesteps")
    return torch.randint(cfg.min_timestep, high, (bsz,), generator=gen, device=device).long()


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """--loss_type per latent element, in float32: l2, or kohya's pseudo-Huber forms with a constant c."""
    pred, target = pred.float(), target.float()
    if cfg.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    c = cfg.huber_c
    smooth = torch.sqrt((pred - target) ** 2 + c * c) - c
    if cfg.loss_type == "huber":
        return 2 * c * smooth
    if cfg.loss_type == "smooth_l1":
        return 2 * smooth
    raise ValueError(f"unknown --loss_type {cfg.loss_type!r}")


def snr_weights(noise_scheduler, timesteps: torch.Tensor, cfg: TrainConfig, v_prediction: bool) -> torch.Tensor | None:
    """Per-example loss weights of Min-SNR (--snr_gamma) times debiased estimation
    (--debiased_estimation_loss); None when neither is on."""
    if cfg.snr_gamma is None and not cfg.debiased_estimation_loss:
        return None
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.ones_like(snr)
    if cfg.snr_gamma is not None:
        weights = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if v_prediction else snr)
    if cfg.debiased_estimation_loss:
        capped = torch.clamp(snr, max=1000.0)
        weights = weights * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
    return weights


def denoising_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    batch: dict[str, Any],
    text: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    gen: torch.Generator,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """SDXL's training loss on scaled latents: noise (with --noise_offset), a random timestep per
    example (--min_timestep / --max_timestep), the epsilon or v target, the --loss_type per element,
    Min-SNR and debiased-estimation weights (--snr_gamma, --debiased_estimation_loss), the loss mask
    (--masked_loss: a weighted mean over the latent pixels), and the prior-preservation term on the
    batch's class images (--prior_loss_weight). `text` is the batch's prompt
    conditioning, ``(embeds B x 77 x D, pooled B x P)``."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=device, dtype=latents.dtype
        )
    timesteps = sample_timesteps(noise_scheduler, cfg, latents.shape[0], gen, device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    embeds, pooled = text
    time_ids = batch["add_time_ids"].to(device, weight_dtype)
    pred = unet(
        noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False
    )[0]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ModelError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler")
    per_element = elementwise_loss(pred, target, cfg)
    if "loss_mask" in batch:  # --masked_loss: the mask at latent resolution weights each latent pixel
        weight = F.interpolate(batch["loss_mask"].to(device, torch.float32), size=pred.shape[-2:], mode="area")
        per_example = (per_element * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * pred.shape[1])
    else:
        per_example = per_element.mean(dim=(1, 2, 3))
    weights = snr_weights(noise_scheduler, timesteps, cfg, prediction_type == "v_prediction")
    if weights is not None:
        per_example = per_example * weights
    is_class = batch["is_class"].to(device)
    loss = per_example[~is_class].mean()
    if is_class.any():
        loss = loss + cfg.prior_loss_weight * per_example[is_class].mean()
    return loss
