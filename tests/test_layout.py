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


# ---- the module graph: no cycle, no upward import (TYPE_CHECKING and lazy imports counted) ---------

#: The library's layers, lowest first (docs/DESIGN.md section 5). A module imports only its own layer
#: and the layers below; the top-level folders train/, sample/ and testing/ are one layer whose parts
#: never import each other. A new module gets a line here (and in DESIGN.md) before it can pass.
LAYERS: list[tuple[str, set[str]]] = [
    ("plumbing", {"attention", "io", "locking", "images", "grids", "models", "prompts"}),
    ("alpha", {"processor", "attn_processors", "head_mix"}),
    ("files", {"weights", "lora", "tokens", "kohya"}),
    ("methods", {"methods"}),
    ("runs", {"loading", "lora_check", "inspection"}),
    ("api", {""}),  # the package's __init__: the library's public names
    ("apps", {"train", "sample", "testing"}),
    ("demo", {"demo"}),
]


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the dreamcoeff modules it imports: every import statement, inside functions and under
    ``if TYPE_CHECKING:`` too (a hint-only import still ties the two modules together). ``from pkg
    import sub`` names the submodule where ``sub`` is one, else ``pkg``."""
    files = {_module_name(p, root): p for p in _modules(root)}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        resolved = set()
        for target in targets:
            while target and target not in files:  # `dreamcoeff.io.atomic_write` -> `dreamcoeff.io`
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted: every cycle is in one."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _layer_of(module: str) -> tuple[int, str]:
    """(layer number, the top-level piece) of a dotted dreamcoeff module name."""
    top = module.split(".")[1] if "." in module else ""
    for number, (_, members) in enumerate(LAYERS):
        if top in members:
            return number, top
    raise AssertionError(f"dreamcoeff.{top} is in no layer: add it to LAYERS (tests/test_layout.py, docs/DESIGN.md)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) imports b (layer)' for each import of a higher layer, or of a sibling app."""
    wrong = []
    for module, targets in sorted(graph.items()):
        (mine, my_top) = _layer_of(module)
        for target in sorted(targets):
            (theirs, their_top) = _layer_of(target)
            if theirs > mine or (theirs == mine and LAYERS[mine][0] == "apps" and their_top != my_top):
                wrong.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return wrong


def test_no_import_cycle_between_dreamcoeff_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (hint-only and lazy imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_a_higher_layer():
    wrong = upward_imports(import_graph())
    assert not wrong, "imports from a higher layer (docs/DESIGN.md section 5):\n" + "\n".join(wrong)


def test_the_graph_scan_sees_hint_only_lazy_and_relative_imports(tmp_path):
    """A circle closed only under TYPE_CHECKING or inside a function is still a circle, and an
    upward import hidden the same ways is still upward; allowed imports are not flagged."""
    root = tmp_path / "dreamcoeff"
    (root / "train").mkdir(parents=True)
    (root / "__init__.py").write_text("from .methods import M\n")
    (root / "train" / "__init__.py").write_text("")
    (root / "methods.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .weights import W\nif TYPE_CHECKING:\n    from .train.config import C\n"
    )
    (root / "weights.py").write_text("from . import io\ndef f():\n    from .processor import P\n")
    (root / "io.py").write_text("")
    (root / "processor.py").write_text("from .attention import core\n")
    (root / "attention").mkdir()
    (root / "attention" / "__init__.py").write_text("")
    (root / "attention" / "core.py").write_text("def g():\n    import dreamcoeff.loading\n")
    (root / "loading.py").write_text("from .methods import M\n")
    (root / "train" / "config.py").write_text("from ..methods import M\nfrom .prompts import p\n")
    (root / "train" / "prompts.py").write_text("def h():\n    from .config import C\n")
    graph = import_graph(root)
    assert graph["dreamcoeff.weights"] == {"dreamcoeff.io", "dreamcoeff.processor"}
    cycles = import_cycles(graph)

    def in_one_cycle(*names: str) -> bool:
        return any({f"dreamcoeff.{n}" for n in names} <= set(c) for c in cycles)

    assert in_one_cycle("methods", "train.config"), cycles  # closed only under TYPE_CHECKING
    assert in_one_cycle("train.config", "train.prompts"), cycles  # closed only inside a function
    assert in_one_cycle("attention.core", "loading", "weights", "processor"), cycles  # lazy, absolute
    assert not in_one_cycle("io"), cycles
    wrong = upward_imports(graph)
    assert "dreamcoeff.methods (methods) imports dreamcoeff.train.config (apps)" in wrong, wrong
    assert "dreamcoeff.attention.core (plumbing) imports dreamcoeff.loading (runs)" in wrong, wrong
    assert not any(w.startswith(("dreamcoeff.weights", "dreamcoeff.loading ", "dreamcoeff ")) for w in wrong), wrong


def test_no_library_module_is_over_the_size_rule():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in SIZE_EXEMPT}
    assert not over, f"modules over ~{MAX_LINES} lines (docs/DESIGN.md): {over}; split them"
    assert len(sizes) > 40  # the scan found the package


