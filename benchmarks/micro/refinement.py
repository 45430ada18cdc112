"""The refinement concept set (issue 35, item 2): measure the base model's own rate of drawing each
candidate subject from the class prompt, and pick the set by the rule in benchmarks/micro/README.md
("The refinement set: the rule"), written before this script was first run.

    cd benchmarks/micro
    python refinement.py --model ../../models/microworld-sdxl-v2 --out v2/refinement/rates.json

Writes the rates of every candidate (scorer v2, and v1 beside it), each candidate's ceiling, the
selection the rule makes and the sampled images (``rates_images.npz``, uint8, one array per prompt)
so that a later scorer can rescore them without sampling again (``--rescore``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dreamcoeff.testing import microworld as mw
from dreamcoeff.testing import scorer as sc

HERE = Path(__file__).resolve().parent
TRAIN_BACKGROUND_ORDER = ("blue", "white", "black", "yellow", "red", "green")
BAND, WIDE_BAND, SET_SIZE, MIN_SET = (0.3, 0.7), (0.2, 0.8), 6, 3
TEST_IDENTIFIERS = ("sks", "zwx", "ohwx", "qlv", "vbk")


def candidates() -> list[mw.Concept]:
    """Every flat shape x colour pair but the recombination set's, with the rule's training background
    (identifier and split are placeholders until the selection)."""
    taken = {(c.shape, c.colour) for c in mw.RECOMBINATION_CONCEPTS}
    out = []
    for shape in mw.SHAPES:
        for colour in mw.OBJECT_COLOURS:
            if (shape, colour) in taken:
                continue
            bg = next(b for b in TRAIN_BACKGROUND_ORDER if b != colour)
            out.append(mw.Concept(f"flat-{colour}-{shape}", "mtz", shape, colour, None, "solid", bg, "candidate"))
    return out


def prompt_key(kind: str, shape: str, bg: str) -> str:
    return f"{kind}|{shape}|{bg}"


def sample(pipe, prompt: str, n: int, seed: int, steps: int, guidance: float) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    out = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def rate(images: dict[str, np.ndarray], c: mw.Concept, kind: str, version: str) -> float:
    """Fraction of the concept's prompts' images (its 3 evaluation backgrounds) scored subject right."""
    analyze = sc.analyzer(version)
    backgrounds = [r["background"] for r in c.eval_prompts()[:3]]
    hits = [mw.subject_match(im, c, analyze(im))["subject"] for bg in backgrounds
            for im in images[prompt_key(kind, c.shape, bg)]]  # fmt: skip
    return float(np.mean(hits))


def select(rows: list[dict]) -> dict:
    """The README's rule: rates in [0.3, 0.7] closest to 0.5 first, widened to [0.2, 0.8] for places left;
    ceilings below the threshold not taken; the median-rate concept is the validation concept."""
    ok = [r for r in rows if r["ceiling"] >= sc.CEILING_THRESHOLD]

    def in_band(r: dict, band: tuple[float, float]) -> bool:
        return band[0] <= r["rate"] <= band[1]

    def closest(rs: list[dict]) -> list[dict]:
        return sorted(rs, key=lambda r: (abs(r["rate"] - 0.5), r["name"]))

    chosen = closest([r for r in ok if in_band(r, BAND)])[:SET_SIZE]
    if len(chosen) < SET_SIZE:
        names = {r["name"] for r in chosen}
        chosen += closest([r for r in ok if in_band(r, WIDE_BAND) and r["name"] not in names])[: SET_SIZE - len(chosen)]
    if len(chosen) < MIN_SET:
        return {"made": False, "chosen": [r["name"] for r in chosen], "why": f"fewer than {MIN_SET} qualify"}
    by_rate = sorted(chosen, key=lambda r: (r["rate"], r["name"]))
    validation = by_rate[(len(by_rate) - 1) // 2]  # the (lower) median
    tests = sorted((r for r in chosen if r is not validation), key=lambda r: r["name"])
    return {
        "made": True,
        "validation": {"name": validation["name"], "identifier": "mtz", "rate": validation["rate"]},
        "test": [{"name": r["name"], "identifier": i, "rate": r["rate"]} for r, i in zip(tests, TEST_IDENTIFIERS)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--out", default=str(HERE / "v2" / "refinement" / "rates.json"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rescore", action="store_true", help="recompute rates from the saved images; no sampling")
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="K/N",
        help="sample only every N-th prompt pair from the K-th into its own images file (N processes side by "
        "side); then run once without --shard to merge the files and score",
    )
    args = p.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        p.error(f"--shard {args.shard}: expected K/N with 0 <= K < N")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    npz = out.with_name(out.stem + "_images.npz")
    cands = candidates()
    t0 = time.time()
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    # the images so far, saved after every prompt pair: a stopped run resumes where it ended; the
    # shards' files are read too (every pair's noise is fixed by the pair, so a split changes no image)
    images = {}
    for f in [npz, *sorted(out.parent.glob(out.stem + "_images.shard*.npz"))]:
        if f.is_file():
            images.update(np.load(f))
    own = out.with_name(f"{out.stem}_images.shard{shard}-{shards}.npz") if shards > 1 else npz
    mine = dict(np.load(own)) if shards > 1 and own.is_file() else images
    if args.rescore and not images:
        raise SystemExit(f"--rescore: no saved images at {npz}; run without --rescore first")
    if not args.rescore:
        pairs = sorted({(c.shape, r["background"]) for c in cands for r in c.eval_prompts()[:3]})
        for i, (shape, bg) in list(enumerate(pairs))[shard::shards]:
            if prompt_key("instance", shape, bg) in images:
                continue
            for j, (kind, prompt) in enumerate(
                (("class", f"a {shape} on a {bg} background"), ("instance", f"a mtz {shape} on a {bg} background"))
            ):
                # fixed noise per (shape, background, prompt kind): the class and instance prompts differ in noise
                seed = 1000 * mw.SHAPES.index(shape) + 10 * mw.BACKGROUNDS.index(bg) + j
                images[prompt_key(kind, shape, bg)] = mine[prompt_key(kind, shape, bg)] = sample(
                    pipe, prompt, args.images, seed, args.inference_steps, args.guidance
                )
            np.savez_compressed(own, **mine)
            print(f"[refinement] {i + 1}/{len(pairs)} {shape} on {bg} ({time.time() - t0:.0f} s)", flush=True)
    if shards > 1:
        print(f"[refinement] shard {args.shard} done; run without --shard to merge the shards and score", flush=True)
        return 0
    missing = [c.name for c in cands if any(prompt_key(k, c.shape, r["background"]) not in images
                                             for k in ("class", "instance") for r in c.eval_prompts()[:3])]  # fmt: skip
    if missing:
        raise SystemExit(f"no saved images for {missing}: rerun without --rescore (or finish the shards)")
    np.savez_compressed(npz, **images)  # the merged images, one file
    rows = []
    for c in cands:
        ceil = sc.concept_ceiling(pipe.vae, c, "v2")
        rows.append({
            "name": c.name, "shape": c.shape, "colour": c.colour, "train_background": c.train_background,
            "eval_backgrounds": [r["background"] for r in c.eval_prompts()[:3]],
            "rate": rate(images, c, "class", "v2"), "rate_v1": rate(images, c, "class", "v1"),
            "instance_prompt_rate": rate(images, c, "instance", "v2"), "ceiling": ceil["ceiling"],
        })  # fmt: skip
    result = {
        "scorer": "v2",
        "command": "python refinement.py --model " + args.model + (" --rescore" if args.rescore else ""),
        "model": Path(args.model).name,
        "sampling": {
            "images_per_prompt": args.images,
            "inference_steps": args.inference_steps,
            "guidance": args.guidance,
            "threads": args.threads,
        },  # fmt: skip
        "rule": "benchmarks/micro/README.md, 'The refinement set: the rule'",
        "seconds": round(time.time() - t0, 1),
        "candidates": sorted(rows, key=lambda r: -r["rate"]),
        "selection": select(rows),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["candidates"]:
        print(f"{r['name']:24s} rate {r['rate']:.2f} (v1 {r['rate_v1']:.2f}) instance {r['instance_prompt_rate']:.2f} "
              f"ceiling {r['ceiling']:.2f}")  # fmt: skip
    print(json.dumps(result["selection"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
