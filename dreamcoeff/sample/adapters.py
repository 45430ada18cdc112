"""Switching adapters on one pipeline: every run's alpha, LoRA, full UNet or learned tokens, one row's at a time.

Every file is read, checked and installed by the run loader (`dreamcoeff.loading`); this module only
decides which run's parts are in place. Switching between rows never reloads the base model. Every
run's LoRA is loaded once, up front, as its own PEFT adapter and switched with ``set_adapters`` /
``disable_lora`` (a disabled PEFT layer computes exactly ``base_layer(x)``, so the base row after a
LoRA row is bit-identical to the one before). Alpha is installed per row from its file (a few hundred
KB at most) and removed again for rows without it. Learned tokens are checked up front and loaded into
both text encoders (diffusers' ``load_textual_inversion``) for their run's rows only, then unloaded
again: the other rows' encoders and tokenizers are the base model's, bit for bit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..loading import (
    RunLoadError,
    alpha_record,
    check_alpha_mix,
    embeddings_record,
    install_alpha,
    install_lora_adapter,
    install_tokens,
    lora_record,
    read_full_unet,
    remove_tokens,
)
from ..lora import lora_problems
from ..processor import coeff_modules, remove_coeff, set_coeff_scale, set_coeff_target_scales
from ..tokens import TokenError
from ..weights import CoeffWeightsError
from .errors import SamplingError
from .pipeline import freeze
from .quiet import quiet_diffusers_noise, quiet_lora_loading, quiet_token_loading
from .runs import Row, RunSpec

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["lora_problems", "AdapterSwitcher"]  # lora_problems lives in ..lora: re-exported


class AdapterSwitcher:
    """Holds every run's adapters on one pipeline and puts exactly one row's adapters in place.

    On construction: any alpha already on the pipeline is removed (sampling starts from the base
    model), every alpha file is loaded once into the pipeline and removed again (all-or-nothing
    validation against this UNet), every LoRA file's keys are checked against the UNet, and only
    then is each LoRA loaded as its own PEFT adapter (then disabled). A fully fine-tuned UNet
    (``--tuning full``) is loaded once, checked against the base UNet's config, kept on the CPU and
    swapped in for its rows only. Learned tokens are checked against both text encoders (readable,
    finite, the encoders' widths, token strings new to the tokenizers) and loaded for their run's
    rows only. Errors are :class:`SamplingError` naming the run. :meth:`close` deletes the adapters
    again, unloads any tokens and puts the base UNet back.
    """

    def __init__(self, pipe: StableDiffusionXLPipeline, runs: Sequence[RunSpec]):
        started = time.perf_counter()
        self.pipe = pipe
        self.runs = {r.name: r for r in runs}
        self.adapter_names: dict[str, str] = {}
        self.weights: dict[str, dict[str, Any]] = {}
        self._alpha_run: str | None = None
        self.base_unet = pipe.unet
        self.full_unets: dict[str, torch.nn.Module] = {}
        self._tokens_run: str | None = None  # whose learned tokens are loaded
        self._loaded_tokens: list[str] = []
        if coeff_modules(pipe):
            remove_coeff(pipe)
        freeze(pipe)
        for run in runs:
            self.weights[run.name] = {"kind": run.kind, "source": str(run.source.resolve()) if run.source else None}
            if run.alpha_path is not None:
                self.weights[run.name]["alpha"] = self._check_alpha(run)
            elif run.alpha_mix:
                self.weights[run.name]["alpha"] = self._check_alpha_mix(run)
            if run.unet_path is not None:
                self.weights[run.name]["unet"] = self._load_full_unet(run)
            if run.emb_path is not None:
                self.weights[run.name]["embeddings"] = self._check_embeddings(run)
        loras = [r for r in runs if r.lora_path is not None]
        infos = {r.name: self._check_lora(r) for r in loras}  # every file checked before any is loaded
        try:
            self._load_loras(loras, infos)
        except BaseException:
            self.close()  # leave the pipeline as it came
            raise
        freeze(pipe)  # the LoRA matrices too (see freeze)
        self.reset()
        self.prepare_seconds = time.perf_counter() - started

    def _load_loras(self, loras: Sequence[RunSpec], infos: Mapping[str, dict[str, Any]]) -> None:
        """Load each checked LoRA file as its own PEFT adapter (named after the run and the file's hash)."""
        existing = set(self._list_adapters())
        for run in loras:
            info = infos[run.name]
            adapter = f"dreamcoeff_{re.sub(r'[^A-Za-z0-9_]', '_', run.name)}_{info['sha256'][:8]}"
            if adapter not in existing:
                try:
                    with quiet_lora_loading():
                        install_lora_adapter(self.pipe, run.lora_path, adapter)
                except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
                    raise SamplingError(f"run {run.name!r}: LoRA {run.lora_path} could not be loaded: {exc}") from exc
            self.adapter_names[run.name] = adapter
            self.weights[run.name]["lora"] = {**info, "adapter_name": adapter}

    def _list_adapters(self) -> list[str]:
        try:
            return sorted({a for names in self.pipe.get_list_adapters().values() for a in names})
        except (ValueError, AttributeError):  # no PEFT layers yet
            return []

    def _alpha_info(self, run: RunSpec, path: Path) -> dict[str, Any]:
        """One alpha file checked on its own against this UNet (then removed again), and its record."""
        try:
            return alpha_record(self.pipe, path)
        except CoeffWeightsError as exc:
            if not run.alpha_mix:
                raise SamplingError(f"run {run.name!r}: {exc}") from None
            lines = str(exc).splitlines()  # one line, naming the file: the first problem is enough
            detail = f": {lines[1].strip()}" if len(lines) > 1 else ""
            raise SamplingError(f"run {run.name!r}: combined alpha: {lines[0]}{detail}") from None

    def _check_alpha(self, run: RunSpec) -> dict[str, Any]:
        return self._alpha_info(run, run.alpha_path)

    def _check_alpha_mix(self, run: RunSpec) -> dict[str, Any]:
        """Every file of a combination checked on its own (an error names the file), then together."""
        files = [{**self._alpha_info(run, path), "strength": float(c)} for path, c in run.alpha_mix]
        try:
            layers = check_alpha_mix(self.pipe, run.alpha_mix)
        except CoeffWeightsError as exc:
            raise SamplingError(f"run {run.name!r}: combined alpha: {str(exc).splitlines()[0]}") from None
        return {
            "combined": True,
            "formula": "A = I + c * sum_k strength_k * alpha_k (c: the row's coeff_scale)",
            "path": " + ".join(f"{f['path']}@{f['strength']:g}" for f in files),
            "layers": len(layers),
            "files": files,
        }

    def _check_embeddings(self, run: RunSpec) -> dict[str, Any]:
        """The embeddings file checked against both text encoders, without loading it."""
        try:
            record = embeddings_record(self.pipe, run.emb_path)
        except TokenError as exc:
            raise SamplingError(f"run {run.name!r}: {exc}") from None
        _, abstractions = run.learned_tokens()
        dims = record.pop("dims")
        return {**record, "abstractions": abstractions, "token": run.learned_token(), "dims": dims}

    def _use_tokens(self, run: RunSpec | None) -> None:
        """``run``'s learned tokens in both text encoders (loaded only when the run changes), or none."""
        wanted = run.name if run is not None and run.emb_path is not None else None
        if wanted == self._tokens_run:
            return
        if self._tokens_run is not None:
            remove_tokens(self.pipe, self._loaded_tokens)
            self._tokens_run, self._loaded_tokens = None, []
        if wanted is not None:
            try:
                with quiet_token_loading():
                    self._loaded_tokens = install_tokens(self.pipe, run.emb_path)
            except TokenError as exc:  # the file changed since it was checked
                raise SamplingError(f"run {run.name!r}: {exc}") from None
            self._tokens_run = wanted
        freeze(self.pipe)  # the resized embedding matrices too

    def _load_full_unet(self, run: RunSpec) -> dict[str, Any]:
        if getattr(self.base_unet, "_hf_hook", None) is not None:
            raise SamplingError(
                f"run {run.name!r} is a full UNet fine-tune, which cannot be swapped into a pipeline "
                "with CPU offload; drop --cpu_offload"
            )
        try:
            with quiet_diffusers_noise():
                unet, record = read_full_unet(run.unet_path, self.base_unet)
        except RunLoadError as exc:
            raise SamplingError(f"run {run.name!r}: {exc}") from None
        unet.eval().requires_grad_(False)
        self.full_unets[run.name] = unet
        return record

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
        try:
            with quiet_lora_loading():
                return lora_record(self.pipe, run.lora_path)
        except RunLoadError as exc:
            raise SamplingError(f"run {run.name!r}: {exc}") from None

    def reset(self) -> None:
        """The base model: its own UNet and text encoders, no alpha, every LoRA disabled."""
        self._use_tokens(None)
        self._use_unet(self.base_unet)
        if coeff_modules(self.pipe):
            remove_coeff(self.pipe)
        self._alpha_run = None
        if self.adapter_names:
            self.pipe.disable_lora()

    def _use_alpha(self, run: RunSpec | None, scale: float | None, target_scales: Mapping[str, float] | None) -> None:
        """Alpha of ``run`` at strength ``scale`` in place (loaded only when the run changes), dosed by
        ``target_scales`` (None: every layer at factor 1), or none."""
        if run is not None and scale is not None:
            if self._alpha_run == run.name:
                set_coeff_scale(self.pipe, scale)
            else:
                try:
                    install_alpha(self.pipe, run.files, scale)  # a combination: the row's c scales the sum
                except CoeffWeightsError as exc:  # the file changed since it was checked
                    raise SamplingError(f"run {run.name!r}: {exc}") from None
                self._alpha_run = run.name
                freeze(self.pipe)
            set_coeff_target_scales(self.pipe, target_scales)
        elif coeff_modules(self.pipe):
            remove_coeff(self.pipe)
            self._alpha_run = None

    def activate(self, row: Row, lora_scale: float = 1.0, target_scales: Mapping[str, float] | None = None) -> None:
        """Put exactly this row's adapters in place (alpha at ``row.coeff_scale``, dosed by
        ``target_scales``; its LoRA or none; its run's learned tokens or none)."""
        run = row.run
        self._use_tokens(run)
        self._use_unet(self.base_unet)  # adapters are switched on the base UNet, a full UNet swapped in last
        if row.has_lora:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.adapter_names[run.name]], adapter_weights=[float(lora_scale)])
        elif self.adapter_names:
            self.pipe.disable_lora()
        self._use_alpha(run, row.coeff_scale, target_scales)
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
