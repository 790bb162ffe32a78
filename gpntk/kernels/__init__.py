"""GPyTorch kernels of infinite-width networks and the backends that evaluate them."""

from .infinite_width import InfiniteWidthKernel, NNGPKernel, NTKKernel

__all__ = ["InfiniteWidthKernel", "NTKKernel", "NNGPKernel"]
