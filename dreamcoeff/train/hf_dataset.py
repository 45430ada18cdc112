"""``--dataset_name`` through Hugging Face ``datasets``: parquet files, other imagefolder layouts, saved datasets.

A folder with a top-level ``metadata.jsonl`` is read without this module (`dataset_source`); everything
else that ``datasets`` reads offline goes through ``datasets.load_dataset`` (streaming, so nothing is
converted into its Arrow cache): a folder of parquet files (the hub's ``data/train-*.parquet`` layout
or any other ``datasets`` infers), one ``.parquet`` file, an image folder with ``metadata.csv`` /
``metadata.parquet`` or split subfolders, and a ``save_to_disk`` folder. ``datasets`` is the optional
``datasets`` extra, imported only here.

Images come as ``{"path", "bytes"}``: a path is used in place; bytes (parquet) are written once to a
content-addressed folder of the ``datasets`` cache, since the trainer reads images by path (decoding,
loss masks, the latent cache's content keys). Rows come in the dataset's order; every error names the
dataset, the row and the column, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import IMAGE_EXTENSIONS, DataError

__all__ = ["IMAGE_CACHE", "hub_offline", "read_hf_dataset"]

#: The folder of the ``datasets`` cache where image bytes are written (``<sha256>/<name>``).
IMAGE_CACHE = "dreamcoeff-images"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "MPO": ".jpg"}  # MPO: JPEGs from some cameras
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the environment forbids the hub (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``), as ``datasets`` reads it."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _import_datasets(name: str, what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--dataset_name {name}: {what} is read with Hugging Face `datasets`, which is not installed: "
            "pip install 'dreamcoeff[datasets]' (or pip install datasets). An image folder with a "
            "metadata.jsonl needs nothing extra"
        ) from None
    return datasets


def _pick_split(name: str, loaded: Any) -> Any:
    """``train`` from a dict of splits, else its only split; a single dataset as it is. A ``save_to_disk``
    dataset is read as an iterable one: casting its image column then writes nothing beside its files."""
    if not isinstance(loaded, Mapping):
        return loaded.to_iterable_dataset() if hasattr(loaded, "to_iterable_dataset") else loaded
    if "train" in loaded or len(loaded) == 1:
        return _pick_split(name, loaded["train"] if "train" in loaded else next(iter(loaded.values())))
    raise DataError(
        f"--dataset_name {name}: it has the splits {', '.join(loaded)} and no 'train' split; "
        "name the training files train-*.parquet (or put them in a train/ folder)"
    )


def _load(datasets: Any, name: str, cache_dir: Path) -> Any:
    """The dataset's training split, read lazily; refuses hub ids while offline."""
    path = Path(name).expanduser()
    kwargs = {"streaming": True, "cache_dir": str(cache_dir)}
    try:
        if path.is_file():
            if path.suffix.lower() != ".parquet":
                raise DataError(
                    f"--dataset_name {path}: a file must be .parquet; for images with captions pass their folder "
                    "(with a metadata.jsonl)"
                )
            return datasets.load_dataset("parquet", data_files={"train": [str(path)]}, split="train", **kwargs)
        if path.is_dir():
            if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
                return _pick_split(name, datasets.load_from_disk(str(path)))  # save_to_disk's folder
            if (path / "dataset_dict.json").is_file():
                return _pick_split(name, datasets.load_from_disk(str(path)))
            return _pick_split(name, datasets.load_dataset(str(path), **kwargs))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (datasets raises many types for files it cannot use)
        raise DataError(f"--dataset_name {path}: `datasets` cannot read it ({type(exc).__name__}: {exc})") from None
    if not _HUB_ID.match(name):
        raise DataError(f"--dataset_name {name}: no such folder or file")
    save_hint = (
        f"download it where there is a network (huggingface-cli download --repo-type dataset {name} "
        "--local-dir DIR) and pass the folder"
    )
    if hub_offline():
        raise DataError(
            f"--dataset_name {name}: no such folder, and hub datasets cannot be read offline (HF_HUB_OFFLINE or "
            f"HF_DATASETS_OFFLINE is set); {save_hint}"
        )
    try:
        return _pick_split(name, datasets.load_dataset(name, **kwargs))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (no network, no such dataset, gated: one message)
        raise DataError(
            f"--dataset_name {name}: no such folder, and the hub dataset cannot be read "
            f"({type(exc).__name__}: {exc}); {save_hint}"
        ) from None


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return list(names or [])


