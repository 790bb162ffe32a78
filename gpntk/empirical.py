r"""Empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``, and Monte Carlo estimates.

For a network :math:`f(x;\theta) \in \mathbb R^k`,

.. math::
    \hat\Theta_{ab}(x, x') = \sum_p \frac{\partial f_a(x)}{\partial \theta_p}
        \frac{\partial f_b(x')}{\partial \theta_p}, \qquad
    \hat\Sigma_{ab}(x, x') = f_a(x)\, f_b(x'),

over the parameters with ``requires_grad=True`` (frozen layers contribute nothing). Averaged
over random initialisations of ``net.finite(width)``, both converge to the infinite-width
kernels as the width grows (Jacot et al. 2018; Lee et al. 2019), which is how the analytic
kernels are checked against real networks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

__all__ = ["empirical_ntk", "empirical_nngp", "monte_carlo_kernel"]


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)


def _reduce(full: Tensor, reduce: Literal["mean", "none"]) -> Tensor:
    if reduce == "none":
        return full
    if reduce == "mean":
        return full.diagonal(dim1=-2, dim2=-1).mean(-1)
    raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")


def _jacobian(model: nn.Module, x: Tensor, names: list[str], params: dict[str, Tensor]) -> Tensor:
    """``(n, k, P)``: the derivative of every output at every input w.r.t. the trainable parameters."""
    frozen = {k: v for k, v in model.named_parameters() if k not in params}
    buffers = dict(model.named_buffers())

    def outputs(p: dict[str, Tensor]) -> Tensor:
        return _outputs_functional(model, {**frozen, **p, **buffers}, x)

    jac = jacrev(outputs)(params)
    n, k = x.shape[0], jac[names[0]].shape[1]
    return torch.cat([jac[name].reshape(n, k, -1) for name in names], dim=-1)


def _outputs_functional(model: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    out = functional_call(model, state, (x,))
    return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)


def empirical_ntk(
    model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, reduce: Literal["mean", "none"] = "mean"
) -> Tensor:
    r"""The empirical NTK :math:`\hat\Theta(x_1, x_2)` of ``model`` at its current parameters.

    :param model: any module mapping ``(n, d)`` inputs to ``(n,)`` or ``(n, k)`` outputs.
    :param reduce: ``"mean"`` averages the per-channel kernels :math:`\hat\Theta_{aa}` into an
        ``(n1, n2)`` matrix (comparable with the per-channel infinite-width NTK); ``"none"``
        returns the full ``(n1, n2, k, k)`` tensor.
    """
    x2 = x1 if x2 is None else x2
    _ensure_initialized(model, x1)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True), so its NTK is zero")
    names = list(params)
    j1 = _jacobian(model, x1, names, params)
    j2 = j1 if x2 is x1 else _jacobian(model, x2, names, params)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    return _reduce(full, reduce)


def empirical_nngp(
    model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, reduce: Literal["mean", "none"] = "mean"
) -> Tensor:
    r"""One sample of the NNGP: :math:`\hat\Sigma(x_1, x_2) = f(x_1) f(x_2)^\top`, averaged over output channels.

    With ``reduce="none"`` the ``(n1, n2, k, k)`` outer products. Its expectation over random
    initialisations is the finite-width NNGP kernel.
    """
    x2 = x1 if x2 is None else x2
    with torch.no_grad():
        f1 = _outputs(model, x1)
        f2 = f1 if x2 is x1 else _outputs(model, x2)
    full = torch.einsum("ia,jb->ijab", f1, f2)
    return _reduce(full, reduce)


def _ensure_initialized(model: nn.Module, x: Tensor) -> None:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():
            model(x[:1])


def monte_carlo_kernel(
    net,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    width: int,
    n_samples: int,
    kind: Literal["ntk", "nngp"] = "ntk",
    out_features: int = 1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo estimate of the kernel of ``net.finite(width)`` over random initialisations.

    Draws ``n_samples`` networks (seeded, so the estimate is reproducible), evaluates their
    empirical kernel (averaged over ``out_features`` output channels) and returns
    ``(mean, standard_error)``, both ``(n1, n2)``. The mean converges to the infinite-width
    kernel as ``width`` grows, with a finite-width bias of order ``1/width`` and a spread across
    networks of order ``1/sqrt(width)`` for the NTK.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 for a standard error, got {n_samples}")
    x2 = x1 if x2 is None else x2
    generator = torch.Generator().manual_seed(seed)
    estimator = empirical_ntk if kind == "ntk" else empirical_nngp
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
    samples = []
    for _ in range(n_samples):
        model = net.finite(width, in_features=x1.shape[-1], out_features=out_features, generator=generator).to(x1)
        samples.append(estimator(model, x1, x2))
    stacked = torch.stack(samples)
    return stacked.mean(0), stacked.std(0) / math.sqrt(n_samples)
