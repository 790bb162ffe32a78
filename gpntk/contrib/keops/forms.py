r"""The closed-form dual activations as formulas: the registry of the activations the KeOps backend supports.

Each :class:`_Form` says how one activation type enters the formula: its per-point features
(computed in torch), its constants (a KeOps parameter vector) and its pair dual kernel
:math:`k` with derivative :math:`\dot k`, written with :class:`~.calculus._Calculus`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...activations.arccos import ABReLU, Abs, LeakyReLU, RectifiedMonomial, ReLU, Sign
from ...activations.base import Activation, safe_sqrt
from ...activations.smooth import Cos, Erf, Exp, Rbf, Sin
from ...core.layer import Layer
from .calculus import _Calculus, _Dual
from .graph import _Node

# ==================================================================================================
# Closed-form dual activations as formulas
# ==================================================================================================


class _Form:
    """How one activation type enters the formula.

    ``features(layer, q)``: per-point tensors computed in torch from the pre-activation variance
    ``q`` (..., n, 1); ``constants(layer)``: floats passed as KeOps parameters; ``pair(...)``: the
    dual kernel :math:`k` and its derivative :math:`\\dot k` (``None`` when identically zero) for a
    pair, from :math:`\\Sigma_{12}` and both points' features.
    """

    kind = ""
    feature_names: tuple[str, ...] = ()
    constant_names: tuple[str, ...] = ()
    needs_same = False  # whether identical points need the exact correlation of one

    def unsupported(self, layer: Activation) -> str | None:
        return None

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def constants(self, layer: Activation) -> list[float]:
        return []

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        raise NotImplementedError


def _safe_rsqrt(q: Tensor) -> Tensor:
    """:math:`1/\\sqrt{q}`, 0 where ``q <= 0`` (with zero derivative there)."""
    positive = q > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, q, torch.ones_like(q))), torch.zeros_like(q))


def _arccos_correlation(c: _Calculus, sigma: _Dual, r_i: _Dual, r_j: _Dual, same: _Node | None) -> _Dual:
    r""":math:`\rho = \Sigma_{12} / \sqrt{q_1 q_2}` clamped to [-1, 1], exactly 1 for identical points.

    Multiplied as :math:`(\Sigma_{12} / \sqrt{q_1}) / \sqrt{q_2}`: the partial product is at most
    :math:`\sqrt{q_2}`, whereas :math:`1/\sqrt{q_1 q_2}` overflows when the variances are tiny
    (float64 below about 1e-154 each, float32 below about 1e-19), giving 0 x inf = NaN.
    """
    rho = c.clamp_unit(c.mul(c.mul(sigma, r_i), r_j))
    if same is not None:
        rho = c.if_nonnegative(same, c.integer(1), rho)
    return rho


class _ABReLUForm(_Form):
    r""":math:`\phi(x) = a\min(x, 0) + b\max(x, 0)` (ReLU, LeakyReLU, Abs; Cho & Saul 2009).

    .. math::
        k = ab\,\Sigma_{12} + \frac{(b-a)^2}{2\pi}\sqrt{q_1 q_2}\, J_1(\rho), \qquad
        \dot k = ab + \frac{(b-a)^2}{2\pi} J_0(\rho),

    features :math:`(\sqrt q, 1/\sqrt q)`.
    """

    kind = "abrelu"
    feature_names = ("sqrt_q", "rsqrt_q")
    constant_names = ("ab", "c")
    needs_same = True

    def _ab(self, layer: Activation) -> tuple[float, float]:
        if isinstance(layer, RectifiedMonomial):
            return 0.0, 1.0
        return layer.a, layer.b

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [safe_sqrt(q), _safe_rsqrt(q)]

    def constants(self, layer: Activation) -> list[float]:
        a, b = self._ab(layer)
        return [a * b, (b - a) ** 2 / (2 * math.pi)]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        ab, scale = consts
        (sq_i, r_i), (sq_j, r_j) = fi, fj
        rho = _arccos_correlation(c, sigma, r_i, r_j, same)
        j0 = c.arccos_j0(rho)
        j1 = c.arccos_j1(rho, j0)
        k = c.add(c.mul(ab, sigma), c.mul(c.mul(scale, c.mul(sq_i, sq_j)), j1))
        kdot = c.add(ab, c.mul(scale, j0))
        return k, kdot


class _StepForm(_Form):
    r"""The step function ``RectifiedMonomial(0)``: :math:`k = J_0(\rho)/2\pi`, :math:`\dot k = 0`."""

    kind = "step"
    feature_names = ("rsqrt_q",)
    needs_same = True

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [_safe_rsqrt(q)]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        rho = _arccos_correlation(c, sigma, fi[0], fj[0], same)
        return c.mul(c.const("inv_2pi"), c.arccos_j0(rho)), None


class _SignForm(_Form):
    r""":math:`\mathrm{sign}`: :math:`k = \tfrac{2}{\pi}\arcsin\rho = \tfrac2\pi J_0(\rho) - 1`, :math:`\dot k = 0`.

    Features :math:`(\mathbb 1[q > 0], 1/\sqrt q)`: a point of zero variance maps to zero.
    """

    kind = "sign"
    feature_names = ("positive", "rsqrt_q")
    needs_same = True

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [(q > 0).to(q.dtype), _safe_rsqrt(q)]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        (pos_i, r_i), (pos_j, r_j) = fi, fj
        rho = _arccos_correlation(c, sigma, r_i, r_j, same)
        k = c.sub(c.mul(c.const("two_over_pi"), c.arccos_j0(rho)), c.integer(1))
        return c.mul(k, c.mul(pos_i, pos_j)), None


class _RectifiedForm(_Form):
    """``RectifiedMonomial``: degree 1 as the ReLU, degree 0 as the step function."""

    kind = "rectified"
    needs_same = True

    def unsupported(self, layer: Activation) -> str | None:
        if layer.degree > 1:
            return "only degrees 0 (the step function) and 1 (ReLU) have KeOps formulas"
        return None


class _ErfForm(_Form):
    r""":math:`\phi(x) = a\,\mathrm{erf}(bx) + c` (Williams 1997). With :math:`u = (1 + 2b^2 q)^{-1/2}` per point,

    .. math::
        \rho = 2b^2 \Sigma_{12}\, u_1 u_2, \qquad k = \frac{2a^2}{\pi}\arcsin\rho + c^2, \qquad
        \dot k = \frac{4a^2b^2}{\pi}\, \frac{u_1 u_2}{\sqrt{1 - \rho^2}};

    :math:`|\rho| < 1` strictly, also for identical points, so no clamping is needed.
    """

    kind = "erf"
    feature_names = ("u",)
    constant_names = ("amplitude", "two_b2", "offset", "slope")

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [torch.rsqrt(1 + 2 * layer.b**2 * q)]

    def constants(self, layer: Activation) -> list[float]:
        a2, b2 = layer.a**2, layer.b**2
        return [2 * a2 / math.pi, 2 * b2, layer.c**2, 4 * a2 * b2 / math.pi]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        amplitude, two_b2, offset, slope = consts
        uu = c.mul(fi[0], fj[0])
        rho = c.mul(c.mul(two_b2, sigma), uu)
        arcsin, inv_leg = c.arcsin(rho)
        k = c.add(c.mul(amplitude, arcsin), offset)
        # kdot = slope * u1 u2 / sqrt(1 - rho^2); d(1/sqrt(1-rho^2))/drho = rho / (1-rho^2)^{3/2}
        d_inv_leg = c.g.mul(rho.value, c.g.mul(inv_leg, c.g.unary("square", inv_leg)))
        inv_leg_dual = _Dual(inv_leg, c.t_scale(rho.tangent, d_inv_leg))
        kdot = c.mul(c.mul(slope, uu), inv_leg_dual)
        return k, kdot


class _ExpForm(_Form):
    r""":math:`\phi(x) = a e^{bx}`: :math:`k = a^2 \exp(h_1 + h_2 + b^2\Sigma_{12})` with :math:`h = b^2 q/2`
    per point, :math:`\dot k = b^2 k`."""

    kind = "exp"
    feature_names = ("h",)
    constant_names = ("a2", "b2")

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [0.5 * layer.b**2 * q]

    def constants(self, layer: Activation) -> list[float]:
        return [layer.a**2, layer.b**2]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        a2, b2 = consts
        k = c.mul(a2, c.exp(c.add(c.add(fi[0], fj[0]), c.mul(b2, sigma))))
        return k, c.mul(b2, k)


class _SinForm(_Form):
    r""":math:`\phi(x) = a\sin(bx + c)` (also ``Cos`` and ``Rbf``). With :math:`h = -b^2 q/2` per point and
    :math:`s_\pm = \exp(h_1 + h_2 \pm b^2 \Sigma_{12})`,

    .. math::
        k = \frac{a^2}{2}(s_+ - \cos(2c)\, s_-), \qquad \dot k = \frac{a^2 b^2}{2}(s_+ + \cos(2c)\, s_-).
    """

    kind = "sin"
    feature_names = ("h",)
    constant_names = ("half_a2", "cos2c", "b2", "half_a2b2")

    def features(self, layer: Activation, q: Tensor) -> list[Tensor]:
        return [-0.5 * layer.b**2 * q]

    def constants(self, layer: Activation) -> list[float]:
        a2, b2 = layer.a**2, layer.b**2
        return [a2 / 2, layer._cos_2c(), b2, a2 * b2 / 2]

    def pair(
        self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same: _Node | None
    ) -> tuple[_Dual, _Dual | None]:
        half_a2, cos2c, b2, half_a2b2 = consts
        h = c.add(fi[0], fj[0])
        exponent = c.mul(b2, sigma)
        s_plus = c.exp(c.add(h, exponent))
        s_minus = c.mul(cos2c, c.exp(c.sub(h, exponent)))
        k = c.mul(half_a2, c.sub(s_plus, s_minus))
        kdot = c.mul(half_a2b2, c.add(s_plus, s_minus))
        return k, kdot


_ABRELU = _ABReLUForm()
_FORMS: dict[type, _Form] = {
    ReLU: _ABRELU, LeakyReLU: _ABRELU, ABReLU: _ABRELU, Abs: _ABRELU,
    Sign: _SignForm(), Erf: _ErfForm(), Exp: _ExpForm(), Sin: _SinForm(), Cos: _SinForm(), Rbf: _SinForm(),
    RectifiedMonomial: _RectifiedForm(),
}
_STEP = _StepForm()


def _form_of(layer: Layer) -> _Form:
    form = _FORMS[type(layer)]
    if form.kind == "rectified":
        return _ABRELU if layer.degree == 1 else _STEP
    return form


_KINDS: dict[str, _Form] = {"abrelu": _ABRELU, "step": _STEP, "sign": _FORMS[Sign], "erf": _FORMS[Erf],
                            "exp": _FORMS[Exp], "sin": _FORMS[Sin]}
