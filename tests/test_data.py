"""Tests for dreamcoeff.images and dreamcoeff.train.data: image discovery/decoding, captions, buckets, augmentation, batching.

All test images are generated with PIL in tmp_path, except the last tests, which read the real
DreamBooth photos from ../shared/dreambooth (skipped when that folder is absent).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcoeff.train.data import (
    IMAGE_EXTENSIONS,
    BadImageError,
    BucketBatchSampler,
    DataError,
    DataWarning,
    DreamBoothDataset,
    assign_bucket,
    collate_examples,
    list_images,
    load_image,
    load_images,
    make_buckets,
    read_caption,
)

DREAMBOOTH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "dreambooth"


# ----------------------------------------------------------------------------- helpers


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def solid(path: Path, width: int, height: int, color=(200, 50, 30), **kwargs) -> Path:
    return save(Image.new("RGB", (width, height), color), path, **kwargs)


def coord_pattern(width: int, height: int) -> Image.Image:
    """R = x, G = y, B = (x + 3y) mod 256: every pixel of a crop tells where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x % 256, y % 256, (x + 3 * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """Inverse of the dataset's normalisation: 3xHxW in [-1, 1] -> HxWx3 uint8."""
    return ((pixel_values.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


# ----------------------------------------------------------------------------- list_images


def test_list_images_sorted_case_insensitive_and_filtered(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "notes.txt", "e.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble junk
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.jpg").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JPEG", "d.webp"]
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".webp")


def test_list_images_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="--instance_data_dir") as e:
        list_images(missing)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)
    with pytest.raises(DataError, match="--class_data_dir"):
        list_images(missing, what="class")
    assert list_images(missing, what="class", allow_empty=True) == []


def test_list_images_not_a_directory(tmp_path):
    f = solid(tmp_path / "a.jpg", 8, 8)
    with pytest.raises(DataError, match="not a directory") as e:
        list_images(f)
    assert str(f) in str(e.value)


def test_list_images_empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(DataError, match="is empty") as e:
        list_images(d)
    assert str(d) in str(e.value)
    assert list_images(d, allow_empty=True) == []


def test_list_images_reports_what_it_found(tmp_path):
    for name in ["a.txt", "b.gif", "c.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError) as e:
        list_images(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "found 3 file(s), none with an image extension (.jpg .jpeg .png .webp)" in msg
    assert "b.gif" in msg and "photos" in msg and "not searched" in msg


# ----------------------------------------------------------------------------- load_image


def test_load_rgba_composites_on_white(tmp_path):
    arr = np.zeros((4, 3, 4), np.uint8)
    arr[0] = (255, 0, 0, 255)  # opaque red
    arr[1] = (255, 0, 0, 0)  # fully transparent (red underneath must not show)
    arr[2] = (0, 0, 0, 0)  # fully transparent black: must not come out black
    arr[3] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    path = save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png")
    out = np.asarray(load_image(path))
    assert load_image(path).mode == "RGB"
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 0]) == (255, 255, 255)
    assert tuple(out[2, 0]) == (255, 255, 255)
    assert abs(int(out[3, 0, 0]) - 127) <= 1 and out[3, 0, 0] == out[3, 0, 1] == out[3, 0, 2]


def test_load_la(tmp_path):
    arr = np.array([[[0, 255], [0, 0]]], np.uint8)  # opaque black, transparent black
    path = save(Image.fromarray(arr, "LA"), tmp_path / "la.png")
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_load_palette_with_transparency(tmp_path, ext):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 black, index 1 blue
    img.putpixel((0, 0), 1)
    path = save(img, tmp_path / f"pal{ext}", transparency=0)  # black index is transparent
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[1, 1]) == (255, 255, 255)  # transparent -> white, not black


def test_load_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    out = np.asarray(load_image(save(img, tmp_path / "p.png")))
    assert tuple(out[0, 0]) == (10, 200, 30)


