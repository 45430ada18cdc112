"""Property-based tests (hypothesis, issue 34 item 2): the mixed-attention math and the file readers.

Mixed attention: random heads (1..20), batch, query and key lengths, head sizes, chunk sizes, masks
(none, boolean keep-masks, additive per row / per key / 2-D broadcast, -inf entries), mixing matrices
(identity, rows summing to zero, the zero matrix, random with negative entries, large entries), scales
and dtypes; every CPU implementation against the float64 einsum reference of tests/attention_cases.py
(no code shared with dreamcoeff), and in float64 every gradient too. Tolerances, stated once:

element by element, relative to the size of the element's terms T = sum_i |A[h, i]| P^i |V^h| (a
mixing matrix whose rows sum to 0 cancels the output itself to ~0, so the output cannot be the scale):

- float64: 1e-10 T (rounding only); gradients 1e-9 of their largest entry;
- float32: 2e-5 T (float32 scores, softmax and mix over at most 24 keys);
- bfloat16: 2^-7 |out| + 1e-5 T, against the reference computed from the bf16-rounded inputs: the
  library computes in float32 and rounds the output once (2^-9 relative), so the bound leaves a
  factor 4 over that rounding, plus the float32 compute. SDPA (the identity fast path, "auto" at
  A = I) is PyTorch's own kernel and computes in bf16: 2^-7 |out| + 2^-6 T there.

Every row of every mask keeps at least one key: a row with no key is 0/0 in the formula (NaN in the
reference and in every implementation alike), not a property of the library.

File readers: random bytes, every truncation of a valid file (each length class: empty, inside the
8-byte length, inside the header, inside the data, one byte short) and headers with bad JSON, bad
offsets and huge lengths, for the alpha reader (`read_coeff_file`), the embeddings reader
(`read_embeddings_file`), the checkpoint check (`checkpoint_problem`, which answers in words and never
raises) and the LoRA reader (`check_lora_file`). Each must load the file or raise its own error naming
the file, within seconds, with peak memory a few times the file's size. tests/test_fuzz_files.py
mutates the same formats through the whole loaders (pipeline left unchanged); this file drives the
readers alone with inputs built from nothing and with exhaustive truncation, so it is cheap.

Every property runs derandomized with no example database: the same examples on every run.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamcoeff import attention as dc
from dreamcoeff.attention import cpu_kernel
from tests.attention_cases import ref_grads, ref_mixed
from tests.helpers import hang_alarm, peak_rss_growth

PROPERTY = settings(
    max_examples=60,
    deadline=None,  # a busy 2-core machine; hangs are caught by hang_alarm instead
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CPU_IMPLS = ("chunked", "materialized", "cpu_fused")


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    """The fused CPU kernel must build here: else "cpu_fused" would silently be the chunked path."""
    reason = cpu_kernel.unavailable_reason("cpu")
    assert reason is None, reason


# ------------------------------------------------------------------------------------------------
# Mixed attention


@st.composite
def attention_case(draw, dtype=None):
    """A random mixed-attention problem: shapes, mask, mixing matrix, scale, chunk, dtype."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 20))
    n = draw(st.integers(1, 24))
    l = draw(st.integers(1, 24))  # noqa: E741
    d = draw(st.sampled_from([1, 2, 4, 8, 16]))
    dv = draw(st.sampled_from([d, d, 3, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, l, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, l, dv, generator=g, dtype=torch.float64)

    alpha = draw(st.sampled_from(["identity", "random", "zero_row_sums", "zero", "large"]))
    eye = torch.eye(h, dtype=torch.float64)
    a = {
        "identity": lambda: eye,
        "random": lambda: eye + 0.5 * torch.randn(h, h, generator=g, dtype=torch.float64),
        "zero": lambda: torch.zeros(h, h, dtype=torch.float64),
        "large": lambda: 20 * torch.randn(h, h, generator=g, dtype=torch.float64),
    }.get(alpha, lambda: None)()
    if alpha == "zero_row_sums":  # mixed maps whose rows sum to 0: outside the simplex entirely
        a = torch.randn(h, h, generator=g, dtype=torch.float64)
        a = a - a.mean(dim=1, keepdim=True)

    kind = draw(st.sampled_from([None, "bool", "additive_rows", "additive_keys", "broadcast_2d", "neg_inf"]))
    keep_one = torch.randint(0, l, (b, 1, n, 1), generator=g)  # each row keeps one key at least
    if kind is None:
        mask = None
    elif kind == "bool":
        mask = torch.rand(b, 1, n, l, generator=g) > 0.5
        mask.scatter_(-1, keep_one, True)
    elif kind == "additive_rows":  # per batch, head, row and key
        mask = 3 * torch.randn(b, h, n, l, generator=g, dtype=torch.float64)
    elif kind == "additive_keys":  # key padding as diffusers builds it
        mask = torch.zeros(b, 1, 1, l, dtype=torch.float64)
        mask[..., draw(st.integers(1, l)) :] = -10000.0
    elif kind == "broadcast_2d":  # (N, L): brought to 4-D by the library
        mask = torch.randn(n, l, generator=g, dtype=torch.float64)
    else:  # -inf entries in an additive mask
        mask = torch.where(torch.rand(b, 1, n, l, generator=g) > 0.5, 0.0, float("-inf")).double()
        mask.scatter_(-1, keep_one, 0.0)
    scale = draw(st.sampled_from([None, 0.05, 0.5, 1.7]))
    chunk = draw(st.one_of(st.none(), st.integers(1, n + 2)))
    if isinstance(dtype, st.SearchStrategy):
        dtype = draw(dtype)
    dtype = dtype or draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    # A is float32 or float64 whatever the activations (the docstring of mixed_attention allows both):
    # the library brings it to the compute dtype
    a_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return {
        "q": q.to(dtype),
        "k": k.to(dtype),
        "v": v.to(dtype),
        "a": a.to(a_dtype),
        "mask": mask,
        "scale": scale,
        "chunk": chunk,
        "alpha": alpha,
        "kind": kind,
    }


def _scale(case) -> float:
    return case["q"].shape[-1] ** -0.5 if case["scale"] is None else case["scale"]


def _reference(case) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 output, and the size of its terms, sum_i |A[h, i]| P^i |V^h| (float64): the scale
    rounding errors are relative to (a mixing matrix whose rows sum to 0 cancels the terms to ~0)."""
    args = (case["q"], case["k"], case["v"], case["a"])
    terms = ref_mixed(case["q"], case["k"], case["v"].abs(), case["a"].abs(), _scale(case), case["mask"])
    return ref_mixed(*args, _scale(case), case["mask"]), terms


def _assert_matches(
    out: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, dtype: torch.dtype, what: str, bf16_compute=False
):
    """`out` against the float64 reference within the tolerance of `dtype` (the module docstring),
    element by element, relative to the size of each element's terms."""
    assert out.dtype == dtype, what
    assert torch.isfinite(out).all(), what
    err = (out.double() - ref).abs()
    if dtype == torch.bfloat16 and bf16_compute:  # SDPA at A = I: PyTorch's bf16 kernel, bf16 inside
        bound = 2**-7 * ref.abs() + 2**-6 * terms + 1e-30
    elif dtype == torch.bfloat16:  # the output's own rounding, and float32 compute of the terms
        bound = 2**-7 * ref.abs() + 1e-5 * terms + 1e-30
    else:
        bound = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype] * terms + 1e-30
    worst = (err / bound).max().item() if ref.numel() else 0.0
    assert worst <= 1, f"{what}: {worst:.3g} x the {dtype} bound"


@PROPERTY
@given(case=attention_case())
def test_every_cpu_implementation_matches_the_float64_reference(case):
    """chunked, materialized, cpu_fused and "auto" (SDPA at the identity) give the reference's values."""
    ref, terms = _reference(case)
    dtype = case["q"].dtype
    args = (case["q"], case["k"], case["v"], case["a"], case["scale"], case["mask"], case["chunk"])
    impls = CPU_IMPLS + ("auto",) + (("sdpa",) if case["alpha"] == "identity" else ())
    for impl in impls:
        out = dc.mixed_attention(*args, impl=impl)
        sdpa = impl == "sdpa" or (impl == "auto" and case["alpha"] == "identity")
        _assert_matches(out, ref, terms, dtype, f"{impl} {case['alpha']} {case['kind']}", bf16_compute=sdpa)


@PROPERTY
@given(case=attention_case(dtype=torch.float64))
def test_every_gradient_matches_the_float64_reference(case):
    """dq, dk, dv and dA of the implementations with their own backward, in float64 (to 1e-9)."""
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*case["q"].shape[:3], case["v"].shape[-1], generator=g, dtype=torch.float64)
    ref_out, ref_g = ref_grads(case["q"], case["k"], case["v"], case["a"], _scale(case), case["mask"], grad_out)
    _, terms = _reference(case)
    for impl in ("chunked", "cpu_fused"):
        leaves = [case[x].clone().requires_grad_() for x in "qkva"]
        out = dc.mixed_attention(*leaves, case["scale"], case["mask"], case["chunk"], impl=impl)
        out.backward(grad_out)
        _assert_matches(out.detach(), ref_out, terms, torch.float64, impl)
        for name, leaf, exp in zip("qkva", leaves, ref_g):
            # dA comes back in A's dtype: float32 A rounds it to float32
            tol = (1e-9 if leaf.dtype == torch.float64 else 1e-6) * max(1.0, exp.abs().max().item())
            err = (leaf.grad - exp).abs().max().item()
            assert err <= tol, f"{impl} d{name} {case['alpha']} {case['kind']}: {err:.3g} > {tol:.3g}"


