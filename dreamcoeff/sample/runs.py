"""Runs and rows: what to compare (``--run`` specs -> :class:`RunSpec`) and in which rows (:func:`plan_rows`).

A *run* is one training result (an alpha file, a LoRA file, both, or a fully fine-tuned UNet, each
optionally with learned identifier tokens, ``<name>_emb.safetensors``); a *row* is the base model or
one run at one alpha strength. Finding and telling apart a run's files is the run loader's job
(:func:`dreamcoeff.loading.read_run`), not this module's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..loading import RunFiles, RunLoadError, read_run
from ..tokens import TokenError
from ..weights import COEFF_WEIGHTS_NAME
from .errors import SamplingError

__all__ = ["RunSpec", "parse_run", "Row", "plan_rows", "parse_target_scales", "check_target_scales_for"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunSpec:
    """One training result to compare: an alpha file, a LoRA file, both, or a fully fine-tuned UNet,
    each with or without learned tokens (or the learned tokens alone).

    Attributes:
        name: row name (letters, digits, ``._-``; ``@`` is reserved for strength-sweep rows).
        alpha_path: ``coeff_weights.safetensors`` (Coeff-Tuning alpha) or None.
        lora_path: diffusers SDXL LoRA file (``pytorch_lora_weights.safetensors``) or None.
        unet_path: the ``unet/`` folder of a ``--tuning full`` run (a UNet saved with
            ``save_pretrained``) or None; it replaces the base UNet for this run's rows.
        source: the training output directory the files were found in, if one was given.
        emb_path: the learned identifier tokens (``<name>_emb.safetensors``, ``clip_l`` / ``clip_g``
            rows for both text encoders) or None; loaded for this run's rows only.
        alpha_mix: combined concepts, ``((file, c), ...)``: several alpha files installed together as
            A = I + sum_k c_k alpha_k (``NAME=dog.safetensors+hat.safetensors@0.7``); then
            ``alpha_path`` is None. Empty for a run with one alpha file or none.
    """

    name: str
    alpha_path: Path | None = None
    lora_path: Path | None = None
    source: Path | None = None
    unet_path: Path | None = None
    emb_path: Path | None = None
    alpha_mix: tuple[tuple[Path, float], ...] = ()

    @property
    def has_alpha(self) -> bool:
        """Whether the run has alpha: one file, or several combined (``alpha_mix``)."""
        return self.alpha_path is not None or bool(self.alpha_mix)

    @property
    def kind(self) -> str:
        """ "alpha", "lora", "alpha+lora" or "unet", with "+tokens" for learned tokens ("tokens" alone)."""
        parts = (
            ("alpha", self.alpha_path or (self.alpha_mix[0][0] if self.alpha_mix else None)),
            ("lora", self.lora_path),
            ("unet", self.unet_path),
            ("tokens", self.emb_path),
        )
        return "+".join(k for k, p in parts if p is not None)

    @property
    def files(self) -> RunFiles:
        """The run's files as the run loader holds them (what `dreamcoeff.loading` reads and installs)."""
        return RunFiles(self.alpha_path, self.lora_path, self.unet_path, self.emb_path, self.alpha_mix, self.source)

    def learned_tokens(self) -> tuple[list[str], dict[str, str]]:
        """``(["<s0>", "<s1>"], {"TOK": "<s0><s1>"})``: the token strings of the run's embeddings file
        and its abstractions (empty where the file has none); ``([], {})`` without learned tokens.
        The file is read and checked (both keys, finite); :class:`SamplingError` names the run."""
        try:
            return self.files.learned_tokens()
        except TokenError as exc:
            raise SamplingError(f"run {self.name!r}: {exc}") from None

    def learned_token(self) -> str | None:
        """What ``{token}`` becomes in this run's prompts: the tokens of its first abstraction
        (``<s0><s1>``), else all its token strings joined; None without learned tokens."""
        tokens, abstractions = self.learned_tokens()
        if abstractions:
            return next(iter(abstractions.values()))
        return "".join(tokens) or None

    def training_args(self) -> dict[str, Any] | None:
        """The run's ``args.json`` (beside its weights), or None if absent / unreadable."""
        return self.files.training_args()