def _as_path_images(datasets: Any, dataset: Any, column: str) -> Any:
    """The image column as undecoded ``{"path", "bytes"}`` (a plain ``{bytes, path}`` struct, as parquet
    files written without ``datasets`` have it, is cast too); a column of strings stays paths."""
    feature = (getattr(dataset, "features", None) or {}).get(column)
    is_struct = isinstance(feature, dict) and {"bytes", "path"} <= set(feature)
    if isinstance(feature, datasets.Image) or is_struct:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _write_image(data: bytes, name: str, cache: Path, where: str) -> Path:
    """``data`` as ``<cache>/<sha256>/<name>``, written once (atomically: processes may race)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception:  # noqa: BLE001  (PIL raises several types for non-images)
        raise DataError(f"{where}: the bytes are not an image PIL can read") from None
    ext = _FORMATS.get(fmt or "")
    if ext is None:
        raise DataError(f"{where}: a {fmt} image; the trainer reads {' '.join(IMAGE_EXTENSIONS)}")
    stem = Path(name).stem if name else ""
    target = cache / hashlib.sha256(data).hexdigest() / ((stem or "image") + ext)
    if not (target.is_file() and target.stat().st_size == len(data)):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    return target


def _image_of(value: Any, root: Path | None, cache: Path, where: str) -> Path:
    """A row's image value (``{"path", "bytes"}`` or a path string) as a file."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an image (bytes or a path), got {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data:
        return _write_image(bytes(data), Path(path).name if path else "", cache, where)
    if not path:
        raise DataError(f"{where}: the image has neither bytes nor a path")
    file = Path(path) if Path(path).is_absolute() or root is None else root / path
    if not file.is_file():
        raise DataError(f"{where}: image {file} does not exist")
    if not file.name.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{where}: {file.name} is not an image ({' '.join(IMAGE_EXTENSIONS)})")
    return file


def _rows(dataset: Any, name: str) -> Iterable[dict]:
    try:
        yield from dataset
    except Exception as exc:  # noqa: BLE001  (a damaged parquet file, a metadata file that does not parse)
        if "BatchSize must be greater than 0" in str(exc):  # what datasets' parquet reader says of 0 rows
            raise DataError(f"--dataset_name {name}: the dataset has no rows (a parquet file with 0 rows)") from None
        raise DataError(f"--dataset_name {name}: reading its rows failed ({type(exc).__name__}: {exc})") from None


def read_hf_dataset(
    name: str, image_column: str = "image", caption_column: str = "text", cache_dir: str | os.PathLike | None = None
) -> list[tuple[Path, str]]:
    """``(image file, caption)`` for every row of the dataset ``name`` (a local folder or parquet file;
    a hub id only where the hub is allowed), in its order.

    The image is the row's ``image_column``, else its ``file_name``; the caption its ``caption_column``,
    whitespace runs collapsed as caption files are. ``cache_dir``: where ``datasets`` keeps its files and
    image bytes are written (default: the ``datasets`` cache, ``HF_DATASETS_CACHE``). A missing column,
    image or caption, an empty dataset or a file ``datasets`` cannot read raise `DataError` naming them.
    """
    path = Path(name).expanduser()
    what = "a parquet file" if path.suffix.lower() == ".parquet" else "this dataset"
    datasets = _import_datasets(name, what)
    cache = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    dataset = _load(datasets, name, cache)
    columns = _columns(dataset)
    key = image_column if image_column in columns else "file_name"
    if key not in columns:
        raise DataError(
            f"--dataset_name {name}: no image column {image_column!r} (columns: {', '.join(columns) or 'none'}); "
            "pass --image_column with the one that holds the images"
        )
    if caption_column not in columns:
        folder_hint = (
            ' (an image folder names its captions in a metadata.jsonl: {"file_name": "dog1.jpg", "text": "..."})'
            if path.is_dir() and set(columns) <= {"image", "label"}
            else ""
        )
        raise DataError(
            f"--dataset_name {name}: no caption column {caption_column!r} (columns: {', '.join(columns) or 'none'}); "
            f"pass --caption_column with the one that holds the captions{folder_hint}"
        )
    dataset = _as_path_images(datasets, dataset, key)
    root = path if path.is_dir() else path.parent if path.is_file() else None
    rows: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for number, row in enumerate(_rows(dataset, name)):
        where = f"--dataset_name {name} row {number}"
        caption = row.get(caption_column)
        if caption is None:
            raise DataError(f"{where}: no caption in {caption_column!r} (null); give every row a caption")
        if not isinstance(caption, str):
            raise DataError(f"{where}: the caption in {caption_column!r} is {type(caption).__name__}, not text")
        image = _image_of(row.get(key), root, cache / IMAGE_CACHE, f"{where} column {key!r}")
        if image in seen:  # the same bytes twice: its own file, so each row keeps its caption
            image = _write_image(image.read_bytes(), f"{image.stem}-row{number}", cache / IMAGE_CACHE, where)
        seen.add(image)
        rows.append((image, " ".join(caption.split())))
    if not rows:
        raise DataError(f"--dataset_name {name}: the dataset has no rows")
    return rows
