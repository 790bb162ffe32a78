"""Finite networks in standard parameterization converge to the kernels of ``parameterization="standard"``.

In standard parameterization the NTK grows with the widths, so the analytic kernel depends on each
layer's ``in_width``: at every width ``m`` the Monte Carlo estimate over networks
``net(m).finite(m)`` (each hidden layer ``m`` wide, each standard layer's fan-in its ``in_width``)
is compared with the kernel of ``net(m)``, whose hidden ``in_width``\\ s are ``m`` (``m·L`` after
``Flatten``), as issue 16 asks. Two architectures (``ARCHITECTURES``), every layer standard:

* ``mlp``: Dense, ReLU, Dense, Erf, Dense readout (vectors, 5-D);
* ``cnn``: 1-D convolution ("same"), ReLU, 1-D convolution ("circular"), ReLU, Flatten, Dense
  readout (inputs 2 x 6).

For each (architecture, kernel), at widths 16, 64 and 256, 64 networks per width (8 seeded batches
of 8; the NNGP averaged over ``2 * width`` output channels):

* at the largest width the relative Frobenius error of the mean is at most 4 %;
* every entry lies within ``4 * stderr + 2 * depth / width * sqrt(K(x, x) K(x', x'))`` of the
  estimate at widths 64 and 256 (the allowance of ``test_monte_carlo_architectures.py``);
* the relative spread of one network's kernel around the mean shrinks at least 2.5x from width 16
  to 256 (4x expected, ``width^-1/2``);
* the check can fail: the NTK of the same network with the readout's ``in_width`` halved (a
  plausible off-by-a-factor fan-in) exceeds the 4 % bound and lies at least 4x further from the
  estimate.

The estimates are seeded (deterministic). The structured empirical NTK of these networks (their
affine modules are ``nn.Linear`` subclasses, scales 1) is checked against the Jacobian one in
``tests/layers/test_standard_parameterization.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import pytest
import torch
from test_monte_carlo_architectures import _relative_error

import gpntk
from gpntk import layers as L

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

N_BATCHES, BATCH = 8, 8
WIDTHS = (16, 64, 256)
TOLERANCE = 0.04
N_SE, BIAS_PER_LAYER = 4.0, 2.0
SP = {"parameterization": "standard"}


def _mlp(width: int, readout_in_width: int | None = None) -> L.Serial:
    return L.serial(
        L.Dense(2.0, 0.1, in_width=5, **SP), L.ReLU(),
        L.Dense(1.5, 0.1, in_width=width, **SP), L.Erf(),
        L.Dense(1.0, 0.1, in_width=readout_in_width or width, **SP),
    )


def _cnn(width: int, readout_in_width: int | None = None) -> L.Serial:
    return L.serial(
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1, in_width=2, **SP), L.ReLU(),
        L.Conv(3, padding="circular", weight_variance=1.5, bias_variance=0.05, in_width=width, **SP), L.ReLU(),
        L.Flatten(), L.Dense(1.0, 0.1, in_width=readout_in_width or 6 * width, **SP),
    )


class Architecture(NamedTuple):
    make: Callable[..., L.Serial]  # width (and the readout's in_width) -> the network
    input_shape: tuple[int, ...]
    readout_fan_in: int  # the readout's in_width per unit of width
    depth: int  # hidden layers, for the finite-width bias allowance


ARCHITECTURES = {"mlp": Architecture(_mlp, (5,), 1, 2), "cnn": Architecture(_cnn, (2, 6), 6, 2)}
CASES = [(name, kind) for name in ARCHITECTURES for kind in ("ntk", "nngp")]


def _shape(name: str) -> tuple[int, ...] | None:
    return ARCHITECTURES[name].input_shape if name == "cnn" else None


def _inputs(name: str) -> torch.Tensor:
    x = torch.randn(4, math.prod(ARCHITECTURES[name].input_shape), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]
    return x


def _exact(net: L.Layer, name: str, kind: str) -> torch.Tensor:
    kernel = (gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel)(net, input_shape=_shape(name))
    with torch.no_grad():
        return kernel(_inputs(name)).to_dense()


@functools.lru_cache(maxsize=None)
def _study(name: str, kind: str) -> dict[int, dict]:
    arch = ARCHITECTURES[name]
    x = _inputs(name)
    results = {}
    for width in WIDTHS:
        net = arch.make(width)
        out_features = 1 if kind == "ntk" else 2 * width
        samples = []
        for batch in range(N_BATCHES):
            for sample in range(BATCH):  # one network at a time: the spread needs each one's kernel
                seed = 1_000_000 * CASES.index((name, kind)) + 1000 * width + BATCH * batch + sample
                model = net.finite(width, in_features=x.shape[-1], input_shape=_shape(name), out_features=out_features,
                                   generator=torch.Generator().manual_seed(seed)).to(x)
                estimator = gpntk.empirical_ntk if kind == "ntk" else gpntk.empirical_nngp
                samples.append(estimator(model, x))
        stacked = torch.stack(samples)
        mean, se = stacked.mean(0), stacked.std(0) / math.sqrt(len(samples))
        exact = _exact(net, name, kind)
        results[width] = {
            "mean": mean, "se": se, "exact": exact, "error": _relative_error(mean, exact),
            "spread": ((stacked - mean).norm(dim=(-2, -1)).square().mean().sqrt() / mean.norm()).item(),
        }
    return results


@pytest.mark.parametrize("name, kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_converges_to_the_standard_kernel(name, kind):
    study = _study(name, kind)
    depth = ARCHITECTURES[name].depth
    largest = study[WIDTHS[-1]]
    assert largest["error"] <= TOLERANCE, {w: r["error"] for w, r in study.items()}
    for width in WIDTHS[1:]:
        result = study[width]
        scale = result["exact"].diagonal().sqrt()
        allowance = N_SE * result["se"] + BIAS_PER_LAYER * depth / width * scale[:, None] * scale[None, :]
        excess = ((result["mean"] - result["exact"]).abs() / allowance).max().item()
        assert excess <= 1.0, (width, excess)
    assert study[WIDTHS[0]]["spread"] >= 2.5 * largest["spread"], {w: r["spread"] for w, r in study.items()}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_a_wrong_fan_in_is_rejected(name):
    arch = ARCHITECTURES[name]
    width = WIDTHS[-1]
    largest = _study(name, "ntk")[width]
    wrong = _exact(arch.make(width, readout_in_width=arch.readout_fan_in * width // 2), name, "ntk")
    wrong_error = _relative_error(largest["mean"], wrong)
    assert wrong_error > TOLERANCE and wrong_error >= 4 * largest["error"], (wrong_error, largest["error"])
