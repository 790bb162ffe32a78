"""The package's layout rules (docs/architecture.md), checked on the source so that they stay true.

* dependencies point one way: core ← activations ← layers ← kernels/empirical/contrib ← posterior ← cli,
  and the packages' import graph has no cycle;
* no private ``_name`` is imported from another package;
* no module-level mutable state (no ``global`` statement, no module-level cache or registry);
* no function over 60 lines without a reason in a ``# long: ...`` comment on its first lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpntk"

#: each top-level package or module of gpntk, and its level: imports may only go to the same level or below
LEVELS = {
    "errors": 0, "settings": 0, "_validation": 0, "_transforms": 0, "_quiet_import": 0, "_progress": 0,
    "core": 1,
    "activations": 2,
    "layers": 3,
    "kernels": 4, "empirical": 4, "contrib": 4,
    "posterior": 5, "distributed": 5,
    "cli": 6, "botorch": 6,
    "__main__": 7, "testing": 7,
}
#: the lazy façade (PEP 562) re-exports from every level
FACADE = {"__init__"}
MAX_FUNCTION_LINES = 60
#: calls that build a mutable container at module level
MUTABLE_FACTORIES = {
    "dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "WeakKeyDictionary", "WeakValueDictionary",
    "WeakSet", "deque",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _top(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, imported names, line)`` for every gpntk import of ``path`` (lazy ones too)."""
    tree = ast.parse(path.read_text())
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path)[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "gpntk" or module.startswith("gpntk."):
                names = [alias.name for alias in node.names]
                if module == "gpntk":  # from gpntk import layers: the submodules are what is imported
                    found += [(f"gpntk.{name}", [], node.lineno) for name in names]
                else:
                    found.append((module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("gpntk")]
    return found


def _target_top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_top_level_package_has_a_level():
    tops = {_top(path) for path in _modules()} - FACADE
    assert tops <= set(LEVELS), f"add {sorted(tops - set(LEVELS))} to LEVELS (and to docs/architecture.md)"


def test_dependencies_point_one_way():
    wrong = []
    for path in _modules():
        source = _top(path)
        if source in FACADE:
            continue
        for module, _, line in _imports(path):
            target = _target_top(module)
            if target is not None and target in LEVELS and LEVELS[target] > LEVELS[source]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({source}, level {LEVELS[source]}) imports "
                             f"{module} (level {LEVELS[target]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_packages_import_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in _modules():
        source = _top(path)
        if source in FACADE:
            continue
        for module, _, _ in _imports(path):
            target = _target_top(module)
            if target is not None and target != source and target in LEVELS:
                graph.setdefault(source, set()).add(target)
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            pytest.fail(f"the packages import each other in a cycle: {' -> '.join(trail[trail.index(node):] + [node])}")
        if node in done:
            return
        for successor in sorted(graph.get(node, ())):
            visit(successor, trail + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_no_private_name_crosses_a_package():
    wrong = []
    for path in _modules():
        source = _top(path)
        for module, names, line in _imports(path):
            target = _target_top(module)
            private = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if private and target != source:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {', '.join(private)} from {module}")
    assert not wrong, "private names imported across packages:\n" + "\n".join(wrong)


def _is_mutable_container(value: ast.expr | None) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set)):
        return not (value.keys if isinstance(value, ast.Dict) else value.elts)  # an empty one is filled later
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in MUTABLE_FACTORIES and not value.args
    return False


def test_no_module_level_mutable_state():
    wrong = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if _is_mutable_container(value):
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: a module-level container filled at run time")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: global {', '.join(node.names)}")
    assert not wrong, "module-level mutable state:\n" + "\n".join(wrong)


def test_no_long_function_without_a_reason():
    wrong = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                above = first - 1  # the comment block right above the function (or its decorators)
                while above > 0 and lines[above - 1].lstrip().startswith("#"):
                    above -= 1
                head = "\n".join(lines[above: node.lineno + 1])
                if length > MAX_FUNCTION_LINES and "# long:" not in head:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    message = f"functions over {MAX_FUNCTION_LINES} lines with no '# long: reason' comment:\n"
    assert not wrong, message + "\n".join(wrong)
