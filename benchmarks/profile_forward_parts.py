"""Where the chunked forward's time goes, op by op, next to SDPA (CPU; one attention layer).

    python benchmarks/profile_forward_parts.py [--heads 10] [--tokens 4096] [--threads 2]

Times (median of 7) SDPA, `mixed_attention` and, on one chunk-sized workspace scaled by the number
of chunks, the four block ops of the chunked forward: the q K^T GEMM, the in-place softmax, the head
mix (one (H x H) @ (H x rows*L) GEMM) and the P V GEMM. What the parts do not add up to is the
per-call work outside the chunk loop (q * scale, K^T contiguous, copying each chunk's output).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dreamcoeff.attention import choose_chunk_size, mixed_attention


def median_ms(fn, reps: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, n, d = args.heads, args.tokens, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    a = torch.eye(h) + 0.05 * torch.randn(h, h, generator=g)
    rows = choose_chunk_size(1, h, n, n)
    chunks = -(-n // rows)
    k_t = k[0].transpose(-1, -2).contiguous()
    q_rows = q[0, :, :rows].contiguous()
    maps, mixed, out = torch.empty(h, rows, n), torch.empty(h, rows, n), torch.empty(h, rows, d)
    with torch.no_grad():
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        ours = median_ms(lambda: mixed_attention(q, k, v, a))
        parts = {
            "q K^T GEMM": median_ms(lambda: torch.bmm(q_rows, k_t, out=maps)) * chunks,
            "softmax": median_ms(lambda: torch.softmax(maps, -1, out=maps)) * chunks,
            "head mix": median_ms(lambda: torch.mm(a, maps.view(h, -1), out=mixed.view(h, -1))) * chunks,
            "P V GEMM": median_ms(lambda: torch.bmm(mixed, v[0], out=out)) * chunks,
        }
    print(f"{h} heads, N = L = {n}, d = {d}, {args.threads} threads, {chunks} chunks of {rows} rows")
    print(f"SDPA {sdpa:.0f} ms; mixed_attention {ours:.0f} ms ({ours / sdpa:.2f}x SDPA)")
    for name, ms in parts.items():
        print(f"  {name:<11} {ms:5.0f} ms  ({ms / sdpa:.2f}x SDPA)")
    print(f"  {'rest':<11} {ours - sum(parts.values()):5.0f} ms")


if __name__ == "__main__":
    main()
