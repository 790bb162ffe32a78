r"""Running a network for its empirical kernels: outputs, detached parameters, lazy initialisation.

The kernels are differentiable in the inputs, never in the network's parameters: where an input
requires grad (and grad mode is on) the network is called through
:func:`torch.func.functional_call` with its parameters detached, so that autograd reaches
:math:`x` (to any order) but no gradient reaches :math:`\theta`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .channels import as_channels

__all__ = [
    "detached_parameters", "differentiable", "ensure_initialized", "flat_outputs", "functional_outputs",
    "is_uninitialized", "model_device", "model_tensor", "outputs_of_inputs",
]


def flat_outputs(model: nn.Module, x: Tensor) -> Tensor:
    """``(n, k)``: ``model(x)`` with its outputs flattened into channels."""
    return as_channels(model(x))


def functional_outputs(model: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """``(n, k)``: the outputs of ``model`` called with the parameters and buffers ``state``.

    By :func:`torch.func.functional_call`: the model's own tensors are left as they are.
    """
    return as_channels(functional_call(model, state, (x,)))


def differentiable(*xs: Tensor) -> bool:
    """Whether a kernel of ``xs`` must be differentiable in them: grad mode on and one requires grad."""
    return torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad for x in xs)


def detached_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters, detached, for :func:`torch.func.functional_call` (no gradient reaches them)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


def outputs_of_inputs(model: nn.Module, x: Tensor) -> Tensor:
    """``(n, k)`` outputs, differentiable in ``x`` if it requires grad, never in the parameters."""
    if not differentiable(x):
        with torch.no_grad():
            return flat_outputs(model, x)
    ensure_initialized(model, x.detach())  # lazy parameters cannot be detached before they exist
    return functional_outputs(model, detached_parameters(model), x)


def is_uninitialized(p: Tensor) -> bool:
    """Whether ``p`` is a lazy module's parameter not yet materialised (no shape, no values)."""
    return isinstance(p, nn.parameter.UninitializedParameter)


def ensure_initialized(model: nn.Module, x: Tensor) -> None:
    """Materialise the lazy parameters of ``model`` (if any) by running it on the first row of ``x``."""
    if any(is_uninitialized(p) for p in model.parameters()):
        with torch.no_grad():
            model(x[:1])


def model_tensor(model: nn.Module) -> Tensor | None:
    """The first floating-point parameter (or buffer) of ``model``: its dtype and device are the model's."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not is_uninitialized(tensor) and tensor.dtype.is_floating_point:
            return tensor
    return None


def model_device(model: nn.Module) -> torch.device | None:
    """The device of :func:`model_tensor`, or ``None`` for a model without floating-point tensors."""
    tensor = model_tensor(model)
    return None if tensor is None else tensor.device
