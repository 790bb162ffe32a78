"""Probes for ``torch.func`` transforms: inside them, values cannot decide a branch or raise."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_transformed", "is_batched"]


def is_transformed(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a ``torch.func`` transform (grad, vmap, jvp...): no data-dependent checks."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def is_batched(x: Tensor) -> bool:
    """Whether ``x`` is (or wraps) a ``torch.func`` batched tensor (inside ``vmap``/``jacfwd``)."""
    functorch = torch._C._functorch
    try:
        while functorch.is_functorch_wrapped_tensor(x):
            if functorch.is_batchedtensor(x):
                return True
            x = functorch.get_unwrapped(x)
    except (AttributeError, RuntimeError):  # pragma: no cover - another torch: assume the general form
        return True
    return False
