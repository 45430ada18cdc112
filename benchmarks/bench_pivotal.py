"""Learned tokens (pivotal tuning): trainable parameters per mode on SDXL, and what a token step costs.

    python benchmarks/bench_pivotal.py [--steps 40] [--threads 1] [--json out.json]

1. Trainable parameters of every `--tuning` with and without `--train_text_encoder_ti` (2 new
   tokens) on SDXL base's real UNet config, counted on the meta device (nothing is allocated or
   downloaded): alpha on attn1 + attn2, PEFT LoRA rank 4 on to_q/k/v/out.0, the whole UNet, and the
   tokens' rows in both encoders (768 + 1280 numbers each).
2. The step time of a training step while tokens train (captions encoded through both text
   encoders with gradients) against a step with frozen, cached prompt embeddings, measured with the
   real trainer's step on the shipped micro-world model (alpha + tokens), the two kinds alternating
   in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "models" / "microworld-sdxl"
TOKENS = 2


def count_sdxl_parameters() -> dict[str, int]:
    """Trainable numbers per mode on SDXL base (meta device)."""
    from diffusers import UNet2DConditionModel

    from dreamcoeff import apply_coeff, coeff_parameters
    from dreamcoeff.lora import add_lora
    from dreamcoeff.testing.sdxl import SDXL_TEXT_ENCODER_WIDTHS, sdxl_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    full = sum(p.numel() for p in unet.parameters())
    apply_coeff(unet)
    alpha = sum(p.numel() for p in coeff_parameters(unet))
    unet.requires_grad_(False)
    with torch.device("meta"):
        add_lora(unet, rank=4)
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    tokens = TOKENS * sum(SDXL_TEXT_ENCODER_WIDTHS)
    modes = {"coeff": alpha, "lora": lora, "coeff+lora": alpha + lora, "full": full, "none": 0}
    counts = {}
    for mode, n in modes.items():
        if mode != "none":
            counts[mode] = n
        counts[f"{mode}+tokens" if mode != "none" else "tokens only (--tuning none)"] = n + tokens
    return counts


def token_step_ratio(steps: int, threads: int) -> dict[str, float]:
    """Median step time with tokens training vs with them frozen, in one trainer run."""
    from dreamcoeff.testing import microworld as mw
    from dreamcoeff.train.config import parse_args
    from dreamcoeff.train.loop import Trainer

    torch.set_num_threads(threads)
    concept = mw.concept("flat-yellow-circle")
    with tempfile.TemporaryDirectory(prefix="bench-pivotal-") as tmp:
        inst = Path(tmp) / "inst"
        inst.mkdir()
        from PIL import Image

        for i, scene in enumerate(concept.instance_scenes()):
            Image.fromarray(mw.render(scene)).save(inst / f"{i}.png")
        cfg = parse_args([
            "--pretrained_model_name_or_path", str(MODEL), "--instance_dir", str(inst),
            "--instance_prompt", concept.instance_prompt, "--resolution", str(mw.RES),
            "--output_dir", str(Path(tmp) / "out"), "--report_to", "none", "--checkpointing_steps", "0",
            "--tuning", "coeff", "--train_text_encoder_ti", "--token_abstraction", concept.identifier,
            "--max_train_steps", str(2 * steps),
        ])  # fmt: skip
        trainer = Trainer(cfg)
        trainer.preflight()
        trainer.build_accelerator()
        trainer.build_models()
        trainer.build_data()
        trainer.build_optimizer()
        trainer.prepare()
        trainer.latent_cache, trainer.bad_steps, trainer.step_bad = {}, 0, False
        tokens = trainer.text.tokens
        # Alternate the two kinds of step, so that a change in the machine's load hits both alike: a
        # token step (captions through both encoders, gradients to the new rows) and a step with the
        # tokens frozen (cached prompt embeddings; the rows get no gradient).
        times: dict[bool, list[float]] = {True: [], False: []}
        batches = iter(trainer.dataloader)
        for i in range(2 * steps):
            live = i % 2 == 0
            trainer.text.tokens = tokens if live else None
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(trainer.dataloader)
                batch = next(batches)
            t0 = time.perf_counter()
            trainer.micro_step(batch, i + 1)
            times[live].append(time.perf_counter() - t0)
        trainer.text.tokens = tokens
    warm = 2  # the first steps of each kind pay for allocations
    live, frozen = times[True][warm:], times[False][warm:]
    return {
        "steps_each": len(live),
        "token_step_s": statistics.median(live),
        "frozen_step_s": statistics.median(frozen),
        "ratio": statistics.median(live) / statistics.median(frozen),
        "threads": threads,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps of each kind (tokens training, then frozen)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    counts = count_sdxl_parameters()
    lora = counts["lora"]
    print("trainable parameters on SDXL base (2 new tokens):")
    for mode, n in counts.items():
        print(f"  {mode:28s} {n:>15,}   {n / lora:8.4f}x LoRA r4")
    timing = token_step_ratio(args.steps, args.threads)
    print(f"micro-world training step, {timing['threads']} thread(s), median of {timing['steps_each']} each:")
    print(f"  tokens training {timing['token_step_s'] * 1e3:.1f} ms, frozen {timing['frozen_step_s'] * 1e3:.1f} ms, "
          f"ratio {timing['ratio']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": counts, "step_time": timing}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
