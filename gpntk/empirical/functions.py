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

**Gradients.** The kernels are differentiable in the inputs: when ``x1`` or ``x2`` requires grad
(and grad mode is on), the per-layer output gradients are computed with ``create_graph=True``, so
:math:`\partial\hat\Theta/\partial x` (and higher derivatives) come out of ordinary autograd. The
network's parameters are then used detached: no gradient ever reaches them through a kernel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from .._validation import SUPPORTED_DTYPES, check_inputs, integer_argument
from ..core.finite import ElementwiseActivation, NTKLinear

if TYPE_CHECKING:  # pragma: no cover
    from ..core.layer import Layer

__all__ = ["empirical_ntk", "empirical_nngp", "monte_carlo_kernel"]

#: torch modules that act on every input row separately and have no parameters the structured
#: NTK does not know about (besides these, any module with ``gpntk_rowwise = True``).
_ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ModuleList, nn.Identity, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh,
    nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Mish, nn.Hardtanh, NTKLinear, ElementwiseActivation,
)


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)


def _differentiable(*xs: Tensor) -> bool:
    """Whether a kernel of ``xs`` must be differentiable in them: grad mode on and one requires grad."""
    return torch.is_grad_enabled() and any(torch.is_tensor(x) and x.requires_grad for x in xs)


def _detached_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters, detached, for :func:`torch.func.functional_call` (no gradient reaches them)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


def _outputs_of_inputs(model: nn.Module, x: Tensor) -> Tensor:
    """``(n, k)`` outputs, differentiable in ``x`` if it requires grad, never in the parameters."""
    if not _differentiable(x):
        with torch.no_grad():
            return _outputs(model, x)
    _ensure_initialized(model, x.detach())  # lazy parameters cannot be detached before they exist
    return _outputs_functional(model, _detached_parameters(model), x)


def _check_inputs(x1: Tensor, x2: Tensor, model: nn.Module | None = None) -> None:
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


def _check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")


def _pair(eq_full: str, a: Tensor, b: Tensor, channels: str) -> Tensor:
    """``einsum`` over output-channel pairs: all ``(a, b)`` pairs, or only ``a == b`` (``channels="diag"``)."""
    if channels == "diag":
        lhs, rhs = eq_full.split("->")
        eq_full = lhs.replace("b", "a") + "->" + rhs.replace("b", "")
    return torch.einsum(eq_full, a, b)


