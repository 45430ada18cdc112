import statistics
import time

import torch
import torch.nn.functional as F

from dreamcoeff.attention import mixed_attention

dev = "cuda"


def pairs(q, k, v, a):
    b, h, n, d = q.shape
    # pair (o, i): query/key of head i, values of head o  ->  O^o = sum_i A[o,i] SDPA(Q^i, K^i, V^o)
    qp = q.unsqueeze(1).expand(b, h, h, n, d).reshape(b, h * h, n, d)
    kp = k.unsqueeze(1).expand(b, h, h, k.shape[2], d).reshape(b, h * h, -1, d)
    vp = v.unsqueeze(2).expand(b, h, h, v.shape[2], d).reshape(b, h * h, -1, d)
    out = F.scaled_dot_product_attention(qp, kp, vp).view(b, h, h, n, d)
    return torch.einsum("oi,boind->bond", a.to(out.dtype), out)


def t(fn, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20


for n, h in ((4096, 10), (1024, 20)):
    for B in (1, 2):
        q, k, v = (torch.randn(B, h, n, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        a = (torch.eye(h, device=dev) + 0.1 * torch.randn(h, h, device=dev)).requires_grad_()
        ref = mixed_attention(q, k, v, a).float()
        got = pairs(q, k, v, a).float()
        err = ((got - ref).norm() / ref.norm()).item()
        for name, fn in (
            ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
            ("ours", lambda: mixed_attention(q, k, v, a)),
            ("pairs", lambda: pairs(q, k, v, a)),
        ):
            with torch.no_grad():
                f = t(fn)
            fb = t(lambda: fn().float().square().mean().backward())
            print(
                f"N={n} H={h} B={B} {name:6s} fwd {f[0]:.3f} ms {f[1]:.0f} MiB | fwd+bwd {fb[0]:.3f} ms {fb[1]:.0f} MiB | pairs rel err {err:.1e}",
                flush=True,
            )
