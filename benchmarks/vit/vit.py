"""A small ViT with ViT-B's head count (12 heads) whose attention calls dreamcoeff's own
`mixed_attention`, plus the procedural renderer and the downstream tasks of the positive control.

Kept in one file so the test (tests/test_vit_control.py) and the runner (run.py) import one thing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamcoeff.attention import coefficient_matrix, mixed_attention

HEADS = 12
WIDTH = 96  # head dim 8: the CPU budget, not ViT-B's 64
DEPTH = 4
PATCH = 8
IMAGE = 32
ALPHA_KINDS = ("full", "diag", "offdiag", "zero_row_sum")


class Attention(nn.Module):
    """Multi-head self-attention; with alpha on, heads mix maps through A = I + alpha (mixed_attention)."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.alpha: nn.Parameter | None = None
        self.alpha_kind = "full"

    def enable_alpha(self, kind: str = "full") -> None:
        """Add the zero-initialised residual alpha (H x H), so the layer starts exactly as before.

        `kind` (the head-mixing ablation, issue 35 part 4): "full" every entry; "diag" the diagonal
        only (a gain per head: no mixing at all); "offdiag" the off-diagonal only (mixing, no gain of a
        head on its own map); "zero_row_sum" each row minus its mean (mixing that keeps every head's
        total weight: the trainer's --coeff_zero_row_sum, as a reparametrisation)."""
        if kind not in ALPHA_KINDS:
            raise ValueError(f"alpha kind {kind!r}: expected one of {ALPHA_KINDS}")
        self.alpha = nn.Parameter(torch.zeros(self.heads, self.heads))
        self.alpha_kind = kind

    def effective_alpha(self) -> torch.Tensor:
        """alpha as the layer uses it (masked or centred by `alpha_kind`)."""
        alpha, eye = self.alpha, torch.eye(self.heads, dtype=self.alpha.dtype, device=self.alpha.device)
        if self.alpha_kind == "diag":
            return alpha * eye
        if self.alpha_kind == "offdiag":
            return alpha * (1 - eye)
        if self.alpha_kind == "zero_row_sum":
            return alpha - alpha.mean(dim=-1, keepdim=True)
        return alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.alpha is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            coeff = coefficient_matrix(self.effective_alpha(), training=self.training)
            out = mixed_attention(q, k, v, coeff)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, DEPTH pre-norm blocks, a linear head on the class token."""

    def __init__(self, classes: int, width: int = WIDTH, depth: int = DEPTH):
        super().__init__()
        tokens = (IMAGE // PATCH) ** 2 + 1
        self.embed = nn.Conv2d(3, width, PATCH, PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def enable_alpha(self, kind: str = "full") -> None:
        for block in self.blocks:
            block.attn.enable_alpha(kind)


# ---------------------------------------------------------------- renderer
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "hbar", "vbar", "star", "ellipse")
COLOURS = np.array(
    [[1, 0.1, 0.1], [0.1, 0.9, 0.1], [0.2, 0.3, 1], [1, 0.9, 0.1], [0.9, 0.2, 0.9], [0.1, 0.9, 0.9]], np.float32
)
_GRID = (np.arange(IMAGE, dtype=np.float32) + 0.5)[None, :]


def shape_mask(shape: str, cx, cy, r, theta) -> np.ndarray:
    """(N, IMAGE, IMAGE) boolean mask of `shape` at centres cx, cy, radius r, rotation theta (arrays of N)."""
    col = (cx, cy, r, theta)
    cx, cy, r, theta = (np.asarray(a, np.float32)[:, None, None] for a in col)
    x0, y0 = _GRID[:, None, :] - cx, _GRID[:, :, None] - cy
    x = (x0 * np.cos(theta) + y0 * np.sin(theta)) / r
    y = (-x0 * np.sin(theta) + y0 * np.cos(theta)) / r
    rad = np.sqrt(x * x + y * y)
    if shape == "circle":
        return rad < 1
    if shape == "square":
        return (abs(x) < 0.8) & (abs(y) < 0.8)
    if shape == "triangle":
        return (y < 0.7) & (y > 1.7 * abs(x) - 1.0)
    if shape == "diamond":
        return abs(x) + abs(y) < 1
    if shape == "ring":
        return (rad < 1) & (rad > 0.55)
    if shape == "cross":
        return ((abs(x) < 0.3) | (abs(y) < 0.3)) & (abs(x) < 1) & (abs(y) < 1)
    if shape == "hbar":
        return (abs(x) < 1.1) & (abs(y) < 0.3)
    if shape == "vbar":
        return (abs(x) < 0.3) & (abs(y) < 1.1)
    if shape == "star":
        ang = np.arctan2(y, x)
        return rad < 0.55 + 0.4 * np.cos(5 * ang)
    if shape == "ellipse":
        return (x / 1.1) ** 2 + (y / 0.5) ** 2 < 1
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.uniform(0, 0.35, (n, 3, 1, 1)).astype(np.float32)
    return base + rng.normal(0, 0.05, (n, 3, IMAGE, IMAGE)).astype(np.float32)


def paint(images: np.ndarray, mask: np.ndarray, colours: np.ndarray) -> None:
    """Paint `colours` (N, 3) into `images` (N, 3, H, W) where `mask` (N, H, W) is set, in place."""
    images[:] = np.where(mask[:, None], colours[:, :, None, None], images)


def source_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pretraining task: shape x colour (first 8 shapes x 6 colours = 48 classes), random place, size, angle."""
    shape_id, colour_id = rng.integers(0, 8, n), rng.integers(0, len(COLOURS), n)
    images = _background(rng, n)
    cx, cy = rng.uniform(9, 23, n), rng.uniform(9, 23, n)
    r, theta = rng.uniform(5, 8, n), rng.uniform(0, np.pi, n)
    for s in range(8):
        idx = np.flatnonzero(shape_id == s)
        if len(idx):
            m = shape_mask(SHAPES[s], cx[idx], cy[idx], r[idx], theta[idx])
            sub = images[idx]
            paint(sub, m, COLOURS[colour_id[idx]])
            images[idx] = sub
    return images, shape_id * len(COLOURS) + colour_id