def _normwise(got: torch.Tensor, exp: torch.Tensor) -> float:
    """||got - exp|| / ||exp||, with a floor of 1e-3 per element on ||exp|| (a gradient that cancels
    to ~0, as dq and dk do for A = 0, is compared with the size of an O(1) entry's rounding instead)."""
    floor = 1e-3 * exp.numel() ** 0.5
    return ((got.double() - exp).norm() / max(exp.norm().item(), floor)).item()


@PROPERTY
@given(case=attention_case(dtype=st.sampled_from([torch.float32, torch.bfloat16])))
def test_low_precision_gradients_match_the_float64_reference(case):
    """float32 and bf16 activations: gradients in the input's dtype, computed in float32, within 1e-4
    (float32) and 3e-2 (bf16) normwise of the float64 gradients of the same (rounded) inputs."""
    dtype = case["q"].dtype
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*case["q"].shape[:3], case["v"].shape[-1], generator=g, dtype=torch.float64).to(dtype)
    ref_out, ref_g = ref_grads(case["q"], case["k"], case["v"], case["a"], _scale(case), case["mask"], grad_out)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for impl in ("chunked", "cpu_fused", "materialized"):
        leaves = [case[x].clone().requires_grad_() for x in "qkva"]
        out = dc.mixed_attention(*leaves, case["scale"], case["mask"], case["chunk"], impl=impl)
        out.backward(grad_out)
        for name, leaf, exp in zip("qkva", leaves, ref_g):
            assert leaf.grad.dtype == leaf.dtype, (impl, name)
            err = _normwise(leaf.grad, exp)
            assert err <= tol, f"{impl} d{name} {dtype} {case['alpha']} {case['kind']}: {err:.3g} > {tol}"