# --- generic path: the full Jacobian with torch.func ------------------------------------------
def _jacobian(model: nn.Module, x: Tensor, names: list[str], params: dict[str, Tensor]) -> Tensor:
    """``(n, k, P)``: the derivative of every output at every input w.r.t. the trainable parameters."""
    frozen = {k: v for k, v in model.named_parameters() if k not in params}
    # buffers are passed in (as copies) so that modules updating them in place (batch norm's
    # running statistics) work under the transform and leave the model's own buffers untouched
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def outputs(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return _outputs_functional(model, {**frozen, **p, **b}, x)

    jac = jacrev(outputs, argnums=0)(params, buffers)
    n, k = x.shape[0], jac[names[0]].shape[1]
    return torch.cat([jac[name].reshape(n, k, -1) for name in names], dim=-1)


def _outputs_functional(model: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    out = functional_call(model, state, (x,))
    return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)


def _ntk_jacobian(model: nn.Module, x1: Tensor, x2: Tensor, channels: str) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    names = list(params)
    j1 = _jacobian(model, x1, names, params)
    j2 = j1 if x2 is x1 else _jacobian(model, x2, names, params)
    return _pair("iap,jbp->ijab", j1, j2, channels)


# --- structured path: affine layers' inputs and output gradients ------------------------------
def _affine_scales(module: nn.Module) -> tuple[float, float]:
    """``(c_w, c_b)`` with ``h = c_w W a + c_b b`` for the affine modules the structured NTK knows."""
    if isinstance(module, NTKLinear):
        return module.weight_std / math.sqrt(module.weight.shape[1]), module.bias_std
    return 1.0, 1.0  # nn.Linear


def _structured_applicable(model: nn.Module) -> bool:
    """Whether every module acts row by row and every trainable parameter is a known affine layer's."""
    known: set[int] = set()
    for module in model.modules():
        if not (isinstance(module, _ROWWISE_MODULES) or getattr(module, "gpntk_rowwise", False) is True):
            return False
        if isinstance(module, (NTKLinear, nn.Linear)):
            if type(module).forward not in (NTKLinear.forward, nn.Linear.forward):
                return False  # a subclass with its own forward: the scales may not hold
            known.update(id(p) for p in module.parameters(recurse=False))
    return all(id(p) in known for p in model.parameters() if p.requires_grad)


def _layer_gradients(
    model: nn.Module, x: Tensor, create_graph: bool = False
) -> tuple[int, list[tuple[nn.Module, Tensor, Tensor]]]:
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
                out = _outputs_functional(model, _detached_parameters(model), x)
            else:
                out = _outputs(model, x)
    finally:
        for handle in handles:
            handle.remove()
    n, k = out.shape
    uses = [(key, a, h) for key, recs in records.items() for a, h in recs]
    hs = [h for _, _, h in uses]
    eye = torch.eye(k, dtype=out.dtype, device=out.device)
    seeds = eye.unsqueeze(1).expand(k, n, k)
    grads: Sequence[Tensor | None]
    if hs and out.requires_grad:
        try:
            grads = torch.autograd.grad(
                out, hs, seeds, is_grads_batched=True, allow_unused=True, create_graph=create_graph
            )
        except RuntimeError:  # an operation vmap cannot batch: one backward pass per channel
            per_channel = [
                torch.autograd.grad(
                    out, hs, seeds[c], retain_graph=True, allow_unused=True, create_graph=create_graph
                )
                for c in range(k)
            ]
            grads = [
                None if per_channel[0][u] is None else torch.stack([pc[u] for pc in per_channel])
                for u in range(len(hs))
            ]
    else:
        grads = [None] * len(hs)
    layers = []
    for key in records:
        a_parts, g_parts = [], []
        for (use_key, a, h), g in zip(uses, grads):
            if use_key != key:
                continue
            if g is None:
                g = torch.zeros((k, *h.shape), dtype=h.dtype, device=h.device)
            if not create_graph:
                a, g = a.detach(), g.detach()
            a_parts.append(a.reshape(n, -1, a.shape[-1]))
            g_parts.append(g.reshape(k, n, -1, h.shape[-1]))
        if a_parts:
            layers.append((modules[key], torch.cat(a_parts, 1), torch.cat(g_parts, 2)))
    return k, layers


def _ntk_structured(model: nn.Module, x1: Tensor, x2: Tensor, channels: str) -> Tensor:
    r"""The ``(n1, n2, k, k)`` NTK from each affine layer's inputs and output gradients.

    With ``channels="diag"`` only the ``(n1, n2, k)`` channel diagonal is computed.

    For :math:`h = c_w W a + c_b b` applied at positions :math:`p`, the gradient of output
    :math:`f_\alpha(x)` w.r.t. :math:`W` is :math:`c_w \sum_p g_{\alpha,p}(x)\, a_p(x)^\top`, so

    .. math::
        \hat\Theta_{\alpha\beta}(x, x') \mathrel{+}= c_w^2 \sum_{p,q}
            \big(g_{\alpha,p}(x)\cdot g_{\beta,q}(x')\big)\big(a_p(x)\cdot a_q(x')\big)
            + c_b^2 \Big(\sum_p g_{\alpha,p}(x)\Big)\cdot\Big(\sum_q g_{\beta,q}(x')\Big),

    which costs :math:`O(n_1 n_2 k^2 \cdot \text{width})` per layer instead of materialising
    the :math:`n k \times \#\text{params}` Jacobian.
    """
    create_graph = _differentiable(x1, x2)
    k, layers1 = _layer_gradients(model, x1, create_graph)
    layers2 = layers1 if x2 is x1 else _layer_gradients(model, x2, create_graph)[1]
    n1, n2 = x1.shape[0], x2.shape[0]
    shape = (n1, n2, k) if channels == "diag" else (n1, n2, k, k)
    if not layers1:
        return torch.zeros(shape, dtype=x1.dtype, device=x1.device)
    ref = layers1[0][2]
    full = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    expand = (slice(None), slice(None)) + (None,) * (len(shape) - 2)
    by_module2 = {id(m): (a, g) for m, a, g in layers2}
    for module, a1, g1 in layers1:
        a2, g2 = by_module2[id(module)]
        c_w, c_b = _affine_scales(module)
        if module.weight.requires_grad:
            p1, p2 = a1.shape[1], a2.shape[1]
            if p1 == 1 and p2 == 1:
                gg = _pair("aio,bjo->ijab", g1[:, :, 0], g2[:, :, 0], channels)
                full += (c_w**2) * gg * (a1[:, 0] @ a2[:, 0].transpose(0, 1))[expand]
            elif k * k * n1 * n2 * p1 * p2 <= k * (n1 + n2) * a1.shape[-1] * g1.shape[-1]:
                gg = _pair("aipo,bjqo->ijabpq", g1, g2, channels)
                aa = torch.einsum("ipd,jqd->ijpq", a1, a2)
                full += (c_w**2) * (gg * aa[expand]).sum((-2, -1))
            else:  # materialise the per-input weight gradients
                j1 = torch.einsum("aipo,ipd->iaod", g1, a1).reshape(n1, k, -1)
                j2 = j1 if x2 is x1 else torch.einsum("aipo,ipd->iaod", g2, a2).reshape(n2, k, -1)
                full += (c_w**2) * _pair("iap,jbp->ijab", j1, j2, channels)
        if module.bias is not None and module.bias.requires_grad:
            full += (c_b**2) * _pair("aio,bjo->ijab", g1.sum(2), g2.sum(2), channels)
    return full


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
        :class:`~gpntk.finite.NTKLinear` / ``nn.Linear`` layers, as ``net.finite()`` builds;
        ``"auto"`` (default) takes ``"structured"`` where it applies.

    Differentiable in ``x1``, ``x2`` when they require grad (never in the parameters); see the
    module docstring.
    """
    x2 = x1 if x2 is None else x2
    _check_inputs(x1, x2, model)
    _check_reduce(reduce)
    if method not in ("auto", "structured", "jacobian"):
        raise ValueError(f"method must be 'auto', 'structured' or 'jacobian', got {method!r}")
    _ensure_initialized(model, x1)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (requires_grad=True), so its NTK is zero")
    structured = _structured_applicable(model)
    if method == "structured" and not structured:
        raise ValueError(
            "method='structured' needs a network of row-wise modules whose trainable parameters all "
            "belong to NTKLinear / nn.Linear layers; use method='jacobian' for this model"
        )
    channels = "diag" if reduce == "mean" else "all"
    if structured and method != "jacobian":
        kernel = _ntk_structured(model, x1, x2, channels)
    else:
        kernel = _ntk_jacobian(model, x1, x2, channels)
    return kernel.mean(-1) if reduce == "mean" else kernel


def empirical_nngp(
    model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, reduce: Literal["mean", "none"] = "mean"
) -> Tensor:
    r"""One sample of the NNGP: :math:`\hat\Sigma(x_1, x_2) = f(x_1) f(x_2)^\top`, averaged over output channels.

    With ``reduce="none"`` the ``(n1, n2, k, k)`` outer products. Its expectation over random
    initialisations is the finite-width NNGP kernel. Differentiable in ``x1``, ``x2`` when they
    require grad (never in the parameters).
    """
    x2 = x1 if x2 is None else x2
    _check_inputs(x1, x2, model)
    _check_reduce(reduce)
    f1 = _outputs_of_inputs(model, x1)
    f2 = f1 if x2 is x1 else _outputs_of_inputs(model, x2)
    if reduce == "mean":  # never the (n1, n2, k, k) outer products: k can be in the thousands
        return (f1 @ f2.transpose(0, 1)) / f1.shape[-1]
    return torch.einsum("ia,jb->ijab", f1, f2)


def _ensure_initialized(model: nn.Module, x: Tensor) -> None:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():
            model(x[:1])


def monte_carlo_kernel(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    width: int,
    n_samples: int,
    kind: Literal["ntk", "nngp"] = "ntk",
    out_features: int = 1,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo estimate of the kernel of ``net.finite(width)`` over random initialisations.

    Draws ``n_samples`` networks (seeded, so the estimate is reproducible), evaluates their
    empirical kernel (averaged over ``out_features`` output channels) and returns
    ``(mean, standard_error)``, both ``(n1, n2)``. The mean converges to the infinite-width
    kernel as ``width`` grows, with a finite-width bias of order ``1/width`` (none for one hidden
    layer) and a spread across networks of relative order ``1/sqrt(width)`` for the NTK and
    ``1/sqrt(width) + 1/sqrt(out_features)`` for the NNGP (one network's outputs are only
    ``out_features`` draws of the GP, so estimate the NNGP with many output channels).

    ``input_shape`` ``(C, W)`` / ``(C, H, W)``: for spatial architectures (convolutions,
    pooling), the channels-first shape of one input, passed to ``net.finite`` as for
    ``NTKKernel(net, input_shape=...)``; each row of ``x1``, ``x2`` then holds ``C·H·W`` features.
    """
    n_samples = integer_argument("n_samples (at least 2, for a standard error)", n_samples, minimum=2)
    width = integer_argument("width", width, minimum=1)
    out_features = integer_argument("out_features", out_features, minimum=1)
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
    x2 = x1 if x2 is None else x2
    _check_inputs(x1, x2)
    generator = torch.Generator().manual_seed(integer_argument("seed", seed))
    estimator = empirical_ntk if kind == "ntk" else empirical_nngp
    samples = []
    for _ in range(n_samples):
        model = net.finite(
            width, in_features=x1.shape[-1], input_shape=input_shape, out_features=out_features, generator=generator
        ).to(x1)
        samples.append(estimator(model, x1, x2))
    stacked = torch.stack(samples)
    return stacked.mean(0), stacked.std(0) / math.sqrt(n_samples)
