"""Checks of the inputs and the network that the empirical kernels share: errors that name what is wrong.

General argument checks (integers, choices among strings, float tensors) live in
:mod:`gpntk._validation`; these are the ones about a network and the rows it is applied to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validation import SUPPORTED_DTYPES, check_inputs

__all__ = ["check_network_dtype", "check_outputs", "check_rows", "has_trainable_parameters"]


def check_rows(x1: Tensor, x2: Tensor, model: nn.Module | None = None) -> None:
    """Finite float32/float64 inputs of shape ``(n, ...)`` (one row per input); a model not in half precision."""
    for name, x in (("x1", x1), ("x2", x2)):
        if not torch.is_tensor(x) or x.dim() < 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape (n, d) (one row per input), got {shape}")
        check_inputs(name, x, batched=True)
    if model is not None:
        low = sorted(
            {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype not in SUPPORTED_DTYPES}
        )
        if low:
            raise TypeError(
                f"the model has parameters of dtype {', '.join(low)}, which gpntk does not compute in (too small a "
                "range and precision); convert it with .float() or .double()"
            )


def check_network_dtype(dtype: torch.dtype) -> None:
    """The dtype an :class:`~gpntk.EmpiricalNTKKernel` runs its network in must be float32 or float64."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the network's dtype is {dtype}, which gpntk does not compute kernels in (too small a range and "
            "precision); convert it with kernel.float() or kernel.double()"
        )


def has_trainable_parameters(model: nn.Module) -> bool:
    """Whether ``model`` has a parameter with ``requires_grad=True`` (else its NTK is zero)."""
    return any(p.requires_grad for p in model.parameters())


def check_outputs(model: nn.Module, output: int | None, probe: Tensor, x1: Tensor, x2: Tensor) -> None:
    """Run ``model`` on a few rows ``probe``: it must accept them and return one output row per input row.

    ``output`` (a channel index, or ``None``) must be below the number of output channels; ``x1``
    and ``x2`` (the inputs ``probe`` was taken from) only appear in the messages.
    """
    name = type(model).__name__
    try:
        with torch.no_grad():
            out = model(probe)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(
            f"{name} could not be applied to inputs with {probe.shape[-1]} features (x1 {tuple(x1.shape)}, "
            f"x2 {tuple(x2.shape)}; the network sees rows of shape {tuple(probe.shape)}); does it expect "
            f"{probe.shape[-1]} input features? The network raised: {err}"
        ) from err
    if not torch.is_tensor(out) or out.dim() == 0 or out.shape[0] != probe.shape[0]:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(
            f"{name} must map (n, d) inputs to (n,) or (n, k) outputs, one row per input; on inputs of "
            f"shape {tuple(probe.shape)} it returned {got}"
        )
    k = math.prod(out.shape[1:])
    if output is not None and output >= k:
        raise ValueError(f"output={output} but {name} has {k} output channel{'s' * (k != 1)}")
