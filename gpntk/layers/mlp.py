"""The multilayer-perceptron shortcut."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from gpytorch.constraints import Interval
from gpytorch.priors import Prior

from .._validation import bool_argument, check_keywords, integer_argument
from ..activations import Activation, activation_class, activation_from_name
from ..errors import ArchitectureError
from .affine import DEFAULT_BIAS_VARIANCE
from .base import Serial, serial
from .dense import Dense

__all__ = ["mlp"]

#: mlp's own arguments, for the message of an unknown keyword argument
_MLP_ARGUMENTS = (
    "depth", "activation", "weight_variance", "bias_variance", "shared", "weight_variance_prior",
    "bias_variance_prior", "weight_variance_constraint", "bias_variance_constraint",
)


def mlp(
    depth: int,
    activation: str | Activation = "relu",
    weight_variance: float = 2.0,
    bias_variance: float = DEFAULT_BIAS_VARIANCE,
    shared: bool = True,
    *,
    weight_variance_prior: Prior | None = None,
    bias_variance_prior: Prior | None = None,
    weight_variance_constraint: Interval | None = None,
    bias_variance_constraint: Interval | None = None,
    **activation_kwargs: Any,
) -> Serial:
    r"""``depth`` hidden layers of ``Dense`` + ``activation``, then a ``Dense`` readout.

    :param depth: the number of hidden layers; ``depth=0`` is the linear model (a single ``Dense``).
    :param activation: a name (see :data:`gpntk.activations.ACTIVATION_NAMES`; further keyword
        arguments are passed on to it, e.g. ``mlp(2, "leaky_relu", negative_slope=0.2)``) or an
        activation layer.
    :param weight_variance: :math:`\sigma_w^2` of every ``Dense`` (default 2, the critical value
        of ReLU networks, :math:`\sigma_w^2\, \mathbb E[\phi'(z)^2] = 1`, which keeps the
        pre-activation variance of order one at every depth).
    :param bias_variance: :math:`\sigma_b^2` of every ``Dense``, default 0.1 as for
        :class:`~gpntk.layers.Dense`; 0 builds layers without bias (see there).
    :param shared: ``True`` (default): every ``Dense``, the first layer and the readout included,
        is *the same layer object*, so the network has one learnable pair
        :math:`(\sigma_w^2, \sigma_b^2)`, reachable as ``kernel.weight_variance`` and
        ``kernel.bias_variance`` of a kernel on it, with one prior each. Only the hyperparameters
        are shared: the finite network of ``net.finite(width)`` has independent weights in every
        layer, as the kernel assumes. ``False``: each of the ``depth + 1`` layers has its own pair
        (``net.layers.0``, ``net.layers.2``, ..., reachable as ``kernel.layer_variances``).
    :param weight_variance_prior: a GPyTorch prior on :math:`\sigma_w^2`, e.g.
        ``gpytorch.priors.LogNormalPrior(math.log(2.0), 0.5)``; with ``shared=False`` each layer
        gets its own copy (:func:`gpntk.layers.default_priors` gives one to every layer of a built
        network).
    :param bias_variance_prior: a GPyTorch prior on :math:`\sigma_b^2` (needs ``bias_variance > 0``).
    :param weight_variance_constraint: the constraint on the raw :math:`\sigma_w^2` (default
        :class:`~gpytorch.constraints.Positive`), copied to each layer like the priors.
    :param bias_variance_constraint: the constraint on the raw :math:`\sigma_b^2`.

    Raises ``TypeError`` naming a keyword argument that is neither mlp's nor the activation's.
    """
    depth = integer_argument("depth", depth, minimum=0, error=ArchitectureError)
    shared = bool_argument("shared", shared, error=ArchitectureError)
    if isinstance(activation, Activation) and activation_kwargs:
        raise ArchitectureError("activation keyword arguments are only accepted with an activation name")
    if activation_kwargs and isinstance(activation, str):
        _check_activation_keywords(activation, activation_kwargs)
    act = activation_from_name(activation, **activation_kwargs)
    options: dict[str, Any] = dict(
        weight_variance=weight_variance, bias_variance=bias_variance, weight_variance_prior=weight_variance_prior,
        bias_variance_prior=bias_variance_prior, weight_variance_constraint=weight_variance_constraint,
        bias_variance_constraint=bias_variance_constraint,
    )
    if shared:
        dense = Dense(**options)
        return serial(*[dense, act] * depth, dense)
    # each layer its own copy of the priors and constraints (modules registered on one layer each)
    return serial(*[layer for _ in range(depth) for layer in (Dense(**copy.deepcopy(options)), act)],
                  Dense(**copy.deepcopy(options)))


def _check_activation_keywords(activation: str, kwargs: dict[str, Any]) -> None:
    """``TypeError`` naming mlp for a keyword argument that is neither mlp's nor the activation's."""
    parameters = inspect.signature(activation_class(activation)).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        own = tuple(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        check_keywords("mlp", kwargs, _MLP_ARGUMENTS + own)
