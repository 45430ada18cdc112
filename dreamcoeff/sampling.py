"""Prompt-grid sampling: what did each run learn, on the same prompts and the same noise.

One base SDXL pipeline is loaded once. Each *run* (a training output: an alpha file, a LoRA file, or
both) becomes one or more *rows*; every row renders every prompt for every seed from the same initial
latents, so that the differences between rows come from the method alone:

    base              the pre-trained model (``include_base``)
    coeff             alpha at strength 1 (or ``coeff@0.5`` ... with a ``coeff_scales`` sweep)
    lora              the LoRA adapter
    both              alpha and LoRA together

Switching between rows never reloads the base model. Every run's LoRA is loaded once, up front, as its
own PEFT adapter and switched with ``set_adapters`` / ``disable_lora`` (a disabled PEFT layer computes
exactly ``base_layer(x)``, so the base row after a LoRA row is bit-identical to the one before). Alpha
is installed per row from its file (a few hundred KB at most) and removed again for rows without it.

Everything is validated before the first image: missing paths, files for another architecture (the
error names the run), empty prompt files, unknown placeholders, duplicated names.

Also here: :func:`make_grid` (labelled comparison grids, reused by the trainer's demo), the output
writers (grids, ``index.html``, ``manifest.json``). The DreamBooth paper's metrics (CLIP-T, CLIP-I,
DINO) and their CSVs are in :mod:`dreamcoeff.metrics`.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import math
import re
import string
import sys
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from .models import FULL_UNET_DIR, LORA_WEIGHTS_NAME
from .processor import coeff_modules, coeff_parameters, remove_coeff, set_coeff_scale, unwrap_unet
from .weights import COEFF_WEIGHTS_NAME, CoeffWeightsError, load_coeff_weights, read_coeff_file

__all__ = [
    "SamplingError",
    "METRIC_NAMES",
    "PLACEHOLDERS",
    "format_prompt",
    "read_prompt_file",
    "RunSpec",
    "parse_run",
    "Row",
    "plan_rows",
    "AdapterSwitcher",
    "ImageRecord",
    "SampleResult",
    "load_base_pipeline",
    "set_scheduler",
    "resolve_scheduler",
    "resolve_dtype",
    "lora_problems",
    "initial_latents",
    "sample_runs",
    "wrap_text",
    "make_grid",
    "save_grids",
    "write_manifest",
    "write_index_html",
]


#: Metric names, as they appear in the manifest, index.html and the CSVs (computed in ``dreamcoeff.metrics``).
METRIC_NAMES = ("clip_t", "clip_i", "dino")


class SamplingError(ValueError):
    """Bad input to the sampler (prompts, runs, weights, settings); the message says what to fix."""


# ----------------------------------------------------------------------------------------------
# Prompts

#: Placeholders a prompt may use: ``{token}`` (the rare identifier, e.g. "sks") and ``{class}``.
PLACEHOLDERS = ("token", "class")


def format_prompt(template: str, token: str | None = None, class_name: str | None = None, where: str = "prompt") -> str:
    """Fill ``{token}`` and ``{class}`` in a prompt template; whitespace runs collapse to one space.

    ``{{`` and ``}}`` are literal braces. Raises :class:`SamplingError` naming ``where`` (for example
    ``prompts.txt:3``) for an unknown placeholder, unbalanced braces, or a placeholder whose value
    was not given.
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise SamplingError(f"{where}: {exc} in {template!r} (write {{{{ and }}}} for literal braces)") from None
    allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for name in fields:
        if name not in PLACEHOLDERS:
            raise SamplingError(f"{where}: unknown placeholder {{{name}}} in {template!r}; allowed: {allowed}")
    values = {"token": token, "class": class_name}
    flags = {"token": "--token", "class": "--class_name"}
    for name in fields:
        if values[name] is None:
            raise SamplingError(f"{where}: {template!r} uses {{{name}}} but no value was given ({flags[name]})")
    # "{token!r}" and "{class:>5}" parse as the plain names with a conversion / format spec: refuse those too.
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (spec or conversion):
            raise SamplingError(f"{where}: placeholders take no format spec or conversion, in {template!r}")
    return " ".join(template.format(token=token, **{"class": class_name}).split())


