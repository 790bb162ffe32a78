r"""What affine layers (``Dense``, ``Conv``) share: the hyperparameters :math:`\sigma_w^2, \sigma_b^2`
and the affine step of the kernel recursion, in NTK or standard parameterization.

**Standard parameterization** (``parameterization="standard"``, ``in_width=n``): the layer
computes :math:`h = W x + b` with trained :math:`W_{ij} \sim \mathcal N(0, \sigma_w^2/n_{fan})`,
:math:`b_i \sim \mathcal N(0, \sigma_b^2)`, :math:`n_{fan} = n k` (``k`` filter taps, 1 for
``Dense``). Its NNGP map is that of the NTK parameterization, but the gradient with respect to
:math:`W` is the layer's input itself, so the tangent kernel grows with the width
(Sohl-Dickstein, Novak, Schoenholz & Lee 2020, *On the infinite width limit of neural networks with
a standard parameterization*, arXiv:2001.07301; Park, Smith, Sohl-Dickstein & Le 2019, *The effect of
network width on stochastic gradient descent and generalization*, ICML):

.. math::
    \Theta \leftarrow n k\, \mathcal W(\Sigma) + \sigma_w^2\, \mathcal W(\Theta) + \beta,

:math:`\mathcal W` the convolution's average over its taps (identity for ``Dense``),
:math:`\Sigma` the covariance of the layer's inputs, :math:`\beta = 1` with a bias and 0
without. The kernel is that of the finite network whose layer has exactly ``n`` inputs, so
``net.finite(width)`` refuses a width that differs from the next layer's ``in_width``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.priors import Prior
from torch import Tensor

from .._validation import parameterization_arguments, real_argument
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Signature
from ..core.state import KernelState
from ..errors import ArchitectureError

__all__ = ["Affine", "AFFINE_OPTIONS", "DEFAULT_BIAS_VARIANCE"]

#: the keyword-only options of every affine layer (``Dense``, ``Conv``, ``ConvTranspose``, ``ConvLocal``)
AFFINE_OPTIONS = (
    "parameterization", "in_width", "weight_variance_prior", "bias_variance_prior", "weight_variance_constraint",
    "bias_variance_constraint",
)

#: σb² of ``Dense()`` and ``mlp()`` when none is given: a bias exists (σb² > 0), see :class:`Dense`
DEFAULT_BIAS_VARIANCE = 0.1


def _check_variance(name: str, value: object, allow_zero: bool) -> float:
    value = real_argument(name, value, error=ArchitectureError)  # numbers only: no bools, strings, complex
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ArchitectureError(f"{name} is a variance and must be {bound}, got {value}")
    return value


_FLOAT64 = torch.empty(0, dtype=torch.float64)


def _get_variance(module: "Affine", name: str) -> Tensor:
    return getattr(module, name)


def _set_variance(module: "Affine", value: float | Tensor, name: str) -> None:
    module._set_variance(name, value)


class Affine(Layer):
    r"""Base class of affine layers in NTK or standard parameterization (:class:`Dense`, :class:`Conv`).

    Owns the hyperparameters :math:`\sigma_w^2` (``weight_variance``) and :math:`\sigma_b^2`
    (``bias_variance``, 0 for a layer without bias), stored GPyTorch-style as raw parameters of
    shape ``(*batch_shape, 1, 1)`` under a constraint (default
    :class:`~gpytorch.constraints.Positive`), with optional priors; and the affine step of the
    recursion, :meth:`affine_map`. ``trainable=False`` freezes the layer (no NTK term).
    ``parameterization="standard"`` with ``in_width`` (see the module docstring) changes the NTK
    term of the layer's own parameters.
    """

    is_affine = True
    #: whether this class (itself, not a subclass) maps and builds the standard parameterization:
    #: a subclass whose fan-in differs (other taps, unshared weights) must declare it itself
    standard_parameterization: bool = False

    def __init__(
        self,
        weight_variance: float = 1.0,
        bias_variance: float = 0.0,
        trainable: bool = True,
        *,
        parameterization: str = "ntk",
        in_width: int | None = None,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
    ):
        super().__init__()
        self._parameterization, self._in_width = parameterization_arguments(
            type(self).__name__, parameterization, in_width, error=ArchitectureError
        )
        if self.in_width is not None and not type(self).__dict__.get("standard_parameterization", False):
            raise ArchitectureError(
                f"{type(self).__name__} supports parameterization='ntk' only (standard parameterization: Dense, Conv)"
            )
        weight_variance = _check_variance("weight_variance", weight_variance, allow_zero=False)
        bias_variance = _check_variance("bias_variance", bias_variance, allow_zero=True)
        if not isinstance(trainable, bool):
            raise ArchitectureError(f"trainable must be True or False, got {trainable!r}")
        self.trainable = trainable
        self._exact_values: dict[str, tuple[Tensor, Tensor]] = {}
        self.has_bias = bias_variance > 0
        self.hyperparameter_names = ("weight_variance", "bias_variance") if self.has_bias else ("weight_variance",)
        self._register_variance("weight_variance", weight_variance, weight_variance_prior, weight_variance_constraint)
        if self.has_bias:
            self._register_variance("bias_variance", bias_variance, bias_variance_prior, bias_variance_constraint)
        else:
            for option, given in (("prior", bias_variance_prior), ("constraint", bias_variance_constraint)):
                if given is not None:
                    raise ArchitectureError(
                        f"bias_variance_{option} was given but bias_variance is 0, which builds a "
                        f"{type(self).__name__} without bias; pass a positive bias_variance (its initial value) "
                        "to learn a bias"
                    )

    @property
    def parameterization(self) -> str:
        """``"ntk"`` or ``"standard"`` (fixed at construction)."""
        return self._parameterization

    @property
    def in_width(self) -> int | None:
        """The number of inputs of a standard-parameterized layer (``None`` in NTK parameterization); fixed."""
        return self._in_width

    def _register_variance(self, name: str, value: float, prior: Prior | None, constraint: Interval | None) -> None:
        raw = f"raw_{name}"
        if constraint is not None and not isinstance(constraint, Interval):
            raise TypeError(
                f"{name}_constraint must be a gpytorch.constraints.Interval (e.g. GreaterThan, Interval), "
                f"got {type(constraint).__name__}"
            )
        self.register_parameter(raw, torch.nn.Parameter(torch.zeros(1, 1)))
        self.register_constraint(raw, constraint if constraint is not None else Positive())
        if prior is not None:
            self.set_prior(name, prior)
        self._set_variance(name, value)

    def set_prior(self, name: str, prior: Prior) -> None:
        """Put the GPyTorch prior ``prior`` on the (constrained) hyperparameter ``name``, as ``{name}_prior``.

        What the ``*_prior`` arguments of the constructor do; :func:`gpntk.layers.default_priors`
        uses it on built networks. Raises if ``name`` is not a hyperparameter of this layer or
        already has a prior.
        """
        if name not in self.hyperparameter_names:
            raise ValueError(
                f"{name} is not a hyperparameter of this {self.name} layer "
                f"(it has {', '.join(self.hyperparameter_names)})"
            )
        if not isinstance(prior, Prior):
            raise TypeError(f"{name}_prior must be a gpytorch.priors.Prior, got {type(prior).__name__}")
        if hasattr(self, f"{name}_prior"):
            raise ValueError(f"{name} of this {self.name} layer already has a prior ({name}_prior)")
        getter, setter = partial(_get_variance, name=name), partial(_set_variance, name=name)
        self.register_prior(f"{name}_prior", prior, getter, setter)

    def _set_variance(self, name: str, value: float | Tensor) -> None:
        raw = getattr(self, f"raw_{name}")
        value = torch.as_tensor(value, dtype=torch.float64, device=raw.device)
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise ValueError(f"{name} must be positive and finite, got {value.tolist()}")
        constraint = getattr(self, f"raw_{name}_constraint")
        try:
            exact = value.expand(raw.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"{name} has shape {tuple(raw.shape)} (batch shape {tuple(raw.shape[:-2])}); a value of "
                f"shape {tuple(value.shape)} does not broadcast to it"
            ) from None
        self.initialize(**{f"raw_{name}": constraint.inverse_transform(exact.to(raw.dtype))})
        # Remember the value as given, in float64, so that converting the layer to float64 later
        # (``kernel.double()``) recovers it exactly instead of its float32 rounding.
        self._exact_values[name] = (exact, getattr(self, f"raw_{name}").detach().clone())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Affine":
        untouched = {
            name: (exact, snapshot)
            for name, (exact, snapshot) in self._exact_values.items()
            if torch.equal(getattr(self, f"raw_{name}").detach(), snapshot)
        }
        super()._apply(fn, recurse)
        self._exact_values = {}
        for name, (exact, _) in untouched.items():
            raw = getattr(self, f"raw_{name}")
            if raw.shape == exact.shape:
                self._set_variance(name, exact)
        return self

    def hyperparameter(self, name: str, like: Tensor | None = None) -> Tensor:
        """The value of ``name`` in the dtype of ``like``, exact when it is more precise than the storage.

        Hyperparameters live in the module's dtype (float32 by default in PyTorch), so a value
        given as 0.1 is stored as its float32 rounding. When a kernel is evaluated in float64 and
        the value has not been changed since it was set, the value as given is used instead,
        with the gradient still flowing to the raw parameter; so float64 inputs get
        reference-precision kernels without ``.double()``.
        """
        value = super().hyperparameter(name, like)
        remembered = self._exact_values.get(name)
        if like is None or remembered is None or value.dtype.itemsize <= getattr(self, f"raw_{name}").dtype.itemsize:
            return value
        exact, snapshot = remembered
        if not torch.equal(getattr(self, f"raw_{name}").detach(), snapshot):
            return value
        return value + (exact.to(value) - value).detach()

    @property
    def weight_variance(self) -> Tensor:
        return self.raw_weight_variance_constraint.transform(self.raw_weight_variance)

    @weight_variance.setter
    def weight_variance(self, value: float | Tensor) -> None:
        self._set_variance("weight_variance", value)

    @property
    def bias_variance(self) -> Tensor:
        if not self.has_bias:
            return torch.zeros_like(self.raw_weight_variance)
        return self.raw_bias_variance_constraint.transform(self.raw_bias_variance)

    @bias_variance.setter
    def bias_variance(self, value: float | Tensor) -> None:
        if not self.has_bias:
            raise ValueError(
                f"this {self.name} layer was built without bias (bias_variance=0): it has no bias parameter, so "
                f"its bias variance stays 0. To learn a bias, build the layer with a positive initial value, "
                f"e.g. {self.name}(..., bias_variance=0.1); a network's layers are fixed once built (parameters "
                "added later would be missed by optimizers and models already holding them)"
            )
        self._set_variance("bias_variance", value)

    # --- batch shapes -------------------------------------------------------------------------
    def _raw_names(self) -> list[str]:
        return [f"raw_{name}" for name in self.hyperparameter_names]

    def _reshape_raw(self, name: str, reshape: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch reshaping (expand or index) to a raw parameter and its remembered exact value."""
        param = getattr(self, f"raw_{name}")
        remembered = self._exact_values.get(name)
        untouched = remembered is not None and torch.equal(param.detach(), remembered[1])
        param.data = reshape(param.data).clone()
        self._exact_values.pop(name, None)
        if untouched:
            assert remembered is not None  # untouched implies remembered
            self._exact_values[name] = (reshape(remembered[0]).clone(), param.detach().clone())

    def expand_hyperparameters(self, batch_shape: torch.Size) -> None:
        for name in self.hyperparameter_names:
            current = getattr(self, f"raw_{name}").shape[:-2]
            try:
                target = torch.broadcast_shapes(current, batch_shape)
            except RuntimeError:
                target = None
            if target is None or (target != batch_shape and current != batch_shape):
                raise ValueError(
                    f"raw_{name} already has batch shape {tuple(current)}, which cannot take the batch "
                    f"shape {tuple(batch_shape)}"
                )
            if current != batch_shape:
                self._reshape_raw(name, lambda t: t.expand(*batch_shape, 1, 1))

    def index_hyperparameters(self, index: tuple[Any, ...]) -> None:
        for name in self.hyperparameter_names:
            self._reshape_raw(name, lambda t: t[index])

    # --- the affine step shared by Dense and Conv ----------------------------------------------
    def affine_map(self, state: KernelState, hyper: Hyperparameters, taps: int = 1) -> KernelState:
        r""":math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
        :math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma_{\text{new}}` (trainable, NTK
        parameterization) or :math:`+\, n k\, \Sigma + \beta` (standard parameterization, ``taps``
        = :math:`k`, the state already averaged over the taps)."""
        layout = state.layout
        weight_variance = layout.scalar_shape(hyper.get(self, "weight_variance"))
        if self.has_bias:
            bias_variance = layout.scalar_shape(hyper.get(self, "bias_variance"))
            affine: Callable[[Tensor], Tensor] = lambda k: weight_variance * k + bias_variance  # noqa: E731
        else:
            affine = lambda k: weight_variance * k  # noqa: E731
        cov12 = affine(state.cov12)
        if state.diag:
            var1 = var2 = cov12
        else:
            var1, var2 = affine(state.var1), affine(state.var2)
        ntk12 = state.ntk12
        if state.track_ntk:
            scaled = None if ntk12 is None else weight_variance * ntk12
            if self.trainable:
                own = self._own_tangent(state.cov12, cov12, taps)
                ntk12 = own if scaled is None else scaled + own
            else:
                ntk12 = scaled
        return state.replace(cov12=cov12, var1=var1, var2=var2, ntk12=ntk12)

    def _own_tangent(self, cov_in: Tensor, cov_out: Tensor, taps: int) -> Tensor:
        """The layer's own parameters' NTK term: the new Σ (NTK), or ``n k Σ_in + β`` (standard)."""
        if self.in_width is None:
            return cov_out
        own = (self.in_width * taps) * cov_in
        return own + 1.0 if self.has_bias else own

    def check_in_width(self, signature: Signature) -> None:
        """Refuse a standard layer applied to the network's inputs whose ``in_width`` is not their number."""
        if self.in_width is not None and signature.features is not None and signature.features != self.in_width:
            raise ArchitectureError(
                f"{self!r} gets {signature.features} input features (channels) from {signature.last}, but its "
                f"in_width is {self.in_width}: a standard-parameterized layer's in_width is its number of inputs"
            )

    def finite_fan_in(self, features: int | None) -> int | None:
        """The number of input features of the finite module: ``features``, checked against ``in_width``.

        ``features`` is what the finite network feeds the layer (``None``: not known yet). A
        standard layer's kernel is that of a network whose layer gets exactly ``in_width``, so any
        other number is refused.
        """
        if self.in_width is None:
            return features
        if features is not None and features != self.in_width:
            raise ArchitectureError(
                f"{self!r} gets {features} input features (channels) in the finite network, but its kernel in "
                f"standard parameterization is that of a layer with in_width={self.in_width} inputs: the finite "
                "network converges to the kernel only when each hidden width equals the next layer's in_width "
                f"(use net.finite({self.in_width}) or build the layer with in_width={features})"
            )
        return self.in_width

    def finite_stds(self) -> tuple[float, float]:
        """``(σw, σb)`` as floats for the finite-width module (the exact values when untouched)."""
        if self.weight_variance.numel() != 1:
            raise ValueError(
                f"net.finite() needs scalar hyperparameters; this {self.name} layer has batch shape "
                f"{tuple(self.weight_variance.shape[:-2])}"
            )
        weight_std = math.sqrt(self.hyperparameter("weight_variance", _FLOAT64).item())
        bias_std = math.sqrt(self.hyperparameter("bias_variance", _FLOAT64).item()) if self.has_bias else 0.0
        return weight_std, bias_std

    def variance_repr(self) -> str:
        def fmt(t: Tensor) -> str:
            return f"{t.item():.4g}" if t.numel() == 1 else f"<batch {tuple(t.shape[:-2])}>"

        args = f"weight_variance={fmt(self.weight_variance)}, bias_variance={fmt(self.bias_variance)}"
        if not self.trainable:
            args += ", trainable=False"
        if self.in_width is not None:
            args += f", parameterization={self.parameterization!r}, in_width={self.in_width}"
        return args
