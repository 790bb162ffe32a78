r"""The structured empirical NTK: per-layer sums over the affine layers' inputs and output gradients.

For a network of row-wise modules whose trainable parameters all belong to affine layers
:math:`h = c_w W a + c_b b` (:class:`~gpntk.core.finite.NTKLinear`, ``nn.Linear``; as
``net.finite()`` builds), applied at positions :math:`p` (several uses of one layer, extra
dimensions such as a convolution's pixels), the gradient of output :math:`f_\alpha(x)` w.r.t.
:math:`W` is :math:`c_w \sum_p g_{\alpha,p}(x)\, a_p(x)^\top`, with :math:`a_p` the layer's input
and :math:`g_{\alpha,p}` the derivative of :math:`f_\alpha` w.r.t. the layer's output there, so

.. math::
    \hat\Theta_{\alpha\beta}(x, x') = \sum_{\text{layers}} c_w^2 \sum_{p,q}
        \big(g_{\alpha,p}(x)\cdot g_{\beta,q}(x')\big)\big(a_p(x)\cdot a_q(x')\big)
        + c_b^2 \Big(\sum_p g_{\alpha,p}(x)\Big)\cdot\Big(\sum_q g_{\beta,q}(x')\Big),

which costs :math:`O(n_1 n_2 k^2 \cdot \text{width})` per layer instead of materialising the
:math:`n k \times \#\text{params}` Jacobian. The sum is written once (:func:`_layer_sum`) and
evaluated for two pairings of the rows: every row of ``x1`` with every row of ``x2``
(:func:`structured_ntk`, the kernel matrix) and row :math:`i` with row :math:`i` only
(:func:`paired_structured_ntk`, a kernel's diagonal, no :math:`m \times m` matrix).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from ..core.finite import ElementwiseActivation, NTKLinear
from .channels import Channels, contract_channels
from .network import detached_parameters, differentiable, flat_outputs, functional_outputs

__all__ = [
    "ROWWISE_MODULES", "affine_scales", "layer_gradients", "paired_structured_ntk", "structured_applicable",
    "structured_ntk",
]

#: torch modules that act on every input row separately and have no parameters the structured
#: NTK does not know about (besides these, any module with ``gpntk_rowwise = True``).
ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ModuleList, nn.Identity, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh,
    nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Mish, nn.Hardtanh, NTKLinear, ElementwiseActivation,
)

#: ``(module, a, g)``: an affine module, its inputs ``(n, P, n_in)`` and output gradients ``(k, n, P, n_out)``
LayerGradients = tuple[nn.Module, Tensor, Tensor]


def affine_scales(module: nn.Module) -> tuple[float, float]:
    """``(c_w, c_b)`` with ``h = c_w W a + c_b b`` for the affine modules the structured NTK knows."""
    if isinstance(module, NTKLinear):
        return module.weight_std / math.sqrt(module.weight.shape[1]), module.bias_std
    return 1.0, 1.0  # nn.Linear


def structured_applicable(model: nn.Module) -> bool:
    """Whether every module acts row by row and every trainable parameter is a known affine layer's."""
    known: set[int] = set()
    for module in model.modules():
        if not (isinstance(module, ROWWISE_MODULES) or getattr(module, "gpntk_rowwise", False) is True):
            return False
        if isinstance(module, (NTKLinear, nn.Linear)):
            if type(module).forward not in (NTKLinear.forward, nn.Linear.forward):
                return False  # a subclass with its own forward: the scales may not hold
            known.update(id(p) for p in module.parameters(recurse=False))
    return all(id(p) in known for p in model.parameters() if p.requires_grad)


