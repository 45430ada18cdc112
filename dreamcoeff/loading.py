"""The run loader: every read of a training run's files goes through here, and so do their checks.

A run folder holds whatever its method trained: alpha (`coeff_weights.safetensors`), LoRA
(`pytorch_lora_weights.safetensors`), a full UNet (`unet/`), learned tokens (`<name>_emb.safetensors`).
Two steps, used by every caller (the library API, the sampler, the inspector, the trainer's resume):

- `read_run` finds and tells apart a run's files (a folder, a checkpoint, or one weight file told apart
  by its header) and returns a :class:`RunFiles`; it installs nothing. Its parts read and check each
  file against a pipeline (`alpha_record`, `lora_record`, `embeddings_record`, `read_full_unet`), install
  one (`install_alpha` with combined alpha files, `install_tokens`, `install_lora_adapter`), or copy a
  checkpoint's parts into the ones training installed (`load_checkpoint_parts`, `initialize_parts`).
- `load_run` puts a whole run into a `StableDiffusionXLPipeline` in one call (alpha validated
  all-or-nothing; the tokens through diffusers' `load_textual_inversion`, as a user would; LoRA through
  diffusers' loader after `check_lora_file` has read and checked it, since a hostile file could
  otherwise leave half an adapter in the UNet) and returns a :class:`LoadedRun`; `unload_run` gives the
  base model back exactly.

The file formats themselves (header checks, finite values, head counts) are the format modules'
(`weights`, `lora`, `tokens`); this module is the only one above them that calls their readers
(`tests/test_layout.py` checks it on the source).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .lora import (
    FULL_UNET_DIR,
    LORA_WEIGHTS_NAME,
    init_lora_from,
    load_full_unet_weights,
    load_lora_into_text_encoders,
    load_lora_into_unet,
    lora_problems,
    tensor_value_problems,
    unet_architecture_differences,
)
from .lora_check import RunLoadError, check_lora_file
from .methods import EMBEDDINGS, artifacts_in
from .processor import coeff_parameters, remove_coeff, set_coeff_scale, unwrap_unet
from .tokens import (
    EMBEDDINGS_SUFFIX,
    ENCODER_KEYS,
    TokenError,
    load_embeddings_into,
    read_embeddings_file,
    replace_abstractions,
    token_abstractions,
    unload_embeddings,
)
from .weights import COEFF_WEIGHTS_NAME, init_coeff_from, load_coeff_weights, read_coeff_file

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

    from .methods import TuningMethod
    from .tokens import LearnedTokens

__all__ = [
    "LoadedRun",
    "RunFiles",
    "RunLoadError",
    "alpha_record",
    "check_alpha_mix",
    "check_lora_file",
    "embeddings_record",
    "file_sha256",
    "initialize_parts",
    "install_alpha",
    "install_lora_adapter",
    "install_tokens",
    "load_checkpoint_parts",
    "load_run",
    "lora_record",
    "read_full_unet",
    "read_run",
    "remove_tokens",
    "trained_clip_skip",
    "unload_run",
]

#: The adapter name `load_run` gives a run's LoRA in the pipeline.
LORA_ADAPTER = "dreamcoeff_run"


# ---- reading: find a run's files and tell them apart (nothing installed) -----------------------------


@dataclass(frozen=True)
class RunFiles:
    """A run's trained files, found and told apart; `read_run` returns one, nothing is installed.

    Attributes:
        alpha: ``coeff_weights.safetensors`` (or another alpha file) or None.
        lora: diffusers' LoRA file (``pytorch_lora_weights.safetensors``) or None.
        unet: the ``unet/`` folder of a ``--tuning full`` run or None.
        embeddings: the learned tokens (``<name>_emb.safetensors``) or None.
        alpha_mix: combined alpha files ``((file, c), ...)`` (A = I + sum_k c_k alpha_k); then
            `alpha` is None. Empty for one alpha file or none.
        source: the folder the files were found in, None for a single file.
    """

    alpha: Path | None = None
    lora: Path | None = None
    unet: Path | None = None
    embeddings: Path | None = None
    alpha_mix: tuple[tuple[Path, float], ...] = ()
    source: Path | None = None

    @property
    def parts(self) -> list[str]:
        """The kinds present, in the loader's order: ``alpha``, ``lora``, ``unet``, ``embeddings``."""
        have = (self.alpha is not None or bool(self.alpha_mix), self.lora, self.unet, self.embeddings)
        return [kind for kind, on in zip(("alpha", "lora", "unet", "embeddings"), have) if on]

    def found(self) -> list[tuple[str, Path]]:
        """``(kind, path)`` of each file (a combination's files are not listed: they are `alpha_mix`)."""
        paths = (("alpha", self.alpha), ("lora", self.lora), ("unet", self.unet), ("embeddings", self.embeddings))
        return [(kind, path) for kind, path in paths if path is not None]

    def read_alpha(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The alpha file's tensors and metadata, checked (`read_coeff_file`); `CoeffWeightsError` names the file."""
        if self.alpha is None:
            raise RunLoadError(self.no_alpha())
        return read_coeff_file(self.alpha)

    def training_args(self) -> dict[str, Any] | None:
        """The run's ``args.json`` (in its folder, else beside its files), or None if absent / unreadable."""
        # the unet/ folder's parent is the run folder, as a weight file's is (it was unet.parent.parent
        # before: a RunFiles(unet=run/unet) looked for args.json above the run folder)
        files = (self.alpha, self.lora, self.unet, self.embeddings)
        folders = [self.source] if self.source else [p.parent for p in files if p]
        for folder in folders:
            try:
                return json.loads((folder / "args.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):  # another folder may have it; none: the report says so
                continue
        return None

    def no_alpha(self) -> str:
        """The message for a run without alpha, naming where it looked."""
        where = self.source or next((path for _, path in self.found()), None) or "this run"
        return f"{where} holds no alpha ({COEFF_WEIGHTS_NAME}): it has {', '.join(self.parts) or 'no trained files'}"

    def learned_tokens(self) -> tuple[list[str], dict[str, str]]:
        """``(["<s0>", "<s1>"], {"TOK": "<s0><s1>"})`` of the embeddings file, read and checked (both
        keys, finite; `TokenError` names the file); ``([], {})`` without learned tokens."""
        if self.embeddings is None:
            return [], {}
        _, tokens = read_embeddings_file(self.embeddings)
        return tokens, token_abstractions(self.embeddings)


_NOTHING_TO_LOAD = (
    f"holds no trained files (it holds neither {COEFF_WEIGHTS_NAME} nor {LORA_WEIGHTS_NAME} nor a "
    f"{FULL_UNET_DIR}/ folder nor *{EMBEDDINGS_SUFFIX}): has the training finished? checkpoints are in "
    "checkpoint-* subfolders"
)


def _file_kind(path: Path) -> str:
    """'alpha', 'lora' or 'embeddings' from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            keys = list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise RunLoadError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") == "dreamcoeff":
        return "alpha"
    if all(k in keys for k in ENCODER_KEYS):
        return "embeddings"
    if any("lora" in k for k in keys):
        return "lora"
    raise RunLoadError(
        f"{path} is neither a dreamcoeff alpha file nor a LoRA file nor learned token embeddings "
        f"({'/'.join(ENCODER_KEYS)}) (keys such as {keys[:2]})"
    )


def read_run(path: str | Path) -> RunFiles:
    """Find a run's files: a training output folder's (or checkpoint's) trained files, as the tuning
    methods name them (`dreamcoeff.methods.artifacts_in`), or one weight file told apart by its header.

    Nothing is installed and no tensor is read yet (each `RunFiles` part reads and checks its file when
    asked). Raises `RunLoadError` for a path that does not exist, a folder with no trained files, or a
    file that is not a readable alpha, LoRA or embeddings file; the message names the path.
    """
    path = Path(path)
    if not path.exists():
        raise RunLoadError(f"{path} does not exist")
    if not path.is_dir():
        return RunFiles(**{_file_kind(path): path})
    found = dict(artifacts_in(path))
    if not found:
        raise RunLoadError(f"{path} {_NOTHING_TO_LOAD}")
    return RunFiles(**found, source=path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MB blocks (the sampler's record of what it loaded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- checking one part against a pipeline, and installing it ------------------------------------------


def install_alpha(pipe: StableDiffusionXLPipeline, files: RunFiles, scale: float = 1.0) -> list[str]:
    """The run's alpha into `pipe` at strength `scale`, replacing any alpha it had (all-or-nothing,
    `load_coeff_weights`). A combination is installed as A = I + c * sum_k c_k alpha_k: the processors
    at strength `scale`, the c_k summed into alpha. Returns the module paths loaded."""
    if files.alpha_mix:  # processors at strength 1, the c_k in alpha: then `scale` scales the sum
        layers = load_coeff_weights(pipe, [p for p, _ in files.alpha_mix], scale=[c for _, c in files.alpha_mix])
        set_coeff_scale(pipe, scale)
        return layers
    if files.alpha is None:
        raise RunLoadError(files.no_alpha())
    return load_coeff_weights(pipe, files.alpha, scale=scale)


def alpha_record(pipe: StableDiffusionXLPipeline, path: Path) -> dict[str, Any]:
    """One alpha file read, checked on its own against `pipe`'s UNet (loaded, then removed again: the
    all-or-nothing check of `load_coeff_weights`), and what the sampler records of it (hash, size,
    layers, coefficients, largest |alpha|, metadata). `CoeffWeightsError` names the file."""
    try:
        tensors, metadata = read_coeff_file(path)
        layers = load_coeff_weights(pipe, path, scale=1.0)
    finally:
        remove_coeff(pipe)
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "layers": len(layers),
        "coefficients": int(sum(t.numel() for t in tensors.values())),
        "max_abs_alpha": float(max(t.abs().max() for t in tensors.values())),
        "metadata": {k: v for k, v in metadata.items() if k != "training_args"},
        "has_training_args": metadata.get("training_args") is not None,
    }


def check_alpha_mix(pipe: StableDiffusionXLPipeline, mix: Sequence[tuple[Path, float]]) -> list[str]:
    """A combination's files checked together against `pipe` (installed, then removed again); returns
    the module paths any of them covers. `CoeffWeightsError` says which files do not fit."""
    try:
        return load_coeff_weights(pipe, [p for p, _ in mix], scale=[c for _, c in mix])
    finally:
        remove_coeff(pipe)


def embeddings_record(pipe: StableDiffusionXLPipeline, path: Path) -> dict[str, Any]:
    """The embeddings file read and checked against both text encoders without loading it (rows as
    wide as each encoder's, token strings new to both tokenizers), and its record. `TokenError` names
    the file."""
    state, tokens = read_embeddings_file(path)
    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    for key, (encoder, tokenizer) in zip(ENCODER_KEYS, pairs, strict=True):
        dim = encoder.get_input_embeddings().weight.shape[1]
        if state[key].shape[1] != dim:
            raise TokenError(
                f"{path}: {key} rows have {state[key].shape[1]} numbers, this pipeline's "
                f"encoder has {dim}; were the tokens trained on another base model?"
            )
        clash = [t for t in tokens if t in tokenizer.get_vocab()]
        if clash:
            raise TokenError(f"{path}: the tokens {clash} are already in the base tokenizers")
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "tokens": tokens,
        "dims": {key: int(state[key].shape[1]) for key in ENCODER_KEYS},
    }


def install_tokens(pipe: StableDiffusionXLPipeline, path: Path) -> list[str]:
    """The learned tokens into both text encoders (diffusers' `load_textual_inversion`, checked
    first); returns the token strings. `TokenError` names the file."""
    return load_embeddings_into(pipe, path)


def remove_tokens(pipe: StableDiffusionXLPipeline, tokens: Sequence[str]) -> None:
    """Take tokens `install_tokens` loaded out of both tokenizers and encoders again."""
    unload_embeddings(pipe, tokens)


def lora_record(pipe: StableDiffusionXLPipeline, path: Path) -> dict[str, Any]:
    """A LoRA file for the sampler, read with diffusers' own reader (which converts kohya and older
    layouts to its key format; text-encoder LoRA is accepted) and checked against the UNet: values
    finite, every UNet key naming a module with fitting sizes. Returns its record; `RunLoadError`
    names the file."""
    if path.suffix != ".safetensors":
        raise RunLoadError(f"{path} is not a .safetensors file (pickle files are not loaded)")
    try:
        state, _ = pipe.lora_state_dict(str(path))
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise RunLoadError(f"{path} is not a LoRA file diffusers can read: {exc}") from None
    if not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in state):
        raise RunLoadError(f"{path} holds no LoRA weights for the UNet or text encoders")
    problems = tensor_value_problems(state) or lora_problems(pipe.unet, state)
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise RunLoadError(
            f"LoRA {path} does not fit this UNet ({len(problems)} problem(s)); "
            "was it trained on another base model?\n  " + "\n  ".join(shown)
        )
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if re.search(r"lora[._](down|A)\b", k) and v.ndim >= 2})
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "tensors": len(state),
        "modules": len({k.split(".lora", 1)[0] for k in state}),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
    }


def install_lora_adapter(pipe: StableDiffusionXLPipeline, path: Path, adapter_name: str) -> None:
    """A LoRA file `lora_record` checked, loaded as its own PEFT adapter (diffusers' `load_lora_weights`)."""
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)


def read_full_unet(path: Path, base_unet: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``--tuning full`` run's ``unet/`` folder: its ``config.json`` checked against the base UNet's
    architecture before any weight is read, then loaded (safetensors only) in the base UNet's dtype,
    frozen, on the CPU. Returns (UNet, record); `RunLoadError` names the folder."""
    from diffusers import UNet2DConditionModel

    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise RunLoadError(f"{path} has no diffusion_pytorch_model.safetensors")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunLoadError(f"{path / 'config.json'} is unreadable: {exc}") from None
    differ = unet_architecture_differences(unwrap_unet(base_unet).config, config)
    if differ:
        raise RunLoadError(
            f"the UNet in {path} has another architecture than the base model's "
            f"({', '.join(differ[:5])} differ); was it trained on another base model?"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=base_unet.dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RunLoadError(f"the UNet in {path} could not be loaded: {exc}") from None
    record = {
        "path": str(path.resolve()),
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    return unet, record


# ---- training: a checkpoint's (or an earlier run's) files into the parts a run installed ---------------


def load_checkpoint_parts(
    method: TuningMethod,
    unet: torch.nn.Module,
    folder: str | Path,
    tokens: LearnedTokens | None = None,
    text_encoders: Sequence[torch.nn.Module] = (),
) -> None:
    """Copy the parts `method` saved in `folder` (a checkpoint) into the installed ones, in place, so an
    optimizer built on them keeps referring to the same parameters (resume; the text encoders' LoRA too)."""
    folder = Path(folder)
    if method.tokens and tokens is not None:
        found = EMBEDDINGS.find(folder)
        if found is None:
            raise ValueError(f"{folder}: no *{EMBEDDINGS_SUFFIX} (a checkpoint of a run without learned tokens?)")
        tokens.load_(found)
    if method.coeff:
        load_coeff_weights(unet, folder / COEFF_WEIGHTS_NAME)
        for p in coeff_parameters(unet):
            p.requires_grad_(True)
    if method.lora:
        load_lora_into_unet(unet, folder / LORA_WEIGHTS_NAME)
        if text_encoders:
            load_lora_into_text_encoders(text_encoders, folder / LORA_WEIGHTS_NAME)
    if method.full:
        load_full_unet_weights(unet, folder / FULL_UNET_DIR)


def initialize_parts(
    method: TuningMethod, unet: torch.nn.Module, coeff_file: str | Path | None, lora_file: str | Path | None
) -> list[Path]:
    """Start `method`'s installed parts from an earlier run's files (``--init_coeff_weights``,
    ``--init_lora_weights``), each checked against this run's model and parts first; a new run
    (step 0, fresh optimizer), not a resume. Returns the files read."""
    read = []
    if coeff_file is not None and method.coeff:
        read.append(init_coeff_from(unet, coeff_file))
    if lora_file is not None and method.lora:
        read.append(init_lora_from(unet, lora_file))
    return read


@dataclass
class LoadedRun:
    """What `load_run` put into a pipeline (pass it to `unload_run` to take it out again).

    Attributes:
        folder: the run folder.
        parts: the kinds loaded, in order: ``alpha``, ``lora``, ``unet``, ``embeddings``.
        tokens: the learned token strings (``["<s0>", "<s1>"]``), empty without embeddings.
        abstractions: ``{"TOK": "<s0><s1>"}``: what to write in prompts for each token abstraction.
        clip_skip: the ``--clip_skip`` the run trained with (its ``args.json``; None: SDXL's default
            penultimate layer). The pipeline does not keep it: pass it to every call,
            ``pipe(prompt, clip_skip=loaded.clip_skip)``, or the prompts are read from another layer.
    """

    folder: Path
    parts: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    abstractions: dict[str, str] = field(default_factory=dict)
    clip_skip: int | None = None
    base_unet: torch.nn.Module | None = None
    # the UNet parameters' requires_grad flags before the LoRA: PEFT freezes the base layers when it
    # injects an adapter and never unfreezes them, and the flag is not cosmetic (PyTorch's matmul folds
    # batched inputs differently when a weight requires grad, so even no_grad images move in the last bit)
    unet_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    # the same for each text encoder the run's LoRA went into ("text_encoder", "text_encoder_2")
    text_requires_grad: dict[str, dict[str, bool]] = field(default_factory=dict, repr=False)

    @property
    def token(self) -> str | None:
        """The prompt text of the run's (first) learned identifier, e.g. ``<s0><s1>``; None without."""
        if self.abstractions:
            return next(iter(self.abstractions.values()))
        return "".join(self.tokens) or None

    def prompt(self, text: str) -> str:
        """`text` with each token abstraction (``TOK``, as a whole word, as in training) replaced by the
        run's learned tokens."""
        return replace_abstractions(text, self.abstractions)


def trained_clip_skip(training_args: dict[str, Any] | None) -> int | None:
    """The ``--clip_skip`` of a run's ``args.json`` (`RunFiles.training_args`); None when it trained with
    SDXL's default layer (no flag, or 0, which reads the same penultimate layer) or has no ``args.json``."""
    value = (training_args or {}).get("clip_skip")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_run(
    pipe: StableDiffusionXLPipeline, run: str | Path | RunFiles, coeff_scale: float = 1.0, lora_scale: float = 1.0
) -> LoadedRun:
    """Load everything a dreamcoeff run folder holds into `pipe`; returns a :class:`LoadedRun`.

    `run` is the run folder (or the :class:`RunFiles` `read_run` found in it; combined alpha files
    install as `install_alpha` does). `coeff_scale` is alpha's strength (0 = base), `lora_scale` the
    LoRA adapter's weight. Files are checked before anything changes where the library can (alpha, the
    LoRA file, embeddings' dimensions, the UNet's config); if a later part fails, the parts already
    loaded are taken out again.

    Raises `RunLoadError` (a folder with nothing to load, a LoRA file or UNet that does not fit),
    `CoeffWeightsError` (the alpha file) or `TokenError` (the embeddings file), all ValueErrors whose
    message names the file; the pipeline is then as it was.
    """
    if isinstance(run, RunFiles):
        files, folder = run, run.source or Path(".")
    else:
        folder = Path(run)
        files = read_run(folder) if folder.is_dir() else RunFiles()
    if not files.parts:
        raise RunLoadError(f"{folder} {_NOTHING_TO_LOAD}")
    if files.lora is not None:  # checked before anything changes
        lora_state, lora_meta = check_lora_file(pipe, files.lora)
    loaded = LoadedRun(folder, clip_skip=trained_clip_skip(files.training_args()))
    try:
        if files.embeddings is not None:
            loaded.tokens = install_tokens(pipe, files.embeddings)
            loaded.abstractions = token_abstractions(files.embeddings)
            loaded.parts.append("embeddings")
        if files.unet is not None:
            unet, _ = read_full_unet(files.unet, pipe.unet)
            loaded.base_unet, pipe.unet = pipe.unet, unet.to(pipe.unet.device)
            loaded.parts.append("unet")
        if "alpha" in files.parts:
            install_alpha(pipe, files, scale=coeff_scale)
            loaded.parts.append("alpha")
        if files.lora is not None:
            loaded.unet_requires_grad = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
            try:
                pipe.load_lora_into_unet(lora_state, None, pipe.unet, adapter_name=LORA_ADAPTER, metadata=lora_meta,
                                         _pipeline=pipe)  # fmt: skip
            except (ValueError, TypeError, RuntimeError, KeyError) as exc:
                if LORA_ADAPTER in (pipe.get_list_adapters().get("unet") or []):
                    _remove_run_lora(pipe, loaded.unet_requires_grad)
                raise RunLoadError(f"{files.lora} could not be loaded: {exc}") from exc
            loaded.parts.append("lora")  # from here on unload_run takes it out again
            for prefix in sorted({k.split(".", 1)[0] for k in lora_state if k.startswith("text_encoder")}):
                encoder = getattr(pipe, prefix)  # --train_text_encoder: the encoders' LoRA too
                loaded.text_requires_grad[prefix] = {n: p.requires_grad for n, p in encoder.named_parameters()}
                pipe.load_lora_into_text_encoder(lora_state, None, encoder, prefix=prefix, adapter_name=LORA_ADAPTER,
                                                 metadata=lora_meta, _pipeline=pipe)  # fmt: skip
            pipe.set_adapters([LORA_ADAPTER], adapter_weights=[lora_scale])
    except BaseException:
        unload_run(pipe, loaded)
        raise
    loaded.parts.sort(key=["alpha", "lora", "unet", "embeddings"].index)
    return loaded


def _remove_run_lora(
    pipe: StableDiffusionXLPipeline, requires_grad: dict[str, bool], text: dict[str, dict[str, bool]] | None = None
) -> None:
    """Delete the run's adapter, and PEFT's wrapper layers with it when no other adapter is left; then
    give every UNet (and text encoder) parameter back the requires_grad flag it had before the adapter came in."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

    pipe.delete_adapters(LORA_ADAPTER)
    if not pipe.get_list_adapters().get("unet"):
        pipe.unet.unload_lora()
    models = [(pipe.unet, requires_grad)]
    for prefix, flags in (text or {}).items():
        encoder = getattr(pipe, prefix)
        if not pipe.get_list_adapters().get(prefix):
            _remove_text_encoder_monkey_patch(encoder)  # the encoder's module tree as it was
        models.append((encoder, flags))
    for model, flags in models:
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])


def unload_run(pipe: StableDiffusionXLPipeline, loaded: LoadedRun) -> None:
    """Take out what `load_run` loaded: the pipeline holds the base model's modules and tensors again.

    Adapters the caller loaded under other names stay; when the run's LoRA was the UNet's last adapter,
    PEFT's wrapper layers go too (deleting an adapter leaves them in place, around no adapter), so the
    UNet's module tree is the base model's, not just its output, and its parameters' requires_grad
    flags are what they were before the load.
    """
    if "lora" in loaded.parts:
        _remove_run_lora(pipe, loaded.unet_requires_grad, loaded.text_requires_grad)
    if "alpha" in loaded.parts:
        remove_coeff(pipe)
    if "unet" in loaded.parts and loaded.base_unet is not None:
        pipe.unet = loaded.base_unet
        loaded.base_unet = None
    if "embeddings" in loaded.parts:
        unload_embeddings(pipe, loaded.tokens)
    loaded.parts.clear()
