"""Dual activations: closed forms, and Gauss–Hermite quadrature for any smooth φ.

The closed-form pair duals of :mod:`.arccos` and :mod:`.smooth` are each written once, against the
operations protocol :class:`.ops.DualOps`: ``Activation.dual`` evaluates them on tensors
(:data:`.ops.TORCH`), the optional KeOps backend (:mod:`gpntk.contrib.keops`) on formula nodes.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArchitectureError
from .arccos import ABReLU, Abs, LeakyReLU, RectifiedMonomial, ReLU, Sign
from .base import Activation
from .expnormalized import ExpNormalized
from .hermite import Hermite
from .polynomial import Monomial, Polynomial
from .quadrature import Elementwise, Sigmoid, SiLU, Softplus, Tanh
from .smooth import GELU, Cos, Erf, Exp, Gabor, Gaussian, Rbf, SigmoidLike, Sin

__all__ = [
    "Activation", "ReLU", "LeakyReLU", "ABReLU", "Abs", "Sign", "Erf", "GELU", "Sin", "Cos", "Rbf",
    "Exp", "Gaussian", "Monomial", "RectifiedMonomial", "Polynomial", "Elementwise", "Tanh", "Sigmoid",
    "Softplus", "SiLU", "activation_from_name", "activation_class", "ACTIVATION_NAMES",
    "ExpNormalized", "Hermite", "Gabor", "SigmoidLike",
]

_BY_NAME = {
    "relu": ReLU, "leakyrelu": LeakyReLU, "leaky_relu": LeakyReLU, "abrelu": ABReLU, "abs": Abs,
    "sign": Sign, "erf": Erf, "gelu": GELU, "sin": Sin, "cos": Cos, "rbf": Rbf, "exp": Exp,
    "gaussian": Gaussian, "monomial": Monomial, "rectifiedmonomial": RectifiedMonomial,
    "polynomial": Polynomial, "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus, "silu": SiLU,
    "swish": SiLU,
    "expnormalized": ExpNormalized, "hermite": Hermite, "gabor": Gabor, "sigmoidlike": SigmoidLike,
}

#: the names accepted by :func:`activation_from_name` (and ``mlp(activation=...)``)
ACTIVATION_NAMES = tuple(sorted(_BY_NAME))


def activation_class(name: str) -> type[Activation]:
    """The activation class of a (case-insensitive) name, e.g. ``"relu"`` gives :class:`ReLU`."""
    if not isinstance(name, str):
        raise ArchitectureError(f"activation must be a name or an Activation layer, got {name!r}")
    key = name.lower().replace("-", "_")
    cls = _BY_NAME.get(key) or _BY_NAME.get(key.replace("_", ""))
    if cls is None:
        raise ArchitectureError(f"unknown activation {name!r}; known names: {', '.join(ACTIVATION_NAMES)}")
    return cls


def activation_from_name(name: str | Activation, **kwargs: Any) -> Activation:
    """An activation layer from its (case-insensitive) name, e.g. ``"relu"`` or ``"erf"``."""
    if isinstance(name, Activation):
        return name
    cls = activation_class(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ArchitectureError(f"activation {name!r}: {err}") from None