TESTS = Path(__file__).resolve().parent


def cross_test_imports(root: Path = TESTS) -> list[str]:
    """'file imports module' for each test file (test_*.py in `root`) importing another test file, at any
    depth (function-local imports too). Shared code belongs in support modules (helpers.py, reference.py,
    conftest.py, trainer_runs.py, ...): a test file that imports a test file runs or breaks with it."""
    found = []
    for path in sorted(root.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in candidates:
                last = name.rsplit(".", 1)[-1]
                if last.startswith("test_") and (root / f"{last}.py").is_file():
                    found.append(f"{path.name} imports {name.strip('.')}")
    return found


def test_no_test_file_imports_another_test_file():
    found = cross_test_imports()
    assert not found, "move shared helpers into a support module (tests/helpers.py ...): " + "; ".join(found)


def test_the_cross_import_scan_catches_every_form(tmp_path):
    (tmp_path / "test_a.py").write_text("X = 1\n")
    (tmp_path / "helpers.py").write_text("Y = 1\n")
    forms = [
        "from tests.test_a import X",
        "from .test_a import X",
        "from . import test_a",
        "import tests.test_a",
        "def f():\n    from tests.test_a import X",
    ]
    for n, form in enumerate(forms):
        (tmp_path / f"test_b{n}.py").write_text(form + "\n")
    (tmp_path / "test_ok.py").write_text("from tests.helpers import Y\nfrom . import helpers\nimport pytest\n")
    found = cross_test_imports(tmp_path)
    assert sorted(f.split(" ")[0] for f in found) == [f"test_b{n}.py" for n in range(len(forms))], found


# ---- one run loader: only dreamcoeff/loading.py (and the format modules below it) read a run's files -----

#: The functions that read a run's files (alpha, LoRA, full UNet, learned tokens) or install them from
#: a file: safetensors' readers, the format modules' readers, and diffusers' file loaders. Outside
#: `READERS_ALLOWED` a module must go through the run loader (`dreamcoeff.loading`) instead.
RUN_FILE_READERS = {
    "safe_open", "load_file",  # safetensors
    "read_coeff_file", "load_coeff_weights", "init_coeff_from",  # weights
    "read_embeddings_file", "load_embeddings_into", "token_abstractions", "load_",  # tokens
    "load_lora_into_unet", "init_lora_from", "load_full_unet_weights", "lora_file_of",  # lora
    "load_lora_weights", "load_textual_inversion",  # diffusers' pipeline loaders
}  # fmt: skip
#: Read only as a pipeline's method (`pipe.lora_state_dict(path)` reads a file; `lora.lora_state_dict(unet)`
#: collects a UNet's tensors in memory) or as a UNet class's loader.
RUN_FILE_METHODS = {"lora_state_dict"}
#: The run loader and the format modules whose readers it calls (each reads only its own format).
READERS_ALLOWED = {"loading", "lora_check", "weights", "lora", "tokens", "kohya"}
#: Reads of files that are not a run's trained parts, each with why (module, function).
READERS_EXEMPT = {
    ("train.checkpoints", "_file_problem"),  # checkpoint integrity: any file's header against its length
    ("train.latent_cache", "get"),  # the trainer's own latent cache, not a run file
    ("__init__", "<module>"),  # the public API re-exports the format modules' readers (names, no call)
}


def run_file_reads(root: Path = PACKAGE) -> list[str]:
    """'module:line function uses reader' for every call or import of a run-file reader outside the
    loader and the format modules (a UNet class's ``from_pretrained`` outside `models`, which loads the
    base model, counts too)."""
    found = []
    for path in _modules(root):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        if module in READERS_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        owners: dict[int, str] = {}  # node id -> the function it is in
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    owners.setdefault(id(node), func.name)  # ast.walk: outer functions first
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.ImportFrom):
                name = next((a.name for a in node.names if a.name in RUN_FILE_READERS), None)
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in RUN_FILE_READERS or (isinstance(func, ast.Attribute) and called in RUN_FILE_METHODS):
                    name = called
                elif called == "from_pretrained" and "UNet" in ast.unparse(func.value) and module != "models":
                    name = "UNet.from_pretrained"
            owner = owners.get(id(node), "<module>")
            if name and (module, owner) not in READERS_EXEMPT:
                found.append(f"{module}:{node.lineno} {owner} uses {name}")
    return found


