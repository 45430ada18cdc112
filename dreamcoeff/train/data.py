"""The trainer's examples: aspect-ratio buckets, the reproducible DreamBooth dataset, its batch sampler, collation.

* :func:`make_buckets` / :func:`assign_bucket`: SDXL aspect-ratio buckets.
* :class:`ImageSubset`: one folder's images and how they are captioned and repeated (a
  ``--dataset_config`` subset, or the one-folder flags).
* :class:`DreamBoothDataset` pre-decodes every image once, then on each access draws a crop and a
  flip from a seed derived from ``(seed, epoch, index)``: augmentation changes every epoch but a
  resumed run replays exactly the same crops and flips. Each item carries SDXL's
  micro-conditioning (``original_size``, ``crop_top_left``, ``target_size``).
* :class:`BucketBatchSampler` batches indices that share a bucket (tensors in a batch must have
  one shape), reproducibly for a given ``(seed, epoch)``.
* :func:`collate_examples` stacks items and builds SDXL's ``add_time_ids``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

# The image-file side lives in dreamcoeff.images (the sampler's metrics read images too); its names
# are re-exported so `dreamcoeff.train.data` is the trainer's one data module.
from ..images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    BadImageError,
    DataError,
    DataWarning,
    default_warn,
    iter_loaded,
    list_images,
    load_image,
    load_images,
    load_loss_mask,
    read_caption,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "Augmentation",
    "BadImageError",
    "DataError",
    "DataWarning",
    "list_images",
    "load_image",
    "load_images",
    "read_caption",
    "BucketBatchSampler",
    "DreamBoothDataset",
    "Example",
    "ImageSubset",
    "assign_bucket",
    "collate_examples",
    "derive_seed",
    "drop_captions",
    "seed_of",
    "shuffle_caption",
    "make_buckets",
]

# A bucket must hold at least this fraction of resolution**2 pixels, so that extreme aspect
# ratios (capped by max_ratio) do not produce buckets much smaller than the training resolution.
_MIN_BUCKET_AREA_FRACTION = 0.85

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


def seed_of(*parts: object) -> int:
    """`derive_seed` within int64, as torch generators need."""
    return derive_seed(*parts) & ((1 << 63) - 1)


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


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's ``shuffle_caption``: the caption's comma-separated tags in a random order, the first
    ``keep_tokens`` of them left in place; tags are stripped and joined with ``", "``."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    order = list(range(len(tail)))
    _shuffle(order, rng)
    return ", ".join(head + [tail[k] for k in order])


@dataclass(frozen=True)
class ImageSubset:
    """One folder's images and how they are read: a ``--dataset_config`` subset, or the one-folder flags.

    ``prompt`` is the caption of an image without a caption entry or ``caption_ext`` file.
    ``caption_dropout`` None means the trainer's ``--caption_dropout``; class subsets are never dropped.
    ``name`` says where the subset comes from in error messages.
    """

    images: tuple[Path, ...]
    prompt: str
    is_class: bool = False
    repeats: int = 1
    caption_ext: str | None = None
    caption_dropout: float | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    name: str = ""


@dataclass
class Example:
    """One training item: which image, its caption, its bucket, and its subset's caption settings."""

    image_path: Path
    caption: str
    is_class: bool  # True: prior-preservation class image; False: instance (subject) image
    bucket: tuple[int, int]  # (height, width) of the training crop
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the decoded, EXIF-rotated image
    caption_dropout: float | None = None  # None: the trainer's --caption_dropout
    shuffle_caption: bool = False
    keep_tokens: int = 0


class Augmentation(NamedTuple):
    """The random part of an access: crop offsets in the (resized, possibly flipped) image, flip."""

    top: int
    left: int
    flipped: bool


@dataclass
class _Prepared:
    pixels: np.ndarray  # uint8 HxWx3, already resized to cover the bucket
    original_size: tuple[int, int]  # (h, w) before resizing
    mask: np.ndarray | None = None  # uint8 HxW loss mask resized like the pixels (--masked_loss), None: all learned


