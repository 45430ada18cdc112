"""Save, load and validate alpha files (`coeff_weights.safetensors`).

Layout (docs/DESIGN.md section 4): one float32 H x H tensor per tuned attention module under the key
`unet.<module path>.alpha`, holding the *residual* alpha (A = I + scale * alpha), and string metadata
`format=dreamcoeff`, `format_version`, `base_model`, `targets`, `coeff_dropout`, plus whatever the
caller adds (the trainer stores its arguments as JSON under `training_args`).

Files are untrusted input: only safetensors is read (never pickle), the header is parsed and checked
(size, keys, shapes, dtypes) before any tensor is allocated, values must be finite, and loading is
all-or-nothing: nothing on the pipeline changes unless the whole file fits it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io import atomic_write
from .processor import (
    CoeffStrength,
    attention_modules,
    check_target_scales,
    coeff_modules,
    coeff_state_dict,
    install_coeff_processors,
    remove_coeff,
    set_coeff_strength,
    unwrap_unet,
)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

__all__ = [
    "COEFF_WEIGHTS_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CoeffWeightsError",
    "save_coeff_weights",
    "load_coeff_weights",
    "read_coeff_file",
    "init_coeff_from",
]

COEFF_WEIGHTS_NAME = "coeff_weights.safetensors"
FORMAT_NAME = "dreamcoeff"
FORMAT_VERSION = "1"
# A dreamcoeff header for all of SDXL is ~20 KB; anything near this limit is not ours.
MAX_HEADER_BYTES = 8 * 2**20
MAX_HEADS = 1024
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


class CoeffWeightsError(ValueError):
    """An alpha file that cannot be saved or does not fit the model; the message says why and what to do."""


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return out


def save_coeff_weights(
    path: str | os.PathLike,
    unet: UNet2DConditionModel | DiffusionPipeline | torch.nn.Module,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model's alpha to a safetensors file, atomically (temp file + rename).

    `path` may be a directory (the file is then `coeff_weights.safetensors` inside it). Metadata values
    that are not strings are stored as JSON. Refuses non-finite alpha, so a diverged run never
    overwrites good weights with NaNs.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        path = path / COEFF_WEIGHTS_NAME
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in coeff_state_dict(unet).items()}
    if not tensors:
        raise CoeffWeightsError("nothing to save: the model has no alpha (call apply_coeff first)")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise CoeffWeightsError(
            f"refusing to save non-finite alpha ({len(bad)} layers, e.g. {bad[0]}): the run diverged; "
            "lower --coeff_lr / --learning_rate or resume from an earlier checkpoint"
        )
    modules = coeff_modules(unet)
    first = next(iter(modules.values())).head_mix
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "targets": ",".join(sorted({p.rsplit(".", 1)[-1] for p in modules})),
        "coeff_dropout": str(first.dropout),
        "base_model": "",
    }
    meta.update(_metadata_strings(metadata))
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:  # a WriteError: names the file and the reason
        raise CoeffWeightsError(f"{exc}; the previous file (if any) is intact") from exc


def _read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without touching the tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        start = fh.read(9)
        fh.seek(8)
        head = start[:8]
        # A safetensors header's JSON starts right after its 8-byte length. Only without that "{" do
        # zip / pickle magic bytes mean torch.save: a length whose low byte is 0x80 is a valid file.
        if start[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise CoeffWeightsError(
                f"{path} is a pickle / torch.save file; dreamcoeff only reads safetensors (pickle can run code)"
            )
        if len(head) < 8:
            raise CoeffWeightsError(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
            raise CoeffWeightsError(
                f"{path} is not a valid safetensors file (header of {header_len} bytes for a {size}-byte file)"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError) as exc:  # also a number of over 4300 digits
            raise CoeffWeightsError(f"{path} is not a valid safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise CoeffWeightsError(f"{path} is not a valid safetensors file (header is not a mapping)")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CoeffWeightsError(f"{path} is not a valid safetensors file (__metadata__ is not a string mapping)")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise CoeffWeightsError(f"{path} is corrupt or truncated (tensor {key!r} lies outside the file)")
    # As safetensors requires: the tensors' data lie end to end and fill the rest of the file exactly.
    spans = sorted(info["data_offsets"] for key, info in header.items() if key != "__metadata__")
    ends = [0] + [end for _, end in spans]
    if any(begin != ends[i] for i, (begin, _) in enumerate(spans)) or ends[-1] != data_len:
        raise CoeffWeightsError(
            f"{path} is corrupt or truncated (its tensors' data do not fill the {data_len} bytes after the header "
            "end to end)"
        )
    return header


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / COEFF_WEIGHTS_NAME
    if not path.is_file():
        raise CoeffWeightsError(f"alpha file not found: {path}")
    return path


def _validated_entries(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Check a file's header: format marker, key names, square shapes of sane size, float dtypes.

    Returns ({key: heads}, metadata) without reading any tensor data.
    """
    header = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT_NAME:
        raise CoeffWeightsError(
            f"{path} is not a dreamcoeff alpha file (metadata format={metadata.get('format')!r}); "
            "LoRA files load with pipe.load_lora_weights, not load_coeff_weights"
        )
    problems, entries = [], {}
    for key, info in header.items():
        shape, dtype = info.get("shape"), info.get("dtype")
        if not (key.startswith("unet.") and key.endswith(".alpha")):
            problems.append(f"{key}: not a 'unet.<attention module>.alpha' key")
        elif not isinstance(dtype, str) or dtype not in _FLOAT_DTYPES:  # a list is unhashable
            problems.append(f"{key}: dtype {dtype!r}, expected a float type")
        elif not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(type(n) is int for n in shape)
            and shape[0] == shape[1]
            and 0 < shape[0] <= MAX_HEADS
        ):
            problems.append(f"{key}: shape {shape}, expected square H x H with H <= {MAX_HEADS}")
        elif info["data_offsets"][1] - info["data_offsets"][0] != shape[0] * shape[1] * _DTYPE_BYTES[dtype]:
            problems.append(
                f"{key}: {info['data_offsets'][1] - info['data_offsets'][0]} bytes of data for a "
                f"{shape[0]} x {shape[1]} {dtype} tensor"
            )
        else:
            entries[key] = shape[0]
    if problems:
        raise CoeffWeightsError(f"{path} has invalid entries:\n  " + "\n  ".join(problems))
    if not entries:
        raise CoeffWeightsError(f"{path} holds no alpha tensors")
    return entries, dict(metadata)


