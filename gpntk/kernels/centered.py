r"""A kernel evaluated on affinely mapped inputs: BoTorch's unit cube onto :math:`[-1, 1]^d`.

Infinite-width kernels are not translation invariant (they depend on input norms and angles);
on the positive orthant of the unit cube their correlations are compressed towards 1.
:class:`Centered` evaluates its base kernel on :math:`s\,(x - c)` (by default :math:`2x - 1`),
inside the kernel, so that a model's transformed inputs stay in the unit cube (BoTorch's
``SingleTaskGP`` warns when they do not).
"""

from __future__ import annotations

from typing import Any

from gpytorch.kernels import Kernel
from torch import Tensor

from .._validation import positive_number, real_argument

__all__ = ["Centered"]


class Centered(Kernel):
    r"""``base_kernel`` evaluated on :math:`s\,(x - c)`: :math:`k(x, x') = k_{\text{base}}(s(x - c), s(x' - c))`.

    :param base_kernel: any GPyTorch kernel (e.g. :class:`~gpntk.NTKKernel`); its batch shape is
        the wrapper's.
    :param center: :math:`c`, subtracted from every input feature (default 0.5, the middle of the
        unit cube).
    :param scale: :math:`s > 0` (default 2): with the defaults :math:`[0, 1]^d \to [-1, 1]^d`.

    Typical use, after BoTorch's ``Normalize``::

        covar_module = ScaleKernel(Centered(gpntk.NTKKernel(net)))

    The wrapper has no parameters of its own; the base kernel's are reached as
    ``kernel.base_kernel...`` (GPyTorch's convention, as for ``ScaleKernel``). Inputs ``(..., n, d)``;
    ``diag=True`` and ``last_dim_is_batch`` are passed on to the base kernel.
    """

    def __init__(self, base_kernel: Kernel, center: float = 0.5, scale: float = 2.0, **kwargs: Any):
        if not isinstance(base_kernel, Kernel):
            raise TypeError(f"Centered wraps a gpytorch.kernels.Kernel, got {type(base_kernel).__name__}")
        kwargs.setdefault("batch_shape", base_kernel.batch_shape)
        super().__init__(**kwargs)
        self.base_kernel = base_kernel
        self.center = real_argument("center", center)
        self.scale = positive_number("scale", scale)

    @property
    def is_stationary(self) -> bool:
        return bool(self.base_kernel.is_stationary)

    def mapped(self, x: Tensor) -> Tensor:
        r"""The inputs the base kernel sees, :math:`s\,(x - c)`."""
        return self.scale * (x - self.center)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Any:
        return self.base_kernel.forward(
            self.mapped(x1), self.mapped(x2), diag=diag, last_dim_is_batch=last_dim_is_batch, **params
        )

    def __repr__(self) -> str:
        return f"Centered({self.base_kernel!r}, center={self.center}, scale={self.scale})"
