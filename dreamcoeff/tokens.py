"""Learned identifier tokens (pivotal tuning): new rows in both SDXL text encoders, trained alone.

alpha only re-weights which maps a head reads; it cannot make a new word carry the subject. Textual
inversion gives the word an embedding of its own: `--token_abstraction TOK` becomes
``--num_new_tokens_per_abstraction`` new tokens (``<s0><s1>``) added to both tokenizers, whose rows in
both encoders' embedding matrices (768 + 1280 numbers each on SDXL) are the only text-side weights
that train. They live in their own float32 parameters, substituted for the embedding lookup by a
forward hook, so every other row stays bit-identical to the base whatever the optimizer does.

The file is the one diffusers' advanced SDXL script writes and A1111 / ComfyUI read:
``<name>_emb.safetensors`` with ``clip_l`` (tokens x 768) and ``clip_g`` (tokens x 1280), the token
strings in its metadata, loadable with diffusers' own ``pipe.load_textual_inversion``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

__all__ = [
    "EMBEDDINGS_SUFFIX",
    "ENCODER_KEYS",
    "LearnedTokens",
    "TokenError",
    "TokenPlan",
    "embeddings_file_name",
    "load_embeddings_into",
    "read_embeddings_file",
    "replace_abstractions",
    "token_abstractions",
    "unload_embeddings",
]

EMBEDDINGS_SUFFIX = "_emb.safetensors"
#: The file's key for each SDXL text encoder, in pipeline order (text_encoder, text_encoder_2).
ENCODER_KEYS = ("clip_l", "clip_g")
FORMAT_NAME = "dreamcoeff-embeddings"


class TokenError(ValueError):
    """Bad token settings or an embeddings file that does not fit; the message says what to do."""


def embeddings_file_name(output_dir: str | Path) -> str:
    """``<name>_emb.safetensors`` for an output folder, as diffusers' advanced script names it."""
    return Path(output_dir).resolve().name + EMBEDDINGS_SUFFIX


@dataclass(frozen=True)
class TokenPlan:
    """Which new token strings stand for which abstraction (``TOK`` -> ``<s0><s1>``)."""

    tokens: Mapping[str, tuple[str, ...]]

    @classmethod
    def make(cls, abstractions: str, per_abstraction: int) -> TokenPlan:
        """``"TOK"`` or ``"TOK,HAT"`` with `per_abstraction` new tokens each, numbered across all."""
        names = [a.strip() for a in abstractions.split(",") if a.strip()]
        if not names:
            raise TokenError("--token_abstraction is empty: give the word that stands for the subject, e.g. TOK")
        if len(set(names)) != len(names):
            raise TokenError(f"--token_abstraction {abstractions!r} names one abstraction twice")
        if per_abstraction < 1:
            raise TokenError(f"--num_new_tokens_per_abstraction must be >= 1, got {per_abstraction}")
        tokens, k = {}, 0
        for name in names:
            tokens[name] = tuple(f"<s{k + i}>" for i in range(per_abstraction))
            k += per_abstraction
        return cls(tokens)

    @property
    def all_tokens(self) -> list[str]:
        """Every new token string, in the order of the file's rows."""
        return [t for group in self.tokens.values() for t in group]

    def replace(self, text: str) -> str:
        """`text` with each abstraction (as a whole word) replaced by its tokens, e.g. ``<s0><s1>``."""
        return replace_abstractions(text, {name: "".join(group) for name, group in self.tokens.items()})

    def missing_from(self, prompt: str) -> list[str]:
        """The abstractions that `prompt` does not contain as a word."""
        return [name for name in self.tokens if not _word(name).search(prompt)]


def _word(name: str) -> re.Pattern:
    """`name` as a whole word (not inside another word or an existing ``<token>``)."""
    return re.compile(rf"(?<![\w<]){re.escape(name)}(?![\w>])")


def replace_abstractions(text: str, abstractions: Mapping[str, str]) -> str:
    """`text` with each abstraction word (``TOK``, whole words only) replaced by its token text."""
    for name, tokens in abstractions.items():
        text = _word(name).sub(tokens, text)
    return text


def _input_embeddings(encoder: torch.nn.Module) -> torch.nn.Embedding:
    return encoder.get_input_embeddings()


def _check_new(tokenizer, tokens: Sequence[str], which: str) -> None:
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise TokenError(
            f"the new token(s) {clash} are already in {which}'s vocabulary; a learned token must be new "
            "(another --token_abstraction, or a base model without earlier textual-inversion tokens)"
        )


