"""gpntk: infinitely wide neural networks as first-class Gaussian processes in GPyTorch.

>>> import gpntk
>>> from gpntk import layers as L
>>> net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
>>> ntk = gpntk.NTKKernel(net)          # a gpytorch.kernels.Kernel

``import gpntk`` is light: the names below are imported on first use (PEP 562), so the command
line's ``--help`` runs without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._quiet_import import quiet_first_import

# importing GPyTorch imports pykeops, which prints a banner on stdout: send it to stderr, whichever
# gpntk module imports GPyTorch first
quiet_first_import("gpytorch")

__version__ = "0.1.0"
"""The version of gpntk."""

__all__ = [
    "layers", "settings", "distributed", "NTKKernel", "NNGPKernel", "EmpiricalNTKKernel", "TrainedEnsemble",
    "empirical_ntk", "empirical_nngp", "monte_carlo_kernel",
    "ArchitectureError", "GPNTKWarning", "NumericalWarning", "ApproximationWarning",
    "CompositionWarning", "AmbiguousHyperparameterError", "__version__",
    "NeuralKernelSum", "testing",
    "GraphInputs", "NodeGraph", "GraphDataset", "normalized_adjacency", "graph_kernel_matrices",
    "graph_kernel_matrices_by_depth",
]

#: public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "layers": (".layers", None),
    "settings": (".settings", None),
    "distributed": (".distributed", None),
    "NTKKernel": (".kernels", "NTKKernel"),
    "NNGPKernel": (".kernels", "NNGPKernel"),
    "NeuralKernelSum": (".kernels", "NeuralKernelSum"),
    "EmpiricalNTKKernel": (".kernels", "EmpiricalNTKKernel"),
    "TrainedEnsemble": (".posterior", "TrainedEnsemble"),
    "empirical_ntk": (".empirical", "empirical_ntk"),
    "empirical_nngp": (".empirical", "empirical_nngp"),
    "monte_carlo_kernel": (".empirical", "monte_carlo_kernel"),
    "ArchitectureError": (".errors", "ArchitectureError"),
    "GPNTKWarning": (".errors", "GPNTKWarning"),
    "NumericalWarning": (".errors", "NumericalWarning"),
    "ApproximationWarning": (".errors", "ApproximationWarning"),
    "CompositionWarning": (".errors", "CompositionWarning"),
    "AmbiguousHyperparameterError": (".errors", "AmbiguousHyperparameterError"),
    "testing": (".testing", None),
    "GraphInputs": (".core.graph_inputs", "GraphInputs"),
    "NodeGraph": (".core.graph_inputs", "NodeGraph"),
    "GraphDataset": (".core.graph_inputs", "GraphDataset"),
    "normalized_adjacency": (".core.graph_inputs", "normalized_adjacency"),
    "graph_kernel_matrices": (".kernels.graph_gram", "graph_kernel_matrices"),
    "graph_kernel_matrices_by_depth": (".kernels.graph_gram", "graph_kernel_matrices_by_depth"),
    # an optional extra (pip install "gpntk[botorch]"): reachable as gpntk.botorch, never in __all__
    # (``from gpntk import *`` must not need BoTorch)
    "botorch": (".botorch", None),
}


#: old module paths -> where they moved (issue 15's reorganisation), kept for one release
_MOVED = {"csv_fit": "gpntk.cli.csv_fit"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import warnings

        warnings.warn(
            f"gpntk.{name} moved to {_MOVED[name]}; the old name will be removed", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(_MOVED[name])
    if name not in _LAZY:
        raise AttributeError(f"module 'gpntk' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from . import distributed, layers, settings, testing
    from .core.graph_inputs import GraphDataset, GraphInputs, NodeGraph, normalized_adjacency
    from .empirical import empirical_nngp, empirical_ntk, monte_carlo_kernel
    from .errors import (
        AmbiguousHyperparameterError,
        ApproximationWarning,
        ArchitectureError,
        CompositionWarning,
        GPNTKWarning,
        NumericalWarning,
    )
    from .kernels import EmpiricalNTKKernel, NeuralKernelSum, NNGPKernel, NTKKernel
    from .kernels.graph_gram import graph_kernel_matrices, graph_kernel_matrices_by_depth
    from .posterior import TrainedEnsemble