@PROPERTY
@given(case=attention_case(dtype=st.sampled_from([torch.float64, torch.float32])))
def test_materialized_with_its_default_scale(case):
    """`materialized_mixed_attention` called directly (the benchmarks' baseline) with scale=None uses
    1/sqrt(d), d the head size of q (mixed_attention always passes a scale, so only this reaches it)."""
    case = dict(case, scale=None)
    ref, terms = _reference(case)
    out = dc.materialized_mixed_attention(case["q"], case["k"], case["v"], case["a"], None, case["mask"])
    _assert_matches(out, ref, terms, case["q"].dtype, "materialized, scale None")


@PROPERTY
@given(
    case=attention_case(dtype=st.sampled_from([torch.float64, torch.float32])), needs=st.tuples(*[st.booleans()] * 4)
)
def test_chunked_backward_gives_gradients_only_where_asked(case, needs):
    """The gradients the fused backends' fallback returns: None exactly where not needed, else the
    float64 reference's, in each input's dtype and shape."""
    from dreamcoeff.attention.chunked import chunked_backward
    from dreamcoeff.attention.core import as_additive_mask, compute_dtype

    q, k, v, a = (case[x] for x in "qkva")
    mask = as_additive_mask(case["mask"], compute_dtype(q.dtype))
    grad_out = torch.ones(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    grads = chunked_backward(q, k, v, a, mask, _scale(case), case["chunk"] or q.shape[2], needs, grad_out)
    _, ref_g = ref_grads(q, k, v, a, _scale(case), case["mask"], grad_out)
    for name, need, got, exp, leaf in zip("qkva", needs, grads, ref_g, (q, k, v, a)):
        if not need:
            assert got is None, name
            continue
        # (not asserted: contiguity. `.to(same dtype, memory_format=torch.contiguous_format)` returns the
        # transposed view as it is, so dK and dV come back strided where the compute dtype is the input's)
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        exact = leaf.dtype == q.dtype == torch.float64  # computed and returned in float64
        assert _normwise(got, exp) <= (1e-9 if exact else 1e-4), name


@PROPERTY
@given(h=st.integers(1, 20), strength=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_coefficient_matrix_is_identity_plus_scaled_alpha(h, strength, seed):
    """A = I + c * alpha outside training (float64 in, float64 out; float32 otherwise)."""
    alpha = torch.randn(h, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = dc.coefficient_matrix(alpha, strength=strength, dropout=0.5, training=False)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, torch.eye(h, dtype=torch.float64) + strength * alpha, rtol=0, atol=1e-15)
    assert dc.coefficient_matrix(alpha.float(), strength).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# File readers: valid files as the library writes them


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


@pytest.fixture(scope="module")
def alpha_file(tmp_path_factory) -> bytes:
    from dreamcoeff.processor import apply_coeff, coeff_parameters
    from dreamcoeff.weights import save_coeff_weights
    from tests.attention_cases import two_attention_modules

    model = two_attention_modules(heads=3)
    apply_coeff(model)
    with torch.no_grad():
        for p in coeff_parameters(model):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    path = save_coeff_weights(tmp_path_factory.mktemp("alpha") / "coeff_weights.safetensors", model)
    return path.read_bytes()


@pytest.fixture(scope="module")
def embeddings_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    tensors = {"clip_l": torch.randn(2, 8, generator=g), "clip_g": torch.randn(2, 12, generator=g)}
    return _safetensors(tensors, {"tokens": json.dumps(["<s0>", "<s1>"])})


def _header_length(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def truncations(blob: bytes):
    """Every length class of a truncated file: empty, inside the 8-byte length, inside the header,
    inside the data, one byte short (each boundary, and any length between)."""
    end = _header_length(blob)
    edges = [0, 1, 7, 8, 9, end - 1, end, end + 1, len(blob) - 1]
    return st.one_of(st.sampled_from([e for e in edges if 0 <= e < len(blob)]), st.integers(0, len(blob) - 1))


def corrupted_header(blob: bytes):
    """A header that is bad JSON, a JSON non-object, has offsets outside / overlapping / negative /
    huge, or a length field that is huge or wrong, over the valid file's data."""
    end = _header_length(blob)
    header, data = json.loads(blob[8:end]), blob[end:]
    key = next(k for k in header if k != "__metadata__")

    def packed(encoded: bytes, length: int | None = None) -> bytes:
        return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data

    def with_offsets(offsets) -> bytes:
        edited = json.loads(json.dumps(header))
        edited[key]["data_offsets"] = offsets
        return packed(json.dumps(edited).encode())

    raw = blob[8:end]
    huge = st.sampled_from([2**31, 2**32 + 7, 2**40, 2**63, 2**64 - 1])
    offset = st.one_of(
        st.integers(-(2**64), 2**64), st.integers(0, len(data) + 16), huge, st.floats(), st.text(max_size=3)
    )
    return st.one_of(
        # bad JSON: the valid header cut, padded with garbage, or random text and bytes
        st.integers(1, len(raw) - 1).map(lambda cut: packed(raw[:cut])),
        st.binary(min_size=1, max_size=64).map(lambda junk: packed(raw[:-1] + junk)),
        st.binary(max_size=64).map(packed),
        st.text(max_size=40).map(lambda text: packed(text.encode("utf-8", "surrogatepass"))),
        # valid JSON that is not a header object
        st.sampled_from([b"[]", b"null", b"1", b'"x"', b"{}", b'{"__metadata__": 5}', b'{"a": 1}']).map(packed),
        # offsets: outside the data, reversed, negative, huge, not numbers, the wrong count
        st.lists(offset, min_size=0, max_size=3).map(with_offsets),
        st.tuples(offset, offset).map(lambda pair: with_offsets(list(pair))),
        # the length field: huge, or off by a few bytes either way
        huge.map(lambda n: packed(raw, n)),
        st.integers(-8, 8).filter(bool).map(lambda delta: packed(raw, max(0, len(raw) + delta))),
    )


def random_bytes():
    """Files from nothing: any bytes, or 8 length bytes (often plausible) and any rest."""
    length = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)).map(lambda n: struct.pack("<Q", n))
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(length, st.binary(max_size=100)).map(lambda parts: parts[0] + parts[1]),
        st.binary(max_size=60).map(lambda rest: struct.pack("<Q", len(rest)) + rest),  # length = the rest
    )