def _initializer_rows(tokenizer, weight: torch.Tensor, concept: str | None, count: int, generator) -> torch.Tensor:
    """Start rows: the initializer concept's token embeddings (cycled), else random rows with the
    spread of the existing embeddings (diffusers' advanced script does the same)."""
    if concept is None:
        std = weight.float().std().item()  # a number: the rows are made on the CPU, the weight may be on a GPU
        return torch.randn(count, weight.shape[1], generator=generator) * std
    # a known word is one the tokenizer has as a whole token (not spelled out in sub-word pieces)
    ids, unknown = [], []
    for word in concept.split():
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        if len(word_ids) == 1:
            ids += word_ids
        else:
            unknown.append(word)
    if unknown or not ids:
        raise TokenError(
            f"--initializer_concept {concept!r}: {', '.join(repr(w) for w in unknown) or 'it'} is not a word the "
            "tokenizer knows (it splits into pieces); give a plain known word such as the class name (dog), or "
            "leave it out for a random start"
        )
    return torch.stack([weight[ids[k % len(ids)]].detach().float().cpu() for k in range(count)])


class LearnedTokens(torch.nn.Module):
    """The new tokens' rows for both encoders, as trainable float32 parameters.

    Construction adds the token strings to both tokenizers, grows both embedding matrices by that
    many rows, and hooks each encoder's embedding lookup so the new ids read `rows[i]`; every base row
    is left as it was. `write_into_encoders()` copies the rows into the matrices (then the encoders
    work without the hook), `remove()` takes the hooks off.
    """

    def __init__(
        self,
        plan: TokenPlan,
        tokenizers: Sequence[Any],
        encoders: Sequence[torch.nn.Module],
        initializer_concept: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.plan = plan
        tokens = plan.all_tokens
        for tokenizer, key in zip(tokenizers, ENCODER_KEYS):
            _check_new(tokenizer, tokens, f"the {key} tokenizer")
        generator = torch.Generator().manual_seed(seed)
        self.token_ids: list[list[int]] = []
        rows = []
        for tokenizer, encoder in zip(tokenizers, encoders):
            inits = _initializer_rows(
                tokenizer, _input_embeddings(encoder).weight, initializer_concept, len(tokens), generator
            )
            tokenizer.add_tokens(tokens)
            # the new rows are set right below: no need for transformers to fit a distribution to the old ones
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            weight = _input_embeddings(encoder).weight
            with torch.no_grad():
                weight[ids] = inits.to(weight.device, weight.dtype)
            self.token_ids.append(list(ids))
            rows.append(torch.nn.Parameter(inits.clone()))
        self.rows = torch.nn.ParameterList(rows)
        self._encoders = list(encoders)
        self._handles = [
            _input_embeddings(enc).register_forward_hook(self._hook(k)) for k, enc in enumerate(self._encoders)
        ]

    def _hook(self, k: int):
        first = min(self.token_ids[k])
        ids_tensor = torch.tensor(self.token_ids[k])
        contiguous = self.token_ids[k] == list(range(first, first + len(self.token_ids[k])))

        def substitute(module, args, output):
            ids = args[0]
            if contiguous:
                is_new = (ids >= first) & (ids < first + len(self.token_ids[k]))
                index = (ids - first).clamp(0, len(self.token_ids[k]) - 1)
            else:
                is_new = torch.isin(ids, ids_tensor.to(ids.device))
                index = torch.searchsorted(ids_tensor.to(ids.device), ids).clamp(0, len(self.token_ids[k]) - 1)
            if not bool(is_new.any()):
                return output
            new = self.rows[k].to(output.device, output.dtype)[index]
            return torch.where(is_new.unsqueeze(-1), new, output)

        return substitute

    def remove(self) -> None:
        """Take the lookup hooks off (after `write_into_encoders`, the encoders give the same result)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def write_into_encoders(self) -> None:
        """Copy the trained rows into both embedding matrices (in the encoders' dtype)."""
        for k, encoder in enumerate(self._encoders):
            weight = _input_embeddings(encoder).weight
            weight[self.token_ids[k]] = self.rows[k].detach().to(weight.device, weight.dtype)

    def freeze(self) -> None:
        """End of the embeddings' training (``--train_text_encoder_ti_frac``): rows written into the
        encoders, hooks off, parameters without gradient."""
        self.write_into_encoders()
        self.remove()
        for p in self.rows:
            p.requires_grad_(False)

    @property
    def frozen(self) -> bool:
        return not self._handles

    def state(self) -> dict[str, torch.Tensor]:
        """``{"clip_l": tokens x 768, "clip_g": tokens x 1280}`` (float32, CPU)."""
        return {key: row.detach().float().cpu().contiguous() for key, row in zip(ENCODER_KEYS, self.rows)}

    def save(self, path: str | Path) -> Path:
        """Write the embeddings file atomically (refusing non-finite rows)."""
        from safetensors.torch import save_file

        state = self.state()
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise TokenError(f"refusing to save non-finite token embeddings ({bad[0]}): the run diverged")
        meta = {"format": FORMAT_NAME, "tokens": json.dumps(self.plan.all_tokens),
                "token_abstractions": json.dumps({k: list(v) for k, v in self.plan.tokens.items()})}  # fmt: skip
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))

    @torch.no_grad()
    def load_(self, path: str | Path) -> None:
        """Copy a saved file's rows into these parameters in place (resume), checking the shapes."""
        state, _ = read_embeddings_file(path)
        for key, row in zip(ENCODER_KEYS, self.rows):
            if tuple(state[key].shape) != tuple(row.shape):
                raise TokenError(f"{path}: {key} is {tuple(state[key].shape)}, this run has {tuple(row.shape)}")
            row.copy_(state[key])
        if self.frozen:
            self.write_into_encoders()


