#!/usr/bin/env bash
# Reference numbers on a quiet machine: the lent GPU host's CPU pinned to 2 cores (taskset), used
# because the 2-core development VM was shared with other jobs (see README). Writes logs to $OUT.
set -u
OUT=${OUT:-/tmp/dc_out}; mkdir -p "$OUT"
PY=${PY:-python}
{ lscpu | grep -E "Model name|^CPU\(s\)|L2|L3"; $PY -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
# CUDA: the in-place chunked path against float64 (values and grads), seconds
$PY - > "$OUT/cuda_check.txt" 2>&1 <<'PYEOF'
import torch
from dreamcoeff.attention import mixed_attention
if torch.cuda.is_available():
    for L in (4096, 77):
        q, k, v = (torch.randn(2, 10, n, 64, device="cuda", requires_grad=True) for n in (1024, L, L))
        a = (torch.eye(10, device="cuda") + 0.1 * torch.randn(10, 10, device="cuda")).requires_grad_()
        g = torch.randn(2, 10, 1024, 64, device="cuda")
        out = mixed_attention(q, k, v, a); out.backward(g)
        lv = [t.detach().double().requires_grad_() for t in (q, k, v, a)]
        p = torch.softmax(lv[0] @ lv[1].transpose(-1, -2) * 0.125, -1)
        ref = torch.einsum("hi,binl,bhld->bhnd", lv[3], p, lv[2]); ref.backward(g.double())
        rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()
        print("L", L, "out", rel(out, ref), "grads", [rel(t.grad, r.grad) for t, r in zip((q, k, v, a), lv)])
PYEOF
TS="taskset -c 0,1"
timeout 120 $TS $PY benchmarks/bench_attention.py --shapes "self N=4096 H=10" --batches 1 --impls sdpa dreamcoeff --budgets 8 16 64 --no-memory --rounds 3 > "$OUT/budget_sweep.txt" 2>&1
timeout 260 $TS $PY benchmarks/bench_attention.py --quick --json "$OUT/bench_attention_quick.json" > "$OUT/bench_attention_quick.txt" 2>&1
timeout 200 $TS $PY benchmarks/bench_train_step.py --quick --json "$OUT/bench_train_step_quick.json" > "$OUT/bench_train_step_quick.txt" 2>&1
echo done > "$OUT/done.txt"
