"""One labelled comparison grid PNG per seed (rows = runs, columns = prompts) from a sampling result.

The drawing is :func:`dreamcoeff.grids.make_grid`; this module lays a `SampleResult` out with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..grids import label_font, make_grid, wrap_text
from ..io import atomic_write
from .prompts import prompt_tag

if TYPE_CHECKING:
    from .render import SampleResult

__all__ = ["label_font", "make_grid", "save_grids", "wrap_text"]


def save_grids(result: SampleResult, output_dir: str | Path, *, max_tile_size: int | None = 256) -> dict[int, str]:
    """One grid PNG per seed (rows = rows, columns = prompts), ``grid_s<seed>.png``.

    Returns ``{seed: file name relative to output_dir}``.
    """
    output_dir = Path(output_dir)
    col_labels = [f"{prompt_tag(i, len(result.prompts))}: {p}" for i, p in enumerate(result.prompts)]
    row_labels = [row.label for row in result.rows]
    grids = {}
    for seed in result.seeds:
        images = [[result.image(rec) for rec in row] for row in result.grid_rows(seed)]
        grid = make_grid(images, row_labels, col_labels, title=f"seed {seed}", max_tile_size=max_tile_size)
        name = f"grid_s{seed}.png"
        atomic_write(output_dir / name, lambda tmp, grid=grid: grid.save(tmp, format="PNG"))
        grids[seed] = name
    return grids
