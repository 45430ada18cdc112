"""Toy example: Q/K tuning stays inside the convex hull of the values, Coeff-Tuning can leave it.

Reproduces the idea of Figure 3 of Coeff-Tuning (Miao, Chen and Qiu, CVPR 2025, arXiv 2503.18337)
with one multi-head attention layer on 2-D points, small enough to train on a CPU in seconds:

    P^i = softmax(Q^i K^i^T * s),   Q^i = X W_q^i,  K^i = X W_k^i         (s = 1/sqrt(head_dim))
    O^h = sum_i A[h, i] P^i V^h,    V^h = X W_v^h,  A = I + alpha          (alpha starts at 0)

- Input X: the four vertices of a diamond, (1,0), (0,1), (-1,0), (0,-1).
- Values: W_v^h = I for every head and frozen in every run, so each head's values are the diamond
  itself and the convex hull of the values is the diamond, the same in all runs.
- Target: the diamond turned by 45 degrees and scaled by sqrt(2), the square with corners (+-1, +-1),
  every head asked for the same square (token n -> X_n + X_{n+1}). Its corners lie outside the hull.

Three runs from the same initial weights, the same optimizer (Adam) and the same number of steps:

    qk_only       tune W_q and W_k      (A stays I)
    alpha_only    tune alpha            (W_q, W_k stay at their random init)
    qk_and_alpha  tune all three

With A = I each output row is a convex combination of its head's value rows (softmax rows are
nonnegative and sum to 1), so it is stuck in the diamond whatever W_q and W_k are: the squared
distance from each target corner to the diamond (1/2) bounds the qk_only MSE from below
(1/2 per point, 2 coordinates: MSE >= 0.25). alpha has negative entries and rows that do not sum
to 1, so A P^i is no longer a stochastic map and the output can reach the corners.

Why 8 heads: the diamond is symmetric (X_{n+2} = -X_n), so every head's output and the target are odd
(O_{n+2} = -O_n) and live in a 4-dimensional space; alpha_only moves head h's output in the span of
the H fixed vectors P^i V^h, which is that whole space once H >= 4, and comfortably well conditioned
for a random init with H = 8.

    python examples/toy_convex_hull.py --out samples [--steps 400 --seed 0]

writes DIR/toy_convex_hull.png (input, target, each run's output with the hull, MSE curves) and
DIR/toy_convex_hull.json (final MSE of each run under qk_only / alpha_only / qk_and_alpha, the
qk_only lower bound, the configuration). Deterministic for a given seed (float64 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from dreamcoeff.attention import coefficient_matrix, mixed_attention

RUNS = ("qk_only", "alpha_only", "qk_and_alpha")
RUN_TITLES = {
    "qk_only": "Q/K only (W_q, W_k tuned)",
    "alpha_only": "α only (Coeff-Tuning)",
    "qk_and_alpha": "Q/K + α",
}
TRAINABLE = {"qk_only": ("wq", "wk"), "alpha_only": ("alpha",), "qk_and_alpha": ("wq", "wk", "alpha")}


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    steps: int = 400
    heads: int = 8
    head_dim: int = 2  # dimension of queries and keys per head (values are 2-D)
    init_std: float = 1.5  # std of the random W_q, W_k entries: attention maps neither uniform nor one-hot
    lr: float = 0.05


# ---------------------------------------------------------------------------------------------
# Geometry: points, convex hull, distances


def diamond() -> torch.Tensor:
    """The input tokens X, (4, 2): vertices of a diamond, counter-clockwise."""
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)


def rotated_square(x: torch.Tensor) -> torch.Tensor:
    """The target, (4, 2): token n -> X_n + X_{n+1}, the diamond turned 45 degrees and scaled by sqrt(2)."""
    return x + x.roll(-1, dims=0)


def convex_hull(points) -> list[tuple[float, float]]:
    """Vertices of the 2-D convex hull, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted({(float(p[0]), float(p[1])) for p in points})
    if len(pts) <= 2:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _point_segment_distance(p, a, b) -> float:
    ax, ay, bx, by = b[0] - a[0], b[1] - a[1], p[0] - a[0], p[1] - a[1]
    denom = ax * ax + ay * ay
    t = 0.0 if denom == 0 else min(1.0, max(0.0, (bx * ax + by * ay) / denom))
    return math.hypot(bx - t * ax, by - t * ay)


