"""ViT positive control: pretrain on the rendered source task, then transfer (VTAB-1k protocol).

    python benchmarks/vit/run.py pretrain --seconds 240      # -> build/vit_pretrained.pt (+ sha256)
    python benchmarks/vit/run.py transfer                    # appends to benchmarks/vit/results.jsonl
    python benchmarks/vit/run.py report                      # results.json + the README table

Transfer is resumable: a (task, method, seed, lr) already in results.jsonl is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vit  # noqa: E402

from dreamcoeff.io import atomic_write  # noqa: E402

HERE = Path(__file__).resolve().parent
WEIGHTS = Path(os.environ.get("VIT_WEIGHTS", HERE.parents[1] / "build" / "vit_pretrained.pt"))
RAW = HERE / "results.jsonl"
METHODS = ("linear", "alpha", "lora", "alpha_lora", "full")
# The head-mixing ablation (issue 35 part 4): alpha restricted as vit.Attention.enable_alpha says.
ABLATION = {"alpha_diag": "diag", "alpha_offdiag": "offdiag", "alpha_zero_row_sum": "zero_row_sum"}
LRS = {  # a factor ~3 apart per method; the last value of each was added after the first pass
    # (03:30) picked the top of the first three for alpha, LoRA, alpha+LoRA and full (edge of the grid)
    "linear": (3e-3, 1e-2, 3e-2),
    "alpha": (3e-3, 1e-2, 3e-2, 1e-1),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "alpha_lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "full": (1e-4, 3e-4, 1e-3, 3e-3),
    # the ablation at alpha's own four rates (fixed before any ablation run)
    **{name: (3e-3, 1e-2, 3e-2, 1e-1) for name in ABLATION},
}
# The first ablation pass picked alpha_diag's top rate (1e-1) on 3 of 4 tasks (the grid's
# edge), so one more rate a factor ~3 up, as the first pass did for the other methods
# Then 3e-1 won on 2 of 4 tasks (the edge again): the same rule once more, 1.0
LRS["alpha_diag"] = (*LRS["alpha_diag"], 3e-1, 1.0)
STEPS, BATCH = 60, 64


def pretrain(seconds: float, seed: int = 0) -> None:
    """Train the ViT on shape x colour (48 classes) from freshly rendered batches for `seconds`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = vit.ViT(48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start, step = time.time(), 0
    while time.time() - start < seconds:
        x, y = vit.source_batch(rng, 128)
        loss = F.cross_entropy(model(torch.tensor(x)), torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    x, y = vit.source_batch(np.random.default_rng(999), 2000)
    model.eval()
    with torch.no_grad():
        acc = (model(torch.tensor(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    WEIGHTS.parent.mkdir(exist_ok=True)
    atomic_write(WEIGHTS, lambda tmp: torch.save(model.state_dict(), tmp))
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    info = {"steps": step, "seconds": seconds, "batch": 128, "source_acc_heldout_2000": acc, "sha256": sha}
    (HERE / "pretrain_log.json").write_text(json.dumps(info, indent=1) + "\n")
    print(info)


def build(method: str, classes: int, seed: int) -> torch.nn.Module:
    """The pretrained ViT with a fresh head and only `method`'s parameters trainable."""
    torch.manual_seed(seed)
    model = vit.ViT(48)
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    model.head = torch.nn.Linear(vit.WIDTH, classes)
    if "lora" in method:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"], lora_dropout=0.0)
        model = inject_adapter_in_model(cfg, model)
    if "alpha" in method:
        model.enable_alpha(ABLATION.get(method, "full"))
    for name, p in model.named_parameters():
        p.requires_grad = method == "full" or name.startswith("head.") or "lora_" in name or name.endswith(".alpha")
    return model


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_one(task: str, data: dict, method: str, seed: int, lr: float) -> dict:
    model = build(method, vit.CLASSES[task], seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    gen = torch.Generator().manual_seed(seed)
    x, y = data["train"]
    start = time.time()
    for _ in range(STEPS):
        model.train()
        idx = torch.randint(0, len(y), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    alphas = [b.attn.alpha for b in model.blocks if b.attn.alpha is not None]
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "lr": lr,
        "val": accuracy(model, *data["val"]),
        "test": accuracy(model, *data["test"]),
        "trainable": sum(p.numel() for p in params),
        "trainable_no_head": sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")
        ),
        "alpha_abs_mean": (
            float(torch.stack([b.attn.effective_alpha().detach().abs().mean() for b in model.blocks]).mean())
            if alphas
            else None
        ),
        # free entries per layer: diag H; offdiag H (H - 1); zero_row_sum H (H - 1) (each row's mean is removed)
        "alpha_free": sum(
            {"diag": 12, "offdiag": 132, "zero_row_sum": 132}.get(ABLATION.get(method, ""), 144) for _ in alphas
        ),
        "final_loss": loss.item(),
        "seconds": time.time() - start,
    }


def transfer(seeds: list[int], tasks: list[str], methods: list[str]) -> None:
    torch.set_num_threads(1)
    done = set()
    if RAW.exists():
        for line in RAW.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["method"], r["seed"], r["lr"]))
    datasets = {t: vit.downstream(t) for t in tasks}
    for seed in seeds:  # seed-major: a cut-off run leaves every cell with the same seeds
        for task in tasks:
            for method in methods:
                for lr in LRS[method]:
                    if (task, method, seed, lr) in done:
                        continue
                    r = train_one(task, datasets[task], method, seed, lr)
                    with RAW.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("pretrain", "transfer"))
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(vit.TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=(*METHODS, *ABLATION))
    args = ap.parse_args()
    if args.phase == "pretrain":
        torch.set_num_threads(1)
        pretrain(args.seconds)
    else:
        transfer(args.seeds, args.tasks, args.methods)


if __name__ == "__main__":
    main()
