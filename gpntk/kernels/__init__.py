"""GPyTorch kernels of infinite-width networks and the backends that evaluate them."""

from .empirical import EmpiricalNTKKernel
from .infinite_width import InfiniteWidthKernel, NeuralKernelSum, NNGPKernel, NTKKernel

__all__ = ["EmpiricalNTKKernel", "InfiniteWidthKernel", "NTKKernel", "NNGPKernel", "NeuralKernelSum"]