class DreamBoothDataset(Dataset):
    """Instance images (repeated ``repeats`` times) followed by class images, one item each.

    With ``subsets`` (:class:`ImageSubset`, a ``--dataset_config``) the positional images, prompts,
    ``caption_ext`` and ``repeats`` are not used: each instance subset's images follow, repeated by its
    own ``repeats``, in the subsets' order, then the class subsets' the same way. Without, the flags
    make one instance subset and one class subset, which gives the same items as before subsets.

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
    * with ``masked_loss``: ``loss_mask``, float32 ``1 x H x W`` in ``[0, 1]`` (1 = learn), the image's
      mask (``name.mask.png`` or its alpha channel) resized, flipped and cropped exactly as its pixels;
      all ones for class images and for images without a mask

    Augmentation is drawn anew for every ``(epoch, index)`` from a seed derived from
    ``(seed, epoch, index)``; call :meth:`set_epoch` at the start of each epoch. The same seed,
    epoch and index always give the same crop and flip, so a resumed run sees exactly the same
    data. (With ``DataLoader(num_workers>0)`` do not use ``persistent_workers=True``: persistent
    workers keep the dataset copy, hence the epoch, they were started with.)

    Captions: an instance image gets its entry in ``captions`` (a dataset's caption column), else
    ``read_caption(path, caption_ext)`` when ``caption_ext`` is given and its caption file exists,
    else ``instance_prompt``; class images get ``class_prompt``.
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
        masked_loss: bool = False,
        captions: Mapping[Path, str] | None = None,
        subsets: Sequence[ImageSubset] | None = None,
    ):
        _check_resolution(resolution)
        if subsets is None:  # the one-folder flags
            if repeats < 1:
                raise DataError(f"--repeats must be >= 1, got {repeats}")
            if not instance_images:
                raise DataError("no instance images given")
            if class_images and not class_prompt:
                raise DataError(
                    "class images were given but --class_prompt is empty; pass --class_prompt (e.g. 'a photo of a dog')"
                )
            subsets = [ImageSubset(tuple(map(Path, instance_images)), instance_prompt, repeats=repeats,
                                   caption_ext=caption_ext, name="--instance_data_dir")]  # fmt: skip
            if class_images:
                subsets.append(ImageSubset(tuple(map(Path, class_images)), class_prompt or "", is_class=True))
        if not any(not s.is_class for s in subsets):
            raise DataError("no instance images given: every subset is a class (is_reg) subset")
        for s in subsets:
            if s.repeats < 1:
                raise DataError(f"{s.name or 'a subset'}: repeats must be >= 1, got {s.repeats}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.use_buckets = use_buckets
        self.repeats = repeats
        self.masked_loss = masked_loss
        self.seed = seed
        self.epoch = 0
        self._warn = warn or default_warn
        self.buckets: list[tuple[int, int]] = (
            make_buckets(resolution, bucket_step, max_bucket_ratio) if use_buckets else [(resolution, resolution)]
        )

        self._prepared: dict[Path, _Prepared] = {}
        instance_items: list[Example] = []
        class_items: list[Example] = []
        # Instance subsets first (decoded in that order too), so instance and class indices are two ranges.
        for subset in sorted(subsets, key=lambda s: s.is_class):
            what = "class" if subset.is_class else "instance"
            examples = self._prepare_all(subset.images, what, skip_bad_images, max_pixels)
            for ex in examples:
                ex.caption = self._caption_of(ex.image_path, subset, {} if subset.is_class else captions or {})
                ex.caption_dropout = subset.caption_dropout
                ex.shuffle_caption, ex.keep_tokens = subset.shuffle_caption, subset.keep_tokens
            # Repeats are copies of the Example list (not of the pixels): each copy has its own index,
            # hence its own crop/flip draw within an epoch.
            (class_items if subset.is_class else instance_items).extend(
                replace(e) for _ in range(subset.repeats) for e in examples
            )
        self.examples: list[Example] = instance_items + class_items
        self.num_instance_items = len(instance_items)

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def _caption_of(path: Path, subset: ImageSubset, captions: Mapping[Path, str]) -> str:
        """A dataset's caption column first, then the caption file, then the subset's prompt."""
        caption = captions.get(path) or None
        if caption is None and subset.caption_ext:
            caption = read_caption(path, subset.caption_ext, default=None)
        if caption is None:
            if not subset.prompt and not subset.is_class:
                where = (
                    "--instance_prompt is empty"
                    if subset.name == "--instance_data_dir"
                    else f"{subset.name} has no prompt"
                )
                raise DataError(
                    f"{path} has no caption file and {where}; "
                    "give an --instance_prompt (e.g. 'a photo of sks dog') or a caption file for every image"
                )
            caption = subset.prompt
        return caption

    def _prepare_all(
        self, paths: Sequence[str | os.PathLike[str]], what: str, skip_bad: bool, max_pixels: int
    ) -> list[Example]:
        examples = []
        # dict.fromkeys: de-duplicate (keeping order) so a path listed twice is decoded once.
        todo = [p for p in dict.fromkeys(Path(p) for p in paths) if p not in self._prepared]
        unmasked = []
        for path, img in iter_loaded(todo, skip_bad=skip_bad, what=what, warn=self._warn, max_pixels=max_pixels):
            mask = load_loss_mask(path, (img.height, img.width)) if self.masked_loss and what == "instance" else None
            if self.masked_loss and what == "instance" and mask is None:
                unmasked.append(path.name)
            self._prepared[path] = self._prepare(path, img, mask)
        if unmasked:
            self._warn(
                f"--masked_loss: {len(unmasked)} image(s) have no mask (no name.mask.png, no alpha channel) and are "
                f"learned whole: {', '.join(unmasked[:5])}{', ...' if len(unmasked) > 5 else ''}"
            )
        for p in paths:
            p = Path(p)
            if p in self._prepared:  # skipped bad images are absent
                prep = self._prepared[p]
                bucket = self._bucket_for(*prep.original_size)
                examples.append(Example(p, "", what == "class", bucket, prep.original_size))
        return examples

    def _bucket_for(self, height: int, width: int) -> tuple[int, int]:
        return assign_bucket(height, width, self.buckets) if self.use_buckets else (self.resolution, self.resolution)

    def _prepare(self, path: Path, img: Image.Image, mask: np.ndarray | None = None) -> _Prepared:
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
            if mask is not None:  # the same resize as the pixels (PIL filters every channel alike)
                mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.Resampling.LANCZOS))
        return _Prepared(np.asarray(img, dtype=np.uint8).copy(), (h, w), None if mask is None else mask.copy())

    # -- public API ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation subsequent accesses draw."""
        self.epoch = int(epoch)

    @property
    def item_buckets(self) -> list[tuple[int, int]]:
        """Bucket of every item, by index (what :class:`BucketBatchSampler` needs)."""
        return [e.bucket for e in self.examples]

    def dropout_rate(self, index: int, default: float) -> float:
        """Probability that item ``index``'s caption is dropped: its subset's rate, else ``default``
        (--caption_dropout); 0 for class images (their prompt is what prior preservation keeps)."""
        ex = self.examples[self._check_index(index)]
        if ex.is_class:
            return 0.0
        return default if ex.caption_dropout is None else ex.caption_dropout

    def caption(self, index: int, epoch: int | None = None) -> str:
        """Item ``index``'s caption in ``epoch`` (default: the current one): with its subset's
        ``shuffle_caption``, the tags shuffled from a seed of ``(seed, epoch, index)`` (resumes replay it)."""
        ex = self.examples[self._check_index(index)]
        if not ex.shuffle_caption:
            return ex.caption
        epoch = self.epoch if epoch is None else int(epoch)
        return shuffle_caption(
            ex.caption, ex.keep_tokens, random.Random(derive_seed("caption", self.seed, epoch, index))
        )

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

    def resized_size(self, index: int) -> tuple[int, int]:
        """``(h, w)`` of ``index``'s image as resized to cover its bucket (before the crop)."""
        ex = self.examples[self._check_index(index)]
        return tuple(self._prepared[ex.image_path].pixels.shape[:2])

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
        out = {
            "pixel_values": pixel_values,
            "original_size": prep.original_size,
            "crop_top_left": (top, left),
            "target_size": (bh, bw),
            "caption": self.caption(index),
            "is_class": ex.is_class,
            "flipped": flipped,
            "index": index,
            "image_path": str(ex.image_path),
        }
        if self.masked_loss:
            if prep.mask is None:
                out["loss_mask"] = torch.ones(1, bh, bw)
            else:
                mask = prep.mask[:, ::-1] if flipped else prep.mask
                crop_mask = np.ascontiguousarray(mask[top : top + bh, left : left + bw])
                out["loss_mask"] = torch.from_numpy(crop_mask).float().div_(255.0).unsqueeze(0)
        return out


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


