"""The puzzle of issue 19: alpha fits the training images almost as well as LoRA, yet its samples show
none of the concept. Is it learning the training images' colours *globally* (prompt- and
place-independent), not bound to the object?

    python benchmarks/micro/puzzle.py --model models/microworld-sdxl-v2 --out benchmarks/micro/puzzle/v2
    python benchmarks/micro/puzzle.py --model models/microworld-sdxl    --out benchmarks/micro/puzzle/v1

On the recombination set's *validation* concept (so nothing here is chosen by looking at test
concepts), alpha and LoRA r4 are trained through the real trainer (500 steps, seed 0, the v1
protocol), then four measurements, each on exact world masks:

1. ``loss``: epsilon-prediction MSE by timestep band (5 bands of 200) and by region (object /
   background, the object's mask at latent resolution; boundary cells left out), on the 5 training
   images with the training prompt, and on the concept drawn on 3 *new* backgrounds with the
   prompt that asks for them. Fixed noise and timesteps, the same for every model. A method that
   binds the concept to the object lowers the object's loss on the new backgrounds too; one that
   learned the training colours globally raises the new backgrounds' loss.
2. ``strength``: alpha's run-time strength c in 0 .. 4 on the concept's evaluation prompts: subject
   fidelity, requested background, background copying, and the mean colour of the object and of
   the background (is the concept's colour painted everywhere?).
3. ``heads``: every head's attention at t = 400 on the noised training images, base model. Cross
   attention: how much more the object's pixels attend to the identifier's token(s) than the
   background's (selectivity); self attention: how much more of an object pixel's attention stays
   on the object than the object's share of the image. Then the same numbers for the maps alpha
   mixes (A = I + alpha): did alpha route the heads towards the object-selective ones?
4. ``alpha``: the structure of each learned alpha: the share of its energy on the diagonal (a
   per-head gain of the head's own map), in constant rows (head h reads the *average* of all maps:
   spatially unselective), and the rest; and the row sums (sum_i A[h, i], each head's output gain).

Writes ``puzzle.json`` and a summary ``PUZZLE.md`` under --out. About 10 minutes per model on one core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import run_bench as RB
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline

from dreamcoeff import load_run, set_coeff_scale
from dreamcoeff.processor import coeff_modules
from dreamcoeff.testing import microworld as mw

HERE = Path(__file__).resolve().parent
CONCEPT = "val-flat-orange-circle"
BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))
STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
HEAD_T = 400


def pipeline(model: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    return embeds, pooled


@torch.no_grad()
def latents_of(pipe, images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


def object_cover(scenes: list[mw.Scene], size: int) -> torch.Tensor:
    """The object's share of each cell of a size x size grid (B x size x size)."""
    m = np.stack([mw.shape_mask(s.shape, *s.center, s.radius) for s in scenes]).astype(np.float32)
    return F.adaptive_avg_pool2d(torch.from_numpy(m)[:, None], size)[:, 0]


