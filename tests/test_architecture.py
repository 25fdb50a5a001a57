"""The shape of the package: no import cycles (imports inside functions count), entry points that are leaves
and thin, lower layers that never reach up, and files and functions short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vitrain"
ENTRY_POINTS = {"vitrain.train", "vitrain.evaluate", "vitrain.predict", "vitrain.visualize", "vitrain.export"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50
LONG_FUNCTIONS: dict[str, str] = {}  # "module.function": why it is longer than MAX_FUNCTION_LINES


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The vitrain modules that ``name`` imports anywhere in its source: at the top, inside functions,
    under ``TYPE_CHECKING``. ``from vitrain.a import b`` is ``vitrain.a.b`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_another_in_a_cycle() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_entry_points_are_thin_leaves() -> None:
    for name in ENTRY_POINTS:
        assert not GRAPH[name] & ENTRY_POINTS, f"{name} imports the entry point(s) {GRAPH[name] & ENTRY_POINTS}"
        assert not any(name in GRAPH[other] for other in MODULES if other not in ENTRY_POINTS), f"{name} is imported"
        lines = len(MODULES[name].read_text().splitlines())
        assert lines <= 110, f"{name} has {lines} lines: move what is not the command into the library"


@pytest.mark.parametrize(("lower", "upper"), [
    ("vitrain.models", ("vitrain.optim", "vitrain.trainer", "vitrain.data", "vitrain.build", "vitrain.config")),
    ("vitrain.data", ("vitrain.models", "vitrain.optim", "vitrain.trainer", "vitrain.build", "vitrain.config")),
    ("vitrain.trainer", ("vitrain.config", "vitrain.build", "vitrain.inference", "hydra", "omegaconf")),
    ("vitrain.checkpoint", ("vitrain.config", "vitrain.models", "hydra", "omegaconf")),
    ("vitrain.inference", ("vitrain.config", "vitrain.build", "hydra", "omegaconf")),
    ("vitrain.exporting", ("vitrain.config", "vitrain.build", "hydra", "omegaconf")),
])
def test_lower_layers_never_reach_up(lower: str, upper: tuple[str, ...]) -> None:
    """Models do not know the optimizer, the Trainer and checkpoints do not know Hydra, and so on."""
    for name, path in MODULES.items():
        if name != lower and not name.startswith(lower + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for target in targets:
                    assert not target.startswith(upper), f"{name} imports {target}"


def test_files_and_functions_are_short() -> None:
    for name, path in MODULES.items():
        source = path.read_text()
        assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path} has {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    assert f"{name}.{node.name}" in LONG_FUNCTIONS, f"{name}.{node.name} has {length} lines"


@pytest.mark.slow
def test_the_plain_python_example_trains(tmp_path: Path) -> None:
    """docs/architecture.md's notebook example, run as it stands: it learns the digits without Hydra."""
    import re
    import subprocess
    import sys

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    code = re.search(r"## Without Hydra.*?```python\n(.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    top1 = float(re.search(r"top-1 after 10 epochs: ([\d.]+)%", result.stdout).group(1))
    assert top1 > 50.0  # chance is 10%; the seeded run gives about 77%
    assert (tmp_path / "outputs" / "notebook" / "checkpoints" / "best.pt").is_file()
