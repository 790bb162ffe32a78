r"""The empirical NTK of a network at its current parameters, by the algorithm that applies.

For a network :math:`f(x;\theta) \in \mathbb R^k`,

.. math::
    \hat\Theta_{ab}(x, x') = \sum_p \frac{\partial f_a(x)}{\partial \theta_p}
        \frac{\partial f_b(x')}{\partial \theta_p}

over the parameters with ``requires_grad=True`` (frozen layers contribute nothing). Networks of
row-wise modules whose trainable parameters all belong to affine layers (as ``net.finite()``
builds) take the layer-by-layer sum of :mod:`gpntk.empirical.structured`; any other module the
full Jacobian of :mod:`gpntk.empirical.jacobian`.

**Gradients.** The kernel is differentiable in the inputs: when ``x1`` or ``x2`` requires grad
(and grad mode is on), the per-layer output gradients are computed with ``create_graph=True``, so
:math:`\partial\hat\Theta/\partial x` (and higher derivatives) come out of ordinary autograd. The
network's parameters are then used detached: no gradient ever reaches them through a kernel.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .._validation import choice_argument
from .channels import Channels
from .checks import check_rows, has_trainable_parameters
from .jacobian import jacobian_ntk, paired_jacobian_ntk
from .network import ensure_initialized
from .structured import paired_structured_ntk, structured_applicable, structured_ntk

__all__ = ["empirical_ntk", "paired_ntk"]


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    reduce: Literal["mean", "none"] = "mean",
    method: Literal["auto", "structured", "jacobian"] = "auto",
) -> Tensor:
    r"""The empirical NTK :math:`\hat\Theta(x_1, x_2)` of ``model`` at its current parameters.

    :param model: any module mapping ``(n, d)`` inputs to ``(n,)`` or ``(n, k)`` outputs.
    :param reduce: ``"mean"`` averages the per-channel kernels :math:`\hat\Theta_{aa}` into an
        ``(n1, n2)`` matrix (comparable with the per-channel infinite-width NTK); ``"none"``
        returns the full ``(n1, n2, k, k)`` tensor.
    :param method: ``"jacobian"`` builds the full Jacobian with :func:`torch.func.jacrev` (any
        module); ``"structured"`` sums per-layer products of the affine layers' inputs and output
        gradients (no ``n x #params`` Jacobian: much faster and lighter for wide networks), which
        needs a network of row-wise modules whose trainable parameters all belong to
        :class:`~gpntk.core.finite.NTKLinear` / ``nn.Linear`` layers, as ``net.finite()`` builds;
        ``"auto"`` (default) takes ``"structured"`` where it applies.

    Differentiable in ``x1``, ``x2`` when they require grad (never in the parameters); see the
    module docstring.
    """
    x2 = x1 if x2 is None else x2
    check_rows(x1, x2, model)
    choice_argument("reduce", reduce, ("mean", "none"))
    choice_argument("method", method, ("auto", "structured", "jacobian"))
    ensure_initialized(model, x1)
    if not has_trainable_parameters(model):
        raise ValueError("model has no trainable parameters (requires_grad=True), so its NTK is zero")
    structured = structured_applicable(model)
    if method == "structured" and not structured:
        raise ValueError(
            "method='structured' needs a network of row-wise modules whose trainable parameters all "
            "belong to NTKLinear / nn.Linear layers; use method='jacobian' for this model"
        )
    channels: Channels = "diag" if reduce == "mean" else "all"
    if structured and method != "jacobian":
        kernel = structured_ntk(model, x1, x2, channels)
    else:
        kernel = jacobian_ntk(model, x1, x2, channels)
    return kernel.mean(-1) if reduce == "mean" else kernel


def paired_ntk(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool) -> Tensor:
    r"""``(m,)``: :math:`\frac1k\sum_a \nabla_\theta f_a(x_{a,i}) \cdot \nabla_\theta f_a(x_{b,i})` for paired rows.

    The diagonal of the channel-averaged NTK between paired rows of ``xa`` and ``xb`` (``same``:
    equal values), without the :math:`m \times m` matrix: layer by layer where
    :func:`~gpntk.empirical.structured.structured_applicable`, from chunks of Jacobians otherwise.
    No input checks (the caller's).
    """
    if structured_applicable(net):
        return paired_structured_ntk(net, xa, xb, same=same)
    return paired_jacobian_ntk(net, xa, xb, same=same)
