"""DreamBooth metrics of sampled images (Ruiz et al. 2023, section 4.1): CLIP-T, CLIP-I and DINO.

``dreamcoeff.sample --metrics`` uses them on a :class:`~dreamcoeff.sample.render.SampleResult`; the
functions work on any list of images too. Models are given as local folders or hub ids and loaded
with transformers; nothing here downloads on its own.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..io import atomic_write
from .errors import SamplingError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .render import SampleResult

__all__ = [
    "METRIC_NAMES",
    "metric_text",
    "check_model_dir",
    "ClipEmbedder",
    "DinoEmbedder",
    "load_instance_images",
    "compute_metrics",
    "summarize_metrics",
    "write_metrics_csv",
]

#: Metric names, as they appear in the manifest, index.html and the CSVs.
METRIC_NAMES = ("clip_t", "clip_i", "dino")


def metric_text(prompt: str, token: str | None) -> str:
    """The text CLIP-T compares an image with: the prompt without the rare identifier.

    "a sks dog in the snow" -> "a dog in the snow": the identifier means nothing to CLIP, and
    keeping it would reward images for however CLIP happens to read "sks".
    """
    if token:
        prompt = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return " ".join(prompt.split())


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def check_model_dir(name_or_path: str, flag: str) -> PretrainedConfig:
    """The model's transformers config; :class:`SamplingError` if it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise SamplingError(f"{flag} {name_or_path}: not a transformers model folder ({exc})") from None


class ClipEmbedder:
    """Unit-norm CLIP image and text embeddings (``CLIPModel`` + its tokenizer and image processor).

    Images are embedded one at a time, so an image's embedding never depends on its batch
    neighbours (identical images get identical scores).
    """

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        config = check_model_dir(name_or_path, "--clip_model")
        if getattr(config, "model_type", None) != "clip":
            raise SamplingError(f"--clip_model {name_or_path} is a {config.model_type!r} model, not CLIP")
        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise SamplingError(f"--clip_model {name_or_path}: {exc}") from None
        self.device = device

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor, transformers 5 an output whose pooler_output it is.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm CLIP image embeddings, one row per image (on the CPU)."""
        feats = []
        for image in images:
            pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"].to(self.device)
            feats.append(self._features(self.model.get_image_features(pixel_values=pixels)))
        return _normalize(torch.cat(feats)).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings, one row per text (on the CPU; truncated to 77 tokens)."""
        feats = []
        max_len = min(getattr(self.model.config.text_config, "max_position_embeddings", 77), 77)
        for text in texts:
            tokens = self.tokenizer([text], truncation=True, max_length=max_len, return_tensors="pt").to(self.device)
            feats.append(self._features(self.model.get_text_features(**tokens)))
        return _normalize(torch.cat(feats)).cpu()


