"""Input checks shared by the kernels and the posterior: errors that name what is wrong."""

from __future__ import annotations

import torch

__all__ = ["check_inputs"]


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
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite values")
