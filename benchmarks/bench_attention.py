"""One attention layer at SDXL's shapes: SDPA vs naive mixing vs dreamcoeff, time and peak memory.

    python benchmarks/bench_attention.py            # full run (~10 min on a 2-core CPU)
    python benchmarks/bench_attention.py --quick    # batch 1, fewer rounds (~3 min)
    python benchmarks/bench_attention.py --budgets 8 16 32 64    # also "chunked" at these chunk MiB

Implementations (all take q, k, v of shape (B, H, N, 64)):
    sdpa        torch.nn.functional.scaled_dot_product_attention: plain attention, the baseline
    naive       materialised mixing: all B x H x N x L maps, plain autograd
    before      dreamcoeff's chunked implementation as first committed (benchmarks/_legacy_attention.py)
    chunked     dreamcoeff.attention.mixed_attention(impl="chunked"): the PyTorch path
    dreamcoeff  dreamcoeff.attention.mixed_attention, as the processor calls it ("auto": on the CPU the
                fused C++ kernel of dreamcoeff.attention.cpu_kernel, where it builds)

Shapes: self-attention N=4096 with 10 heads and N=1024 with 20 heads (SDXL at 1024 px), and
cross-attention of those to 77 text tokens; batch 1 and 2; forward+backward (grads for q, k, v and
the coefficients) and forward-only (no_grad, as in sampling). Times are medians of interleaved rounds
and ratios are medians of per-round ratios to SDPA (see _benchutil.py); peak memory is measured in a
fresh subprocess per configuration. Prints a markdown table and, with --json, writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _benchutil as bu  # sibling modules: `python benchmarks/x.py` puts this folder on sys.path
import _legacy_attention
import torch
import torch.nn.functional as F

from dreamcoeff import attention as dc

SHAPES = {  # name: (heads, N, L)
    "self N=4096 H=10": (10, 4096, 4096),
    "self N=1024 H=20": (20, 1024, 1024),
    "cross N=4096 L=77 H=10": (10, 4096, 77),
    "cross N=1024 L=77 H=20": (20, 1024, 77),
}
HEAD_DIM = 64
IMPLS = ("sdpa", "naive", "before", "chunked", "dreamcoeff")
MODES = ("fwd+bwd", "fwd")


def make_inputs(shape: str, batch: int, device, seed: int = 0):
    heads, n, l = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, rows, HEAD_DIM, generator=g).to(device).requires_grad_() for rows in (n, l, l))
    coeff = (torch.eye(heads) + 0.05 * torch.randn(heads, heads, generator=g)).to(device).requires_grad_()
    grad = torch.randn(batch, heads, n, HEAD_DIM, generator=g).to(device)
    return q, k, v, coeff, grad


def impl_fn(impl: str):
    """impl -> f(q, k, v, coeff) -> out. 'dreamcoeff@16' is the chunked path with a 16 MiB chunk budget."""
    if impl == "sdpa":
        return lambda q, k, v, a: F.scaled_dot_product_attention(q, k, v)
    if impl == "naive":
        return lambda q, k, v, a: dc.materialized_mixed_attention(q, k, v, a)
    if impl == "before":
        return lambda q, k, v, a: _legacy_attention.mixed_attention(q, k, v, a)
    if impl == "chunked":
        return lambda q, k, v, a: dc.mixed_attention(q, k, v, a, impl="chunked")
    if impl == "dreamcoeff":
        return lambda q, k, v, a: dc.mixed_attention(q, k, v, a)
    if impl.startswith("dreamcoeff@"):
        budget = int(float(impl.split("@")[1]) * bu.MiB)

        def fn(q, k, v, a):
            b, h, n, _ = q.shape
            chunk = dc.choose_chunk_size(b, h, n, k.shape[-2], budget_bytes=budget)
            return dc.mixed_attention(q, k, v, a, chunk_size=chunk, impl="chunked")

        return fn
    raise ValueError(impl)


def step_fn(impl: str, mode: str, inputs):
    f = impl_fn(impl)
    q, k, v, coeff, grad = inputs

    if mode == "fwd":

        def run():
            with torch.no_grad():
                f(q, k, v, coeff)

    else:

        def run():
            for t in (q, k, v, coeff):
                t.grad = None
            f(q, k, v, coeff).backward(grad)

    return run


def child_memory(args) -> None:
    """Subprocess: peak extra memory of one call of one configuration."""
    bu.setup_threads(args.threads)
    inputs = make_inputs(args.shape, args.batch, args.device)
    run = step_fn(args.impl, args.mode, inputs)
    run()  # warm-up: lazy library initialisation, MKL buffers
    for t in inputs[:4]:
        t.grad = None
    with bu.PeakMemory(args.device) as pm:
        run()
    print(json.dumps({"peak": pm.peak, "method": pm.method}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 only, 3 rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 3)")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="*", default=list(IMPLS))
    p.add_argument("--budgets", nargs="*", type=float, default=[], help="extra dreamcoeff runs at these chunk MiB")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    # child mode (peak memory of one configuration)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_memory(args)

    bu.setup_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    batches = args.batches or ([1] if args.quick else [1, 2])
    impls = list(args.impls) + [f"dreamcoeff@{b:g}" for b in args.budgets]
    info = bu.machine_info(args.threads)
    print(f"# bench_attention  {json.dumps(info)}", flush=True)
    print(f"# command: {' '.join(sys.argv)}", flush=True)

    rows = []
    for shape in args.shapes:
        for batch in batches:
            inputs = make_inputs(shape, batch, args.device)
            for mode in args.modes:
                fns = {impl: step_fn(impl, mode, inputs) for impl in impls}
                with bu.LoadMonitor() as load:
                    times = bu.interleaved(fns, rounds=rounds, warmup=1, device=args.device)
                summary = bu.summarize(times, baseline="sdpa")
                mem = {}
                if not args.no_memory:
                    for impl in impls:
                        res = bu.run_child(
                            Path(__file__),
                            [
                                "--child",
                                "--shape",
                                shape,
                                "--batch",
                                str(batch),
                                "--impl",
                                impl,
                                "--mode",
                                mode,
                                "--threads",
                                str(args.threads),
                                "--device",
                                args.device,
                            ],
                        )
                        mem[impl] = res
                for impl in impls:
                    row = {
                        "shape": shape,
                        "batch": batch,
                        "mode": mode,
                        "impl": impl,
                        **summary[impl],
                        "peak_bytes": mem.get(impl, {}).get("peak"),
                        "memory_method": mem.get(impl, {}).get("method"),
                        "others_cores": load.others,
                    }
                    base_mem = mem.get("sdpa", {}).get("peak")
                    row["mem_ratio"] = (
                        (row["peak_bytes"] / base_mem) if (base_mem and row["peak_bytes"] is not None) else None
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del inputs

    print()
    print("| shape | B | mode | impl | median ms | ratio vs SDPA | peak MiB | mem vs SDPA | others' load |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mem_ratio = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}"
        load = "-" if r["others_cores"] is None else f"{r['others_cores']:.1f} cores"
        print(
            f"| {r['shape']} | {r['batch']} | {r['mode']} | {r['impl']} | {bu.fmt_ms(r['median_s'])} | "
            f"{r['ratio']:.2f} | {bu.fmt_mib(r['peak_bytes'])} | {mem_ratio} | {load} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
