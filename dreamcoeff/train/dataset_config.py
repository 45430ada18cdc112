"""Several image folders from one TOML file (``--dataset_config``), in kohya sd-scripts' layout.

    [general]                  # defaults for every subset
    shuffle_caption = true
    [[datasets]]               # defaults for its subsets
    [[datasets.subsets]]       # one image folder
    image_dir = "photos/dog"
    class_tokens = "sks dog"
    num_repeats = 10

A subset's setting comes from its own table, else its dataset's, else ``[general]``, else the command
line (``--repeats``, ``--caption_ext``, ``--caption_dropout``, ``--instance_prompt`` / ``--class_prompt``
for images with neither a caption file nor ``class_tokens``), else the default. ``resolution``,
``batch_size`` and ``enable_bucket`` are read where kohya's files have them, and must agree with the
trainer's flags (the trainer trains one resolution and batch size). Every error names the file, the
line and the key, and is raised while the flags are checked, before any model is loaded. (tomllib
reports no positions for values it parsed, so the lines are found in the text.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..images import DataError, list_images, read_caption
from .data import ImageSubset
from .errors import UsageError

__all__ = ["SUBSET_KEYS", "DatasetConfig", "read_dataset_config"]

# kohya's default caption extension: a subset without caption_extension still reads name.caption files.
DEFAULT_CAPTION_EXTENSION = ".caption"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: key -> (type test, what it must be, value test or None, what the value must be). Subset keys may
#: also stand in [general] and [[datasets]] as defaults, except image_dir.
SUBSET_KEYS: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], bool] | None, str]] = {
    "image_dir": (lambda v: isinstance(v, str), "a string (a folder of images)", lambda v: bool(v.strip()), "not empty"),
    "num_repeats": (_is_int, "an integer", lambda v: v >= 1, "at least 1"),
    "caption_extension": (lambda v: isinstance(v, str), 'a string such as ".txt"', lambda v: bool(v.strip(". ")), "an extension such as .txt"),
    "is_reg": (lambda v: isinstance(v, bool), "true or false", None, ""),
    "class_tokens": (lambda v: isinstance(v, str), 'a string such as "sks dog"', None, ""),
    "caption_dropout_rate": (_is_number, "a number", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "shuffle_caption": (lambda v: isinstance(v, bool), "true or false", None, ""),
    "keep_tokens": (_is_int, "an integer", lambda v: v >= 0, "at least 0"),
}  # fmt: skip
#: Dataset-level keys of kohya's files that the trainer takes from its flags; checked to agree.
FLAG_KEYS = {"resolution": "--resolution", "batch_size": "--train_batch_size", "enable_bucket": "--square_crop"}
SUBSET_ONLY = {"image_dir"}


@dataclass(frozen=True)
class DatasetConfig:
    """A parsed ``--dataset_config``: its subsets, in file order, as the dataset reads them."""

    path: Path
    subsets: tuple[ImageSubset, ...]

    @property
    def instance_subsets(self) -> tuple[ImageSubset, ...]:
        return tuple(s for s in self.subsets if not s.is_class)

    @property
    def reg_subsets(self) -> tuple[ImageSubset, ...]:
        """The regularisation (``is_reg``) subsets: prior preservation's class images."""
        return tuple(s for s in self.subsets if s.is_class)

    def with_classes(self, class_images: Sequence[Path], class_prompt: str | None) -> list[ImageSubset]:
        """The subsets, and the class images of --class_data_dir (generated where missing) as one more
        subset where there are any (the trainer only makes them when the file has no is_reg subset)."""
        extra = [ImageSubset(tuple(class_images), class_prompt or "", is_class=True)] if class_images else []
        return [*self.subsets, *extra]


# --------------------------------------------------------------------------------------------
# Lines: where each table and key stands in the text
# --------------------------------------------------------------------------------------------

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
_HEADER = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

Table = tuple  # ("general",), ("datasets", i), ("datasets", i, "subsets", j)


def key_lines(text: str) -> dict[tuple[Table, str | None], int]:
    """``(table, key) -> line number`` (``key`` None: the table's header) for the layouts kohya's files
    use: ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]`` and ``key = value`` lines."""
    lines: dict[tuple[Table, str | None], int] = {}
    table: Table = ()
    datasets = subsets = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _ARRAY_HEADER.match(line):
            name = m.group(1).replace(" ", "")
            if name == "datasets":
                datasets, subsets = datasets + 1, -1
                table = ("datasets", datasets)
            elif name == "datasets.subsets":
                subsets += 1
                table = ("datasets", max(datasets, 0), "subsets", subsets)
            else:
                table = (name,)
            lines.setdefault((table, None), number)
        elif m := _HEADER.match(line):
            table = (m.group(1).replace(" ", ""),)
            lines.setdefault((table, None), number)
        elif m := _KEY.match(line):
            lines.setdefault((table, m.group(1).strip("\"'")), number)
    return lines


