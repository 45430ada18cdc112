"""Fuzzed untrusted files (issue 20): mutated alpha, learned-token and LoRA files against the loaders.

Each example takes a valid file as the library writes it (an alpha file from `save_coeff_weights`, an
embeddings file from `LearnedTokens.save`, a LoRA file from `save_lora`) and mutates it: random byte flips,
overwrites, insertions, deletions and truncations (mostly in the header), or edits of the header's JSON
(keys, shapes, dtypes, data_offsets, whole entries, the metadata, the header length). The properties, for
every example:

- the loader either loads the file or raises its documented error type (`CoeffWeightsError`,
  `TokenError`, `RunLoadError`: all ValueErrors), with a message that names the file; nothing else escapes;
- it returns within the deadline (and a hard alarm stops a hang);
- its peak memory (the process's peak RSS, reset before each load) stays within a few times the file's size;
- a refused file leaves the pipeline exactly as it was (every tensor of the UNet and both text encoders,
  the attention processors, the tokenizers, the LoRA adapters); a loaded one is unloaded again.

The counts of examples and outcomes are printed at the end of the module (docs/RELIABILITY.md has them).
``DREAMCOEFF_FUZZ_EXAMPLES=2000 DREAMCOEFF_FUZZ_RANDOM=1`` runs a longer, non-repeatable search.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import BaseTunerLayer

from dreamcoeff import RunLoadError, load_coeff_weights, load_run, read_coeff_file, unload_run
from dreamcoeff.processor import apply_coeff, coeff_parameters, remove_coeff
from dreamcoeff.tokens import TokenError, load_embeddings_into, read_embeddings_file, unload_embeddings
from dreamcoeff.weights import CoeffWeightsError
from tests.helpers import assert_pipeline_unchanged, hang_alarm, peak_rss_growth, pipeline_fingerprint

EXAMPLES = int(os.environ.get("DREAMCOEFF_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),  # generous for a busy 2-core machine; a load takes milliseconds
    derandomize=not os.environ.get("DREAMCOEFF_FUZZ_RANDOM"),  # the same cases on every run unless asked
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 60
#: Peak RSS a load may add: this many times the file's size, plus a fixed allowance for the loaders' own
#: small allocations (dicts, small tensors, imports done once).
MEMORY_FACTOR, MEMORY_SLACK = 4, 16 * 2**20

COUNTS: collections.Counter = collections.Counter()
PEAKS: dict[str, int] = collections.defaultdict(int)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"fuzzed files: {sum(COUNTS.values())} examples"]
    for kind in ("alpha", "embeddings", "lora"):
        outcomes = {o: n for (k, o), n in sorted(COUNTS.items()) if k == kind}
        if outcomes:
            lines.append(
                f"  {kind}: {sum(outcomes.values())} ({', '.join(f'{n} {o}' for o, n in outcomes.items())}); "
                f"largest peak RSS growth {PEAKS[kind] / 2**20:.1f} MiB"
            )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown with or without -s
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)


# ------------------------------------------------------------------------------------------------
# Guards: time, memory, the pipeline


class Harness:
    """One loader on one pipeline: try a file, check the properties, count the outcome."""

    def __init__(
        self, kind: str, valid: bytes, pipe, path: Path, load, unload, errors: tuple[type[BaseException], ...]
    ):
        self.kind, self.valid, self.pipe, self.path = kind, valid, pipe, path
        self.load, self.unload, self.errors = load, unload, errors
        self.before = pipeline_fingerprint(pipe)

    def __repr__(self) -> str:
        return f"<{self.kind} loader>"

    def check(self, blob: bytes) -> str:
        self.path.write_bytes(blob)
        memory: dict = {}
        start = time.perf_counter()
        loaded = None
        with hang_alarm(HANG_SECONDS), peak_rss_growth(memory):
            try:
                loaded = self.load(self.path)
                outcome = "loaded"
            except self.errors as exc:
                outcome = "refused"
                assert self.path.name in str(exc) or str(self.path.parent) in str(exc), (
                    f"the message does not name the file: {exc}"
                )
        elapsed = time.perf_counter() - start
        if memory["bytes"] is not None:
            PEAKS[self.kind] = max(PEAKS[self.kind], memory["bytes"])
            assert memory["bytes"] <= MEMORY_FACTOR * len(blob) + MEMORY_SLACK, (
                f"peak RSS grew by {memory['bytes']} bytes loading a {len(blob)}-byte file"
            )
        if outcome == "refused":
            assert_pipeline_unchanged(self.pipe, self.before)
        else:
            self.unload(loaded)
            self.before = pipeline_fingerprint(self.pipe)
        COUNTS[(self.kind, outcome)] += 1
        assert elapsed < HANG_SECONDS
        return outcome


# ------------------------------------------------------------------------------------------------
# Mutations


class Mutant(bytes):
    """A mutated file: its bytes, shown in a failure report as its size and the edits made."""

    def __new__(cls, data: bytes, edits: list[str]):
        self = super().__new__(cls, data)
        self.edits = edits
        return self

    def __repr__(self) -> str:
        return f"<{len(self)}-byte file: {'; '.join(self.edits)}>"


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
DIMS = st.one_of(st.integers(0, 4), st.integers(-3, 2**20), st.sampled_from([2**31, 2**32 + 1, 2**63, 2**64 + 1]))
DTYPES = st.sampled_from(
    ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "C64"]
    + ["f32", "float32", "", "F33"]
)


@st.composite
def byte_mutation(draw, blob: bytes) -> bytes:
    """1-4 byte-level edits, two thirds of them in the 8-byte length and the header."""
    data, edits = bytearray(blob), []
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        end = min(len(data), header_end) if draw(st.integers(0, 2)) else len(data)
        pos = draw(st.integers(0, max(0, end - 1)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            bit = draw(st.integers(0, 7))
            data[pos] ^= 1 << bit
            edits.append(f"flip bit {bit} of byte {pos}")
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 0xFF, ord('"'), ord("{"), ord("}"), ord("["), ord(","), ord("9")]))
            edits.append(f"byte {pos} = {data[pos]:#x}")
        elif op == "insert":
            new = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos] = new
            edits.append(f"insert {new!r} at {pos}")
        elif op == "delete":
            n = draw(st.integers(1, 16))
            del data[pos : pos + n]
            edits.append(f"delete {n} bytes at {pos}")
        else:
            cut = draw(st.integers(0, len(data) - 1))
            del data[cut:]
            edits.append(f"truncate to {cut}")
    return Mutant(bytes(data), edits)


@st.composite
def header_mutation(draw, blob: bytes) -> bytes:
    """1-3 edits of the header's JSON, re-serialised with a correct (or, rarely, wrong) length, over the
    original data (or a truncated / extended copy)."""
    header, body = _split(blob)
    original = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        keys = [k for k in header if k != "__metadata__"]
        what = draw(st.sampled_from(["key", "shape", "dtype", "offsets", "entry", "delete", "copy", "metadata"]))
        if what == "metadata":
            meta = header.get("__metadata__")
            if not isinstance(meta, dict) or draw(st.integers(0, 5)) == 0:
                header["__metadata__"] = draw(JSON_VALUES)
                continue
            field = draw(st.sampled_from(sorted(meta) + ["new"]))
            choice = draw(st.integers(0, 4))
            if choice == 0:
                meta.pop(field, None)
            elif choice == 1:
                meta[field] = json.dumps(draw(JSON_VALUES))  # a string holding other JSON (tokens, args)
            elif choice == 4:  # a list of names or groups of them, as the token metadata holds
                names = st.one_of(st.sampled_from(["<s0>", "<s1>", "<s2>", "", "a b", "dog", "TOK"]), JSON_VALUES)
                value = st.one_of(st.lists(names, max_size=4), st.dictionaries(st.text(max_size=4), st.lists(names)))
                meta[field] = json.dumps(draw(value))
            elif choice == 2:
                meta[field] = draw(st.text(max_size=20))
            else:
                meta[field] = draw(JSON_VALUES)  # not a string
            continue
        if not keys:
            header[draw(st.text(max_size=20))] = draw(JSON_VALUES)
            continue
        key = draw(st.sampled_from(keys))
        entry = header[key]
        if what == "key":
            new = draw(
                st.one_of(
                    st.text(max_size=30),
                    st.sampled_from([key.replace("unet.", ""), key + "x", key.replace(".", "_"), key.upper()]),
                    st.sampled_from([k for k in keys if k != key] or [key]),  # a duplicate name
                )
            )
            header[new] = header.pop(key)
        elif what == "delete":
            del header[key]
        elif what == "copy":
            header[key + draw(st.text(min_size=1, max_size=4))] = json.loads(json.dumps(entry))
        elif what == "entry":
            header[key] = draw(JSON_VALUES)
        elif not isinstance(entry, dict):
            header[key] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        elif what == "shape":
            shape = entry.get("shape") if isinstance(entry.get("shape"), list) else []
            entry["shape"] = draw(
                st.one_of(
                    st.lists(DIMS, max_size=4),
                    st.just(list(reversed(shape))),
                    st.just([d * 2 if type(d) is int else d for d in shape]),
                    st.just(shape[1:]),
                    JSON_VALUES,
                )
            )
        elif what == "dtype":
            entry["dtype"] = draw(st.one_of(DTYPES, JSON_VALUES))
        else:
            offsets = entry.get("data_offsets")
            ints = st.one_of(st.integers(-(2**65), 2**65), st.integers(0, len(body) + 64))
            if isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets):
                shift = draw(st.integers(-64, 64))
                options = [
                    [offsets[0] + shift, offsets[1] + shift],
                    [offsets[0], offsets[1] + shift],
                    [offsets[1], offsets[0]],
                    [0, offsets[1] - offsets[0]],
                ]
                entry["data_offsets"] = draw(st.one_of(st.sampled_from(options), st.lists(ints, max_size=3)))
            else:
                entry["data_offsets"] = draw(st.one_of(st.lists(ints, max_size=3), JSON_VALUES))
    encoded = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    encoded += b" " * draw(st.integers(0, 7))
    length = len(encoded)
    if draw(st.integers(0, 9)) == 0:
        length = max(0, length + draw(st.integers(-16, 16)))
    tail = draw(st.sampled_from(["same", "same", "same", "truncate", "extend"]))
    if tail == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif tail == "extend":
        body = body + draw(st.binary(min_size=1, max_size=64))
    edits = [f"header {_diff(original, header)}"[:2000]]
    if length != len(encoded):
        edits.append(f"header length {length} for {len(encoded)} bytes")
    if tail != "same":
        edits.append(f"data {tail}d to {len(body)} bytes")
    return Mutant(struct.pack("<Q", length) + encoded + body, edits)


def _diff(before: dict, after: dict) -> str:
    """The header's entries that a mutation removed, added or changed (for the failure report)."""
    parts = [f"-{k!r}" for k in before if k not in after]
    parts += [f"{k!r}: {after[k]!r}" for k in after if k not in before or before[k] != after[k]]
    return ", ".join(parts) or "unchanged"