def test_load_grayscale(tmp_path):
    path = save(Image.new("L", (3, 2), 77), tmp_path / "l.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (3, 2)
    assert tuple(np.asarray(img)[1, 2]) == (77, 77, 77)


def test_load_cmyk(tmp_path):
    img = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    out = load_image(save(img, tmp_path / "cmyk.jpg", quality=100))
    r, g, b = np.asarray(out)[4, 4].astype(int)
    assert out.mode == "RGB"
    assert r < 40 and g > 215 and b > 215


def test_load_16bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 257 * 64, 32896, 65535]], np.uint16)  # -> 0, 64, 128, 255
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    path = save(src, tmp_path / "gray16.png")
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # really a 16-bit file
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_32bit_int_mode(tmp_path):
    # Mode 'I' holding 16-bit range values, as older Pillow gives for 16-bit PNGs.
    src = Image.fromarray(np.array([[0, 32896, 65535]], np.int32), "I")
    out = np.asarray(load_image(save(src, tmp_path / "gray32.tiff")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_load_animated_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    out = np.asarray(load_image(path))
    assert out.shape == (6, 6, 3)
    r, g, b = out[3, 3].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_load_applies_exif_orientation(tmp_path):
    # Stored 40 wide x 20 tall with a white marker in the stored top-left corner. Orientation 6
    # means "rotate 90 degrees clockwise to display": 20 wide x 40 tall, marker at the top-right.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:6, :6] = 255
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # (width, height) swapped
    a = np.asarray(out).astype(int)
    assert a[1, 18].mean() > 200  # top-right is the marker
    assert a[1, 1].mean() < 50 and a[38, 1].mean() < 50 and a[38, 18].mean() < 50


def assert_bad(path: Path, *fragments: str, **kwargs) -> BadImageError:
    with pytest.raises(DataError) as e:
        load_image(path, **kwargs)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "--skip_bad_images" in msg, msg
    for f in fragments:
        assert f in msg, msg
    assert isinstance(e.value, BadImageError) and e.value.path == path
    return e.value


def test_load_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_bad(path, "0 bytes")


def test_load_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    coord_pattern(256, 256).save(buf, "JPEG", quality=95)
    path = tmp_path / "trunc.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(path) as check:  # the header alone is fine: only a full decode notices
        assert check.size == (256, 256)
    assert_bad(path, "truncated")


def test_load_truncated_png(tmp_path):
    buf = io.BytesIO()
    coord_pattern(128, 128).save(buf, "PNG")
    path = tmp_path / "trunc.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert_bad(path)


def test_load_non_image_with_image_extension(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("<html>404 not found</html>")
    assert_bad(path, "not a recognised image")


def test_load_missing_file(tmp_path):
    assert_bad(tmp_path / "gone.png", "does not exist")


def test_load_pixel_limit(tmp_path, monkeypatch):
    path = solid(tmp_path / "big.png", 100, 50)
    assert_bad(path, "megapixels", max_pixels=4999)
    assert load_image(path, max_pixels=5000).size == (100, 50)
    # PIL's own decompression-bomb error (raised by Image.open) is converted as well.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_bad(path, "too large")


def test_load_images_skip_bad(tmp_path):
    good = solid(tmp_path / "good.jpg", 16, 16)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="bad.jpg"):
        load_images([good, bad])
    messages: list[str] = []
    loaded = load_images([good, bad], skip_bad=True, warn=messages.append)
    assert [p for p, _ in loaded] == [good]
    assert len(messages) == 1 and str(bad) in messages[0] and "0 bytes" in messages[0]
    with pytest.warns(DataWarning, match="bad.jpg"):
        load_images([good, bad], skip_bad=True)
    with pytest.raises(DataError, match="all 1 instance image"):
        load_images([bad], skip_bad=True, warn=messages.append)


# ----------------------------------------------------------------------------- captions


def test_read_caption_utf8_bom_missing_empty(tmp_path):
    img = tmp_path / "a.jpg"
    assert read_caption(img) is None
    assert read_caption(img, default="fallback") == "fallback"
    (tmp_path / "a.txt").write_text("  a photo of  sks dog\nin Zürich \n", encoding="utf-8")
    assert read_caption(img) == "a photo of sks dog in Zürich"
    (tmp_path / "a.txt").write_bytes("\ufeffcafé sks".encode("utf-8"))  # UTF-8 with BOM
    assert read_caption(img) == "café sks"
    (tmp_path / "a.txt").write_text(" \n\t ")
    assert read_caption(img, default="dflt") == "dflt"
    (tmp_path / "a.caption").write_text("other ext")
    assert read_caption(img, "caption") == "other ext"  # leading dot optional
    assert read_caption(img, ".caption") == "other ext"


def test_read_caption_latin1_is_an_error(tmp_path):
    img = tmp_path / "b.png"
    cap = tmp_path / "b.txt"
    cap.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_caption(img)
    assert str(cap) in str(e.value) and "UTF-8" in str(e.value)


# ----------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("resolution", [64, 128, 256, 512, 768, 1024])
def test_make_buckets_properties(resolution):
    buckets = make_buckets(resolution)
    step = 64 if resolution >= 256 else 8
    assert (resolution, resolution) in buckets
    assert len(buckets) >= 3  # at least one landscape and one portrait besides the square
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert 0.85 * resolution**2 <= h * w <= resolution**2
        assert max(h, w) / min(h, w) <= 2.0
        assert (w, h) in buckets
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)


def test_make_buckets_sdxl_1024():
    assert make_buckets(1024)[:6] == [(704, 1408), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024)]


