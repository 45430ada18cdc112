"""torch.compile and alpha: graph breaks, fullgraph, compiled vs eager sampling time, in one run.

On an SDXL-architecture pipeline (default: the tiny random pipeline of the tests; ``--model`` a
diffusers folder such as ``models/microworld-sdxl-v2``), three UNets side by side:

- ``base``: the untouched UNet (diffusers' own processors);
- ``alpha0``: alpha installed on every attention layer but zero (A = I: the identity fast path);
- ``alpha``: a random non-zero alpha (N(0, 0.3), seed 1) on every layer.

It measures, on the CPU:

(a) graph breaks: ``torch._dynamo.explain`` on one real UNet call (the arguments the pipeline passes
    at its first step, captured by a hook), per UNet;
(b) ``torch.compile(unet, fullgraph=True, backend=...)``: compiles and runs, or the exact error;
(c) sampling time per image, eager vs compiled, in the same process: one eager warm-up call, the
    compiled pipeline's first call (compile + one image) and a second warm-up call reported
    separately, then ``--repeats`` rounds interleaved (eager, compiled; per UNet), medians and the
    median of the per-round ratios compiled / eager; and the largest difference between compiled
    and eager images (float32 images in [0, 1]), checked against ``--tolerance``.

The backend is inductor unless it cannot compile here (no C++ compiler, ...): then the run says why
and uses ``--fallback_backend`` (aot_eager: AOT autograd's graphs run eagerly, no code generation).

    .venv/bin/python benchmarks/bench_compile.py [--model models/microworld-sdxl-v2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._benchutil import LoadMonitor, machine_info, setup_threads  # noqa: E402

CONFIGS = ("base", "alpha0", "alpha")
PROMPT = "a photo of a red square"


def _load(model: str | None):
    """The pipeline (a fresh copy per call: every UNet gets its own weights, the same ones)."""
    if model is None:
        from dreamcoeff.testing.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_alpha(pipe, config: str):
    from dreamcoeff import apply_coeff, coeff_parameters

    if config == "base":
        return pipe
    apply_coeff(pipe.unet)
    if config == "alpha":
        torch.manual_seed(1)
        with torch.no_grad():
            for alpha in coeff_parameters(pipe):
                alpha.normal_(0, 0.3)
    return pipe


def _sample(pipe, steps: int, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=steps, generator=generator, output_type="np", height=size, width=size
    ).images


def _unet_call(pipe, size: int) -> tuple[tuple, dict]:
    """The arguments of the pipeline's first UNet call (a forward pre-hook records them)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("call", (args, dict(kwargs)))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        _sample(pipe, 1, size)
    finally:
        handle.remove()
    return seen["call"]


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