def distance_to_hull(point, hull: list[tuple[float, float]]) -> float:
    """Euclidean distance from a point to a convex polygon (0 inside); hull counter-clockwise."""
    p = (float(point[0]), float(point[1]))
    if len(hull) == 1:
        return math.hypot(p[0] - hull[0][0], p[1] - hull[0][1])
    edges = list(zip(hull, hull[1:] + hull[:1]))
    if len(hull) >= 3 and all((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= 0 for a, b in edges):
        return 0.0
    return min(_point_segment_distance(p, a, b) for a, b in edges)


def qk_only_lower_bound(values: torch.Tensor, target: torch.Tensor) -> float:
    """Lower bound on the MSE of any output that stays in the hull of `values` (A = I).

    Every output point O_n lies in the hull, so |O_n - T_n|^2 >= dist(T_n, hull)^2; averaged over
    points and the 2 coordinates (the MSE's normalisation) that is mean_n dist(T_n, hull)^2 / 2.
    """
    hull = convex_hull(values.tolist())
    return sum(distance_to_hull(t, hull) ** 2 for t in target.tolist()) / (2 * len(target))


# ---------------------------------------------------------------------------------------------
# The attention layer and the three runs


def init_weights(config: ToyConfig) -> dict[str, torch.Tensor]:
    """Initial weights, shared by the three runs: random W_q, W_k; W_v = I (frozen); alpha = 0."""
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.heads, 2, config.head_dim)
    wq = torch.randn(shape, generator=gen, dtype=torch.float64) * config.init_std
    wk = torch.randn(shape, generator=gen, dtype=torch.float64) * config.init_std
    wv = torch.eye(2, dtype=torch.float64).expand(config.heads, 2, 2).clone()
    alpha = torch.zeros(config.heads, config.heads, dtype=torch.float64)
    return {"wq": wq, "wk": wk, "wv": wv, "alpha": alpha}


