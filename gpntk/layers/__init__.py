"""The layer language: ``serial(Dense(...), ReLU(), Dense(...))`` describes an architecture.

Each layer maps the infinite-width kernel state and knows its finite-width torch module.
"""

from __future__ import annotations

from ..activations import (
    ABReLU, GELU, Abs, Activation, Cos, Elementwise, Erf, Exp, Gaussian, LeakyReLU, Monomial,
    Polynomial, Rbf, RectifiedMonomial, ReLU, SiLU, Sigmoid, Sign, Sin, Softplus, Tanh,
)
from .base import Identity, Layer, Serial, Signature, serial
from .dense import Dense
from .mlp import mlp

__all__ = [
    "Layer", "Serial", "Signature", "serial", "Identity", "Dense", "mlp", "Activation",
    "ReLU", "LeakyReLU", "ABReLU", "Abs", "Sign", "Erf", "GELU", "Sin", "Cos", "Rbf", "Exp",
    "Gaussian", "Monomial", "RectifiedMonomial", "Polynomial", "Elementwise", "Tanh", "Sigmoid",
    "Softplus", "SiLU",
]