def read_embeddings_file(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({"clip_l": ..., "clip_g": ...}, tokens)`` of an embeddings file, checked: both keys, 2-D,
    finite, as many rows as tokens. Token strings come from the metadata (dreamcoeff writes them),
    else ``<s0>``, ``<s1>``, ... as diffusers' advanced script names them."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
            missing = [k for k in ENCODER_KEYS if k not in keys]
            if missing:
                raise TokenError(
                    f"{path}: not an SDXL embeddings file (no {', '.join(missing)}; keys {sorted(keys)[:4]})"
                )
            state = {k: fh.get_tensor(k).float() for k in ENCODER_KEYS}
    except TokenError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
        raise TokenError(f"{path} is not a readable safetensors file ({exc})") from None
    rows = {k: v.shape[0] if v.ndim == 2 else -1 for k, v in state.items()}
    if -1 in rows.values() or len(set(rows.values())) != 1:
        raise TokenError(f"{path}: clip_l and clip_g must be (tokens x dim) with the same token count, got "
                         f"{[tuple(v.shape) for v in state.values()]}")  # fmt: skip
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise TokenError(f"{path}: non-finite values")
    count = rows["clip_l"]
    if count == 0:
        raise TokenError(f"{path}: holds no token rows (clip_l and clip_g are 0 x dim)")
    tokens = _token_names(path, meta, count)
    if len(tokens) != count:
        raise TokenError(f"{path}: {count} rows but {len(tokens)} token names in its metadata")
    return state, tokens


def _token_names(path: Path, meta: Mapping[str, str], count: int) -> list[str]:
    """The token strings of a file's metadata, checked: a JSON list of distinct, non-empty strings
    without spaces (what a tokenizer can add); ``<s0>``, ``<s1>``, ... for a file without them."""
    if "tokens" not in meta:
        return [f"<s{i}>" for i in range(count)]
    try:
        tokens = json.loads(meta["tokens"])
    except (ValueError, RecursionError):
        tokens = None
    if not (
        isinstance(tokens, list)
        and all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens)
        and len(set(tokens)) == len(tokens)
    ):
        raise TokenError(
            f"{path}: the token names in its metadata are not a list of distinct token strings "
            f"(tokens={meta['tokens'][:80]!r})"
        )
    return tokens


def token_abstractions(path: str | Path) -> dict[str, str]:
    """``{"TOK": "<s0><s1>"}`` from a dreamcoeff embeddings file's metadata ({} if it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        groups = json.loads(meta.get("token_abstractions", "{}"))
        return {str(k): "".join(v) for k, v in groups.items()}
    except Exception:  # noqa: BLE001 - metadata is optional; the file itself was checked already
        return {}


def load_embeddings_into(pipe, path: str | Path) -> list[str]:
    """Load an embeddings file into a pipeline's two encoders with diffusers' `load_textual_inversion`
    (the way a user would), after checking its dimensions; returns the token strings."""
    state, tokens = read_embeddings_file(path)
    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    for key, (encoder, _) in zip(ENCODER_KEYS, pairs):
        dim = _input_embeddings(encoder).weight.shape[1]
        if state[key].shape[1] != dim:
            raise TokenError(
                f"{path}: {key} rows have {state[key].shape[1]} numbers, this pipeline's encoder has {dim}: "
                "the embeddings were trained on another base model"
            )
    for _, tokenizer in pairs:
        vocab = tokenizer.get_vocab()
        clash = [t for t in tokens if t in vocab]
        if clash:
            raise TokenError(f"{path}: tokens {clash} are already loaded in this pipeline; unload them first")
    loaded = []
    try:
        for key, (encoder, tokenizer) in zip(ENCODER_KEYS, pairs):
            weight = _input_embeddings(encoder).weight
            pipe.load_textual_inversion(
                state[key].to(weight.device, weight.dtype), token=tokens, text_encoder=encoder, tokenizer=tokenizer
            )
            loaded.append((encoder, tokenizer))
    except BaseException:  # all or nothing: the first encoder's tokens go again if the second fails
        for encoder, tokenizer in loaded:
            pipe.unload_textual_inversion(tokens=list(tokens), text_encoder=encoder, tokenizer=tokenizer)
        raise
    return tokens


def unload_embeddings(pipe, tokens: Sequence[str]) -> None:
    """Take tokens loaded by `load_embeddings_into` out of both tokenizers and encoders again."""
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.unload_textual_inversion(tokens=list(tokens), text_encoder=encoder, tokenizer=tokenizer)
