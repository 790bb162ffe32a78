r"""The empirical (finite-width) NTK and NNGP of any ``torch.nn.Module`` as a GPyTorch kernel.

For a network :math:`f(x; \theta) \in \mathbb R^k` at fixed parameters :math:`\theta`,

.. math::
    \hat\Theta(x, x') = \frac1k \sum_{a=1}^k \sum_p \frac{\partial f_a(x)}{\partial \theta_p}
        \frac{\partial f_a(x')}{\partial \theta_p}, \qquad
    \hat\Sigma(x, x') = \frac1k \sum_{a=1}^k f_a(x)\, f_a(x'),

over the parameters with ``requires_grad=True`` (Jacot et al. 2018). Averaged over random
initialisations of ``net.finite(width)`` both converge to the per-channel infinite-width kernels
of :class:`~gpntk.NTKKernel` / :class:`~gpntk.NNGPKernel` as the width grows (Lee et al. 2019),
so :class:`EmpiricalNTKKernel` puts finite and infinite networks into the same GP code.

The matrices are computed by :func:`gpntk.empirical.empirical_ntk` (layer by layer for networks
built by ``net.finite``, from the full :func:`torch.func.jacrev` Jacobian otherwise);
:func:`empirical_covariance` and :func:`empirical_diagonal` are the module-level functions that
the kernel's full-matrix and ``diag=True`` calls use.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from gpytorch.kernels import Kernel
from torch import Tensor, nn

from .._validation import SUPPORTED_DTYPES, check_kernel_inputs, expanded_batch_shape, integer_argument
from ..empirical.functions import (
    _affine_scales,
    _differentiable,
    _ensure_initialized,
    _jacobian,
    _layer_gradients,
    _outputs_of_inputs,
    _structured_applicable,
    empirical_ntk,
)

__all__ = ["EmpiricalNTKKernel", "empirical_covariance", "empirical_diagonal"]

Kind = Literal["ntk", "nngp"]

#: at most this many Jacobian entries (rows x channels x parameters) are held at once on the
#: Jacobian path of the diagonal
_JACOBIAN_BUDGET = 2**23


class EmpiricalNTKKernel(Kernel):
    r"""The empirical NTK (or NNGP) of a finite network ``model`` at its current weights.

    .. math::
        \hat\Theta(x, x') = \frac1k \sum_{a=1}^k \nabla_\theta f_a(x) \cdot \nabla_\theta f_a(x'),
        \qquad \hat\Sigma(x, x') = \frac1k \sum_{a=1}^k f_a(x)\, f_a(x'),

    the gradient running over the parameters with ``requires_grad=True`` (Jacot et al. 2018; Lee
    et al. 2019). Averaged over random initialisations of ``net.finite(width)`` it approaches
    ``gpntk.NTKKernel(net)`` / ``gpntk.NNGPKernel(net)``.

    :param model: any module mapping ``(n, d)`` inputs to ``(n,)`` or ``(n, k)`` outputs (further
        output dimensions are flattened into the ``k`` channels). It must treat rows
        independently; it is always called in eval mode (dropout off, batch norm on its running
        statistics), its training flags being restored afterwards.
    :param kind: ``"ntk"`` (default) for :math:`\hat\Theta`, ``"nngp"`` for :math:`\hat\Sigma`.
        The NTK needs at least one trainable parameter; the NNGP does not.
    :param output: ``None`` (default) averages the per-channel kernels over the ``k`` output
        channels, the quantity comparable with gpntk's per-channel infinite-width kernels;
        ``output=i`` (``0 <= i < k``) uses channel ``i`` only.
    :param batch_shape: GPyTorch batch shape; the kernel has no hyperparameters, so the matrix is
        only broadcast to it.
    :param active_dims: as for any GPyTorch kernel.

    The network is a fixed snapshot, held by reference and not registered as a submodule: its
    weights are not among the kernel's ``parameters()``, ``named_hyperparameters()`` or
    ``state_dict()``, so fitting a GP's marginal likelihood never moves them (no gradient reaches
    them either). Changing the weights in place changes the kernel; ``copy.deepcopy(model)``
    first for an independent copy. ``kernel.to(...)``, ``.double()``, ``.cuda()`` move the network
    too (the one object, in place, as ``Module.to`` does with submodules), and pickling or
    deep-copying the kernel carries the network along.

    Calling the kernel returns the ``(..., n1, n2)`` matrix as a tensor (GPyTorch then multiplies
    it with other kernels exactly, never through a root decomposition; derivatives of any order exist);
    ``diag=True`` returns the ``(..., n)`` values :math:`k(x_{1,i}, x_{2,i})` from per-point
    Jacobians (NTK) or outputs (NNGP), without the full matrix. Inputs are ``(..., n, d)``
    floating-point tensors on the network's device. **dtype rule**: the network is run in its own
    dtype (inputs are converted to it) and the kernel is returned in the inputs' dtype, so a
    float32 network gives a float32-accurate kernel even for float64 inputs; call
    ``kernel.double()`` for float64 accuracy. The kernel is **differentiable in the inputs**
    (first and higher derivatives, by autograd through the per-layer output gradients computed
    with ``create_graph=True``), so gradient-based optimisation over ``x``, e.g. BoTorch's
    ``optimize_acqf``, works; no gradient reaches the network's weights.

    Example::

        model = net.finite(512, in_features=d).double()     # or any torch.nn.Module
        covar = gpytorch.kernels.ScaleKernel(EmpiricalNTKKernel(model))
    """

    has_lengthscale = False

    def __init__(
        self,
        model: nn.Module,
        kind: Kind = "ntk",
        output: int | None = None,
        batch_shape: torch.Size = torch.Size([]),
        active_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EmpiricalNTKKernel needs a torch.nn.Module, got {type(model).__name__}")
        if kind not in ("ntk", "nngp"):
            raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
        if output is not None:
            try:
                output = integer_argument("output", output, minimum=0)
            except ValueError as error:
                raise ValueError(f"{error} (a channel index, or None for the mean over channels)") from None
        if kind == "ntk" and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (requires_grad=True), so its NTK is zero; "
                "use kind='nngp' for the kernel of its outputs"
            )
        super().__init__(batch_shape=torch.Size(batch_shape), active_dims=active_dims, **kwargs)
        # kept out of ``_modules`` so that the network's weights are no kernel parameters
        self.__dict__["_network"] = model
        self.kind: Kind = kind
        self.output = output

    @property
    def model(self) -> nn.Module:
        """The network (held by reference, not as a submodule)."""
        return self.__dict__["_network"]

    @property
    def is_stationary(self) -> bool:
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The network's dtype (the one the kernel is computed in)."""
        return self._one_of("dtype", torch.get_default_dtype())

    @property
    def device(self) -> torch.device | None:
        """The network's device (inputs must be on it)."""
        return self._one_of("device", None)

    def _one_of(self, attribute: str, default: Any) -> Any:
        tensors = list(self.parameters())
        network = _model_tensor(self.model)
        if network is not None:
            tensors.append(network)
        values = {getattr(t, attribute) for t in tensors}
        if len(values) > 1:
            raise RuntimeError(
                f"The kernel's parameters have multiple {attribute}s (the network's included): {values}."
            )
        return values.pop() if values else default

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> "EmpiricalNTKKernel":
        # ``to``, ``double``, ``cuda``... reach the network too, although it is no submodule
        super()._apply(fn, *args, **kwargs)
        self.model._apply(fn, *args, **kwargs)
        return self

    def _validate(self, x1: Tensor, x2: Tensor, diag: bool) -> None:
        check_kernel_inputs(x1, x2, diag=diag)
        device = _model_device(self.model)
        if device is not None and device != x1.device:
            raise ValueError(f"the inputs are on {x1.device} but the network is on {device}; use kernel.to(device)")

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor:
        if last_dim_is_batch:
            raise RuntimeError("EmpiricalNTKKernel does not support last_dim_is_batch")
        self._validate(x1, x2, diag)
        same = x1 is x2
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        if diag:
            out = empirical_diagonal(x1, x2, model=self.model, kind=self.kind, output=self.output)
            return out.expand(*batch, x1.shape[-2])
        if batch != x1.shape[:-2] or batch != x2.shape[:-2]:  # the kernel's own batch shape
            x1 = x1.expand(*batch, *x1.shape[-2:])
            x2 = x1 if same else x2.expand(*batch, *x2.shape[-2:])
        # A tensor, never a lazy operator: GPyTorch multiplies a tensor exactly, whereas the
        # product of two lazy factors replaces each by a root decomposition (Lanczos of rank
        # <= 100 above max_cholesky_size), and the full matrix is formed in any case. Autograd
        # reaches x1, x2 to any order.
        return empirical_covariance(x1, x2, model=self.model, kind=self.kind, output=self.output)

    # GPyTorch's versions deep-copy the kernel (and with it the network) and, with no parameters
    # to index, would keep the old batch shape
    def __getitem__(self, index: Any) -> "EmpiricalNTKKernel":
        if len(self.batch_shape) == 0:
            return self
        index = index if isinstance(index, tuple) else (index,)
        return self._with_batch_shape(torch.empty(self.batch_shape)[index].shape)

    def expand_batch(self, *sizes: int | Sequence[int]) -> "EmpiricalNTKKernel":
        new_batch_shape = expanded_batch_shape(sizes, self.batch_shape)
        if new_batch_shape == self.batch_shape:
            return self
        return self._with_batch_shape(new_batch_shape)

    def _with_batch_shape(self, batch_shape: torch.Size) -> "EmpiricalNTKKernel":
        """A kernel on the same network (shared, not copied) with another batch shape."""
        return EmpiricalNTKKernel(
            self.model, kind=self.kind, output=self.output, batch_shape=batch_shape, active_dims=self.active_dims
        )

    def extra_repr(self) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad and not _uninitialized(p))
        return (
            f"model={type(self.model).__name__} ({trainable} trainable parameters), kind={self.kind!r}, "
            f"output={self.output!r}"
        )


