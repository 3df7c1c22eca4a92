"""The code layout's rules: no import cycle between modules, `pretrain` never imports `finetune`,
and modules and functions small enough to read in one sitting."""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("pretrain", "finetune")
MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 85  # "about 80"


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours imported when `path` is imported: module-level imports, not those inside
    functions or `if TYPE_CHECKING:` blocks."""
    imported = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                imported.add(submodule if submodule in modules else node.module)
    return {name for name in imported if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _top_level_imports(path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "visiting" or "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "visiting"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "visiting":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_and_the_finder_sees_one():
    assert _find_cycle(_graph()) is None, " -> ".join(_find_cycle(_graph()))
    # the check itself finds a cycle when there is one
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_pretrain_never_imports_finetune():
    for name, imports in _graph().items():
        if name.startswith("pretrain"):
            assert not any(target.startswith("finetune") for target in imports), name


def test_modules_and_functions_fit_a_sitting():
    for name, path in _modules().items():
        source = path.read_text()
        assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name} is too long"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {length} lines"
