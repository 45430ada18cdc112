"""The documentation stays true to the code: the flag reference is generated from the parsers and
complete, the README is a short front door, and every relative link points at a file."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_MD = ROOT / "docs" / "cli.md"
#: Written by another piece of work; its link is checked once the file exists.
PENDING = {ROOT / "docs" / "pipelines.md"}


def _generator():
    spec = importlib.util.spec_from_file_location("write_cli_docs", ROOT / "tools" / "write_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser_flags() -> dict[str, set[str]]:
    """Every option string of each documented parser (aliases and --no- forms included), --help aside."""
    flags = {}
    for title, parser in _generator().parsers():
        flags[title] = {s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings}
    return flags


def _documented_flags() -> set[str]:
    """The flags in the first column of docs/cli.md's tables."""
    text = CLI_MD.read_text(encoding="utf-8")
    return {
        flag for row in re.findall(r"^\| (`--[^|]+) \|", text, flags=re.M) for flag in re.findall(r"`(--[^`]+)`", row)
    }


def test_every_flag_of_both_parsers_is_documented():
    flags = _parser_flags()
    assert len(flags) == 2 and all(len(f) > 10 for f in flags.values())
    documented = _documented_flags()
    for title, names in flags.items():
        missing = sorted(names - documented)
        assert not missing, f"{title}: flags missing from docs/cli.md: {missing}; run python tools/write_cli_docs.py"


def test_every_documented_flag_exists():
    known = set().union(*_parser_flags().values())
    stale = sorted(_documented_flags() - known)
    assert not stale, f"docs/cli.md documents flags that no longer exist: {stale}; run python tools/write_cli_docs.py"


def test_cli_md_is_what_the_generator_writes():
    assert CLI_MD.read_text(encoding="utf-8") == _generator().render(), (
        "docs/cli.md is stale (a flag was added or changed): run python tools/write_cli_docs.py (or make docs)"
    )


def test_generated_rows_show_defaults_and_aliases():
    """Spot checks against the parsers' own values, so the rendering itself can fail."""
    text = CLI_MD.read_text(encoding="utf-8")
    assert "| `--instance_data_dir`, `--instance_dir` | — |" in text
    assert "| `--coeff_lr` | `0.001` |" in text
    assert "| `--seeds` | `0` |" in text
    assert "| `--output`, `--output_dir` | required |" in text
    assert re.search(r"^### speed and memory$", text, flags=re.M) and re.search(r"^### metrics", text, flags=re.M)


def test_generator_refuses_notes_for_flags_that_do_not_exist(monkeypatch):
    gen = _generator()
    monkeypatch.setitem(gen.NOTES, "--no_such_flag", "x")
    with pytest.raises(SystemExit, match="--no_such_flag"):
        gen.render()


def test_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text
    assert "accelerate launch train_dreambooth_coeff.py" in text and "StableDiffusionXLPipeline" in text
    for page in ("cli", "using-alpha", "evidence", "benchmarks", "DESIGN", "RELIABILITY", "pipelines", "training"):
        assert f"](docs/{page}.md)" in text, f"README does not link docs/{page}.md"


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code is not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target = (page.parent / link.split("#", 1)[0]).resolve()
        if not target.exists() and target not in PENDING:
            broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"