def drop_captions(captions: Sequence[str], rates: Sequence[float], seed: int, micro: int, rank: int) -> list[str]:
    """``captions`` with caption ``j`` replaced by the empty prompt with probability ``rates[j]``
    (--caption_dropout / a subset's caption_dropout_rate), drawn from ``(seed, micro-step, rank, j)``."""
    captions = list(captions)
    if not any(rates):
        return captions
    for j, rate in enumerate(rates):
        draw = random.Random(seed_of("caption-dropout", seed, micro, rank, j)).random()
        if draw < rate:  # class images have rate 0: never dropped
            captions[j] = ""
    return captions


def collate_examples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    Returns ``pixel_values`` (B x 3 x H x W float), ``add_time_ids`` (B x 6 long:
    ``original_size + crop_top_left + target_size``, SDXL's micro-conditioning; cast it to the
    model dtype), ``captions`` (list of str), ``is_class`` (B bool), ``flipped`` (B bool) and
    ``indices`` (list of int), and ``loss_mask`` (B x 1 x H x W) where the items carry one.
    For prior preservation pass instance items followed by class items.
    """
    if not batch:
        raise ValueError("collate_examples: empty batch")
    shapes = {tuple(item["pixel_values"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_examples: items have different sizes {sorted(shapes)}; with aspect-ratio buckets "
            "use BucketBatchSampler so that every batch comes from one bucket"
        )
    out = {
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
    if "loss_mask" in batch[0]:
        out["loss_mask"] = torch.stack([item["loss_mask"] for item in batch]).contiguous()
    return out