def _one_each(rng, n, shape, cx, cy, r, theta, images):
    colours = COLOURS[rng.integers(0, len(COLOURS), n)] * rng.uniform(0.7, 1.0, (n, 1)).astype(np.float32)
    paint(images, shape_mask(shape, cx, cy, r, theta), colours)


def position_task(rng, n):
    """Where the object is: its centre's cell in a 3 x 3 grid (9 classes); shapes star / ellipse / ring."""
    label = rng.integers(0, 9, n)
    cx = (label % 3) * 10.67 + rng.uniform(2.5, 8.2, n)
    cy = (label // 3) * 10.67 + rng.uniform(2.5, 8.2, n)
    images = _background(rng, n)
    shapes = rng.integers(0, 3, n)
    for s, name in enumerate(("star", "ellipse", "ring")):
        idx = np.flatnonzero(shapes == s)
        sub = images[idx]
        _one_each(rng, len(idx), name, cx[idx], cy[idx], np.full(len(idx), 3.0), rng.uniform(0, 6.3, len(idx)), sub)
        images[idx] = sub
    return images, label


def count_task(rng, n):
    """How many small circles (1 to 6, classes 0..5), placed at random without regard to overlap."""
    label = rng.integers(0, 6, n)
    images = _background(rng, n)
    for j in range(6):
        idx = np.flatnonzero(label >= j)
        sub = images[idx]
        m = len(idx)
        _one_each(rng, m, "circle", rng.uniform(3, 29, m), rng.uniform(3, 29, m), np.full(m, 2.3), np.zeros(m), sub)
        images[idx] = sub
    return images, label


def orientation_task(rng, n):
    """The angle of one elongated ellipse in 8 bins over [0, pi) (unseen shape in the source task)."""
    label = rng.integers(0, 8, n)
    theta = (label + rng.uniform(0.1, 0.9, n)) * np.pi / 8
    images = _background(rng, n)
    r = rng.uniform(8, 11, n)
    _one_each(rng, n, "ellipse", rng.uniform(13, 19, n), rng.uniform(13, 19, n), r, theta, images)
    return images, label


def digits_task() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (1,797 images, 10 classes), upsampled to 32x32 grey RGB."""
    from sklearn.datasets import load_digits  # benchmark-only dependency

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x.numpy(), data.target


def downstream(task: str, seed: int = 1234) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The task's 800 train / 200 val / test split (test 1,000 rendered, 797 for digits), fixed by `seed`."""
    if task == "digits":
        x, y = digits_task()
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    else:
        rng = np.random.default_rng(seed)
        x, y = {"position": position_task, "count": count_task, "orientation": orientation_task}[task](rng, 2000)
    t = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))  # noqa: E731
    return {"train": t(x[:800], y[:800]), "val": t(x[800:1000], y[800:1000]), "test": t(x[1000:], y[1000:])}


TASKS = ("position", "count", "orientation", "digits")
CLASSES = {"position": 9, "count": 6, "orientation": 8, "digits": 10}