MEMORY_FACTOR, MEMORY_SLACK = 4, 16 * 2**20  # peak RSS a read may add: 4x the file and a fixed allowance


def _expect_clear_error(read, path: Path, blob: bytes, error: type[BaseException]) -> str:
    """Write `blob` to `path` and read it: loaded, or `error` naming the file; in seconds, in bounded
    memory. Returns "loaded" or "refused"."""
    path.write_bytes(blob)
    memory: dict = {}
    start = time.perf_counter()
    with hang_alarm(30), peak_rss_growth(memory):
        try:
            read(path)
            outcome = "loaded"
        except error as exc:
            assert str(path.name) in str(exc), f"the message does not name the file: {exc}"
            outcome = "refused"
    assert time.perf_counter() - start < 30
    if memory["bytes"] is not None:
        assert memory["bytes"] <= MEMORY_FACTOR * len(blob) + MEMORY_SLACK, f"peak RSS grew by {memory['bytes']}"
    return outcome


def _alpha_reader():
    from dreamcoeff.weights import CoeffWeightsError, read_coeff_file

    return read_coeff_file, CoeffWeightsError


def _embeddings_reader():
    from dreamcoeff.tokens import TokenError, read_embeddings_file

    return read_embeddings_file, TokenError


READERS = {"alpha": (_alpha_reader, "alpha_file"), "embeddings": (_embeddings_reader, "embeddings_file")}


