"""Packaging facts the issue on codebase habits asks for: one version source, typed package."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import gpntk

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once():
    """pyproject.toml reads the version from gpntk.__version__ and writes none of its own."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert re.search(r'version\s*=\s*\{\s*attr\s*=\s*"gpntk.__version__"\s*\}', pyproject)
    assert not re.search(r'^version\s*=\s*"', pyproject, flags=re.MULTILINE)
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d*)?", gpntk.__version__)


def test_installed_metadata_agrees_with_the_package():
    try:
        installed = importlib.metadata.version("gpntk")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gpntk is not installed (run from a checkout)")
    assert installed == gpntk.__version__


def test_the_package_is_marked_typed():
    assert (Path(gpntk.__file__).parent / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()
