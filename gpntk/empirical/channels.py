r"""Output channels: a network's outputs as ``(n, k)`` rows, and kernels over pairs of channels.

A network mapping ``(n, ...)`` inputs to ``(n,)`` or ``(n, k_1, k_2, ...)`` outputs has
:math:`k = \prod_i k_i` output channels; the empirical kernels are defined per pair of channels
:math:`(a, b)` and either kept as ``(..., k, k)`` (``"all"``) or only on the diagonal
:math:`a = b` (``"diag"``, the channels gpntk's per-channel infinite-width kernels compare with).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Channels", "OutputChannel", "as_channels", "contract_channels"]

#: which pairs of output channels :math:`(a, b)` a kernel is computed for
Channels = Literal["all", "diag"]


def as_channels(out: Tensor) -> Tensor:
    """A network's ``(n,)`` or ``(n, ...)`` outputs as ``(n, k)``: one row per input, one column per channel."""
    return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)


def contract_channels(equation: str, a: Tensor, b: Tensor, channels: Channels) -> Tensor:
    """``einsum(equation, a, b)`` over output-channel pairs: all ``(a, b)`` pairs, or only ``a == b`` (``"diag"``).

    ``equation`` names the channels of ``a`` and ``b`` with the letters ``a`` and ``b`` and keeps
    both in its output (``"iap,jbp->ijab"``); with ``"diag"`` both become ``a`` and the output
    keeps it once (``"iap,jap->ija"``).
    """
    if channels == "diag":
        lhs, rhs = equation.split("->")
        equation = lhs.replace("b", "a") + "->" + rhs.replace("b", "")
    return torch.einsum(equation, a, b)


class OutputChannel(nn.Module):
    """``model`` restricted to output channel ``index`` (rows stay independent)."""

    gpntk_rowwise = True  # selecting a channel never mixes rows; the wrapped modules are checked on their own

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return as_channels(self.model(x))[:, self.index]
