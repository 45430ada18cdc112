"""Scorer v2 (dreamcoeff/testing/scorer.py) on hand-built images: the subject on its object region
alone, the background and bg_copy apart, and the ceilings through the VAE (issue 35, item 1).

The reference every test compares with is the Scene the image was rendered from (or a hand-made
array), never a value the scorer produced."""

import json
from pathlib import Path

import numpy as np
import pytest

from dreamcoeff.testing import microworld as mw
from dreamcoeff.testing import scorer as sc

REPO = Path(__file__).resolve().parents[1]
ALL_CONCEPTS = [c for cs in mw.CONCEPT_SETS.values() for c in cs]
#: A flat colour far from every world background (nearest template over BG_THRESHOLD away).
TEAL = (0, 128, 128)


def on_colour(scene: mw.Scene, rgb: tuple[int, int, int]) -> np.ndarray:
    """The scene's object on a flat background of any colour (the world has only its templates)."""
    img = mw.render(scene)
    cx, cy = scene.center
    img[~mw.shape_mask(scene.shape, cx, cy, scene.radius)] = rgb
    return img


def scores(img: np.ndarray, c: mw.Concept, request_bg: str) -> dict:
    a = sc.analyze(img)
    req = {"background": request_bg, "size": None, "position": None}
    return {**sc.subject_match(img, c, a), **sc.prompt_match(img, req, c.train_background, a)}


def test_teal_is_no_world_background():
    assert mw.estimate_background(np.full((64, 64, 3), TEAL, np.uint8))[0] is None


@pytest.mark.parametrize("c", ALL_CONCEPTS, ids=lambda c: c.name)
def test_right_subject_on_a_wrong_background_is_subject_right_background_wrong(c):
    requested = c.eval_prompts()[0]["background"]
    wrong = next(b for b in mw.PLAIN_BACKGROUNDS if b not in (requested, c.train_background, *c.colours))
    for size, pos in (("large", "center"), ("small", "left")):
        s = scores(mw.render(c.scene(size, pos, wrong)), c, requested)
        assert s["subject"] == 1.0 and s["background"] == 0.0 and s["bg_copy"] == 0.0, (size, pos, s)
        # a background the world does not have: v1 reads the whole image as the object, v2 reads the subject
        off = on_colour(c.scene(size, pos, "white"), TEAL)
        s = scores(off, c, requested)
        assert s["subject"] == 1.0 and s["background"] == 0.0 and s["bg_copy"] == 0.0, (size, pos, s)
        assert mw.subject_match(off, c)["subject"] == 0.0  # the coupling v2 removes


@pytest.mark.parametrize("c", ALL_CONCEPTS, ids=lambda c: c.name)
def test_training_background_copied_scores_bg_copy_and_the_subject(c):
    requested = c.eval_prompts()[1]["background"]
    s = scores(mw.render(c.scene("large", "right", c.train_background)), c, requested)
    assert s["subject"] == 1.0 and s["background"] == 0.0 and s["bg_copy"] == 1.0
    # the requested background, drawn: no copying
    s = scores(mw.render(c.scene("large", "right", requested)), c, requested)
    assert s["subject"] == 1.0 and s["background"] == 1.0 and s["bg_copy"] == 0.0


@pytest.mark.parametrize("c", ALL_CONCEPTS, ids=lambda c: c.name)
def test_wrong_pattern_on_the_right_background_is_subject_wrong(c):
    requested = c.eval_prompts()[0]["background"]
    if c.pattern == "solid":  # a flat concept: the right shape striped with a second colour
        other = next(col for col in mw.OBJECT_COLOURS if col not in (c.colour, requested))
        wrong = mw.Scene(c.shape, c.colour, "large", "center", requested, colour2=other, pattern="striped")
    else:  # a patterned concept: its shape and colours in another pattern
        pattern = next(p for p in mw.PATTERNS[1:] if p != c.pattern)
        wrong = mw.Scene(c.shape, c.colour, "large", "center", requested, colour2=c.colour2, pattern=pattern)
    s = scores(mw.render(wrong), c, requested)
    assert s["subject"] == 0.0 and s["shape"] == 1.0 and s["background"] == 1.0, s
    # and the right pattern on another shape
    shape = next(x for x in mw.SHAPES if x != c.shape)
    s = scores(mw.render(mw.Scene(shape, c.colour, "large", "center", requested, c.colour2, c.pattern)), c, requested)
    assert s["subject"] == 0.0 and s["background"] == 1.0


@pytest.mark.parametrize("bg", mw.BACKGROUNDS)
def test_an_empty_image_scores_nothing(bg):
    img = mw.background_image(bg)
    a = sc.analyze(img)
    assert not a["object"] and a["background"] == bg
    for c in ALL_CONCEPTS:
        assert sc.subject_match(img, c)["subject"] == 0.0
    pm = sc.prompt_match(img, {"background": bg, "size": "small", "position": "left"})
    assert pm == {"background": 1.0, "size": 0.0, "position": 0.0}
    for flat in (np.full((64, 64, 3), TEAL, np.uint8), np.zeros((64, 64, 3), np.uint8)):
        assert not sc.analyze(flat)["object"]


