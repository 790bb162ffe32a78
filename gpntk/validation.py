"""Input checks shared by the kernels and the posterior: errors that name what is wrong."""

from __future__ import annotations

import math

import torch

from .coincident import _is_batched

__all__ = ["check_inputs", "check_kernel_inputs", "expanded_batch_shape"]


def check_inputs(name: str, x, *, batched: bool) -> None:
    """``x`` must be a finite floating-point tensor of shape ``(..., n, d)`` (``(n, d)`` unless ``batched``)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if batched and x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d), got {tuple(x.shape)}")
    if not batched and x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if _is_batched(x):  # inside torch.func.vmap values cannot decide a branch: NaN inputs give NaN kernels
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite values")


def check_kernel_inputs(x1, x2, *, diag: bool, input_shape: tuple[int, ...] | None = None) -> None:
    """The two inputs of a kernel call: finite float tensors ``(..., n, d)`` of one dtype, device and ``d``.

    With ``diag`` they are paired row by row, so they need as many rows; with ``input_shape``
    each row holds a tensor of that shape.
    """
    for name, x in (("x1", x1), ("x2", x2)):
        check_inputs(name, x, batched=True)
    if x1.dtype != x2.dtype:
        raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}; convert both to the same dtype")
    if x1.device != x2.device:
        raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(
            f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]} (shapes {tuple(x1.shape)} "
            f"and {tuple(x2.shape)})"
        )
    if input_shape is not None and x1.shape[-1] != math.prod(input_shape):
        raise ValueError(
            f"input_shape {input_shape} needs {math.prod(input_shape)} features per row, got {x1.shape[-1]}"
        )
    if x1.shape[-1] == 0:
        raise ValueError("inputs have zero features")
    if diag and x1.shape[-2] != x2.shape[-2]:
        raise ValueError(
            f"diag=True pairs the rows of x1 and x2, which needs as many points in both; got "
            f"{x1.shape[-2]} and {x2.shape[-2]} (shapes {tuple(x1.shape)} and {tuple(x2.shape)})"
        )


def expanded_batch_shape(sizes: tuple, current: torch.Size) -> torch.Size:
    """The batch shape asked of ``Kernel.expand_batch(*sizes)`` (sizes or one iterable), checked against ``current``."""
    if len(sizes) == 1 and hasattr(sizes[0], "__iter__"):
        shape = torch.Size(sizes[0])
    else:
        shape = torch.Size(sizes)
    try:
        torch.broadcast_shapes(shape, current)
    except RuntimeError:
        raise RuntimeError(f"Cannot expand a kernel with batch shape {current} to {shape}") from None
    return shape
