r"""The empirical (finite-width) NTK and NNGP of any ``torch.nn.Module`` as a GPyTorch kernel.

For a network :math:`f(x; \theta) \in \mathbb R^k` at fixed parameters :math:`\theta`,

.. math::
    \hat\Theta(x, x') = \frac1k \sum_{a=1}^k \sum_p \frac{\partial f_a(x)}{\partial \theta_p}
        \frac{\partial f_a(x')}{\partial \theta_p}, \qquad
    \hat\Sigma(x, x') = \frac1k \sum_{a=1}^k f_a(x)\, f_a(x'),

over the parameters with ``requires_grad=True`` (Jacot et al. 2018). Averaged over random
initialisations of ``net.finite(width)`` both converge to the per-channel infinite-width kernels
of :class:`~gpntk.NTKKernel` / :class:`~gpntk.NNGPKernel` as the width grows (Lee et al. 2019),
so :class:`EmpiricalNTKKernel` puts finite and infinite networks into the same GP code.

The matrices are computed by :func:`gpntk.empirical.empirical_ntk` (layer by layer for networks
built by ``net.finite``, from the full :func:`torch.func.jacrev` Jacobian otherwise);
:func:`gpntk.empirical.evaluation.empirical_covariance` and
:func:`gpntk.empirical.evaluation.empirical_diagonal` are the functions that the kernel's
full-matrix and ``diag=True`` calls use.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from gpytorch.kernels import Kernel
from torch import Tensor, nn

from .._validation import check_kernel_inputs, choice_argument, expanded_batch_shape, integer_argument
from ..empirical.checks import has_trainable_parameters
from ..empirical.evaluation import Kind, empirical_covariance, empirical_diagonal
from ..empirical.network import is_uninitialized, model_device, model_tensor

__all__ = ["EmpiricalNTKKernel"]


class EmpiricalNTKKernel(Kernel):
    r"""The empirical NTK (or NNGP) of a finite network ``model`` at its current weights.

    .. math::
        \hat\Theta(x, x') = \frac1k \sum_{a=1}^k \nabla_\theta f_a(x) \cdot \nabla_\theta f_a(x'),
        \qquad \hat\Sigma(x, x') = \frac1k \sum_{a=1}^k f_a(x)\, f_a(x'),

    the gradient running over the parameters with ``requires_grad=True`` (Jacot et al. 2018; Lee
    et al. 2019). Averaged over random initialisations of ``net.finite(width)`` it approaches
    ``gpntk.NTKKernel(net)`` / ``gpntk.NNGPKernel(net)``.

    :param model: any module mapping ``(n, d)`` inputs to ``(n,)`` or ``(n, k)`` outputs (further
        output dimensions are flattened into the ``k`` channels). It must treat rows
        independently; it is always called in eval mode (dropout off, batch norm on its running
        statistics), its training flags being restored afterwards.
    :param kind: ``"ntk"`` (default) for :math:`\hat\Theta`, ``"nngp"`` for :math:`\hat\Sigma`.
        The NTK needs at least one trainable parameter; the NNGP does not.
    :param output: ``None`` (default) averages the per-channel kernels over the ``k`` output
        channels, the quantity comparable with gpntk's per-channel infinite-width kernels;
        ``output=i`` (``0 <= i < k``) uses channel ``i`` only.
    :param batch_shape: GPyTorch batch shape; the kernel has no hyperparameters, so the matrix is
        only broadcast to it.
    :param active_dims: as for any GPyTorch kernel.

    The network is a fixed snapshot, held by reference and not registered as a submodule: its
    weights are not among the kernel's ``parameters()``, ``named_hyperparameters()`` or
    ``state_dict()``, so fitting a GP's marginal likelihood never moves them (no gradient reaches
    them either). Changing the weights in place changes the kernel; ``copy.deepcopy(model)``
    first for an independent copy. ``kernel.to(...)``, ``.double()``, ``.cuda()`` move the network
    too (the one object, in place, as ``Module.to`` does with submodules), and pickling or
    deep-copying the kernel carries the network along.

    Calling the kernel returns the ``(..., n1, n2)`` matrix as a tensor (GPyTorch then multiplies
    it with other kernels exactly, never through a root decomposition; derivatives of any order exist);
    ``diag=True`` returns the ``(..., n)`` values :math:`k(x_{1,i}, x_{2,i})` from per-point
    Jacobians (NTK) or outputs (NNGP), without the full matrix. Inputs are ``(..., n, d)``
    floating-point tensors on the network's device. **dtype rule**: the network is run in its own
    dtype (inputs are converted to it) and the kernel is returned in the inputs' dtype, so a
    float32 network gives a float32-accurate kernel even for float64 inputs; call
    ``kernel.double()`` for float64 accuracy. The kernel is **differentiable in the inputs**
    (first and higher derivatives, by autograd through the per-layer output gradients computed
    with ``create_graph=True``), so gradient-based optimisation over ``x``, e.g. BoTorch's
    ``optimize_acqf``, works; no gradient reaches the network's weights.

    Example::

        model = net.finite(512, in_features=d).double()     # or any torch.nn.Module
        covar = gpytorch.kernels.ScaleKernel(EmpiricalNTKKernel(model))
    """

    has_lengthscale = False

    def __init__(
        self,
        model: nn.Module,
        kind: Kind = "ntk",
        output: int | None = None,
        batch_shape: torch.Size = torch.Size([]),
        active_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EmpiricalNTKKernel needs a torch.nn.Module, got {type(model).__name__}")
        choice_argument("kind", kind, ("ntk", "nngp"))
        if output is not None:
            try:
                output = integer_argument("output", output, minimum=0)
            except ValueError as error:
                raise ValueError(f"{error} (a channel index, or None for the mean over channels)") from None
        if kind == "ntk" and not has_trainable_parameters(model):
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (requires_grad=True), so its NTK is zero; "
                "use kind='nngp' for the kernel of its outputs"
            )
        super().__init__(batch_shape=torch.Size(batch_shape), active_dims=active_dims, **kwargs)
        # kept out of ``_modules`` so that the network's weights are no kernel parameters
        self.__dict__["_network"] = model
        self.kind: Kind = kind
        self.output = output

    @property
    def model(self) -> nn.Module:
        """The network (held by reference, not as a submodule)."""
        return self.__dict__["_network"]

    @property
    def is_stationary(self) -> bool:
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The network's dtype (the one the kernel is computed in)."""
        return self._one_of("dtype", torch.get_default_dtype())

    @property
    def device(self) -> torch.device | None:
        """The network's device (inputs must be on it)."""
        return self._one_of("device", None)

    def _one_of(self, attribute: str, default: Any) -> Any:
        tensors = list(self.parameters())
        network = model_tensor(self.model)
        if network is not None:
            tensors.append(network)
        values = {getattr(t, attribute) for t in tensors}
        if len(values) > 1:
            raise RuntimeError(
                f"The kernel's parameters have multiple {attribute}s (the network's included): {values}."
            )
        return values.pop() if values else default

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> "EmpiricalNTKKernel":
        # ``to``, ``double``, ``cuda``... reach the network too, although it is no submodule
        super()._apply(fn, *args, **kwargs)
        self.model._apply(fn, *args, **kwargs)
        return self

    def _validate(self, x1: Tensor, x2: Tensor, diag: bool) -> None:
        check_kernel_inputs(x1, x2, diag=diag)
        device = model_device(self.model)
        if device is not None and device != x1.device:
            raise ValueError(f"the inputs are on {x1.device} but the network is on {device}; use kernel.to(device)")

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor:
        if last_dim_is_batch:
            raise RuntimeError("EmpiricalNTKKernel does not support last_dim_is_batch")
        self._validate(x1, x2, diag)
        same = x1 is x2
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        if diag:
            out = empirical_diagonal(x1, x2, model=self.model, kind=self.kind, output=self.output)
            return out.expand(*batch, x1.shape[-2])
        if batch != x1.shape[:-2] or batch != x2.shape[:-2]:  # the kernel's own batch shape
            x1 = x1.expand(*batch, *x1.shape[-2:])
            x2 = x1 if same else x2.expand(*batch, *x2.shape[-2:])
        # A tensor, never a lazy operator: GPyTorch multiplies a tensor exactly, whereas the
        # product of two lazy factors replaces each by a root decomposition (Lanczos of rank
        # <= 100 above max_cholesky_size), and the full matrix is formed in any case. Autograd
        # reaches x1, x2 to any order.
        return empirical_covariance(x1, x2, model=self.model, kind=self.kind, output=self.output)

    # GPyTorch's versions deep-copy the kernel (and with it the network) and, with no parameters
    # to index, would keep the old batch shape
    def __getitem__(self, index: Any) -> "EmpiricalNTKKernel":
        if len(self.batch_shape) == 0:
            return self
        index = index if isinstance(index, tuple) else (index,)
        return self._with_batch_shape(torch.empty(self.batch_shape)[index].shape)

    def expand_batch(self, *sizes: int | Sequence[int]) -> "EmpiricalNTKKernel":
        new_batch_shape = expanded_batch_shape(sizes, self.batch_shape)
        if new_batch_shape == self.batch_shape:
            return self
        return self._with_batch_shape(new_batch_shape)

    def _with_batch_shape(self, batch_shape: torch.Size) -> "EmpiricalNTKKernel":
        """A kernel on the same network (shared, not copied) with another batch shape."""
        return EmpiricalNTKKernel(
            self.model, kind=self.kind, output=self.output, batch_shape=batch_shape, active_dims=self.active_dims
        )

    def extra_repr(self) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad and not is_uninitialized(p))
        return (
            f"model={type(self.model).__name__} ({trainable} trainable parameters), kind={self.kind!r}, "
            f"output={self.output!r}"
        )
