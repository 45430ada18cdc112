"""tools/dead_code.py (run by `make lint`) finds what nothing calls, and the package has none."""

from __future__ import annotations

import importlib.util
from dataclasses import field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("dead_code", ROOT / "tools" / "dead_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_dead_code():
    tool = _tool()
    assert tool.unused_names() == [] and tool.unread_flags() == []


def test_an_unused_function_and_an_unread_flag_are_found(tmp_path, monkeypatch):
    tool = _tool()
    package = tmp_path / "dreamcoeff"
    package.mkdir()
    (package / "m.py").write_text("def used():\n    return 1\n\n\ndef forgotten():\n    return 2\n\nused()\n")
    monkeypatch.setattr(tool, "PACKAGE", package)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "USERS", [])
    assert tool.unused_names() == ["dreamcoeff/m.py:5: unused function 'forgotten'"]

    from dreamcoeff.train import config

    monkeypatch.setattr(tool, "PACKAGE", ROOT / "dreamcoeff")
    monkeypatch.setitem(config.FIELDS, "flag_nobody_reads", field(default=None))
    assert tool.unread_flags() == ["trainer flag --flag_nobody_reads: no code reads cfg.flag_nobody_reads"]
