"""--masked_loss (issue 17, item 5): per-image masks follow their image through every resize, flip and
crop, pixel for pixel, and weight the denoising loss."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcoeff.images import list_images, load_loss_mask, mask_path_of
from dreamcoeff.train import main
from dreamcoeff.train.data import DataError, DreamBoothDataset, collate_examples
from tests.trainer_runs import trainer_argv

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """A grey image with structure everywhere (so a misplaced crop or flip shows)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4), dtype=np.uint8))[:h, :w].copy()


def _write_pair(folder, name, h, w, seed):
    """An image whose three channels equal its mask sidecar (both the same grey pattern)."""
    grey = _pattern(h, w, seed)
    grey[0, 0] = 255  # never all black
    Image.fromarray(np.stack([grey] * 3, -1)).save(folder / f"{name}.png")
    Image.fromarray(grey).save(folder / f"{name}.mask.png")
    return grey


@pytest.mark.parametrize("buckets", [False, True])
def test_masks_follow_every_resize_flip_and_crop_pixel_for_pixel(tmp_path, buckets):
    folder = tmp_path / "inst"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (96, 64), (64, 112), (40, 48)]):  # the last is upscaled
        _write_pair(folder, f"im{i}", h, w, i)
    paths = list_images(folder)
    assert [p.name for p in paths] == ["im0.png", "im1.png", "im2.png", "im3.png"]  # masks are no images
    ds = DreamBoothDataset(paths, "a photo of sks dog", resolution=64, random_flip=True, use_buckets=buckets,
                           masked_loss=True, seed=3, repeats=2, warn=lambda m: None)  # fmt: skip
    flips = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            pixels = ((item["pixel_values"][0] + 1) * 127.5).round()  # channel 0 holds the mask's pattern
            mask = (item["loss_mask"][0] * 255).round()
            assert item["loss_mask"].shape == (1, *item["target_size"])
            torch.testing.assert_close(mask, pixels, rtol=0, atol=0)
            flips.add(item["flipped"])
    assert flips == {True, False}
    batch = collate_examples([ds[0], ds[4]])
    assert batch["loss_mask"].shape == (2, 1, 64, 64)


def test_alpha_channel_is_the_mask_and_sidecar_wins(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 90
    rgba[8:24, 8:24, 3] = 255  # opaque square: learn
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_loss_mask(tmp_path / "a.png", (32, 32)), rgba[..., 3])
    side = np.full((32, 32), 200, dtype=np.uint8)
    Image.fromarray(side).save(mask_path_of(tmp_path / "a.png"))
    np.testing.assert_array_equal(load_loss_mask(tmp_path / "a.png", (32, 32)), side)
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "b.png")
    assert load_loss_mask(tmp_path / "b.png", (32, 32)) is None  # no mask: learned whole


@pytest.mark.parametrize(
    "mask, message",
    [(np.full((16, 32), 255, np.uint8), "is 32x16 (WxH) but"), (np.zeros((32, 32), np.uint8), "is all black")],
)
def test_bad_masks_are_refused_naming_both_files(tmp_path, mask, message):
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(mask).save(tmp_path / "c.mask.png")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        DreamBoothDataset([tmp_path / "c.png"], "p", resolution=32, masked_loss=True)
    assert "c.mask.png" in str(err.value) and "c.png" in str(err.value)


