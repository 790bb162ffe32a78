"""Evaluation: the compiled reductions, ``K @ v`` with its backward pass, and the symbolic kernel matrix.

Formulas and compiled pykeops routines are memoised per process (:func:`_formula`, :func:`_routine`,
``functools.lru_cache``: no other state); :class:`_KernelMatmul` is the
autograd function of ``K @ v``; :func:`_prepare` computes the per-point features, hyperparameters
and constants once per matrix; :func:`keops_covariance` returns the matrix as a pykeops
``LazyTensor`` subclass (created on first use, so that pykeops is imported only then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ...core.layer import Layer
from .build_lock import LockedRoutine
from .formula import _GLOBAL_CONSTANTS, Mode, Output, _build, _Formula, _Plan, _plan, _Structure, keops_supported

if TYPE_CHECKING:  # pragma: no cover
    from pykeops.torch import LazyTensor


# ==================================================================================================
# Evaluation
# ==================================================================================================

@lru_cache(maxsize=None)
def _formula(structure: _Structure, mode: Mode, d: int, c: int) -> _Formula:
    """The formula of one reduction (:func:`~.formula._build`), built once per process."""
    return _build(structure, mode, d, c)[1]


@lru_cache(maxsize=None)
def _routine(formula: _Formula, dtype: torch.dtype) -> LockedRoutine:
    """The compiled pykeops ``Genred`` of ``formula`` (compiled once per process and dtype, cached on disk by pykeops;
    its first call holds the build folder's lock, :mod:`.build_lock`)."""
    from pykeops.torch import Genred

    return LockedRoutine(
        Genred(formula.text, formula.alias_strings(), reduction_op="Sum", axis=formula.axis, enable_chunks=False)
    )


def _identically_zero(structure: _Structure) -> bool:
    """Whether the kernel is zero: an NTK with no trainable layer after the last Sign/step activation."""
    if structure.output == "nngp":
        return False
    zero = True
    for layer in structure.layers:
        if layer[0] == "dense":
            zero = zero and not layer[3]
        elif layer[1] in ("sign", "step"):  # their derivative vanishes: the NTK restarts from zero
            zero = True
    return zero


def _bucket(c: int) -> int:
    """Right-hand sides are padded to a power of two, so that few formulas are compiled."""
    return 1 << max(c - 1, 0).bit_length()


def _batched(t: Tensor, batch_dims: int, trailing: int) -> Tensor:
    """``t`` with leading singleton dims so that it has ``batch_dims`` batch dims before ``trailing`` dims."""
    missing = batch_dims - (t.dim() - trailing)
    return t.reshape((1,) * missing + tuple(t.shape)) if missing > 0 else t


def _sum_to(grad: Tensor | None, shape: torch.Size) -> Tensor | None:
    """Sum ``grad`` over the dims along which its input was broadcast, to ``shape``."""
    if grad is None:
        return None
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(tuple(range(lead)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(shape)


class _KernelMatmul(torch.autograd.Function):
    """``K @ V`` as a KeOps reduction, with the backward pass of :func:`_build` (``grad_i``/``grad_j``).

    Tensors (batch dims padded to the same number, at least one): ``X`` (B, n1, d), ``Y`` (B, n2, d),
    ``PI`` (B, n1, m), ``PJ`` (B, n2, m), ``TH`` (B, p), ``C`` (B, nc), ``V`` (B, n2, c). ``symmetric``:
    ``X``/``Y`` and ``PI``/``PJ`` are the same points, so the kernel is a symmetric function and
    the reduction over :math:`i` is the one over :math:`j` with ``G`` and ``V`` exchanged.
    """

    @staticmethod
    def forward(
        ctx: Any,
        structure: _Structure,
        symmetric: bool,
        d: int,
        X: Tensor,
        Y: Tensor,
        PI: Tensor,
        PJ: Tensor,
        TH: Tensor,
        C: Tensor,
        V: Tensor,
    ) -> Tensor:
        c = V.shape[-1]
        formula = _formula(structure, "matmul", d, c)
        args = _arguments(formula, X=X, Y=Y, PI=PI, PJ=PJ, TH=TH, C=C, V=V)
        out = _routine(formula, X.dtype)(*args, backend="auto")
        ctx.structure, ctx.symmetric, ctx.d = structure, symmetric, d
        ctx.save_for_backward(X, Y, PI, PJ, TH, C, V)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, G: Tensor) -> tuple[Tensor | None, ...]:
        X, Y, PI, PJ, TH, C, V = ctx.saved_tensors
        structure, symmetric, d = ctx.structure, ctx.symmetric, ctx.d
        _, _, _, need_x, need_y, need_pi, need_pj, need_th, _, need_v = ctx.needs_input_grad
        G = G.contiguous()
        m, p, c = structure.features, structure.params, V.shape[-1]
        tensors = dict(X=X, Y=Y, PI=PI, PJ=PJ, TH=TH, C=C)
        gx = gy = gpi = gpj = gth = gv = None

        def reduce_i(g_: Tensor, v_: Tensor) -> Tensor:  # (B, n, d + m + p)
            formula = _formula(structure, "grad_i", d, c)
            return _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=v_, G=g_), backend="auto")

        if need_x or need_pi or need_th:
            out = reduce_i(G, V)
            gx = out[..., :d] if need_x else None
            gpi = out[..., d : d + m] if (need_pi and m) else None
            gth = out[..., d + m : d + m + p].sum(-2) if (need_th and p) else None
        if need_y or need_pj or need_v:
            if symmetric:
                if need_y or need_pj:
                    out = reduce_i(V, G)
                    gy = out[..., :d] if need_y else None
                    gpj = out[..., d : d + m] if (need_pj and m) else None
                if need_v:
                    formula = _formula(structure, "matmul", d, c)
                    gv = _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=G), backend="auto")
            else:
                formula = _formula(structure, "grad_j", d, c)
                out = _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=V, G=G), backend="auto")
                gv = out[..., :c] if need_v else None
                gy = out[..., c : c + d] if need_y else None
                gpj = out[..., c + d : c + d + m] if (need_pj and m) else None
        grads = (gx, gy, gpi, gpj, gth, None, gv)
        inputs = (X, Y, PI, PJ, TH, C, V)
        return (None, None, None, *(_sum_to(g_, t.shape) for g_, t in zip(grads, inputs)))