@pytest.mark.parametrize("bad", [100, 0, -64, 7, 1000.0])
def test_make_buckets_rejects_bad_resolution(bad):
    with pytest.raises(DataError, match="--resolution"):
        make_buckets(bad)


def test_make_buckets_rejects_bad_step():
    with pytest.raises(DataError, match="step"):
        make_buckets(512, step=12)
    with pytest.raises(DataError, match="step"):
        make_buckets(520, step=64)  # 520 is not a multiple of 64
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in make_buckets(520))  # auto step falls back to 8


def test_assign_bucket_keeps_orientation():
    buckets = make_buckets(256)
    assert assign_bucket(341, 512, buckets) == (192, 320)  # 512x341 landscape photo (h=341, w=512)
    assert assign_bucket(512, 341, buckets) == (320, 192)  # portrait
    assert assign_bucket(500, 500, buckets) == (256, 256)
    big = make_buckets(1024)
    assert assign_bucket(1000, 3000, big) == (704, 1408)  # beyond max ratio: widest bucket
    assert assign_bucket(768, 1344, big) == (768, 1344)  # exact match
    bh, bw = assign_bucket(900, 1600, big)  # 16:9
    assert bw > bh and abs(bw / bh - 16 / 9) < 0.1


# ----------------------------------------------------------------------------- dataset


def test_dataset_buckets_and_micro_conditioning(tmp_path):
    land = solid(tmp_path / "land.jpg", 512, 341)
    port = solid(tmp_path / "port.png", 341, 512)
    square = solid(tmp_path / "square.jpg", 300, 300)
    ds = DreamBoothDataset(
        [land, port, square], "a photo of sks dog", resolution=256, use_buckets=True, random_flip=True
    )
    assert len(ds) == 3
    by_name = {Path(ds[i]["image_path"]).name: ds[i] for i in range(3)}
    expect = {
        "land.jpg": ((341, 512), (192, 320)),
        "port.png": ((512, 341), (320, 192)),
        "square.jpg": ((300, 300), (256, 256)),
    }
    for name, (orig, bucket) in expect.items():
        item = by_name[name]
        assert item["original_size"] == orig, name
        assert item["target_size"] == bucket, name
        assert tuple(item["pixel_values"].shape) == (3, *bucket), name
        assert item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
        assert item["caption"] == "a photo of sks dog" and item["is_class"] is False
    # Resized land.jpg: 341x512 -> 213x320 (scale 0.625), so the crop top is in [0, 21], left 0.
    top, left = by_name["land.jpg"]["crop_top_left"]
    assert 0 <= top <= 213 - 192 and left == 0
    assert [e.bucket for e in ds.examples] == ds.item_buckets