@pytest.fixture(params=list(READERS))
def reader(request, tmp_path):
    """(read, error, the valid file's bytes, the path to write to) for one reader."""
    make, fixture = READERS[request.param]
    read, error = make()
    valid = request.getfixturevalue(fixture)
    path = tmp_path / f"{request.param}.safetensors"
    assert _expect_clear_error(read, path, valid, error) == "loaded", "the valid file must load"
    return read, error, valid, path


@PROPERTY
@given(data=st.data())
def test_readers_refuse_every_truncation(reader, data):
    read, error, valid, path = reader
    cut = data.draw(truncations(valid), label="truncate to")
    assert _expect_clear_error(read, path, valid[:cut], error) == "refused"


@PROPERTY
@given(data=st.data())
def test_readers_refuse_corrupted_headers(reader, data):
    """A corrupted header never loads: each edit breaks the JSON, the offsets or the length."""
    read, error, valid, path = reader
    blob = data.draw(corrupted_header(valid), label="file")
    # a shifted length ending in trailing spaces of the header could still be a valid file: allowed
    _expect_clear_error(read, path, blob, error)


@PROPERTY
@given(data=st.data())
def test_readers_refuse_random_bytes(reader, data):
    read, error, _, path = reader
    assert _expect_clear_error(read, path, data.draw(random_bytes(), label="file"), error) == "refused"


