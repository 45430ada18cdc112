"""Pretrain the micro-world SDXL pipeline on the CPU (issue 6, part 2).

    python benchmarks/micro/pretrain.py --out models/microworld-sdxl --vae_steps 600 --steps 3000

What it does, in order (single thread, float32, fully seeded):

1. builds the tiny SDXL-architecture pipeline of ``dreamcoeff.tiny`` with a tokenizer that knows every
   world word (``microworld.VOCAB_WORDS``) as one token;
2. fine-tunes the VAE on world images (L1 + MSE reconstruction, tiny KL), because a random VAE
   cannot reproduce the world's flat colours; then sets ``scaling_factor`` to 1 / std of the latents
   of world images, as SDXL's 0.13025 does for its VAE;
3. trains the UNet *and both text encoders* with SDXL's epsilon loss on freshly generated world
   images (a new seeded batch each step: the data is free), dropping 10% of captions to the zero
   embedding that ``force_zeros_for_empty_prompt`` uses for classifier-free guidance;
4. saves the diffusers folder and a ``pretrain_log.json`` (loss curve, timings, sample accuracy of
   the attributes measured by ``microworld.analyze`` on generated images).

``--minutes`` stops a phase early at a time budget; the log records how many steps ran, and rerunning
with ``--vae_steps`` / ``--steps`` set to those numbers and no ``--minutes`` reproduces the weights
(same torch build, single thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusers import DDPMScheduler  # noqa: E402

from dreamcoeff import microworld as mw  # noqa: E402
from dreamcoeff.tiny import _write_tokenizer_files, build_tiny_tokenizer_files, tiny_scheduler_config  # noqa: E402

TIME_IDS = torch.tensor([[mw.RES, mw.RES, 0, 0, mw.RES, mw.RES]], dtype=torch.float32)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding (differentiable): penultimate states of both encoders + pooled projection."""
    hidden = []
    pooled = None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        res = enc(ids, output_hidden_states=True)
        pooled = res[0]
        hidden.append(res.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def train_vae(pipe, steps: int, deadline: float, batch: int, lr: float, log: dict) -> int:
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    curve = log.setdefault("vae_curve", [])
    t0 = time.time()
    step = 0
    for step in range(1, steps + 1):
        imgs, _, _ = mw.world_batch(10_000_000 + step, batch)
        x = to_tensor(imgs)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "loss": loss.item(), "s": round(time.time() - t0, 1)})
            print(f"vae step {step} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
        if time.time() > deadline:
            break
    vae.eval().requires_grad_(False)
    log["vae_steps"] = step
    log["vae_seconds"] = round(time.time() - t0, 1)
    return step


def train_decoder(vae, steps: int, batch: int, lr: float, log: dict) -> int:
    """Sharpen the VAE decoder with the encoder frozen: the latent space (what the UNet learns) is
    unchanged, so this phase commutes with UNet training and can also run on a saved pipeline."""
    vae.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in dec:
        q.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    curve = log.setdefault("decoder_curve", [])
    t0 = time.time()
    for step in range(1, steps + 1):
        imgs, _, _ = mw.world_batch(20_000_000 + step, batch)
        x = to_tensor(imgs)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec, 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "loss": loss.item(), "s": round(time.time() - t0, 1)})
            print(f"decoder step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval().requires_grad_(False)
    log["decoder_steps"] = steps
    log["decoder_seconds"] = round(time.time() - t0, 1)
    return steps


@torch.no_grad()
def vae_report(pipe, log: dict, key: str = "vae_recon") -> None:
    """Reconstruction error (mean |.| in 0-255 units) and exact-metric recovery through the VAE."""
    vae = pipe.vae
    imgs, _, scenes = mw.world_batch(123_456, 64)
    rec = ((vae.decode(vae.encode(to_tensor(imgs)).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5)
    rec = rec.round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    ok = [all(mw.matches_scene(r, s).values()) for r, s in zip(rec, scenes)]
    inst = [(c, s) for c in mw.CONCEPTS for s in c.instance_scenes()]
    cimgs = np.stack([mw.render(s) for _, s in inst])
    crec = ((vae.decode(vae.encode(to_tensor(cimgs)).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5)
    crec = crec.round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    subj = [mw.subject_match(r, c)["subject"] for r, (c, _) in zip(crec, inst)]
    lat = vae.encode(to_tensor(mw.world_batch(654_321, 128)[0])).latent_dist.mode()
    log[key] = {
        "world_mean_abs_err": float(np.abs(rec.astype(float) - imgs).mean()),
        "world_all_attributes_recovered": float(np.mean(ok)),
        "concept_mean_abs_err": float(np.abs(crec.astype(float) - cimgs).mean()),
        "concept_subject_recovered": float(np.mean(subj)),
        "latent_std": float(lat.std()),
        "latent_mean": float(lat.mean()),
    }
    print(f"{key}:", log[key], flush=True)


def train_unet(pipe, steps: int, deadline: float, batch: int, lr: float, log: dict,
               save_every: int = 0, out: Path | None = None, stop_after: int | None = None) -> int:
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    sched = DDPMScheduler(**{k: v for k, v in tiny_scheduler_config().items() if k not in ("interpolation_type", "use_karras_sigmas")})
    scaling = pipe.vae.config.scaling_factor
    params = list(unet.parameters()) + list(te1.parameters()) + list(te2.parameters())
    for m in (unet, te1, te2):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = 100
    curve = log.setdefault("unet_curve", [])
    t0 = time.time()
    ema, step = None, 0
    step = 0
    while step < steps:
        step += 1
        if step == 21 and math.isfinite(deadline):
            # Time budget: fix the total step count from the measured speed once, so the schedule
            # (and hence the weights) depends only on that number: rerun with --steps N to reproduce.
            per_step = (time.time() - t0) / 20
            steps = min(steps, 20 + int(0.93 * (deadline - time.time()) / per_step))
            log["unet_steps_planned"] = steps
            print(f"{per_step:.2f}s/step: planning {steps} steps", flush=True)
        for g in opt.param_groups:  # linear warm-up, then cosine decay to 10% (steps 1-100 never depend on N)
            frac = 0.0 if step <= warmup else (step - warmup) / max(steps - warmup, 1)
            g["lr"] = lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        gen = torch.Generator().manual_seed(step)
        imgs, caps, _ = mw.world_batch(step, batch)
        drop = torch.rand(batch, generator=gen) < 0.1
        with torch.no_grad():
            lat = pipe.vae.encode(to_tensor(imgs)).latent_dist.sample(generator=gen) * scaling
        emb, pooled = encode_text(pipe, caps)
        keep = (~drop).float()
        emb = emb * keep[:, None, None]
        pooled = pooled * keep[:, None]
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": TIME_IDS.repeat(batch, 1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 50 == 0 or step == 1:
            curve.append({"step": step, "loss": loss.item(), "loss_ema": ema, "s": round(time.time() - t0, 1)})
            print(f"unet step {step} loss {float(loss):.4f} ema {ema:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if save_every and out is not None and step % save_every == 0:
            save(pipe, out)  # a usable snapshot if the run is cut short
            log["snapshot_step"] = step
        if time.time() > deadline or (stop_after and step >= stop_after):
            break
    for m in (unet, te1, te2):
        m.eval().requires_grad_(False)
    log["unet_steps"] = step
    log["unet_seconds"] = round(time.time() - t0, 1)
    return step


@torch.no_grad()
def sample_report(pipe, n: int, log: dict, steps: int = 20, guidance: float = 4.0) -> None:
    """Generate world prompts (full captions) and measure every attribute with microworld.analyze."""
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(777)
    scenes = [mw.sample_scene(rng) for _ in range(n)]
    prompts = [mw.caption(s) for s in scenes]
    images = []
    for i in range(0, n, 8):
        out = pipe(prompts[i:i + 8], num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(i), output_type="np").images
        images.extend(out)
    acc: dict[str, list[float]] = {}
    for img, s in zip(images, scenes):
        for k, v in mw.matches_scene(img, s).items():
            acc.setdefault(k, []).append(float(v))
    log["sample_accuracy"] = {k: float(np.mean(v)) for k, v in acc.items()}
    log["sample_settings"] = {"n": n, "steps": steps, "guidance_scale": guidance}
    print("samples:", log["sample_accuracy"], flush=True)
    if log.get("grid_path"):
        from PIL import Image

        grid = np.concatenate([np.concatenate(list(images[r * 8:(r + 1) * 8]), axis=1) for r in range(min(4, n // 8))], axis=0)
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(log["grid_path"])


def save(pipe, out) -> None:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    vocab, merges = build_tiny_tokenizer_files(mw.VOCAB_WORDS)
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tokenizer_files(out / sub, vocab, merges)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/microworld-sdxl")
    p.add_argument("--log", default="benchmarks/micro/pretrain_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000, help="UNet steps (an upper bound when --minutes is given)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--minutes", type=float, default=None, help="total time budget; the VAE gets 15%% of it")
    p.add_argument("--eval_samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save_every", type=int, default=500, help="save a snapshot every N UNet steps (0: only at the end)")
    p.add_argument("--stop_after", type=int, default=None,
                   help="stop the UNet phase after this many steps without changing the schedule of --steps "
                        "(reproduces a run that --minutes cut short: pass its unet_steps_planned and unet_steps)")
    p.add_argument("--decoder_steps", type=int, default=0, help="decoder-only VAE fine-tune steps (encoder frozen)")
    p.add_argument("--decoder_only", default=None, metavar="DIR",
                   help="only run the decoder fine-tune on the saved pipeline DIR and save it back (its log: --log)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.decoder_only:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.decoder_only, subfolder="vae")
        log = {"args": vars(args), "torch": torch.__version__}

        class _P:  # vae_report only needs .vae
            pass

        holder = _P()
        holder.vae = vae
        vae_report(holder, log, key="vae_recon_before_decoder")
        train_decoder(vae, args.decoder_steps, args.vae_batch, args.vae_lr, log)
        vae_report(holder, log, key="vae_recon_after_decoder")
        vae.save_pretrained(Path(args.decoder_only) / "vae", safe_serialization=True)
        Path(args.log).write_text(json.dumps(log, indent=1))
        return 0
    torch.manual_seed(args.seed)
    start = time.time()
    budget = args.minutes * 60 if args.minutes else math.inf
    log: dict = {"args": vars(args), "torch": torch.__version__}
    pipe = mw.build_micro_pipeline(seed=args.seed)
    train_vae(pipe, args.vae_steps, start + 0.15 * budget, args.vae_batch, args.vae_lr, log)
    vae_report(pipe, log)
    pipe.vae.register_to_config(scaling_factor=round(1.0 / log["vae_recon"]["latent_std"], 5))
    log["scaling_factor"] = pipe.vae.config.scaling_factor
    if args.decoder_steps:
        train_decoder(pipe.vae, args.decoder_steps, args.vae_batch, args.vae_lr, log)
        vae_report(pipe, log, key="vae_recon_after_decoder")
    out = Path(args.out)
    train_unet(pipe, args.steps, start + budget, args.batch, args.lr, log, args.save_every, out, args.stop_after)
    save(pipe, out)
    log["grid_path"] = str(Path(args.log).with_name("pretrain_samples.png"))
    sample_report(pipe, args.eval_samples, log)
    log["total_seconds"] = round(time.time() - start, 1)
    log["size_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    Path(args.log).write_text(json.dumps(log, indent=1))
    print(f"saved {out} ({log['size_bytes'] / 1e6:.1f} MB) in {log['total_seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