# --- the affine layers' inputs and output gradients -------------------------------------------
def layer_gradients(model: nn.Module, x: Tensor, create_graph: bool = False) -> tuple[int, list[LayerGradients]]:
    """``(k, [(module, a, g)])`` for every trainable affine module of a row-wise ``model``.

    ``a`` ``(n, P, n_in)`` are the module's inputs and ``g`` ``(k, n, P, n_out)`` the derivatives of
    output channel ``k`` at each input row w.r.t. the module's outputs at that row, over the ``P``
    positions at which the module was applied (several uses of one module, extra dimensions).
    Because rows do not interact, the derivative of the sum over rows of channel ``k`` gives every
    row's own derivative, so ``k`` backward passes suffice for all ``n`` inputs.

    With ``create_graph`` (inputs that require grad) ``a`` and ``g`` stay differentiable in ``x``
    (``g`` by a double-backward graph) and the parameters are used detached; otherwise both are
    detached.
    """
    out, records = _record_affine_uses(model, x, create_graph)
    n, k = out.shape
    grads = iter(_output_gradients(out, [probe for _, uses in records for _, probe in uses], create_graph))
    layers = []
    for module, uses in records:
        if uses:
            a, g = _stack_uses(uses, [next(grads) for _ in uses], n, k, create_graph)
            layers.append((module, a, g))
    return k, layers


