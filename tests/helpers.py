"""Small helpers shared by the trainer tests."""

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, sizes=((64, 64), (80, 64), (64, 80)), seed=0) -> Path:
    """Write one PNG per (height, width): a red field with a randomly coloured square in the middle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = 200
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder
