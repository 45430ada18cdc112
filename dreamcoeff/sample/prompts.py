"""Prompt files: finding one (a path or a packaged name), reading it, filling ``{token}`` / ``{class}``.

Prompts are read as templates (:func:`read_prompt_templates`) and filled per row
(:func:`fill_prompts`): ``{token}`` is ``--token`` for the base model and runs without learned
tokens, and a run's own learned tokens (``<s0><s1>``) for its rows.

The packaged prompt files (``dreambooth_live``, ``dreambooth_objects``, ``validation``) ship in
:mod:`dreamcoeff.prompts` and are read with :mod:`importlib.resources`, so they are found from any
working directory and in any installation.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SamplingError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "PLACEHOLDERS",
    "format_prompt",
    "prompt_tag",
    "packaged_prompt_files",
    "find_prompt_file",
    "read_prompt_file",
    "PromptTemplate",
    "read_prompt_templates",
    "fill_prompts",
]

#: Placeholders a prompt may use: ``{token}`` (the rare identifier, e.g. "sks") and ``{class}``.
PLACEHOLDERS = ("token", "class")

_PACKAGE = "dreamcoeff.prompts"
_SUFFIX = ".txt"


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


def prompt_tag(index: int, count: int) -> str:
    """Prompt ``index`` of ``count`` as file names and labels call it: ``p00``, ``p01``, ... (2 digits at least)."""
    return f"p{index:0{max(2, len(str(count - 1)))}d}"


def packaged_prompt_files() -> list[str]:
    """Names (without ``.txt``) of the prompt files that ship with dreamcoeff, sorted."""
    folder = resources.files(_PACKAGE)
    return sorted(f.name[: -len(_SUFFIX)] for f in folder.iterdir() if f.name.endswith(_SUFFIX) and f.is_file())


def _packaged(name: str) -> Path | Traversable | None:
    """The packaged prompt file called ``name`` (with or without ``.txt``), or None."""
    file_name = name if name.endswith(_SUFFIX) else name + _SUFFIX
    resource = resources.files(_PACKAGE).joinpath(file_name)
    return resource if resource.is_file() else None


def find_prompt_file(name: str | Path) -> Path | Traversable:
    """The prompt file ``--prompts`` names: an existing path, else a packaged prompt file.

    A bare name (``dreambooth_live``, ``validation.txt``) or a path in a folder called ``prompts``
    that does not exist (``prompts/dreambooth_live.txt``, the layout of older versions, where the
    files lived in the repository) is looked up among :func:`packaged_prompt_files`. Anything else is
    returned as given, so that :func:`read_prompt_file` reports it missing.
    """
    path = Path(name)
    if path.exists():
        return path
    if path.parent == Path(".") or path.parent.name == "prompts":
        packaged = _packaged(path.name)
        if packaged is not None:
            return packaged
    return path


def _read_text(path: Path | Traversable) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SamplingError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise SamplingError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise SamplingError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SamplingError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None


def _prompt_lines(path: str | Path | Traversable) -> list[tuple[str, str]]:
    """``(line, "file:lineno")`` of every prompt line (blank lines and ``#`` comments skipped)."""
    if not hasattr(path, "read_text"):  # a str or another os.PathLike
        path = Path(path)
    lines = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append((line, f"{path}:{lineno}"))
    if not lines:
        raise SamplingError(f"prompt file {path} holds no prompts (only blank lines and # comments)")
    return lines


def read_prompt_file(path: str | Path | Traversable, token: str | None, class_name: str | None) -> list[str]:
    """Read one prompt per line, filling ``{token}`` / ``{class}``.

    ``path`` is a file path or a packaged resource (see :func:`find_prompt_file`). Blank lines and
    lines whose first non-blank character is ``#`` are skipped. Raises :class:`SamplingError` for a
    missing or unreadable file, a file without prompts, or a bad line (the message gives ``file:line``).
    """
    return [format_prompt(line, token, class_name, where=where) for line, where in _prompt_lines(path)]


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt with its placeholders still open, and where it came from (``file:line``, ``--prompt 1``)."""

    text: str
    where: str = "prompt"

    def check(self) -> PromptTemplate:
        """This template, its syntax checked (unknown placeholders, braces, format specs)."""
        format_prompt(self.text, "token", "class", where=self.where)
        return self

    def fill(self, token: str | None, class_name: str | None) -> str:
        """The prompt text with ``{token}`` / ``{class}`` filled (see :func:`format_prompt`)."""
        return format_prompt(self.text, token, class_name, where=self.where)


def read_prompt_templates(path: str | Path | Traversable) -> list[PromptTemplate]:
    """Like :func:`read_prompt_file`, but the prompts' placeholders are left open (each checked)."""
    return [PromptTemplate(line, where).check() for line, where in _prompt_lines(path)]


def fill_prompts(
    templates: Sequence[PromptTemplate],
    token: str | None,
    class_name: str | None,
    learned: Mapping[str, str] | None = None,
    token_needed: bool = True,
) -> tuple[list[str], dict[str, list[str]]]:
    """``(prompts, run_prompts)``: the prompts of rows without learned tokens (``{token}`` = `token`),
    and for each run in `learned` (run name -> its token text, ``<s0><s1>``) its own prompts.

    `token_needed` says whether any row reads `prompts` (the base row, a run without learned tokens):
    if not and `token` is None, ``{token}`` stays as written in `prompts`, which then only label the
    grid's columns. A row that needs ``{token}`` without a value is today's error (``--token``).
    """
    if token is None and not token_needed:
        token = "{token}"
    prompts = [t.fill(token, class_name) for t in templates]
    run_prompts = {name: [t.fill(text, class_name) for t in templates] for name, text in (learned or {}).items()}
    return prompts, run_prompts