def _frames_compiled() -> int:
    """Frames dynamo has compiled so far (a recompile adds one)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def explain(unet, args, kwargs) -> dict:
    """Graphs, graph breaks and their reasons for one UNet call, from torch._dynamo.explain."""
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(unet)(*args, **kwargs)
    torch._dynamo.reset()
    reasons = [str(getattr(r, "reason", r)).splitlines()[0][:200] for r in out.break_reasons]
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "ops": out.op_count, "reasons": reasons}


def inductor_works() -> str | None:
    """None if inductor compiles and runs a small function here, else the reason (its first line)."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, backend="inductor", fullgraph=True)
        x = torch.randn(64)
        torch.testing.assert_close(fn(x), torch.nn.functional.gelu(x) * 2 + 1)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback, and say why
        return _first_line(exc)
    finally:
        torch._dynamo.reset()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a diffusers SDXL folder (default: the tiny random pipeline)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the UNet's own)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per image (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds, eager and compiled interleaved (5)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"explained: comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--timed", default="base,alpha", help="of those, the ones also compiled and timed (each compile takes minutes)"
    )
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--fallback_backend", default="aot_eager", help="used where --backend cannot compile here")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |compiled - eager| image difference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 steps, 3 rounds")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (2 if quick else 4)
    args.repeats = args.repeats or (3 if quick else 5)
    configs = [c for c in args.configs.split(",") if c]
    timed = [c for c in args.timed.split(",") if c]
    unknown = sorted(set(configs + timed) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}: use {', '.join(CONFIGS)}")
    setup_threads(args.threads)

    backend, backend_note = args.backend, None
    if backend == "inductor":
        reason = inductor_works()
        if reason is not None:
            backend_note = f"inductor cannot compile here ({reason}); used {args.fallback_backend}"
            backend = args.fallback_backend
            print(f"# {backend_note}", flush=True)

    pipes = {c: _with_alpha(_load(args.model), c) for c in configs}
    any_pipe = next(iter(pipes.values()))
    size = args.size or any_pipe.unet.config.sample_size * any_pipe.vae_scale_factor
    results = {"machine": machine_info(args.threads), "args": vars(args), "backend": backend, "size": size}
    results["backend_note"] = backend_note
    import diffusers

    results["machine"]["diffusers"] = diffusers.__version__

    # Every explain first: torch._dynamo.reset() (which explain needs) throws away all compiled code,
    # so nothing may be compiled before the last explain.
    per = {}
    for config, pipe in pipes.items():
        pipe.unet.eval()
        call_args, call_kwargs = _unet_call(pipe, size)
        per[config] = {"explain": explain(pipe.unet, call_args, call_kwargs)}
        print(f"# {config}: explained", flush=True)
    for config, pipe in pipes.items():
        if config not in timed:
            continue
        unet, row = pipe.unet, per[config]
        eager_t0 = time.perf_counter()
        row["eager_images"] = _sample(pipe, args.steps, size)  # also the warm-up (kernel build, caches)
        row["eager_first_s"] = time.perf_counter() - eager_t0

        compiled, fullgraph, frames_before = None, True, _frames_compiled()
        for fullgraph in (True, False):
            compiled = torch.compile(unet, backend=backend, fullgraph=fullgraph)
            pipe.unet = compiled
            try:
                t0 = time.perf_counter()
                images = _sample(pipe, args.steps, size)
                row["compiled_first_s"] = time.perf_counter() - t0
                break
            except Exception as exc:  # noqa: BLE001 - recorded, then without fullgraph
                row["fullgraph_error"] = _first_line(exc)
                pipe.unet = unet
                compiled = None
        row["fullgraph"] = fullgraph and compiled is not None
        if compiled is None:
            row["compiled_error"] = row.pop("fullgraph_error", "compile failed")
            pipe.unet = unet
            per[config] = row
            continue
        row["frames_compiled"] = _frames_compiled() - frames_before
        t0 = time.perf_counter()
        images = _sample(pipe, args.steps, size)
        row["compiled_second_s"] = time.perf_counter() - t0
        row["recompiled_in_second_call"] = _frames_compiled() - frames_before - row["frames_compiled"]
        row["max_image_diff"] = float(np.abs(images - row["eager_images"]).max())
        row["compiled"] = compiled
        pipe.unet = unet
        per[config] = row
        print(f"# {config}: explain + compile done ({row['compiled_first_s']:.1f} s first compiled call)", flush=True)

    # Timed rounds, interleaved: eager and compiled of every UNet in each round.
    times = {(c, mode): [] for c in per if "compiled" in per[c] for mode in ("eager", "compiled")}
    frames_before = _frames_compiled()
    with LoadMonitor() as load:
        for _ in range(args.repeats):
            for config, mode in times:
                pipe, row = pipes[config], per[config]
                unet = pipe.unet
                pipe.unet = row["compiled"] if mode == "compiled" else unet
                t0 = time.perf_counter()
                images = _sample(pipe, args.steps, size)
                times[(config, mode)].append(time.perf_counter() - t0)
                pipe.unet = unet
                if mode == "compiled":
                    diff = float(np.abs(images - row["eager_images"]).max())
                    row["max_image_diff"] = max(row["max_image_diff"], diff)
    results["others_load_cores"] = load.others
    results["recompiled_in_timed_rounds"] = _frames_compiled() - frames_before

    for config, row in per.items():
        row.pop("eager_images", None)
        row.pop("compiled", None)
        if (config, "eager") in times:
            eager, comp = times[(config, "eager")], times[(config, "compiled")]
            row["eager_s"] = statistics.median(eager)
            row["compiled_s"] = statistics.median(comp)
            row["ratio"] = statistics.median(c / e for c, e in zip(comp, eager))
            row["compile_s"] = row["compiled_first_s"] - row["eager_s"]
            row["images_equal_within_tolerance"] = row["max_image_diff"] <= args.tolerance
            row["times"] = {"eager": eager, "compiled": comp}
    results["configs"] = per
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    """The results as a markdown table (what benchmarks/README.md records)."""
    m = results["machine"]
    a = results["args"]
    load = None if results["others_load_cores"] is None else round(results["others_load_cores"], 1)
    lines = [
        f"{len(results['configs'])} UNets, {a['steps']} steps at {results['size']} px, "
        f"backend {results['backend']}, {a['repeats']} rounds, {a['threads']} thread(s); torch {m['torch']}, "
        f"diffusers {m['diffusers']}, {m['cpu']} ({m['cores']} cores); others' load {load} cores; "
        f"recompiles in the timed rounds: {results.get('recompiled_in_timed_rounds')}",
        "",
        "| UNet | graphs / breaks (explain) | fullgraph=True | eager s/image | compiled s/image | compiled / eager | "
        "compile s | first / second compiled call s | max image diff |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for config, row in results["configs"].items():
        e = row["explain"]
        if "fullgraph" not in row:
            fg = "not compiled (not in --timed)"
        elif row["fullgraph"]:
            fg = "works"
        else:
            fg = f"fails: {row.get('fullgraph_error') or row.get('compiled_error')}"
        if "ratio" not in row:
            lines.append(f"| {config} | {e['graphs']} / {e['graph_breaks']} | {fg} | | | | | | |")
            continue
        ok = "" if row["images_equal_within_tolerance"] else f" (> {a['tolerance']:g}!)"
        lines.append(
            f"| {config} | {e['graphs']} / {e['graph_breaks']} | {fg} | {row['eager_s']:.3f} | "
            f"{row['compiled_s']:.3f} | {row['ratio']:.2f}x | {row['compile_s']:.1f} | "
            f"{row['compiled_first_s']:.1f} / {row['compiled_second_s']:.2f} | {row['max_image_diff']:.1e}{ok} |"
        )
    for config, row in results["configs"].items():
        for reason in row["explain"]["reasons"][:3]:
            lines.append(f"\n{config} graph break: {reason}")
    if results.get("backend_note"):
        lines.append(f"\n{results['backend_note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
