"""Every script in examples/ runs to the end."""

import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the figures an example saves go to the current directory
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()
