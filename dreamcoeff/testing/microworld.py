"""Micro-world: a procedural text-to-image world small enough to learn on a CPU (issue 6, part 2).

Images are 64x64 RGB: one flat-coloured shape on a plain or patterned background, with an exact
caption ("a small red triangle at the left on a blue background"). Everything is a pure function of
a seed, so the data is exact and free, and every property of an image can be *measured back* from
its pixels by the functions at the bottom of this file (no classifier to train, no judging by eye).

Pieces:

* the world: :class:`Scene` (shape, colour, size, position, background), :func:`render`,
  :func:`caption`, :func:`sample_scene` / :func:`world_batch` (seeded);
* held-out concepts in two sets (:data:`CONCEPT_SETS`), each concept with an identifier word, a class
  word (its shape), one training background, 5 instance scenes and evaluation prompts asking for
  other backgrounds, sizes and positions; the first concept of each set is its validation concept
  (learning rates are chosen on it), the rest are test concepts:

  - ``texture`` (:data:`CONCEPTS`): two-colour *patterned* objects (striped, checkered, split,
    ringed...) that never occur in the pretraining world, where every object is one flat colour -
    a subject the base model has never drawn;
  - ``recombination`` (:data:`RECOMBINATION_CONCEPTS`): one flat colour bound to one shape, both of
    which the world has and draws ("a sks square" = a purple square), the pair without a name of
    its own. Caveat: every world caption names a colour, so the micro model draws a prompt without
    one ("a square", "a sks square") with no object or a purple one: read results against the
    untrained model on the same prompts;
* exact metrics on arrays: :func:`analyze` estimates the background (nearest rendered background
  template on the border ring), the object mask (pixels far from that background), the object's
  size / position / shape (IoU against rendered shape masks fitted to the mask's bounding box), its
  two dominant palette colours and its pattern (pixel agreement with every pattern rendered at the
  fitted geometry). :func:`subject_match` and :func:`prompt_match` turn that into benchmark scores.

The vocabulary (:data:`VOCAB_WORDS`) is passed to ``build_tiny_pipeline(vocab_words=...)`` so every
world word is a single token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RES = 64
BORDER = 2  # width of the border ring used to estimate the background

# ------------------------------------------------------------------------------------------------
# Palette and vocabulary
# ------------------------------------------------------------------------------------------------

#: Flat colours used for objects and plain backgrounds (saturated, far apart in RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
#: Patterned backgrounds, drawn in colours that no object uses (greys / browns).
PATTERN_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "checkered": ((170, 170, 170), (100, 100, 100)),
    "wooden": ((150, 100, 60), (110, 70, 40)),
}
PLAIN_BACKGROUNDS = ("red", "green", "blue", "yellow", "white", "black")
BACKGROUNDS = PLAIN_BACKGROUNDS + tuple(PATTERN_BACKGROUNDS)
OBJECT_COLOURS = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 7, "large": 12}  # half-extent in pixels
POSITIONS = {"left": 18, "center": 32, "right": 46}  # centre x in pixels
JITTER = 2
#: Object patterns of held-out concepts only (never in the pretraining world).
PATTERNS = ("solid", "striped", "checkered", "split", "ringed")

#: Identifier words of the concepts (rare, meaningless to the base model).
IDENTIFIERS = ("sks", "zwx", "ohwx", "qlv", "vbk", "mtz")

VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an", "the", "on", "at", "background", "left", "center", "right", "small", "large"]
        + list(COLOURS)
        + list(PATTERN_BACKGROUNDS)
        + list(SHAPES)
        + list(IDENTIFIERS)
    )
)


# ------------------------------------------------------------------------------------------------
# Scenes, rendering, captions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # first (or only) colour
    size: str
    position: str
    background: str
    colour2: str | None = None  # second colour of a patterned object
    pattern: str = "solid"
    dx: int = 0  # jitter in pixels
    dy: int = 0

    @property
    def center(self) -> tuple[int, int]:
        return POSITIONS[self.position] + self.dx, RES // 2 + self.dy

    @property
    def radius(self) -> int:
        return SIZES[self.size]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:RES, 0:RES]
    return ys + 0.5, xs + 0.5  # pixel centres


def shape_mask(shape: str, cx: float, cy: float, r: float, rx: float | None = None) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with half-height r (and half-width rx, default r)."""
    ys, xs = _grid()
    rx = r if rx is None else rx
    u = (xs - cx) / max(rx, 1e-6)  # normalised coords in [-1, 1] inside the box
    v = (ys - cy) / max(r, 1e-6)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (v <= 1.0) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_labels(pattern: str, cx: float, cy: float, r: float, rx: float | None = None) -> np.ndarray:
    """0/1 label per pixel (0 = first colour, 1 = second) of an object pattern in its local box."""
    ys, xs = _grid()
    rx = r if rx is None else rx
    u = (xs - cx) / max(rx, 1e-6)
    v = (ys - cy) / max(r, 1e-6)
    if pattern == "solid":
        return np.zeros((RES, RES), np.int64)
    if pattern == "striped":  # 4 horizontal bands
        return np.floor((v + 1.0) * 2.0).astype(np.int64) % 2
    if pattern == "checkered":  # 2 x 2 quadrants
        return ((u >= 0).astype(np.int64) + (v >= 0).astype(np.int64)) % 2
    if pattern == "split":  # left half / right half
        return (u >= 0).astype(np.int64)
    if pattern == "ringed":  # inner core in the second colour
        return (np.maximum(np.abs(u), np.abs(v)) <= 0.5).astype(np.int64)
    raise ValueError(f"unknown pattern {pattern!r}")


