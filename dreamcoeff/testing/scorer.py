"""Scorer v2 for the micro world (issue 35): the subject on its object region alone, the background
apart, and each concept's ceiling through the VAE.

The v1 scorer (:func:`dreamcoeff.testing.microworld.analyze`) segments the object against the nearest
*world* background template, even when none fits. An image whose background is off the world's
palette (a blend, a tint, a colour the prompt did not ask for and the world does not have) is then
one big "object": a right subject on a wrong background scores as if nothing were drawn, so subject
fidelity is coupled to background fidelity. v2 changes what the *subject* is measured on and nothing
about how the background is named:

* the background is named exactly as in v1 (nearest template on the border ring, ``None`` past
  :data:`~dreamcoeff.testing.microworld.BG_THRESHOLD`), so ``background`` and ``bg_copy`` keep their
  meaning;
* the object is segmented against the image's *own* border colour (median of the ring) whenever the
  border is one flat colour, the named template only for a patterned background; a border that is
  neither (noise) falls back to v1's nearest template;
* a region covering more than half of the image is the background, not an object;
* colours are read on the object's interior two pixels in (VAE edges blend the object into the
  background, e.g. red on white decodes an orange fringe), and only from pixels near a palette
  colour: a blend far from every palette colour names none.

Shape, size, position and pattern are measured as in v1, on the v2 mask. :func:`analyze` returns the
same keys as v1's, so :func:`microworld.subject_match` and :func:`microworld.prompt_match` accept its
output as their ``analysis``. Every result json written with this scorer records ``"scorer": "v2"``.

The ceiling (:func:`concept_ceiling`): a concept's instance images encoded and decoded by the model's
VAE and scored; a concept below :data:`CEILING_THRESHOLD` is flagged and left out of means over
concepts (:func:`mean_over_concepts`). The threshold was written in benchmarks/micro/README.md before
any ceiling was computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import microworld as mw

SCORER_VERSIONS = ("v1", "v2")
#: A concept whose instance images through the VAE score a subject fidelity below this (3 of 5) is flagged.
CEILING_THRESHOLD = 0.6
#: Border pixels farther than this (mean RGB distance) from their median: the border is not one flat colour.
BORDER_SPREAD = 30.0
#: Pixels farther than this from every palette colour are blends: they name no colour.
PALETTE_DISTANCE = 90.0
#: An object region above this fraction of the image is the background itself.
MAX_OBJECT_FRACTION = 0.5


def _reference(x: np.ndarray) -> tuple[np.ndarray, str]:
    """What the object is segmented against: (a 64x64x3 background image, how it was found)."""
    name, _ = mw._estimate_background(x)
    if name in mw.PATTERN_BACKGROUNDS:
        return mw._BG_TEMPLATES[name], "template"
    ring = x[mw._BORDER_MASK]
    median = np.median(ring, axis=0)
    if float(np.linalg.norm(ring - median, axis=-1).mean()) <= BORDER_SPREAD:
        # one flat colour, whether or not the world has it: the object is what differs from it
        return np.broadcast_to(median, x.shape).astype(np.float32), "border"
    if name is not None:
        return mw._BG_TEMPLATES[name], "template"
    # neither flat nor a world background (noise): v1's nearest template, which finds no clean object
    best = min(
        mw._BG_TEMPLATES,
        key=lambda n: np.linalg.norm(ring - mw._BG_TEMPLATES[n][mw._BORDER_MASK], axis=-1).mean(),
    )
    return mw._BG_TEMPLATES[best], "nearest template"


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask's interior two pixels in, or one, or the mask itself, whichever keeps enough pixels."""
    one = mw._erode(mask)
    two = mw._erode(one)
    for core in (two, one):
        if core.sum() >= mw.MIN_OBJECT_PIXELS // 2:
            return core
    return mask


