"""The trainer's data: images and captions on disk (`images`), buckets, dataset and batches (`dataset`)."""

from .dataset import (
    Augmentation,
    BucketBatchSampler,
    DreamBoothDataset,
    Example,
    assign_bucket,
    collate_examples,
    derive_seed,
    seed_of,
    make_buckets,
)
from .images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    BadImageError,
    DataError,
    DataWarning,
    list_images,
    load_image,
    load_images,
    read_caption,
)

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
    "derive_seed",
    "seed_of",
    "list_images",
    "load_image",
    "load_images",
    "make_buckets",
    "read_caption",
]