def test_degenerate_images_are_no_subject():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert sc.analyze(noise)["background"] is None
    assert all(sc.subject_match(noise, c)["subject"] == 0.0 for c in ALL_CONCEPTS)
    # a region over half the image is the background, not an object (v1 calls it a square)
    half = mw.background_image("blue")
    half[:, 2:50] = mw.COLOURS["red"]
    assert not sc.analyze(half)["object"]
    dots = mw.background_image("green")
    dots[10, 10] = dots[40, 50] = (255, 255, 255)
    assert not sc.analyze(dots)["object"]


def test_v2_reads_every_clean_world_image_as_v1_does():
    imgs, _, scenes = mw.world_batch(11, 300)
    for img, s in zip(imgs, scenes):
        a = sc.analyze(img)
        got = {k: a.get(k) for k in ("background", "shape", "size", "position", "pattern")}
        assert got == {"background": s.background, "shape": s.shape, "size": s.size, "position": s.position,
                       "pattern": "solid"}, (s, a)  # fmt: skip
        assert a["colours"] == [s.colour]


def test_small_gaussian_noise_does_not_flip_the_scores():
    rng = np.random.default_rng(3)
    cases = []  # (image, concept, requested background, the scores the scene implies)
    for c in ALL_CONCEPTS:
        req = c.eval_prompts()[0]["background"]
        wrong = next(b for b in mw.PLAIN_BACKGROUNDS if b not in (req, c.train_background, *c.colours))
        shape = next(x for x in mw.SHAPES if x != c.shape)
        cases += [
            (mw.render(c.scene("large", "center", req)), c, req, (1.0, 1.0, 0.0)),
            (mw.render(c.scene("large", "left", wrong)), c, req, (1.0, 0.0, 0.0)),
            (mw.render(c.scene("large", "right", c.train_background)), c, req, (1.0, 0.0, 1.0)),
            (on_colour(c.scene("large", "center", "white"), TEAL), c, req, (1.0, 0.0, 0.0)),
            (mw.render(mw.Scene(shape, c.colour, "large", "center", req, c.colour2, c.pattern)), c, req, (0.0, 1.0, 0.0)),
            (mw.background_image(req), c, req, (0.0, 1.0, 0.0)),
        ]  # fmt: skip
    flipped = 0
    for img, c, req, want in cases:
        for _ in range(3):
            noisy = np.clip(img.astype(float) + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            s = scores(noisy, c, req)
            flipped += (s["subject"], s["background"], s["bg_copy"]) != want
    assert flipped <= 0.02 * 3 * len(cases), f"{flipped} of {3 * len(cases)} noisy images flipped"


class _Identity:
    """A stand-in VAE whose round trip returns the image (a perfect decoder) or its mean colour (a useless one)."""

    dtype = None

    def __init__(self, blur: bool):
        import torch

        self.torch, self.blur = torch, blur

    def encode(self, x):
        class Dist:
            def __init__(self, x):
                self.latent_dist = self
                self.x = x

            def mode(self):
                return self.x

        return Dist(x.float())

    def decode(self, z):
        class Out:
            pass

        out = Out()
        out.sample = z.mean(dim=(2, 3), keepdim=True).expand_as(z) if self.blur else z
        return out


def test_ceiling_of_a_perfect_and_a_useless_decoder():
    _Identity.dtype = __import__("torch").float32
    c = mw.RECOMBINATION_CONCEPTS[1]
    perfect = sc.concept_ceiling(_Identity(blur=False), c)
    assert perfect["ceiling"] == 1.0 and perfect["per_image"] == [1.0] * 5 and not perfect["flagged"]
    useless = sc.concept_ceiling(_Identity(blur=True), c)
    assert useless["ceiling"] == 0.0 and useless["flagged"]


def test_mean_over_concepts_leaves_flagged_concepts_out():
    got = sc.mean_over_concepts({"a": 0.2, "b": 0.6, "c": 1.0}, {"a": 1.0, "b": 0.59, "c": 0.6})
    assert got == {"mean": 0.6, "n": 2, "flagged": ["b"]}
    with pytest.raises(KeyError, match="no ceiling for concepts \\['d'\\]"):
        sc.mean_over_concepts({"d": 0.1}, {})
    with pytest.raises(ValueError, match="unknown scorer 'v3'"):
        sc.analyzer("v3")


CEILINGS = REPO / "benchmarks" / "micro" / "v2" / "ceilings.json"


@pytest.mark.skipif(not CEILINGS.is_file(), reason="ceilings not computed yet")
def test_committed_ceilings_are_what_the_v2_vae_gives():
    from diffusers import AutoencoderKL

    saved = json.loads(CEILINGS.read_text())
    assert saved["scorer"] == "v2" and saved["threshold"] == sc.CEILING_THRESHOLD
    vae = AutoencoderKL.from_pretrained(REPO / "models" / "microworld-sdxl-v2", subfolder="vae")
    for set_name, concepts in mw.CONCEPT_SETS.items():
        for c in concepts:
            row = saved["sets"][set_name][c.name]
            again = sc.concept_ceiling(vae, c, "v2")
            assert again["per_image"] == row["per_image"] and again["flagged"] == row["flagged"], c.name
