"""The command line's option values, importable without torch: ``gpntk --help`` needs only these.

:data:`ACTIVATION_NAMES` is the list :func:`gpntk.activations.activation_from_name` accepts
(a test keeps the two equal); the defaults are those of :func:`gpntk.cli.csv_fit.fit_csv`.
:func:`parse_time` reads one ``--times`` value (argparse calls it while parsing).
"""

from __future__ import annotations

import math

__all__ = ["ACTIVATION_NAMES", "DEFAULT_TIMES", "DEFAULT_DIAG_REG", "parse_time"]

#: the names accepted by ``activation_from_name`` and ``mlp(activation=...)``, sorted
ACTIVATION_NAMES = (
    "abrelu", "abs", "cos", "erf", "exp", "expnormalized", "gabor", "gaussian", "gelu", "hermite",
    "leaky_relu", "leakyrelu", "monomial", "polynomial", "rbf", "rectifiedmonomial", "relu", "sigmoid",
    "sigmoidlike", "sign", "silu", "sin", "softplus", "swish", "tanh",
)
#: training times (gradient-descent steps) predicted at when none are given
DEFAULT_TIMES = (100.0, 1000.0, math.inf)
#: absolute ridge added to the training kernel by default: small against the kernel's diagonal
#: (O(1) for standardized inputs and the default architecture), enough to keep t = inf well posed
DEFAULT_DIAG_REG = 1e-6


def parse_time(text: str) -> float:
    """A training time from the command line: a non-negative float or ``inf``; ValueError otherwise."""
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(f"training times must be >= 0 (or inf), got {text!r}")
    return value