def background_image(name: str) -> np.ndarray:
    """The 64x64x3 uint8 background ``name`` (plain colour or pattern)."""
    if name in COLOURS:
        return np.broadcast_to(np.array(COLOURS[name], np.uint8), (RES, RES, 3)).copy()
    a, b = PATTERN_BACKGROUNDS[name]
    ys, xs = np.mgrid[0:RES, 0:RES]
    if name == "checkered":
        lab = ((ys // 8) + (xs // 8)) % 2
    else:  # wooden: vertical planks
        lab = (xs // 6) % 2
    return np.where(lab[..., None] == 0, np.array(a, np.uint8), np.array(b, np.uint8))


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a 64x64x3 uint8 array (crisp pixels, no anti-aliasing)."""
    img = background_image(scene.background)
    cx, cy = scene.center
    mask = shape_mask(scene.shape, cx, cy, scene.radius)
    lab = pattern_labels(scene.pattern, cx, cy, scene.radius)
    c1 = np.array(COLOURS[scene.colour], np.uint8)
    c2 = np.array(COLOURS[scene.colour2 or scene.colour], np.uint8)
    obj = np.where(lab[..., None] == 0, c1, c2)
    img[mask] = obj[mask]
    return img


def caption(scene: Scene, with_size: bool = True, with_position: bool = True, subject: str | None = None) -> str:
    """Caption of a scene. ``subject`` replaces "<colour> <shape>" (e.g. "sks square" for a concept)."""
    words = ["a"]
    if with_size:
        words.append(scene.size)
    words.append(subject if subject is not None else f"{scene.colour} {scene.shape}")
    if with_position:
        words += ["at", "the", scene.position]
    words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random pretraining-world scene: one flat-coloured object, colour != background colour."""
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in OBJECT_COLOURS if c != bg]
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colours[rng.integers(len(colours))],
        size=tuple(SIZES)[rng.integers(len(SIZES))],
        position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
        background=bg,
        dx=int(rng.integers(-JITTER, JITTER + 1)),
        dy=int(rng.integers(-JITTER, JITTER + 1)),
    )


def world_batch(seed: int, n: int, drop_prob: float = 0.25) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images (n x 64 x 64 x 3 uint8), captions and scenes, a pure function of ``seed``.

    Size and position words are each dropped from the caption with probability ``drop_prob`` so the
    model also learns the shorter prompts ("a red circle on a blue background").
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    caps = [caption(s, with_size=rng.random() >= drop_prob, with_position=rng.random() >= drop_prob) for s in scenes]
    return np.stack([render(s) for s in scenes]), caps, scenes


# ------------------------------------------------------------------------------------------------
# Held-out concepts
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    name: str
    identifier: str
    shape: str  # the class word
    colour: str
    colour2: str | None  # None for a flat (one-colour) concept
    pattern: str  # "solid" for a flat concept
    train_background: str
    split: str  # "validation" or "test"

    @property
    def colours(self) -> set[str]:
        """The object's colours as the metrics should find them."""
        return {self.colour} | ({self.colour2} if self.colour2 else set())

    @property
    def token(self) -> str:  # "sks square"
        return f"{self.identifier} {self.shape}"

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"

    def scene(self, size: str, position: str, background: str, dx: int = 0, dy: int = 0) -> Scene:
        return Scene(self.shape, self.colour, size, position, background, self.colour2, self.pattern, dx, dy)

    def instance_scenes(self, n: int = 5) -> list[Scene]:
        """n training scenes on the one training background, varying size and position (fixed)."""
        layout = [
            ("large", "center", 0, 0),
            ("small", "left", 1, -1),
            ("large", "right", -1, 1),
            ("small", "center", 2, 1),
            ("large", "left", 0, -2),
        ]
        return [self.scene(s, p, self.train_background, dx, dy) for s, p, dx, dy in layout[:n]]

    def eval_prompts(self) -> list[dict[str, Any]]:
        """Evaluation prompts, each with what it asks for (keys: prompt, background, size, position)."""
        others = [
            b
            for b in ("red", "green", "blue", "yellow", "white", "black", "checkered")
            if b != self.train_background and b not in self.colours
        ][:3]
        out = []
        for bg in others:
            out.append(
                {"prompt": f"a {self.token} on a {bg} background", "background": bg, "size": None, "position": None}
            )
        out.append(
            {
                "prompt": f"a small {self.token} at the left on a {others[0]} background",
                "background": others[0],
                "size": "small",
                "position": "left",
            }
        )
        out.append(
            {
                "prompt": f"a large {self.token} at the right on a {others[1]} background",
                "background": others[1],
                "size": "large",
                "position": "right",
            }
        )
        return out


CONCEPTS: tuple[Concept, ...] = (
    Concept("val-striped-circle", "mtz", "circle", "blue", "yellow", "striped", "white", "validation"),
    Concept("striped-square", "sks", "square", "red", "white", "striped", "blue", "test"),
    Concept("checkered-circle", "zwx", "circle", "green", "black", "checkered", "yellow", "test"),
    Concept("split-triangle", "ohwx", "triangle", "orange", "purple", "split", "green", "test"),
    Concept("ringed-square", "qlv", "square", "yellow", "blue", "ringed", "black", "test"),
    Concept("checkered-diamond", "vbk", "diamond", "purple", "white", "checkered", "red", "test"),
)

#: Flat one-colour concepts: every shape at least once, every colour and training background at most
#: once, the object colour never the training background (fixed before any benchmark run of the set).
RECOMBINATION_CONCEPTS: tuple[Concept, ...] = (
    Concept("val-flat-orange-circle", "mtz", "circle", "orange", None, "solid", "blue", "validation"),
    Concept("flat-purple-square", "sks", "square", "purple", None, "solid", "yellow", "test"),
    Concept("flat-red-triangle", "zwx", "triangle", "red", None, "solid", "white", "test"),
    Concept("flat-green-diamond", "ohwx", "diamond", "green", None, "solid", "black", "test"),
    Concept("flat-yellow-circle", "qlv", "circle", "yellow", None, "solid", "red", "test"),
    Concept("flat-white-square", "vbk", "square", "white", None, "solid", "green", "test"),
)

CONCEPT_SETS: dict[str, tuple[Concept, ...]] = {"texture": CONCEPTS, "recombination": RECOMBINATION_CONCEPTS}


def concept(name: str) -> Concept:
    """The concept called ``name``, from any set."""
    known = [c for concepts in CONCEPT_SETS.values() for c in concepts]
    for c in known:
        if c.name == name:
            return c
    raise KeyError(f"no micro-world concept {name!r}; known: {[c.name for c in known]}")


# ------------------------------------------------------------------------------------------------
# Exact metrics on 64x64 RGB arrays
# ------------------------------------------------------------------------------------------------

_BG_TEMPLATES = {name: background_image(name).astype(np.float32) for name in BACKGROUNDS}
_BORDER_MASK = np.zeros((RES, RES), bool)
_BORDER_MASK[:BORDER] = _BORDER_MASK[-BORDER:] = True
_BORDER_MASK[:, :BORDER] = _BORDER_MASK[:, -BORDER:] = True
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)