def object_masks(scenes: list[mw.Scene], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(object, background) boolean masks at latent resolution: a cell is object where the object
    covers more than half of it, background where it covers nothing (boundary cells in neither)."""
    cover = object_cover(scenes, size)
    return cover > 0.5, cover == 0.0


def probe_set(c: mw.Concept) -> dict[str, tuple[list[mw.Scene], list[str]]]:
    """The training scenes with the training prompt, and the same layouts on 3 new backgrounds."""
    train = c.instance_scenes()
    new = []
    for req in c.eval_prompts()[:3]:
        new += [c.scene(s.size, s.position, req["background"], s.dx, s.dy) for s in train[:3]]
    new_prompts = [f"a {c.token} on a {s.background} background" for s in new]
    return {"train": (train, [c.instance_prompt] * len(train)), "new_background": (new, new_prompts)}


@torch.no_grad()
def band_losses(pipe, scenes: list[mw.Scene], prompts: list[str], noises: int = 2, per_band: int = 3) -> dict:
    """Epsilon MSE per timestep band and region, at fixed (noise, timestep) pairs (seeded, no offset)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    lat = latents_of(pipe, [mw.render(s) for s in scenes])
    obj, bg = object_masks(scenes, lat.shape[-1])
    embeds, pooled = encode(pipe, prompts)
    time_ids = torch.tensor([[mw.RES, mw.RES, 0, 0, mw.RES, mw.RES]] * len(scenes), dtype=torch.float32)
    g = torch.Generator().manual_seed(1234)
    out = {}
    for lo, hi in BANDS:
        err_obj, err_bg = [], []
        for t in np.linspace(lo, hi - 1, per_band).round().astype(int):
            for _ in range(noises):
                noise = torch.randn(lat.shape, generator=g)
                ts = torch.full((len(scenes),), int(t), dtype=torch.long)
                pred = pipe.unet(
                    sched.add_noise(lat, noise, ts),
                    ts,
                    embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                ).sample
                e = ((pred - noise) ** 2).mean(1)  # B x h x w
                err_obj.append(e[obj].mean().item())
                err_bg.append(e[bg].mean().item())
        out[f"{lo}-{hi}"] = {"object": float(np.mean(err_obj)), "background": float(np.mean(err_bg))}
    return out


def colour_stats(images: list[np.ndarray], c: mw.Concept) -> dict:
    """Mean RGB of the detected object and of the background, and the share of background pixels
    within 60 (RGB distance) of the concept's colour: is the concept's colour painted everywhere?"""
    target = np.array(mw.COLOURS[c.colour], np.float32)
    obj_rgb, bg_rgb, bg_near = [], [], []
    for im in images:
        if im.dtype != np.uint8:  # the pipeline's "np" output is float in [0, 1]
            im = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        x = im.astype(np.float32)
        near = np.linalg.norm(x - target, axis=-1) < 60
        bg_name, _ = mw.estimate_background(im)
        if bg_name not in mw.COLOURS:  # no background found, or a patterned one: whole image
            bg_near.append(float(near.mean()))
            continue
        mask = np.linalg.norm(x - np.array(mw.COLOURS[bg_name], np.float32), axis=-1) > 60  # not background
        if mask.any():
            obj_rgb.append(x[mask].mean(0))
        bg_rgb.append(x[~mask].mean(0))
        bg_near.append(float(near[~mask].mean()))
    return {
        "object_rgb": [round(float(v), 1) for v in np.mean(obj_rgb, 0)] if obj_rgb else None,
        "background_rgb": [round(float(v), 1) for v in np.mean(bg_rgb, 0)] if bg_rgb else None,
        "background_near_concept_colour": float(np.mean(bg_near)),
    }


def strength_sweep(pipe, run: Path, c: mw.Concept, images: int) -> list[dict]:
    load_run(pipe, run)
    rows = []
    for s in STRENGTHS:
        set_coeff_scale(pipe, s)
        scores, imgs = RB.evaluate_concept(pipe, c, 0, images, 20, 4.0)
        rows.append({"strength": s, **scores, **colour_stats(imgs, c)})
        print(f"[strength] c={s}: subject {scores['subject']:.2f} background {scores['background']:.2f}", flush=True)
    set_coeff_scale(pipe, 1.0)
    return rows


def identifier_positions(pipe, prompt: str, identifier: str) -> list[int]:
    """Token positions of the identifier's pieces in the (first) tokenizer's ids for `prompt`."""
    tok = pipe.tokenizer
    ids = tok(prompt).input_ids
    pieces = tok(identifier, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(pieces) + 1):
        if ids[i : i + len(pieces)] == pieces:
            return list(range(i, i + len(pieces)))
    raise ValueError(f"identifier {identifier!r} not found in {prompt!r}")


@torch.no_grad()
def head_maps(pipe, scenes: list[mw.Scene], prompt: str, t: int) -> dict[str, torch.Tensor]:
    """Every coeff layer's per-head attention probabilities (B x H x N x L) at timestep t on the
    noised scenes, captured inside the processor (which must hold alpha = 0 or be the base)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    lat = latents_of(pipe, [mw.render(s) for s in scenes])
    embeds, pooled = encode(pipe, [prompt] * len(scenes))
    time_ids = torch.tensor([[mw.RES, mw.RES, 0, 0, mw.RES, mw.RES]] * len(scenes), dtype=torch.float32)
    maps: dict[str, torch.Tensor] = {}
    for name, module in coeff_modules(pipe.unet).items():
        proc = module.processor

        def capture(q, k, v, mask, scale, strength, _name=name, _orig=proc.attend):
            maps[_name] = (q @ k.transpose(-1, -2) * scale).softmax(-1)
            return _orig(q, k, v, mask, scale, strength)

        proc.attend = capture
    try:
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(99))
        ts = torch.full((len(scenes),), t, dtype=torch.long)
        pipe.unet(
            sched.add_noise(lat, noise, ts), ts, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        )
    finally:
        for module in coeff_modules(pipe.unet).values():
            del module.processor.attend  # back to the class method
    return maps


def selectivity(p: torch.Tensor, cover: torch.Tensor, token_pos: list[int] | None) -> torch.Tensor:
    """Per head (H), with `cover` (B x h x w) the object's share of each attention cell (soft, so the
    4 x 4 levels count too). Cross attention (token_pos given): mean attention on the identifier's
    tokens from object pixels minus from background pixels. Self attention: the attention an object
    pixel keeps on the object minus the object's share of the image (0 = no preference)."""
    B, H, N, L = p.shape
    w = cover.reshape(B, 1, N).to(p.dtype)
    if token_pos is not None:
        on_id = p[..., token_pos].sum(-1)  # B x H x N
        from_obj = (on_id * w).sum((0, 2)) / w.sum()
        from_bg = (on_id * (1 - w)).sum((0, 2)) / (1 - w).sum()
        return from_obj - from_bg
    kept = torch.einsum("bhnl,bl->bhn", p, w[:, 0])  # attention of each query on the object
    return (kept * w).sum((0, 2)) / w.sum() - w.mean()


