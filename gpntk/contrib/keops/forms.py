r"""The closed-form dual activations as formulas: the registry of the activations the KeOps backend supports.

Each :class:`_Form` says how one activation type enters the formula: its per-point features
(computed in torch), its constants (a KeOps parameter vector) and its pair dual kernel
:math:`k` with derivative :math:`\dot k`. The pair duals themselves are not written here: they
are the formulas of :mod:`gpntk.activations` (``abrelu_pair``, ``erf_pair``, ...), stated once
against :class:`gpntk.activations.ops.DualOps` and evaluated here on the dual numbers of
:class:`~.calculus._Calculus`, with the constants of the layer's ``formula_constants()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ...activations.arccos import (
    ABReLU,
    Abs,
    LeakyReLU,
    RectifiedMonomial,
    ReLU,
    Sign,
    abrelu_pair,
    rectified_monomial_pair,
    sign_pair,
)
from ...activations.base import Activation, safe_sqrt
from ...activations.smooth import Cos, Erf, Exp, Gabor, Rbf, SigmoidLike, Sin, erf_pair, exp_pair, gabor_pair, sin_pair
from ...core.layer import Layer
from .calculus import _Calculus, _Dual
from .graph import _Node

# ==================================================================================================
# Closed-form dual activations as formulas
# ==================================================================================================


@runtime_checkable
class _ClosedForm(Protocol):
    """An activation with a closed-form pair dual: the constants it passes to its formula."""

    def formula_constants(self) -> Sequence[float]: ...


class _Form:
    """How one activation type enters the formula.

    ``features(layer, q)``: per-point tensors computed in torch from the pre-activation variance
    ``q`` (..., n, 1); ``constants(layer)``: floats passed as KeOps parameters (``constant_count``
    of them); ``pair(...)``: the dual kernel :math:`k` and its derivative :math:`\\dot k` (``None``
    when identically zero or not needed) for a pair, from :math:`\\Sigma_{12}` and both points'
    features.
    """

    kind = ""
    feature_names: tuple[str, ...] = ()
    constant_count = 0
    needs_same = False  # whether identical points need the exact correlation of one

    def unsupported(self, layer: Layer) -> str | None:
        return None

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def constants(self, layer: Activation) -> Sequence[float]:
        if not isinstance(layer, _ClosedForm):
            raise TypeError(f"{layer!r} has no closed-form dual")
        return layer.formula_constants()

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None,
        need_dot: bool,
    ) -> tuple[_Dual, _Dual | None]:
        raise NotImplementedError


#: a pair formula of :mod:`gpntk.activations` on dual numbers, ``(ops, constants, a, b, c, need_dot)``:
#: ``(q_1, Σ_12, q_2)`` for the smooth activations, ``(Σ_12, ρ, sqrt(q_1 q_2))`` for the arc-cosine family
_Pair = Callable[[_Calculus, Sequence[_Dual], _Dual, _Dual, _Dual, bool], tuple[_Dual, "_Dual | None"]]


def _safe_rsqrt(q: Tensor) -> Tensor:
    """:math:`1/\\sqrt{q}`, 0 where ``q <= 0`` (with zero derivative there)."""
    positive = q > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, q, torch.ones_like(q))), torch.zeros_like(q))


class _ArcCosForm(_Form):
    r"""The arc-cosine family: the pair formula takes :math:`(\Sigma_{12}, \rho, \sqrt{q_1 q_2})`.

    Features :math:`(\sqrt q, 1/\sqrt q)` per point. The correlation
    :math:`\rho = \Sigma_{12} / \sqrt{q_1 q_2}` is clamped to [-1, 1] and set to exactly 1 for
    identical points; it is multiplied as :math:`(\Sigma_{12} / \sqrt{q_1}) / \sqrt{q_2}`: the
    partial product is at most :math:`\sqrt{q_2}`, whereas :math:`1/\sqrt{q_1 q_2}` overflows when
    the variances are tiny (float64 below about 1e-154 each, float32 below about 1e-19), giving
    0 x inf = NaN. A point of zero variance has features (0, 0), so :math:`\sqrt{q_1 q_2} = 0`.
    """

    feature_names = ("sqrt_q", "rsqrt_q")
    needs_same = True

    def __init__(self, kind: str, formula: _Pair, constant_count: int) -> None:
        self.kind, self.formula, self.constant_count = kind, formula, constant_count

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [safe_sqrt(q), _safe_rsqrt(q)]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None,
        need_dot: bool,
    ) -> tuple[_Dual, _Dual | None]:
        (sq_i, r_i), (sq_j, r_j) = fi, fj
        rho = c.clamp_unit(c.mul(c.mul(sigma, r_i), r_j))
        if same is not None:
            rho = c.if_nonnegative(same, c.integer(1), rho)
        return self.formula(c, consts, sigma, rho, c.mul(sq_i, sq_j), need_dot)


class _ABReLUForm(_ArcCosForm):
    """``ReLU``, ``LeakyReLU``, ``ABReLU``, ``Abs`` and ``RectifiedMonomial(1)`` (as the ReLU): :func:`abrelu_pair`."""

    def __init__(self) -> None:
        super().__init__("abrelu", abrelu_pair, 2)

    def constants(self, layer: Activation) -> Sequence[float]:
        if isinstance(layer, RectifiedMonomial):  # of degree one: the ReLU
            return ReLU().formula_constants()
        return super().constants(layer)


def _step_pair(
    c: _Calculus, consts: Sequence[_Dual], sigma: _Dual, rho: _Dual, sqrt_prod: _Dual, need_dot: bool
) -> tuple[_Dual, _Dual | None]:
    """The step function ``RectifiedMonomial(0)``: :func:`rectified_monomial_pair` of degree 0 (:math:`\\dot k = 0`)."""
    return rectified_monomial_pair(c, consts, 0, rho, sqrt_prod, need_dot)


def _sign_pair(
    c: _Calculus, consts: Sequence[_Dual], sigma: _Dual, rho: _Dual, sqrt_prod: _Dual, need_dot: bool
) -> tuple[_Dual, _Dual | None]:
    """``Sign``: :func:`sign_pair` (:math:`\\dot k = 0`; a point of zero variance maps to zero)."""
    return sign_pair(c, consts, rho, sqrt_prod, need_dot)


class _RectifiedForm(_Form):
    """``RectifiedMonomial``: degree 1 as the ReLU, degree 0 as the step function (see :func:`_form_of`)."""

    kind = "rectified"

    def unsupported(self, layer: Layer) -> str | None:
        assert isinstance(layer, RectifiedMonomial)
        if layer.degree > 1:
            return "only degrees 0 (the step function) and 1 (ReLU) have KeOps formulas"
        return None


class _SmoothForm(_Form):
    """An activation whose pair formula takes :math:`(q_1, \\Sigma_{12}, q_2)`: the feature is :math:`q` itself."""

    feature_names = ("q",)

    def __init__(self, kind: str, formula: _Pair, constant_count: int) -> None:
        self.kind, self.formula, self.constant_count = kind, formula, constant_count

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [q]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None,
        need_dot: bool,
    ) -> tuple[_Dual, _Dual | None]:
        return self.formula(c, consts, fi[0], sigma, fj[0], need_dot)


_ABRELU = _ABReLUForm()
_STEP = _ArcCosForm("step", _step_pair, 1)
_SIGN = _ArcCosForm("sign", _sign_pair, 1)
_ERF = _SmoothForm("erf", erf_pair, 5)
_EXP = _SmoothForm("exp", exp_pair, 2)
_SIN = _SmoothForm("sin", sin_pair, 4)
_GABOR = _SmoothForm("gabor", gabor_pair, 0)
#: the form of each supported activation type (read-only)
_FORMS: Mapping[type, _Form] = MappingProxyType({
    ReLU: _ABRELU, LeakyReLU: _ABRELU, ABReLU: _ABRELU, Abs: _ABRELU,
    Sign: _SIGN, Erf: _ERF, Exp: _EXP, Sin: _SIN, Cos: _SIN, Rbf: _SIN,
    RectifiedMonomial: _RectifiedForm(),
    SigmoidLike: _ERF, Gabor: _GABOR,
})


def _form_of(layer: Layer) -> _Form:
    form = _FORMS[type(layer)]
    if isinstance(layer, RectifiedMonomial):
        return _ABRELU if layer.degree == 1 else _STEP
    return form


#: the forms by the ``kind`` a formula's structure records (read-only)
_KINDS: Mapping[str, _Form] = MappingProxyType(
    {form.kind: form for form in (_ABRELU, _STEP, _SIGN, _ERF, _EXP, _SIN, _GABOR)}
)
