"""The layer language: ``serial(Dense(...), ReLU(), Dense(...))`` describes an architecture.

Each layer maps the infinite-width kernel state and knows its finite-width torch module.
"""

from __future__ import annotations

from ..activations import (
    GELU,
    ABReLU,
    Abs,
    Activation,
    Cos,
    Elementwise,
    Erf,
    Exp,
    ExpNormalized,
    Gabor,
    Gaussian,
    Hermite,
    LeakyReLU,
    Monomial,
    Polynomial,
    Rbf,
    RectifiedMonomial,
    ReLU,
    Sigmoid,
    SigmoidLike,
    Sign,
    SiLU,
    Sin,
    Softplus,
    Tanh,
)
from ..core.layer import Layer, Signature, check_network
from .affine import Affine
from .attention import GlobalSelfAttention
from .base import Identity, Serial, serial
from .branching import FanInConcat, FanInProd, FanInSum, FanOut, Parallel, parallel
from .conv import Conv
from .conv_variants import ConvLocal, ConvTranspose
from .dense import Dense
from .dropout import Dropout
from .gntk import gntk
from .graph import Aggregate
from .mlp import mlp
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from .priors import default_priors

__all__ = [
    "Layer", "Serial", "Signature", "serial", "check_network", "Identity", "Affine", "Dense", "Conv",
    "AvgPool", "GlobalAvgPool", "Flatten", "LayerNorm", "FanOut", "Parallel", "parallel", "FanInSum",
    "FanInConcat", "FanInProd", "mlp", "Activation",
    "ReLU", "LeakyReLU", "ABReLU", "Abs", "Sign", "Erf", "GELU", "Sin", "Cos", "Rbf", "Exp",
    "Gaussian", "Monomial", "RectifiedMonomial", "Polynomial", "Elementwise", "Tanh", "Sigmoid",
    "Softplus", "SiLU",
    "ConvTranspose", "ConvLocal",
    "SumPool", "GlobalSumPool", "Dropout",
    "GlobalSelfAttention",
    "Aggregate", "gntk",
    "ExpNormalized", "Hermite", "Gabor", "SigmoidLike",
    "default_priors",
]