def mutation(blob: bytes):
    return st.one_of(byte_mutation(blob), header_mutation(blob))


# ------------------------------------------------------------------------------------------------
# Valid files, as the library writes them


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    from peft import LoraConfig

    from dreamcoeff.lora import save_lora
    from dreamcoeff.testing.tiny import build_tiny_pipeline
    from dreamcoeff.tokens import LearnedTokens, TokenPlan
    from dreamcoeff.weights import save_coeff_weights

    root = tmp_path_factory.mktemp("valid")
    maker = build_tiny_pipeline(seed=0)  # a pipeline of its own: writing the files changes it
    g = torch.Generator().manual_seed(0)
    apply_coeff(maker.unet)
    with torch.no_grad():
        for p in coeff_parameters(maker.unet):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    alpha = save_coeff_weights(root / "coeff_weights.safetensors", maker.unet, {"training_args": {"seed": 0}})
    remove_coeff(maker.unet)

    plan = TokenPlan.make("TOK", 2)
    tokens = LearnedTokens(plan, [maker.tokenizer, maker.tokenizer_2], [maker.text_encoder, maker.text_encoder_2])
    embeddings = tokens.save(root / "run_emb.safetensors")

    # LoRA on one transformer block's attention projections (the file format of a whole UNet's, smaller)
    block = r".*down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    maker.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=block))
    with torch.no_grad():
        for name, p in maker.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora = save_lora(root, maker.unet)
    return {"alpha": alpha.read_bytes(), "embeddings": embeddings.read_bytes(), "lora": lora.read_bytes()}