def _arguments(formula: _Formula, **tensors: Tensor) -> list[Tensor]:
    return [tensors[name].contiguous() for name, _, _ in formula.aliases]


@dataclass
class _Inputs:
    """Everything a reduction needs, computed once per ``keops_covariance`` call."""

    structure: _Structure
    d: int
    symmetric: bool
    batch: torch.Size  # the kernel's batch shape
    X: Tensor
    Y: Tensor
    PI: Tensor
    PJ: Tensor
    TH: Tensor
    C: Tensor


def _point_features(plan: _Plan, x: Tensor, hyper: dict[str, Tensor]) -> Tensor:
    """The per-point features of every activation, ``(..., n, m)``: the exact per-point recursion in torch.

    :math:`q_0 = |x|^2/d`; a Dense layer maps :math:`q \\leftarrow \\sigma_w^2 q + \\sigma_b^2`; an
    activation records its features of :math:`q` and maps :math:`q \\leftarrow k(q)` by its exact
    per-point dual (``dual_diag``). Differentiable in ``x`` and the hyperparameters.
    """
    q = x.square().sum(-1, keepdim=True) / x.shape[-1]
    features: list[Tensor] = []
    for step in plan.steps:
        if step[0] == "dense":
            _, layer, w_key, b_key = step
            q = hyper[w_key] * q
            if b_key is not None:
                q = q + hyper[b_key]
            continue
        _, layer, form = step
        features += form.features(layer, q)
        q = layer.dual_diag(q, False)[0]
    if not features:
        return x.new_zeros(*q.shape[:-1], 0)
    batch = torch.broadcast_shapes(*(f.shape[:-2] for f in features))
    return torch.cat([f.expand(*batch, *f.shape[-2:]) for f in features], dim=-1)


def _constants(plan: _Plan, d: int, like: Tensor) -> Tensor:
    finfo = torch.finfo(like.dtype)
    values = {"inv_d": 1.0 / d, "pi": math.pi, "eps": finfo.eps, "tiny": finfo.tiny}
    out = [values[name] for name in _GLOBAL_CONSTANTS]
    for step in plan.steps:
        if step[0] == "act":
            out += list(step[2].constants(step[1]))
    return torch.tensor(out, dtype=like.dtype, device=like.device)