def _load_tensors(path: Path, keys) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key).to(torch.float32) for key in keys}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own type for a header it refuses
        raise CoeffWeightsError(f"{path} is not a valid safetensors file ({exc})") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise CoeffWeightsError(
            f"{path} holds non-finite alpha in {len(bad)} layers (e.g. {bad[0]}); the run that wrote it diverged"
        )
    return tensors


def read_coeff_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a dreamcoeff file on its own (no model): (tensors, metadata).

    `path` may be a training output directory. Raises `CoeffWeightsError` naming the file and problem.
    """
    path = _resolve(path)
    entries, metadata = _validated_entries(path)
    return _load_tensors(path, entries), metadata


def _fit_problems(path: Path, entries: Mapping[str, int], modules: Mapping[str, torch.nn.Module]) -> list[str]:
    """Why a file's entries do not fit the UNet's attention modules (empty when they do)."""
    problems = []
    for key, heads in entries.items():
        module_path = key[len("unet.") : -len(".alpha")]
        module = modules.get(module_path)
        if module is None:
            problems.append(f"{path.name}: {key}: the UNet has no attention module '{module_path}'")
        elif heads != module.heads:
            problems.append(f"{path.name}: {key}: {heads} heads in the file, {module.heads} in the UNet")
    return problems


def _combined(files: Sequence[Path], scales: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k c_k * alpha_k per layer, in float64 then float32 (a layer missing from a file adds 0)."""
    total: dict[str, torch.Tensor] = {}
    for path, c in zip(files, scales):
        for key, tensor in _load_tensors(path, _validated_entries(path)[0]).items():
            total[key] = total.get(key, torch.zeros_like(tensor, dtype=torch.float64)) + float(c) * tensor.double()
    return {key: t.float() for key, t in total.items()}


