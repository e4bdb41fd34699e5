"""The package's layering: no import cycles, no layer importing a higher one, only the CLI importing studies.

Imports are read from the source with `ast`, so the test sees every import, including those
inside functions (which must each carry a one-line reason: see `test_function_level_imports`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "offsite"

# Lowest first. A module may import from its own layer and from the layers before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("infrastructure", ("offsite", "offsite.errors", "offsite.constants", "offsite.config", "offsite.files",
                        "offsite.arch", "offsite.assets", "offsite.allocator", "offsite.loading",
                        "offsite.processes", "offsite.numerics", "offsite.checkpoints", "offsite.device",
                        "offsite.weights", "offsite.parallel", "offsite.kinds", "offsite.heads")),
    ("data", ("offsite.data",)),
    ("scoring", ("offsite.scoring",)),
    ("emulator", ("offsite.emulator",)),
    ("training", ("offsite.training",)),
    ("exchange", ("offsite.exchange",)),
    ("api", ("offsite.api",)),
    ("federation", ("offsite.federation",)),
    ("lmeval", ("offsite.lmeval",)),
    ("service", ("offsite.service",)),
    ("studies", ("offsite.studies",)),
    ("cli", ("offsite.cli",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names `module`."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py"
    return best


def imports(path: Path, package: str) -> list[tuple[str, int, bool]]:
    """(imported offsite module, line, inside a function) for each import in the file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []
    known = modules()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("offsite"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.startswith("offsite"):
                    for alias in child.names:  # `from offsite import data` imports the module offsite.data
                        target = f"{base}.{alias.name}"
                        found.append((target if target in known else base, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges[name] = {target for target, _, _ in imports(path, package) if target in known and target != name}
    return edges


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)


def test_no_layer_imports_a_higher_one():
    wrong = []
    for name, targets in graph().items():
        if name == "offsite":
            continue  # the package's lazy exports name the API, loaded on first use (see __init__.py)
        for target in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_imports_studies():
    studies = layer_of("offsite.studies")
    wrong = [f"{name} imports {target}" for name, targets in graph().items() for target in targets
             if layer_of(target) == studies and layer_of(name) not in (studies, layer_of("offsite.cli"))]
    assert not wrong, "\n".join(wrong)


def test_function_level_imports():
    """An import inside a function is allowed only for startup time, with a comment on that line saying why."""
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)) and "#" not in lines[child.lineno - 1]:
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{child.lineno}: {lines[child.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a one-line reason:\n" + "\n".join(sorted(set(unexplained)))


def test_the_layer_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: two modules importing each other are found."""
    package = tmp_path / "offsite"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from offsite.files import x\n")
    (package / "files.py").write_text("from offsite import errors\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert graph() == {"offsite": set(), "offsite.errors": {"offsite.files"}, "offsite.files": {"offsite.errors"}}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