def head_analysis(pipe, run: Path, c: mw.Concept) -> dict:
    """Selectivity of the base heads and of alpha's mixed maps, per layer (cross / self)."""
    scenes = c.instance_scenes()
    pos = identifier_positions(pipe, c.instance_prompt, c.identifier)
    load_run(pipe, run)
    alphas = {n: m.head_mix.alpha.detach().clone() for n, m in coeff_modules(pipe.unet).items()}
    set_coeff_scale(pipe, 0.0)  # capture the base model's maps
    maps = head_maps(pipe, scenes, c.instance_prompt, HEAD_T)
    set_coeff_scale(pipe, 1.0)
    layers = []
    for name, p in maps.items():
        H, N = p.shape[1], p.shape[2]
        side = int(round(N**0.5))
        cover = object_cover(scenes, side)
        cross = name.endswith("attn2")
        sel = selectivity(p, cover, pos if cross else None)
        A = torch.eye(H) + alphas[name]
        mixed = torch.einsum("hi,binl->bhnl", A, p)
        sel_mixed = selectivity(mixed, cover, pos if cross else None)
        a = alphas[name]
        energy = float((a**2).sum()) or 1e-30
        diag = float((torch.diag(a) ** 2).sum()) / energy
        rowc = float((a.mean(1, keepdim=True).expand_as(a) ** 2).sum()) / energy
        layers.append(
            {
                "layer": name,
                "kind": "cross" if cross else "self",
                "heads": H,
                "tokens": N,
                "alpha_norm": float(a.norm()),
                "diag_share": diag,
                "row_constant_share": rowc,
                "row_sum_minus_1_abs_mean": float((A.sum(1) - 1).abs().mean()),
                "selectivity_base": [round(float(v), 4) for v in sel],
                "selectivity_mixed": [round(float(v), 4) for v in sel_mixed],
                "best_head_base": float(sel.max()),
                "mean_base": float(sel.mean()),
                "mean_mixed": float(sel_mixed.mean()),
                # correlation between how much head h gains (row sum) and how selective its own map is
                "weight_on_selective": float((A * sel[None, :]).sum(1).mean() / A.sum(1).mean()),
            }
        )
    return {"identifier_positions": pos, "t": HEAD_T, "layers": layers}