# --- the covariance functions -----------------------------------------------------------------
def empirical_covariance(
    x1: Tensor, x2: Tensor, *, model: nn.Module, kind: Kind, output: int | None
) -> Tensor:
    r"""The kernel matrix ``(..., n1, n2)`` of ``model`` between ``x1`` (..., n1, d) and ``x2`` (..., n2, d).

    ``kind`` picks :math:`\hat\Theta` or :math:`\hat\Sigma`, ``output`` the channel (``None``: the
    mean over channels). Batch dimensions broadcast (for the NTK, the matrix of each distinct batch
    element is computed once, unless the inputs require grad). Differentiable in ``x1``, ``x2``
    when they require grad.
    """
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    n1, n2, d = x1.shape[-2], x2.shape[-2], x1.shape[-1]
    dtype = x1.dtype
    differentiable = _differentiable(x1, x2)
    # equal values of two different tensors share one computation only where no gradient is due
    same = x1 is x2 if differentiable else _same_inputs(x1, x2)
    count = math.prod(batch)
    if n1 == 0 or n2 == 0 or count == 0:
        return torch.zeros(*batch, n1, n2, dtype=dtype, device=x1.device)
    with _evaluating(model, output, x1, x2) as (net, xa, xb):
        xa = xa.expand(*batch, n1, d).reshape(count, n1, d)
        xb = xa if same else xb.expand(*batch, n2, d).reshape(count, n2, d)
        if kind == "nngp":
            f1 = _flat_outputs(net, xa.reshape(-1, d)).reshape(count, n1, -1)
            f2 = f1 if same else _flat_outputs(net, xb.reshape(-1, d)).reshape(count, n2, -1)
            out = (f1 @ f2.transpose(-2, -1)) / f1.shape[-1]
        elif n1 == 1 and n2 == 1 and count > 1:  # single entries, e.g. a batch of q = 1 candidates
            out = _paired_ntk(net, xa[:, 0], xb[:, 0], same=same)
        else:
            out = torch.stack(_ntk_blocks(net, xa, xb, same=same, reuse=not differentiable))
            if same:  # exactly symmetric (the layer-by-layer sums are only so up to rounding)
                out = (out + out.transpose(-2, -1)) / 2
    return out.reshape(*batch, n1, n2).to(dtype)


