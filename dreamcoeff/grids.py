"""Labelled image grids (:func:`make_grid`): the sampler's comparisons, the trainer's validation strips.

Labels are word-wrapped to the tile width (:func:`wrap_text`) and cut with "..." past a line limit,
so long prompts make taller headers, never wider tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["label_font", "make_grid", "wrap_text"]

#: The fonts Pillow's ``load_default`` returns (a bitmap font before Pillow 10.1).
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def label_font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has a fixed-size bitmap font only
        return ImageFont.load_default()


def wrap_text(text: str, font: Font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels (explicit newlines kept, overlong words split)."""
    lines: list[str] = []
    max_width = max(1, int(max_width))
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > max_width:
                cut = max(1, max(k for k in range(1, len(word) + 1) if k == 1 or font.getlength(word[:k]) <= max_width))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _fit_lines(lines: list[str], max_lines: int, font: Font, max_width: int) -> list[str]:
    if len(lines) <= max_lines:
        return lines
    kept = lines[: max(1, max_lines)]
    last = kept[-1]
    while last and font.getlength(last + "...") > max_width:
        last = last[:-1]
    kept[-1] = last + "..."
    return kept


def _check_shape(
    rows: list[list[Image.Image | None]], row_labels: Sequence[str] | None, col_labels: Sequence[str] | None
) -> int:
    """The number of columns; ValueError for an empty grid, ragged rows or label counts that differ."""
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with at least one image")
    ncols = len(rows[0])
    if any(len(r) != ncols for r in rows):
        raise ValueError(f"make_grid: rows have different lengths {[len(r) for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"make_grid: {len(col_labels)} column labels for {ncols} columns")
    return ncols


def _tile_size(
    rows: list[list[Image.Image | None]], tile_size: int | None, min_tile_size: int, max_tile_size: int | None
) -> tuple[int, int]:
    """Tile width and height from the first image (see :func:`make_grid`'s ``tile_size``)."""
    first = next((im for r in rows for im in r if im is not None), None)
    w0, h0 = first.size if first is not None else (min_tile_size, min_tile_size)
    longest = max(w0, h0)
    if tile_size:
        scale = tile_size / longest
    elif longest < min_tile_size:
        scale = math.ceil(min_tile_size / longest)
    elif max_tile_size and longest > max_tile_size:
        scale = max_tile_size / longest
    else:
        scale = 1
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


@dataclass
class _Layout:
    """Where everything of a grid goes: tile size, font and line metrics, wrapped labels, margins."""

    tw: int
    th: int
    gap: int
    font: Font
    line_h: int
    pad: int
    title_lines: list[str]
    col_lines: list[list[str]]
    row_lines: list[list[str]]
    title_h: int
    x0: int  # left edge of the first tile
    y0: int  # top edge of the first tile
    width: int
    height: int


def _layout(
    nrows: int,
    ncols: int,
    tile: tuple[int, int],
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    title: str | None,
    font_size: int | None,
    gap: int,
    max_label_lines: int,
) -> _Layout:
    """Fonts, wrapped labels and margins for an ``nrows`` x ``ncols`` grid of ``tile``-sized tiles."""
    tw, th = tile
    font_size = font_size or max(12, min(28, tw // 12))
    font = label_font(font_size)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + max(2, font_size // 6)
    pad = max(3, font_size // 3)

    col_lines = [
        _fit_lines(wrap_text(t, font, tw - 2 * pad), max_label_lines, font, tw - 2 * pad) for t in col_labels or []
    ]
    header_h = (max(len(ls) for ls in col_lines) * line_h + 2 * pad) if col_lines else 0
    label_w = 0
    row_lines: list[list[str]] = []
    if row_labels is not None:
        natural = max((font.getlength(line) for t in row_labels for line in str(t).split("\n")), default=0)
        label_w = int(min(natural, max(tw, 10 * font_size))) + 2 * pad
        max_row_lines = max(1, th // line_h)
        row_lines = [
            _fit_lines(wrap_text(t, font, label_w - 2 * pad), max_row_lines, font, label_w - 2 * pad)
            for t in row_labels
        ]
    x0 = gap + (label_w + gap if label_w else 0)
    width = x0 + ncols * tw + (ncols - 1) * gap + gap
    title_lines = wrap_text(title, font, width - 2 * gap - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title_lines else 0
    y0 = gap + title_h + header_h
    height = y0 + nrows * th + (nrows - 1) * gap + gap
    return _Layout(tw, th, gap, font, line_h, pad, title_lines, col_lines, row_lines, title_h, x0, y0, width, height)


def _draw_headers(draw: ImageDraw.ImageDraw, lay: _Layout, text_color: tuple[int, int, int]) -> None:
    """The title, then each column's label centred above its column."""
    for i, line in enumerate(lay.title_lines):
        draw.text((lay.gap + lay.pad, lay.gap + lay.pad + i * lay.line_h), line, font=lay.font, fill=text_color)
    for c, lines in enumerate(lay.col_lines):
        left = lay.x0 + c * (lay.tw + lay.gap)
        for i, line in enumerate(lines):
            x = left + (lay.tw - lay.font.getlength(line)) / 2
            draw.text((x, lay.gap + lay.title_h + lay.pad + i * lay.line_h), line, font=lay.font, fill=text_color)


def _draw_row(
    grid: Image.Image,
    draw: ImageDraw.ImageDraw,
    lay: _Layout,
    r: int,
    row: list[Image.Image | None],
    text_color: tuple[int, int, int],
) -> None:
    """Row ``r``: its label centred left of it, then its tiles (None: a grey tile)."""
    top = lay.y0 + r * (lay.th + lay.gap)
    if lay.row_lines:
        lines = lay.row_lines[r]
        y = top + (lay.th - len(lines) * lay.line_h) / 2
        for i, line in enumerate(lines):
            draw.text((lay.gap + lay.pad, y + i * lay.line_h), line, font=lay.font, fill=text_color)
    for c, im in enumerate(row):
        left = lay.x0 + c * (lay.tw + lay.gap)
        if im is None:
            draw.rectangle([left, top, left + lay.tw - 1, top + lay.th - 1], fill=(224, 224, 224))
            continue
        im = im.convert("RGB")
        if im.size != (lay.tw, lay.th):
            upscale = im.size[0] <= lay.tw and im.size[1] <= lay.th
            resample = Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS
            im = ImageOps.contain(im, (lay.tw, lay.th), resample)
        grid.paste(im, (left + (lay.tw - im.size[0]) // 2, top + (lay.th - im.size[1]) // 2))


def make_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    tile_size: int | None = None,
    min_tile_size: int = 128,
    max_tile_size: int | None = None,
    font_size: int | None = None,
    gap: int = 4,
    max_label_lines: int = 6,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Lay images out in a labelled grid: ``rows[r][c]`` at row r, column c.

    Args:
        rows: equal-length lists of images (None leaves a grey tile).
        row_labels / col_labels: text drawn left of each row / above each column, word-wrapped to
            the tile width (``\\n`` starts a new line; at most ``max_label_lines`` lines per column).
        title: optional line(s) above everything.
        tile_size: longest side of a tile in pixels. By default the first image's size, upscaled by
            an integer factor (NEAREST: every pixel stays a crisp block) until the longest side is at
            least ``min_tile_size`` (so 64-px images become 128-px tiles and labels stay legible),
            and downscaled (LANCZOS) to ``max_tile_size`` if given. Other sizes keep their aspect
            ratio, centred in the tile.
        font_size: label size in pixels (default: from the tile width, 12-28).

    Returns an RGB image; ``grid.info["grid_layout"]`` holds the geometry (``origin`` of the first
    tile, ``tile_size``, ``gap``), for cropping tiles back out.
    """
    rows = [list(r) for r in rows]
    ncols = _check_shape(rows, row_labels, col_labels)
    tile = _tile_size(rows, tile_size, min_tile_size, max_tile_size)
    lay = _layout(len(rows), ncols, tile, row_labels, col_labels, title, font_size, gap, max_label_lines)
    grid = Image.new("RGB", (lay.width, lay.height), background)
    draw = ImageDraw.Draw(grid)
    _draw_headers(draw, lay, text_color)
    for r, row in enumerate(rows):
        _draw_row(grid, draw, lay, r, row, text_color)
    grid.info["grid_layout"] = {
        "origin": (lay.x0, lay.y0),
        "tile_size": tile,
        "gap": gap,
        "rows": len(rows),
        "cols": ncols,
    }
    return grid
