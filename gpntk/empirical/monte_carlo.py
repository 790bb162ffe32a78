r"""Monte Carlo estimates of a layer's finite-width kernels over random initialisations.

The mean of :math:`S` empirical kernels of independently initialised networks
``net.finite(width)``, with its standard error :math:`\hat\sigma / \sqrt S`; the estimate
converges to the infinite-width kernel as the width grows (Jacot et al. 2018; Lee et al. 2019),
which is how the analytic kernels are checked against real networks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .._validation import choice_argument, integer_argument
from .checks import check_rows
from .nngp import empirical_nngp
from .ntk import empirical_ntk

if TYPE_CHECKING:  # pragma: no cover
    from ..core.layer import InputShape, Layer

__all__ = ["monte_carlo_kernel"]


def monte_carlo_kernel(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    width: int,
    n_samples: int,
    kind: Literal["ntk", "nngp"] = "ntk",
    out_features: int = 1,
    seed: int = 0,
    input_shape: InputShape = None,
) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo estimate of the kernel of ``net.finite(width)`` over random initialisations.

    Draws ``n_samples`` networks (seeded, so the estimate is reproducible), evaluates their
    empirical kernel (averaged over ``out_features`` output channels) and returns
    ``(mean, standard_error)``, both ``(n1, n2)``. The mean converges to the infinite-width
    kernel as ``width`` grows, with a finite-width bias of order ``1/width`` (none for one hidden
    layer) and a spread across networks of relative order ``1/sqrt(width)`` for the NTK and
    ``1/sqrt(width) + 1/sqrt(out_features)`` for the NNGP (one network's outputs are only
    ``out_features`` draws of the GP, so estimate the NNGP with many output channels).

    ``input_shape`` ``(C, W)`` / ``(C, H, W)``: for spatial architectures (convolutions,
    pooling), the channels-first shape of one input, passed to ``net.finite`` as for
    ``NTKKernel(net, input_shape=...)``; each row of ``x1``, ``x2`` then holds ``C·H·W`` features.
    For graph networks a graph format (``GraphInputs``, ``GraphDataset``, ``NodeGraph``), whose
    rows are read as by the kernels (padded graphs, graph or node indices).
    """
    n_samples = integer_argument("n_samples (at least 2, for a standard error)", n_samples, minimum=2)
    width = integer_argument("width", width, minimum=1)
    out_features = integer_argument("out_features", out_features, minimum=1)
    choice_argument("kind", kind, ("ntk", "nngp"))
    x2 = x1 if x2 is None else x2
    check_rows(x1, x2)
    generator = torch.Generator().manual_seed(integer_argument("seed", seed))
    estimator = empirical_ntk if kind == "ntk" else empirical_nngp
    samples = []
    for _ in range(n_samples):
        model = net.finite(
            width, in_features=x1.shape[-1], input_shape=input_shape, out_features=out_features, generator=generator
        ).to(x1)
        samples.append(estimator(model, x1, x2))
    stacked = torch.stack(samples)
    return stacked.mean(0), stacked.std(0) / math.sqrt(n_samples)
