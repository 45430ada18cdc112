"""CUDA checks and benchmarks in one short run (for a lent GPU; CI never runs this).

    python benchmarks/gpu_check.py [--quick]

1. correctness on CUDA: mixed_attention in fp32 / bf16 / fp16 against a float64 reference (values
   and gradients), for the chunked path and the fused Triton forward (impl="triton"), and the
   processor at alpha = 0 against diffusers' AttnProcessor2_0;
2. one attention layer at SDXL's shapes: SDPA vs naive materialised mixing vs dreamcoeff (chunked)
   vs dreamcoeff's Triton forward, forward and forward+backward, median time and peak memory (ratios
   measured in the same run); and a sweep of the Triton kernel's block sizes (forward);
3. the real SDXL base UNet (random weights, built on the GPU from its published config), bf16,
   1024 px (128 x 128 latents), batch 1: one training step for LoRA rank 4, alpha, alpha+LoRA and
   alpha with the Triton kernels (with and without gradient checkpointing), and UNet inference with
   and without alpha (chunked and Triton).
Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

from dreamcoeff import apply_coeff, coeff_parameters
from dreamcoeff.attention import materialized_mixed_attention, mixed_attention
from dreamcoeff.attention.triton_kernels import mixed_attention_forward, triton_unavailable_reason
from dreamcoeff.processor import set_coeff_attention_impl
from dreamcoeff.testing.sdxl import sdxl_unet_config

DEV = torch.device("cuda")
RESULTS = []


def emit(**row):
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timed(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def reference(q, k, v, a, scale, mask=None):
    q, k, v, a = (t.double() for t in (q, k, v, a))
    s = torch.einsum("bind,bild->binl", q, k) * scale
    if mask is not None:
        s = s + mask.double()
    p = s.softmax(-1)
    return torch.einsum("hi,binl,bhld->bhnd", a, p, v)


def check_correctness():
    g = torch.Generator(device=DEV).manual_seed(0)
    b, h, n, l, d = 2, 10, 333, 77, 64
    impls = ("chunked", "triton") if triton_unavailable_reason(DEV) is None else ("chunked",)
    for impl, dtype, tol in [
        (i, t, tol) for i in impls for t, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3))
    ]:
        q, k, v = (torch.randn(b, h, x, d, device=DEV, generator=g).to(dtype).requires_grad_() for x in (n, l, l))
        a = (torch.eye(h, device=DEV) + 0.3 * torch.randn(h, h, device=DEV, generator=g)).requires_grad_()
        mask = torch.zeros(b, 1, 1, l, device=DEV)
        mask[0, ..., 60:] = -1e4
        out = mixed_attention(q, k, v, a, d**-0.5, mask, chunk_size=100, impl=impl)
        ref = reference(q, k, v, a, d**-0.5, mask)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        w = torch.randn(out.shape, device=DEV, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v, a))
        qd, kd, vd, ad = (t.detach().double().requires_grad_() for t in (q, k, v, a))
        ref_grads = torch.autograd.grad((reference(qd, kd, vd, ad, d**-0.5, mask) * w).sum(), (qd, kd, vd, ad))
        grad_rel = max(((x.double() - y).norm() / y.norm()).item() for x, y in zip(grads, ref_grads))
        emit(
            check="mixed_attention_vs_float64",
            impl=impl,
            dtype=str(dtype),
            rel_err=rel,
            grad_rel_err=grad_rel,
            ok=rel <= tol and grad_rel <= 10 * tol,
        )

    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from dreamcoeff import CoeffAttnProcessor

    attn = Attention(query_dim=640, heads=10, dim_head=64, cross_attention_dim=2048).to(DEV, torch.bfloat16).eval()
    x = torch.randn(2, 1024, 640, device=DEV, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 2048, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        base = attn(x, ctx)
        from dreamcoeff.head_mix import HeadMix

        attn.head_mix = HeadMix(10).to(DEV)
        attn.set_processor(CoeffAttnProcessor())
        same = attn(x, ctx)
    emit(
        check="alpha0_equals_AttnProcessor2_0_bf16",
        max_abs=(same - base).abs().max().item(),
        ok=torch.equal(same, base),
    )


def bench_attention(quick: bool):
    shapes = [
        ("self N=4096 H=10", 4096, 4096, 10),
        ("self N=1024 H=20", 1024, 1024, 20),
        ("cross N=4096 L=77 H=10", 4096, 77, 10),
    ]
    for batch in (1,) if quick else (1, 2):
        for name, n, l, h in shapes:
            d = 64
            q, k, v = (
                torch.randn(batch, h, x, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for x in (n, l, l)
            )
            a = (torch.eye(h, device=DEV) + 0.1 * torch.randn(h, h, device=DEV)).requires_grad_()
            impls = {
                "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                "naive": lambda: materialized_mixed_attention(q, k, v, a),
                "dreamcoeff": lambda: mixed_attention(q, k, v, a),
                "triton": lambda: mixed_attention(q, k, v, a, impl="triton"),
            }
            if triton_unavailable_reason(DEV) is not None:
                del impls["triton"]
            base = {}
            for impl, fn in impls.items():
                for mode in ("fwd", "fwd+bwd"):

                    def run(fn=fn, mode=mode):
                        if mode == "fwd":
                            with torch.no_grad():
                                fn()
                        else:
                            fn().float().square().mean().backward()

                    try:
                        t, mem = timed(run)
                    except torch.OutOfMemoryError:
                        emit(bench="attention", shape=name, batch=batch, impl=impl, mode=mode, error="OOM")
                        continue
                    except Exception as error:  # e.g. a Triton compile failure: report it, keep measuring
                        emit(
                            bench="attention",
                            shape=name,
                            batch=batch,
                            impl=impl,
                            mode=mode,
                            error=str(error).splitlines()[0][:300],
                        )
                        continue
                    if impl == "sdpa":
                        base[mode] = (t, mem)
                    bt, bm = base.get(mode, (t, mem))
                    emit(
                        bench="attention",
                        shape=name,
                        batch=batch,
                        impl=impl,
                        mode=mode,
                        ms=t * 1e3,
                        peak_mib=mem,
                        time_vs_sdpa=t / bt,
                        mem_vs_sdpa=mem / max(bm, 1e-9),
                    )
                    q.grad = k.grad = v.grad = a.grad = None


def sweep_triton_blocks():
    """Forward time of the fused kernel per (BLOCK_M, BLOCK_N, num_warps): its defaults are untuned."""
    for name, n, h in (("self N=4096 H=10", 4096, 10), ("self N=1024 H=20", 1024, 20)):
        q, k, v = (torch.randn(1, h, n, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        a = torch.eye(h, device=DEV) + 0.1 * torch.randn(h, h, device=DEV)
        t_sdpa, _ = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for bm, bn, warps in ((16, 16, 4), (16, 32, 4), (16, 32, 8), (16, 64, 8), (32, 32, 8), (32, 64, 8)):
            try:
                t, mem = timed(
                    lambda: mixed_attention_forward(q, k, v, a, 0.125, block_m=bm, block_n=bn, num_warps=warps)
                )
            except Exception as error:  # out of shared memory / registers for this config
                emit(
                    bench="triton_blocks",
                    shape=name,
                    block_m=bm,
                    block_n=bn,
                    num_warps=warps,
                    error=str(error).splitlines()[0][:200],
                )
                continue
            emit(
                bench="triton_blocks",
                shape=name,
                block_m=bm,
                block_n=bn,
                num_warps=warps,
                ms=t * 1e3,
                time_vs_sdpa=t / t_sdpa,
                peak_mib=mem,
            )


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(DEV):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    return unet.to(torch.bfloat16)


def _inputs(batch, size=128):
    return dict(
        sample=torch.randn(batch, 4, size, size, device=DEV, dtype=torch.bfloat16),
        timestep=torch.randint(0, 1000, (batch,), device=DEV),
        encoder_hidden_states=torch.randn(batch, 77, 2048, device=DEV, dtype=torch.bfloat16),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 1280, device=DEV, dtype=torch.bfloat16),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=DEV, dtype=torch.bfloat16),
        },
    )


def bench_sdxl(quick: bool):
    from peft import LoraConfig

    for checkpointing in (True,) if quick else (True, False):
        base = None
        methods = ["lora", "coeff", "coeff+lora"]
        if triton_unavailable_reason(DEV) is None:
            methods.append("coeff (triton)")  # the fused kernels: set_coeff_attention_impl(unet, "triton")
        for method in methods:
            unet = _unet()
            unet.requires_grad_(False)
            if "lora" in method:
                unet.add_adapter(
                    LoraConfig(
                        r=4,
                        lora_alpha=4,
                        init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                    )
                )
            if "coeff" in method:
                apply_coeff(unet, dropout=0.1)
                set_coeff_attention_impl(unet, "triton" if "triton" in method else "auto")
            params = [p for p in unet.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()
            if checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            opt = torch.optim.AdamW(params, lr=1e-4)
            inputs = _inputs(1)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = unet(**inputs).sample
                out.float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                t, mem = timed(step, warmup=2, reps=5)
            except torch.OutOfMemoryError:
                emit(bench="sdxl_train_step", method=method, checkpointing=checkpointing, error="OOM")
                continue
            if method == "lora":
                base = (t, mem)
            emit(
                bench="sdxl_train_step",
                method=method,
                checkpointing=checkpointing,
                ms=t * 1e3,
                peak_mib=mem,
                trainable=sum(p.numel() for p in params),
                time_vs_lora=t / base[0],
                mem_vs_lora=mem / base[1],
            )
            del unet, opt, params
            torch.cuda.empty_cache()


def bench_sdxl_inference():
    # batch 2 (classifier-free guidance), one UNet call per denoising step
    unet = _unet().eval()
    inputs = _inputs(2)
    with torch.no_grad():
        t_base, m_base = timed(lambda: unet(**inputs), warmup=2, reps=5)
        apply_coeff(unet)
        unet.requires_grad_(False)
        for p in coeff_parameters(unet):
            p.normal_(0, 0.05)
        t_alpha, m_alpha = timed(lambda: unet(**inputs), warmup=2, reps=5)
        emit(
            bench="sdxl_unet_inference",
            impl="chunked",
            ms_base=t_base * 1e3,
            ms_alpha=t_alpha * 1e3,
            time_vs_base=t_alpha / t_base,
            peak_mib_base=m_base,
            peak_mib_alpha=m_alpha,
        )
        if triton_unavailable_reason(DEV) is None:
            set_coeff_attention_impl(unet, "triton")
            t_tri, m_tri = timed(lambda: unet(**inputs), warmup=2, reps=5)
            emit(
                bench="sdxl_unet_inference",
                impl="triton",
                ms_base=t_base * 1e3,
                ms_alpha=t_tri * 1e3,
                time_vs_base=t_tri / t_base,
                peak_mib_base=m_base,
                peak_mib_alpha=m_tri,
            )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", nargs="+", choices=["correctness", "attention", "blocks", "sdxl", "inference"], default=None
    )
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, fn in (
        ("correctness", check_correctness),
        ("attention", lambda: bench_attention(args.quick)),
        ("blocks", sweep_triton_blocks),
        ("sdxl", lambda: bench_sdxl(args.quick)),
        ("inference", bench_sdxl_inference),
    ):
        if args.only and name not in args.only:
            continue
        try:
            fn()
        except Exception:  # keep going: one failure must not hide the other numbers
            traceback.print_exc()
            emit(section=name, error=traceback.format_exc(limit=3))
    print("SUMMARY", json.dumps(RESULTS))


if __name__ == "__main__":
    main()
