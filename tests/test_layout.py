"""The layout rules of docs/DESIGN.md, checked on the source: dependencies point down, and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dreamcoeff"
#: Kernels and test-support builders are exempt from the size rule, as DESIGN.md says.
SIZE_EXEMPT = {"attention/triton_kernels.py", "testing/tiny.py", "testing/microworld.py"}
MAX_LINES = 650


def _modules(root: Path = PACKAGE) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under ``if TYPE_CHECKING:`` (type hints import nothing at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported(path: Path, root: Path = PACKAGE) -> set[str]:
    """The dreamcoeff modules `path` imports at run time (absolute dotted names), lazy imports inside
    functions included, type-checking-only imports not."""
    package = list(path.relative_to(root.parent).parts[:-1])  # the package the module's file is in
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)  # `from . import data`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "dreamcoeff" or n.startswith("dreamcoeff.")}


def _area_of_module(name: str) -> str | None:
    """'train', 'sample', 'testing', 'demo' or 'library' (everything below them) for a dotted name."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in ("train", "sample", "testing", "demo") else "library"


def _area(path: Path, root: Path = PACKAGE) -> str:
    """The area of the module in file `path`."""
    return _area_of_module(".".join(("dreamcoeff", *path.relative_to(root).with_suffix("").parts)))


# What each area may import from the others (its own area is always allowed).
ALLOWED = {
    "library": {"library"},
    "train": {"library"},
    "sample": {"library"},
    "testing": {"library"},
    "demo": {"library", "train", "sample", "testing"},
}


def layering_violations(root: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in _modules(root):
        area = _area(path, root)
        for name in _imported(path, root):
            other = _area_of_module(name)
            if other is not None and other != area and other not in ALLOWED[area]:
                wrong.append(f"{path.relative_to(root)} ({area}) imports {name} ({other})")
    return wrong


def test_dependencies_point_down():
    """The library never imports the trainer, the sampler or the test worlds; train and sample never
    import each other."""
    wrong = layering_violations()
    assert not wrong, "\n".join(wrong)


def test_the_import_scan_catches_every_form_of_an_upward_import(tmp_path):
    """The scan must see what it guards against: relative, lazy (inside a function), `from . import`
    and absolute imports, at any depth; and it must not flag what is allowed."""
    root = tmp_path / "dreamcoeff"
    for folder in ("train", "sample", "attention"):
        (root / folder).mkdir(parents=True)
    (root / "loading.py").write_text("def f():\n    from .sample.adapters import lora_problems\n")
    (root / "attention" / "core.py").write_text("from .. import train\n")
    (root / "train" / "loop.py").write_text(
        "import dreamcoeff.sample.render\nfrom ..lora import add_lora\nfrom . import optim\n"
    )
    (root / "demo.py").write_text("from .train import main\nfrom .sample import cli\n")
    (root / "methods.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .train.config import C\n"
    )
    wrong = layering_violations(root)
    assert any(w.startswith("loading.py (library) imports dreamcoeff.sample.adapters") for w in wrong), wrong
    assert any(w.startswith("attention/core.py (library) imports dreamcoeff.train") for w in wrong), wrong
    assert any(w.startswith("train/loop.py (train) imports dreamcoeff.sample.render") for w in wrong), wrong
    assert not any(
        "dreamcoeff.lora " in w or "train.optim" in w or w.startswith(("demo.py", "methods.py")) for w in wrong
    ), wrong


def test_no_library_module_is_over_the_size_rule():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in SIZE_EXEMPT}
    assert not over, f"modules over ~{MAX_LINES} lines (docs/DESIGN.md): {over}; split them"
    assert len(sizes) > 40  # the scan found the package
