"""Data side of the DreamBooth SDXL trainer: finding, decoding, captioning, bucketing and batching
training images.

Self-contained on purpose (torch, numpy, PIL and the standard library only) so it can be tested
without the model stack.

Overview
--------
* :func:`list_images` finds the images of a ``--instance_data_dir`` / ``--class_data_dir``.
* :func:`load_image` decodes one file to an 8-bit RGB ``PIL.Image`` whatever its mode (alpha,
  palette, grayscale, CMYK, 16-bit, animated, EXIF-rotated) and turns every way a file can be bad
  into a :class:`DataError` that names the file.
* :func:`read_caption` reads an optional ``name.txt`` caption beside an image.
* :func:`make_buckets` / :func:`assign_bucket`: SDXL aspect-ratio buckets.
* :class:`DreamBoothDataset` pre-decodes every image once, then on each access draws a crop and a
  flip from a seed derived from ``(seed, epoch, index)``: augmentation changes every epoch but a
  resumed run replays exactly the same crops and flips. Each item carries SDXL's
  micro-conditioning (``original_size``, ``crop_top_left``, ``target_size``).
* :class:`BucketBatchSampler` batches indices that share a bucket (tensors in a batch must have
  one shape), reproducibly for a given ``(seed, epoch)``.
* :func:`collate_examples` stacks items and builds SDXL's ``add_time_ids``.

Every user-facing problem raises :class:`DataError` (a ``ValueError``) whose message names the file
or directory and says what to do; the trainer prints the message without a traceback.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "Augmentation",
    "BadImageError",
    "BucketBatchSampler",
    "DataError",
    "DataWarning",
    "DreamBoothDataset",
    "Example",
    "assign_bucket",
    "collate_examples",
    "list_images",
    "load_image",
    "load_images",
    "make_buckets",
    "read_caption",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

# Same ceiling as PIL's decompression-bomb *error* (2 x Image.MAX_IMAGE_PIXELS, ~179 MP). Anything
# larger is almost certainly a mistake (or an attack) and would need gigabytes of RAM to decode.
MAX_IMAGE_PIXELS: int = 178_956_970

# A bucket must hold at least this fraction of resolution**2 pixels, so that extreme aspect
# ratios (capped by max_ratio) do not produce buckets much smaller than the training resolution.
_MIN_BUCKET_AREA_FRACTION = 0.85

_SKIP_HINT = "Fix or delete it, or pass --skip_bad_images to skip unreadable images with a warning."


class DataError(ValueError):
    """A problem with the user's training data. The message is meant to be shown as-is."""