def read_prompt_file(path: str | Path, token: str | None, class_name: str | None) -> list[str]:
    """Read one prompt per line, filling ``{token}`` / ``{class}``.

    Blank lines and lines whose first non-blank character is ``#`` are skipped. Raises
    :class:`SamplingError` for a missing or unreadable file, a file without prompts, or a bad line
    (the message gives ``file:line``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SamplingError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise SamplingError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise SamplingError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SamplingError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(format_prompt(line, token, class_name, where=f"{path}:{lineno}"))
    if not prompts:
        raise SamplingError(f"prompt file {path} holds no prompts (only blank lines and # comments)")
    return prompts


# ----------------------------------------------------------------------------------------------
# Runs and rows

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunSpec:
    """One training result to compare: an alpha file, a LoRA file, both, or a fully fine-tuned UNet.

    Attributes:
        name: row name (letters, digits, ``._-``; ``@`` is reserved for strength-sweep rows).
        alpha_path: ``coeff_weights.safetensors`` (Coeff-Tuning alpha) or None.
        lora_path: diffusers SDXL LoRA file (``pytorch_lora_weights.safetensors``) or None.
        unet_path: the ``unet/`` folder of a ``--tuning full`` run (a UNet saved with
            ``save_pretrained``) or None; it replaces the base UNet for this run's rows.
        source: the training output directory the files were found in, if one was given.
    """

    name: str
    alpha_path: Path | None = None
    lora_path: Path | None = None
    source: Path | None = None
    unet_path: Path | None = None

    @property
    def kind(self) -> str:
        """"alpha", "lora", "alpha+lora" or "unet"."""
        parts = (("alpha", self.alpha_path), ("lora", self.lora_path), ("unet", self.unet_path))
        return "+".join(k for k, p in parts if p is not None)

    def training_args(self) -> dict[str, Any] | None:
        """The run's ``args.json`` (beside its weights), or None if absent / unreadable."""
        files = (self.alpha_path, self.lora_path, self.unet_path.parent if self.unet_path else None)
        folders = [self.source] if self.source else [p.parent for p in files if p]
        for folder in folders:
            try:
                return json.loads((folder / "args.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        return None


def _check_name(name: str, what: str = "run name") -> str:
    if not _NAME_RE.fullmatch(name):
        raise SamplingError(
            f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _weights_kind(path: Path) -> str:
    """'alpha' or 'lora' from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            keys = list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SamplingError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") == "dreamcoeff":
        return "alpha"
    if any("lora" in k for k in keys):
        return "lora"
    raise SamplingError(f"{path} is neither a dreamcoeff alpha file nor a LoRA file (keys such as {keys[:2]})")


def parse_run(spec: str) -> RunSpec:
    """Parse ``name=path[,path2]`` (or a bare ``path``, named after its folder) into a :class:`RunSpec`.

    A path may be a training output directory (holding ``coeff_weights.safetensors`` and/or
    ``pytorch_lora_weights.safetensors``, or the ``unet/`` folder of ``--tuning full``) or a weight
    file; files are told apart by their header.
    Raises :class:`SamplingError` naming the run for missing paths and folders without weights.
    """
    name, sep, paths_text = spec.partition("=")
    if not sep or (not _NAME_RE.fullmatch(name) and Path(spec.split(",")[0]).exists()):
        paths_text, name = spec, ""  # a bare path (which may itself contain "=")
    paths = [Path(p.strip()) for p in paths_text.split(",") if p.strip()]
    if not paths:
        raise SamplingError(f"--run {spec!r}: no path; use NAME=PATH (a training output folder or weight file)")
    if not name:
        first = paths[0]
        name = first.name if first.is_dir() or not first.suffix else first.parent.name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "run"
    name = _check_name(name.strip())
    alpha = lora = source = unet = None
    for path in paths:
        if not path.exists():
            raise SamplingError(f"run {name!r}: {path} does not exist")
        if path.is_dir():
            found = [(k, path / f) for k, f in (("alpha", COEFF_WEIGHTS_NAME), ("lora", LORA_WEIGHTS_NAME)) if (path / f).is_file()]
            if (path / FULL_UNET_DIR / "config.json").is_file():
                found.append(("unet", path / FULL_UNET_DIR))
            if not found:
                raise SamplingError(
                    f"run {name!r}: {path} holds neither {COEFF_WEIGHTS_NAME} nor {LORA_WEIGHTS_NAME} nor a "
                    f"{FULL_UNET_DIR}/ folder (has the training finished? checkpoints live in checkpoint-* subfolders)"
                )
            source = source or path
        else:
            found = [(_weights_kind(path), path)]
        for kind, file in found:
            if kind == "unet":
                unet = file
            elif kind == "alpha":
                if alpha is not None:
                    raise SamplingError(f"run {name!r}: two alpha files ({alpha}, {file}); give one per run")
                alpha = file
            else:
                if lora is not None:
                    raise SamplingError(f"run {name!r}: two LoRA files ({lora}, {file}); give one per run")
                lora = file
    if unet is not None and (alpha is not None or lora is not None):
        raise SamplingError(f"run {name!r}: a fully fine-tuned UNet ({unet}) cannot be combined with alpha or LoRA "
                            "files in one run; give them as separate runs")
    return RunSpec(name=name, alpha_path=alpha, lora_path=lora, source=source, unet_path=unet)


@dataclass(frozen=True)
class Row:
    """One row of the comparison: the base model, or a run at one alpha strength.

    ``coeff_scale`` is the alpha strength c (None where the row has no alpha).
    """

    name: str
    run: RunSpec | None = None
    coeff_scale: float | None = None

    @property
    def has_lora(self) -> bool:
        return self.run is not None and self.run.lora_path is not None

    @property
    def slug(self) -> str:
        """File-name form of the name ("coeff@0.5" -> "coeff_c0.5")."""
        return self.name.replace("@", "_c")

    @property
    def description(self) -> str:
        if self.run is None:
            return "base model"
        parts = []
        if self.coeff_scale is not None:
            parts.append(f"alpha c={self.coeff_scale:g}")
        if self.has_lora:
            parts.append("LoRA")
        if self.run.unet_path is not None:
            parts.append("full UNet")
        return " + ".join(parts)

    @property
    def label(self) -> str:
        """Two-line grid label: name, then what the row applies."""
        return f"{self.name}\n{self.description}"


def plan_rows(
    runs: Sequence[RunSpec], include_base: bool = False, coeff_scales: Sequence[float] | None = None
) -> list[Row]:
    """The rows to render, in order: base first (if asked), then each run.

    A run with alpha gets one row per ``coeff_scales`` entry (named ``name@scale``), or a single row
    at strength 1 without a sweep. Raises :class:`SamplingError` for duplicated names, a run named
    "base" beside the base row, a sweep without any alpha run, or nothing to render.
    """
    seen: set[str] = set()
    for run in runs:
        _check_name(run.name)
        if run.name in seen:
            raise SamplingError(f"run name {run.name!r} is given twice; every --run needs its own name")
        seen.add(run.name)
        if run.alpha_path is None and run.lora_path is None and run.unet_path is None:
            raise SamplingError(f"run {run.name!r} has no weights")
    if include_base and "base" in seen:
        raise SamplingError("run name 'base' is taken by --include_base's row; rename the run")
    scales = None if coeff_scales is None else [float(s) for s in coeff_scales]
    if scales is not None:
        if not scales:
            raise SamplingError("--coeff_scales needs at least one value")
        if len(set(scales)) != len(scales):
            raise SamplingError(f"--coeff_scales has repeated values: {scales}")
        if not all(math.isfinite(s) for s in scales):
            raise SamplingError(f"--coeff_scales must be finite numbers: {scales}")
        if not any(r.alpha_path for r in runs):
            raise SamplingError("--coeff_scales sweeps alpha strength, but no run has an alpha file")
    rows = [Row("base")] if include_base else []
    for run in runs:
        if run.alpha_path is None:
            rows.append(Row(run.name, run, None))
        elif scales is None:
            rows.append(Row(run.name, run, 1.0))
        else:
            rows.extend(Row(f"{run.name}@{s:g}", run, s) for s in scales)
    if not rows:
        raise SamplingError("nothing to sample: give at least one --run, or --include_base")
    slugs = [r.slug for r in rows]
    dupes = sorted({s for s in slugs if slugs.count(s) > 1})
    if dupes:
        raise SamplingError(f"rows would share file names {dupes}; rename the runs")
    return rows


# ----------------------------------------------------------------------------------------------
# Switching adapters on one pipeline


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora[._](?:down|up|A|B)|lora_linear_layer\.(?:down|up)|lora_magnitude_vector)")


def lora_problems(unet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Mismatches between a LoRA state dict (diffusers format, ``unet.`` prefix) and a UNet.

    Every ``unet.`` key must name a Linear or Conv2d module of the UNet, with a down (A) matrix whose
    input size and an up (B) matrix whose output size fit that module. Returns readable problems
    (empty list: it fits). Text-encoder keys are left to diffusers.
    """
    modules = dict(unwrap_unet(unet).named_modules())
    problems = []
    for key, tensor in state_dict.items():
        if not key.startswith("unet."):
            continue
        match = _LORA_KEY.match(key[len("unet."):])
        if not match:
            problems.append(f"{key}: not a LoRA key diffusers understands")
            continue
        path = match.group("module")
        module = modules.get(path)
        if module is None:
            problems.append(f"{key}: the UNet has no module '{path}'")
            continue
        base = getattr(module, "base_layer", module)  # an already-injected PEFT layer wraps the original
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4):
            problems.append(f"{key}: '{path}' is a {type(base).__name__}, not a Linear or Conv2d layer")
            continue
        out_features, in_features = weight.shape[:2]
        rest = key[len("unet.") + match.end("module"):]
        is_down = any(t in rest for t in ("down", "lora_A", "lora.A"))
        is_up = any(t in rest for t in ("up", "lora_B", "lora.B"))
        if tensor.ndim >= 2 and is_down and tensor.shape[1] != in_features:
            problems.append(f"{key}: input size {tensor.shape[1]}, but '{path}' takes {in_features}")
        elif tensor.ndim >= 2 and is_up and tensor.shape[0] != out_features:
            problems.append(f"{key}: output size {tensor.shape[0]}, but '{path}' gives {out_features}")
    return problems


@contextlib.contextmanager
def _quiet_lora_loading() -> Iterator[None]:
    """Silence diffusers' "no LoRA keys for the text encoder" and PEFT's "multiple adapters" notices."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Already found a `peft_config` attribute.*")
            yield
    finally:
        dlogging.set_verbosity(level)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def _quiet_diffusers_noise() -> Iterator[None]:
    """Drop diffusers' per-call chatter that says nothing to a user of this tool: with a float16
    SDXL VAE (force_upcast) every decode casts it to float32 and back, logging a warning each time,
    and 0.42 deprecates the ``torch_dtype`` argument that older releases need."""
    drop = _DropMessages("should be kept in float32")
    target = logging.getLogger("diffusers.models.modeling_utils")
    target.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`upcast_vae` is deprecated.*")
            warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated.*")
            yield
    finally:
        target.removeFilter(drop)


def _freeze(pipe) -> None:
    """requires_grad=False on every model of the pipeline (and on loaded alpha).

    Not only tidy: PyTorch's CPU matmul picks a different kernel for ``F.linear`` when the weight
    requires grad (measured: 7e-7 differences on non-contiguous inputs), and PEFT freezes the base
    model when it injects a LoRA. Freezing everything before the first row keeps the base row after
    a LoRA row bit-identical to the one before it.
    """
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    for p in coeff_parameters(pipe):
        p.requires_grad_(False)


class AdapterSwitcher:
    """Holds every run's adapters on one pipeline and puts exactly one row's adapters in place.

    On construction: any alpha already on the pipeline is removed (sampling starts from the base
    model), every alpha file is loaded once into the pipeline and removed again (all-or-nothing
    validation against this UNet), every LoRA file's keys are checked against the UNet, and only
    then is each LoRA loaded as its own PEFT adapter (then disabled). A fully fine-tuned UNet
    (``--tuning full``) is loaded once, checked against the base UNet's config, kept on the CPU and
    swapped in for its rows only. Errors are :class:`SamplingError` naming the run. :meth:`close`
    deletes the adapters again and puts the base UNet back.
    """

    def __init__(self, pipe, runs: Sequence[RunSpec]):
        started = time.perf_counter()
        self.pipe = pipe
        self.runs = {r.name: r for r in runs}
        self.adapter_names: dict[str, str] = {}
        self.weights: dict[str, dict[str, Any]] = {}
        self._alpha_run: str | None = None
        self.base_unet = pipe.unet
        self.full_unets: dict[str, torch.nn.Module] = {}
        if coeff_modules(pipe):
            remove_coeff(pipe)
        _freeze(pipe)
        for run in runs:
            self.weights[run.name] = {"kind": run.kind, "source": str(run.source.resolve()) if run.source else None}
            if run.alpha_path is not None:
                self.weights[run.name]["alpha"] = self._check_alpha(run)
            if run.unet_path is not None:
                self.weights[run.name]["unet"] = self._load_full_unet(run)
        loras = [r for r in runs if r.lora_path is not None]
        infos = {r.name: self._check_lora(r) for r in loras}  # every file checked before any is loaded
        existing = set(self._list_adapters())
        try:
            for run in loras:
                info = infos[run.name]
                adapter = f"dreamcoeff_{re.sub(r'[^A-Za-z0-9_]', '_', run.name)}_{info['sha256'][:8]}"
                if adapter not in existing:
                    try:
                        with _quiet_lora_loading():
                            pipe.load_lora_weights(str(run.lora_path), adapter_name=adapter)
                    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
                        raise SamplingError(f"run {run.name!r}: LoRA {run.lora_path} could not be loaded: {exc}") from exc
                self.adapter_names[run.name] = adapter
                self.weights[run.name]["lora"] = {**info, "adapter_name": adapter}
        except BaseException:
            self.close()  # leave the pipeline as it came
            raise
        _freeze(pipe)  # the LoRA matrices too (see _freeze)
        self.reset()
        self.prepare_seconds = time.perf_counter() - started

    def _list_adapters(self) -> list[str]:
        try:
            return sorted({a for names in self.pipe.get_list_adapters().values() for a in names})
        except (ValueError, AttributeError):  # no PEFT layers yet
            return []

    def _check_alpha(self, run: RunSpec) -> dict[str, Any]:
        try:
            tensors, metadata = read_coeff_file(run.alpha_path)
            layers = load_coeff_weights(self.pipe, run.alpha_path, scale=1.0)
        except CoeffWeightsError as exc:
            raise SamplingError(f"run {run.name!r}: {exc}") from None
        finally:
            remove_coeff(self.pipe)
        training_args = metadata.get("training_args")
        return {
            "path": str(run.alpha_path.resolve()),
            "sha256": _sha256(run.alpha_path),
            "bytes": run.alpha_path.stat().st_size,
            "layers": len(layers),
            "coefficients": int(sum(t.numel() for t in tensors.values())),
            "max_abs_alpha": float(max(t.abs().max() for t in tensors.values())),
            "metadata": {k: v for k, v in metadata.items() if k != "training_args"},
            "has_training_args": training_args is not None,
        }

    def _load_full_unet(self, run: RunSpec) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        if getattr(self.base_unet, "_hf_hook", None) is not None:
            raise SamplingError(f"run {run.name!r} is a full UNet fine-tune, which cannot be swapped into a pipeline "
                                "with CPU offload; drop --cpu_offload")
        path = run.unet_path
        weights = path / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise SamplingError(f"run {run.name!r}: {path} has no diffusion_pytorch_model.safetensors")
        volatile = ("_name_or_path", "_diffusers_version", "_use_default_values")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SamplingError(f"run {run.name!r}: {path / 'config.json'} is unreadable: {exc}") from None
        base = {k: v for k, v in unwrap_unet(self.base_unet).config.items() if k not in volatile}
        differ = sorted(k for k in base if k in config and _jsonable(config[k]) != _jsonable(base[k]))
        if differ:
            raise SamplingError(f"run {run.name!r}: the UNet in {path} has another architecture than the base model's "
                                f"({', '.join(differ[:5])} differ); was it trained on another base model?")
        try:
            with _quiet_diffusers_noise():
                unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=self.base_unet.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SamplingError(f"run {run.name!r}: the UNet in {path} could not be loaded: {exc}") from None
        unet.eval().requires_grad_(False)
        self.full_unets[run.name] = unet
        return {"path": str(path.resolve()), "sha256": _sha256(weights), "bytes": weights.stat().st_size,
                "parameters": sum(p.numel() for p in unet.parameters())}

    def _use_unet(self, unet: torch.nn.Module) -> None:
        """Make ``unet`` the pipeline's UNet: a swapped-in full UNet lives on the pipeline's device only
        while its rows render, and goes back to the CPU afterwards."""
        current = self.pipe.unet
        if current is unet:
            return
        if current is not self.base_unet:
            current.to("cpu")
        if unet is not self.base_unet:
            unet.to(self.base_unet.device)
        self.pipe.unet = unet

    def _check_lora(self, run: RunSpec) -> dict[str, Any]:
        path = run.lora_path
        if path.suffix != ".safetensors":
            raise SamplingError(f"run {run.name!r}: {path} is not a .safetensors file (pickle files are not loaded)")
        try:
            with _quiet_lora_loading():
                # diffusers' own reader: converts kohya / older layouts to its key format.
                state, _ = self.pipe.lora_state_dict(str(path))
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise SamplingError(f"run {run.name!r}: {path} is not a LoRA file diffusers can read: {exc}") from None
        if not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in state):
            raise SamplingError(f"run {run.name!r}: {path} holds no LoRA weights for the UNet or text encoders")
        problems = lora_problems(self.pipe.unet, state)
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise SamplingError(
                f"run {run.name!r}: LoRA {path} does not fit this UNet ({len(problems)} problem(s)); "
                "was it trained on another base model?\n  " + "\n  ".join(shown)
            )
        ranks = sorted({int(v.shape[0]) for k, v in state.items() if re.search(r"lora[._](down|A)\b", k) and v.ndim >= 2})
        return {
            "path": str(path.resolve()),
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "tensors": len(state),
            "modules": len({k.split(".lora", 1)[0] for k in state}),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
        }

    def reset(self) -> None:
        """The base model: its own UNet, no alpha, every LoRA disabled."""
        self._use_unet(self.base_unet)
        if coeff_modules(self.pipe):
            remove_coeff(self.pipe)
        self._alpha_run = None
        if self.adapter_names:
            self.pipe.disable_lora()

    def activate(self, row: Row, lora_scale: float = 1.0) -> None:
        """Put exactly this row's adapters in place (alpha at ``row.coeff_scale``, its LoRA or none)."""
        run = row.run
        self._use_unet(self.base_unet)  # adapters are switched on the base UNet, a full UNet swapped in last
        if row.has_lora:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.adapter_names[run.name]], adapter_weights=[float(lora_scale)])
        elif self.adapter_names:
            self.pipe.disable_lora()
        if run is not None and row.coeff_scale is not None:
            if self._alpha_run == run.name:
                set_coeff_scale(self.pipe, row.coeff_scale)
            else:
                try:
                    load_coeff_weights(self.pipe, run.alpha_path, scale=row.coeff_scale)
                except CoeffWeightsError as exc:  # the file changed since it was checked
                    raise SamplingError(f"run {run.name!r}: {exc}") from None
                self._alpha_run = run.name
                _freeze(self.pipe)
        elif coeff_modules(self.pipe):
            remove_coeff(self.pipe)
            self._alpha_run = None
        if run is not None and run.unet_path is not None:
            self._use_unet(self.full_unets[run.name])

    def close(self) -> None:
        """Back to the base model, with this switcher's LoRA adapters deleted."""
        self.reset()
        self.full_unets = {}
        if self.adapter_names:
            self.pipe.enable_lora()
            self.pipe.delete_adapters(list(self.adapter_names.values()))
            self.adapter_names = {}


