"""VAE latents cached per augmentation variant: in memory for a run (``--cache_latents``), or on
disk across runs (``--cache_latents_to_disk``). Both caches answer `key_of(dataset, index)`,
`get(key)` (None when absent) and `put(key, params)` (returns the tensor to use), so
`step.encode_latents` has one path for both.

On disk, an entry is the VAE posterior (mean and log-variance, float32) of one augmentation variant of one
image, stored as ``<dir>/<key[:2]>/<key>.safetensors``. Its key is a SHA-256 of everything the pixels
and the encoding depend on: the image file's bytes, its decoded size, the bucket it was resized to
cover and that size, the crop offsets, the flip, and a fingerprint of the VAE (its config, dtype and
every weight). Change any of them and the key changes, so an entry is never stale; entries are
written atomically, and an unreadable one is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..io import atomic_write, remove_stale_temps

__all__ = ["DiskLatentCache", "LatentCache", "MemoryLatentCache", "default_cache_dir", "vae_fingerprint"]

logger = logging.getLogger("dreamcoeff")

#: Bumped when the preprocessing (resize, crop, flip) or the stored format changes.
FORMAT = "dreamcoeff-latents-1"
#: A temp file in the cache this old is a killed write's, never one a concurrent run is still writing
#: (an entry takes milliseconds to write).
STALE_TEMP_S = 3600.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dreamcoeff/latents`` (``~/.cache/dreamcoeff/latents``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dreamcoeff" / "latents"


@torch.no_grad()
def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 of the VAE's config, dtype and weights (a different or fine-tuned VAE gives another)."""
    h = hashlib.sha256()
    config = getattr(vae, "config", {})
    h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class MemoryLatentCache:
    """``--cache_latents``: posteriors in memory for one run, keyed by `dataset.augmentation_key`
    (within a run an image's pixels, bucket and VAE do not change)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, torch.Tensor] = {}

    def key_of(self, dataset, index: int) -> tuple:
        return dataset.augmentation_key(index)

    def get(self, key: tuple) -> torch.Tensor | None:
        return self._entries.get(key)

    def put(self, key: tuple, params: torch.Tensor) -> torch.Tensor:
        self._entries[key] = params.cpu()
        return self._entries[key]


class DiskLatentCache:
    """A mapping from an augmentation variant's content key to its VAE posterior parameters.

    Opening it deletes the temp files that killed writes left in the folder over an hour ago (the
    folder is shared by runs, so a younger one may be another run's write in progress)."""

    def __init__(self, directory: str | os.PathLike, vae_id: str):
        self.directory = Path(directory)
        self.vae_id = vae_id
        self._file_hashes: dict[Path, str] = {}
        removed = remove_stale_temps(self.directory, STALE_TEMP_S, recursive=True)
        if removed:
            logger.info("latent cache: removed %d temp file(s) left by interrupted writes", len(removed))

    def _file_hash(self, path: Path) -> str:
        if path not in self._file_hashes:
            self._file_hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._file_hashes[path]

    def key_of(self, dataset, index: int) -> str:
        """The content key of ``dataset[index]``'s pixels as this epoch's augmentation draws them."""
        ex = dataset.examples[index]
        top, left, flipped = dataset.augmentation(index)
        resized = dataset.resized_size(index)
        parts = [FORMAT, self._file_hash(Path(ex.image_path)), list(ex.original_size), list(resized),
                 list(ex.bucket), top, left, bool(flipped), self.vae_id]  # fmt: skip
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored posterior, or None (absent, or unreadable: then it is recomputed and rewritten)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            params = load_file(str(path))["params"]
        except (SafetensorError, OSError, KeyError) as exc:
            logger.warning("latent cache entry %s is unreadable (%s): encoding it again", path, exc)
            return None
        return params

    def put(self, key: str, params: torch.Tensor) -> torch.Tensor:
        """Store the posterior (float32, atomically) and return it as stored."""
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = params.detach().to("cpu", torch.float32).contiguous()
        atomic_write(path, lambda tmp: save_file({"params": tensor}, tmp, metadata={"format": FORMAT}))
        return tensor


#: What `step.encode_latents` takes.
LatentCache = MemoryLatentCache | DiskLatentCache
