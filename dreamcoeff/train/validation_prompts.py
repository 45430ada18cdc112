"""Validation prompts as the trainer renders them: `--validation_prompt` and `--validation_prompts FILE`.

The file holds one prompt per line (blank lines and lines starting with ``#`` are skipped) with
kohya's inline options after it, e.g. ``a photo of sks dog --n blurry --w 1024 --h 768 --d 42 --l 6.5
--s 30``: ``--n`` negative prompt, ``--w`` width, ``--h`` height, ``--d`` seed, ``--l`` guidance scale
(CFG), ``--s`` inference steps. An option not given falls back to the matching flag at render time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from .errors import UsageError


class PromptFlags(Protocol):
    """The two flags `validation_prompts` reads. The trainer's config has them; naming them here
    instead of importing it keeps config -> validation_prompts one-way (config checks the file)."""

    validation_prompt: list[str] | None
    validation_prompts: str | Path | None


#: kohya's option letters -> (field of `ValidationPrompt`, what it is, value type)
OPTIONS: dict[str, tuple[str, str, type]] = {
    "n": ("negative_prompt", "negative prompt", str),
    "w": ("width", "width", int),
    "h": ("height", "height", int),
    "d": ("seed", "seed", int),
    "l": ("guidance_scale", "guidance scale", float),
    "s": ("steps", "steps", int),
}
KNOWN = ", ".join(f"--{k} {what}" for k, (_, what, _) in OPTIONS.items())


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation prompt and its own settings (None: the run's flag decides)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None


def parse_prompt_line(line: str, where: str = "prompt") -> ValidationPrompt:
    """One line of a prompt file -> `ValidationPrompt`; `UsageError` naming `where` for a bad option."""
    text = line.strip()
    if text.startswith("--"):
        raise UsageError(f"{where}: the line starts with an option; write the prompt first, then its options")
    prompt, *parts = text.split(" --")
    prompt = prompt.strip()
    if not prompt:
        raise UsageError(f"{where}: no prompt before the options")
    values: dict[str, object] = {}
    for part in parts:
        letter, _, value = part.strip().partition(" ")
        value = value.strip()
        if letter not in OPTIONS:
            raise UsageError(f"{where}: unknown option --{letter} (known: {KNOWN})")
        name, what, kind = OPTIONS[letter]
        if not value:
            raise UsageError(f"{where}: option --{letter} ({what}) needs a value")
        if kind is not str:
            try:
                value = kind(value)
            except ValueError:
                raise UsageError(
                    f"{where}: option --{letter} ({what}) needs {'a whole number' if kind is int else 'a number'}, "
                    f"got {value!r}"
                ) from None
        if letter in ("w", "h") and (value < 8 or value % 8):
            raise UsageError(f"{where}: --{letter} {value}: the {what} must be a positive multiple of 8 (the VAE)")
        if letter == "s" and value < 1:
            raise UsageError(f"{where}: --s {value}: steps must be >= 1")
        if letter == "d" and value < 0:
            raise UsageError(f"{where}: --d {value}: the seed must be >= 0")
        if letter == "l" and value < 0:
            raise UsageError(f"{where}: --l {value}: the guidance scale must be >= 0")
        values[name] = value
    return ValidationPrompt(prompt, **values)


def parse_prompt_text(text: str, source: str = "prompts") -> list[ValidationPrompt]:
    """Every prompt of a file's text (blank lines and ``#`` comments skipped); errors name line numbers."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, where=f"{source}, line {number}"))
    return prompts


def read_prompt_file(path: str | Path) -> list[ValidationPrompt]:
    """`--validation_prompts FILE` -> its prompts; `UsageError` for a missing, unreadable or empty file."""
    source = f"--validation_prompts {path}"
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{source}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{source}: cannot read it ({exc})") from None
    prompts = parse_prompt_text(text, source)
    if not prompts:
        raise UsageError(f"{source}: no prompts in it (one per line; lines starting with # are comments)")
    return prompts


def validation_prompts(cfg: PromptFlags, rename: Callable[[str], str] | None = None) -> list[ValidationPrompt]:
    """`--validation_prompt` then the prompts of `--validation_prompts`; `rename` (the learned tokens'
    `TokenPlan.replace`) applied to each prompt and negative prompt."""
    prompts = [ValidationPrompt(p) for p in cfg.validation_prompt or []]
    if cfg.validation_prompts:
        prompts += read_prompt_file(cfg.validation_prompts)
    if rename is not None:
        prompts = [
            replace(
                p,
                prompt=rename(p.prompt),
                negative_prompt=None if p.negative_prompt is None else rename(p.negative_prompt),
            )
            for p in prompts
        ]
    return prompts