def _same_points(x1: Tensor, x2: Tensor) -> bool:
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def _prepare(x1: Tensor, x2: Tensor, net: Layer, output: str, hyper: dict[str, Tensor]) -> _Inputs:
    if output not in ("ntk", "nngp"):
        raise ValueError(f"output must be 'ntk' or 'nngp', got {output!r}")
    if x1.dim() < 2 or x2.dim() < 2 or x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"x1 and x2 must be (..., n, d) with the same d, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if not x1.is_floating_point() or x1.dtype != x2.dtype:
        raise ValueError(f"x1 and x2 must be floating point tensors of one dtype, got {x1.dtype} and {x2.dtype}")
    plan = _plan(net, list(hyper), output)
    d = x1.shape[-1]
    hyper = {name: value.to(x1) for name, value in hyper.items()}
    symmetric = _same_points(x1, x2)
    PI = _point_features(plan, x1, hyper)
    PJ = PI if symmetric and x1.shape == x2.shape else _point_features(plan, x2, hyper)
    if hyper:
        hyper_batch = torch.broadcast_shapes(*(h.shape[:-2] for h in hyper.values()))
        TH = torch.cat([h.reshape(*h.shape[:-2], 1).expand(*hyper_batch, 1) for h in hyper.values()], dim=-1)
    else:
        hyper_batch = torch.Size()
        TH = x1.new_zeros(1, 0)
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], hyper_batch)
    C = _constants(plan, d, x1)
    return _Inputs(plan.structure, d, symmetric, batch, x1, x2, PI, PJ, TH, C)


def _matmul(inputs: _Inputs, v: Tensor) -> Tensor:
    """``K @ v`` for ``v`` (..., n2, c) or (n2,)."""
    vector = v.dim() == 1
    if vector:
        v = v.unsqueeze(-1)
    if v.shape[-2] != inputs.Y.shape[-2]:
        raise ValueError(f"K @ v: K has {inputs.Y.shape[-2]} columns but v has {v.shape[-2]} rows")
    v = v.to(inputs.X.dtype)
    c = v.shape[-1]
    batch = torch.broadcast_shapes(inputs.batch, v.shape[:-2])
    n1 = inputs.X.shape[-2]
    if _identically_zero(inputs.structure):
        out = inputs.X.new_zeros(*batch, n1, c) + 0 * (v.sum() + inputs.TH.sum())  # zero gradients, not none
        return out[..., 0] if vector else out
    width = _bucket(c)
    if width != c:
        v = torch.nn.functional.pad(v, (0, width - c))
    nb = max(len(batch), 1)
    X = _batched(inputs.X, nb, 2)
    Y = _batched(inputs.Y, nb, 2)
    PI = _batched(inputs.PI, nb, 2)
    PJ = _batched(inputs.PJ, nb, 2)
    TH = _batched(inputs.TH, nb, 1)
    C = _batched(inputs.C, nb, 1)
    V = _batched(v, nb, 2)
    out = cast(
        Tensor,
        _KernelMatmul.apply(  # type: ignore[no-untyped-call]  # Function.apply is untyped
            inputs.structure, inputs.symmetric, inputs.d, X, Y, PI, PJ, TH, C, V
        ),
    )
    out = out.reshape(*batch, n1, width) if len(batch) else out.reshape(n1, width)
    out = out[..., :c]
    return out[..., 0] if vector else out


# ==================================================================================================
# The symbolic kernel matrix
# ==================================================================================================


