r"""First-order forms: values computed as usual, first derivatives written out by hand.

A forward-mode derivative (:func:`torch.func.jvp`) differentiates every operation of a formula.
For the arc-cosine functions that is both slow and less accurate than the closed form: through
:math:`J_1(\rho) = \sqrt{1-\rho^2} + \rho\,(\pi - \arccos\rho)` it produces
:math:`-\rho\dot\rho/\sqrt{1-\rho^2} + (\pi-\arccos\rho)\dot\rho + \rho\dot\rho/\sqrt{1-\rho^2}`,
two divisions and a square root per tangent whose terms cancel, where Price's theorem gives
:math:`\dot J_1 = J_0\,\dot\rho` (:mod:`gpntk.activations.angular`).

Where only first derivatives are wanted, a function :math:`f` with known derivative :math:`f'`
can be written as

.. math::
    f(\rho) \mapsto f(\bar\rho) + f'(\bar\rho)\,(\rho - \bar\rho), \qquad \bar\rho = \mathrm{detach}(\rho):

the value is bitwise :math:`f(\rho)` (:math:`\rho - \bar\rho = 0` exactly and :math:`f'` is finite),
the first derivative (forward or reverse mode) is :math:`f'(\rho)\,\dot\rho`, and second derivatives
are wrong (:math:`f'` is a constant to autograd). So the forms are switched on only by
:func:`first_order_tangents`, around code that takes first derivatives and nothing else: the
forward-mode tangents of :mod:`gpntk.kernels.tangents`.

The switch is read while a function is traced, so :func:`torch.compile` keeps
separate compiled code for both settings (it guards on the flag).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["first_order_tangents", "active", "linearized"]


class _Switch:
    """Where the switch lives (a class attribute: Dynamo guards on it like on a module global)."""

    on = False


def active() -> bool:
    """Whether :func:`first_order_tangents` is on."""
    return _Switch.on


@contextmanager
def first_order_tangents() -> Iterator[None]:
    """Use the first-order forms inside the block (one switch per process: an evaluation in another
    thread meanwhile gets the same values and first derivatives, but no second ones)."""
    previous, _Switch.on = _Switch.on, True
    try:
        yield
    finally:
        _Switch.on = previous


def linearized(value: Tensor, derivative: Tensor, rho: Tensor) -> Tensor:
    r""":math:`f(\bar\rho) + f'(\bar\rho)(\rho - \bar\rho)`: ``value`` (computed from ``rho.detach()``),
    with first derivative ``derivative * d rho``. ``derivative`` must be finite."""
    return value + derivative * (rho - rho.detach())