def attention_layer(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """One Coeff-Tuning self-attention layer on tokens x (N, 2) -> per-head outputs (H, N, 2)."""
    q = torch.einsum("nc,hcd->hnd", x, weights["wq"]).unsqueeze(0)
    k = torch.einsum("nc,hcd->hnd", x, weights["wk"]).unsqueeze(0)
    v = torch.einsum("nc,hcd->hnd", x, weights["wv"]).unsqueeze(0)
    return mixed_attention(q, k, v, coefficient_matrix(weights["alpha"]), scale=q.shape[-1] ** -0.5)[0]


def values(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-head value vectors (H, N, 2); fixed, since W_v is never tuned."""
    return torch.einsum("nc,hcd->hnd", x, weights["wv"])


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over heads, points and coordinates (every head has the same target)."""
    return ((out - target) ** 2).mean()


@contextmanager
def _single_thread():
    # The tensors are tiny: intra-op threads only add overhead (and contend on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(mode: str, config: ToyConfig, initial: dict[str, torch.Tensor]) -> dict:
    """Tune the parameters of `mode` (see TRAINABLE) with Adam; W_v is never tuned."""
    x = diamond()
    target = rotated_square(x)
    weights = {name: t.clone().requires_grad_(name in TRAINABLE[mode]) for name, t in initial.items()}
    optimizer = torch.optim.Adam([weights[name] for name in TRAINABLE[mode]], lr=config.lr)
    history = []
    for step in range(config.steps + 1):
        loss = mse(attention_layer(x, weights), target)
        history.append(loss.item())
        if step == config.steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = attention_layer(x, weights)
    hull = convex_hull(values(x, weights)[0].tolist())
    return {
        "mse": history[-1],
        "history": history,
        "output": out,
        "weights": {name: t.detach() for name, t in weights.items()},
        "max_distance_outside_hull": max(distance_to_hull(p, hull) for p in out.reshape(-1, 2).tolist()),
    }


def run_toy(seed: int = 0, steps: int = 400, **overrides) -> dict:
    """Run the three tunings from one initialisation. Returns input, values, target, and per run
    ('qk_only', 'alpha_only', 'qk_and_alpha') the final MSE, MSE history, outputs and weights."""
    config = ToyConfig(seed=seed, steps=steps, **overrides)
    x = diamond()
    target = rotated_square(x)
    with _single_thread():
        initial = init_weights(config)
        with torch.no_grad():
            initial_output = attention_layer(x, initial)
        runs = {mode: train(mode, config, initial) for mode in RUNS}
    vals = values(x, initial)
    return {
        "config": config,
        "input": x,
        "values": vals,
        "target": target,
        "hull": convex_hull(vals[0].tolist()),
        "initial_output": initial_output,
        "initial_mse": mse(initial_output, target).item(),
        "qk_only_lower_bound": qk_only_lower_bound(vals[0], target),
        "runs": runs,
    }


def summary(result: dict) -> dict:
    """The JSON record: final MSE per run under its name, plus the context to read it."""
    runs = result["runs"]
    return {
        **{mode: runs[mode]["mse"] for mode in RUNS},
        "qk_only_lower_bound": result["qk_only_lower_bound"],
        "initial_mse": result["initial_mse"],
        "max_distance_outside_hull": {mode: runs[mode]["max_distance_outside_hull"] for mode in RUNS},
        "alpha_only_alpha": runs["alpha_only"]["weights"]["alpha"].tolist(),
        "steps": result["config"].steps,
        "seed": result["config"].seed,
        "config": {
            **asdict(result["config"]),
            "optimizer": "Adam",
            "dtype": "float64",
            "input": result["input"].tolist(),
            "target": result["target"].tolist(),
            "values": "W_v = I for every head, frozen: every head's values are the input diamond",
            "mse": "mean over heads, points and coordinates",
        },
    }


# ---------------------------------------------------------------------------------------------
# Figure (PIL only)

_SS = 2  # supersampling factor: draw big, downsample for anti-aliased lines
_PANEL = 400  # panel width; height adds the legend strip below the plot
_TITLE_H = 58
_PLOT = 330
_LEGEND_H = 62
_PANEL_H = _TITLE_H + _PLOT + _LEGEND_H
_RUN_COLORS = {"qk_only": (31, 119, 180), "alpha_only": (230, 110, 20), "qk_and_alpha": (44, 160, 44)}
_TARGET = (214, 39, 40)
_HULL_FILL = (226, 226, 226)
_HULL_EDGE = (110, 110, 110)
_INPUT = (40, 40, 40)
_LIMIT = 1.3  # panels show [-LIMIT, LIMIT]^2


def _font(size: int):
    from PIL import ImageFont

    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "DejaVuSans.ttf",
    ):
        try:
            return ImageFont.truetype(path, size * _SS)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size * _SS)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