# ----------------------------------------------------------------------------------------------
# Loading the base pipeline

#: Short scheduler names for ``set_scheduler`` (any diffusers scheduler class name works too).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def resolve_scheduler(name: str) -> tuple[type, dict[str, Any]]:
    """The diffusers scheduler class and config overrides for ``name`` (a key of :data:`SCHEDULERS`
    or a diffusers class name such as ``DPMSolverMultistepScheduler``)."""
    import diffusers

    cls_name, overrides = SCHEDULERS.get(name.lower(), (name, {}))
    cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
    if cls is None:
        raise SamplingError(f"unknown --scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name")
    return cls, overrides


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (see :func:`resolve_scheduler`), keeping the
    model's noise schedule config (betas, timestep spacing, prediction type)."""
    cls, overrides = resolve_scheduler(name)
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    except ImportError as exc:
        raise SamplingError(f"--scheduler {name}: {exc}") from None


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """"auto" is float16 on CUDA and float32 elsewhere; else fp32 / fp16 / bf16."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise SamplingError(f"unknown --dtype {name!r}; use auto, fp32, fp16 or bf16")
    return _DTYPES[name]


def load_base_pipeline(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cpu_offload: bool = False,
    scheduler: str | None = None,
):
    """Load an SDXL pipeline (hub id or local folder) for sampling: eval mode, frozen, no watermark.

    ``cpu_offload`` keeps each model on the CPU until it runs (``enable_model_cpu_offload``; CUDA),
    else the whole pipeline moves to ``device``. Raises :class:`SamplingError` with the reason when
    the model cannot be loaded or is not SDXL.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from .models import ModelError, check_sdxl_folder

    try:
        check_sdxl_folder(name_or_path)
    except ModelError as exc:
        raise SamplingError(str(exc)) from None
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "revision": revision, "variant": variant}
    try:
        if vae:
            with _quiet_diffusers_noise():
                kwargs["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, revision=revision)
        # No invisible watermark: it would perturb exactly the pixels the comparison is about.
        with _quiet_diffusers_noise():
            pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, add_watermarker=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise SamplingError(f"could not load the base model {name_or_path}: {exc}") from None
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        raise SamplingError(f"{name_or_path}: the UNet has no text_time conditioning, so it is not SDXL")
    if scheduler:
        set_scheduler(pipe, scheduler)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval()
    _freeze(pipe)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclass
class ImageRecord:
    """One generated image: which row, prompt and seed, and where it was written."""

    row: str
    run: str | None
    coeff_scale: float | None
    lora: bool
    prompt_index: int
    prompt: str
    seed: int
    file: str | None = None  # relative to the output directory
    image: Image.Image | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("row", "run", "coeff_scale", "lora", "prompt_index", "prompt", "seed", "file")}


