"""What an ensemble of infinitely wide networks predicts after training for time t.

:class:`TrainedEnsemble` is the façade; the solvers behind it and the Lanczos iteration live in
this package's modules.
"""

from .ensemble import TrainedEnsemble
from .solver import EIGH_MAX_TRAIN, REGIMES, Regime, Solver, TrainProduct

__all__ = ["TrainedEnsemble", "Regime", "REGIMES", "Solver", "TrainProduct", "EIGH_MAX_TRAIN"]
