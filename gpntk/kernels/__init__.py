"""GPyTorch kernels of infinite-width networks and the backends that evaluate them."""

from .centered import Centered
from .empirical import EmpiricalNTKKernel
from .infinite_width import InfiniteWidthKernel, NeuralKernelSum, NNGPKernel, NTKKernel

__all__ = ["Centered", "EmpiricalNTKKernel", "InfiniteWidthKernel", "NTKKernel", "NNGPKernel", "NeuralKernelSum"]
