"""The empirical package's place in the dependency order: it needs neither GPyTorch nor the kernels,
and the GPyTorch kernel built on it imports only its public names."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import gpntk.empirical

ROOT = Path(gpntk.empirical.__file__).parent.parent


def test_the_empirical_package_imports_neither_gpytorch_nor_later_packages():
    modules = [f"gpntk.empirical.{info.name}" for info in pkgutil.iter_modules(gpntk.empirical.__path__)]
    code = (
        f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gpytorch' or "
        "m.startswith(('gpntk.kernels', 'gpntk.posterior', 'gpntk.cli'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_kernel_module_imports_only_public_names_from_other_packages():
    tree = ast.parse((ROOT / "kernels" / "empirical.py").read_text())
    imported = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level >= 2
        for alias in node.names
    ]
    assert ("empirical.evaluation", "empirical_covariance") in imported
    assert [(module, name) for module, name in imported if name.startswith("_")] == []