def test_dataset_without_buckets_is_square(tmp_path):
    land = solid(tmp_path / "land.jpg", 512, 341)
    ds = DreamBoothDataset([land], "x", resolution=128)
    item = ds[0]
    assert item["target_size"] == (128, 128) and tuple(item["pixel_values"].shape) == (3, 128, 128)
    assert item["original_size"] == (341, 512)


def test_crop_offsets_match_pixels_without_resize(tmp_path):
    # 100x64 pattern at resolution 64: no resize, so the crop must be exactly the source pixels at
    # crop_top_left of the (flipped) image, which is how SDXL's crop conditioning is defined.
    src = coord_pattern(100, 64)
    path = save(src, tmp_path / "pattern.png")
    ds = DreamBoothDataset([path], "x", resolution=64, random_flip=True, repeats=8)
    ref = np.asarray(src)
    seen_lefts, seen_flips = set(), set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            top, left = item["crop_top_left"]
            base = ref[:, ::-1] if item["flipped"] else ref
            np.testing.assert_array_equal(to_uint8(item["pixel_values"]), base[top : top + 64, left : left + 64])
            assert top == 0 and 0 <= left <= 36
            seen_lefts.add(left)
            seen_flips.add(item["flipped"])
    assert len(seen_lefts) > 5 and seen_flips == {True, False}  # really random, both flips drawn


def test_crop_offsets_match_pixels_with_downscale(tmp_path):
    src = coord_pattern(200, 128)  # covers 64x64 at exactly half size: 100x64
    path = save(src, tmp_path / "pattern.png")
    ds = DreamBoothDataset([path], "x", resolution=64, random_flip=True, repeats=6)
    resized = np.asarray(src.resize((100, 64), Image.Resampling.LANCZOS))
    for i in range(len(ds)):
        item = ds[i]
        assert item["original_size"] == (128, 200)  # the file's true size, not the resized one
        top, left = item["crop_top_left"]
        base = resized[:, ::-1] if item["flipped"] else resized
        np.testing.assert_array_equal(to_uint8(item["pixel_values"]), base[top : top + 64, left : left + 64])


def test_center_crop(tmp_path):
    src = coord_pattern(101, 64)  # 37 spare columns -> round(18.5) = 18 (torchvision's rounding)
    path = save(src, tmp_path / "pattern.png")
    ds = DreamBoothDataset([path], "x", resolution=64, center_crop=True, repeats=4)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["crop_top_left"] == (0, 18) and item["flipped"] is False
            np.testing.assert_array_equal(to_uint8(item["pixel_values"]), np.asarray(src)[:, 18:82])


def test_augmentation_reproducible_and_varies_by_epoch(tmp_path):
    paths = [save(coord_pattern(120 + 7 * k, 64), tmp_path / f"{k}.png") for k in range(4)]

    def draws(ds, epoch):
        ds.set_epoch(epoch)
        return [(ds[i]["crop_top_left"], ds[i]["flipped"]) for i in range(len(ds))]

    a = DreamBoothDataset(paths, "x", resolution=64, random_flip=True, repeats=3, seed=1)
    b = DreamBoothDataset(paths, "x", resolution=64, random_flip=True, repeats=3, seed=1)
    c = DreamBoothDataset(paths, "x", resolution=64, random_flip=True, repeats=3, seed=2)
    assert draws(a, 0) == draws(b, 0)  # separate instances, same seed: same draws
    assert draws(a, 5) == draws(b, 5)
    assert draws(a, 0) != draws(a, 1)  # a new epoch gives new crops/flips
    assert draws(a, 0) != draws(c, 0)  # the seed matters
    # Same access twice -> same pixels (a resumed run replays the same batch), and the draw does
    # not depend on what was accessed before.
    a.set_epoch(3)
    first = a[7]["pixel_values"]
    _ = [a[i] for i in range(len(a))]
    assert torch.equal(first, a[7]["pixel_values"])
    fresh = DreamBoothDataset(paths, "x", resolution=64, random_flip=True, repeats=3, seed=1)
    fresh.set_epoch(3)
    assert torch.equal(fresh[7]["pixel_values"], first)
    # Repeated copies of one image within an epoch get their own draws.
    a.set_epoch(0)
    copies = [(a[k * 4]["crop_top_left"], a[k * 4]["flipped"]) for k in range(3)]
    assert len(set(copies)) > 1


