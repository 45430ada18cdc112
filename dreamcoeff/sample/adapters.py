"""Switching adapters on one pipeline: every run's alpha, LoRA, full UNet or learned tokens, one row's at a time.

Switching between rows never reloads the base model. Every run's LoRA is loaded once, up front, as its
own PEFT adapter and switched with ``set_adapters`` / ``disable_lora`` (a disabled PEFT layer computes
exactly ``base_layer(x)``, so the base row after a LoRA row is bit-identical to the one before). Alpha
is installed per row from its file (a few hundred KB at most) and removed again for rows without it.
Learned tokens are checked up front and loaded into both text encoders (diffusers'
``load_textual_inversion``) for their run's rows only, then unloaded again: the other rows' encoders
and tokenizers are the base model's, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..lora import lora_problems, tensor_value_problems, unet_architecture_differences
from ..processor import coeff_modules, remove_coeff, set_coeff_scale, set_coeff_target_scales, unwrap_unet
from ..tokens import ENCODER_KEYS, TokenError, load_embeddings_into, read_embeddings_file, unload_embeddings
from ..weights import CoeffWeightsError, load_coeff_weights, read_coeff_file
from .errors import SamplingError
from .pipeline import freeze
from .quiet import quiet_diffusers_noise, quiet_lora_loading, quiet_token_loading
from .runs import Row, RunSpec

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["lora_problems", "AdapterSwitcher"]  # lora_problems lives in ..lora: re-exported


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
                        self.pipe.load_lora_weights(str(run.lora_path), adapter_name=adapter)
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
            tensors, metadata = read_coeff_file(path)
            layers = load_coeff_weights(self.pipe, path, scale=1.0)
        except CoeffWeightsError as exc:
            if not run.alpha_mix:
                raise SamplingError(f"run {run.name!r}: {exc}") from None
            lines = str(exc).splitlines()  # one line, naming the file: the first problem is enough
            detail = f": {lines[1].strip()}" if len(lines) > 1 else ""
            raise SamplingError(f"run {run.name!r}: combined alpha: {lines[0]}{detail}") from None
        finally:
            remove_coeff(self.pipe)
        training_args = metadata.get("training_args")
        return {
            "path": str(path.resolve()),
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "layers": len(layers),
            "coefficients": int(sum(t.numel() for t in tensors.values())),
            "max_abs_alpha": float(max(t.abs().max() for t in tensors.values())),
            "metadata": {k: v for k, v in metadata.items() if k != "training_args"},
            "has_training_args": training_args is not None,
        }

    def _check_alpha(self, run: RunSpec) -> dict[str, Any]:
        return self._alpha_info(run, run.alpha_path)

    def _check_alpha_mix(self, run: RunSpec) -> dict[str, Any]:
        """Every file of a combination checked on its own (an error names the file), then together."""
        files = [{**self._alpha_info(run, path), "strength": float(c)} for path, c in run.alpha_mix]
        try:
            layers = load_coeff_weights(self.pipe, [p for p, _ in run.alpha_mix], scale=[c for _, c in run.alpha_mix])
        except CoeffWeightsError as exc:
            raise SamplingError(f"run {run.name!r}: combined alpha: {str(exc).splitlines()[0]}") from None
        finally:
            remove_coeff(self.pipe)
        return {
            "combined": True,
            "formula": "A = I + c * sum_k strength_k * alpha_k (c: the row's coeff_scale)",
            "path": " + ".join(f"{f['path']}@{f['strength']:g}" for f in files),
            "layers": len(layers),
            "files": files,
        }

    def _check_embeddings(self, run: RunSpec) -> dict[str, Any]:
        """The embeddings file checked against both text encoders, without loading it."""
        path = run.emb_path
        try:
            state, tokens = read_embeddings_file(path)
        except TokenError as exc:
            raise SamplingError(f"run {run.name!r}: {exc}") from None
        pairs = ((self.pipe.text_encoder, self.pipe.tokenizer), (self.pipe.text_encoder_2, self.pipe.tokenizer_2))
        for key, (encoder, tokenizer) in zip(ENCODER_KEYS, pairs, strict=True):
            dim = encoder.get_input_embeddings().weight.shape[1]
            if state[key].shape[1] != dim:
                raise SamplingError(
                    f"run {run.name!r}: {path}: {key} rows have {state[key].shape[1]} numbers, this pipeline's "
                    f"encoder has {dim}; were the tokens trained on another base model?"
                )
            clash = [t for t in tokens if t in tokenizer.get_vocab()]
            if clash:
                raise SamplingError(f"run {run.name!r}: {path}: the tokens {clash} are already in the base tokenizers")
        _, abstractions = run.learned_tokens()
        return {
            "path": str(path.resolve()),
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "tokens": tokens,
            "abstractions": abstractions,
            "token": run.learned_token(),
            "dims": {key: int(state[key].shape[1]) for key in ENCODER_KEYS},
        }

    def _use_tokens(self, run: RunSpec | None) -> None:
        """``run``'s learned tokens in both text encoders (loaded only when the run changes), or none."""
        wanted = run.name if run is not None and run.emb_path is not None else None
        if wanted == self._tokens_run:
            return
        if self._tokens_run is not None:
            unload_embeddings(self.pipe, self._loaded_tokens)
            self._tokens_run, self._loaded_tokens = None, []
        if wanted is not None:
            try:
                with quiet_token_loading():
                    self._loaded_tokens = load_embeddings_into(self.pipe, run.emb_path)
            except TokenError as exc:  # the file changed since it was checked
                raise SamplingError(f"run {run.name!r}: {exc}") from None
            self._tokens_run = wanted
        freeze(self.pipe)  # the resized embedding matrices too

    def _check_unet_config(self, run: RunSpec) -> None:
        """The full UNet's config.json must describe the base UNet's architecture."""
        path = run.unet_path
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SamplingError(f"run {run.name!r}: {path / 'config.json'} is unreadable: {exc}") from None
        differ = unet_architecture_differences(unwrap_unet(self.base_unet).config, config)
        if differ:
            raise SamplingError(
                f"run {run.name!r}: the UNet in {path} has another architecture than the base model's "
                f"({', '.join(differ[:5])} differ); was it trained on another base model?"
            )

    def _load_full_unet(self, run: RunSpec) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        if getattr(self.base_unet, "_hf_hook", None) is not None:
            raise SamplingError(
                f"run {run.name!r} is a full UNet fine-tune, which cannot be swapped into a pipeline "
                "with CPU offload; drop --cpu_offload"
            )
        path = run.unet_path
        weights = path / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise SamplingError(f"run {run.name!r}: {path} has no diffusion_pytorch_model.safetensors")
        self._check_unet_config(run)
        try:
            with quiet_diffusers_noise():
                unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=self.base_unet.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SamplingError(f"run {run.name!r}: the UNet in {path} could not be loaded: {exc}") from None
        unet.eval().requires_grad_(False)
        self.full_unets[run.name] = unet
        return {
            "path": str(path.resolve()),
            "sha256": _sha256(weights),
            "bytes": weights.stat().st_size,
            "parameters": sum(p.numel() for p in unet.parameters()),
        }

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
            with quiet_lora_loading():
                # diffusers' own reader: converts kohya / older layouts to its key format.
                state, _ = self.pipe.lora_state_dict(str(path))
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise SamplingError(f"run {run.name!r}: {path} is not a LoRA file diffusers can read: {exc}") from None
        if not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in state):
            raise SamplingError(f"run {run.name!r}: {path} holds no LoRA weights for the UNet or text encoders")
        problems = tensor_value_problems(state) or lora_problems(self.pipe.unet, state)
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise SamplingError(
                f"run {run.name!r}: LoRA {path} does not fit this UNet ({len(problems)} problem(s)); "
                "was it trained on another base model?\n  " + "\n  ".join(shown)
            )
        ranks = sorted(
            {int(v.shape[0]) for k, v in state.items() if re.search(r"lora[._](down|A)\b", k) and v.ndim >= 2}
        )
        return {
            "path": str(path.resolve()),
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "tensors": len(state),
            "modules": len({k.split(".lora", 1)[0] for k in state}),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
        }

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
                    if run.alpha_mix:  # processors at strength 1, the c_k in alpha: the row's c scales the sum
                        files, strengths = [p for p, _ in run.alpha_mix], [c for _, c in run.alpha_mix]
                        load_coeff_weights(self.pipe, files, scale=strengths)
                        set_coeff_scale(self.pipe, scale)
                    else:
                        load_coeff_weights(self.pipe, run.alpha_path, scale=scale)
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