class DinoEmbedder:
    """Unit-norm DINO image embeddings: the ViT's final [CLS] token (DreamBooth uses DINO ViT-S/16).

    Works with ``ViTModel`` (facebook/dino-vits16) and other ``AutoModel`` vision backbones whose
    ``last_hidden_state[:, 0]`` is a class token (DINOv2).
    """

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, ViTModel

        config = check_model_dir(name_or_path, "--dino_model")
        try:
            if config.model_type == "vit":
                # The DINO checkpoints have no pooler: don't build a randomly initialised one.
                self.model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False)
            else:
                self.model = AutoModel.from_pretrained(name_or_path)
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise SamplingError(f"--dino_model {name_or_path}: {exc}") from None
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm DINO [CLS] embeddings, one row per image (on the CPU)."""
        feats = []
        for image in images:
            pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"].to(self.device)
            feats.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return _normalize(torch.cat(feats)).cpu()


def load_instance_images(directory: str | Path) -> list[Image.Image]:
    """The real subject images (EXIF-rotated RGB) from a folder, for CLIP-I and DINO."""
    from ..images import DataError, list_images, load_image

    try:
        return [load_image(p) for p in list_images(directory, "instance")]
    except DataError as exc:
        raise SamplingError(str(exc)) from None


def compute_metrics(
    images: Sequence[Image.Image | str | Path],
    texts: Sequence[str] | None = None,
    *,
    instance_images: Sequence[Image.Image] | None = None,
    clip: ClipEmbedder | None = None,
    dino: DinoEmbedder | None = None,
) -> list[dict[str, float]]:
    """The DreamBooth metrics for each image.

    - ``clip_t``: cosine similarity of the image's and its text's CLIP embeddings (needs ``clip``
      and ``texts``; pass :func:`metric_text` of each prompt).
    - ``clip_i``: mean cosine similarity of the image's CLIP embedding to each instance image's.
    - ``dino``: the same with DINO embeddings.

    Images may be paths (loaded one at a time). Returns one dict per image with the metrics that
    the given models and inputs allow.
    """
    if texts is not None and len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts for {len(images)} images")
    refs_clip = clip.images(instance_images) if clip is not None and instance_images else None
    refs_dino = dino.images(instance_images) if dino is not None and instance_images else None
    text_cache: dict[str, torch.Tensor] = {}
    results = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            image = item
        else:
            with Image.open(item) as im:
                image = im.convert("RGB")
        scores: dict[str, float] = {}
        if clip is not None:
            emb = clip.images([image])[0]
            if texts is not None:
                if texts[i] not in text_cache:
                    text_cache[texts[i]] = clip.texts([texts[i]])[0]
                scores["clip_t"] = float(emb @ text_cache[texts[i]])
            if refs_clip is not None:
                scores["clip_i"] = float((refs_clip @ emb).mean())
        if refs_dino is not None:
            scores["dino"] = float((refs_dino @ dino.images([image])[0]).mean())
        results.append(scores)
    return results


def summarize_metrics(result: SampleResult, metrics: Sequence[Mapping[str, float]]) -> list[dict[str, Any]]:
    """Mean of each metric per row, in row order."""
    summary = []
    for row in result.rows:
        values = [m for rec, m in zip(result.records, metrics, strict=True) if rec.row == row.name]
        entry: dict[str, Any] = {
            "row": row.name,
            "run": row.run.name if row.run else None,
            "coeff_scale": row.coeff_scale,
            "lora": row.has_lora,
            "images": len(values),
        }
        for name in METRIC_NAMES:
            got = [m[name] for m in values if name in m]
            if got:
                entry[name] = sum(got) / len(got)
        summary.append(entry)
    return summary


def _write_csv(path: Path, text: str) -> None:
    """A CSV file written under a temporary name, then renamed (a full disk never leaves half of one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def write_metrics_csv(
    result: SampleResult,
    metrics: Sequence[Mapping[str, float]],
    summary: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    token: str | None = None,
    run_tokens: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (one line per image) and ``metrics_summary.csv`` (one line per row).

    ``clip_t_text`` is the prompt without ``token``, or without a run's learned tokens
    (``run_tokens``: run name -> its token text) in that run's rows."""
    run_tokens = run_tokens or {}
    output_dir = Path(output_dir)
    names = [n for n in METRIC_NAMES if any(n in m for m in metrics)]
    per_image = output_dir / "metrics.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(
        ["row", "run", "coeff_scale", "lora", "prompt_index", "seed", "file", "prompt", "clip_t_text", *names]
    )
    for rec, m in zip(result.records, metrics, strict=True):
        writer.writerow(
            [
                rec.row,
                rec.run or "",
                "" if rec.coeff_scale is None else rec.coeff_scale,
                int(rec.lora),
                rec.prompt_index,
                rec.seed,
                rec.file or "",
                rec.prompt,
                metric_text(rec.prompt, run_tokens.get(rec.run, token)),
                *[f"{m[n]:.6f}" if n in m else "" for n in names],
            ]
        )
    _write_csv(per_image, text.getvalue())
    per_row = output_dir / "metrics_summary.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["row", "run", "coeff_scale", "lora", "images", *names])
    for s in summary:
        writer.writerow(
            [
                s["row"],
                s["run"] or "",
                "" if s["coeff_scale"] is None else s["coeff_scale"],
                int(s["lora"]),
                s["images"],
                *[f"{s[n]:.6f}" if n in s else "" for n in names],
            ]
        )
    _write_csv(per_row, text.getvalue())
    return per_image, per_row
