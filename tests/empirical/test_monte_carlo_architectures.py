"""Finite convolutional, pooling, residual and normalised networks converge to their analytic kernels.

Five architectures (``ARCHITECTURES``):

* ``cnn1d``: 1-D circular convolution, ReLU, global average pooling, dense readout (inputs 2 x 8);
* ``cnn2d``: two 2-D convolutions ("same" padding) with ReLUs, Flatten, dense readout (1 x 5 x 5);
* ``resmlp``: Dense, a residual block ``h + Dense(ReLU(Dense(ReLU(h))))`` (FanOut, parallel with
  an Identity branch, FanInSum), ReLU, dense readout (vectors, 5-D);
* ``pool2d``: 2-D convolution, ReLU, AvgPool(2), 2x2 convolution, ReLU, GlobalAvgPool, dense
  readout (2 x 4 x 4);
* ``normcat``: Dense, LayerNorm, FanOut into a ReLU and an Erf branch (each ending in its own
  Dense), FanInConcat, dense readout (vectors, 5-D).

For each, the average over random initialisations (``gpntk.monte_carlo_kernel``, float64
networks) of the empirical NTK, and of the empirical NNGP ``f(x) f(x')ᵀ`` averaged over
``2 * width`` output channels, of ``net.finite(width, input_shape=...)`` is compared with
``NTKKernel`` / ``NNGPKernel(net, input_shape=...)`` on 4-5 inputs (self-kernel, diagonal
included), at widths 16, 64 and 512 (256 for ``cnn2d``, whose wide networks are slow and whose
kernels, averaged over 25 positions, are the least noisy). 128 networks per width, in 16
independently seeded batches of 8.

What is asserted, for each (architecture, kernel):

* at the largest width the relative Frobenius error of the 128-network mean is at most 4 %
  (it is 0.1-2 %; the expected error, spread / sqrt(128), is at most a third of the bound);
* every entry of the analytic kernel lies within ``4 * stderr + bias`` of the Monte Carlo mean at
  every width but 16, with the finite-width bias allowance ``2 * depth / width * sqrt(K(x, x)
  K(x', x'))`` (``depth``: hidden layers on the longest path; as in ``test_monte_carlo.py``).
  With one hidden layer (``cnn1d``) the estimates are unbiased at any width, which is checked
  with no allowance at all;
* the estimates converge: the relative spread of one network's kernel around the mean shrinks
  like ``width^-1/2`` (fitted log-log slope in [-0.75, -0.3], at least 2.5x smaller at the
  largest width than at 16; 4-5.7x expected), and so does the typical error of an 8-network
  average (mean over the 16 batches): at least 2.5x smaller at the largest width than at 16;
* the checks can fail: each architecture has a plausible wrong twin (padding, skip branch or
  LayerNorm changed; kernels 9-46 % away); its kernel, compared with the same Monte Carlo
  estimate, must exceed the 4 % bound, lie outside the per-entry bound by at least 2x somewhere,
  and be at least 4x further from the estimate than the right kernel;
* the structured empirical NTK (per-layer input and output-gradient products; a convolution is
  an ``NTKLinear`` on patches, applied at every output position) equals the full-Jacobian one to
  1e-10 for each finite network, for ``x1 != x2``, several output channels and ``reduce="none"``.

The estimates are seeded (deterministic).
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

N_BATCHES, BATCH = 16, 8  # 128 networks per width, in 16 independently seeded batches
NNGP_CHANNELS_PER_WIDTH = 2  # NNGP estimates average over out_features = 2 * width channels
TOLERANCE = 0.04  # relative Frobenius error at the largest width
N_SE = 4.0  # per-entry bound: N_SE standard errors ...
BIAS_PER_LAYER = 2.0  # ... plus BIAS_PER_LAYER * depth / width * sqrt(K(x, x) K(x', x'))
SEED = 0


def _cnn1d(padding="circular"):
    return L.serial(
        L.Conv(3, padding=padding, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(),
        L.Dense(2.0, 0.1),
    )


def _cnn2d(second_padding="same"):
    return L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.05), L.ReLU(),
        L.Conv(3, padding=second_padding, weight_variance=2.0, bias_variance=0.05), L.ReLU(),
        L.Flatten(), L.Dense(2.0, 0.1),
    )


def _resmlp(branch_layers=2):
    branch = [L.ReLU(), L.Dense(2.0, 0.1)] * branch_layers
    return L.serial(
        L.Dense(2.0, 0.1), L.FanOut(2), L.parallel(branch, L.Identity()), L.FanInSum(), L.ReLU(), L.Dense(2.0, 0.1)
    )


def _pool2d(first_padding="same"):
    return L.serial(
        L.Conv(3, padding=first_padding, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2),
        L.Conv(2, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1),
    )


def _normcat(layer_norm=True):
    return L.serial(
        L.Dense(1.5, 0.2), *([L.LayerNorm()] if layer_norm else []), L.FanOut(2),
        L.parallel([L.ReLU(), L.Dense(2.0, 0.1)], [L.Erf(), L.Dense(1.5, 0.1)]),
        L.FanInConcat(), L.Dense(1.0, 0.1),
    )


class Architecture(NamedTuple):
    net: L.Layer
    wrong: L.Layer  # a plausible mistake: its kernel must be rejected by the same checks
    input_shape: tuple[int, ...]  # of one input; (d,) for vectors
    n_inputs: int
    depth: int  # hidden layers on the longest path, for the finite-width bias allowance
    widths: tuple[int, ...]


ARCHITECTURES = {
    "cnn1d": Architecture(_cnn1d(), _cnn1d(padding="valid"), (2, 8), 5, 1, (16, 64, 512)),
    "cnn2d": Architecture(_cnn2d(), _cnn2d(second_padding="valid"), (1, 5, 5), 4, 2, (16, 64, 256)),
    "resmlp": Architecture(_resmlp(), _resmlp(branch_layers=1), (5,), 5, 3, (16, 64, 512)),
    "pool2d": Architecture(_pool2d(), _pool2d(first_padding="circular"), (2, 4, 4), 4, 2, (16, 64, 512)),
    "normcat": Architecture(_normcat(), _normcat(layer_norm=False), (5,), 5, 2, (16, 64, 512)),
}
NAMES = list(ARCHITECTURES)
CASES = [(name, kind) for name in NAMES for kind in ("ntk", "nngp")]
IDS = [f"{name}-{kind}" for name, kind in CASES]


def _kernel_shape(name: str) -> tuple[int, ...] | None:
    """The ``input_shape`` for kernels and finite networks (None for vectors)."""
    shape = ARCHITECTURES[name].input_shape
    return shape if len(shape) > 1 else None


def _inputs(name: str) -> torch.Tensor:
    """Generic inputs (rows of channels-first tensors), one nearly opposite to the first, one of small norm."""
    arch = ARCHITECTURES[name]
    x = torch.randn(arch.n_inputs, math.prod(arch.input_shape), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]
    x[-1] = 0.3 * x[-1]
    return x


def _exact(net: L.Layer, name: str, kind: str) -> torch.Tensor:
    kernel = (gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel)(net, input_shape=_kernel_shape(name))
    with torch.no_grad():
        return kernel(_inputs(name)).to_dense()


def _relative_error(mean: torch.Tensor, exact: torch.Tensor) -> float:
    return ((mean - exact).norm() / exact.norm()).item()


def _excess(mean: torch.Tensor, se: torch.Tensor, exact: torch.Tensor, depth: int, width: int) -> float:
    """``max |mean - exact| / (N_SE * se + BIAS_PER_LAYER * depth / width * sqrt(K_ii K_jj))``: <= 1 passes."""
    scale = exact.diagonal().sqrt()
    allowance = N_SE * se + BIAS_PER_LAYER * depth / width * scale[:, None] * scale[None, :]
    return ((mean - exact).abs() / allowance).max().item()


@functools.lru_cache(maxsize=None)
def _study(name: str, kind: str) -> dict:
    """Analytic kernel and, per width, Monte Carlo estimates from ``N_BATCHES`` seeded batches.

    ``mean``/``se``: over all ``N_BATCHES * BATCH`` networks; ``error``: relative Frobenius error
    of that mean; ``batch_error``: the average over batches of the error of each batch's mean (the
    typical error of a ``BATCH``-network average, steadier than one realised error);
    ``spread``: the relative spread of one network's kernel around the mean.
    """
    arch = ARCHITECTURES[name]
    x = _inputs(name)
    exact = _exact(arch.net, name, kind)
    norm = exact.norm()
    case = CASES.index((name, kind))
    results = {}
    for width in arch.widths:
        out_features = 1 if kind == "ntk" else NNGP_CHANNELS_PER_WIDTH * width
        means, ses = [], []
        for batch in range(N_BATCHES):
            mean, se = gpntk.monte_carlo_kernel(
                arch.net, x, width=width, n_samples=BATCH, kind=kind, out_features=out_features,
                seed=SEED + 100_000 * case + 100 * width + batch, input_shape=_kernel_shape(name),
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
            "spread": ((se * math.sqrt(N_BATCHES * BATCH)).norm() / norm).item(),
        }
    return {"exact": exact, "widths": results}


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_converges_at_the_largest_width(name, kind):
    study = _study(name, kind)
    errors = {w: r["error"] for w, r in study["widths"].items()}
    assert errors[ARCHITECTURES[name].widths[-1]] <= TOLERANCE, errors


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_analytic_kernel_within_monte_carlo_error(name, kind):
    study, arch = _study(name, kind), ARCHITECTURES[name]
    exact = study["exact"]
    for width in arch.widths[1:]:
        r = study["widths"][width]
        excess = _excess(r["mean"], r["se"], exact, arch.depth, width)
        assert excess <= 1.0, (width, excess, ((r["mean"] - exact).abs() / r["se"]).max().item())
    if arch.depth == 1:  # one hidden layer: unbiased at every width, within N_SE standard errors
        for width in arch.widths:
            r = study["widths"][width]
            assert _excess(r["mean"], r["se"], exact, 0, width) <= 1.0, width


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_error_shrinks_like_inverse_sqrt_width(name, kind):
    study, widths = _study(name, kind), ARCHITECTURES[name].widths
    spreads = [study["widths"][w]["spread"] for w in widths]
    batch_errors = [study["widths"][w]["batch_error"] for w in widths]
    slope = np.polyfit(np.log(widths), np.log(spreads), 1)[0]
    assert -0.75 <= slope <= -0.3, (slope, dict(zip(widths, spreads)))
    assert spreads[0] >= 2.5 * spreads[-1], dict(zip(widths, spreads))
    assert batch_errors[0] >= 2.5 * batch_errors[-1], dict(zip(widths, batch_errors))


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_wrong_kernel_is_rejected(name, kind):
    """The kernel of a slightly different architecture fails the very bounds the right one passes."""
    study, arch = _study(name, kind), ARCHITECTURES[name]
    width = arch.widths[-1]
    r = study["widths"][width]
    wrong = _exact(arch.wrong, name, kind)
    wrong_error = _relative_error(r["mean"], wrong)
    assert wrong_error > TOLERANCE, wrong_error
    assert wrong_error >= 4.0 * r["error"], (wrong_error, r["error"])
    assert _excess(r["mean"], r["se"], wrong, arch.depth, width) >= 2.0


@pytest.mark.parametrize("name", NAMES)
def test_structured_empirical_ntk_equals_jacobian(name):
    net, shape = ARCHITECTURES[name].net, _kernel_shape(name)
    x = _inputs(name)
    x2 = x[:3].flip(0) + 0.1
    for seed, width, out_features in ((0, 8, 1), (1, 12, 3)):
        model = net.finite(
            width, in_features=x.shape[-1], input_shape=shape, out_features=out_features,
            generator=torch.Generator().manual_seed(seed),
        ).double()
        for x1_, x2_ in ((x, x), (x, x2)):
            for reduce in ("mean", "none"):
                structured = gpntk.empirical_ntk(model, x1_, x2_, reduce=reduce, method="structured")
                jacobian = gpntk.empirical_ntk(model, x1_, x2_, reduce=reduce, method="jacobian")
                torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-10)
