"""Finite networks converge to the analytic kernels: Monte Carlo over random initialisations.

For ReLU, Erf and GELU MLPs of depth 1-3, the average over 64 random initialisations
of the empirical NTK (and of the empirical NNGP ``f(x) f(x')ᵀ``, averaged over many output
channels) of ``net.finite(width)`` is compared with ``NTKKernel(net)`` / ``NNGPKernel(net)`` on a
handful of inputs (self-kernel, so diagonal included) for widths 16 ... 1024.

What is asserted, for each (activation, depth, kernel):

* the relative Frobenius error at width 1024 is at most 5 % (it is about 1-3 %);
* the error shrinks like width^-1/2: the typical error of an 8-network average (mean over 8
  seeded batches) is at least 3x smaller at width 1024 than at 16 (8x expected) with a fitted
  log-log slope in [-0.8, -0.3], and one network's spread around the mean has slope in
  [-0.7, -0.35]; pooled over all cases, the 64-network errors shrink 16 -> 1024 by >= 4x;
* every entry of the analytic kernel lies within 4.5 Monte Carlo standard errors plus an
  ``O(depth / width)`` finite-width bias allowance of the Monte Carlo mean, at widths 256 and 1024.

The estimates are seeded (deterministic). Networks run in float32 (the statistical errors are
~1e-2, float32's ~1e-6 do not matter) against float64 analytic kernels; the empirical NTK's
structured path (per-layer input and output-gradient Gram matrices, no Jacobian) makes a
width-1024 sample take milliseconds.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import gpntk
from gpntk import layers as L

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

WEIGHT_VARIANCE = {"relu": 2.0, "erf": 1.5, "gelu": 1.7}
BIAS_VARIANCE = 0.1
DEPTHS = (1, 2, 3)
WIDTHS = (16, 64, 256, 1024)
N_BATCHES, BATCH = 8, 8  # 64 networks per width, in 8 independently seeded batches
NNGP_CHANNELS_PER_WIDTH = 4  # NNGP estimates average over out_features = 4 * width channels
SEED = 0

CASES = [(act, depth, kind) for act in WEIGHT_VARIANCE for depth in DEPTHS for kind in ("ntk", "nngp")]
IDS = [f"{act}-depth{depth}-{kind}" for act, depth, kind in CASES]


def _inputs() -> torch.Tensor:
    """Six inputs in 5-D: generic directions, a nearly opposite pair, and one of small norm."""
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]
    x[5] = 0.3 * x[5]
    return x


@functools.lru_cache(maxsize=None)
def _study(act: str, depth: int, kind: str) -> dict:
    """Analytic kernel and, per width, Monte Carlo estimates from ``N_BATCHES`` seeded batches.

    ``mean``/``se``: over all ``N_BATCHES * BATCH`` networks. ``error``: relative Frobenius error
    of that mean. ``batch_error``: the average over batches of the error of each batch's mean —
    the typical error of a ``BATCH``-network average, a much steadier statistic than one
    realised error (which is often dominated by a single random overall-scale fluctuation).
    ``spread``: the relative spread of one network's kernel around the mean.
    """
    net = L.mlp(depth, act, weight_variance=WEIGHT_VARIANCE[act], bias_variance=BIAS_VARIANCE)
    x = _inputs()
    kernel = gpntk.NTKKernel(net) if kind == "ntk" else gpntk.NNGPKernel(net)
    exact = kernel(x, x).to_dense()
    norm = exact.norm()
    case = CASES.index((act, depth, kind))
    results = {}
    for width in WIDTHS:
        out_features = 1 if kind == "ntk" else NNGP_CHANNELS_PER_WIDTH * width
        means, ses = [], []
        for batch in range(N_BATCHES):
            mean, se = gpntk.monte_carlo_kernel(
                net, x.float(), width=width, n_samples=BATCH, kind=kind, out_features=out_features,
                seed=SEED + 100_000 * case + 100 * width + batch,
            )
            means.append(mean.double())
            ses.append(se.double())
        mean = torch.stack(means).mean(0)
        se = torch.stack(ses).square().sum(0).sqrt() / N_BATCHES
        results[width] = {
            "mean": mean,
            "se": se,
            "error": ((mean - exact).norm() / norm).item(),
            "batch_error": float(np.mean([((m - exact).norm() / norm).item() for m in means])),
            "spread": ((se * math.sqrt(N_BATCHES * BATCH)).norm() / norm).item(),
        }
    return {"exact": exact, "widths": results}


@pytest.mark.parametrize("act,depth,kind", CASES, ids=IDS)
def test_converges_at_width_1024(act, depth, kind):
    study = _study(act, depth, kind)
    assert study["widths"][1024]["error"] <= 0.05, {w: r["error"] for w, r in study["widths"].items()}


@pytest.mark.parametrize("act,depth,kind", CASES, ids=IDS)
def test_error_shrinks_like_inverse_sqrt_width(act, depth, kind):
    study = _study(act, depth, kind)
    batch_errors = [study["widths"][w]["batch_error"] for w in WIDTHS]
    spreads = [study["widths"][w]["spread"] for w in WIDTHS]
    # the typical error of an 8-network average: √(1024 / 16) = 8 times smaller at width 1024
    assert batch_errors[0] >= 3.0 * batch_errors[-1], dict(zip(WIDTHS, batch_errors))
    slope = np.polyfit(np.log(WIDTHS), np.log(batch_errors), 1)[0]
    assert -0.8 <= slope <= -0.3, (slope, dict(zip(WIDTHS, batch_errors)))
    # one network's kernel scatters around the limit by O(width^-1/2)
    slope = np.polyfit(np.log(WIDTHS), np.log(spreads), 1)[0]
    assert -0.7 <= slope <= -0.35, (slope, dict(zip(WIDTHS, spreads)))


def test_realised_errors_shrink_across_all_cases():
    # the errors of the full 64-network averages, 16 vs 1024, pooled over every case (a single
    # realised error is too random for a per-case factor; their geometric mean is steady)
    ratios = [_study(*case)["widths"][16]["error"] / _study(*case)["widths"][1024]["error"] for case in CASES]
    assert math.exp(np.mean(np.log(ratios))) >= 4.0, ratios


@pytest.mark.parametrize("act,depth,kind", CASES, ids=IDS)
def test_analytic_kernel_within_monte_carlo_error(act, depth, kind):
    study = _study(act, depth, kind)
    exact = study["exact"]
    scale = exact.diagonal().sqrt()
    scale = scale[:, None] * scale[None, :]
    for width in (256, 1024):
        r = study["widths"][width]
        deviation = (r["mean"] - exact).abs()
        allowance = 4.5 * r["se"] + 2.0 * depth / width * scale
        assert (deviation <= allowance).all(), (width, (deviation / r["se"]).max().item())