def test_masked_loss_is_the_weighted_mean_of_the_float64_reference():
    from types import SimpleNamespace

    from dreamcoeff.train.step import denoising_loss

    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :32] = 1.0  # top half of image 0
    mask[1] = torch.rand(1, 64, 64)
    pred = torch.randn(2, 4, 8, 8)

    class Sched:
        config = SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon")

        def add_noise(self, x, n, t):
            return x

    cfg = SimpleNamespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0, loss_type="l2", huber_c=0.1,
                          debiased_estimation_loss=False, min_timestep=0, max_timestep=None)  # fmt: skip
    batch = {"add_time_ids": torch.zeros(2, 6), "is_class": torch.zeros(2, dtype=torch.bool), "loss_mask": mask}

    def unet(noisy, t, embeds, added_cond_kwargs, return_dict):
        return (pred,)

    gen = torch.Generator().manual_seed(5)
    loss = denoising_loss(unet, Sched(), latents, batch, (None, None), cfg, gen, torch.float32)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))  # what the loss drew
    w = mask.double().reshape(2, 1, 8, 8, 8, 8).mean(dim=(3, 5))  # 8x8 blocks: the area average
    err = (pred.double() - noise.double()) ** 2
    ref = ((err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * 4)).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    unmasked = dict(batch)
    unmasked["loss_mask"] = torch.ones_like(mask)
    full = denoising_loss(unet, Sched(), latents, unmasked, (None, None), cfg, torch.Generator().manual_seed(5),
                          torch.float32)  # fmt: skip
    torch.testing.assert_close(full.double(), err.mean(dim=(1, 2, 3)).mean(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_trainer_runs_with_masked_loss(tiny_pipeline_dir, tmp_path, caplog):
    inst = tmp_path / "inst"
    inst.mkdir()
    for i in range(2):
        _write_pair(inst, f"m{i}", 64, 64, i)
    Image.fromarray(np.full((64, 64, 3), 50, np.uint8)).save(inst / "nomask.png")
    out = tmp_path / "out"
    assert main(trainer_argv(tiny_pipeline_dir, inst, out, "--masked_loss", "--max_train_steps", 2)) == 0
    assert (out / "coeff_weights.safetensors").is_file()
    assert "1 image(s) have no mask" in caplog.text


@pytest.mark.parametrize("processes, batch", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_class_images_join_the_batch_with_whole_image_masks_each_once_per_cycle(tmp_path, processes, batch):
    """`with_class_batch` under --masked_loss: the instance part (masks included) stays as it was, the
    class images follow with an all-ones mask (learned whole) and their own pixels, captions and flags,
    and across steps and ranks every aligned block of len(class images) picks is each class image once
    (a rank that draws its neighbour's images, or the same ones, breaks that)."""
    import types

    from dreamcoeff.train.step import with_class_batch

    inst, cls = tmp_path / "inst", tmp_path / "cls"
    inst.mkdir()
    cls.mkdir()
    for i in range(2):
        _write_pair(inst, f"im{i}", 64, 64, i)
    for i in range(4):  # no sidecars: the class images have no masks
        Image.fromarray(np.full((64, 64, 3), 40 * i + 20, np.uint8)).save(cls / f"c{i}.png")
    ds = DreamBoothDataset(list_images(inst), "a photo of sks dog", class_images=list_images(cls),
                           class_prompt="a photo of a dog", resolution=64, masked_loss=True, seed=3,
                           warn=lambda m: None)  # fmt: skip
    class_ids = list(ds.class_indices)
    assert len(class_ids) == 4 and not set(class_ids) & set(ds.instance_indices)
    cfg = types.SimpleNamespace(seed=11, train_batch_size=batch)
    instance = collate_examples([ds[i] for i in list(ds.instance_indices)[:batch]])
    picks = []
    for micro in range(1, 9):
        for rank in range(processes):
            acc = types.SimpleNamespace(process_index=rank, num_processes=processes)
            got = with_class_batch(instance, ds, cfg, micro, acc)
            extra = got["indices"][batch:]
            assert len(extra) == batch and set(extra) <= set(class_ids)
            picks += extra
            items = [ds[i] for i in extra]
            want_pixels = torch.cat([instance["pixel_values"], torch.stack([it["pixel_values"] for it in items])])
            assert torch.equal(got["pixel_values"], want_pixels)
            assert got["captions"] == list(instance["captions"]) + ["a photo of a dog"] * batch
            assert got["is_class"].tolist() == [False] * batch + [True] * batch
            assert got["indices"][:batch] == list(instance["indices"])
            rows = [[*it["original_size"], *it["crop_top_left"], *it["target_size"]] for it in items]
            want_ids = torch.cat([instance["add_time_ids"], torch.tensor(rows, dtype=torch.long)])
            assert torch.equal(got["add_time_ids"], want_ids)
            assert got["loss_mask"].shape == (2 * batch, 1, 64, 64)
            assert torch.equal(got["loss_mask"][:batch], instance["loss_mask"])  # the instance masks, unchanged
            assert torch.equal(got["loss_mask"][batch:], torch.ones(batch, 1, 64, 64))
    blocks = [picks[k : k + 4] for k in range(0, len(picks), 4)]
    assert all(sorted(b) == class_ids for b in blocks), blocks
    assert len({tuple(b) for b in blocks}) > 1, "every cycle drew the class images in the same order"
