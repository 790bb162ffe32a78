"""Argument checks of the trained ensemble that only it has: the architecture with its data, targets, regimes, solvers.

General checks (numbers, times, input tensors) are in :mod:`gpntk._validation`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from .._validation import check_inputs, number_in_unit_interval, positive_integer
from ..core.graph_inputs import GraphDataset, GraphFormat, GraphInputs, NodeGraph, checked_input_shape
from ..core.layer import InputShape, Layer, check_network
from ..layers.affine import Affine
from .solver import REGIMES, SOLVERS, Regime

__all__ = [
    "as_points", "check_architecture", "check_targets", "check_regime", "check_test_inputs", "check_solver_options",
]


def as_points(x: Tensor) -> Tensor:
    """A 1-D tensor ``(n,)`` read as ``n`` one-feature points ``(n, 1)``, as GPyTorch kernels read it; else ``x``.

    Anything else is returned as it is, for the checks that follow to name what is wrong.
    """
    if torch.is_tensor(x) and x.dim() == 1:
        return x.unsqueeze(-1)
    return x


def check_architecture(net: object, train_x: Tensor, input_shape: InputShape) -> tuple[int, ...] | GraphFormat | None:
    """``net`` a gpntk architecture for ``input_shape`` and ``train_x`` ``(n, d)`` its inputs; the checked shape."""
    if not isinstance(net, Layer):
        raise TypeError(f"TrainedEnsemble needs an architecture built from gpntk.layers, got {type(net).__name__}")
    shape = checked_input_shape(input_shape)
    check_inputs("train_x", train_x, batched=False)
    if isinstance(shape, (GraphInputs, NodeGraph, GraphDataset)):
        check_network(net, shape)
        shape.check_rows("train_x", train_x)
        return shape
    check_network(net, shape, in_features=train_x.shape[-1])
    if shape is not None and train_x.shape[-1] != math.prod(shape):
        raise ValueError(
            f"input_shape {shape} needs {math.prod(shape)} features per row, got {train_x.shape[-1]}"
        )
    return shape


def check_targets(train_y: object, num_train: int) -> None:
    """``train_y``: finite real targets ``(n,)`` or ``(n, k)`` for ``num_train`` training points, ``k >= 1``."""
    if not torch.is_tensor(train_y):
        raise TypeError(f"train_y must be a torch.Tensor, got {type(train_y).__name__}")
    if train_y.is_complex():
        raise TypeError(
            f"train_y must be real, got dtype {train_y.dtype}: the posterior of real-valued networks "
            "has no complex targets (fit the real and imaginary parts as two outputs, (n, 2))"
        )
    if train_y.dtype == torch.bool:
        raise TypeError("train_y must hold numbers, got a bool tensor")
    if train_y.dim() not in (1, 2):
        raise ValueError(f"train_y must have shape (n,) or (n, k), got {tuple(train_y.shape)}")
    if train_y.shape[0] != num_train:
        raise ValueError(f"train_x has {num_train} points but train_y has {train_y.shape[0]} targets")
    if train_y.dim() == 2 and train_y.shape[1] == 0:
        raise ValueError("train_y has no outputs (shape (n, 0))")
    if not torch.isfinite(train_y).all():
        raise ValueError(f"train_y contains {int((~torch.isfinite(train_y)).sum())} NaN or infinite values")


def check_solver_options(
    solver: object, tolerance: object, max_iterations: object, train_product: object
) -> tuple[float, int]:
    """The solver's name, Lanczos ``tolerance`` in (0, 1), ``max_iterations`` and ``train_product``; the numbers."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    tolerance = number_in_unit_interval("tolerance", tolerance)
    max_iterations = positive_integer("max_iterations", max_iterations)
    if train_product is not None and not callable(train_product):
        raise TypeError(f"train_product must be callable, got {type(train_product).__name__}")
    return tolerance, max_iterations


def check_regime(regime: str, net: Layer | None = None) -> Regime:
    """``regime`` one of :data:`~gpntk.posterior.REGIMES`, and one that ``net`` has.

    ``"nngp"`` stands for training only the readout, whose tangent kernel is the NNGP only in NTK
    parameterization: with standard-parameterized layers (``parameterization="standard"``) it is
    refused rather than answered with the dynamics of another network.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    if regime == "nngp" and net is not None:
        standard = [layer for layer in net.modules() if isinstance(layer, Affine) and layer.in_width is not None]
        if standard:
            raise ValueError(
                f"regime='nngp' (only the readout trained, G = P = the NNGP) assumes NTK parameterization, but "
                f"{standard[0]!r} is in standard parameterization, where training the readout alone has another "
                "tangent kernel. The NNGP does not depend on the parameterization: build the same network with "
                "parameterization='ntk' for regime='nngp', or use regime='ntk' / 'ntkgp' here"
            )
    return cast(Regime, regime)


def check_test_inputs(test_x: Tensor, num_features: int, input_shape: object = None) -> None:
    """``test_x``: a finite float tensor ``(m, d)`` with the training inputs' ``d`` (and graph format, if any)."""
    check_inputs("test_x", test_x, batched=False)
    if test_x.shape[-1] != num_features:
        raise ValueError(f"test_x has {test_x.shape[-1]} features but train_x has {num_features}")
    if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
        input_shape.check_rows("test_x", test_x)