def test_truncations_include_every_length_class(alpha_file):
    """The strategy's boundaries: a guard that the exhaustive list below keeps meaning what it says."""
    end = _header_length(alpha_file)
    assert 9 < end < len(alpha_file) - 1


@pytest.mark.parametrize("name", list(READERS))
def test_readers_refuse_each_prefix_of_a_valid_file(name, request, tmp_path):
    """Not sampled: every strict prefix of the valid file (a few hundred bytes) is refused."""
    make, fixture = READERS[name]
    read, error = make()
    valid = request.getfixturevalue(fixture)
    path = tmp_path / f"{name}.safetensors"
    for cut in range(len(valid)):
        assert _expect_clear_error(read, path, valid[:cut], error) == "refused", cut


# ------------------------------------------------------------------------------------------------
# The checkpoint check: answers in words, never raises


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    """A small checkpoint's files, written the way accelerate writes them (torch.save archives, a
    safetensors model file), plus the state record's fields (global_step 2, two optimizer updates)."""
    folder = tmp_path_factory.mktemp("ckpt")
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    for _ in range(2):
        param.sum().backward()
        optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.bin")
    torch.save({"last_epoch": 2}, folder / "scheduler.bin")
    torch.save({"torch": torch.get_rng_state()}, folder / "random_states_0.pkl")
    (folder / "model.safetensors").write_bytes(_safetensors({"weight": param.detach().clone()}))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _write_checkpoint(folder: Path, files: dict[str, bytes], manifest: bool) -> Path:
    from dreamcoeff.train.checkpoints import STATE_NAME

    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    state = {"global_step": 2, "optimizer_steps": 2}
    if manifest:
        state["files"] = {name: len(blob) for name, blob in files.items()}
    (folder / STATE_NAME).write_text(json.dumps(state))
    return folder


def _checked(folder: Path):
    from dreamcoeff.train.checkpoints import checkpoint_problem

    memory: dict = {}
    with hang_alarm(30), peak_rss_growth(memory):
        problem = checkpoint_problem(folder)  # any exception fails the test: it must answer in words
    if memory["bytes"] is not None:
        assert memory["bytes"] <= MEMORY_SLACK + 4 * sum(p.stat().st_size for p in folder.iterdir())
    assert problem is None or isinstance(problem, str)
    return problem


def test_the_valid_checkpoint_is_intact(checkpoint_files, tmp_path):
    assert _checked(_write_checkpoint(tmp_path / "checkpoint-2", checkpoint_files, manifest=True)) is None
    assert _checked(_write_checkpoint(tmp_path / "old" / "checkpoint-2", checkpoint_files, manifest=False)) is None