def load_coeff_weights(
    pipe_or_unet: DiffusionPipeline | UNet2DConditionModel | torch.nn.Module,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    scale: float | Sequence[float] = 1.0,
    target_scales: Mapping[str, float] | None = None,
) -> list[str]:
    """Load an alpha file (or several, combined) into a pipeline or UNet, replacing any alpha it had.

    Every key must name an attention module of the UNet with the same head count; otherwise a
    `CoeffWeightsError` lists all mismatches and the model is left exactly as it was. Afterwards the
    file's modules carry the loaded alpha at strength `scale`, and modules
    not in the file have plain attention. Returns the module paths loaded.

    Several files combine concepts: ``load_coeff_weights(pipe, [dog, hat], scale=[1.0, 0.7])`` gives
    A = I + sum_k c_k * alpha_k in every layer any file covers (a layer a file lacks adds 0); all
    files are checked before anything changes, and the processors then run at strength 1 (the c_k
    are in alpha, so `set_coeff_scale` scales the combination). `target_scales` doses by target
    (see `set_coeff_target_scales`).
    """
    unet = unwrap_unet(pipe_or_unet)
    combine = not isinstance(path, (str, os.PathLike))
    files = [_resolve(p) for p in (path if combine else [path])]
    scales = [float(c) for c in (scale if isinstance(scale, Sequence) else [scale] * len(files))]
    if len(scales) != len(files):
        raise CoeffWeightsError(f"{len(files)} alpha files but {len(scales)} scales: give one scale per file")
    targets = check_target_scales(target_scales)
    modules = attention_modules(unet)
    entries = {f: _validated_entries(f)[0] for f in files}
    problems = [problem for f in files for problem in _fit_problems(f, entries[f], modules)]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        where = str(files[0]) if len(files) == 1 else f"{len(files)} alpha files"
        raise CoeffWeightsError(
            f"{where} do{'es' if len(files) == 1 else ''} not fit this UNet ({len(problems)} of "
            f"{sum(len(e) for e in entries.values())} entries); was it trained on another base model?\n  "
            + "\n  ".join(shown)
        )
    tensors = _combined(files, scales) if combine else _load_tensors(files[0], entries[files[0]])
    wanted = [key[len("unet.") : -len(".alpha")] for key in tensors]
    # From here on nothing can fail on account of the files: replace the model's alpha with them.
    keep = set(wanted)
    if any(p not in keep for p in coeff_modules(unet)):
        remove_coeff(unet)
    install_coeff_processors(unet, wanted)
    installed = coeff_modules(unet)
    with torch.no_grad():
        for module_path in wanted:
            alpha = installed[module_path].head_mix.alpha
            alpha.copy_(tensors[f"unet.{module_path}.alpha"].to(alpha.device, alpha.dtype))
    set_coeff_strength(unet, CoeffStrength(1.0 if combine else scales[0], targets))
    return wanted


def init_coeff_from(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Start the alpha a training run installed from an earlier run's file (``--init_coeff_weights``).

    Unlike `load_coeff_weights` the processors stay the run's own (its targets, coefficient dropout,
    chunking): the file must cover exactly the modules that train alpha, with the same head counts,
    else a `CoeffWeightsError` says what differs and nothing changes. Returns the file read."""
    file = _resolve(path)
    entries, _ = _validated_entries(file)
    installed = coeff_modules(unwrap_unet(unet))
    problems = _fit_problems(file, entries, attention_modules(unwrap_unet(unet)))
    in_file = {key[len("unet.") : -len(".alpha")] for key in entries}
    missing, extra = sorted(set(installed) - in_file), sorted(in_file - set(installed))
    if missing:
        problems.append(f"{len(missing)} layers that train alpha are not in the file (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} layers in the file do not train alpha in this run (e.g. {extra[0]})")
    if problems:
        raise CoeffWeightsError(
            f"{file} does not fit this run ({'; '.join(problems[:3])}): another base model, or other "
            "--coeff_targets than the run that wrote it?"
        )
    tensors = _load_tensors(file, entries)
    with torch.no_grad():
        for module_path, module in installed.items():
            alpha = module.head_mix.alpha
            alpha.copy_(tensors[f"unet.{module_path}.alpha"].to(alpha.device, alpha.dtype))
    return file
