"""See alpha: which blocks and heads a run moved, as pictures, an HTML page and a text summary.

    dreamcoeff-inspect runs/dog-coeff --output inspect/dog

A LoRA delta has no per-head reading; alpha does: each layer's H x H matrix says how much of head
i's attention map head h now reads (A = I + alpha). `summarize` measures every layer (mean and
largest |alpha|, self- vs cross-attention, UNet block), `overview_image` draws the per-layer bars
grouped by block and the heatmaps of the layers that moved most (diverging colours centred at 0,
one shared scale bar), and `main` writes ``overview.png``, ``index.html`` and prints the summary.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .io import atomic_write
from .loading import read_run

__all__ = ["LayerSummary", "heatmap", "main", "overview_image", "summarize"]

_ATTN_COLOURS = {"attn1": (31, 119, 180), "attn2": (214, 39, 40)}


@dataclass(frozen=True)
class LayerSummary:
    """One layer's alpha in numbers."""

    path: str  # e.g. down_blocks.2.attentions.1.transformer_blocks.3.attn2
    block: str  # down_blocks.2 / mid_block / up_blocks.0
    kind: str  # attn1 (self-attention) or attn2 (cross-attention)
    heads: int
    mean_abs: float  # mean |alpha| over all H x H entries
    off_diagonal: float  # mean |alpha[h, i]| for h != i: how much heads read other heads' maps
    largest: float  # the largest |entry|
    largest_at: tuple[int, int]  # (h, i) of it: head h reads head i's map


