r"""Dual activations: how an elementwise nonlinearity maps the kernel state.

For an activation :math:`\phi` applied to Gaussian pre-activations
:math:`(u, v) \sim \mathcal N\!\left(0, \begin{pmatrix} q_{11} & q_{12} \\ q_{12} & q_{22}\end{pmatrix}\right)`,
the NNGP and NTK recursions need

.. math::
    k_{12} = \mathbb E[\phi(u)\,\phi(v)], \qquad \dot k_{12} = \mathbb E[\phi'(u)\,\phi'(v)],

and :math:`\Theta \leftarrow \dot k_{12}\, \Theta` (Jacot et al. 2018; Lee et al. 2019). Every
activation implements the pair map :meth:`Activation.dual` on matrices of pairs and the
per-point map :meth:`Activation.dual_diag` (the same expectations at :math:`u = v`), which is
evaluated without any correlation of one, so ``diag=True`` is exact and differentiable.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from .._validation import real_argument
from ..core.coincident import exact_values
from ..core.finite import ElementwiseActivation
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.spatial import Layout
from ..core.state import KernelState, midpoint, set_diagonal
from ..errors import ArchitectureError
from .per_point import per_point

__all__ = ["Activation", "correlation", "safe_sqrt", "real_parameter", "double_factorial"]


class Activation(Layer):
    """Base class of elementwise nonlinearities; subclasses define the dual maps and ``fn``."""

    def fn(self, x: Tensor) -> Tensor:
        """The activation itself, for finite-width networks."""
        raise NotImplementedError

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``(k12, kdot12)`` for pairs; ``q11`` (..., n1, 1), ``q12`` (..., n1, n2), ``q22`` (..., 1, n2)."""
        raise NotImplementedError

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``(k, kdot)`` for single points of variance ``q`` (any shape)."""
        raise NotImplementedError

    def check(self, signature: Signature) -> Signature:
        if signature.gaussian is False:
            hint = ""
            if signature.last in ("Flatten", "FanInConcat"):
                hint = (
                    f" ({signature.last} mixes features of different variances, which an elementwise "
                    f"nonlinearity cannot take as one kernel; put a Dense between {signature.last} and "
                    f"{self.name}, or apply {self.name} before {signature.last})"
                )
            raise ArchitectureError(
                f"{self.name} needs Gaussian pre-activations, so it must follow an affine layer "
                f"(Dense or Conv), not {signature.last}{hint}"
            )
        return signature.after(self, gaussian=False, independent=False)

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        need_dot = state.track_ntk and state.ntk12 is not None
        if state.diag:
            k, kdot = self._self_map(state, state.var1, need_dot)
            ntk12 = _times(kdot, state.ntk12) if need_dot else state.ntk12
            return state.replace(cov12=k, var1=k, var2=k, ntk12=ntk12)
        layout = state.layout
        k12, kdot12 = self._pair_map(
            layout, state.cov12, layout.point_variances(state.var1), layout.point_variances(state.var2),
            False, need_dot,
        )
        coincident = state.coincident
        k1, kdot1 = self._self_map(state, state.var1, need_dot and coincident is not None)
        k2, _ = self._self_map(state, state.var2, False)
        if coincident is not None:
            # identical inputs: the exact per-point values, with the pair formula's derivatives
            k12 = exact_values(k12, k1, coincident, layout.ndim)
            if need_dot:
                kdot12 = exact_values(cast(Tensor, kdot12), cast(Tensor, kdot1), coincident, layout.ndim)
        ntk12 = _times(kdot12, state.ntk12) if need_dot else state.ntk12
        return state.replace(cov12=k12, var1=k1, var2=k2, ntk12=ntk12)

    def _pair_map(
        self, layout: Layout, cov12: Tensor, points1: Tensor, points2: Tensor, same_inputs: bool, need_dot: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The dual on every pair of ``cov12``, given both sides' point variances ``Σ_{p,p}``.

        The spatial layout is first turned into matrices of pairs (:meth:`Layout.to_matrix`);
        with ``same_inputs`` (the two sides are one point, as in a point's covariance between its
        own positions) the diagonal entries, a position with itself, are taken from the exact
        per-point map.
        """
        n1, n2 = cov12.shape[-2 - layout.ndim], cov12.shape[-1 - layout.ndim]
        q11, q22 = layout.rows_matrix(points1), layout.cols_matrix(points2)
        k12, kdot12 = self.dual(q11, layout.to_matrix(cov12), q22, need_dot)
        if same_inputs:
            # the exact per-point values on the diagonal, differentiable in both arguments
            k_point, kdot_point = self.dual_diag(midpoint(q11, q22.transpose(-1, -2)), need_dot)
            k12 = set_diagonal(k12, k_point.squeeze(-1))
            if need_dot:
                kdot12 = set_diagonal(cast(Tensor, kdot12), cast(Tensor, kdot_point).squeeze(-1))
        k12 = layout.from_matrix(k12, n1, n2)
        if need_dot:
            kdot12 = layout.from_matrix(cast(Tensor, kdot12), n1, n2)
        return k12, kdot12

    def _self_map(self, state: KernelState, var: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        """The dual of each point with itself: per position, or between its positions (full layout)."""
        layout = state.layout
        if not layout.full:
            return self.dual_diag(var, need_dot)
        # a point's covariance between its positions, (..., n, 1, *S), is a kernel of that point
        # with itself: the point dims become batch dims and the pair dims are (1, 1)
        pair = var.unsqueeze(-1 - layout.ndim).unsqueeze(-1 - layout.ndim)
        points = layout.point_variances(pair)
        k, kdot = self._pair_map(layout, pair, points, points, True, need_dot)

        def squeeze(t: Tensor) -> Tensor:
            return t.squeeze(-1 - layout.ndim).squeeze(-1 - layout.ndim)

        return squeeze(k), (None if kdot is None else squeeze(kdot))

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        return ElementwiseActivation(self.fn, repr(self)), in_shape

    def __repr__(self) -> str:
        return f"{self.name}()"


def _times(kdot: Tensor | None, ntk12: Tensor | None) -> Tensor:
    """``kdot * ntk12``, both present (when the NTK is tracked)."""
    return cast(Tensor, kdot) * cast(Tensor, ntk12)


def safe_sqrt(x: Tensor) -> Tensor:
    """:math:`\\sqrt{\\max(x, 0)}` with derivative 0 (not infinity or NaN) where ``x <= 0``."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def correlation(q11: Tensor, q12: Tensor, q22: Tensor, clamp: bool = True) -> tuple[Tensor, Tensor]:
    r"""``(rho, sqrt_prod)``: :math:`\rho = q_{12}/\sqrt{q_{11} q_{22}}` clamped to [-1, 1]
    (unless ``clamp`` is false), and :math:`\sqrt{q_{11}q_{22}}`.

    ``q11`` is ``(..., n1, 1)`` and ``q22`` ``(..., 1, n2)``. The square root in :math:`\rho` is
    taken of the product (so equal variances give exactly :math:`\rho = 1` for duplicated points);
    ``sqrt_prod`` is the product of per-point square roots. Where a variance is zero the correlation
    is undefined and set to 0 (every kernel using it is multiplied by a zero ``sqrt_prod`` there;
    :math:`q_{12} = 0` there too), with finite derivatives: zero variances are replaced by one per
    point before the pairs are formed. No data-dependent branch, so the function also compiles.

    Before the product is formed each variance is scaled by an even power of two, :math:`q_i 4^{-k_i}
    \in [1, 4)`, and :math:`q_{12}` by :math:`2^{-k_1-k_2}` (see :func:`_unit_scales`). Powers of
    two scale exactly, so wherever :math:`q_{11} q_{22}` is representable :math:`\rho` is bit for bit
    :math:`q_{12}/\sqrt{q_{11} q_{22}}`; without the scaling, tiny variances (for example after a
    hyperparameter fit has driven :math:`\sigma_w^2` to ``1e-262``) made the product underflow to 0
    and :math:`\rho = 0/0 = ` NaN, and huge ones made it overflow to infinity and :math:`\rho = 0`.
    """
    positive1, positive2 = (torch.where(q > 0, q, torch.ones_like(q)) for q in (q11, q22))
    (t1, s1), (t2, s2) = _unit_scales(positive1), _unit_scales(positive2)
    # per-point factors, computed once per point in compiled code (not once per pair)
    scaled1, scale1, root1, scaled2, scale2, root2 = per_point(
        positive1 * s1, t1, safe_sqrt(q11), positive2 * s2, t2, safe_sqrt(q22)
    )
    denominator = torch.sqrt(scaled1 * scaled2)
    rho = (q12 * (scale1 * scale2)) / denominator
    return (rho.clamp(-1.0, 1.0) if clamp else rho), root1 * root2


def _unit_scales(q: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(t, t²)`` with :math:`t = 2^{-k}` a power of two such that :math:`q t^2 \in [1, 4)` (constants).

    ``q`` must be positive; :math:`|k|` is capped so that a product :math:`t_1 t_2` of two scales
    cannot overflow (for float64 this only matters below ``1e-307``, where the scaled variances are
    still far from underflowing).
    """
    limit = int(math.log2(torch.finfo(q.dtype).max)) // 2 - 2  # float64: 510, float32: 62
    # k = floor(log2(q) / 2) in floating point (torch.frexp's integer exponents do not compile
    # with inductor on CPUs); any integer k near it will do
    k = torch.floor(torch.log2(q.detach()) * 0.5).clamp(-limit, limit)
    t = torch.exp2(-k)
    return t, t * t


def real_parameter(name: str, value: object) -> float:
    """``value`` as a finite float, or an :class:`ArchitectureError` naming ``name``.

    Any real number is accepted (Python, numpy, a one-element real tensor); bools, strings and
    complex numbers are not (:func:`gpntk._validation.real_argument`).
    """
    return real_argument(name, value, error=ArchitectureError)


def double_factorial(n: int) -> int:
    r""":math:`n!! = n (n-2) (n-4) \cdots`, with :math:`n!! = 1` for :math:`n \le 0`."""
    return math.prod(range(n, 0, -2)) if n > 0 else 1
