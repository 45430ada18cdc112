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
    example, the epsilon or v target, Min-SNR weights (--snr_gamma), the loss mask (--masked_loss:
    a weighted mean over the latent pixels), and the prior-preservation term on the batch's class
    images (--prior_loss_weight). `text` is the batch's prompt
    conditioning, ``(embeds B x 77 x D, pooled B x P)``."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=device, dtype=latents.dtype
        )
    bsz = latents.shape[0]
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen, device=device
    ).long()
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
    per_element = F.mse_loss(pred.float(), target.float(), reduction="none")
    if "loss_mask" in batch:  # --masked_loss: the mask at latent resolution weights each latent pixel
        weight = F.interpolate(batch["loss_mask"].to(device, torch.float32), size=pred.shape[-2:], mode="area")
        per_example = (per_element * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * pred.shape[1])
    else:
        per_example = per_element.mean(dim=(1, 2, 3))
    if cfg.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_example = per_example * weights
    is_class = batch["is_class"].to(device)
    loss = per_example[~is_class].mean()
    if is_class.any():
        loss = loss + cfg.prior_loss_weight * per_example[is_class].mean()
    return loss