class _Reader:
    """Error messages that name the file, the line and the key."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = key_lines(text)

    def line_of(self, table: Table, key: str | None = None) -> int | None:
        for probe in ((table, key), (table, None)):  # the key's line, else its table's header
            if probe in self.lines:
                return self.lines[probe]
        return None

    def where(self, table: Table, key: str | None = None) -> str:
        line = self.line_of(table, key)
        if line:
            place = f"{self.path} line {line}"
        elif len(table) == 4:
            place = f"{self.path} ([[datasets.subsets]] #{table[3] + 1} of [[datasets]] #{table[1] + 1})"
        elif len(table) == 2:
            place = f"{self.path} ([[datasets]] #{table[1] + 1})"
        else:
            place = f"{self.path} ({f'[{table[0]}]' if table else 'top level'})"
        return f"{place}: {key}" if key else place

    def fail(self, table: Table, key: str | None, message: str) -> UsageError:
        return UsageError(f"--dataset_config {self.where(table, key)}: {message}")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _load_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise UsageError(f"--dataset_config {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--dataset_config {path}: cannot read it ({exc}); save it as UTF-8 text") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:  # its message says "(at line N, column M)"
        raise UsageError(f"--dataset_config {path}: not valid TOML: {exc}") from None


def _check_table(reader: _Reader, table: Table, values: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The table's settings, each checked for its name, type and value."""
    out = {}
    for key, value in values.items():
        if key not in allowed:
            if key in SUBSET_ONLY:
                raise reader.fail(table, key, f"{key} belongs in a [[datasets.subsets]] table, one per folder")
            known = ", ".join(sorted(allowed))
            raise reader.fail(table, key, f"unknown key (known here: {known})")
        if key in SUBSET_KEYS:
            is_type, type_text, is_ok, ok_text = SUBSET_KEYS[key]
            if not is_type(value):
                raise reader.fail(table, key, f"must be {type_text}, got {value!r} ({type(value).__name__})")
            if is_ok is not None and not is_ok(value):
                raise reader.fail(table, key, f"must be {ok_text}, got {value!r}")
        out[key] = value
    return out


def _check_flags(reader: _Reader, table: Table, values: Mapping[str, Any], flags: Mapping[str, Any]) -> None:
    """kohya's dataset-level resolution / batch_size / enable_bucket must say what the trainer's flags say."""
    for key in FLAG_KEYS.keys() & values.keys():
        value, want = values[key], flags[key]
        if key == "resolution":
            if _is_int(value):
                value = [value, value]
            ok = isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)
            if not ok:
                raise reader.fail(table, key, f"must be an integer or [width, height], got {value!r}")
            if value[0] != value[1]:
                raise reader.fail(table, key, "must be square: --resolution is the side (buckets vary the shape)")
            value = value[0]
        elif key == "batch_size" and not _is_int(value):
            raise reader.fail(table, key, f"must be an integer, got {value!r}")
        elif key == "enable_bucket" and not isinstance(value, bool):
            raise reader.fail(table, key, f"must be true or false, got {value!r}")
        if value != want:
            flag = FLAG_KEYS[key]
            if key == "enable_bucket":
                hint = "aspect-ratio buckets are on unless --square_crop or --with_prior_preservation (square crops)"
                raise reader.fail(table, key, f"says {str(value).lower()}, but {hint}; drop the key or change the flag")
            raise reader.fail(table, key, f"says {value}, but {flag} is {want}; drop the key or pass {flag} {value}")