def empirical_diagonal(
    x1: Tensor, x2: Tensor, *, model: nn.Module, kind: Kind, output: int | None
) -> Tensor:
    r"""The values :math:`k(x_{1,i}, x_{2,i})`, shape ``(..., n)``, without forming a matrix.

    For the NTK from each point's Jacobian (:math:`\|\nabla_\theta f_a(x_i)\|^2` on the same
    points), layer by layer for networks built by ``net.finite`` and in chunks of
    :func:`torch.func.jacrev` Jacobians otherwise; for the NNGP :math:`f_a(x_{1,i}) f_a(x_{2,i})`;
    both averaged over channels (``output=None``) or of channel ``output``.
    """
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    n, d = x1.shape[-2], x1.shape[-1]
    dtype = x1.dtype
    same = x1 is x2 if _differentiable(x1, x2) else _same_inputs(x1, x2)
    if n * math.prod(batch) == 0:
        return torch.zeros(*batch, n, dtype=dtype, device=x1.device)
    with _evaluating(model, output, x1, x2) as (net, xa, xb):
        xa = xa.expand(*batch, n, d).reshape(-1, d)
        xb = xa if same else xb.expand(*batch, n, d).reshape(-1, d)
        if kind == "nngp":
            fa = _flat_outputs(net, xa)
            fb = fa if same else _flat_outputs(net, xb)
            out = (fa * fb).mean(-1)
        else:
            out = _paired_ntk(net, xa, xb, same=same)
    return out.reshape(*batch, n).to(dtype)