def test_augmentation_key_matches_access(tmp_path):
    path = save(coord_pattern(130, 64), tmp_path / "p.png")
    ds = DreamBoothDataset([path], "x", resolution=64, random_flip=True, repeats=5, seed=3)
    for epoch in (0, 4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            key = ds.augmentation_key(i)
            assert key == (str(path), *item["crop_top_left"], item["flipped"])
            assert key == ds.augmentation_key(i, epoch)
            hash(key)
    ds.set_epoch(0)
    assert ds.augmentation_key(0, epoch=9) != ds.augmentation_key(0) or ds.augmentation_key(
        1, 9
    ) != ds.augmentation_key(1)
    center = DreamBoothDataset([path], "x", resolution=64, center_crop=True, repeats=5)
    assert len({center.augmentation_key(i, e) for i in range(5) for e in range(3)}) == 1  # cacheable


def test_random_flip_off_never_flips(tmp_path):
    path = save(coord_pattern(90, 64), tmp_path / "p.png")
    ds = DreamBoothDataset([path], "x", resolution=64, random_flip=False, repeats=20)
    assert not any(ds[i]["flipped"] for i in range(len(ds)))


def test_exif_rotated_image_true_size_in_dataset(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.new("RGB", (120, 80), (10, 20, 30)), tmp_path / "rot.jpg", exif=exif)
    ds = DreamBoothDataset([path], "x", resolution=64, use_buckets=True)
    item = ds[0]
    assert item["original_size"] == (120, 80)  # displayed (rotated) size: 80 wide, 120 tall
    h, w = item["target_size"]
    assert h > w  # portrait bucket


def test_upscale_warning_once_per_image(tmp_path):
    small = solid(tmp_path / "small.jpg", 40, 30)
    big = solid(tmp_path / "big.jpg", 200, 200)
    messages: list[str] = []
    ds = DreamBoothDataset([small, big], "x", resolution=64, repeats=3, warn=messages.append)
    for epoch in range(2):
        ds.set_epoch(epoch)
        _ = [ds[i] for i in range(len(ds))]
    assert len(messages) == 1 and str(small) in messages[0] and "upscal" in messages[0]
    assert tuple(ds[0]["pixel_values"].shape) == (3, 64, 64)
    assert ds[0]["original_size"] == (30, 40)
    with pytest.warns(DataWarning, match="small.jpg"):
        DreamBoothDataset([small], "x", resolution=64)


def test_dataset_captions_class_images_and_repeats(tmp_path):
    inst = tmp_path / "inst"
    cls = tmp_path / "cls"
    inst.mkdir()
    cls.mkdir()
    a = solid(inst / "a.jpg", 64, 64)
    b = solid(inst / "b.jpg", 64, 64)
    (inst / "a.txt").write_text("sks dog on a beach", encoding="utf-8")
    class_paths = [solid(cls / f"{k}.png", 64, 64, (0, 0, 255)) for k in range(3)]
    ds = DreamBoothDataset(
        list_images(inst),
        "a photo of sks dog",
        resolution=64,
        class_images=list_images(cls, "class"),
        class_prompt="a photo of a dog",
        caption_ext=".txt",
        repeats=2,
    )
    assert len(ds) == 2 * 2 + 3
    assert list(ds.instance_indices) == [0, 1, 2, 3] and list(ds.class_indices) == [4, 5, 6]
    captions = [ds[i]["caption"] for i in range(len(ds))]
    assert captions == ["sks dog on a beach", "a photo of sks dog"] * 2 + ["a photo of a dog"] * 3
    assert [ds[i]["is_class"] for i in range(len(ds))] == [False] * 4 + [True] * 3
    assert [Path(ds[i]["image_path"]) for i in range(4)] == [a, b, a, b]
    assert [e.image_path for e in ds.examples[4:]] == class_paths
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_caption_errors(tmp_path):
    a = solid(tmp_path / "a.jpg", 64, 64)
    cap = tmp_path / "a.txt"
    cap.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError) as e:
        DreamBoothDataset([a], "x", resolution=64, caption_ext=".txt")
    assert str(cap) in str(e.value)
    cap.unlink()
    with pytest.raises(DataError, match="instance_prompt") as e:
        DreamBoothDataset([a], "", resolution=64, caption_ext=".txt")
    assert str(a) in str(e.value)
    with pytest.raises(DataError, match="--class_prompt"):
        DreamBoothDataset([a], "x", resolution=64, class_images=[a])