def _check_name(name: str, what: str = "run name") -> str:
    if not _NAME_RE.fullmatch(name):
        raise SamplingError(
            f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _split_spec(spec: str) -> tuple[str, list[Path]]:
    """``name=path[,path2]`` -> (name, paths), the name derived from the first path when not given."""
    name, sep, paths_text = spec.partition("=")
    if not sep or (not _NAME_RE.fullmatch(name) and Path(spec.split(",")[0]).exists()):
        paths_text, name = spec, ""  # a bare path (which may itself contain "=")
    paths = [Path(p.strip()) for p in paths_text.split(",") if p.strip()]
    if not paths:
        raise SamplingError(f"--run {spec!r}: no path; use NAME=PATH (a training output folder or weight file)")
    if not name:
        if any(_is_mix(p) for p in paths):
            raise SamplingError(
                f"--run {spec!r}: combined alpha files need a row name: NAME=A.safetensors+B.safetensors"
            )
        first = paths[0]
        name = first.name if first.is_dir() or not first.suffix else first.parent.name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "run"
    return _check_name(name.strip()), paths


def _files_of(name: str, path: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the weights a ``--run`` path gives: a training output folder's trained
    files or a weight file told apart by its header (:func:`dreamcoeff.loading.read_run`)."""
    try:
        return read_run(path).found()
    except RunLoadError as exc:
        raise SamplingError(f"run {name!r}: {exc}") from None


def _is_mix(path: Path) -> bool:
    """Whether a ``--run`` path is a combination ``A+B`` / ``A@c`` rather than a path that exists as written."""
    return not path.exists() and ("+" in str(path) or "@" in str(path))


def _mix_part(name: str, part: str) -> tuple[Path, float]:
    """One ``file[@c]`` of a combination: the alpha file (a run folder gives its alpha) and its strength."""
    path, strength = Path(part), 1.0
    if not path.exists() and "@" in part:
        head, _, tail = part.rpartition("@")
        try:
            strength = float(tail)
        except ValueError:
            raise SamplingError(
                f"run {name!r}: {part} does not exist (and {tail!r} is not a strength: write FILE@0.7)"
            ) from None
        if not math.isfinite(strength):
            raise SamplingError(f"run {name!r}: strength {tail!r} of {head} must be a finite number")
        path = Path(head)
    alphas = [file for kind, file in _files_of(name, path) if kind == "alpha"]
    if not alphas:
        raise SamplingError(
            f"run {name!r}: {path} holds no alpha ({COEFF_WEIGHTS_NAME}); only alpha files combine with '+'"
        )
    return alphas[0], strength


def _parse_mix(name: str, path: Path) -> tuple[tuple[Path, float], ...]:
    """``a.safetensors@1.0+hat/@0.7`` -> ((alpha file, c), ...): alpha files (or run folders, whose
    alpha is used) joined by ``+``, each with an optional strength ``@c`` (default 1.0)."""
    parts = [p.strip() for p in str(path).split("+")]
    if not all(parts):
        raise SamplingError(f"run {name!r}: {str(path)!r} has an empty part; write A.safetensors+B.safetensors")
    return tuple(_mix_part(name, part) for part in parts)


def parse_run(spec: str) -> RunSpec:
    """Parse ``name=path[,path2]`` (or a bare ``path``, named after its folder) into a :class:`RunSpec`.

    A path may be a training output directory (holding ``coeff_weights.safetensors`` and/or
    ``pytorch_lora_weights.safetensors``, or the ``unet/`` folder of ``--tuning full``, and/or learned
    tokens ``<name>_emb.safetensors``) or a weight file; files are told apart by their header (an
    embeddings file by its ``clip_l`` / ``clip_g`` keys). Learned tokens compose with any of them.
    Combined concepts: one path may be alpha files (or run folders, whose alpha alone is used) joined
    by ``+``, each with an optional strength ``@c`` (``dog.safetensors+hat.safetensors@0.7``); it is the
    run's alpha, so no other path may bring alpha, but a LoRA file or learned tokens may follow
    after a comma. Raises :class:`SamplingError` naming the run for missing paths and folders without weights.
    """
    name, paths = _split_spec(spec)
    files: dict[str, Path] = {}
    mix: tuple[tuple[Path, float], ...] = ()
    source = None
    for path in paths:
        if _is_mix(path):
            if mix or "alpha" in files:
                raise SamplingError(f"run {name!r}: alpha is given twice; give one alpha file or one A+B combination")
            mix = _parse_mix(name, path)
            continue
        found = _files_of(name, path)
        if path.is_dir():
            source = source or path
        for kind, file in found:
            if (kind in files or (kind == "alpha" and mix)) and kind != "unet":
                what = {"alpha": "alpha", "lora": "LoRA", "embeddings": "embeddings"}[kind]
                first = files.get(kind) or "+".join(str(p) for p, _ in mix)
                raise SamplingError(f"run {name!r}: two {what} files ({first}, {file}); give one per run")
            files[kind] = file
    unet, alpha, lora = files.get("unet"), files.get("alpha"), files.get("lora")
    if unet is not None and (alpha is not None or lora is not None or mix):
        raise SamplingError(
            f"run {name!r}: a fully fine-tuned UNet ({unet}) cannot be combined with alpha or LoRA "
            "files in one run; give them as separate runs"
        )
    return RunSpec(
        name=name,
        alpha_path=alpha,
        lora_path=lora,
        source=source,
        unet_path=unet,
        emb_path=files.get("embeddings"),
        alpha_mix=mix,
    )


def parse_target_scales(text: str) -> dict[str, float]:
    """``attn1=0.5,attn2=1`` -> ``{"attn1": 0.5, "attn2": 1.0}`` (targets: ``COEFF_TARGETS``).

    Raises :class:`SamplingError` naming the bad part: not ``TARGET=VALUE``, an unknown target, a
    value that is not a finite number, or a target given twice.
    """
    from ..processor import COEFF_TARGETS

    flag, known = "--coeff_target_scales", ", ".join(COEFF_TARGETS)
    scales: dict[str, float] = {}
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise SamplingError(f"{flag} {text!r}: give TARGET=VALUE pairs, e.g. attn1=0.5,attn2=1 (targets: {known})")
    for part in parts:
        target, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not target or not value:
            raise SamplingError(f"{flag}: {part!r} is not TARGET=VALUE (e.g. attn1=0.5; targets: {known})")
        if target not in COEFF_TARGETS:
            raise SamplingError(f"{flag}: unknown target {target!r} in {part!r}; use {known}")
        if target in scales:
            raise SamplingError(f"{flag}: {target!r} is given twice")
        try:
            number = float(value)
        except ValueError:
            raise SamplingError(f"{flag}: {value!r} in {part!r} is not a number") from None
        if not math.isfinite(number):
            raise SamplingError(f"{flag}: {value!r} in {part!r} must be a finite number")
        scales[target] = number
    return scales


def check_target_scales_for(
    runs: Sequence[RunSpec], target_scales: Mapping[str, float] | None
) -> dict[str, float] | None:
    """The target scales as floats (None if not given), checked: known targets, finite, some run has alpha."""
    if target_scales is None:
        return None
    from ..processor import check_target_scales

    try:
        scales = check_target_scales(target_scales)
    except ValueError as exc:
        raise SamplingError(f"coeff target scales: {exc}") from None
    bad = sorted(k for k, v in scales.items() if not math.isfinite(v))
    if bad:
        raise SamplingError(f"coeff target scales: {bad} must be finite numbers")
    if not any(r.has_alpha for r in runs):
        raise SamplingError("--coeff_target_scales doses alpha, but no run has an alpha file")
    return scales


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
        """Whether the row applies its run's LoRA."""
        return self.run is not None and self.run.lora_path is not None

    @property
    def has_tokens(self) -> bool:
        """Whether the row loads its run's learned tokens."""
        return self.run is not None and self.run.emb_path is not None

    @property
    def slug(self) -> str:
        """File-name form of the name ("coeff@0.5" -> "coeff_c0.5")."""
        return self.name.replace("@", "_c")

    @property
    def description(self) -> str:
        """What the row applies, e.g. "alpha c=0.5 + LoRA" ("base model" for the base row)."""
        if self.run is None:
            return "base model"
        parts = []
        if self.coeff_scale is not None:
            what = f"{len(self.run.alpha_mix)} alphas" if self.run.alpha_mix else "alpha"
            parts.append(f"{what} c={self.coeff_scale:g}")
        if self.has_lora:
            parts.append("LoRA")
        if self.run.unet_path is not None:
            parts.append("full UNet")
        if self.has_tokens:
            parts.append("learned tokens")
        return " + ".join(parts)

    @property
    def label(self) -> str:
        """Two-line grid label: name, then what the row applies."""
        return f"{self.name}\n{self.description}"


def _check_runs(runs: Sequence[RunSpec], include_base: bool) -> None:
    """Valid, distinct run names, each run with weights; none named "base" beside the base row."""
    seen: set[str] = set()
    for run in runs:
        _check_name(run.name)
        if run.name in seen:
            raise SamplingError(f"run name {run.name!r} is given twice; every --run needs its own name")
        seen.add(run.name)
        if not run.has_alpha and not any(p is not None for p in (run.lora_path, run.unet_path, run.emb_path)):
            raise SamplingError(f"run {run.name!r} has no weights")
    if include_base and "base" in seen:
        raise SamplingError("run name 'base' is taken by --include_base's row; rename the run")


def _check_scales(runs: Sequence[RunSpec], coeff_scales: Sequence[float] | None) -> list[float] | None:
    """The alpha strength sweep as floats: not empty, distinct, finite, and some run has alpha."""
    if coeff_scales is None:
        return None
    scales = [float(s) for s in coeff_scales]
    if not scales:
        raise SamplingError("--coeff_scales needs at least one value")
    if len(set(scales)) != len(scales):
        raise SamplingError(f"--coeff_scales has repeated values: {scales}")
    if not all(math.isfinite(s) for s in scales):
        raise SamplingError(f"--coeff_scales must be finite numbers: {scales}")
    if not any(r.has_alpha for r in runs):
        raise SamplingError("--coeff_scales sweeps alpha strength, but no run has an alpha file")
    return scales


def plan_rows(
    runs: Sequence[RunSpec], include_base: bool = False, coeff_scales: Sequence[float] | None = None
) -> list[Row]:
    """The rows to render, in order: base first (if asked), then each run.

    A run with alpha gets one row per ``coeff_scales`` entry (named ``name@scale``), or a single row
    at strength 1 without a sweep. Raises :class:`SamplingError` for duplicated names, a run named
    "base" beside the base row, a sweep without any alpha run, or nothing to render.
    """
    _check_runs(runs, include_base)
    scales = _check_scales(runs, coeff_scales)
    rows = [Row("base")] if include_base else []
    for run in runs:
        if not run.has_alpha:
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