def summarize(tensors: Mapping[str, torch.Tensor]) -> list[LayerSummary]:
    """A `LayerSummary` per ``unet.<path>.alpha`` tensor, in UNet order."""
    out = []
    for key, alpha in tensors.items():
        path = key.removeprefix("unet.").removesuffix(".alpha")
        parts = path.split(".")
        block = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
        a = alpha.detach().double().abs()
        h = a.shape[0]
        off = (a.sum() - a.diagonal().sum()) / max(1, h * h - h)
        flat = int(a.argmax())
        out.append(LayerSummary(path, block, parts[-1], h, float(a.mean()), float(off), float(a.max()),
                                (flat // h, flat % h)))  # fmt: skip
    return out


def _colour(value: float, vmax: float) -> tuple[int, int, int]:
    """Diverging blue - white - red, centred at 0, saturating at +-vmax."""
    t = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    if t >= 0:
        return (255, int(255 * (1 - t)), int(255 * (1 - t)))
    return (int(255 * (1 + t)), int(255 * (1 + t)), 255)


def heatmap(alpha: torch.Tensor, vmax: float, cell: int = 8) -> Image.Image:
    """An H x H heatmap of alpha (row h = the head that reads, column i = the head whose map it reads)."""
    a = alpha.detach().double().cpu().numpy()
    h = a.shape[0]
    img = Image.new("RGB", (h * cell, h * cell), "white")
    d = ImageDraw.Draw(img)
    for r in range(h):
        for c in range(h):
            d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=_colour(a[r, c], vmax))
    return img


def _bars(summary: Sequence[LayerSummary], width: int, height: int, font) -> Image.Image:
    """mean |alpha| per layer, grouped by UNet block, coloured by attn1 / attn2."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    top = max((s.mean_abs for s in summary), default=0.0) or 1.0
    x0, y0, y1 = 60, 24, height - 40
    step = (width - x0 - 10) / max(1, len(summary))
    d.text((4, 2), "mean |alpha| per layer (blue: self-attention attn1, red: cross-attention attn2)", fill="black",
           font=font)  # fmt: skip
    d.line([(x0, y1), (width - 10, y1)], fill="black")
    d.text((4, y0 - 6), f"{top:.3g}", fill="black", font=font)
    d.text((4, y1 - 6), "0", fill="black", font=font)
    previous = None
    for k, s in enumerate(summary):
        x = x0 + k * step
        bar_top = y1 - (y1 - y0) * s.mean_abs / top
        d.rectangle([x + 1, bar_top, x + max(2, step) - 1, y1], fill=_ATTN_COLOURS.get(s.kind, (90, 90, 90)))
        if s.block != previous:
            d.line([(x, y0), (x, y1 + 6)], fill=(150, 150, 150))
            d.text((x + 2, y1 + 8), s.block.replace("_blocks", ""), fill="black", font=font)
            previous = s.block
    return img


def overview_image(tensors: Mapping[str, torch.Tensor], top: int = 12, title: str = "") -> Image.Image:
    """Bars of every layer, then the heatmaps of the `top` layers with the largest mean |alpha|,
    labelled, with one shared diverging scale bar."""
    from .grids import label_font

    font = label_font(12)
    summary = summarize(tensors)
    shown = sorted(summary, key=lambda s: -s.mean_abs)[:top]
    vmax = max((s.largest for s in shown), default=0.0) or 1.0
    cell = max(4, min(16, 160 // max((s.heads for s in shown), default=1)))
    tiles = [heatmap(tensors[f"unet.{s.path}.alpha"], vmax, cell) for s in shown]
    tile = max((t.width for t in tiles), default=cell)
    cols = 4
    rows = -(-len(tiles) // cols)
    width = max(760, cols * (tile + 40) + 20)
    bars = _bars(summary, width, 220, font)
    label_h = 34
    height = 30 + bars.height + rows * (tile + label_h + 10) + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), title or f"alpha of {len(summary)} layers", fill="black", font=font)
    img.paste(bars, (0, 26))
    y = 30 + bars.height
    d.text((10, y - 4), f"the {len(shown)} layers that moved most (row: reading head h, column: head i whose map "
           "it reads)", fill="black", font=font)  # fmt: skip
    for k, (s, t) in enumerate(zip(shown, tiles)):
        x, ty = 20 + (k % cols) * (tile + 40), y + 14 + (k // cols) * (tile + label_h + 10)
        name = s.path.replace("transformer_blocks.", "tb").replace("attentions.", "at")
        d.text((x, ty), name, fill="black", font=font)
        d.text((x, ty + 14), f"{s.heads} heads, mean |a| {s.mean_abs:.3g}", fill="black", font=font)
        img.paste(t, (x, ty + label_h - 4))
    # the scale bar: -vmax (blue) .. 0 (white) .. +vmax (red)
    sy = height - 40
    for px in range(300):
        d.line([(20 + px, sy), (20 + px, sy + 12)], fill=_colour((px / 299 * 2 - 1) * vmax, vmax))
    d.rectangle([20, sy, 319, sy + 12], outline="black")
    for frac, text in ((0.0, f"-{vmax:.3g}"), (0.5, "0"), (1.0, f"+{vmax:.3g}")):
        d.text((20 + frac * 290, sy + 16), text, fill="black", font=font)
    return img


def summary_text(summary: Sequence[LayerSummary], top: int = 5) -> str:
    """What moved, in a few lines: totals, self- vs cross-attention, by block, the largest entries."""
    if not summary:
        return "no alpha layers"
    lines = [f"{len(summary)} layers, {sum(s.heads**2 for s in summary):,} coefficients"]
    for kind, label in (("attn1", "self-attention (attn1)"), ("attn2", "cross-attention (attn2)")):
        part = [s.mean_abs for s in summary if s.kind == kind]
        if part:
            lines.append(f"  {label:24s} mean |alpha| {np.mean(part):.4g} over {len(part)} layers")
    for block in dict.fromkeys(s.block for s in summary):
        part = [s.mean_abs for s in summary if s.block == block]
        lines.append(f"  {block:24s} mean |alpha| {np.mean(part):.4g}")
    lines.append("largest entries (head h reads head i's map):")
    for s in sorted(summary, key=lambda s: -s.largest)[:top]:
        lines.append(f"  {s.largest:.4g} at h={s.largest_at[0]}, i={s.largest_at[1]} in {s.path}")
    return "\n".join(lines)


def _html(summary: Sequence[LayerSummary], source: Path, text: str) -> str:
    rows = "\n".join(
        f"<tr><td>{html.escape(s.path)}</td><td>{s.block}</td><td>{s.kind}</td><td>{s.heads}</td>"
        f"<td>{s.mean_abs:.4g}</td><td>{s.off_diagonal:.4g}</td><td>{s.largest:.4g} at {s.largest_at}</td></tr>"
        for s in sorted(summary, key=lambda s: -s.mean_abs)
    )
    return f"""<!doctype html><meta charset="utf-8"><title>alpha of {html.escape(str(source))}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:left}}tr:nth-child(even){{background:#f4f4f4}}</style>
<h1>alpha of <code>{html.escape(str(source))}</code></h1>
<pre>{html.escape(text)}</pre>
<img src="overview.png" alt="per-layer |alpha| and the heatmaps of the layers that moved most">
<h2>Every layer, most moved first</h2>
<table><tr><th>layer</th><th>block</th><th>kind</th><th>heads</th><th>mean |alpha|</th><th>off-diagonal</th><th>largest</th></tr>
{rows}
</table>
"""


def main(argv: list[str] | None = None) -> int:
    """`dreamcoeff-inspect RUN_OR_FILE --output DIR`: overview.png, index.html and a text summary."""
    p = argparse.ArgumentParser(prog="dreamcoeff-inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training output folder or a coeff_weights.safetensors file (a checkpoint too)")
    p.add_argument("--output", required=True, help="folder for overview.png and index.html")
    p.add_argument("--top", type=int, default=12, help="heatmaps of this many most-moved layers")
    args = p.parse_args(argv)
    try:
        tensors, _ = read_run(args.run).read_alpha()  # the run loader: the same reader as load_run and the sampler
    except ValueError as exc:  # RunLoadError (no alpha there) or CoeffWeightsError (the file), naming it
        print(f"dreamcoeff-inspect: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(tensors)
    text = summary_text(summary)
    image = overview_image(tensors, args.top, title=f"alpha of {args.run}")
    atomic_write(out / "overview.png", lambda tmp: image.save(tmp, format="PNG"))
    page = _html(summary, Path(args.run), text)
    atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    print(text)
    print(f"wrote {out / 'overview.png'} and {out / 'index.html'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
