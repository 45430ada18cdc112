"""The alpha file reader's header checks, one hand-built file per rule, each refused with its own message
word for word (the fuzz and property tests only ask for *a* CoeffWeightsError naming the file; a weaker
check would pass them when safetensors refuses the file later with another message)."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from dreamcoeff import CoeffWeightsError, read_coeff_file

META = {"format": "dreamcoeff", "format_version": "1"}
KEY = "unet.down.attn1.alpha"


def _file(path, header: dict, data: bytes, pad_to: int | None = None):
    """A safetensors file from its parts; `pad_to` pads the JSON with spaces (as safetensors allows)."""
    text = json.dumps(header).encode()
    if pad_to is not None:
        text += b" " * (pad_to - len(text))
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _t(shape, dtype="F32", offsets=None, n=None):
    size = n if n is not None else shape[0] * shape[1] * 4
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets or [0, size]}


def test_one_head_and_the_largest_head_count_load(tmp_path):
    for heads in (1, 1024):
        values = torch.arange(heads * heads, dtype=torch.float32).view(heads, heads)
        path = _file(tmp_path / f"h{heads}.safetensors", {"__metadata__": META, KEY: _t([heads, heads])},
                     values.numpy().tobytes())  # fmt: skip
        tensors, _ = read_coeff_file(path)
        assert torch.equal(tensors[KEY], values)


def test_a_header_whose_length_ends_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    header = {"__metadata__": META, KEY: _t([2, 2])}
    path = _file(tmp_path / "a.safetensors", header, torch.ones(2, 2).numpy().tobytes(), pad_to=0x180)
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_coeff_file(path)[0][KEY], torch.ones(2, 2))


def test_a_pickle_is_named_as_one(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # starts with 0x80, no "{" at byte 8
    with pytest.raises(CoeffWeightsError) as err:
        read_coeff_file(path)
    assert (
        str(err.value)
        == f"{path} is a pickle / torch.save file; dreamcoeff only reads safetensors (pickle can run code)"
    )


def _cases():
    two = torch.zeros(2, 2).numpy().tobytes()
    return [
        ("header only", {"__metadata__": META}, b"", "{p} holds no alpha tensors"),
        (
            "no metadata",
            {KEY: _t([2, 2])},
            two,
            "{p} is not a dreamcoeff alpha file (metadata format=None); LoRA files load with pipe.load_lora_weights, "
            "not load_coeff_weights",
        ),
        (
            "a LoRA's format",
            {"__metadata__": {"format": "pt"}, KEY: _t([2, 2])},
            two,
            "{p} is not a dreamcoeff alpha file (metadata format='pt'); LoRA files load with pipe.load_lora_weights, "
            "not load_coeff_weights",
        ),
        (
            "metadata value not a string",
            {"__metadata__": {**META, "x": 1}, KEY: _t([2, 2])},
            two,
            "{p} is not a valid safetensors file (__metadata__ is not a string mapping)",
        ),
        (
            "not square",
            {"__metadata__": META, KEY: _t([2, 3])},
            bytes(24),
            "{p} has invalid entries:\n  " + KEY + ": shape [2, 3], expected square H x H with H <= 1024",
        ),
        (
            "no heads",
            {"__metadata__": META, KEY: _t([0, 0], offsets=[0, 0])},
            b"",
            "{p} has invalid entries:\n  " + KEY + ": shape [0, 0], expected square H x H with H <= 1024",
        ),
        (
            "integer dtype",
            {"__metadata__": META, KEY: _t([2, 2], dtype="I32")},
            two,
            "{p} has invalid entries:\n  " + KEY + ": dtype 'I32', expected a float type",
        ),
        (
            "bytes that do not fit",
            {"__metadata__": META, KEY: _t([2, 2], n=12)},
            bytes(12),
            "{p} has invalid entries:\n  " + KEY + ": 12 bytes of data for a 2 x 2 F32 tensor",
        ),
        (
            "two problems",
            {"__metadata__": META, KEY: _t([2, 2], dtype="I32"), "unet.b": _t([2, 2], offsets=[16, 32])},
            bytes(32),
            "{p} has invalid entries:\n  " + KEY + ": dtype 'I32', expected a float type\n  unet.b: not a "
            "'unet.<attention module>.alpha' key",
        ),
        (
            "a gap between tensors",
            {"__metadata__": META, KEY: _t([2, 2]), "unet.up.attn1.alpha": _t([2, 2], offsets=[20, 36])},
            bytes(36),
            "{p} is corrupt or truncated (its tensors' data do not fill the 36 bytes after the header end to end)",
        ),
        (
            "a negative offset",
            {"__metadata__": META, KEY: _t([2, 2], offsets=[-4, 16])},
            bytes(16),
            "{p} is corrupt or truncated (tensor '" + KEY + "' lies outside the file)",
        ),
    ]


@pytest.mark.parametrize("name, header, data, message", _cases(), ids=[c[0] for c in _cases()])
def test_each_header_rule_has_its_own_message(tmp_path, name, header, data, message):
    path = _file(tmp_path / "a.safetensors", header, data)
    with pytest.raises(CoeffWeightsError) as err:
        read_coeff_file(path)
    assert str(err.value) == message.format(p=path)


@pytest.mark.parametrize("length", [2**64 - 1, 1000, 95])  # the high bit set (unsigned), past the end, just past
def test_a_header_length_beyond_the_file_is_named(tmp_path, length):
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{" + bytes(91))
    with pytest.raises(CoeffWeightsError) as err:
        read_coeff_file(path)
    assert str(err.value) == f"{path} is not a valid safetensors file (header of {length} bytes for a 100-byte file)"