# --- helpers ----------------------------------------------------------------------------------
class _Channel(nn.Module):
    """``model`` restricted to output channel ``index`` (rows stay independent)."""

    gpntk_rowwise = True  # selecting a channel never mixes rows; the wrapped modules are checked on their own

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        out = out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)
        return out[:, self.index]


def _uninitialized(p: Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _model_tensor(model: nn.Module) -> Tensor | None:
    """The first floating-point parameter (or buffer) of ``model``: its dtype and device are the model's."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not _uninitialized(tensor) and tensor.dtype.is_floating_point:
            return tensor
    return None


def _model_device(model: nn.Module) -> torch.device | None:
    tensor = _model_tensor(model)
    return None if tensor is None else tensor.device


def _same_inputs(x1: Tensor, x2: Tensor) -> bool:
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def _flat_outputs(net: nn.Module, x: Tensor) -> Tensor:
    """``(n, k)`` outputs; differentiable in ``x`` if it requires grad, never in the weights."""
    return _outputs_of_inputs(net, x)


@contextmanager
def _evaluating(
    model: nn.Module, output: int | None, x1: Tensor, x2: Tensor
) -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
    """Eval mode, lazy parameters materialised, inputs in the model's dtype, the shapes checked.

    Yields ``(net, x1, x2)``: the network to evaluate (``model`` or its channel ``output``) and the
    inputs converted to the network's dtype (detached unless they require grad in grad mode).
    ``x1`` must hold at least one point.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        probe = x1.detach().reshape(-1, x1.shape[-1])[:2]
        with torch.no_grad():
            _ensure_initialized(model, probe)
        tensor = _model_tensor(model)
        if tensor is not None and tensor.device != x1.device:
            raise ValueError(f"the inputs are on {x1.device} but the network is on {tensor.device}")
        dtype = x1.dtype if tensor is None else tensor.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the network's dtype is {dtype}, which gpntk does not compute kernels in (too small a range and "
                "precision); convert it with kernel.float() or kernel.double()"
            )
        keep = _differentiable(x1, x2)
        xa = (x1 if keep else x1.detach()).to(dtype)
        xb = xa if x2 is x1 else (x2 if keep else x2.detach()).to(dtype)
        _check_outputs(model, output, probe.to(dtype), x1, x2)
        yield (model if output is None else _Channel(model, output)), xa, xb
    finally:
        for module, training in modes:
            module.training = training


def _check_outputs(model: nn.Module, output: int | None, probe: Tensor, x1: Tensor, x2: Tensor) -> None:
    """Run ``model`` on a few rows: it must accept them and return one output row per input row."""
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