def test_dataset_skip_bad_images(tmp_path):
    good = solid(tmp_path / "good.jpg", 64, 64)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError) as e:
        DreamBoothDataset([good, bad], "x", resolution=64)
    assert str(bad) in str(e.value) and "--skip_bad_images" in str(e.value)
    messages: list[str] = []
    ds = DreamBoothDataset([good, bad], "x", resolution=64, repeats=2, skip_bad_images=True, warn=messages.append)
    assert len(ds) == 2 and all(Path(ds[i]["image_path"]) == good for i in range(2))
    assert len(messages) == 1 and str(bad) in messages[0]
    with pytest.raises(DataError, match="all 1 instance"):
        DreamBoothDataset([bad], "x", resolution=64, skip_bad_images=True, warn=messages.append)


# ----------------------------------------------------------------------------- sampler / collate


def make_bucket_list():
    # 23 items over three buckets with sizes 10, 8, 5 (interleaved, as a dataset would have them)
    kinds = [(192, 320), (256, 256), (320, 192)]
    counts = {kinds[0]: 10, kinds[1]: 8, kinds[2]: 5}
    out = []
    while any(counts.values()):
        for k in kinds:
            if counts[k]:
                out.append(k)
                counts[k] -= 1
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_bucket_sampler_batches_share_bucket_and_cover_all(batch_size):
    buckets = make_bucket_list()
    sampler = BucketBatchSampler(buckets, batch_size, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(math.ceil(n / batch_size) for n in (10, 8, 5))
    assert sorted(i for b in batches for i in b) == list(range(len(buckets)))  # each index exactly once
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({buckets[i] for i in b}) == 1


def test_bucket_sampler_deterministic_and_epoch_dependent():
    buckets = make_bucket_list()
    s1 = BucketBatchSampler(buckets, 3, seed=7)
    s2 = BucketBatchSampler(buckets, 3, seed=7)
    assert list(s1) == list(s2) == list(s1)
    s1.set_epoch(1)
    assert list(s1) != list(s2)
    s2.set_epoch(1)
    assert list(s1) == list(s2)
    assert list(BucketBatchSampler(buckets, 3, seed=8)) != list(BucketBatchSampler(buckets, 3, seed=7))
    # Buckets get interleaved rather than served one after the other.
    order = [buckets[b[0]] for b in BucketBatchSampler(buckets, 1, seed=7)]
    changes = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert changes > 5


def test_bucket_sampler_drop_last_no_shuffle_and_indices():
    buckets = make_bucket_list()
    s = BucketBatchSampler(buckets, 4, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 10 // 4 + 8 // 4 + 5 // 4
    assert all(len(b) == 4 for b in batches)
    plain = list(BucketBatchSampler([(64, 64)] * 5, 2, shuffle=False))
    assert plain == [[0, 1], [2, 3], [4]]
    sub = list(BucketBatchSampler(buckets, 2, indices=[0, 3, 6, 9]))
    assert sorted(i for b in sub for i in b) == [0, 3, 6, 9]


def test_sampler_with_dataset_and_collate(tmp_path):
    paths = [solid(tmp_path / f"l{k}.jpg", 96, 64) for k in range(3)] + [
        solid(tmp_path / f"p{k}.jpg", 64, 96) for k in range(2)
    ]
    ds = DreamBoothDataset(paths, "sks", resolution=64, use_buckets=True, random_flip=True)
    sampler = BucketBatchSampler(ds, 2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_examples)
    seen = []
    for batch in loader:
        n = len(batch["captions"])
        assert batch["pixel_values"].shape[0] == n
        assert batch["add_time_ids"].shape == (n, 6)
        assert batch["add_time_ids"].dtype == torch.long
        for row, idx in zip(batch["add_time_ids"].tolist(), batch["indices"]):
            item = ds[idx]
            assert row == [*item["original_size"], *item["crop_top_left"], *item["target_size"]]
            assert tuple(batch["pixel_values"].shape[2:]) == item["target_size"]
        seen += batch["indices"]
    assert sorted(seen) == list(range(5))


def test_collate_examples_layout_and_mismatch(tmp_path):
    inst = solid(tmp_path / "i.jpg", 100, 64)
    cls = solid(tmp_path / "c.jpg", 64, 64)
    ds = DreamBoothDataset([inst], "sks dog", resolution=64, class_images=[cls], class_prompt="dog", random_flip=True)
    batch = collate_examples([ds[0], ds[1]])  # instance then class, as the prior-preservation trainer does
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["captions"] == ["sks dog", "dog"]
    assert batch["is_class"].tolist() == [False, True] and batch["is_class"].dtype == torch.bool
    top, left = ds[0]["crop_top_left"]
    assert batch["add_time_ids"].tolist()[0] == [64, 100, top, left, 64, 64]
    assert batch["add_time_ids"].tolist()[1] == [64, 64, 0, 0, 64, 64]
    assert batch["flipped"].tolist() == [ds[0]["flipped"], ds[1]["flipped"]]
    other = DreamBoothDataset([solid(tmp_path / "w.jpg", 200, 64)], "x", resolution=64, use_buckets=True)
    assert other[0]["target_size"] != (64, 64)
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_examples([ds[0], other[0]])


# ----------------------------------------------------------------------------- real photos

needs_photos = pytest.mark.skipif(not DREAMBOOTH_DIR.is_dir(), reason=f"{DREAMBOOTH_DIR} not present")


@needs_photos
def test_real_photos_with_buckets():
    subject = DREAMBOOTH_DIR / "dog"
    if not subject.is_dir():
        pytest.skip(f"{subject} not present")
    paths = list_images(subject)
    assert len(paths) >= 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # 512 px photos at 256: no upscaling expected
        ds = DreamBoothDataset(
            paths, "a photo of sks dog", resolution=256, use_buckets=True, random_flip=True, repeats=2
        )
    assert len(ds) == 2 * len(paths)
    for i in range(len(ds)):
        item = ds[i]
        with Image.open(item["image_path"]) as im:
            w, h = im.size  # these copies are already EXIF-rotated
        assert item["original_size"] == (h, w)
        assert item["target_size"] == assign_bucket(h, w, ds.buckets)
        assert (item["target_size"][0] >= item["target_size"][1]) == (h >= w) or h == w
        pv = item["pixel_values"]
        assert tuple(pv.shape) == (3, *item["target_size"])
        assert torch.isfinite(pv).all() and pv.min() >= -1 and pv.max() <= 1
        assert pv.std() > 0.05  # a real photo, not a blank
    batches = list(BucketBatchSampler(ds, 4, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        collate_examples([ds[i] for i in b])


@needs_photos
def test_real_photo_crops_keep_orientation(tmp_path):
    # The stored copies are square; cut landscape and portrait photos from one (in tmp_path only).
    photos = sorted(DREAMBOOTH_DIR.glob("*/*.jpg"))
    if not photos:
        pytest.skip(f"no photos under {DREAMBOOTH_DIR}")
    photo = load_image(photos[0])
    land = save(photo.crop((0, 80, 512, 421)), tmp_path / "land.jpg")  # 512x341
    port = save(photo.crop((80, 0, 421, 512)), tmp_path / "port.jpg")  # 341x512
    ds = DreamBoothDataset([land, port], "x", resolution=256, use_buckets=True)
    assert ds[0]["original_size"] == (341, 512) and ds[0]["target_size"] == (192, 320)
    assert ds[1]["original_size"] == (512, 341) and ds[1]["target_size"] == (320, 192)