def _record_affine_uses(
    model: nn.Module, x: Tensor, create_graph: bool
) -> tuple[Tensor, list[tuple[nn.Module, list[tuple[Tensor, Tensor]]]]]:
    """Run ``model`` on ``x`` recording each use of a trainable affine module.

    Returns the ``(n, k)`` outputs and, per trainable affine module (in ``model.modules()`` order),
    its uses in call order: ``(a, probe)``, the module's input and a zero tensor added to its output
    whose gradient is the derivative w.r.t. that output.
    """
    records: dict[int, list[tuple[Tensor, Tensor]]] = {}
    modules: dict[int, nn.Module] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # the derivative w.r.t. a zero "probe" added to the output is the derivative w.r.t. the
        # output, and exists even where the output itself does not require grad
        probe = torch.zeros_like(output, requires_grad=True)
        records[id(module)].append((inputs[0], probe))
        return output + probe

    handles = []
    for module in model.modules():
        if isinstance(module, (NTKLinear, nn.Linear)) and any(p.requires_grad for p in module.parameters()):
            records[id(module)] = []
            modules[id(module)] = module
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            if create_graph:
                out = functional_outputs(model, detached_parameters(model), x)
            else:
                out = flat_outputs(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return out, [(modules[key], uses) for key, uses in records.items()]


def _output_gradients(out: Tensor, probes: list[Tensor], create_graph: bool) -> Sequence[Tensor | None]:
    """``(k, *probe.shape)`` per probe: the derivatives of each output channel (summed over rows) w.r.t. it.

    ``None`` where the outputs do not depend on a probe (or on nothing at all).
    """
    n, k = out.shape
    if not (probes and out.requires_grad):
        return [None] * len(probes)
    eye = torch.eye(k, dtype=out.dtype, device=out.device)
    seeds = eye.unsqueeze(1).expand(k, n, k)
    try:
        # retain_graph: a failure part-way through the batched pass must leave the graph to the fallback
        return torch.autograd.grad(
            out, probes, seeds, is_grads_batched=True, allow_unused=True, create_graph=create_graph,
            retain_graph=True,
        )
    except RuntimeError:  # an operation vmap cannot batch: one backward pass per channel
        per_channel = [
            torch.autograd.grad(out, probes, seeds[c], retain_graph=True, allow_unused=True, create_graph=create_graph)
            for c in range(k)
        ]
        return [
            None if per_channel[0][u] is None else torch.stack([pc[u] for pc in per_channel])
            for u in range(len(probes))
        ]


def _stack_uses(
    uses: list[tuple[Tensor, Tensor]], grads: list[Tensor | None], n: int, k: int, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """One module's ``a`` ``(n, P, n_in)`` and ``g`` ``(k, n, P, n_out)`` over all its uses and positions."""
    a_parts, g_parts = [], []
    for (a, probe), g in zip(uses, grads):
        if g is None:
            g = torch.zeros((k, *probe.shape), dtype=probe.dtype, device=probe.device)
        if not create_graph:
            a, g = a.detach(), g.detach()
        a_parts.append(a.reshape(n, -1, a.shape[-1]))
        g_parts.append(g.reshape(k, n, -1, probe.shape[-1]))
    return torch.cat(a_parts, 1), torch.cat(g_parts, 2)


# --- the per-layer sum, for two pairings of the rows ------------------------------------------
class _RowPairing(Protocol):
    r"""How the rows of the two input sets are paired, and the contractions that pairing needs.

    ``g`` are ``(k, n, P, n_out)`` output gradients, ``a`` ``(n, P, n_in)`` layer inputs.
    """

    def sum_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        """The shape of the sum over layers."""

    def result(self, total: Tensor) -> Tensor:
        """The kernel from the sum over layers."""

    def result_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        """The shape of the kernel (zero where no trainable affine layer is used)."""

    def single_position(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        """``(g·g', a·a')`` for layers applied once per row (``g`` ``(k, n, n_out)``, ``a`` ``(n, n_in)``)."""

    def positions_cheaper(self, a1: Tensor, g1: Tensor, a2: Tensor) -> bool:
        """Whether the sum over position pairs costs less than the per-row weight gradients."""

    def positions(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_p·g'_q, a_p·a'_q)`` for every pair of positions ``(p, q)`` (last two dimensions)."""

    def weight_gradients(self, g: Tensor, a: Tensor) -> Tensor:
        r"""The per-row weight gradients :math:`\sum_p g_{\alpha,p} a_p^\top`."""

    def products(self, w1: Tensor, w2: Tensor) -> Tensor:
        """The inner products of two sets of per-row weight gradients."""

    def bias(self, s1: Tensor, s2: Tensor) -> Tensor:
        r"""``(k, n, n_out)`` position sums :math:`\sum_p g_{\alpha,p}`: their inner products."""


class _AllPairs:
    """Every row of ``x1`` with every row of ``x2``: ``(n1, n2, k, k)``, or ``(n1, n2, k)`` on the channel diagonal."""

    def __init__(self, channels: Channels):
        self.channels = channels

    def sum_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        return (n1, n2, k) if self.channels == "diag" else (n1, n2, k, k)

    def result(self, total: Tensor) -> Tensor:
        return total

    def result_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        return self.sum_shape(k, n1, n2)

    def _rows(self, aa: Tensor) -> Tensor:
        """``aa`` ``(n1, n2, ...)`` broadcast over the channel dimensions."""
        channel_dims = 1 if self.channels == "diag" else 2
        return aa[(slice(None), slice(None)) + (None,) * channel_dims]

    def single_position(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        return contract_channels("aio,bjo->ijab", g1, g2, self.channels), self._rows(a1 @ a2.transpose(0, 1))

    def positions_cheaper(self, a1: Tensor, g1: Tensor, a2: Tensor) -> bool:
        k, n1, n2, p1, p2 = g1.shape[0], a1.shape[0], a2.shape[0], a1.shape[1], a2.shape[1]
        return k * k * n1 * n2 * p1 * p2 <= k * (n1 + n2) * a1.shape[-1] * g1.shape[-1]

    def positions(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        gg = contract_channels("aipo,bjqo->ijabpq", g1, g2, self.channels)
        return gg, self._rows(torch.einsum("ipd,jqd->ijpq", a1, a2))

    def weight_gradients(self, g: Tensor, a: Tensor) -> Tensor:
        return torch.einsum("aipo,ipd->iaod", g, a).reshape(a.shape[0], g.shape[0], -1)

    def products(self, w1: Tensor, w2: Tensor) -> Tensor:
        return contract_channels("iap,jbp->ijab", w1, w2, self.channels)

    def bias(self, s1: Tensor, s2: Tensor) -> Tensor:
        return contract_channels("aio,bjo->ijab", s1, s2, self.channels)


class _SameRows:
    r"""Row :math:`i` of ``x1`` with row :math:`i` of ``x2``, channels averaged: ``(m,)``, summed as ``(k, m)``."""

    def sum_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        return (k, n1)

    def result(self, total: Tensor) -> Tensor:
        return total.mean(0)

    def result_shape(self, k: int, n1: int, n2: int) -> tuple[int, ...]:
        return (n1,)

    def single_position(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        return (g1 * g2).sum(-1), (a1 * a2).sum(-1)

    def positions_cheaper(self, a1: Tensor, g1: Tensor, a2: Tensor) -> bool:
        return a1.shape[1] * a2.shape[1] <= a1.shape[-1] * g1.shape[-1]

    def positions(self, g1: Tensor, g2: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        return torch.einsum("aipo,aiqo->aipq", g1, g2), torch.einsum("ipd,iqd->ipq", a1, a2)

    def weight_gradients(self, g: Tensor, a: Tensor) -> Tensor:
        return torch.einsum("aipo,ipd->aiod", g, a)

    def products(self, w1: Tensor, w2: Tensor) -> Tensor:
        return (w1 * w2).sum((-2, -1))

    def bias(self, s1: Tensor, s2: Tensor) -> Tensor:
        return (s1 * s2).sum(-1)


def _layer_sum(model: nn.Module, x1: Tensor, x2: Tensor, *, same: bool, pairing: _RowPairing) -> Tensor:
    """The structured NTK (module docstring) of the rows of ``x1`` and ``x2`` that ``pairing`` pairs.

    ``same``: ``x2`` holds the values of ``x1``, so its layer gradients are not computed again.
    """
    create_graph = differentiable(x1, x2)
    k, layers1 = layer_gradients(model, x1, create_graph)
    layers2 = layers1 if same else layer_gradients(model, x2, create_graph)[1]
    n1, n2 = x1.shape[0], x2.shape[0]
    if not layers1:
        return torch.zeros(pairing.result_shape(k, n1, n2), dtype=x1.dtype, device=x1.device)
    total = torch.zeros(pairing.sum_shape(k, n1, n2), dtype=layers1[0][2].dtype, device=layers1[0][2].device)
    by_module2 = {id(module): (a, g) for module, a, g in layers2}
    for module, a1, g1 in layers1:
        a2, g2 = by_module2[id(module)]
        c_w, c_b = affine_scales(module)
        if module.weight.requires_grad:
            if a1.shape[1] == 1 and a2.shape[1] == 1:
                gg, aa = pairing.single_position(g1[:, :, 0], g2[:, :, 0], a1[:, 0], a2[:, 0])
                total += (c_w**2) * gg * aa
            elif pairing.positions_cheaper(a1, g1, a2):
                gg, aa = pairing.positions(g1, g2, a1, a2)
                total += (c_w**2) * (gg * aa).sum((-2, -1))
            else:  # materialise the per-row weight gradients
                w1 = pairing.weight_gradients(g1, a1)
                w2 = w1 if same else pairing.weight_gradients(g2, a2)
                total += (c_w**2) * pairing.products(w1, w2)
        if module.bias is not None and module.bias.requires_grad:
            total += (c_b**2) * pairing.bias(g1.sum(2), g2.sum(2))
    return pairing.result(total)


def structured_ntk(model: nn.Module, x1: Tensor, x2: Tensor, channels: Channels) -> Tensor:
    """The ``(n1, n2, k, k)`` structured NTK between the rows of ``x1`` and ``x2`` (``(n1, n2, k)`` with ``"diag"``).

    ``x2 is x1`` computes the layer gradients once. Differentiable in the inputs when they
    require grad (never in the parameters).
    """
    return _layer_sum(model, x1, x2, same=x2 is x1, pairing=_AllPairs(channels))


def paired_structured_ntk(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool) -> Tensor:
    r"""``(m,)``: :math:`\frac1k\sum_\alpha \hat\Theta_{\alpha\alpha}(x_{a,i}, x_{b,i})` for paired rows.

    :math:`O(m k \cdot \text{width})` per layer, no Jacobian and no :math:`m \times m` matrix;
    ``same`` (``xb`` equal to ``xa``) computes the layer gradients once.
    """
    return _layer_sum(net, xa, xb, same=same, pairing=_SameRows())
