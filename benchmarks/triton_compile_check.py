"""Compile the Triton mixed-attention kernels for a GPU without having one, and report their resources.

    python benchmarks/triton_compile_check.py [--arch 90] [--json out.json]

Triton compiles to PTX on any machine, and its wheel ships NVIDIA's `ptxas`, so the whole GPU
compile (Triton IR -> PTX -> cubin) runs here on the CPU. That catches what Triton's interpreter
cannot (GPU-only lowering errors, shapes the tensor cores reject) and reports, per kernel and
configuration, the registers per thread, the bytes spilled to local memory and the shared memory
per program: the numbers the default tiles in `dreamcoeff.attention.triton_kernels.kernel_configs` and
`backward_kernel_config` were chosen by. It says nothing about speed; that needs a GPU (benchmarks/gpu_check.py).

The kernels are compiled with the specialisations Triton's JIT applies at a real launch with
SDXL's layouts: unit strides of the head dimension become the constant 1, and the pointers and the
other strides carry "divisible by 16" (16-byte aligned tensors, strides that are multiples of 16).

Exit status 1 if a kernel fails to compile or needs more shared memory than a program may use on
the target (227 KiB on sm_90: H100/H200; 163 KiB on sm_80: A100; 99 KiB on sm_86/89: RTX 30xx/40xx,
where the kernels fall back to the chunked path at run time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402

try:
    import triton  # noqa: E402
    from triton.backends.compiler import GPUTarget  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("triton is not installed: pip install triton (or the project's [triton] extra)")

from dreamcoeff.attention import triton_kernels as ta  # noqa: E402

# Bytes of shared memory one program may use (opt-in maximum per block), by compute capability.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_od")
POINTERS = ("Q", "K", "V", "A_HI", "A_LO", "Out", "DO")
FLOAT32_BUFFERS = ("Mask", "LSE", "DELTA", "DQ", "DA", "DK", "DVAL")
UNIT_STRIDES = UNIT_STRIDES + ("s_gd",)

# (dtype, heads, head dim, mask): SDXL's two head counts at d = 64, in the dtypes people train in.
# float32: the forward only, up to 16 heads (20 heads need 354 KiB of shared memory and are refused;
# the float32 backward kernels need 321-340 KiB, so float32 gradients take the chunked path).
CASES = [
    (torch.bfloat16, 10, 64, False),
    (torch.bfloat16, 20, 64, False),
    (torch.bfloat16, 10, 64, True),
    (torch.float16, 10, 64, False),
    (torch.float16, 20, 64, False),
    (torch.float32, 10, 64, False),
]


def _signature(kernel, dtype: torch.dtype, constants: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants or name in UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + TRITON_DTYPE[dtype]
        elif name in FLOAT32_BUFFERS:
            sig[name] = "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        aligned = sig[name].startswith("*") or (name.startswith("s_") and not name.startswith("s_m"))
        if aligned and sig[name] != "constexpr":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _ptxas() -> list[Path]:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [p for p in (folder / "ptxas-blackwell", folder / "ptxas") if p.exists()]


def _assemble(ptx: str, arch: int, workdir: Path) -> dict:
    """ptxas -v on the PTX: registers per thread and spill bytes (the newest bundled ptxas that reads it)."""
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    for ptxas in _ptxas():
        run = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(workdir / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
        if run.returncode == 0:
            text = run.stderr
            registers = re.search(r"Used (\d+) registers", text)
            stores = re.search(r"(\d+) bytes spill stores", text)
            loads = re.search(r"(\d+) bytes spill loads", text)
            return {
                "registers": int(registers.group(1)) if registers else None,
                "spill_stores": int(stores.group(1)) if stores else 0,
                "spill_loads": int(loads.group(1)) if loads else 0,
            }
        errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"rc {run.returncode}")
    return {"ptxas_error": "; ".join(errors) or "no ptxas in the triton wheel"}


def compile_case(dtype: torch.dtype, heads: int, head_dim: int, has_mask: bool, arch: int, workdir: Path) -> list[dict]:
    lse_config, mix_config = ta.kernel_configs(dtype, heads, head_dim, has_mask=has_mask)
    bwd_config = ta.backward_kernel_config(dtype, heads, head_dim, has_mask=has_mask)
    kernels = ta.jit_kernels()
    launches = [
        ("fwd lse", kernels["row_logsumexp"], lse_config),
        ("fwd mix", kernels["fwd"], mix_config),
    ]
    if dtype != torch.float32:  # float32 gradients take the chunked path
        launches += [
            ("bwd rows 0", kernels["bwd_rows"], {**bwd_config, "PHASE": 0}),
            ("bwd rows 1", kernels["bwd_rows"], {**bwd_config, "PHASE": 1}),
        ]
        # dK and dV in one launch where a group holds every head, else two (as the backward runs them).
        one_launch = bwd_config["GROUP"] == bwd_config["HP"]
        keys = (
            [("bwd keys", True, True)] if one_launch else [("bwd keys dK", True, False), ("bwd keys dV", False, True)]
        )
        launches += [(name, kernels["bwd_keys"], {**bwd_config, "DO_DK": dk, "DO_DV": dv}) for name, dk, dv in keys]
    rows = []
    for launch, kernel, config in launches:
        options = {key: config[key] for key in ("num_warps", "num_stages") if key in config}
        constants = {key: value for key, value in config.items() if key not in options}
        sig, attrs = _signature(kernel, dtype, constants)
        constants.update({name: 1 for name in UNIT_STRIDES if name in kernel.arg_names})
        row = {
            "launch": launch,
            "kernel": kernel.__name__,
            "dtype": TRITON_DTYPE[dtype],
            "heads": heads,
            "head_dim": head_dim,
            "mask": has_mask,
            **{k: v for k, v in config.items() if k.isupper() and k != "PRECISION"},
            **options,
        }
        try:
            source = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:  # report and go on: the exit status says it failed
            row["compile_error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
            rows.append(row)
            continue
        row["shared_bytes"] = compiled.metadata.shared
        row.update(_assemble(compiled.asm["ptx"], arch, workdir))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=sorted(MAX_SHARED),
        help="compute capability x10 (90: H100/H200, 80: A100, 86/89: RTX 30xx/40xx)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"dreamcoeff-triton-check-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    rows, failed = [], False
    for dtype, heads, head_dim, has_mask in CASES:
        for row in compile_case(dtype, heads, head_dim, has_mask, args.arch, workdir):
            rows.append(row)
            bad = "compile_error" in row or "ptxas_error" in row or row.get("shared_bytes", 0) > MAX_SHARED[args.arch]
            failed |= bad
            tiles = f"BM={row['BLOCK_M']} BN={row['BLOCK_N']}" + (f" G={row['GROUP']}" if "GROUP" in row else "")
            stats = (
                row.get("compile_error")
                or row.get("ptxas_error")
                or (
                    f"{row['registers']} registers, spills {row['spill_stores']}/{row['spill_loads']} B (store/load), "
                    f"shared {row['shared_bytes'] / 1024:.0f} KiB"
                )
            )
            print(
                f"{'FAIL ' if bad else 'ok   '}{row['launch']:<11} {row['dtype']:<4} H={heads:<2} "
                f"mask={'y' if has_mask else 'n'} {tiles:<20} warps={row['num_warps']} "
                f"stages={row.get('num_stages', '-')}: {stats}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
