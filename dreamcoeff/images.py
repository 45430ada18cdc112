"""Image files on disk: finding them, decoding any file safely to RGB, reading caption files.

Used by the trainer (instance and class images) and the sampler's metrics (instance images).
Self-contained on purpose (numpy, PIL and the standard library only) so it can be tested without
the model stack.

* :func:`list_images` finds the images of a ``--instance_data_dir`` / ``--class_data_dir``.
* :func:`load_image` decodes one file to an 8-bit RGB ``PIL.Image`` whatever its mode (alpha,
  palette, grayscale, CMYK, 16-bit, animated, EXIF-rotated) and turns every way a file can be bad
  into a :class:`DataError` that names the file.
* :func:`read_caption` reads an optional ``name.txt`` caption beside an image.

Every user-facing problem raises :class:`DataError` (a ``ValueError``) whose message names the file
or directory and says what to do; the trainer prints the message without a traceback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIX",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "DataError",
    "DataWarning",
    "default_warn",
    "iter_loaded",
    "list_images",
    "load_image",
    "load_images",
    "load_loss_mask",
    "mask_path_of",
    "read_caption",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

# Same ceiling as PIL's decompression-bomb *error* (2 x Image.MAX_IMAGE_PIXELS, ~179 MP). Anything
# larger is almost certainly a mistake (or an attack) and would need gigabytes of RAM to decode.
MAX_IMAGE_PIXELS: int = 178_956_970

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


def default_warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Finding images
# --------------------------------------------------------------------------------------------


#: A loss mask beside its image: ``photo.jpg`` -> ``photo.mask.png`` (``--masked_loss``; white = learn).
MASK_SUFFIX = ".mask.png"


def _is_image_name(name: str) -> bool:
    # a mask sidecar is never a training image, with or without --masked_loss
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.lower().endswith(MASK_SUFFIX)


def mask_path_of(image_path: str | os.PathLike[str]) -> Path:
    """Where the loss mask of an image would be: the image's name with ``.mask.png`` for its extension."""
    path = Path(image_path)
    return path.with_name(path.stem + MASK_SUFFIX)


def load_loss_mask(image_path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray | None:
    """The loss mask of an image as uint8 H x W (255 = learn, 0 = ignore), or None if it has none.

    The ``name.mask.png`` sidecar wins; else the image's own alpha channel (transparent = ignore).
    Both go through the image's EXIF orientation, and must match the image's ``size`` ((h, w) as
    decoded): a mask of another size, or one with nothing to learn (all black), is a `DataError`
    naming both files.
    """
    image_path = Path(image_path)
    sidecar = mask_path_of(image_path)
    if sidecar.is_file():
        mask = np.asarray(load_image(sidecar).convert("L"), dtype=np.uint8)
        source = f"mask {sidecar}"
    else:
        with Image.open(image_path) as img:
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001  (malformed EXIF: as load_image, keep the stored pixels)
                pass
            if not (img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info):
                return None
            mask = np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.uint8)
        source = f"alpha channel of {image_path}"
    if mask.shape != tuple(size):
        raise DataError(
            f"{source} is {mask.shape[1]}x{mask.shape[0]} (WxH) but {image_path} is {size[1]}x{size[0]}: "
            "a loss mask must have its image's size"
        )
    if not mask.any():
        raise DataError(f"{source} is all black: nothing of {image_path} would be learned (white = learn)")
    return mask.copy()


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
        raise DataError(
            f"{flag} {directory} is a file, not a directory. Pass the folder that contains the {what} images."
        )

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
        raise BadImageError(
            path, f"cannot decode image ({type(e).__name__}: {e}); the file is probably truncated or corrupt"
        ) from None


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
    return [(p, img) for p, img in iter_loaded(paths, skip_bad=skip_bad, what=what, warn=warn, max_pixels=max_pixels)]


def iter_loaded(
    paths: Sequence[str | os.PathLike[str]],
    *,
    skip_bad: bool,
    what: str,
    warn: Callable[[str], None] | None,
    max_pixels: int,
) -> Iterator[tuple[Path, Image.Image]]:
    # A generator so that the dataset can shrink each image to its bucket before the next one is
    # decoded, instead of holding every full-size photo at once.
    warn = warn or default_warn
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


def read_caption(
    image_path: str | os.PathLike[str], caption_ext: str = ".txt", default: str | None = None
) -> str | None:
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