def read_dataset_config(
    path: str | Path,
    *,
    defaults: Mapping[str, Any],
    flags: Mapping[str, Any],
    instance_prompt: str | None = None,
    class_prompt: str | None = None,
) -> DatasetConfig:
    """Parse and check a ``--dataset_config`` file; list each subset's images and check their captions.

    ``defaults``: the command line's subset defaults (``num_repeats``, ``caption_extension``,
    ``caption_dropout_rate``). ``flags``: ``resolution``, ``batch_size`` and ``enable_bucket`` as the
    trainer's flags set them. ``instance_prompt`` / ``class_prompt``: the captions of images that have
    neither a caption file nor their subset's ``class_tokens``. Raises `UsageError` naming the line.
    """
    path = Path(path)
    data, text = _load_toml(path)
    reader = _Reader(path, text)
    general_keys = set(SUBSET_KEYS) - SUBSET_ONLY
    for key in data:
        if key not in ("general", "datasets"):
            raise reader.fail((), key, "unknown key (a dataset config has a [general] table and [[datasets]] tables)")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise reader.fail(("general",), None, "general must be a table: [general]")
    general = _check_table(reader, ("general",), general, general_keys | set(FLAG_KEYS))
    _check_flags(reader, ("general",), general, flags)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise reader.fail(("general",) if "general" in data else (), None,
                          "no [[datasets]] table: add [[datasets]] and under it one [[datasets.subsets]] per folder")  # fmt: skip
    subsets: list[ImageSubset] = []
    for d, dataset in enumerate(datasets):
        table = ("datasets", d)
        if not isinstance(dataset, dict):
            raise reader.fail(table, None, "each dataset must be a [[datasets]] table")
        dataset = dict(dataset)
        entries = dataset.pop("subsets", None)
        dataset = _check_table(reader, table, dataset, general_keys | set(FLAG_KEYS))
        _check_flags(reader, table, dataset, flags)
        if not isinstance(entries, list) or not entries:
            raise reader.fail(
                table, None, 'this dataset has no [[datasets.subsets]] table (one per folder: image_dir = "...")'
            )
        for s, entry in enumerate(entries):
            sub_table = ("datasets", d, "subsets", s)
            if not isinstance(entry, dict):
                raise reader.fail(sub_table, None, "each subset must be a [[datasets.subsets]] table")
            own = _check_table(reader, sub_table, entry, set(SUBSET_KEYS))
            if "image_dir" not in own:
                raise reader.fail(sub_table, None, 'this subset has no image_dir (image_dir = "path/to/photos")')
            settings = {**defaults, **general, **dataset, **own}
            if own.get("caption_dropout_rate") and settings.get("is_reg"):
                raise reader.fail(sub_table, "caption_dropout_rate", "regularisation images keep their prompt "
                                  "(prior preservation); drop the key from this is_reg subset")  # fmt: skip
            subsets.append(_subset(reader, sub_table, settings, instance_prompt, class_prompt))
    if not any(not s.is_class for s in subsets):
        raise reader.fail(("datasets", 0), None, "every subset is is_reg = true: add one with the subject's photos")
    return DatasetConfig(path, tuple(subsets))


def _subset(
    reader: _Reader, table: Table, settings: Mapping[str, Any], instance_prompt: str | None, class_prompt: str | None
) -> ImageSubset:
    """One subset's images, listed, and their captions checked (a caption file, class_tokens, or the flag's prompt)."""
    folder = Path(settings["image_dir"]).expanduser()
    is_reg = bool(settings.get("is_reg", False))
    try:
        images = list_images(folder, what="class" if is_reg else "instance")
    except DataError as exc:
        detail = str(exc).split(" ", 1)[1] if str(exc).startswith("--") else str(exc)  # drop the --x_data_dir flag name
        raise reader.fail(table, "image_dir", detail) from None
    ext = settings.get("caption_extension") or DEFAULT_CAPTION_EXTENSION
    ext = ext if ext.startswith(".") else "." + ext
    prompt = settings.get("class_tokens") or (class_prompt if is_reg else instance_prompt) or ""
    if not prompt:
        try:
            lacking = [p for p in images if read_caption(p, ext) is None]
        except DataError as exc:
            raise reader.fail(table, "image_dir", str(exc)) from None
        if lacking:
            flag = "--class_prompt" if is_reg else "--instance_prompt"
            raise reader.fail(
                table,
                None,
                f"{lacking[0]} has no {ext} caption file and the subset has no class_tokens; add class_tokens "
                f'(e.g. class_tokens = "{"dog" if is_reg else "sks dog"}"), caption files, or {flag}',
            )
    return ImageSubset(
        images=tuple(images),
        prompt=prompt,
        is_class=is_reg,
        repeats=int(settings.get("num_repeats", 1)),
        caption_ext=ext,
        caption_dropout=float(settings.get("caption_dropout_rate", 0.0)),
        shuffle_caption=bool(settings.get("shuffle_caption", False)),
        keep_tokens=int(settings.get("keep_tokens", 0)),
        name=f"--dataset_config {reader.where(table)} ({folder})",
    )