@dataclass
class SampleResult:
    """What :func:`sample_runs` made: rows x prompts x seeds images and how they were made."""

    rows: list[Row]
    prompts: list[str]
    seeds: list[int]
    records: list[ImageRecord]
    settings: dict[str, Any]
    weights: dict[str, dict[str, Any]]
    timing: dict[str, Any]
    output_dir: Path | None = None

    def image(self, record: ImageRecord) -> Image.Image:
        """The record's image, from memory or from its file."""
        if record.image is not None:
            return record.image
        if record.file is None or self.output_dir is None:
            raise ValueError(f"image of {record.row} p{record.prompt_index} seed {record.seed} was not kept")
        with Image.open(self.output_dir / record.file) as img:
            return img.convert("RGB")

    def find(self, row: str, prompt_index: int, seed: int) -> ImageRecord:
        for r in self.records:
            if (r.row, r.prompt_index, r.seed) == (row, prompt_index, seed):
                return r
        raise KeyError((row, prompt_index, seed))

    def grid_rows(self, seed: int) -> list[list[ImageRecord]]:
        """Records of one seed as rows (in row order) x prompts."""
        index = {(r.row, r.prompt_index): r for r in self.records if r.seed == seed}
        return [[index[(row.name, p)] for p in range(len(self.prompts))] for row in self.rows]


