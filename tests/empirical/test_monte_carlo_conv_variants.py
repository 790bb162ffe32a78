"""Finite transposed and locally connected convolutional networks converge to their analytic kernels.

Three architectures, each with one hidden layer (so the Monte Carlo estimates are unbiased at any
width) and a plausible wrong twin:

* ``transpose1d``: ``ConvTranspose(3, stride=2, "same")``, ReLU, GlobalAvgPool (the full
  position-by-position covariance), dense readout; inputs 2 x 4. Twin: 2 taps instead of 3 (the
  ``"valid"`` twin is only 2-3 % away after the pooling).
* ``transpose2d``: ``ConvTranspose((2, 3), stride=(2, 1), "valid")``, Erf, Flatten, dense readout;
  inputs 1 x 3 x 3. Twin: ``"same"`` padding.
* ``local1d``: ``ConvLocal(3, "same")``, ReLU, GlobalAvgPool, dense readout; inputs 2 x 5 (the
  zero covariance between different positions reaches the pooling through the ReLU's mean).
  Twin: ``Conv`` with shared weights.

For each, the mean over 128 seeded networks (16 batches of 8, ``gpntk.monte_carlo_kernel``, float64)
of the empirical NTK and of the empirical NNGP (over ``width`` output channels) of
``net.finite(width)`` is compared with ``NTKKernel`` / ``NNGPKernel`` on 5 inputs (one nearly
opposite to the first, one of small norm), at widths 16 and 256. Asserted: every entry within 4.5
standard errors at both widths; at width 256 the relative Frobenius error at most 3 % (measured
0.3-1.2 %, largest |error|/se 2.2); the typical error of an 8-network mean at least 2.5x smaller at
256 than at 16 (4x expected, measured 3.4-4.3x); the wrong twin's kernel more than 3 % and at least
4x further away than the right one (measured 8.6-30 %).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import gpntk
from gpntk import layers as L

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

N_BATCHES, BATCH = 16, 8
WIDTHS = (16, 256)
TOLERANCE = 0.03
N_SE = 4.5


def _transpose1d(kernel_size=3):
    return L.serial(
        L.ConvTranspose(kernel_size, stride=2, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
        L.GlobalAvgPool(), L.Dense(2.0, 0.1),
    )


def _transpose2d(padding="valid"):
    return L.serial(
        L.ConvTranspose((2, 3), stride=(2, 1), padding=padding, weight_variance=2.0, bias_variance=0.1), L.Erf(),
        L.Flatten(), L.Dense(2.0, 0.1),
    )


def _local1d(local=True):
    layer = L.ConvLocal if local else L.Conv
    return L.serial(
        layer(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(),
        L.Dense(2.0, 0.1),
    )


class Architecture(NamedTuple):
    net: L.Layer
    wrong: L.Layer
    input_shape: tuple[int, ...]


ARCHITECTURES = {
    "transpose1d": Architecture(_transpose1d(), _transpose1d(kernel_size=2), (2, 4)),
    "transpose2d": Architecture(_transpose2d(), _transpose2d("same"), (1, 3, 3)),
    "local1d": Architecture(_local1d(), _local1d(local=False), (2, 5)),
}
CASES = [(name, kind) for name in ARCHITECTURES for kind in ("ntk", "nngp")]
IDS = [f"{name}-{kind}" for name, kind in CASES]


def _inputs(name: str) -> torch.Tensor:
    shape = ARCHITECTURES[name].input_shape
    x = torch.randn(5, math.prod(shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]
    x[-1] = 0.3 * x[-1]
    return x


def _exact(net: L.Layer, name: str, kind: str) -> torch.Tensor:
    cls = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    with torch.no_grad():
        return cls(net, input_shape=ARCHITECTURES[name].input_shape)(_inputs(name)).to_dense()


def _relative_error(mean: torch.Tensor, exact: torch.Tensor) -> float:
    return ((mean - exact).norm() / exact.norm()).item()


@functools.lru_cache(maxsize=None)
def _study(name: str, kind: str) -> dict:
    arch = ARCHITECTURES[name]
    x = _inputs(name)
    exact = _exact(arch.net, name, kind)
    case = CASES.index((name, kind))
    results = {}
    for width in WIDTHS:
        means, ses = [], []
        for batch in range(N_BATCHES):
            mean, se = gpntk.monte_carlo_kernel(
                arch.net, x, width=width, n_samples=BATCH, kind=kind, out_features=1 if kind == "ntk" else width,
                seed=10_000 * case + 100 * width + batch, input_shape=arch.input_shape,
            )
            means.append(mean)
            ses.append(se)
        mean = torch.stack(means).mean(0)
        se = torch.stack(ses).square().sum(0).sqrt() / N_BATCHES
        results[width] = {
            "mean": mean,
            "se": se,
            "error": _relative_error(mean, exact),
            "batch_error": float(np.mean([_relative_error(m, exact) for m in means])),
        }
    return {"exact": exact, "widths": results}


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_monte_carlo_converges_to_the_analytic_kernel(name, kind):
    study = _study(name, kind)
    exact, widths = study["exact"], study["widths"]
    for width, r in widths.items():
        z = ((r["mean"] - exact).abs() / r["se"]).max().item()
        assert z <= N_SE, (width, z)  # one hidden layer: unbiased at every width
    assert widths[WIDTHS[-1]]["error"] <= TOLERANCE, {w: r["error"] for w, r in widths.items()}
    assert widths[WIDTHS[0]]["batch_error"] >= 2.5 * widths[WIDTHS[-1]]["batch_error"]


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_wrong_twin_is_rejected(name, kind):
    study, arch = _study(name, kind), ARCHITECTURES[name]
    r = study["widths"][WIDTHS[-1]]
    wrong = _relative_error(r["mean"], _exact(arch.wrong, name, kind))
    assert wrong > TOLERANCE, wrong
    assert wrong >= 4.0 * r["error"], (wrong, r["error"])
