"""Pretrain the micro-world SDXL pipeline on the CPU (issue 6, part 2).

    python benchmarks/micro/pretrain.py --out models/microworld-sdxl   # the shipped model's settings

What it does, in order (float32, fully seeded, a fixed number of steps):

1. builds the micro pipeline of ``microworld.build_micro_pipeline``: SDXL's architecture in miniature
   (two CLIP text encoders, a tokenizer that knows every world word as one token, a UNet with self-
   and cross-attention and ``text_time`` conditioning) with a VAE that downsamples by 4;
2. trains the VAE on world images (L1 + MSE reconstruction, tiny KL; warm-up then cosine decay),
   then sets ``scaling_factor`` to 1 / std of the latents of world images, as SDXL's 0.13025 does
   for its VAE;
3. trains the UNet *and both text encoders* with SDXL's epsilon loss on freshly generated world
   images (a new seeded batch each step: the data is free), dropping 10% of captions to the zero
   embedding that ``force_zeros_for_empty_prompt`` uses for classifier-free guidance, with *offset
   noise* (``--noise_offset``: a random constant per latent channel added to the noise, as SDXL's
   own pretraining did with 0.0357). Without it the model learns to read the background colour
   from the image mean that SDXL's schedule leaves in the noisiest latents (sqrt(alpha_bar) = 0.07
   at t = 999, against a per-channel noise mean of std 1/16 on 16x16 latents) instead of from the
   caption, and sampling, which starts from pure noise, then ignores the caption's background.
   Measured (600 extra steps on the previous 4000-step model, 64 world captions each): background
   right 0.33 -> 0.56, colour 0.33 -> 0.59 with offset 0.1, against 0.33 / 0.33 without;
4. saves the diffusers folder and a ``pretrain_log.json`` (loss curves, timings, the VAE's
   reconstruction checks, the attributes ``microworld.analyze`` measures on generated samples, and
   the sha256 of every weight file).

Reproducing: the same command with the same ``--threads`` on the same torch build gives the same
weights bit for bit; ``--check_against benchmarks/micro/pretrain_log.json`` compares the hashes at
the end and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dreamcoeff.testing import microworld as mw
from dreamcoeff.testing.tiny import build_tiny_tokenizer_files, tiny_scheduler_config, write_tokenizer_files

TIME_IDS = torch.tensor([[mw.RES, mw.RES, 0, 0, mw.RES, mw.RES]], dtype=torch.float32)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding (differentiable): penultimate states of both encoders + pooled projection."""
    hidden = []
    pooled = None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        res = enc(ids, output_hidden_states=True)
        pooled = res[0]
        hidden.append(res.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def train_vae(pipe, steps: int, batch: int, lr: float, log: dict) -> int:
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    curve = log.setdefault("vae_curve", [])
    t0 = time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * warmup_cosine(step, steps, warmup=50)
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
            print(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval().requires_grad_(False)
    log["vae_steps"] = steps
    log["vae_seconds"] = round(time.time() - t0, 1)
    return steps


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    frac = 0.0 if step <= warmup else (step - warmup) / max(steps - warmup, 1)
    return min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@torch.no_grad()
def vae_report(pipe, log: dict, key: str = "vae_recon") -> None:
    """Reconstruction error (mean |.| in 0-255 units) and exact-metric recovery through the VAE."""
    vae = pipe.vae
    imgs, _, scenes = mw.world_batch(123_456, 64)
    rec = (vae.decode(vae.encode(to_tensor(imgs)).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5
    rec = rec.round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    ok = [all(mw.matches_scene(r, s).values()) for r, s in zip(rec, scenes)]
    inst = [(c, s) for c in mw.CONCEPTS for s in c.instance_scenes()]
    cimgs = np.stack([mw.render(s) for _, s in inst])
    crec = (vae.decode(vae.encode(to_tensor(cimgs)).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5
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


def save_state(path: Path, step: int, pipe, opt, log: dict) -> None:
    """Everything a later part needs to continue bit for bit: weights, optimizer, step, log so far."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "step": step,
            "unet": pipe.unet.state_dict(),
            "te1": pipe.text_encoder.state_dict(),
            "te2": pipe.text_encoder_2.state_dict(),
            "opt": opt.state_dict(),
            "log": log,
        },
        tmp,
    )
    tmp.replace(path)  # a kill mid-write leaves the previous state intact
    print(f"state at step {step} -> {path}", flush=True)


def drop_colour_words(caps: list[str], scenes, seed: int, prob: float, counts: dict | None = None) -> list[str]:
    """The captions with "<colour> <shape>" replaced by "<shape>" in a `prob` share of them, drawn from
    ``numpy.random.default_rng(10_000_000 + seed)`` (its own stream: the world batch's draws are unchanged).

    A base model trained on such captions draws a spread of colours for the class prompt ("a circle on a
    blue background") instead of none or one; `counts` (if given) accumulates ``captions`` / ``dropped``.
    """
    rng = np.random.default_rng(10_000_000 + seed)
    out = [c.replace(f"{s.colour} {s.shape}", s.shape) if rng.random() < prob else c for c, s in zip(caps, scenes)]
    if counts is not None:
        counts["captions"] = counts.get("captions", 0) + len(caps)
        counts["dropped"] = counts.get("dropped", 0) + sum(a != b for a, b in zip(out, caps))
    return out


def train_unet(
    pipe,
    steps: int,
    batch: int,
    lr: float,
    log: dict,
    save_every: int = 0,
    out: Path | None = None,
    noise_offset: float = 0.0,
    state_path: Path | None = None,
    stop_after: int | None = None,
    colour_drop: float = 0.0,
) -> int:
    """UNet + text-encoder pretraining; with `state_path`, resumable in parts: it continues from the
    state saved there (if any), saves it every `save_every` steps, and ends early after `stop_after`.
    With `colour_drop` > 0 the colour word is left out of that share of the captions
    (:func:`drop_colour_words`; counted in ``log["colour_drop_counts"]``). Returns the last step done."""
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    sched = DDPMScheduler(
        **{k: v for k, v in tiny_scheduler_config().items() if k not in ("interpolation_type", "use_karras_sigmas")}
    )
    scaling = pipe.vae.config.scaling_factor
    params = list(unet.parameters()) + list(te1.parameters()) + list(te2.parameters())
    for m in (unet, te1, te2):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    curve = log.setdefault("unet_curve", [])
    t0 = time.time()
    ema, first = None, 1
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        te1.load_state_dict(state["te1"])
        te2.load_state_dict(state["te2"])
        opt.load_state_dict(state["opt"])
        first = state["step"] + 1
        curve[:] = state["log"].get("unet_curve", [])
        if "colour_drop_counts" in state["log"]:  # the steps before the stop count too
            log["colour_drop_counts"] = dict(state["log"]["colour_drop_counts"])
        ema = curve[-1]["loss_ema"] if curve else None
        t0 -= state["log"].get("unet_seconds_so_far", 0.0)
        print(f"resuming from {state_path} at step {first}", flush=True)
    step = first - 1
    for step in range(first, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * warmup_cosine(step, steps, warmup=100)
        gen = torch.Generator().manual_seed(step)
        imgs, caps, scenes = mw.world_batch(step, batch)
        if colour_drop:
            caps = drop_colour_words(caps, scenes, step, colour_drop, log.setdefault("colour_drop_counts", {}))
        drop = torch.rand(batch, generator=gen) < 0.1
        with torch.no_grad():
            lat = pipe.vae.encode(to_tensor(imgs)).latent_dist.sample(generator=gen) * scaling
        emb, pooled = encode_text(pipe, caps)
        keep = (~drop).float()
        emb = emb * keep[:, None, None]
        pooled = pooled * keep[:, None]
        noise = torch.randn(lat.shape, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(lat.shape[:2] + (1, 1), generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(
            noisy, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": TIME_IDS.repeat(batch, 1)}
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            curve.append({"step": step, "loss": loss.item(), "loss_ema": ema, "s": round(time.time() - t0, 1)})
            print(
                f"unet step {step}/{steps} loss {loss.item():.4f} ema {ema:.4f} ({time.time() - t0:.0f}s)", flush=True
            )
        if save_every and out is not None and step % save_every == 0:
            save(pipe, out)  # a usable snapshot if the run is cut short
            log["snapshot_step"] = step
            if state_path is not None:
                log["unet_seconds_so_far"] = round(time.time() - t0, 1)
                save_state(state_path, step, pipe, opt, log)
        if stop_after is not None and step >= stop_after and step < steps:
            if state_path is not None:
                log["unet_seconds_so_far"] = round(time.time() - t0, 1)
                save_state(state_path, step, pipe, opt, log)
            return step
    for m in (unet, te1, te2):
        m.eval().requires_grad_(False)
    log.pop("unet_seconds_so_far", None)
    log["unet_steps"] = steps
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
        out = pipe(
            prompts[i : i + 8],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
        ).images
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

        grid = np.concatenate(
            [np.concatenate(list(images[r * 8 : (r + 1) * 8]), axis=1) for r in range(min(4, n // 8))], axis=0
        )
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(log["grid_path"])


def save(pipe, out) -> None:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    vocab, merges = build_tiny_tokenizer_files(mw.VOCAB_WORDS)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(out / sub, vocab, merges)


def weight_hashes(out: Path) -> dict[str, str]:
    """sha256 of every weight file of a saved pipeline, by path relative to it."""
    return {
        str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*.safetensors"))
    }


def load_pipeline(model: str | Path):
    """A saved micro-world pipeline folder, with a clear error when it is not one."""
    from diffusers import StableDiffusionXLPipeline

    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"{model}: not a pipeline folder (no model_index.json); pass the folder pretrain.py wrote, "
            "e.g. models/microworld-sdxl-v2"
        )
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def continue_pretraining(
    model: str | Path,
    steps: int,
    colour_drop: float,
    log: dict,
    lr: float = 3e-4,
    batch: int = 32,
    noise_offset: float = 0.1,
    **train_kw,
):
    """Load the pipeline at `model` and continue its UNet + text-encoder pretraining for `steps` steps
    (train_unet: same loss, offset noise, warm-up + cosine schedule; the VAE stays frozen) with the
    colour word dropped from a `colour_drop` share of the captions. Returns the pipeline (not saved);
    records the source folder's weight hashes in ``log["continued_from_sha256"]``.

    Used by ``--continue_from`` (the v2r model of the refinement set) and probe_colour_dropout.py.
    """
    pipe = load_pipeline(model)
    log["continued_from"] = str(model)
    log["continued_from_sha256"] = weight_hashes(Path(model))
    done = train_unet(pipe, steps, batch, lr, log, noise_offset=noise_offset, colour_drop=colour_drop, **train_kw)
    return pipe, done


@torch.no_grad()
def class_prompt_colours(pipe, n_per_prompt: int = 4, steps: int = 20, guidance: float = 4.0) -> dict:
    """{shape: {colours drawn: count}} of the objects sampled for 'a <shape> on a <bg> background' on 4
    backgrounds (microworld.analyze; "no object" when none is found). Noise seed 10_000 * 0 + prompt
    index, as run_bench.generate."""
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for shape in mw.SHAPES:
        prompts = [f"a {shape} on a {bg} background" for bg in ("blue", "green", "white", "black")]
        found = []
        for i, prompt in enumerate(prompts):
            images = pipe(
                [prompt] * n_per_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(i),
                output_type="np",
            ).images
            found += [mw.analyze(im) for im in images]
        counts: dict[str, int] = {}
        for a in found:
            key = "+".join(a["colours"]) if a["object"] else "no object"
            counts[key] = counts.get(key, 0) + 1
        out[shape] = counts
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/microworld-sdxl")
    p.add_argument("--log", default="benchmarks/micro/pretrain_log.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1200)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000, help="UNet (+ text encoder) steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--noise_offset",
        type=float,
        default=0.1,
        help="offset noise (a random per-channel constant added to the noise), as SDXL's own pretraining used",
    )
    p.add_argument("--eval_samples", type=int, default=64)
    p.add_argument(
        "--threads", type=int, default=2, help="intra-op CPU threads (part of what makes a run reproducible)"
    )
    p.add_argument(
        "--save_every", type=int, default=500, help="save a snapshot every N UNet steps (0: only at the end)"
    )
    p.add_argument(
        "--model_version",
        default="v1",
        choices=mw.MICRO_MODEL_VERSIONS,
        help="v1: 4 / 8 heads (the shipped models/microworld-sdxl); v2: SDXL's 10 / 20 heads",
    )
    p.add_argument(
        "--vae_from",
        default=None,
        metavar="DIR",
        help="reuse the trained VAE (and its scaling factor) of this pipeline folder instead of training one",
    )
    p.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="resumable parts: continue from this state file if it exists, and save it every --save_every steps",
    )
    p.add_argument(
        "--stop_after",
        type=int,
        default=None,
        metavar="STEP",
        help="end this part after UNet step STEP (with --state; rerun the same command to continue)",
    )
    p.add_argument(
        "--continue_from",
        default=None,
        metavar="DIR",
        help="continue this pipeline folder's UNet + text-encoder pretraining for --steps steps (peak rate --lr) "
        "instead of building and pretraining a new one; the VAE is kept frozen",
    )
    p.add_argument(
        "--colour_drop",
        type=float,
        default=0.0,
        metavar="P",
        help="leave the colour word out of this share of the UNet captions ('a circle on a blue background'), "
        "so that the class prompt draws a spread of colours (0.3 for models/microworld-sdxl-v2r)",
    )
    p.add_argument(
        "--class_colours",
        type=int,
        default=0,
        metavar="N",
        help="log the colours drawn for each shape's class prompt on 4 backgrounds, N images each (0: skip; "
        "4 for models/microworld-sdxl-v2r)",
    )
    p.add_argument(
        "--check_against",
        default=None,
        metavar="LOG",
        help="a pretrain_log.json to compare the weight hashes with at the end (exit 1 on a difference)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.colour_drop <= 1.0:
        p.error(f"--colour_drop {args.colour_drop}: a share of the captions, between 0 and 1")
    if args.continue_from and args.vae_from:
        p.error("--continue_from keeps the folder's own VAE: leave out --vae_from")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    log: dict = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)
    state = Path(args.state) if args.state else None
    train_kw = {"save_every": args.save_every, "out": out, "state_path": state, "stop_after": args.stop_after}
    if args.continue_from:
        pipe, done = continue_pretraining(
            args.continue_from, args.steps, args.colour_drop, log, args.lr, args.batch, args.noise_offset, **train_kw
        )
        return finish(pipe, args, log, out, start, done)
    pipe = mw.build_micro_pipeline(seed=args.seed, version=args.model_version)
    if args.vae_from:
        from diffusers import AutoencoderKL

        trained = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae")
        pipe.vae.load_state_dict(trained.state_dict())
        pipe.vae.register_to_config(scaling_factor=trained.config.scaling_factor)
        log["vae_sha256"] = hashlib.sha256(
            (Path(args.vae_from) / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
        ).hexdigest()
        vae_report(pipe, log)
    else:
        train_vae(pipe, args.vae_steps, args.vae_batch, args.vae_lr, log)
        vae_report(pipe, log)
        pipe.vae.register_to_config(scaling_factor=round(1.0 / log["vae_recon"]["latent_std"], 5))
    log["scaling_factor"] = pipe.vae.config.scaling_factor
    done = train_unet(
        pipe,
        args.steps,
        args.batch,
        args.lr,
        log,
        noise_offset=args.noise_offset,
        colour_drop=args.colour_drop,
        **train_kw,
    )
    return finish(pipe, args, log, out, start, done)


def finish(pipe, args, log: dict, out: Path, start: float, done: int) -> int:
    """Save the pipeline, its hashes, the sample reports and the log; after a part (`done` < --steps),
    only say so (the state file holds the rest)."""
    if done < args.steps:
        print(f"part done at step {done} of {args.steps}; rerun the same command to continue", flush=True)
        return 0
    save(pipe, out)
    log["weights_sha256"] = weight_hashes(out)
    log["grid_path"] = str(Path(args.log).with_name("pretrain_samples.png"))
    if args.eval_samples:
        sample_report(pipe, args.eval_samples, log)
    if args.class_colours:
        log["class_prompt_colours"] = class_prompt_colours(pipe, args.class_colours)
        print("class prompts:", log["class_prompt_colours"], flush=True)
    log["total_seconds"] = round(time.time() - start, 1)
    log["size_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    Path(args.log).write_text(json.dumps(log, indent=1))
    print(f"saved {out} ({log['size_bytes'] / 1e6:.1f} MB) in {log['total_seconds']:.0f}s", flush=True)
    if args.check_against:
        expected = json.loads(Path(args.check_against).read_text())["weights_sha256"]
        if expected != log["weights_sha256"]:
            differ = sorted(
                k for k in set(expected) | set(log["weights_sha256"]) if expected.get(k) != log["weights_sha256"].get(k)
            )
            print(f"NOT reproduced: {', '.join(differ)} differ from {args.check_against}", flush=True)
            return 1
        print(f"reproduced: every weight file matches {args.check_against}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