class _Panel:
    """Maps data coordinates in [-LIMIT, LIMIT]^2 to one panel's pixels (supersampled)."""

    def __init__(self, draw, left: int, top: int):
        self.draw, self.left, self.top = draw, left * _SS, top * _SS
        self.size = _PANEL * _SS
        self.plot_top = self.top + _TITLE_H * _SS
        self.plot = _PLOT * _SS
        self.plot_left = self.left + (self.size - self.plot) // 2

    def xy(self, p) -> tuple[float, float]:
        u = (float(p[0]) + _LIMIT) / (2 * _LIMIT)
        w = (_LIMIT - float(p[1])) / (2 * _LIMIT)
        return self.plot_left + u * self.plot, self.plot_top + w * self.plot

    def frame(self, title: str, subtitle: str = ""):
        d = self.draw
        d.rectangle(
            [self.plot_left, self.plot_top, self.plot_left + self.plot, self.plot_top + self.plot],
            outline=(170, 170, 170),
            width=_SS,
        )
        for c in (-1.0, 0.0, 1.0):
            colour = (200, 200, 200) if c == 0 else (236, 236, 236)
            d.line([self.xy((c, -_LIMIT)), self.xy((c, _LIMIT))], fill=colour, width=_SS)
            d.line([self.xy((-_LIMIT, c)), self.xy((_LIMIT, c))], fill=colour, width=_SS)
        d.text((self.left + self.size // 2, self.top + 6 * _SS), title, font=_font(17), fill=(0, 0, 0), anchor="mt")
        if subtitle:
            d.text(
                (self.left + self.size // 2, self.top + 31 * _SS),
                subtitle,
                font=_font(14),
                fill=(60, 60, 60),
                anchor="mt",
            )

    def hull(self, hull):
        self.draw.polygon([self.xy(p) for p in hull], fill=_HULL_FILL, outline=_HULL_EDGE, width=2 * _SS)

    def polygon(self, points, colour, width=2, dashed=False):
        pts = [self.xy(p) for p in points] + [self.xy(points[0])]
        for a, b in zip(pts, pts[1:]):
            if not dashed:
                self.draw.line([a, b], fill=colour, width=width * _SS)
                continue
            length = math.hypot(b[0] - a[0], b[1] - a[1])
            dash = 9 * _SS
            for i in range(0, int(length // dash) + 1, 2):
                t0, t1 = i * dash / length, min(1.0, (i + 1) * dash / length)
                self.draw.line(
                    [
                        (a[0] + t0 * (b[0] - a[0]), a[1] + t0 * (b[1] - a[1])),
                        (a[0] + t1 * (b[0] - a[0]), a[1] + t1 * (b[1] - a[1])),
                    ],
                    fill=colour,
                    width=width * _SS,
                )

    def dots(self, points, colour, radius=5, outline=None):
        r = radius * _SS
        for p in points:
            x, y = self.xy(p)
            self.draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=outline, width=_SS)

    def segments(self, starts, ends, colour, width=1):
        for a, b in zip(starts, ends):
            self.draw.line([self.xy(a), self.xy(b)], fill=colour, width=width * _SS)

    def crosses(self, points, colour, radius=7):
        r = radius * _SS
        for p in points:
            x, y = self.xy(p)
            self.draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3 * _SS)
            self.draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3 * _SS)

    def legend(self, entries):
        """entries: list of (kind, colour, label); kind in 'hull', 'dot', 'cross', 'dash'."""
        d, font = self.draw, _font(12)
        x0 = self.plot_left + 4 * _SS
        y = self.plot_top + self.plot + 5 * _SS
        for kind, colour, label in entries:
            cy = y + 7 * _SS
            if kind == "hull":
                d.rectangle(
                    [x0, cy - 5 * _SS, x0 + 14 * _SS, cy + 5 * _SS], fill=_HULL_FILL, outline=_HULL_EDGE, width=_SS
                )
            elif kind == "dot":
                d.ellipse([x0 + 2 * _SS, cy - 5 * _SS, x0 + 12 * _SS, cy + 5 * _SS], fill=colour)
            elif kind == "cross":
                d.line([(x0 + 2 * _SS, cy - 5 * _SS), (x0 + 12 * _SS, cy + 5 * _SS)], fill=colour, width=3 * _SS)
                d.line([(x0 + 2 * _SS, cy + 5 * _SS), (x0 + 12 * _SS, cy - 5 * _SS)], fill=colour, width=3 * _SS)
            elif kind == "dash":
                d.line([(x0, cy), (x0 + 5 * _SS, cy)], fill=colour, width=2 * _SS)
                d.line([(x0 + 9 * _SS, cy), (x0 + 14 * _SS, cy)], fill=colour, width=2 * _SS)
            d.text((x0 + 20 * _SS, cy), label, font=font, fill=(30, 30, 30), anchor="lm")
            y += 17 * _SS


def _blend(colour, amount):
    """Mix a colour with white (amount 0 = white, 1 = colour)."""
    return tuple(int(255 + (c - 255) * amount) for c in colour)


def _loss_panel(draw, left: int, top: int, result: dict):
    runs, steps = result["runs"], result["config"].steps
    x0, y0 = (left + 62) * _SS, (top + _TITLE_H) * _SS
    w, h = (_PANEL - 80) * _SS, _PLOT * _SS
    lo, hi = -8, 0  # log10 MSE axis

    def xy(step, value):
        y = min(hi, max(lo, math.log10(max(value, 1e-300))))
        return x0 + step / max(1, steps) * w, y0 + (hi - y) / (hi - lo) * h

    draw.text(
        ((left + _PANEL // 2) * _SS, (top + 6) * _SS), "MSE to the target", font=_font(17), fill=(0, 0, 0), anchor="mt"
    )
    draw.text(
        ((left + _PANEL // 2) * _SS, (top + 31) * _SS),
        f"Adam, lr {result['config'].lr}, log scale, floor 1e-8",
        font=_font(14),
        fill=(60, 60, 60),
        anchor="mt",
    )
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(170, 170, 170), width=_SS)
    for e in range(lo, hi + 1, 2):
        _, y = xy(0, 10.0**e)
        draw.line([(x0, y), (x0 + w, y)], fill=(236, 236, 236), width=_SS)
        draw.text((x0 - 6 * _SS, y), f"1e{e}", font=_font(12), fill=(60, 60, 60), anchor="rm")
    for s in (0, steps // 2, steps):
        x, _ = xy(s, 1.0)
        draw.text((x, y0 + h + 6 * _SS), str(s), font=_font(12), fill=(60, 60, 60), anchor="mt")
    draw.text((x0 + w // 2, y0 + h + 24 * _SS), "step", font=_font(12), fill=(60, 60, 60), anchor="mt")
    # the hull bound: no output inside the hull can do better
    bound = result["qk_only_lower_bound"]
    _, yb = xy(0, bound)
    for i in range(0, w, 14 * _SS):
        draw.line([(x0 + i, yb), (x0 + min(w, i + 7 * _SS), yb)], fill=_HULL_EDGE, width=2 * _SS)
    draw.text(
        (x0 + w - 4 * _SS, yb + 4 * _SS),
        f"hull bound {bound:.2f} (lowest MSE inside the hull)",
        font=_font(12),
        fill=_HULL_EDGE,
        anchor="rt",
    )
    for mode in RUNS:
        pts = [xy(s, v) for s, v in enumerate(runs[mode]["history"])]
        draw.line(pts, fill=_RUN_COLORS[mode], width=3 * _SS, joint="curve")
    y = y0 + 52 * _SS  # legend in the empty upper-right region, under the bound's label
    for mode in RUNS:
        lx = x0 + int(0.38 * w)
        draw.line([(lx, y), (lx + 18 * _SS, y)], fill=_RUN_COLORS[mode], width=3 * _SS)
        draw.text((lx + 24 * _SS, y), RUN_TITLES[mode], font=_font(12), fill=(30, 30, 30), anchor="lm")
        y += 17 * _SS


def draw_figure(result: dict, path: str) -> None:
    """Two rows of three panels: input | target | MSE curves, then the three runs' outputs."""
    from PIL import Image, ImageDraw

    width, height = 3 * _PANEL, 2 * _PANEL_H + 40
    img = Image.new("RGB", (width * _SS, height * _SS), "white")
    draw = ImageDraw.Draw(img)
    hull, x, target = result["hull"], result["input"].tolist(), result["target"].tolist()
    heads = result["config"].heads
    draw.text(
        (width // 2 * _SS, 10 * _SS),
        f"One attention layer, {heads} heads, W_v frozen: tuning W_q/W_k moves outputs only inside the "
        "convex hull of the values; α can leave it",
        font=_font(15),
        fill=(0, 0, 0),
        anchor="mt",
    )
    top = 40

    p = _Panel(draw, 0, top)
    p.frame("Input X (= values V^h)", "diamond; grey: convex hull of values")
    p.hull(hull)
    init = result["initial_output"]
    for h in range(heads):
        p.dots(init[h].tolist(), _blend((90, 90, 90), 0.55), radius=3)
    p.polygon(x, _INPUT, width=2)
    p.dots(x, _INPUT, radius=6)
    p.legend(
        [
            ("hull", None, "convex hull of values"),
            ("dot", _INPUT, "input X"),
            ("dot", _blend((90, 90, 90), 0.55), f"initial output ({heads} heads)"),
        ]
    )

    p = _Panel(draw, _PANEL, top)
    p.frame("Target O", "rotated square, outside the hull")
    p.hull(hull)
    p.polygon(target, _TARGET, width=2, dashed=True)
    p.crosses(target, _TARGET)
    p.legend([("hull", None, "convex hull of values"), ("cross", _TARGET, "target (every head)")])

    _loss_panel(draw, 2 * _PANEL, top, result)

    for col, mode in enumerate(RUNS):
        run, colour = result["runs"][mode], _RUN_COLORS[mode]
        p = _Panel(draw, col * _PANEL, top + _PANEL_H)
        p.frame(RUN_TITLES[mode], f"final MSE {run['mse']:.2e}")
        p.hull(hull)
        p.polygon(target, _TARGET, width=2, dashed=True)
        p.crosses(target, _TARGET)
        out = run["output"]
        for h in range(heads):  # error vectors: output -> its target point
            p.segments(out[h].tolist(), target, _blend(colour, 0.6), width=1)
        for h in range(heads):
            p.dots(out[h].tolist(), colour, radius=5, outline=(255, 255, 255))
        p.legend(
            [
                ("hull", None, "convex hull of values"),
                ("cross", _TARGET, "target"),
                ("dot", colour, f"output of each of the {heads} heads (line: error)"),
            ]
        )

    img = img.resize((width, height), Image.LANCZOS)
    img.save(path)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory for toy_convex_hull.png/.json")
    parser.add_argument("--steps", type=int, default=ToyConfig.steps, help="Adam steps per run")
    parser.add_argument("--seed", type=int, default=ToyConfig.seed, help="seed of the random W_q, W_k")
    parser.add_argument("--heads", type=int, default=ToyConfig.heads, help="attention heads")
    parser.add_argument("--lr", type=float, default=ToyConfig.lr, help="Adam learning rate")
    args = parser.parse_args(argv)

    result = run_toy(seed=args.seed, steps=args.steps, heads=args.heads, lr=args.lr)
    os.makedirs(args.out, exist_ok=True)
    record = summary(result)
    with open(os.path.join(args.out, "toy_convex_hull.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    draw_figure(result, os.path.join(args.out, "toy_convex_hull.png"))
    for mode in RUNS:
        print(
            f"{mode:>13}: final MSE {record[mode]:.3e}  "
            f"(max distance outside hull {record['max_distance_outside_hull'][mode]:.3f})"
        )
    print(f"qk_only lower bound (target's squared distance to the hull): {record['qk_only_lower_bound']:.3f}")
    print(f"wrote {os.path.join(args.out, 'toy_convex_hull.png')} and toy_convex_hull.json")
    return record


if __name__ == "__main__":
    main()
