"""The convex-hull argument of Coeff-Tuning (paper Figure 3) and the toy example that shows it.

- With A = I (or any nonnegative A whose rows sum to 1) every output row of head h is a convex
  combination of head h's value rows, so it lies in their convex hull, whatever q and k are.
- A negative coefficient takes the output out of the hull.
- examples/toy_convex_hull.py: tuning alpha reaches a target outside the hull, tuning W_q/W_k
  cannot get closer than the target's distance to the hull.

The hull is computed here with its own monotone chain (independent of the example's), and
membership is checked with support functions: o is in conv(V) iff u.o <= max_l u.v_l for every
outward edge normal u of the hull (plus the segment's own directions when the hull is degenerate).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dreamcoeff.attention import coefficient_matrix, mixed_attention

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("toy_convex_hull", ROOT / "examples" / "toy_convex_hull.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


toy = _load_example()


# ------------------------------------------------------------------------------------------------
# Hull helpers (test-local)


def hull_2d(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull vertices of 2-D points (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    chain = []
    for seq in (pts, pts[::-1]):
        half = []
        for p in seq:
            while len(half) >= 2 and cross(half[-2], half[-1], p) <= 0:
                half.pop()
            half.append(p)
        chain += half[:-1]
    return np.array(chain)


def hull_directions(hull: np.ndarray) -> np.ndarray:
    """Unit directions whose support constraints carve out the hull exactly.

    Outward edge normals, plus +-each edge direction, which are redundant for a proper polygon but
    close off a degenerate (segment) hull at its end points.
    """
    if len(hull) < 2:
        return np.zeros((0, 2))
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)  # outward for a counter-clockwise hull
    dirs = np.concatenate([normals, edges, -edges])
    return dirs / np.hypot(dirs[:, 0], dirs[:, 1])[:, None]


def excess_outside_hull(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each point, max over hull directions u of u.p - max_l u.v_l (<= 0 inside the hull)."""
    hull = hull_2d(values)
    if len(hull) == 1:
        return np.linalg.norm(points - hull[0], axis=1)
    dirs = hull_directions(hull)
    support = (values @ dirs.T).max(axis=0)
    return (points @ dirs.T - support).max(axis=1)


def test_hull_helpers_on_a_square():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    assert len(hull_2d(square)) == 4
    inside = np.array([[0.5, 0.5], [0.0, 0.0], [0.99, 0.01]])
    outside = np.array([[1.1, 0.5], [-0.01, 0.5], [0.5, 1.2]])
    assert (excess_outside_hull(inside, square) <= 1e-12).all()
    assert (excess_outside_hull(outside, square) > 0.009).all()
    # degenerate hull: a segment; a point on its line but past an end is outside
    seg = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert excess_outside_hull(np.array([[0.5, 0.5]]), seg)[0] <= 1e-12
    assert excess_outside_hull(np.array([[1.5, 1.5]]), seg)[0] > 0.1


# ------------------------------------------------------------------------------------------------
# Property: A = I (or any row-stochastic A >= 0) keeps every output in its head's value hull


@st.composite
def attention_inputs(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 4))
    n = draw(st.integers(1, 5))
    l = draw(st.integers(1, 6))
    d = draw(st.integers(1, 4))
    elems = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)
    q = draw(hnp.arrays(np.float64, (b, h, n, d), elements=elems))
    k = draw(hnp.arrays(np.float64, (b, h, l, d), elements=elems))
    # values on a 1/8 grid: exact in binary, and duplicates / collinear (degenerate) hulls are common
    v = draw(hnp.arrays(np.int64, (b, h, l, 2), elements=st.integers(-24, 24))) / 8.0
    # sharp maps too: scores up to ~ 3*3*4*8 = 288 push the softmax to one-hot
    scale = draw(st.sampled_from([None, 0.1, 1.0, 8.0]))
    return torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), scale


def _assert_in_hulls(out: torch.Tensor, v: torch.Tensor):
    out, v = out.numpy(), v.numpy()
    tol = 1e-9 * (1.0 + np.abs(v).max())
    for b in range(out.shape[0]):
        for h in range(out.shape[1]):
            excess = excess_outside_hull(out[b, h], v[b, h])
            assert excess.max() <= tol, f"batch {b} head {h}: output {excess.max():.3g} outside the value hull"


@settings(max_examples=150, deadline=None)
@given(attention_inputs())
def test_identity_coefficients_keep_outputs_in_value_hull(inputs):
    q, k, v, scale = inputs
    coeff = coefficient_matrix(torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64))  # A = I
    _assert_in_hulls(mixed_attention(q, k, v, coeff, scale=scale), v)


@settings(max_examples=100, deadline=None)
@given(attention_inputs(), st.data())
def test_row_stochastic_coefficients_keep_outputs_in_value_hull(inputs, data):
    # A >= 0 with rows summing to 1: the mixed maps A P are still stochastic, so still convex.
    q, k, v, scale = inputs
    h = q.shape[1]
    raw = data.draw(hnp.arrays(np.float64, (h, h), elements=st.floats(0.0, 1.0, width=64)))
    raw[np.arange(h), np.arange(h)] += 1e-3  # no all-zero row
    coeff = torch.from_numpy(raw / raw.sum(axis=1, keepdims=True))
    _assert_in_hulls(mixed_attention(q, k, v, coeff, scale=scale), v)


