"""--cache_latents_to_disk (issue 17, item 9): an entry per augmentation variant, keyed by everything
its pixels and encoding depend on; reused across runs, never stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcoeff.train import main
from dreamcoeff.train.data import DreamBoothDataset
from dreamcoeff.train.latent_cache import DiskLatentCache, vae_fingerprint
from tests.trainer_runs import final_adapter_weights, trainer_argv

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


def _image(path, seed, size=(80, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)


def _keys(folder, cache, **kw):
    ds = DreamBoothDataset(sorted(folder.glob("*.png")), "p", resolution=64, seed=kw.pop("seed", 0), **kw)
    return [cache.key_of(ds, i) for i in range(len(ds))]


def test_every_part_of_the_key_changes_it(tmp_path, tiny_pipe):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(folder / "a.png", 0)
    cache = DiskLatentCache(tmp_path / "c", vae_fingerprint(tiny_pipe.vae))
    base = _keys(folder, cache)
    assert _keys(folder, DiskLatentCache(tmp_path / "c", vae_fingerprint(tiny_pipe.vae))) == base  # same -> same
    # the crop: another seed draws another offset in the 80 px wide image (several seeds: one must differ)
    crops = {_keys(folder, cache, seed=s)[0] for s in range(6)}
    assert len(crops) > 1
    # the flip
    flipped = {_keys(folder, cache, seed=s, random_flip=True, center_crop=True)[0] for s in range(6)}
    assert _keys(folder, cache, center_crop=True)[0] in flipped and len(flipped) == 2
    # the bucket (aspect buckets put the 80x64 image in a non-square one)
    assert _keys(folder, cache, use_buckets=True) != base
    # the image's content, under the same name
    _image(folder / "a.png", 1)
    assert _keys(folder, DiskLatentCache(tmp_path / "c", cache.vae_id)) != base
    # the VAE
    with torch.no_grad():
        next(tiny_pipe.vae.parameters()).add_(1e-3)
    assert vae_fingerprint(tiny_pipe.vae) != cache.vae_id


def test_unreadable_entry_is_recomputed(tmp_path):
    cache = DiskLatentCache(tmp_path, "vae")
    cache.put("ab" + "0" * 62, torch.ones(8, 2, 2))
    torch.testing.assert_close(cache.get("ab" + "0" * 62), torch.ones(8, 2, 2))
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".safetensors")
    path.write_bytes(b"garbage")
    assert cache.get("ab" + "0" * 62) is None


@pytest.mark.slow
def test_disk_cache_is_reused_across_runs_and_never_stale(tiny_pipeline_dir, tmp_path, monkeypatch):
    inst = tmp_path / "inst"
    inst.mkdir()
    for i in range(3):
        _image(inst / f"{i}.png", i, size=(64, 64))
    common = ("--max_train_steps", 4, "--center_crop", "--coeff_lr", "5e-2")
    plain = tmp_path / "plain"
    assert main(trainer_argv(tiny_pipeline_dir, inst, plain, *common)) == 0
    cache_dir = tmp_path / "cache"
    flags = (*common, "--cache_latents_to_disk", "--latent_cache_dir", cache_dir)
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "first", *flags)) == 0
    entries = sorted(cache_dir.rglob("*.safetensors"))
    assert len(entries) == 3  # center crops, no flip: one variant per image
    for key, value in final_adapter_weights(plain).items():
        torch.testing.assert_close(final_adapter_weights(tmp_path / "first")[key], value, rtol=0, atol=1e-5)

    # a second run reads every latent from disk: the VAE never encodes
    import diffusers

    calls = []
    real = diffusers.AutoencoderKL.encode
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    mtimes = [p.stat().st_mtime_ns for p in entries]
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "second", *flags)) == 0
    assert calls == [] and [p.stat().st_mtime_ns for p in entries] == mtimes

    # new content under an old name: a new entry, and the run equals an uncached run on the new image
    _image(inst / "1.png", 99, size=(64, 64))
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "third", *flags)) == 0
    assert len(calls) >= 1 and len(sorted(cache_dir.rglob("*.safetensors"))) == 4
    assert main(trainer_argv(tiny_pipeline_dir, inst, tmp_path / "plain2", *common)) == 0
    for key, value in final_adapter_weights(tmp_path / "plain2").items():
        torch.testing.assert_close(final_adapter_weights(tmp_path / "third")[key], value, rtol=0, atol=1e-5)


# A child that writes cache entries without end, each big enough that a write takes a while.
_WRITER = """
import sys, torch
from dreamcoeff.train.latent_cache import DiskLatentCache
cache = DiskLatentCache(sys.argv[1], "vae")
big = torch.ones(8, 1024, 1024)
for i in range(10**6):
    cache.put(f"ab{i:062d}", big)
"""


def _safetensors_temps(folder):
    import re

    return [p for p in folder.rglob(".tmp*") if re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name)]


def _temps(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".safetensors"))


def test_temp_files_of_killed_writes_are_removed_when_stale_and_kept_while_young(tmp_path):
    """SIGKILL a process mid-write, for real: what it leaves (our atomic_write temp, safetensors' own
    `.tmpXXXXXX`) is deleted by the next cache opened on the folder once it is an hour old, never while
    it could still be another run's write in progress; complete entries stay readable."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dreamcoeff.io import TEMP_FILE_RE

    folder = tmp_path / "cache"
    for _attempt in range(5):  # the kill can land between two writes: then nothing is left, try again
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)])
        try:
            deadline = time.time() + 60
            # kill once one entry is complete and safetensors is writing the next under its own temp name
            while time.time() < deadline and not (any(folder.rglob("*.safetensors")) and _safetensors_temps(folder)):
                time.sleep(0.001)
            assert child.poll() is None, "the writer died on its own"
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        if _safetensors_temps(folder):
            break
    left = _temps(folder)
    assert _safetensors_temps(folder), f"no kill landed in safetensors' write in 5 attempts: {left}"
    assert all(TEMP_FILE_RE.match(p.name) for p in left), left  # every leftover is one the sweep knows

    DiskLatentCache(folder, "vae")  # young: possibly a concurrent run's write, kept
    assert _temps(folder) == left
    old = time.time() - 2 * 3600
    for p in left:
        os.utime(p, (old, old))
    cache = DiskLatentCache(folder, "vae")
    assert _temps(folder) == []
    entries = sorted(folder.rglob("*.safetensors"))
    assert entries
    for path in entries:
        key = path.name.removesuffix(".safetensors")
        torch.testing.assert_close(cache.get(key), torch.ones(8, 1024, 1024))
