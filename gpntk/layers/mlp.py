"""The multilayer-perceptron shortcut."""

from __future__ import annotations

from typing import Any

from .._validation import integer_argument
from ..activations import Activation, activation_from_name
from ..errors import ArchitectureError
from .base import Serial, serial
from .dense import Dense

__all__ = ["mlp"]


def mlp(
    depth: int,
    activation: str | Activation = "relu",
    weight_variance: float = 2.0,
    bias_variance: float = 0.1,
    shared: bool = True,
    **activation_kwargs: Any,
) -> Serial:
    """``depth`` hidden layers of ``Dense`` + ``activation``, then a ``Dense`` readout.

    With ``shared=True`` every ``Dense`` is the same layer object, so the whole network has one
    learnable pair (σw², σb²); with ``shared=False`` each layer has its own pair. ``activation``
    is a name (see :data:`gpntk.activations.ACTIVATION_NAMES`, keyword arguments passed on) or an
    activation layer. ``depth=0`` is the linear model (a single ``Dense``).
    """
    depth = integer_argument("depth", depth, minimum=0, error=ArchitectureError)
    if isinstance(activation, Activation) and activation_kwargs:
        raise ArchitectureError("activation keyword arguments are only accepted with an activation name")
    act = activation_from_name(activation, **activation_kwargs)

    def dense() -> Dense:
        return Dense(weight_variance=weight_variance, bias_variance=bias_variance)

    shared_dense = dense() if shared else None
    layers = []
    for _ in range(depth):
        layers += [shared_dense or dense(), act]
    layers.append(shared_dense or dense())
    return serial(*layers)
