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


# --- the snippets of docs/gpytorch-users.md run, and do what they say ----------------------------
def _snippets(page: str) -> list[str]:
    """The ```python blocks of ``docs/<page>``, in order."""
    text = (DOCS / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "snippet"}
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102  # the documentation's own code
    return namespace


def test_gpytorch_users_snippets_run():
    import gpytorch
    import torch

    first, second, third = _snippets("gpytorch-users.md")
    # 1. the exact GP: the MLL improves and the prediction is the exact GP posterior of the fitted model
    ns = _run(first)
    assert ns["losses"][-1] < ns["losses"][0] - 0.1
    model, likelihood = ns["model"], ns["likelihood"]
    train_x, train_y, test_x = ns["train_x"], ns["train_y"], ns["test_x"]
    with torch.no_grad():
        noise = likelihood.noise.item()
        constant = model.mean_module.constant.item()
        gram = model.covar_module(train_x).to_dense() + noise * torch.eye(len(train_x), dtype=torch.float64)
        cross = model.covar_module(test_x, train_x).to_dense()
    expected = constant + cross @ torch.linalg.solve(gram, train_y - constant)
    torch.testing.assert_close(ns["mean"], expected, rtol=1e-6, atol=1e-8)
    assert bool((ns["lower"] < ns["mean"]).all() and (ns["mean"] < ns["upper"]).all())
    # 2. the sum is the sum of its parts; the multitask model predicts for task 1
    ns = _run(second)
    kernel, x = ns["trend_plus_season"], ns["x"]
    with torch.no_grad():
        parts = sum(k(x).to_dense() for k in kernel.kernels)
    torch.testing.assert_close(ns["K"], parts)
    assert ns["task1"].mean.shape == (8,) and bool(torch.isfinite(ns["task1"].variance).all())
    # 3. at a smaller n (the snippet says 3000): CG agrees with Cholesky on the fitted model; the SVGP fits
    small = third.replace("n = 3000  # training points", "n = 300  # training points")
    assert small != third
    ns = _run(small)
    model, likelihood = ns["model"], ns["likelihood"]
    model.train()  # drop the CG prediction cache
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6), gpytorch.settings.fast_computations(
        False, False, False
    ):
        exact = likelihood(model(ns["test_x"])).mean
    assert float((ns["cg_mean"] - exact).norm() / exact.norm()) < 1e-2
    assert ns["svgp_losses"][-1] < ns["svgp_losses"][0]
    assert ns["svgp_mean"].shape == (20,) and bool(torch.isfinite(ns["svgp_mean"]).all())