def _ntk_blocks(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool, reuse: bool = True) -> list[Tensor]:
    """The ``(n1, n2)`` NTK of every batch element of ``xa`` (B, n1, d), ``xb`` (B, n2, d).

    With ``reuse`` (no gradient due) equal-valued batch elements are computed once.
    """
    done: list[tuple[Tensor, Tensor, Tensor]] = []
    blocks = []
    for a, b in zip(xa, xb):
        for da, db, value in done if reuse else ():
            if torch.equal(da, a) and torch.equal(db, b):
                blocks.append(value)
                break
        else:
            value = empirical_ntk(net, a, None if same or (reuse and _same_inputs(a, b)) else b)
            done.append((a, b, value))
            blocks.append(value)
    return blocks


def _paired_ntk(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool) -> Tensor:
    r"""``(m,)``: :math:`\frac1k\sum_a \nabla_\theta f_a(x_{a,i}) \cdot \nabla_\theta f_a(x_{b,i})` for paired rows."""
    if _structured_applicable(net):
        return _paired_ntk_structured(net, xa, xb, same=same)
    params = {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}
    names = list(params)
    size = sum(p.numel() for p in params.values())
    k = _flat_outputs(net, xa[:1]).shape[-1]
    rows = max(1, _JACOBIAN_BUDGET // max(1, k * size))
    parts = []
    for start in range(0, xa.shape[0], rows):
        ja = _jacobian(net, xa[start : start + rows], names, params)  # (rows, k, P)
        if same:
            parts.append(ja.square().sum(-1).mean(-1))
        else:
            jb = _jacobian(net, xb[start : start + rows], names, params)
            parts.append((ja * jb).sum(-1).mean(-1))
    return torch.cat(parts)


def _paired_ntk_structured(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool) -> Tensor:
    r"""The paired NTK from each affine layer's inputs ``a`` and output gradients ``g``.

    With :math:`h = c_w W a + c_b b` applied at positions :math:`p`, row :math:`i` gets
    :math:`c_w^2 \sum_{p,q} (g_{\alpha,p} \cdot g'_{\alpha,q}) (a_p \cdot a'_q)
    + c_b^2 (\sum_p g_{\alpha,p}) \cdot (\sum_q g'_{\alpha,q})`, the primes marking row :math:`i` of
    ``xb``: :math:`O(m k \cdot \text{width})` per layer, no Jacobian and no :math:`m \times m` matrix.
    """
    create_graph = _differentiable(xa, xb)
    k, layers_a = _layer_gradients(net, xa, create_graph)
    layers_b = layers_a if same else _layer_gradients(net, xb, create_graph)[1]
    m = xa.shape[0]
    if not layers_a:
        return torch.zeros(m, dtype=xa.dtype, device=xa.device)
    by_module_b = {id(module): (a, g) for module, a, g in layers_b}
    total = torch.zeros(k, m, dtype=layers_a[0][2].dtype, device=xa.device)
    for module, a1, g1 in layers_a:
        a2, g2 = by_module_b[id(module)]
        c_w, c_b = _affine_scales(module)
        if module.weight.requires_grad:
            p1, p2 = a1.shape[1], a2.shape[1]
            if p1 == 1 and p2 == 1:
                total += (c_w**2) * (g1[:, :, 0] * g2[:, :, 0]).sum(-1) * (a1[:, 0] * a2[:, 0]).sum(-1)
            elif p1 * p2 <= a1.shape[-1] * g1.shape[-1]:
                gg = torch.einsum("aipo,aiqo->aipq", g1, g2)
                aa = torch.einsum("ipd,iqd->ipq", a1, a2)
                total += (c_w**2) * (gg * aa).sum((-2, -1))
            else:  # the per-row weight gradients
                w1 = torch.einsum("aipo,ipd->aiod", g1, a1)
                w2 = w1 if same else torch.einsum("aipo,ipd->aiod", g2, a2)
                total += (c_w**2) * (w1 * w2).sum((-2, -1))
        if module.bias is not None and module.bias.requires_grad:
            total += (c_b**2) * (g1.sum(2) * g2.sum(2)).sum(-1)
    return total.mean(0)
