"""gpntk: infinitely wide neural networks as first-class Gaussian processes in GPyTorch.

>>> import gpntk
>>> from gpntk import layers as L
>>> net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
>>> ntk = gpntk.NTKKernel(net)          # a gpytorch.kernels.Kernel
"""

from ._quiet_import import stdout_to_stderr

# importing GPyTorch imports pykeops, which prints a banner on stdout: send it to stderr
with stdout_to_stderr():
    import gpytorch  # noqa: F401

    from . import layers, settings
    from .empirical import empirical_nngp, empirical_ntk, monte_carlo_kernel
    from .errors import ApproximationWarning, ArchitectureError, CompositionWarning, GPNTKWarning, NumericalWarning
    from .kernels import EmpiricalNTKKernel, NeuralKernelSum, NNGPKernel, NTKKernel
    from .posterior import TrainedEnsemble

del stdout_to_stderr

__version__ = "0.1.0"
"""The version of gpntk."""

__all__ = [
    "layers", "settings", "NTKKernel", "NNGPKernel", "EmpiricalNTKKernel", "TrainedEnsemble",
    "empirical_ntk", "empirical_nngp", "monte_carlo_kernel",
    "ArchitectureError", "GPNTKWarning", "NumericalWarning", "ApproximationWarning",
    "CompositionWarning", "__version__",
    "NeuralKernelSum",
]
