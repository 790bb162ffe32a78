"""The documentation site: every page in the nav, every image present, and a clean strict build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # comes with the docs tools (mkdocs)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


class _Loader(yaml.SafeLoader):
    """Safe YAML loading that tolerates MkDocs' ``!!python/name:`` and ``!ENV`` tags."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)


def _nav_pages(nav) -> list[str]:
    """The page paths of a (nested) MkDocs nav: strings, ``{title: page}`` and ``{title: [...]}``."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    return []


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_every_page_is_in_the_nav():
    nav = {page for page in _nav_pages(_config()["nav"]) if "://" not in page}
    pages = {path.relative_to(DOCS).as_posix() for path in _pages()}
    assert pages, "no pages under docs/"
    assert not pages - nav, f"pages missing from the nav of mkdocs.yml: {sorted(pages - nav)}"
    assert not nav - pages, f"nav entries without a page under docs/: {sorted(nav - pages)}"


_IMAGE = re.compile(
    r"!\[[^\]]*\]\(\s*<?(?P<md>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\b[^>]*\bsrc=[\"'](?P<html>[^\"']+)[\"']"
)


def test_every_image_exists():
    missing = []
    for page in _pages():
        for match in _IMAGE.finditer(page.read_text(encoding="utf-8")):
            src = match["md"] or match["html"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I):  # http:, https:, data: ...
                continue
            target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
            if not target.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {src}")
    assert not missing, "images referenced but not found:\n" + "\n".join(missing)


@pytest.mark.slow
def test_strict_build(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # the build must not need the network: any download attempt fails fast through a dead proxy
    env.update(
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        NO_PROXY="",
        no_proxy="",
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="gpntk.NTKKernel"' in api and 'class="arithmatex"' in api
    assert ":math:`" not in api and ".. math::" not in api, "reST math left unrendered in the API reference"