# long: the body is the class KeOpsKernelMatrix, which subclasses pykeops' LazyTensor and so can only be
# defined once pykeops is imported
@lru_cache(maxsize=1)
def _kernel_matrix_class() -> type:
    """The class of :func:`keops_covariance`'s matrices, created once, on first use (so that pykeops is imported
    only then)."""
    from pykeops.torch import LazyTensor

    class KeOpsKernelMatrix(LazyTensor):
        r"""The kernel matrix :math:`K(x_i, y_j)` (..., n1, n2) of a network as a pykeops ``LazyTensor``.

        ``K @ v`` (``v`` (..., n2, c) or (n2,)) is one KeOps reduction with the linear-size
        backward pass of this module; autograd reaches ``x1``, ``x2`` and every hyperparameter
        tensor. Other ``LazyTensor`` operations (``K.sum(1)``, ``K * 2``, ...) see the plain
        formula (``K.formula``) and use pykeops' own machinery, whose gradients grow
        exponentially with depth: use ``@`` for training.
        """

        batchdims: tuple[int, ...]  # set in __init__ from the joined LazyTensor

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return object.__new__(cls)

        def __init__(self, inputs: _Inputs) -> None:
            super().__init__()
            self._gpntk_inputs = inputs
            # the variables as pykeops LazyTensors: "i" (..., n1, 1, dim), "j" (..., 1, n2, dim), parameters
            parts = {"X": LazyTensor(inputs.X.unsqueeze(-2)), "Y": LazyTensor(inputs.Y.unsqueeze(-3))}
            if inputs.structure.features:
                parts["PI"] = LazyTensor(inputs.PI.unsqueeze(-2))
                parts["PJ"] = LazyTensor(inputs.PJ.unsqueeze(-3))
            if inputs.structure.params:
                parts["TH"] = LazyTensor(inputs.TH.unsqueeze(-2).unsqueeze(-2))
            parts["C"] = LazyTensor(inputs.C)
            joined = None
            for part in parts.values():
                joined = part if joined is None else joined.join(part)
            for attribute in ("tools", "_dtype", "Genred", "KernelSolve", "ni", "nj", "ranges", "backend",
                              "batchdims", "variables", "symbolic_variables"):
                setattr(self, attribute, getattr(joined, attribute))
            names = {name: part.formula for name, part in parts.items()}
            self.formula = _build(inputs.structure, "matrix", inputs.d, 1, names=names)[1].text
            self.ndim = 1
            self.axis = None
            if len(inputs.batch) and self.batchdims != tuple(inputs.batch):
                self.batchdims = tuple(inputs.batch)

        def __matmul__(self, v: Tensor, **kwargs: Any) -> Tensor:
            return _matmul(self._gpntk_inputs, v)

        def t(self) -> Any:
            i = self._gpntk_inputs
            swapped = _Inputs(i.structure, i.d, i.symmetric, i.batch, i.Y, i.X, i.PJ, i.PI, i.TH, i.C)
            return KeOpsKernelMatrix(swapped)

        @property
        def T(self) -> Any:
            return self.t()

        def __repr__(self) -> str:
            shape = tuple(self._gpntk_inputs.batch) + (self._gpntk_inputs.X.shape[-2], self._gpntk_inputs.Y.shape[-2])
            return f"KeOpsKernelMatrix(shape={shape}, output={self._gpntk_inputs.structure.output!r})"

    return KeOpsKernelMatrix


def __getattr__(name: str) -> Any:
    if name == "KeOpsKernelMatrix":
        return _kernel_matrix_class()
    raise AttributeError(name)


def keops_covariance(
    x1: Tensor, x2: Tensor, *, net: Layer, output: Output, hyper: dict[str, Tensor]
) -> "LazyTensor":
    r"""The kernel matrix ``(..., n1, n2)`` of ``net`` as a KeOps ``LazyTensor`` (symbolic).

    ``x1`` is ``(..., n1, d)``, ``x2`` ``(..., n2, d)``; ``output`` picks the NTK :math:`\Theta` or
    the NNGP :math:`\Sigma` of the readout; ``hyper`` is ``Hyperparameters.collect(net, like=x1)``
    (tensors ``(*batch, 1, 1)`` keyed by layer). Batch dims of the inputs and the
    hyperparameters broadcast as in the dense backend. ``K @ v`` (``v`` (..., n2, c)) is a KeOps
    reduction and autograd flows from it to ``x1``, ``x2`` and every tensor in ``hyper``.

    Raises ``ValueError`` (with the reason of :func:`keops_supported`) for architectures without
    a KeOps formula. The per-point features are computed here, so build the matrix where the
    inputs and hyperparameters are final (as GPyTorch's ``KernelLinearOperator`` does).
    """
    reason = keops_supported(net)
    if reason is not None:
        raise ValueError(reason)
    return _kernel_matrix_class()(_prepare(x1, x2, net, output, hyper))