def test_only_the_run_loader_reads_a_runs_files():
    """One run loader (issue 31): the sampler, the inspector, the trainer's resume and the library API
    all read runs through `dreamcoeff.loading`; nothing else opens a run's artifact files."""
    found = run_file_reads()
    assert not found, "read runs through dreamcoeff.loading (read_run, load_run and its parts):\n" + "\n".join(found)


def test_the_run_file_scan_catches_every_form(tmp_path):
    root = tmp_path / "dreamcoeff"
    (root / "sample").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "sample" / "a.py").write_text("from safetensors import safe_open as so\n")
    (root / "sample" / "b.py").write_text(
        "def f(pipe, p):\n    pipe.load_lora_weights(p)\n    pipe.lora_state_dict(p)\n"
    )
    (root / "inspection.py").write_text("from . import weights\ndef main(p):\n    return weights.read_coeff_file(p)\n")
    (root / "sample" / "c.py").write_text("def g(U, p):\n    return U.UNet2DConditionModel.from_pretrained(p)\n")
    (root / "train" / "checkpoints.py").write_text("def _file_problem(f):\n    from safetensors import safe_open\n")
    (root / "loading.py").write_text("from safetensors import safe_open\nfrom .weights import read_coeff_file\n")
    (root / "methods.py").write_text("from .lora import lora_state_dict\ndef s(u):\n    return lora_state_dict(u)\n")
    (root / "models.py").write_text(
        "def m(UNet2DConditionModel, p):\n    return UNet2DConditionModel.from_pretrained(p)\n"
    )
    found = run_file_reads(root)
    assert sorted(f.split(" ", 1)[0] for f in found) == [
        "inspection:3", "sample.a:1", "sample.b:2", "sample.b:3", "sample.c:2"
    ], found  # fmt: skip


# ---- the Trainer's state: every attribute is checkpointed, rebuilt, or per process -----------------


def _trainer_attributes(source: str) -> set[str]:
    """Every `self.X` that class Trainer assigns (plain, annotated, augmented, tuple targets)."""
    trainer = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    names = set()
    for node in ast.walk(trainer):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            continue
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def test_every_trainer_attribute_is_placed_for_resume():
    """train/run_state.py says for each attribute of the Trainer whether a checkpoint restores it, it is
    rebuilt from the flags, or it is this process's own; a new attribute must be placed there."""
    from dreamcoeff.train.run_state import classification

    placed = classification()
    assigned = _trainer_attributes((PACKAGE / "train" / "loop.py").read_text(encoding="utf-8"))
    assert not assigned - set(placed), f"place these in dreamcoeff/train/run_state.py: {sorted(assigned - set(placed))}"
    assert not set(placed) - assigned, f"no longer Trainer attributes: {sorted(set(placed) - assigned)}"


def test_the_trainer_attribute_check_sees_every_kind_of_assignment():
    source = (
        "class Trainer:\n    def f(self):\n        self.a = 1\n        self.b: int = 2\n        self.c += 1\n"
        "        self.d, (self.e, x) = 1, (2, 3)\n        other.z = 4\n"
    )
    assert _trainer_attributes(source) == {"a", "b", "c", "d", "e"}