def test_negative_coefficient_leaves_the_hull():
    # Two heads on the diamond's vertices; head 0's map attends to (1, 0), head 1's to (-1, 0).
    diamond = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    v = diamond.expand(1, 2, 4, 2)
    k = (diamond * 20.0).expand(1, 2, 4, 2)
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 2)
    identity = mixed_attention(q, k, v, coefficient_matrix(torch.zeros(2, 2, dtype=torch.float64)), scale=1.0)
    assert torch.allclose(identity[0, 0, 0], torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-6)
    _assert_in_hulls(identity, v)

    # A = I + alpha with a negative entry: O^0 = 1.5 * (1, 0) - 0.5 * (-1, 0) = (2, 0)
    alpha = torch.tensor([[0.5, -0.5], [0.0, 0.0]], dtype=torch.float64)
    mixed = mixed_attention(q, k, v, coefficient_matrix(alpha), scale=1.0)
    assert torch.allclose(mixed[0, 0, 0], torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-6)
    excess = excess_outside_hull(mixed[0, 0].numpy(), v[0, 0].numpy())
    assert excess.max() > 0.5  # (2, 0) is 1/sqrt(2) from the diamond's nearest edge


# ------------------------------------------------------------------------------------------------
# The toy example: alpha reaches the target outside the hull, W_q/W_k cannot

STEPS = 300  # the example's default is 400; 300 is plenty for alpha and keeps the test quick


@pytest.fixture(scope="module")
def toy_result():
    return toy.run_toy(seed=0, steps=STEPS)


def test_target_lies_outside_the_value_hull(toy_result):
    values = toy_result["values"][0].numpy()
    target = toy_result["target"].numpy()
    excess = excess_outside_hull(target, values)
    # the square's corners are 1/sqrt(2) from the diamond's edges
    np.testing.assert_allclose(excess, 1 / math.sqrt(2), atol=1e-12)
    # the bound used below: mean squared distance to the hull, over the 2 coordinates
    assert toy_result["qk_only_lower_bound"] == pytest.approx(np.mean(excess**2) / 2, abs=1e-12)
    assert toy_result["qk_only_lower_bound"] == pytest.approx(0.25, abs=1e-12)


def test_alpha_reaches_target_where_qk_cannot(toy_result):
    runs = toy_result["runs"]
    bound = toy_result["qk_only_lower_bound"]
    values = toy_result["values"][0].numpy()
    # W_q/W_k only: every output stays in the hull, so the MSE cannot go below the hull bound
    assert runs["qk_only"]["mse"] >= bound - 1e-12
    assert excess_outside_hull(runs["qk_only"]["output"].reshape(-1, 2).numpy(), values).max() <= 1e-9
    # ...while it did train (not stuck at the start)
    assert runs["qk_only"]["mse"] < toy_result["initial_mse"]
    # alpha only: reaches the square, i.e. leaves the hull
    assert runs["alpha_only"]["mse"] < 1e-6
    assert excess_outside_hull(runs["alpha_only"]["output"].reshape(-1, 2).numpy(), values).max() > 0.7
    # both: at least as free as alpha only
    assert runs["qk_and_alpha"]["mse"] < 1e-4
    # W_v was frozen in every run and W_q/W_k in the alpha-only run
    init = toy.init_weights(toy_result["config"])
    for mode in toy.RUNS:
        assert torch.equal(runs[mode]["weights"]["wv"], init["wv"])
    assert torch.equal(runs["alpha_only"]["weights"]["wq"], init["wq"])
    assert torch.equal(runs["alpha_only"]["weights"]["wk"], init["wk"])
    assert torch.equal(runs["qk_only"]["weights"]["alpha"], init["alpha"])


def test_alpha_reaches_target_for_another_seed():
    result = toy.run_toy(seed=3, steps=STEPS)
    assert result["runs"]["alpha_only"]["mse"] < 1e-6
    assert result["runs"]["qk_only"]["mse"] >= result["qk_only_lower_bound"] - 1e-12


def test_cli_writes_figure_and_json_deterministically(tmp_path):
    args = ["--steps", "20", "--seed", "1"]
    first = toy.main(["--out", str(tmp_path / "a"), *args])
    second = toy.main(["--out", str(tmp_path / "b"), *args])
    assert first == second
    record = json.loads((tmp_path / "a" / "toy_convex_hull.json").read_text())
    for key in ("qk_only", "alpha_only", "qk_and_alpha"):
        assert isinstance(record[key], float) and record[key] >= 0
    assert record["steps"] == 20 and record["seed"] == 1
    from PIL import Image

    with Image.open(tmp_path / "a" / "toy_convex_hull.png") as img:
        assert img.size[0] > 600 and img.size[1] > 400
