"""The command line's option values, importable without torch: ``gpntk --help`` needs only these.

:data:`ACTIVATION_NAMES` is the list :func:`gpntk.activations.activation_from_name` accepts
(a test keeps the two equal); the defaults are those of :func:`gpntk.csv_fit.fit_csv`.
"""

from __future__ import annotations

import math

__all__ = ["ACTIVATION_NAMES", "DEFAULT_TIMES", "DEFAULT_DIAG_REG"]

#: the names accepted by ``activation_from_name`` and ``mlp(activation=...)``, sorted
ACTIVATION_NAMES = (
    "abrelu", "abs", "cos", "erf", "exp", "gaussian", "gelu", "leaky_relu", "leakyrelu", "monomial",
    "polynomial", "rbf", "rectifiedmonomial", "relu", "sigmoid", "sign", "silu", "sin", "softplus",
    "swish", "tanh",
)
#: training times (gradient-descent steps) predicted at when none are given
DEFAULT_TIMES = (100.0, 1000.0, math.inf)
#: absolute ridge added to the training kernel by default: small against the kernel's diagonal
#: (O(1) for standardized inputs and the default architecture), enough to keep t = inf well posed
DEFAULT_DIAG_REG = 1e-6