#: RGB distance (0-441) above which a pixel counts as "not background".
MASK_THRESHOLD = 80.0
#: Mean border distance to the best background template above which the background is "unknown".
BG_THRESHOLD = 60.0
#: Fewer object pixels than this means "no object".
MIN_OBJECT_PIXELS = 20
#: Object extent (max of bbox height/width in px) separating small (15) from large (25).
SIZE_SPLIT = 20
#: Bbox-centre x thresholds separating left / center / right.
POS_SPLITS = (25, 39)


def _as_float(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:  # float in [0, 1], as pipelines return with output_type="np"
        img = np.clip(np.round(img * 255.0), 0, 255)
    return img.astype(np.float32)[..., :3]


def estimate_background(img: np.ndarray) -> tuple[str | None, float]:
    """Nearest background template on the border ring; (name or None, mean RGB distance)."""
    return _estimate_background(_as_float(img))


def _estimate_background(x: np.ndarray) -> tuple[str | None, float]:
    best, best_d = None, float("inf")
    for name, tpl in _BG_TEMPLATES.items():
        d = float(np.linalg.norm(x[_BORDER_MASK] - tpl[_BORDER_MASK], axis=-1).mean())
        if d < best_d:
            best, best_d = name, d
    return (best if best_d <= BG_THRESHOLD else None), best_d


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (plain BFS; images are 64x64)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose 4 neighbours are all in ``mask`` (one step of binary erosion)."""
    m = np.pad(mask, 1)
    return mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def object_geometry(mask: np.ndarray) -> tuple[dict[str, Any], tuple[float, float, float, float]]:
    """What an object mask says by its outline alone (both scorers share it): ``object``, ``bbox``
    (y0, x0, y1, x1), ``size``, ``position``, and the ``shape`` of best IoU among the shapes fitted to the
    bounding box with that ``shape_iou``; also (cx, cy, ry, rx), the box's centre and half-sizes, on
    which the pattern templates are laid."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    ry, rx = (y1 - y0) / 2.0, (x1 - x0) / 2.0
    extent = max(y1 - y0, x1 - x0)
    out: dict[str, Any] = {
        "object": True,
        "bbox": (int(y0), int(x0), int(y1), int(x1)),
        "size": "small" if extent < SIZE_SPLIT else "large",
        "position": "left" if cx < POS_SPLITS[0] else ("right" if cx > POS_SPLITS[1] else "center"),
    }
    ious = {
        s: float((m & mask).sum() / max((m | mask).sum(), 1)) for s in SHAPES for m in [shape_mask(s, cx, cy, ry, rx)]
    }
    shape = max(ious, key=ious.get)
    out.update(shape=shape, shape_iou=ious[shape])
    return out, (cx, cy, ry, rx)


def analyze(img: np.ndarray) -> dict[str, Any]:
    """Measure an image: background, object mask, size, position, shape, colours, pattern.

    Returns a dict with ``background`` (name or None), ``object`` (bool), and when an object is found
    ``size``, ``position``, ``shape``, ``shape_iou``, ``colours`` (dominant palette colours, most
    frequent first, each covering >= 15% of the object), ``colour_fractions``, ``pattern`` and
    ``pattern_agreement``, ``bbox`` (y0, x0, y1, x1) and ``n_pixels``.
    """
    x = _as_float(img)
    bg, bg_dist = _estimate_background(x)
    out: dict[str, Any] = {"background": bg, "background_distance": bg_dist, "object": False}
    # With an unknown background, compare against the best template anyway (its colour may be off).
    name = bg or min(
        _BG_TEMPLATES, key=lambda n: np.linalg.norm(x[_BORDER_MASK] - _BG_TEMPLATES[n][_BORDER_MASK], axis=-1).mean()
    )
    diff = np.linalg.norm(x - _BG_TEMPLATES[name], axis=-1)
    mask = _largest_component(diff > MASK_THRESHOLD)
    n = int(mask.sum())
    out["n_pixels"] = n
    if n < MIN_OBJECT_PIXELS:
        return out
    geometry, (cx, cy, ry, rx) = object_geometry(mask)
    out.update(geometry)
    # colours: nearest palette colour per pixel of the mask's interior. Edge pixels of a decoded
    # (VAE-blurred) image blend object and background colours into a spurious third colour, so they
    # are left out whenever the interior is big enough; crisp world images are unaffected.
    core = _erode(mask)
    if core.sum() < MIN_OBJECT_PIXELS // 2:
        core = mask
    pix = x[core]
    lab = np.argmin(np.linalg.norm(pix[:, None, :] - _PALETTE[None], axis=-1), axis=1)
    counts = np.bincount(lab, minlength=len(_PALETTE_NAMES)) / len(pix)
    order = [i for i in np.argsort(-counts) if counts[i] >= 0.15][:2]
    out["colours"] = [_PALETTE_NAMES[i] for i in order]
    out["colour_fractions"] = [float(counts[i]) for i in order]
    # pattern: agreement of per-pixel colour labels with each rendered pattern (either colour order)
    if len(order) < 2:
        out.update(pattern="solid", pattern_agreement=float(counts[order[0]]) if order else 0.0)
        return out
    is_first = (lab == order[0]).astype(np.int64)
    is_second = lab == order[1]
    two = is_first.astype(bool) | is_second
    scores = {}
    for p in PATTERNS[1:]:
        pl = pattern_labels(p, cx, cy, ry, rx)[core]
        agree = max(((pl == 0) == is_first.astype(bool))[two].mean(), ((pl == 1) == is_first.astype(bool))[two].mean())
        scores[p] = float(agree)
    pattern = max(scores, key=scores.get)
    out.update(pattern=pattern, pattern_agreement=scores[pattern], pattern_scores=scores)
    return out


def matches_scene(img: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of an image against the scene it should show."""
    a = analyze(img)
    want_colours = {scene.colour} | ({scene.colour2} if scene.colour2 else set())
    return {
        "object": bool(a["object"]),
        "background": a["background"] == scene.background,
        "shape": a.get("shape") == scene.shape,
        "size": a.get("size") == scene.size,
        "position": a.get("position") == scene.position,
        "colour": set(a.get("colours") or []) == want_colours,
        "pattern": a.get("pattern") == scene.pattern,
    }


def subject_match(img: np.ndarray, c: Concept, analysis: dict[str, Any] | None = None) -> dict[str, float]:
    """Subject fidelity of one image for concept ``c``.

    ``shape``, ``colours`` (exactly the concept's colours as the dominant ones: two for a patterned
    concept, one for a flat one), ``pattern`` (best-matching pattern is the concept's; "solid" when
    only one colour covers 15% of the object) are 0/1; ``subject`` is their conjunction (the object *is*
    the concept). A missing object scores 0 everywhere.
    """
    a = analysis if analysis is not None else analyze(img)
    if not a["object"]:
        return {"shape": 0.0, "colours": 0.0, "pattern": 0.0, "subject": 0.0}
    shape = float(a["shape"] == c.shape)
    colours = float(set(a["colours"]) == c.colours)
    pattern = float(a["pattern"] == c.pattern and colours == 1.0)
    return {"shape": shape, "colours": colours, "pattern": pattern, "subject": shape * colours * pattern}


def prompt_match(
    img: np.ndarray,
    request: dict[str, Any],
    train_background: str | None = None,
    analysis: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """Prompt fidelity: requested background / size / position (None where not requested), and
    ``bg_copy`` = 1 when the concept's training background appears although another was requested."""
    a = analysis if analysis is not None else analyze(img)
    out: dict[str, float | None] = {"background": float(a["background"] == request["background"])}
    for k in ("size", "position"):
        out[k] = None if request.get(k) is None else float(a["object"] and a.get(k) == request[k])
    if train_background is not None and request["background"] != train_background:
        out["bg_copy"] = float(a["background"] == train_background)
    return out


# ------------------------------------------------------------------------------------------------
# The micro-world base model
# ------------------------------------------------------------------------------------------------


#: Latent side of a 64 px world image: the micro VAE downsamples by 4 (SDXL's by 8).
MICRO_LATENT_SIZE = RES // 4


#: The micro-world base models by version. v1: 4 and 8 heads (1,696 coefficients); v2: SDXL's
#: attention geometry, 10 heads at the middle level and 20 at the deepest (head size 8; 10,600
#: coefficients), the same levels, depths (1 / 2 transformer layers) and VAE as v1.
MICRO_MODEL_VERSIONS = ("v1", "v2")


def micro_unet_config(version: str = "v1") -> dict[str, Any]:
    """The micro-world UNet config of `version` (see :data:`MICRO_MODEL_VERSIONS`).

    v1 is ``tiny_unet_config()`` on 16x16 latents with the deepest level narrowed from 128 to 96
    channels: SDXL's layout (heads 4 / 8 / 8, transformer depth 1 / 2 in the attention levels),
    attention over 8x8 = 64 and 4x4 = 16 image tokens; 5.2 M parameters, so the saved pipeline stays
    under 25 MB in float32. v2 widens the attention levels to 80 and 160 channels with 10 and 20
    heads of 8 (SDXL: 10 and 20 heads of 64): 12.4 M parameters, about 53 MB saved.
    """
    from .tiny import tiny_unet_config

    if version not in MICRO_MODEL_VERSIONS:
        raise ValueError(f"unknown micro-world model version {version!r}: use one of {MICRO_MODEL_VERSIONS}")
    cfg = tiny_unet_config()
    cfg["sample_size"] = MICRO_LATENT_SIZE
    if version == "v1":
        cfg["block_out_channels"] = (32, 64, 96)
    else:
        # diffusers reads attention_head_dim as the number of heads per block (the first level has none)
        cfg["block_out_channels"] = (32, 80, 160)
        cfg["attention_head_dim"] = (2, 10, 20)
    return cfg


def micro_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` config of the micro world: 3 levels (downsampling by 4 to 16x16x4 latents).

    Measured while designing it (pretrain.py's VAE phase, 600 steps): SDXL's factor 8 leaves an
    8x8x4 latent for a 64 px image, too little to carry a small two-colour patterned object, and
    GroupNorm with 2 channels per group normalises the flat background colours away; one group over
    all channels keeps the colour ratios.
    """
    from .tiny import tiny_vae_config

    cfg = tiny_vae_config()
    cfg.update(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        norm_num_groups=1,
        sample_size=RES,
    )
    return cfg


def build_micro_pipeline(seed: int = 0, version: str = "v1"):
    """The untrained micro-world pipeline: the tiny SDXL pipeline with a tokenizer that knows
    :data:`VOCAB_WORDS`, the UNet of :func:`micro_unet_config` (of `version`) and the VAE of :func:`micro_vae_config`
    (seeded like ``build_tiny_pipeline``). The VAE's posterior log-variance starts at -12 (std 0.0025)
    instead of ~0, so its latents are nearly deterministic from the first step: a random VAE's unit
    posterior noise would drown what the encoder carries until training shrinks it."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from .tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline(seed=seed, vocab_words=VOCAB_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**micro_unet_config(version)).float().eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**micro_vae_config()).float().eval()
    with torch.no_grad():
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = -12.0
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=tiny.text_encoder,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2,
        unet=unet,
        scheduler=tiny.scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