class BadImageError(DataError):
    """An image file that cannot be used. ``path`` and ``reason`` let callers re-word it
    (``--skip_bad_images`` warnings reuse ``reason`` without the "pass --skip_bad_images" hint)."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}. {_SKIP_HINT}")


class DataWarning(UserWarning):
    """Non-fatal data problems (upscaled images, skipped bad images) when no ``warn`` callback is
    given."""


def _default_warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Finding images
# --------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(directory: str | os.PathLike[str], what: str = "instance", *, allow_empty: bool = False) -> list[Path]:
    """Return the image files directly inside ``directory``, sorted by name.

    ``what`` names the command-line flag in error messages (``--{what}_data_dir``). Extensions are
    matched case-insensitively against :data:`IMAGE_EXTENSIONS`. Hidden files are ignored: macOS
    leaves ``._photo.jpg`` AppleDouble files next to copied photos, which have an image extension
    but are not images. Subdirectories are not searched.

    Raises :class:`DataError` if the directory does not exist, is not a directory, or holds no
    images (the message says what it found instead). With ``allow_empty=True`` a missing or empty
    directory gives ``[]`` instead (useful for a class-image folder the trainer fills itself).
    """
    directory = Path(directory)
    flag = f"--{what}_data_dir"
    if not directory.exists():
        if allow_empty:
            return []
        raise DataError(f"{flag} {directory} does not exist (resolved to {directory.absolute()}). Check the path.")
    if not directory.is_dir():
        raise DataError(f"{flag} {directory} is a file, not a directory. Pass the folder that contains the {what} images.")

    images: list[Path] = []
    others: list[str] = []
    subdirs: list[str] = []
    hidden = 0
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            hidden += 1
        elif entry.is_dir():
            subdirs.append(entry.name)
        elif _is_image_name(entry.name):
            images.append(entry)
        else:
            others.append(entry.name)
    if images or allow_empty:
        return images

    extensions = " ".join(IMAGE_EXTENSIONS)
    if not others and not subdirs:
        extra = f" (only {hidden} hidden file(s), which are ignored)" if hidden else ""
        raise DataError(f"{flag} {directory} is empty{extra}. Put the {what} images ({extensions}) directly in it.")
    found = []
    if others:
        examples = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        found.append(f"{len(others)} file(s), none with an image extension ({extensions}): {examples}")
    if subdirs:
        examples = ", ".join(subdirs[:5]) + (", ..." if len(subdirs) > 5 else "")
        found.append(f"{len(subdirs)} subdirectory(ies) ({examples}); subdirectories are not searched")
    raise DataError(
        f"{flag} {directory} contains no images: found {' and '.join(found)}. "
        f"Put the {what} images directly in {directory}."
    )


# --------------------------------------------------------------------------------------------
# Decoding images
# --------------------------------------------------------------------------------------------


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit 'L' by scaling, not clipping.

    ``img.convert('L')`` clips 16-bit values at 255, so every pixel above 255/65535 of full scale
    (i.e. nearly the whole image) comes out white.
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = a / 257.0  # 65535 -> 255 exactly
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0  # float image in [0, 1]
        elif lo >= 0.0 and hi <= 65535.0:
            # Mode 'I' from a 16-bit PNG (older Pillow opens those as 'I'): its range is 0..65535.
            scaled = a / 257.0
        else:
            # Arbitrary 32-bit data: no natural scale, stretch the actual range.
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB. Transparency is composited onto white, since a model has
    no alpha channel and black (what a plain convert gives for transparent RGBA pixels in many
    files) would teach it black backgrounds."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()  # detach from the (soon closed) file
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image, fully loaded in memory, as it is meant to be viewed.

    * EXIF orientation is applied (phone photos are stored sideways with a rotation tag).
    * Alpha (RGBA, LA, P/L/RGB with a transparent colour) is composited onto white.
    * 16-bit images are scaled to 8 bits (not clipped); L, P, CMYK, 1 are converted.
    * Animated images (GIF, APNG, WebP): the first frame.
    * The pixels are decoded here (``.load()``) so that truncated or corrupt files fail now, with
      the file's name, rather than deep inside a training step.

    Raises :class:`BadImageError` (a :class:`DataError`) naming the file for zero-byte, truncated,
    undecodable or non-image files, and for images over ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(path, "file does not exist") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise BadImageError(path, "file is empty (0 bytes), probably an interrupted download or copy")
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below): an unreadable file is not a corrupt image
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None

    try:
        # We enforce our own pixel limit below, so silence PIL's warning for 89-179 MP images.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with fh, Image.open(fh) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImageError(
                        path,
                        f"image is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the "
                        f"{max_pixels / 1e6:.0f} MP limit (a possible decompression bomb); downscale it",
                    )
                img.seek(0)  # first frame of an animation (already current; explicit for clarity)
                img.load()  # full decode: truncated/corrupt data raises here
                try:
                    img = ImageOps.exif_transpose(img)  # a rotated copy (or a plain copy if no tag)
                except Exception:  # noqa: BLE001
                    pass  # malformed EXIF block: its orientation is meaningless, keep the pixels as stored
                return _to_rgb(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"image is too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image (wrong extension, or not an image file at all)") from None
    except Exception as e:  # noqa: BLE001
        # Pillow's decoders raise a zoo of types for damaged files (OSError "image file is
        # truncated", SyntaxError "broken PNG file", ValueError, EOFError, struct.error, ...).
        # All of them mean the same to the user: this file cannot be used.
        raise BadImageError(path, f"cannot decode image ({type(e).__name__}: {e}); the file is probably truncated or corrupt") from None


def load_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    skip_bad: bool = False,
    what: str = "instance",
    warn: Callable[[str], None] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[tuple[Path, Image.Image]]:
    """Load several images with :func:`load_image`, returning ``(path, image)`` pairs.

    With ``skip_bad=True`` unreadable images are skipped with a warning naming each one (through
    ``warn``, default :func:`warnings.warn` with :class:`DataWarning`); :class:`DataError` is raised
    if none remain. With ``skip_bad=False`` the first bad image raises.
    """
    return [(p, img) for p, img in _iter_loaded(paths, skip_bad=skip_bad, what=what, warn=warn, max_pixels=max_pixels)]


def _iter_loaded(
    paths: Sequence[str | os.PathLike[str]],
    *,
    skip_bad: bool,
    what: str,
    warn: Callable[[str], None] | None,
    max_pixels: int,
) -> Iterator[tuple[Path, Image.Image]]:
    # A generator so that the dataset can shrink each image to its bucket before the next one is
    # decoded, instead of holding every full-size photo at once.
    warn = warn or _default_warn
    bad: list[Path] = []
    loaded = 0
    for p in paths:
        p = Path(p)
        try:
            img = load_image(p, max_pixels=max_pixels)
        except BadImageError as e:
            if not skip_bad:
                raise
            bad.append(p)
            warn(f"--skip_bad_images: skipping {what} image {p}: {e.reason}")
            continue
        loaded += 1
        yield p, img
    if paths and loaded == 0:
        raise DataError(
            f"all {len(paths)} {what} image(s) failed to load (first: {bad[0]}), nothing left to train on. "
            "See the warnings above for each file."
        )


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def read_caption(image_path: str | os.PathLike[str], caption_ext: str = ".txt", default: str | None = None) -> str | None:
    """Read the caption file beside ``image_path`` (``photo.jpg`` -> ``photo.txt``).

    Decoded as UTF-8 (a leading BOM, as Windows editors write, is removed). Whitespace runs,
    including newlines, become single spaces. A missing or blank caption file gives ``default``.
    A file that is not valid UTF-8 raises :class:`DataError` naming it: guessing a legacy encoding
    would silently corrupt non-ASCII captions.
    """
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    caption_path = Path(image_path).with_suffix(caption_ext)
    try:
        raw = caption_path.read_bytes()
    except FileNotFoundError:
        return default
    except IsADirectoryError:
        raise DataError(f"caption {caption_path} is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"cannot read caption file {caption_path}: {e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(
            f"caption file {caption_path} is not valid UTF-8{utf16}: byte {raw[e.start]:#04x} at offset {e.start}. "
            "Re-save it with UTF-8 encoding."
        ) from None
    text = " ".join(text.split())
    return text if text else default


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8 or resolution % 8:
        lower = max(8, int(resolution) // 8 * 8) if isinstance(resolution, (int, float)) else 8
        raise DataError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution!r}; "
            f"try {lower} or {lower + 8}."
        )


def _default_step(resolution: int) -> int:
    # 64 is the usual SDXL bucket granularity; below 256 px (tests, tiny models) it leaves almost no
    # buckets, and a resolution that is not a multiple of 64 could not be a bucket side at all.
    return 64 if resolution >= 256 and resolution % 64 == 0 else 8


def make_buckets(resolution: int, step: int | None = None, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(height, width)`` of roughly ``resolution**2`` pixels.

    Both sides are multiples of ``step`` (default 64, or 8 when ``resolution < 256`` or is not a
    multiple of 64; it must be a multiple of 8 that divides ``resolution``). Long/short side ratio
    is at most ``max_ratio``, area between 85% and 100% of ``resolution**2``. The list is sorted
    from the widest (landscape) to the tallest (portrait) bucket, contains the square
    ``(resolution, resolution)`` and is symmetric (``(h, w)`` in it implies ``(w, h)``).
    At 1024: 704x1408, 768x1344, 832x1216, 896x1152, 960x1088, 1024x1024 and their transposes.
    """
    _check_resolution(resolution)
    if step is None:
        step = _default_step(resolution)
    if step < 8 or step % 8 or resolution % step:
        raise DataError(f"bucket step must be a multiple of 8 that divides --resolution {resolution}, got {step}")
    if max_ratio < 1.0:
        raise DataError(f"max bucket aspect ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for short in range(step, resolution + 1, step):
        # Longest side that keeps the area <= resolution**2 and the ratio <= max_ratio.
        long = min(area // short, int(short * max_ratio)) // step * step
        if long < short or short * long < _MIN_BUCKET_AREA_FRACTION * area:
            continue
        buckets.add((short, long))  # landscape
        buckets.add((long, short))  # portrait
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


def assign_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket ``(h, w)`` whose aspect ratio is closest to ``height / width``.

    Closeness is measured on log aspect ratio, so 2:1 and 1:2 are equally far from square; ties go
    to the larger bucket.
    """
    if not buckets:
        raise ValueError("assign_bucket: empty bucket list")
    if height <= 0 or width <= 0:
        raise ValueError(f"assign_bucket: invalid image size {height}x{width}")
    target = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b))


# --------------------------------------------------------------------------------------------
# Reproducible randomness
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from a tuple of ints/strings, stable across processes and Python versions
    (unlike ``hash()``, which is salted for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _shuffle(items: list[int], rng: random.Random) -> None:
    """In-place Fisher-Yates using only ``rng.random()``, the one ``random`` method whose output
    Python guarantees not to change across versions (``random.shuffle`` is not guaranteed), so a
    resumed run on another Python replays the same order."""
    for k in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (k + 1))
        items[k], items[j] = items[j], items[k]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training item: which image, its caption, its bucket."""

    image_path: Path
    caption: str
    is_class: bool  # True: prior-preservation class image; False: instance (subject) image
    bucket: tuple[int, int]  # (height, width) of the training crop
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the decoded, EXIF-rotated image


class Augmentation(NamedTuple):
    """The random part of an access: crop offsets in the (resized, possibly flipped) image, flip."""

    top: int
    left: int
    flipped: bool


@dataclass
class _Prepared:
    pixels: np.ndarray  # uint8 HxWx3, already resized to cover the bucket
    original_size: tuple[int, int]  # (h, w) before resizing


class DreamBoothDataset(Dataset):
    """Instance images (repeated ``repeats`` times) followed by class images, one item each.

    Images are decoded once at construction and kept in memory already resized so that they just
    cover their bucket (shorter side to the bucket, aspect kept, LANCZOS): only a crop and a flip
    remain per access. Images smaller than their bucket are upscaled, with one warning per image.

    ``dataset[i]`` returns a dict:

    * ``pixel_values``: float32 tensor ``3 x H x W`` in ``[-1, 1]`` (``H, W`` = the bucket)
    * ``original_size``: ``(h, w)`` of the image as decoded (after EXIF rotation, before resizing)
    * ``crop_top_left``: ``(top, left)`` of the crop in the resized image, computed after the
      flip as diffusers' ``train_dreambooth_lora_sdxl.py`` does (resize, flip, then crop)
    * ``target_size``: ``(h, w)`` of the bucket
    * ``caption`` (str), ``is_class`` (bool), ``flipped`` (bool), ``index`` (int), ``image_path`` (str)

    Augmentation is drawn anew for every ``(epoch, index)`` from a seed derived from
    ``(seed, epoch, index)``; call :meth:`set_epoch` at the start of each epoch. The same seed,
    epoch and index always give the same crop and flip, so a resumed run sees exactly the same
    data. (With ``DataLoader(num_workers>0)`` do not use ``persistent_workers=True``: persistent
    workers keep the dataset copy, hence the epoch, they were started with.)

    Captions: an instance image gets ``read_caption(path, caption_ext)`` when ``caption_ext`` is
    given and its caption file exists, else ``instance_prompt``; class images get ``class_prompt``.
    """

    def __init__(
        self,
        instance_images: Sequence[str | os.PathLike[str]],
        instance_prompt: str,
        *,
        resolution: int = 1024,
        class_images: Sequence[str | os.PathLike[str]] = (),
        class_prompt: str | None = None,
        caption_ext: str | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        use_buckets: bool = False,
        bucket_step: int | None = None,
        max_bucket_ratio: float = 2.0,
        repeats: int = 1,
        seed: int = 0,
        skip_bad_images: bool = False,
        warn: Callable[[str], None] | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        _check_resolution(resolution)
        if repeats < 1:
            raise DataError(f"--repeats must be >= 1, got {repeats}")
        if not instance_images:
            raise DataError("no instance images given")
        if class_images and not class_prompt:
            raise DataError("class images were given but --class_prompt is empty; pass --class_prompt (e.g. 'a photo of a dog')")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.use_buckets = use_buckets
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self._warn = warn or _default_warn
        self.buckets: list[tuple[int, int]] = (
            make_buckets(resolution, bucket_step, max_bucket_ratio) if use_buckets else [(resolution, resolution)]
        )

        self._prepared: dict[Path, _Prepared] = {}
        instance_examples = self._prepare_all(instance_images, "instance", skip_bad_images, max_pixels)
        for ex in instance_examples:
            caption = read_caption(ex.image_path, caption_ext, default=None) if caption_ext else None
            if caption is None:
                if not instance_prompt:
                    raise DataError(
                        f"{ex.image_path} has no caption file and --instance_prompt is empty; "
                        "give an --instance_prompt (e.g. 'a photo of sks dog') or a caption file for every image"
                    )
                caption = instance_prompt
            ex.caption = caption
        class_examples = self._prepare_all(class_images, "class", skip_bad_images, max_pixels) if class_images else []
        for ex in class_examples:
            ex.caption = class_prompt or ""

        # Repeats are copies of the Example list (not of the pixels): each copy has its own index,
        # hence its own crop/flip draw within an epoch.
        self.examples: list[Example] = [
            Example(e.image_path, e.caption, e.is_class, e.bucket, e.original_size)
            for _ in range(repeats)
            for e in instance_examples
        ] + class_examples
        self.num_instance_items = len(instance_examples) * repeats

    # -- construction ------------------------------------------------------------------------

    def _prepare_all(
        self, paths: Sequence[str | os.PathLike[str]], what: str, skip_bad: bool, max_pixels: int
    ) -> list[Example]:
        examples = []
        # dict.fromkeys: de-duplicate (keeping order) so a path listed twice is decoded once.
        todo = [p for p in dict.fromkeys(Path(p) for p in paths) if p not in self._prepared]
        for path, img in _iter_loaded(todo, skip_bad=skip_bad, what=what, warn=self._warn, max_pixels=max_pixels):
            self._prepared[path] = self._prepare(path, img)
        for p in paths:
            p = Path(p)
            if p in self._prepared:  # skipped bad images are absent
                prep = self._prepared[p]
                bucket = self._bucket_for(*prep.original_size)
                examples.append(Example(p, "", what == "class", bucket, prep.original_size))
        return examples

    def _bucket_for(self, height: int, width: int) -> tuple[int, int]:
        return assign_bucket(height, width, self.buckets) if self.use_buckets else (self.resolution, self.resolution)

    def _prepare(self, path: Path, img: Image.Image) -> _Prepared:
        h, w = img.height, img.width
        bh, bw = self._bucket_for(h, w)
        # Scale so the image covers the bucket; max(...) guards against rounding a side to 1 px short.
        scale = max(bh / h, bw / w)
        new_h, new_w = max(bh, round(h * scale)), max(bw, round(w * scale))
        if scale > 1.0:
            self._warn(
                f"{path} is {w}x{h} (WxH), smaller than its {bw}x{bh} training crop: upscaling it x{scale:.2f}, "
                "which blurs it. Use larger photos or a lower --resolution."
            )
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        return _Prepared(np.asarray(img, dtype=np.uint8).copy(), (h, w))

    # -- public API ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation subsequent accesses draw."""
        self.epoch = int(epoch)

    @property
    def item_buckets(self) -> list[tuple[int, int]]:
        """Bucket of every item, by index (what :class:`BucketBatchSampler` needs)."""
        return [e.bucket for e in self.examples]

    @property
    def instance_indices(self) -> range:
        return range(0, self.num_instance_items)

    @property
    def class_indices(self) -> range:
        return range(self.num_instance_items, len(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.examples):
            raise IndexError(f"index {index} out of range for dataset of {len(self.examples)} items")
        return index

    def augmentation(self, index: int, epoch: int | None = None) -> Augmentation:
        """The crop offsets and flip that an access to ``index`` in ``epoch`` (default: the current
        epoch) draws. Pure function of ``(seed, epoch, index)``."""
        index = self._check_index(index)
        epoch = self.epoch if epoch is None else int(epoch)
        ex = self.examples[index]
        height, width = self._prepared[ex.image_path].pixels.shape[:2]
        bh, bw = ex.bucket
        rng = random.Random(derive_seed("augment", self.seed, epoch, index))
        # Always draw all three numbers, so the crop does not depend on whether flipping is on.
        r_flip, r_top, r_left = rng.random(), rng.random(), rng.random()
        flipped = self.random_flip and r_flip < 0.5
        if self.center_crop:
            # int(round(...)) as torchvision's CenterCrop and diffusers compute it.
            top, left = int(round((height - bh) / 2.0)), int(round((width - bw) / 2.0))
        else:
            top, left = int(r_top * (height - bh + 1)), int(r_left * (width - bw + 1))
        return Augmentation(top, left, flipped)

    def augmentation_key(self, index: int, epoch: int | None = None) -> tuple[str, int, int, bool]:
        """Hashable ``(image_path, top, left, flipped)`` identifying the exact pixels an access
        yields, for caching VAE latents per augmentation variant. With ``center_crop`` and no
        ``random_flip`` it is constant per image, so every latent is encoded once."""
        index = self._check_index(index)
        aug = self.augmentation(index, epoch)
        return (str(self.examples[index].image_path), aug.top, aug.left, aug.flipped)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        ex = self.examples[index]
        prep = self._prepared[ex.image_path]
        top, left, flipped = self.augmentation(index)
        bh, bw = ex.bucket
        pixels = prep.pixels[:, ::-1] if flipped else prep.pixels  # flip first, then crop (diffusers order)
        crop = np.ascontiguousarray(pixels[top : top + bh, left : left + bw])
        pixel_values = torch.from_numpy(crop).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {
            "pixel_values": pixel_values,
            "original_size": prep.original_size,
            "crop_top_left": (top, left),
            "target_size": (bh, bw),
            "caption": ex.caption,
            "is_class": ex.is_class,
            "flipped": flipped,
            "index": index,
            "image_path": str(ex.image_path),
        }


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that all share one bucket.

    ``buckets`` is the bucket of every dataset index (``dataset.item_buckets``) or a
    :class:`DreamBoothDataset`. ``indices`` restricts batching to some indices (e.g.
    ``dataset.instance_indices``). Per epoch, each bucket's indices are shuffled and cut into
    batches of ``batch_size`` (the last one per bucket may be smaller unless ``drop_last``), then
    the batch order is shuffled across buckets. The order depends only on ``(seed, epoch)``: call
    :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]] | DreamBoothDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        indices: Sequence[int] | None = None,
    ):
        if isinstance(buckets, DreamBoothDataset):
            buckets = buckets.item_buckets
        if batch_size < 1:
            raise DataError(f"--train_batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(buckets)) if indices is None else indices:
            groups.setdefault(tuple(buckets[i]), []).append(int(i))
        # Sorted bucket order: iteration must not depend on dict/set ordering.
        self._groups = [groups[b] for b in sorted(groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(derive_seed("batches", self.seed, self.epoch))
        batches: list[list[int]] = []
        for group in self._groups:
            group = list(group)
            if self.shuffle:
                _shuffle(group, rng)
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            order = list(range(len(batches)))
            _shuffle(order, rng)
            batches = [batches[k] for k in order]
        return iter(batches)

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self._groups)
        return sum(math.ceil(len(g) / self.batch_size) for g in self._groups)


def collate_examples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    Returns ``pixel_values`` (B x 3 x H x W float), ``add_time_ids`` (B x 6 long:
    ``original_size + crop_top_left + target_size``, SDXL's micro-conditioning; cast it to the
    model dtype), ``captions`` (list of str), ``is_class`` (B bool), ``flipped`` (B bool) and
    ``indices`` (list of int). For prior preservation pass instance items followed by class items.
    """
    if not batch:
        raise ValueError("collate_examples: empty batch")
    shapes = {tuple(item["pixel_values"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_examples: items have different sizes {sorted(shapes)}; with aspect-ratio buckets "
            "use BucketBatchSampler so that every batch comes from one bucket"
        )
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]).contiguous(),
        "add_time_ids": torch.tensor(
            [list(item["original_size"]) + list(item["crop_top_left"]) + list(item["target_size"]) for item in batch],
            dtype=torch.long,
        ),
        "captions": [item["caption"] for item in batch],
        "is_class": torch.tensor([bool(item["is_class"]) for item in batch], dtype=torch.bool),
        "flipped": torch.tensor([bool(item["flipped"]) for item in batch], dtype=torch.bool),
        "indices": [int(item["index"]) for item in batch],
    }