def analyze(img: np.ndarray) -> dict[str, Any]:
    """Scorer v2's measurement of an image; the keys of :func:`microworld.analyze` plus ``reference``
    (what the object was segmented against: "border", "template" or "nearest template")."""
    x = mw._as_float(img)
    bg, bg_dist = mw._estimate_background(x)
    ref, how = _reference(x)
    out: dict[str, Any] = {"background": bg, "background_distance": bg_dist, "object": False, "reference": how}
    mask = mw._largest_component(np.linalg.norm(x - ref, axis=-1) > mw.MASK_THRESHOLD)
    n = int(mask.sum())
    out["n_pixels"] = n
    if n < mw.MIN_OBJECT_PIXELS or n > MAX_OBJECT_FRACTION * mw.RES * mw.RES:
        return out
    geometry, (cx, cy, ry, rx) = mw.object_geometry(mask)
    out.update(geometry)
    core = _core(mask)
    dist = np.linalg.norm(x[core][:, None, :] - mw._PALETTE[None], axis=-1)
    lab_all = np.argmin(dist, axis=1)
    near = dist.min(axis=1) <= PALETTE_DISTANCE
    if near.sum() < mw.MIN_OBJECT_PIXELS // 2:  # nothing near the palette: no colour can be named
        out.update(colours=[], colour_fractions=[], pattern="solid", pattern_agreement=0.0)
        return out
    lab = lab_all[near]
    counts = np.bincount(lab, minlength=len(mw._PALETTE_NAMES)) / len(lab)
    order = [i for i in np.argsort(-counts) if counts[i] >= 0.15][:2]
    out["colours"] = [mw._PALETTE_NAMES[i] for i in order]
    out["colour_fractions"] = [float(counts[i]) for i in order]
    if len(order) < 2:
        out.update(pattern="solid", pattern_agreement=float(counts[order[0]]) if order else 0.0)
        return out
    is_first = lab == order[0]
    two = is_first | (lab == order[1])
    scores = {}
    for p in mw.PATTERNS[1:]:
        pl = mw.pattern_labels(p, cx, cy, ry, rx)[core][near]
        scores[p] = float(max(((pl == 0) == is_first)[two].mean(), ((pl == 1) == is_first)[two].mean()))
    pattern = max(scores, key=scores.get)
    out.update(pattern=pattern, pattern_agreement=scores[pattern], pattern_scores=scores)
    return out


def analyzer(version: str) -> Callable[[np.ndarray], dict[str, Any]]:
    """The ``analyze`` function of scorer ``version`` ("v1": microworld's, "v2": this module's)."""
    if version == "v1":
        return mw.analyze
    if version == "v2":
        return analyze
    raise ValueError(f"unknown scorer {version!r}: choose one of {SCORER_VERSIONS}")


def subject_match(img: np.ndarray, c: mw.Concept, analysis: dict[str, Any] | None = None) -> dict[str, float]:
    """v2 subject fidelity of one image (shape, colours, pattern, subject), read on its object region."""
    return mw.subject_match(img, c, analysis if analysis is not None else analyze(img))


def prompt_match(
    img: np.ndarray,
    request: dict[str, Any],
    train_background: str | None = None,
    analysis: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """v2 prompt fidelity (background, size, position, bg_copy): the background named as in v1, size and
    position of the v2 object region."""
    return mw.prompt_match(img, request, train_background, analysis if analysis is not None else analyze(img))


def vae_round_trip(vae, images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Encode (posterior mode) and decode uint8 world images with a diffusers ``AutoencoderKL``."""
    import torch

    x = torch.from_numpy(np.stack(list(images))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
    return list(((rec + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8))


def concept_ceiling(vae, c: mw.Concept, version: str = "v2") -> dict[str, Any]:
    """A concept's ceiling: its instance images through ``vae`` (a round trip), scored for the subject
    by scorer ``version``; ``flagged`` when the subject fidelity is below :data:`CEILING_THRESHOLD`."""
    decoded = vae_round_trip(vae, [mw.render(s) for s in c.instance_scenes()])
    analyze_fn = analyzer(version)
    per = [mw.subject_match(im, c, analyze_fn(im)) for im in decoded]
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    out["ceiling"] = out.pop("subject")
    out["per_image"] = [p["subject"] for p in per]
    out["flagged"] = out["ceiling"] < CEILING_THRESHOLD
    return out


def mean_over_concepts(values: dict[str, float], ceilings: dict[str, float]) -> dict[str, Any]:
    """The mean of per-concept ``values`` over the concepts whose ceiling reaches :data:`CEILING_THRESHOLD`,
    with the flagged ones listed (reported, not averaged in). A concept without a ceiling is an error:
    every score is reported next to its ceiling."""
    missing = sorted(set(values) - set(ceilings))
    if missing:
        raise KeyError(f"no ceiling for concepts {missing}: compute them (benchmarks/micro/ceilings.py) first")
    kept = {k: v for k, v in values.items() if ceilings[k] >= CEILING_THRESHOLD}
    return {
        "mean": float(np.mean(list(kept.values()))) if kept else float("nan"),
        "n": len(kept),
        "flagged": sorted(set(values) - set(kept)),
    }