@PROPERTY
@given(data=st.data())
def test_a_truncated_checkpoint_file_is_named(checkpoint_files, tmp_path_factory, data):
    """Any file cut short is reported, naming it: from the manifest's sizes, and without a manifest
    (older checkpoints) from the file's own format."""
    name = data.draw(st.sampled_from(sorted(checkpoint_files)), label="file")
    manifest = data.draw(st.booleans(), label="manifest")
    valid = checkpoint_files[name]
    cut = data.draw(st.integers(0, len(valid) - 1), label="truncate to")
    files = dict(checkpoint_files, **{name: valid[:cut]})
    problem = _checked(_write_checkpoint(tmp_path_factory.mktemp("c") / "checkpoint-2", files, manifest))
    assert problem is not None and name in problem, problem


@PROPERTY
@given(data=st.data())
def test_a_checkpoint_of_random_or_corrupted_files_is_answered_in_words(checkpoint_files, tmp_path_factory, data):
    """Random bytes in any file, or a corrupted safetensors header: a problem string or None, never an
    exception, a hang or a huge allocation; random bytes in place of a file are always reported."""
    name = data.draw(st.sampled_from(sorted(checkpoint_files)), label="file")
    if name.endswith(".safetensors") and data.draw(st.booleans()):
        blob = data.draw(corrupted_header(checkpoint_files[name]), label="bytes")
    else:
        blob = data.draw(random_bytes(), label="bytes")
    files = dict(checkpoint_files, **{name: blob})
    folder = _write_checkpoint(tmp_path_factory.mktemp("c") / "checkpoint-2", files, manifest=False)
    problem = _checked(folder)
    if not name.endswith(".safetensors"):  # random bytes are no zip archive
        assert problem is not None and name in problem, problem


@PROPERTY
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_a_broken_state_record_is_answered_in_words(checkpoint_files, tmp_path_factory, text):
    from dreamcoeff.train.checkpoints import STATE_NAME

    folder = _write_checkpoint(tmp_path_factory.mktemp("c") / "checkpoint-2", checkpoint_files, manifest=True)
    (folder / STATE_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        valid = int(json.loads(text)["global_step"]) == 2
    except Exception:  # noqa: BLE001 - any way the text is not a state record of step 2
        valid = False
    problem = _checked(folder)
    if not valid:
        assert problem is not None and STATE_NAME in problem, problem


# ------------------------------------------------------------------------------------------------
# The LoRA reader (diffusers' reader behind dreamcoeff's checks)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from dreamcoeff.lora import add_lora, save_lora
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    maker = build_tiny_pipeline(seed=0)
    add_lora(maker.unet, rank=2, lora_alpha=2)
    path = save_lora(tmp_path_factory.mktemp("lora"), maker.unet)
    return pipe, path.read_bytes()


@PROPERTY
@given(data=st.data())
def test_the_lora_reader_refuses_broken_files(lora_setup, tmp_path_factory, data):
    from dreamcoeff.loading import RunLoadError, check_lora_file

    pipe, valid = lora_setup
    choice = data.draw(st.sampled_from(["truncate", "header", "random"]), label="how")
    if choice == "truncate":
        blob = valid[: data.draw(truncations(valid), label="truncate to")]
    elif choice == "header":
        blob = data.draw(corrupted_header(valid), label="file")
    else:
        blob = data.draw(random_bytes(), label="file")
    path = tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors"
    outcome = _expect_clear_error(lambda p: check_lora_file(pipe, p), path, blob, RunLoadError)
    if choice != "header":
        assert outcome == "refused"


def test_the_lora_reader_loads_the_valid_file(lora_setup, tmp_path):
    from dreamcoeff.loading import RunLoadError, check_lora_file

    pipe, valid = lora_setup
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert _expect_clear_error(lambda p: check_lora_file(pipe, p), path, valid, RunLoadError) == "loaded"