def summarise(res: dict) -> str:
    lines = [f"# The puzzle on {res['model']}: concept {res['concept']}", ""]
    lines += ["## Loss by timestep band and region (epsilon MSE; lower is better)", ""]
    for probe in ("train", "new_background"):
        lines += [f"### {probe}", "", "| band | region | base | alpha | LoRA | alpha gain | LoRA gain |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for band in res["loss"]["base"][probe]:
            for region in ("object", "background"):
                b, a, l = (res["loss"][m][probe][band][region] for m in ("base", "coeff", "lora"))
                lines.append(
                    f"| {band} | {region} | {b:.3f} | {a:.3f} | {l:.3f} | {1 - a / b:+.1%} | {1 - l / b:+.1%} |"
                )
        lines.append("")
    lines += ["## alpha's run-time strength", "", "| c | subject | subject (train prompt) | background | bg_copy | object RGB | background RGB | bg near concept colour |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["strength"]:
        lines.append(f"| {r['strength']} | {r['subject']:.2f} | {r['subject_train']:.2f} | {r['background']:.2f} | "
                     f"{r['bg_copy']:.2f} | {r['object_rgb']} | {r['background_rgb']} | {r['background_near_concept_colour']:.2f} |")  # fmt: skip
    lines += ["", "## Heads (t = 400, base maps on the training images) and alpha's mixing", ""]
    lines += ["| layer | kind | H | best head sel. | mean sel. base | mean sel. mixed | weight on selective | alpha norm | diag share | row-const share | mean abs(row sum - 1) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["heads"]["layers"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['heads']} | {r['best_head_base']:.3f} | {r['mean_base']:.3f} | "
                     f"{r['mean_mixed']:.3f} | {r['weight_on_selective']:.3f} | {r['alpha_norm']:.3f} | {r['diag_share']:.2f} | "
                     f"{r['row_constant_share']:.2f} | {r['row_sum_minus_1_abs_mean']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--out", required=True)
    p.add_argument("--coeff_lr", type=float, default=1e-3)
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--coeff_flags", default="", help="extra trainer flags for alpha's run, e.g. --coeff_zero_row_sum")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = mw.concept(CONCEPT)
    t0 = time.time()
    res = {"model": args.model, "concept": CONCEPT, "steps": args.steps, "coeff_lr": args.coeff_lr,
           "coeff_flags": args.coeff_flags, "lora_lr": args.lora_lr, "loss": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="puzzle-") as tmp:
        work = Path(tmp)
        inst = RB.write_instances(c, work / "inst")
        runs = {}
        for method, lr in (("coeff", args.coeff_lr), ("lora", args.lora_lr)):
            runs[method] = work / method
            extra = tuple(args.coeff_flags.split()) if method == "coeff" else ()
            RB.train(args.model, c, method, lr, 0, args.steps, runs[method], inst, 0.1, extra)
            print(f"[train] {method} done at {time.time() - t0:.0f} s", flush=True)
        probes = probe_set(c)
        for method in ("base", "coeff", "lora"):
            pipe = pipeline(args.model)
            if method != "base":
                load_run(pipe, runs[method])
            res["loss"][method] = {k: band_losses(pipe, *v) for k, v in probes.items()}
            print(f"[loss] {method} done at {time.time() - t0:.0f} s", flush=True)
        res["strength"] = strength_sweep(pipeline(args.model), runs["coeff"], c, args.images)
        res["heads"] = head_analysis(pipeline(args.model), runs["coeff"], c)
    res["seconds"] = round(time.time() - t0)
    (out / "puzzle.json").write_text(json.dumps(res, indent=1))
    (out / "PUZZLE.md").write_text(summarise(res))
    print(summarise(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