def initial_latents(pipe, seed: int, height: int, width: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise for ``seed`` and the CPU generator that drew it (for later step noise).

    Drawn exactly as diffusers draws it from ``generator=torch.Generator().manual_seed(seed)``, so a
    row without adapters reproduces ``pipe(prompt, generator=...)`` and does not depend on the device,
    the batch size or which other prompts, seeds or rows are rendered.
    """
    dtype = dtype or pipe.unet.dtype
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=dtype), generator


def _sync(pipe) -> None:
    device = getattr(pipe, "_execution_device", None)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="img", desc="sampling", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def sample_runs(
    pipe,
    runs: Sequence[RunSpec],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    include_base: bool = False,
    coeff_scales: Sequence[float] | None = None,
    lora_scale: float = 1.0,
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    output_dir: str | Path | None = None,
    keep_images: bool | None = None,
    progress: bool = True,
    switcher: AdapterSwitcher | None = None,
) -> SampleResult:
    """Render every prompt for every seed with every run's adapters, from shared initial noise.

    Args:
        pipe: a base ``StableDiffusionXLPipeline`` (any alpha on it is removed first; its models are
            frozen). Left as the base model afterwards, with the LoRA adapters loaded here deleted.
        runs: the runs to compare (see :func:`parse_run`); rows come from :func:`plan_rows`.
        prompts: final prompt texts (placeholders already filled, see :func:`read_prompt_file`).
        seeds: one image per prompt per seed per row; the seed fixes the initial latents and any
            step noise (ancestral schedulers), identically for every row.
        include_base / coeff_scales: a base row first / an alpha strength sweep for alpha runs.
        lora_scale: strength of the LoRA adapters.
        height / width: default to the pipeline's default size (1024 for SDXL base).
        batch_size: images per pipeline call (every row uses the same batches).
        output_dir: where to write ``images/<row>_p<prompt>_s<seed>.png`` as they are made.
        keep_images: keep PIL images in the records (default: only when nothing is written).
        switcher: an :class:`AdapterSwitcher` already built on ``pipe`` for ``runs`` (to validate
            the weights before other work); built here otherwise. Closed at the end either way.

    Everything (rows, weights of every run against this UNet, sizes) is validated before the first
    image; errors are :class:`SamplingError`.
    """
    try:  # a switcher handed in is closed on bad input too
        prompts = list(prompts)
        seeds = [int(s) for s in seeds]
        if not prompts:
            raise SamplingError("no prompts to render")
        if not seeds:
            raise SamplingError("no seeds given")
        if len(set(seeds)) != len(seeds):
            raise SamplingError(f"seeds repeat: {seeds}")
        if batch_size < 1 or num_inference_steps < 1:
            raise SamplingError("batch_size and num_inference_steps must be at least 1")
        factor = pipe.vae_scale_factor
        default_size = pipe.default_sample_size * factor
        height, width = int(height or default_size), int(width or default_size)
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise SamplingError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        rows = plan_rows(runs, include_base, coeff_scales)
    except BaseException:
        if switcher is not None:
            switcher.close()
        raise
    output_dir = Path(output_dir) if output_dir is not None else None
    keep_images = output_dir is None if keep_images is None else keep_images

    if switcher is None:
        switcher = AdapterSwitcher(pipe, runs)
    elif switcher.pipe is not pipe or set(switcher.runs) != {r.name for r in runs}:
        raise ValueError("sample_runs: the switcher was built for another pipeline or other runs")
    started = time.perf_counter()
    digits = max(2, len(str(len(prompts) - 1)))
    if output_dir is not None:
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
    items = [(p, s) for s in seeds for p in range(len(prompts))]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    dtype = pipe.unet.dtype
    records: list[ImageRecord] = []
    row_timing: dict[str, dict[str, float]] = {}
    pipe.set_progress_bar_config(disable=True)
    try:
        with _progress(len(rows) * len(items), progress) as bar, _quiet_diffusers_noise():
            for row in rows:
                t0 = time.perf_counter()
                switcher.activate(row, lora_scale)
                t1 = time.perf_counter()
                if bar is not None:
                    bar.set_postfix_str(row.name)
                for batch in batches:
                    drawn = [initial_latents(pipe, seed, height, width, dtype) for _, seed in batch]
                    out = pipe(
                        prompt=[prompts[p] for p, _ in batch],
                        negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        height=height,
                        width=width,
                        latents=torch.cat([lat for lat, _ in drawn]),
                        generator=[g for _, g in drawn],
                        output_type="pil",
                    )
                    for (p, seed), image in zip(batch, out.images, strict=True):
                        record = ImageRecord(
                            row=row.name, run=row.run.name if row.run else None, coeff_scale=row.coeff_scale,
                            lora=row.has_lora, prompt_index=p, prompt=prompts[p], seed=seed,
                        )
                        if output_dir is not None:
                            record.file = f"images/{row.slug}_p{p:0{digits}d}_s{seed}.png"
                            info = PngInfo()
                            info.add_text("dreamcoeff", json.dumps(record.to_json()))
                            image.save(output_dir / record.file, pnginfo=info)
                        if keep_images:
                            record.image = image
                        records.append(record)
                    if bar is not None:
                        bar.update(len(batch))
                _sync(pipe)
                t2 = time.perf_counter()
                row_timing[row.name] = {
                    "switch_seconds": round(t1 - t0, 4),
                    "sampling_seconds": round(t2 - t1, 4),
                    "seconds_per_image": round((t2 - t1) / len(items), 4),
                }
    finally:
        switcher.close()
    settings = {
        "prompts": prompts,
        "seeds": seeds,
        "include_base": include_base,
        "coeff_scales": None if coeff_scales is None else [float(s) for s in coeff_scales],
        "lora_scale": float(lora_scale),
        "negative_prompt": negative_prompt,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "height": height,
        "width": width,
        "batch_size": int(batch_size),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(getattr(pipe, "_execution_device", pipe.device)),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "latents": "torch.randn on a CPU torch.Generator seeded with the seed, shared by every row",
    }
    timing = {
        "prepare_adapters_seconds": round(switcher.prepare_seconds, 4),
        "sampling_seconds": round(time.perf_counter() - started, 4),
        "rows": row_timing,
    }
    return SampleResult(rows, prompts, seeds, records, settings, switcher.weights, timing, output_dir)


# ----------------------------------------------------------------------------------------------
# Grids


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has a fixed-size bitmap font only
        return ImageFont.load_default()


def wrap_text(text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels (explicit newlines kept, overlong words split)."""
    lines: list[str] = []
    max_width = max(1, int(max_width))
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > max_width:
                cut = max(1, max(k for k in range(1, len(word) + 1) if k == 1 or font.getlength(word[:k]) <= max_width))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _fit_lines(lines: list[str], max_lines: int, font, max_width: int) -> list[str]:
    if len(lines) <= max_lines:
        return lines
    kept = lines[: max(1, max_lines)]
    last = kept[-1]
    while last and font.getlength(last + "...") > max_width:
        last = last[:-1]
    kept[-1] = last + "..."
    return kept


def make_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    tile_size: int | None = None,
    min_tile_size: int = 128,
    max_tile_size: int | None = None,
    font_size: int | None = None,
    gap: int = 4,
    max_label_lines: int = 6,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Lay images out in a labelled grid: ``rows[r][c]`` at row r, column c.

    Args:
        rows: equal-length lists of images (None leaves a grey tile).
        row_labels / col_labels: text drawn left of each row / above each column, word-wrapped to
            the tile width (``\\n`` starts a new line; at most ``max_label_lines`` lines per column).
        title: optional line(s) above everything.
        tile_size: longest side of a tile in pixels. By default the first image's size, upscaled by
            an integer factor (NEAREST: every pixel stays a crisp block) until the longest side is at
            least ``min_tile_size`` (so 64-px images become 128-px tiles and labels stay legible),
            and downscaled (LANCZOS) to ``max_tile_size`` if given. Other sizes keep their aspect
            ratio, centred in the tile.
        font_size: label size in pixels (default: from the tile width, 12-28).

    Returns an RGB image; ``grid.info["grid_layout"]`` holds the geometry (``origin`` of the first
    tile, ``tile_size``, ``gap``), for cropping tiles back out.
    """
    rows = [list(r) for r in rows]
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with at least one image")
    ncols = len(rows[0])
    if any(len(r) != ncols for r in rows):
        raise ValueError(f"make_grid: rows have different lengths {[len(r) for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"make_grid: {len(col_labels)} column labels for {ncols} columns")
    first = next((im for r in rows for im in r if im is not None), None)
    w0, h0 = first.size if first is not None else (min_tile_size, min_tile_size)
    longest = max(w0, h0)
    if tile_size:
        scale = tile_size / longest
    elif longest < min_tile_size:
        scale = math.ceil(min_tile_size / longest)
    elif max_tile_size and longest > max_tile_size:
        scale = max_tile_size / longest
    else:
        scale = 1
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))

    font_size = font_size or max(12, min(28, tw // 12))
    font = _font(font_size)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + max(2, font_size // 6)
    pad = max(3, font_size // 3)

    col_lines = [_fit_lines(wrap_text(t, font, tw - 2 * pad), max_label_lines, font, tw - 2 * pad) for t in col_labels or []]
    header_h = (max(len(ls) for ls in col_lines) * line_h + 2 * pad) if col_lines else 0
    label_w = 0
    row_lines: list[list[str]] = []
    if row_labels is not None:
        natural = max((font.getlength(line) for t in row_labels for line in str(t).split("\n")), default=0)
        label_w = int(min(natural, max(tw, 10 * font_size))) + 2 * pad
        max_row_lines = max(1, th // line_h)
        row_lines = [_fit_lines(wrap_text(t, font, label_w - 2 * pad), max_row_lines, font, label_w - 2 * pad) for t in row_labels]
    x0 = gap + (label_w + gap if label_w else 0)
    width = x0 + ncols * tw + (ncols - 1) * gap + gap
    title_lines = wrap_text(title, font, width - 2 * gap - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title_lines else 0
    y0 = gap + title_h + header_h
    height = y0 + len(rows) * th + (len(rows) - 1) * gap + gap

    grid = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((gap + pad, gap + pad + i * line_h), line, font=font, fill=text_color)
    for c, lines in enumerate(col_lines):
        left = x0 + c * (tw + gap)
        for i, line in enumerate(lines):
            x = left + (tw - font.getlength(line)) / 2
            draw.text((x, gap + title_h + pad + i * line_h), line, font=font, fill=text_color)
    for r, row in enumerate(rows):
        top = y0 + r * (th + gap)
        if row_lines:
            lines = row_lines[r]
            y = top + (th - len(lines) * line_h) / 2
            for i, line in enumerate(lines):
                draw.text((gap + pad, y + i * line_h), line, font=font, fill=text_color)
        for c, im in enumerate(row):
            left = x0 + c * (tw + gap)
            if im is None:
                draw.rectangle([left, top, left + tw - 1, top + th - 1], fill=(224, 224, 224))
                continue
            im = im.convert("RGB")
            if im.size != (tw, th):
                upscale = im.size[0] <= tw and im.size[1] <= th
                im = ImageOps.contain(im, (tw, th), Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS)
            grid.paste(im, (left + (tw - im.size[0]) // 2, top + (th - im.size[1]) // 2))
    grid.info["grid_layout"] = {"origin": (x0, y0), "tile_size": (tw, th), "gap": gap, "rows": len(rows), "cols": ncols}
    return grid


def save_grids(result: SampleResult, output_dir: str | Path, *, max_tile_size: int | None = 256) -> dict[int, str]:
    """One grid PNG per seed (rows = rows, columns = prompts), ``grid_s<seed>.png``.

    Returns ``{seed: file name relative to output_dir}``.
    """
    output_dir = Path(output_dir)
    digits = max(2, len(str(len(result.prompts) - 1)))
    col_labels = [f"p{i:0{digits}d}: {p}" for i, p in enumerate(result.prompts)]
    row_labels = [row.label for row in result.rows]
    grids = {}
    for seed in result.seeds:
        images = [[result.image(rec) for rec in row] for row in result.grid_rows(seed)]
        grid = make_grid(images, row_labels, col_labels, title=f"seed {seed}", max_tile_size=max_tile_size)
        name = f"grid_s{seed}.png"
        grid.save(output_dir / name)
        grids[seed] = name
    return grids


# ----------------------------------------------------------------------------------------------
# Manifest and index.html


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_manifest(
    result: SampleResult,
    output_dir: str | Path,
    grids: Mapping[int, str],
    *,
    settings: Mapping[str, Any] | None = None,
    metrics: Sequence[Mapping[str, float]] | None = None,
    metrics_summary: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json``: settings, runs (weight files, hashes, training args), rows with
    timing, every image (row, prompt, seed, file, metrics) and every grid."""
    import diffusers
    import transformers

    from . import __version__

    images = []
    for i, rec in enumerate(result.records):
        entry = rec.to_json()
        if metrics is not None:
            entry["metrics"] = dict(metrics[i])
        images.append(entry)
    runs = {}
    for row in result.rows:
        if row.run is not None and row.run.name not in runs:
            runs[row.run.name] = {**result.weights.get(row.run.name, {}), "training_args": row.run.training_args()}
    manifest = {
        "tool": "dreamcoeff.sample",
        "versions": {"dreamcoeff": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "settings": {**result.settings, **(settings or {})},
        "runs": runs,
        "rows": [
            {"name": r.name, "run": r.run.name if r.run else None, "coeff_scale": r.coeff_scale, "lora": r.has_lora,
             "description": r.description, **result.timing["rows"].get(r.name, {})}
            for r in result.rows
        ],
        "timing": result.timing,
        "grids": [{"seed": seed, "file": name} for seed, name in grids.items()],
        "images": images,
    }
    if metrics_summary is not None:
        manifest["metrics"] = list(metrics_summary)
    manifest.update(extra or {})
    path = Path(output_dir) / "manifest.json"
    path.write_text(json.dumps(_jsonable(manifest), indent=2) + "\n", encoding="utf-8")
    return path


def _url(path: str) -> str:
    return html.escape(urllib.parse.quote(path), quote=True)


def write_index_html(
    result: SampleResult,
    output_dir: str | Path,
    grids: Mapping[int, str],
    *,
    title: str = "dreamcoeff samples",
    model: str | None = None,
    metrics_summary: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``index.html``: settings, rows, the full prompts, metrics, then per seed the grid and a
    table linking every single image."""
    esc = html.escape
    s = result.settings
    digits = max(2, len(str(len(result.prompts) - 1)))
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:100%}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        "img.grid{max-width:100%;height:auto}img.thumb{width:128px;height:auto;image-rendering:pixelated}"
        "code{background:#f4f4f4}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p>",
    ]
    facts = [
        ("model", model),
        ("size", f"{s['width']}x{s['height']}"),
        ("steps", s["num_inference_steps"]),
        ("guidance", s["guidance_scale"]),
        ("scheduler", s["scheduler"]),
        ("negative prompt", s["negative_prompt"]),
        ("seeds", ", ".join(map(str, result.seeds))),
        ("dtype", s["dtype"]),
    ]
    out.append("<br>".join(f"<b>{esc(k)}</b>: {esc(str(v))}" for k, v in facts if v not in (None, "")))
    out.append("</p><p>Every row starts from the same initial latents for a given seed, so differences come from the weights alone.</p>")
    out.append("<h2>Rows</h2><table><tr><th>row</th><th>applies</th><th>alpha file</th><th>LoRA file</th><th>s / image</th></tr>")
    for row in result.rows:
        weights = result.weights.get(row.run.name, {}) if row.run else {}
        alpha = weights.get("alpha", {}).get("path", "") if row.coeff_scale is not None else ""
        lora = weights.get("lora", {}).get("path", "") if row.has_lora else ""
        per = result.timing["rows"].get(row.name, {}).get("seconds_per_image", "")
        out.append(
            f"<tr><td>{esc(row.name)}</td><td>{esc(row.description)}</td><td><code>{esc(alpha)}</code></td>"
            f"<td><code>{esc(lora)}</code></td><td>{esc(str(per))}</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Prompts</h2><table><tr><th>#</th><th>prompt</th></tr>")
    for i, p in enumerate(result.prompts):
        out.append(f"<tr><td>p{i:0{digits}d}</td><td>{esc(p)}</td></tr>")
    out.append("</table>")
    if metrics_summary:
        names = [m for m in METRIC_NAMES if any(m in r for r in metrics_summary)]
        out.append("<h2>Metrics (mean per row)</h2><table><tr><th>row</th><th>images</th>")
        out.append("".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
        for r in metrics_summary:
            cells = "".join(f"<td>{r[n]:.4f}</td>" if r.get(n) is not None else "<td></td>" for n in names)
            out.append(f"<tr><td>{esc(r['row'])}</td><td>{r['images']}</td>{cells}</tr>")
        out.append("</table><p>CLIP-T: cosine similarity of image and prompt (without the identifier) in CLIP space; "
                   "CLIP-I / DINO: mean cosine similarity to the instance images.</p>")
    for seed in result.seeds:
        out.append(f'<h2 id="seed-{seed}">Seed {seed}</h2>')
        if seed in grids:
            out.append(f'<a href="{_url(grids[seed])}"><img class="grid" src="{_url(grids[seed])}" alt="grid, seed {seed}"></a>')
        out.append(f"<details><summary>Single images, seed {seed}</summary><table><tr><th>row</th>")
        out.append("".join(f'<th title="{esc(p)}">p{i:0{digits}d}</th>' for i, p in enumerate(result.prompts)) + "</tr>")
        for row, records in zip(result.rows, result.grid_rows(seed), strict=True):
            cells = []
            for rec in records:
                if rec.file is None:
                    cells.append("<td></td>")
                    continue
                cells.append(
                    f'<td><a href="{_url(rec.file)}"><img class="thumb" loading="lazy" src="{_url(rec.file)}" '
                    f'title="{esc(rec.prompt)}" alt="{esc(row.name)}, p{rec.prompt_index}, seed {seed}"></a></td>'
                )
            out.append(f"<tr><td>{esc(row.name)}</td>{''.join(cells)}</tr>")
        out.append("</table></details>")
    out.append("</body></html>")
    path = Path(output_dir) / "index.html"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
