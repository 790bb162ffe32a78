"""The snippets of docs/botorch-users.md run as written, in order, in one namespace."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("botorch")  # an optional extra: gpntk[botorch]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "botorch-users.md"


def test_the_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for block in blocks:
            exec(compile(block, str(PAGE), "exec"), namespace)
    candidates = namespace["candidates"]
    assert candidates.shape == (2, 6) and ((candidates >= 0) & (candidates <= 1)).all()
    assert namespace["model"].regime == "ntkgp"  # the last snippet's model