@pytest.fixture
def alpha_harness(valid_files, tiny_pipe, tmp_path):
    def load(path):
        read_coeff_file(path)
        return load_coeff_weights(tiny_pipe, path)

    return Harness("alpha", valid_files["alpha"], tiny_pipe, tmp_path / "coeff_weights.safetensors", load, lambda _: remove_coeff(tiny_pipe),
                   (CoeffWeightsError,))  # fmt: skip


@pytest.fixture
def embeddings_harness(valid_files, tiny_pipe, tmp_path):
    def load(path):
        read_embeddings_file(path)
        return load_embeddings_into(tiny_pipe, path)

    return Harness("embeddings", valid_files["embeddings"], tiny_pipe, tmp_path / "run_emb.safetensors", load,
                   lambda tokens: unload_embeddings(tiny_pipe, tokens), (TokenError,))  # fmt: skip


@pytest.fixture
def lora_harness(valid_files, tiny_pipe, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    return Harness("lora", valid_files["lora"], tiny_pipe, folder / "pytorch_lora_weights.safetensors", lambda path: load_run(tiny_pipe, folder),
                   lambda loaded: unload_run(tiny_pipe, loaded), (RunLoadError,))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The properties


def test_the_valid_files_load(alpha_harness, embeddings_harness, lora_harness):
    """The unmutated files load (so a mutant that is refused is refused for its mutation)."""
    for harness in (alpha_harness, embeddings_harness, lora_harness):
        assert harness.check(harness.valid) == "loaded", harness


@FUZZ
@given(data=st.data())
def test_fuzzed_alpha_files(alpha_harness, data):
    alpha_harness.check(data.draw(mutation(alpha_harness.valid), label="file"))


@FUZZ
@given(data=st.data())
def test_fuzzed_embeddings_files(embeddings_harness, data):
    embeddings_harness.check(data.draw(mutation(embeddings_harness.valid), label="file"))


@FUZZ
@given(data=st.data())
def test_fuzzed_lora_files(lora_harness, data):
    lora_harness.check(data.draw(mutation(lora_harness.valid), label="file"))


# ------------------------------------------------------------------------------------------------
# What the fuzzing found, kept as fixed examples


def _edit_header(blob: bytes, edit) -> bytes:
    header, body = _split(blob)
    edit(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def _first_key(header: dict, contains: str = "") -> str:
    return next(k for k in header if k != "__metadata__" and contains in k)


def _set_lora_config(**changes):
    def edit(header):
        config = json.loads(header["__metadata__"]["lora_adapter_metadata"])
        config.update({f"unet.{k}": v for k, v in changes.items()})
        header["__metadata__"]["lora_adapter_metadata"] = json.dumps(config)

    return edit


def _transpose_first(contains: str):
    def edit(header):
        entry = header[_first_key(header, contains)]
        entry["shape"] = entry["shape"][::-1]

    return edit


def _rename_first(new_prefix: str):
    def edit(header):
        key = _first_key(header)
        header[new_prefix + key.split(".", 1)[1]] = header.pop(key)

    return edit


FOUND = {
    # alpha: a dtype that is a JSON list raised TypeError (unhashable) instead of CoeffWeightsError
    "alpha, dtype a list": ("alpha", lambda h: h[_first_key(h)].update(dtype=[]), "refused"),
    # alpha: bytes after the last tensor passed the header check, then safetensors' own error escaped
    "alpha, data not filling the file": ("alpha", None, "refused"),
    # embeddings: token names in the metadata that are no list of distinct strings: TypeError / ValueError
    "embeddings, tokens a number": ("embeddings", lambda h: h["__metadata__"].update(tokens="5"), "refused"),
    "embeddings, tokens not strings": ("embeddings", lambda h: h["__metadata__"].update(tokens="[1, 2]"), "refused"),
    "embeddings, tokens repeated": (
        "embeddings",
        lambda h: h["__metadata__"].update(tokens='["<a>", "<a>"]'),
        "refused",
    ),
    "embeddings, tokens nested": ("embeddings", lambda h: h["__metadata__"].update(tokens='[["a"], "b"]'), "refused"),
    # LoRA (load_run): diffusers' errors escaped, and a failed load left LoRA layers in the UNet
    "lora, down matrix transposed": ("lora", _transpose_first("lora.down"), "refused"),
    "lora, text encoder key": ("lora", _rename_first("text_encoder."), "refused"),
    "lora, metadata rank 200000": ("lora", _set_lora_config(r=200_000), "loaded"),
    "lora, metadata modules_to_save": ("lora", _set_lora_config(modules_to_save=["conv_in"]), "loaded"),
    "lora, metadata PiSSA init": ("lora", _set_lora_config(init_lora_weights="pissa"), "loaded"),
    "lora, metadata alpha a string": ("lora", _set_lora_config(lora_alpha="2"), "refused"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_the_fuzzing_found(case, alpha_harness, embeddings_harness, lora_harness):
    kind, edit, outcome = FOUND[case]
    harness = {"alpha": alpha_harness, "embeddings": embeddings_harness, "lora": lora_harness}[kind]
    blob = harness.valid + b"\0" * 8 if edit is None else _edit_header(harness.valid, edit)
    assert harness.check(blob) == outcome


def test_load_run_loads_a_valid_lora_as_diffusers_does(tmp_path):
    """The adapter config load_run rebuilds from the checked file (rank from the tensors, lora_alpha from
    the metadata) gives the images of diffusers' own `load_lora_weights`, bit for bit (lora_alpha 8 at rank 4,
    so a lost alpha would show), and unloading gives the base model back."""
    import numpy as np

    from dreamcoeff.lora import add_lora, save_lora
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    maker = build_tiny_pipeline(seed=0)
    add_lora(maker.unet, rank=4, lora_alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in maker.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_lora(tmp_path, maker.unet)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            "a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        return np.asarray(out.images[0])

    ours = build_tiny_pipeline(seed=0)
    base, before = image(ours), pipeline_fingerprint(ours)
    loaded = load_run(ours, tmp_path)
    with_run = image(ours)
    unload_run(ours, loaded)
    theirs = build_tiny_pipeline(seed=0)
    theirs.load_lora_weights(str(tmp_path))
    assert np.array_equal(with_run, image(theirs)) and not np.array_equal(with_run, base)
    # unloaded: the base's module tree (no PEFT wrapper left) and every tensor, exactly
    assert_pipeline_unchanged(ours, before)
    assert not any(isinstance(m, BaseTunerLayer) for m in ours.unet.modules())
    # and so the same image, bit for bit: with the base's parameters left frozen (as PEFT leaves them)
    # PyTorch's matmul folds the batched proj_in input another way and the image moves by ~5e-6
    assert np.array_equal(image(ours), base)


def test_unload_run_keeps_the_callers_own_adapter(tmp_path):
    """A LoRA the user loaded under another name survives load_run + unload_run, still active, with
    its wrappers; only the run's adapter goes."""
    from dreamcoeff.lora import add_lora, save_lora
    from dreamcoeff.testing.tiny import build_tiny_pipeline

    maker = build_tiny_pipeline(seed=0)
    add_lora(maker.unet, rank=4, lora_alpha=4)
    save_lora(tmp_path, maker.unet)
    pipe = build_tiny_pipeline(seed=0)
    pipe.load_lora_weights(str(tmp_path), adapter_name="mine")
    before = pipeline_fingerprint(pipe)
    unload_run(pipe, load_run(pipe, tmp_path))
    assert_pipeline_unchanged(pipe, before)  # every tensor (wrappers included) and the adapter list {"unet": ["mine"]}
    assert pipe.get_active_adapters() == ["mine"]
