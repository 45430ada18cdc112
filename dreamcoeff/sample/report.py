"""The written record of a sampling: ``manifest.json`` (everything, machine-readable) and ``index.html``."""

from __future__ import annotations

import html
import json
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write
from .metrics import METRIC_NAMES
from .prompts import prompt_tag

if TYPE_CHECKING:
    from .render import SampleResult

__all__ = ["jsonable", "write_manifest", "write_index_html"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: mappings and sequences recursively, paths as text, NaN and
    infinities as None, anything else unknown as its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {
        "dreamcoeff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def write_manifest(
    result: SampleResult,
    output_dir: str | Path,
    grids: Mapping[int, str],
    *,
    settings: Mapping[str, Any] | None = None,
    metrics: Sequence[Mapping[str, float]] | None = None,
    metrics_summary: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json``: settings, runs (weight files, hashes, training args), rows with
    timing, every image (row, prompt, seed, file, metrics) and every grid."""
    images = []
    for i, rec in enumerate(result.records):
        entry = rec.to_json()
        if metrics is not None:
            entry["metrics"] = dict(metrics[i])
        images.append(entry)
    runs = {}
    for row in result.rows:
        if row.run is not None and row.run.name not in runs:
            runs[row.run.name] = {**result.weights.get(row.run.name, {}), "training_args": row.run.training_args()}
    manifest = {
        "tool": "dreamcoeff.sample",
        "versions": _versions(),
        "settings": {**result.settings, **(settings or {})},
        "runs": runs,
        "rows": [
            {
                "name": r.name,
                "run": r.run.name if r.run else None,
                "coeff_scale": r.coeff_scale,
                "lora": r.has_lora,
                "description": r.description,
                **result.timing["rows"].get(r.name, {}),
            }
            for r in result.rows
        ],
        "timing": result.timing,
        "grids": [{"seed": seed, "file": name} for seed, name in grids.items()],
        "images": images,
    }
    if metrics_summary is not None:
        manifest["metrics"] = list(metrics_summary)
    manifest.update(extra or {})
    path = Path(output_dir) / "manifest.json"
    text = json.dumps(jsonable(manifest), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


# ----------------------------------------------------------------------------------------------
# index.html, one section per helper: each returns its lines

_esc = html.escape


def _url(path: str) -> str:
    return html.escape(urllib.parse.quote(path), quote=True)


def _html_head(title: str) -> list[str]:
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:100%}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        "img.grid{max-width:100%;height:auto}img.thumb{width:128px;height:auto;image-rendering:pixelated}"
        "code{background:#f4f4f4}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<p>",
    ]


def _html_facts(result: SampleResult, model: str | None) -> list[str]:
    """The settings paragraph (model, size, steps, ...)."""
    s = result.settings
    facts = [
        ("model", model),
        ("size", f"{s['width']}x{s['height']}"),
        ("steps", s["num_inference_steps"]),
        ("guidance", s["guidance_scale"]),
        ("scheduler", s["scheduler"]),
        ("negative prompt", s["negative_prompt"]),
        ("seeds", ", ".join(map(str, result.seeds))),
        ("dtype", s["dtype"]),
    ]
    return [
        "<br>".join(f"<b>{_esc(k)}</b>: {_esc(str(v))}" for k, v in facts if v not in (None, "")),
        "</p><p>Every row starts from the same initial latents for a given seed, so differences come from the weights alone.</p>",
    ]


def _html_rows(result: SampleResult) -> list[str]:
    """The rows table: what each row applies, its weight files, seconds per image."""
    out = [
        "<h2>Rows</h2><table><tr><th>row</th><th>applies</th><th>alpha file</th><th>LoRA file</th><th>s / image</th></tr>"
    ]
    for row in result.rows:
        weights = result.weights.get(row.run.name, {}) if row.run else {}
        alpha = weights.get("alpha", {}).get("path", "") if row.coeff_scale is not None else ""
        lora = weights.get("lora", {}).get("path", "") if row.has_lora else ""
        per = result.timing["rows"].get(row.name, {}).get("seconds_per_image", "")
        out.append(
            f"<tr><td>{_esc(row.name)}</td><td>{_esc(row.description)}</td><td><code>{_esc(alpha)}</code></td>"
            f"<td><code>{_esc(lora)}</code></td><td>{_esc(str(per))}</td></tr>"
        )
    out.append("</table>")
    return out


def _html_prompts(result: SampleResult) -> list[str]:
    """The full prompts, by their ``p00`` tags."""
    n = len(result.prompts)
    out = ["<h2>Prompts</h2><table><tr><th>#</th><th>prompt</th></tr>"]
    out += [f"<tr><td>{prompt_tag(i, n)}</td><td>{_esc(p)}</td></tr>" for i, p in enumerate(result.prompts)]
    out.append("</table>")
    learned = {name: w["embeddings"].get("token") for name, w in result.weights.items() if "embeddings" in w}
    if learned:
        said = ", ".join(f"{_esc(name)}: <code>{_esc(str(token))}</code>" for name, token in learned.items())
        out.append(f"<p>Runs with learned tokens write their own tokens for {{token}} in their rows ({said}).</p>")
    return out


def _html_metrics(metrics_summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-row metric means and what they measure."""
    names = [m for m in METRIC_NAMES if any(m in r for r in metrics_summary)]
    out = [
        "<h2>Metrics (mean per row)</h2><table><tr><th>row</th><th>images</th>",
        "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr>",
    ]
    for r in metrics_summary:
        cells = "".join(f"<td>{r[n]:.4f}</td>" if r.get(n) is not None else "<td></td>" for n in names)
        out.append(f"<tr><td>{_esc(r['row'])}</td><td>{r['images']}</td>{cells}</tr>")
    out.append(
        "</table><p>CLIP-T: cosine similarity of image and prompt (without the identifier) in CLIP space; "
        "CLIP-I / DINO: mean cosine similarity to the instance images.</p>"
    )
    return out


def _html_seed(result: SampleResult, seed: int, grids: Mapping[int, str]) -> list[str]:
    """One seed: its grid, then a table of every single image (rows x prompts) linking each file."""
    n = len(result.prompts)
    out = [f'<h2 id="seed-{seed}">Seed {seed}</h2>']
    if seed in grids:
        out.append(
            f'<a href="{_url(grids[seed])}"><img class="grid" src="{_url(grids[seed])}" alt="grid, seed {seed}"></a>'
        )
    out.append(f"<details><summary>Single images, seed {seed}</summary><table><tr><th>row</th>")
    out.append(
        "".join(f'<th title="{_esc(p)}">{prompt_tag(i, n)}</th>' for i, p in enumerate(result.prompts)) + "</tr>"
    )
    for row, records in zip(result.rows, result.grid_rows(seed), strict=True):
        cells = []
        for rec in records:
            if rec.file is None:
                cells.append("<td></td>")
                continue
            cells.append(
                f'<td><a href="{_url(rec.file)}"><img class="thumb" loading="lazy" src="{_url(rec.file)}" '
                f'title="{_esc(rec.prompt)}" alt="{_esc(row.name)}, p{rec.prompt_index}, seed {seed}"></a></td>'
            )
        out.append(f"<tr><td>{_esc(row.name)}</td>{''.join(cells)}</tr>")
    out.append("</table></details>")
    return out


def write_index_html(
    result: SampleResult,
    output_dir: str | Path,
    grids: Mapping[int, str],
    *,
    title: str = "dreamcoeff samples",
    model: str | None = None,
    metrics_summary: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``index.html``: settings, rows, the full prompts, metrics, then per seed the grid and a
    table linking every single image."""
    out = _html_head(title) + _html_facts(result, model) + _html_rows(result) + _html_prompts(result)
    if metrics_summary:
        out += _html_metrics(metrics_summary)
    for seed in result.seeds:
        out += _html_seed(result, seed, grids)
    out.append("</body></html>")
    path = Path(output_dir) / "index.html"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(out) + "\n", encoding="utf-8"))
    return path
