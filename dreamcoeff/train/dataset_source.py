"""Training images with captions from a dataset folder (``--dataset_name``), and caption substitutions.

A dataset here is a local image folder in the layout of Hugging Face's ``imagefolder``: images plus a
``metadata.jsonl`` with one JSON object per line naming its image (``file_name``, or the column given
by ``--image_column``, relative to the folder) and holding its caption (``--caption_column``, default
``text``). Rows are read in file order; every error names the file, the line and what to change.
Any other dataset (parquet files, other imagefolder layouts, ``save_to_disk`` folders) is read by
`read_dataset` through Hugging Face ``datasets`` (`hf_dataset`, the optional ``datasets`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..images import IMAGE_EXTENSIONS, DataError

__all__ = ["METADATA_NAME", "TRIGGER", "read_dataset", "read_dataset_folder", "substitute_trigger"]

METADATA_NAME = "metadata.jsonl"
#: Written in captions where the subject's name goes; replaced by ``--trigger_word``.
TRIGGER = "[trigger]"


def read_dataset(
    name: str, image_column: str = "image", caption_column: str = "text", cache_dir: str | None = None
) -> list[tuple[Path, str]]:
    """``(image path, caption)`` for every row of ``--dataset_name``: a folder with a top-level
    ``metadata.jsonl`` by `read_dataset_folder` (no dependency, errors with line numbers), anything else
    (parquet, ``metadata.csv``, split folders, ``save_to_disk``, a hub id where the hub is allowed) by
    `hf_dataset.read_hf_dataset` with Hugging Face ``datasets``. Raises `DataError` naming what is wrong."""
    folder = Path(name).expanduser()
    if (folder / METADATA_NAME).is_file():
        return read_dataset_folder(str(folder), image_column, caption_column)
    from .hf_dataset import read_hf_dataset

    return read_hf_dataset(name, image_column, caption_column, cache_dir=cache_dir)


def read_dataset_folder(name: str, image_column: str = "image", caption_column: str = "text") -> list[tuple[Path, str]]:
    """``(image path, caption)`` for every row of ``<name>/metadata.jsonl``.

    The image is the row's ``image_column`` if it has one, else ``file_name`` (imagefolder's own
    key). A missing folder, metadata file, column or image, a caption that is not text, or a row that
    is not a JSON object raise `DataError`; hub dataset ids are refused (nothing is downloaded).
    """
    folder = Path(name)
    if not folder.is_dir():
        hint = (
            " (hub datasets are not downloaded: save it as an image folder with metadata.jsonl)" if "/" in name else ""
        )
        raise DataError(f"--dataset_name {name}: no such folder{hint}")
    metadata = folder / METADATA_NAME
    if not metadata.is_file():
        arrow = (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file()
        what = "a `datasets` save_to_disk folder, which dreamcoeff does not read yet; " if arrow else ""
        raise DataError(
            f"--dataset_name {folder}: no {METADATA_NAME} ({what}write one line per image, e.g. "
            '{"file_name": "dog1.jpg", "text": "a photo of sks dog"})'
        )
    rows: list[tuple[Path, str]] = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        key = image_column if image_column in row else "file_name"
        if key not in row:
            raise DataError(f"{where}: no image column {image_column!r} or 'file_name' (columns: {', '.join(row)})")
        if caption_column not in row:
            raise DataError(
                f"{where}: no caption column {caption_column!r} (columns: {', '.join(row)}); "
                "pass --caption_column with the one that holds the captions"
            )
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise DataError(f"{where}: the caption in {caption_column!r} is {type(caption).__name__}, not text")
        image = folder / str(row[key])
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist")
        if not image.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{where}: {image.name} is not an image ({' '.join(IMAGE_EXTENSIONS)})")
        rows.append((image, " ".join(caption.split())))
    if not rows:
        raise DataError(f"{metadata} has no rows")
    return rows


def substitute_trigger(text: str, trigger_word: str | None, where: str) -> str:
    """``[trigger]`` in a caption or prompt becomes ``--trigger_word``; without one it is an error."""
    if TRIGGER not in text:
        return text
    if not trigger_word:
        raise DataError(
            f"{where}: {text!r} contains {TRIGGER} but no --trigger_word was given (e.g. --trigger_word sks)"
        )
    return text.replace(TRIGGER, trigger_word)
