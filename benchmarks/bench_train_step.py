"""One training step of an SDXL-shaped UNet: LoRA rank 4 vs alpha-only vs alpha+LoRA; and sampling.

    python benchmarks/bench_train_step.py            # SDXL depth (140 attention modules)
    python benchmarks/bench_train_step.py --quick    # shallow UNet (34 attention modules), fewer steps

The UNet has SDXL's block layout (DownBlock2D + 2 CrossAttnDownBlock2D, mirrored up blocks, the
cross-attention mid block, linear projections, `text_time` added conditioning, 2 resnets per block,
transformer depth (1, 2, 10) per level: 140 attention modules) with widths / 4 and heads / 2:
channels (80, 160, 320), heads (5, 10) of width 32 where SDXL has (10, 20) of width 64. Halving both
heads and head width keeps H / (2 d), the cost of the head mixing relative to the attention itself,
exactly SDXL's (7.8% and 15.6%). Latents 64 x 64, batch 2, 77 text tokens of width 512.

Configurations, each in its own process (`--child`), run in interleaved rounds:
    lora         peft LoraConfig(r=4) on to_q, to_k, to_v, to_out.0 via unet.add_adapter
    alpha        dreamcoeff.apply_coeff on every attn1 / attn2 (alpha = 0 at start: the exact path)
    alpha+lora   both
    alpha@chunked  alpha with set_coeff_attention_impl(unet, "chunked"): the PyTorch path instead of the
                 fused C++ kernel that "auto" runs on the CPU (also a sampling configuration)
A step is: UNet forward on noisy latents, MSE to the noise, backward, AdamW step, zero_grad.
Reported: median step time (over all timed steps of all rounds), the ratio to LoRA, and the peak
memory of one step above the steady state (VmHWM after clear_refs, see _benchutil.py) as well as
the process's peak resident size.

Sampling: the UNet denoising loop of a pipeline (Euler, classifier-free guidance = batch 2, one
64 x 64 latent), in inference mode, for the base UNet (diffusers' AttnProcessor2_0), with alpha
(random, nonzero: the exact path in every layer) and with alpha installed but zero (the identity
fast path). The VAE and text encoders are the same for both and left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _benchutil as bu  # a sibling module: `python benchmarks/x.py` puts this folder on sys.path
import torch
import torch.nn.functional as F

TRAIN_CONFIGS = ("lora", "alpha", "alpha+lora", "alpha@chunked")
SAMPLE_CONFIGS = ("base", "alpha", "alpha=0", "alpha@chunked")


def _split_impl(config: str) -> tuple[str, str]:
    """'name@impl' -> (name, impl): `name` with its coeff layers set to `impl` ("auto" without '@')."""
    name, _, impl = config.partition("@")
    return name, impl or "auto"


BATCH, LATENT, TEXT_TOKENS, TEXT_DIM, POOLED_DIM, TIME_DIM = 2, 64, 77, 512, 320, 64


def _timed_calls(fn, n: int):
    """Call fn n times: wall times, CPU times, and the peak memory over all calls."""
    times, cpu = [], []
    with bu.PeakMemory() as pm:
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu, pm


def unet_config(depth=(1, 2, 10)) -> dict:
    return dict(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(80, 160, 320),
        layers_per_block=2,
        attention_head_dim=(5, 5, 10),  # diffusers reads this as the number of heads (issue #2011)
        transformer_layers_per_block=tuple(depth),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_unet(depth, config: str, impl: str = "auto"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(depth))
    unet.requires_grad_(False)
    if "lora" in config:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
            )
        )
    if "alpha" in config:
        from dreamcoeff import apply_coeff, coeff_parameters
        from dreamcoeff.processor import set_coeff_attention_impl

        apply_coeff(unet)
        set_coeff_attention_impl(unet, impl)
        if config == "alpha" and SAMPLING:  # nonzero alpha so inference runs the exact path
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in coeff_parameters(unet):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet


SAMPLING = False


def conditioning(g):
    return dict(
        encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(BATCH, POOLED_DIM, generator=g),
            "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * BATCH, dtype=torch.float32),
        },
    )


def child_train(args) -> dict:
    bu.setup_threads(args.threads)
    unet = build_unet(args.depth, *_split_impl(args.config))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    noise = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    timesteps = torch.tensor([250, 750])
    cond = conditioning(g)

    def step():
        noisy = latents + noise  # the noise schedule does not matter for the cost
        pred = unet(noisy, timesteps, **cond).sample
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times, cpu, pm = _timed_calls(step, args.steps)
    return {
        "times": times,
        "cpu_times": cpu,
        "peak_step_bytes": pm.peak,
        "memory_method": pm.method,
        "peak_rss_bytes": bu._rss_kib("VmHWM") * 1024 if pm.method.startswith("VmHWM") else None,
        "trainable": sum(p.numel() for p in params),
        "attention_modules": sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2"))),
    }


def child_sample(args) -> dict:
    from diffusers import EulerDiscreteScheduler

    global SAMPLING
    SAMPLING = True
    bu.setup_threads(args.threads)
    config, impl = _split_impl(args.config)
    unet = build_unet(args.depth, "alpha" if config == "alpha" else ("alpha0" if config == "alpha=0" else "base"), impl)
    unet.eval()
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )
    g = torch.Generator().manual_seed(3)
    cond = conditioning(g)
    start = torch.randn(1, 4, LATENT, LATENT, generator=g)

    def sample():
        sched.set_timesteps(args.sample_steps)
        x = start * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_uncond, eps_text = unet(inp, t, **cond).sample.chunk(2)
            x = sched.step(eps_uncond + 5.0 * (eps_text - eps_uncond), t, x).prev_sample
        return x

    with torch.inference_mode():
        sample()  # warm-up
        times, cpu, pm = _timed_calls(sample, args.steps)
    return {"times": times, "cpu_times": cpu, "peak_step_bytes": pm.peak, "memory_method": pm.method}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth (1, 1, 2), 1 round of 2 steps, 2 sampling steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="rounds over the configurations (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps (default 4; quick 2)")
    p.add_argument("--depth", type=int, nargs=3, default=None, help="transformer layers per level (default 1 2 10)")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=["train", "sample"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.depth is None:
        args.depth = [1, 1, 2] if args.quick else [1, 2, 10]
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    if args.sample_steps is None:
        args.sample_steps = 2 if args.quick else 4
    if args.child:
        res = child_train(args) if args.child == "train" else child_sample(args)
        print(json.dumps(res))
        return

    rounds = args.rounds or 1
    info = bu.machine_info(args.threads)
    print(f"# bench_train_step  {json.dumps(info)}", flush=True)
    print(f"# command: {' '.join(sys.argv)}  (depth {args.depth})", flush=True)
    common = [
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--sample-steps",
        str(args.sample_steps),
        "--depth",
        *map(str, args.depth),
    ]
    results = {}
    jobs = ([] if args.no_train else [("train", c) for c in TRAIN_CONFIGS]) + (
        [] if args.no_sampling else [("sample", c) for c in SAMPLE_CONFIGS]
    )
    with bu.LoadMonitor() as load:
        for _ in range(rounds):
            for kind, config in jobs:
                res = bu.run_child(Path(__file__), ["--child", kind, "--config", config, *common], timeout=3600)
                agg = results.setdefault((kind, config), {**res, "times": [], "cpu_times": [], "peaks": []})
                agg["times"] += res["times"]
                agg["cpu_times"] += res["cpu_times"]
                agg["peaks"].append(res["peak_step_bytes"])
                print(json.dumps({"kind": kind, "config": config, **res}), flush=True)

    rows = []
    for (kind, config), agg in results.items():
        base = results[(kind, "lora" if kind == "train" else "base")]
        med = statistics.median(agg["times"])
        cpu = statistics.median(agg["cpu_times"])
        rows.append(
            {
                "kind": kind,
                "config": config,
                "median_s": med,
                "ratio": med / statistics.median(base["times"]),
                "min_s": min(agg["times"]),
                "min_ratio": min(agg["times"]) / min(base["times"]),
                "cpu_median_s": cpu,
                "cpu_ratio": cpu / statistics.median(base["cpu_times"]),
                "peak_step_bytes": max(agg["peaks"]),
                "peak_ratio": max(agg["peaks"]) / max(base["peaks"]),
                "peak_rss_bytes": agg.get("peak_rss_bytes"),
                "trainable": agg.get("trainable"),
                "n": len(agg["times"]),
            }
        )
    others = "-" if load.others is None else f"{load.others:.1f}"
    print()
    print(f"others' load during the run: {others} cores (machine has {info['cores']})")
    print(
        "| run | config | median s | ratio | min s | ratio | CPU s (median) | ratio | peak extra MiB (step) | ratio "
        "| process peak MiB | trainable |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['config']} | {r['median_s']:.2f} | {r['ratio']:.2f} | {r['min_s']:.2f} | {r['min_ratio']:.2f} | "
            f"{r['cpu_median_s']:.2f} | {r['cpu_ratio']:.2f} | {bu.fmt_mib(r['peak_step_bytes'])} | "
            f"{r['peak_ratio']:.2f} | {bu.fmt_mib(r['peak_rss_bytes'])} | {r['trainable'] or '-'} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": info, "command": sys.argv, "depth": args.depth, "others_cores": load.others, "rows": rows},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
