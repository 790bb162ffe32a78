r"""Global self-attention over the positions of sequences (Hron et al. 2020).

The kernels are those of "Infinite attention: NNGP and NTK for deep attention networks" (J. Hron,
Y. Bahri, J. Sohl-Dickstein, R. Novak, ICML 2020), with the conventions of Neural Tangents'
``GlobalSelfAttention``: see :class:`GlobalSelfAttention`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import Tensor, nn

from .._validation import choice_argument, integer_argument
from ..core.attention import MECHANISMS, NTKSelfAttention, attention_weights
from ..core.coincident import exact_values
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.state import KernelState
from ..errors import ArchitectureError
from .affine import Affine, _check_variance
from .conv import spatial_input

__all__ = ["GlobalSelfAttention"]

_FLOAT64 = torch.empty(0, dtype=torch.float64)
_VARIANCES = ("key_variance", "query_variance", "value_variance", "out_variance")
_NO_WEIGHT_VARIANCE = (
    "GlobalSelfAttention has no weight_variance; its variances are key_variance, query_variance, value_variance, "
    "out_variance and bias_variance"
)


def _variance(name: str) -> property:
    """The constrained value of ``raw_{name}`` (a ``(*batch_shape, 1, 1)`` tensor), settable."""

    def get(self: "GlobalSelfAttention") -> Tensor:
        return getattr(self, f"raw_{name}_constraint").transform(getattr(self, f"raw_{name}"))

    def set(self: "GlobalSelfAttention", value: float | Tensor) -> None:
        self._set_variance(name, value)

    return property(get, set, doc=f"The learnable ``{name}`` (positive).")


class GlobalSelfAttention(Affine):
    r"""Multi-head self-attention over all positions of a sequence (inputs ``(C, L)``).

    With :math:`\sigma_{QK}^2` = ``key_variance`` · ``query_variance``, :math:`\sigma_{OV}^2` =
    ``value_variance`` · ``out_variance``, :math:`\Sigma_x` the ``L × L`` covariance of one input
    with itself and :math:`\zeta` the attention mechanism (Hron et al. 2020):

    * ``linear_scaling=True`` (logits :math:`q \cdot k / d_{key}`, queries tied to keys): the
      attention weights converge to :math:`G_x = \zeta(\sigma_{QK}\, \Sigma_x)` (softmax over each
      row, i.e. over the keys; identity, :math:`|\cdot|`, ReLU elementwise), and

      .. math::
          \Sigma(x, x') \leftarrow \sigma_{OV}^2\, G_x\, \Sigma(x, x')\, G_{x'}^\top + \sigma_b^2, \qquad
          \Theta \leftarrow \sigma_{OV}^2\, G_x \Theta G_{x'}^\top + 2\sigma_{OV}^2\, G_x \Sigma G_{x'}^\top
          + \sigma_b^2

      (the query/key weights do not contribute to the NTK in this limit);
    * ``linear_scaling=False`` (logits :math:`q \cdot k / \sqrt{d_{key}}`, independent queries
      and keys), only for ``"identity"``: with :math:`s = \sum_{ab} \Sigma_{ab}^2` and
      :math:`t = \sum_{ab} \Sigma_{ab} \Theta_{ab}` over the pairs of positions of
      :math:`\Sigma(x, x')`, :math:`\Theta(x, x')`,

      .. math::
          \Sigma \leftarrow \sigma_{QK}^2 \sigma_{OV}^2\, s\, \Sigma + \sigma_b^2, \qquad
          \Theta \leftarrow \sigma_{QK}^2 \sigma_{OV}^2 \bigl(2 t\, \Sigma + s\, (\Theta + 4 \Sigma)\bigr)
          + \sigma_b^2.

      Its outputs are Gaussian only as the number of heads grows too; the kernel is the limit.

    ``n_heads`` does not enter the kernel (each head's width grows); it fixes the finite network
    of ``net.finite(width)``: ``n_heads`` heads of width ``width`` for keys, queries and values,
    ``width`` output channels (see :class:`gpntk.core.attention.NTKSelfAttention`). No positional
    embeddings. The layer needs the full position-by-position covariance of its inputs; it acts on
    sequences only (one spatial axis).

    :param n_heads: number of heads (finite network only).
    :param attention_mechanism: ``"softmax"``, ``"identity"``, ``"abs"`` or ``"relu"``.
    :param linear_scaling: ``True`` (logits scaled by ``1/d_key``), or ``False`` (``1/sqrt(d_key)``,
        ``"identity"`` only: for the other mechanisms the limit has no closed form).
    :param key_variance, query_variance, value_variance, out_variance: positive, learnable.
    :param bias_variance: of the output projection's bias; 0 (default) builds no bias.
    :param priors: optional GPyTorch priors by hyperparameter name (e.g. ``{"key_variance": ...}``).
    :param constraints: optional constraints on the raw hyperparameters by name (default positive).

    The hyperparameters are stored as ``raw_<name>`` of shape ``(*batch_shape, 1, 1)``, as in
    :class:`~gpntk.layers.Dense` (whose machinery this layer shares through
    :class:`~gpntk.layers.Affine`); a layer object used in several places shares them.
    """

    key_variance = _variance("key_variance")
    query_variance = _variance("query_variance")
    value_variance = _variance("value_variance")
    out_variance = _variance("out_variance")

    def __init__(
        self,
        n_heads: int,
        attention_mechanism: str = "softmax",
        linear_scaling: bool = True,
        key_variance: float = 1.0,
        query_variance: float = 1.0,
        value_variance: float = 1.0,
        out_variance: float = 1.0,
        bias_variance: float = 0.0,
        *,
        priors: Mapping[str, Prior] | None = None,
        constraints: Mapping[str, Interval] | None = None,
    ):
        Layer.__init__(self)  # not Affine's: this layer has no weight_variance
        self._parameterization, self._in_width = "ntk", None  # what Affine's readers report
        self.n_heads = integer_argument("n_heads", n_heads, minimum=1, error=ArchitectureError)
        try:
            self.mechanism = choice_argument("attention_mechanism", attention_mechanism, MECHANISMS)
        except ValueError as error:
            raise ArchitectureError(str(error)) from None
        if not isinstance(linear_scaling, bool):
            raise ArchitectureError(f"linear_scaling must be True or False, got {linear_scaling!r}")
        if not linear_scaling and self.mechanism != "identity":
            raise ArchitectureError(
                f"GlobalSelfAttention(attention_mechanism={self.mechanism!r}) needs linear_scaling=True: with "
                "logits scaled by 1/sqrt(d_key) only attention_mechanism='identity' has a closed-form "
                "infinite-width kernel"
            )
        self.linear_scaling = linear_scaling
        self.trainable = True
        values = dict(zip(_VARIANCES, (key_variance, query_variance, value_variance, out_variance)))
        values = {name: _check_variance(name, value, allow_zero=False) for name, value in values.items()}
        bias = _check_variance("bias_variance", bias_variance, allow_zero=True)
        self.has_bias = bias > 0
        if self.has_bias:
            values["bias_variance"] = bias
        self.hyperparameter_names = tuple(values)
        priors, constraints = dict(priors or {}), dict(constraints or {})
        for what, given in (("priors", priors), ("constraints", constraints)):
            unknown = sorted(set(given) - set(values))
            if unknown:
                raise ArchitectureError(
                    f"{what} has entries for {unknown}, which are not hyperparameters of this layer "
                    f"({', '.join(values)})"
                )
        self._exact_values: dict[str, tuple[Tensor, Tensor]] = {}
        for name, value in values.items():
            self._register_variance(name, value, priors.get(name), constraints.get(name))

    @property
    def weight_variance(self) -> Tensor:
        raise AttributeError(_NO_WEIGHT_VARIANCE)

    @weight_variance.setter
    def weight_variance(self, value: float | Tensor) -> None:
        raise AttributeError(_NO_WEIGHT_VARIANCE)

    @property
    def bias_variance(self) -> Tensor:
        if not self.has_bias:
            return torch.zeros_like(self.raw_key_variance)
        return self.raw_bias_variance_constraint.transform(self.raw_bias_variance)

    @bias_variance.setter
    def bias_variance(self, value: float | Tensor) -> None:
        if not self.has_bias:
            raise ValueError(
                "this GlobalSelfAttention layer was built without bias (bias_variance=0): it has no bias parameter, "
                "so its bias variance stays 0; build it with a positive initial value, e.g. "
                "GlobalSelfAttention(..., bias_variance=0.1), to learn one"
            )
        self._set_variance("bias_variance", value)

    # --- build-time checks ---------------------------------------------------------------------
    def check(self, signature: Signature) -> Signature:
        spatial_input(self.name, signature)
        if signature.spatial is not None and len(signature.spatial) != 1:
            raise ArchitectureError(
                f"{self.name} attends over the positions of sequences (input_shape (C, L)), but the outputs of "
                f"{signature.last} have spatial shape {signature.spatial}"
            )
        return signature.after(self, gaussian=True, channels="hidden", independent=True)

    def needs_full(self, after: bool) -> bool:
        return True

    # --- the kernel ----------------------------------------------------------------------------
    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        if not layout.full or len(layout.spatial) != 1:
            raise RuntimeError(f"{self.name} needs the full covariance between the positions of a sequence")

        def get(name: str) -> Tensor:
            return layout.scalar_shape(hyper.get(self, name))

        qk = get("key_variance") * get("query_variance")
        ov = get("value_variance") * get("out_variance")
        bias = get("bias_variance") if self.has_bias else None
        if self.linear_scaling:
            return _linear_map(state, self.mechanism, qk.sqrt(), ov, bias)
        return _identity_sqrt_map(state, qk * ov, bias)

    # --- the finite network --------------------------------------------------------------------
    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        assert in_shape is not None and len(in_shape) == 2  # check(): sequences
        names = (*_VARIANCES, "bias_variance")
        for name in names[:-1]:
            if getattr(self, name).numel() != 1:
                raise ValueError(
                    f"net.finite() needs scalar hyperparameters; this {self.name} layer has batch shape "
                    f"{tuple(getattr(self, name).shape[:-2])}"
                )
        stds = tuple(
            math.sqrt(self.hyperparameter(name, _FLOAT64).item()) if name in self.hyperparameter_names else 0.0
            for name in names
        )
        channels = out_features if is_output else width
        module = NTKSelfAttention(
            in_shape[0], channels, self.n_heads, width, self.mechanism, self.linear_scaling,
            stds,  # type: ignore[arg-type]  # five floats, in the order of names
            generator,
        )
        return module, (channels, in_shape[1])

    def __repr__(self) -> str:
        def fmt(t: Tensor) -> str:
            return f"{t.item():.4g}" if t.numel() == 1 else f"<batch {tuple(t.shape[:-2])}>"

        variances = ", ".join(f"{name}={fmt(getattr(self, name))}" for name in (*_VARIANCES, "bias_variance"))
        return (
            f"GlobalSelfAttention(n_heads={self.n_heads}, attention_mechanism={self.mechanism!r}, "
            f"linear_scaling={self.linear_scaling}, {variances})"
        )


def _sandwich(left: Tensor, middle: Tensor, right: Tensor) -> Tensor:
    """``left @ middle @ rightᵀ`` over the last two (position) dimensions."""
    return left @ middle @ right.transpose(-1, -2)


def _linear_map(state: KernelState, mechanism: str, sigma_qk: Tensor, ov: Tensor, bias: Tensor | None) -> KernelState:
    r"""``linear_scaling=True``: :math:`\Sigma \leftarrow \sigma_{OV}^2 G_x \Sigma G_{x'}^\top + \sigma_b^2`, etc."""
    add_bias: Callable[[Tensor], Tensor] = (lambda t: t) if bias is None else (lambda t: t + bias)
    g1 = attention_weights(sigma_qk * state.var1, mechanism)
    g2 = g1 if state.diag else attention_weights(sigma_qk * state.var2, mechanism)
    core = ov * _sandwich(g1, state.cov12, g2)
    cov12 = add_bias(core)
    if state.diag:
        var1 = var2 = cov12
    else:
        var1 = add_bias(ov * _sandwich(g1, state.var1, g1))
        var2 = add_bias(ov * _sandwich(g2, state.var2, g2))
        cov12 = exact_values(cov12, var1, state.coincident, state.layout.ndim)
    ntk12 = state.ntk12
    if state.track_ntk:
        inherited = 2 * core if ntk12 is None else 2 * core + ov * _sandwich(g1, ntk12, g2)
        ntk12 = add_bias(inherited)
    return state.replace(cov12=cov12, var1=var1, var2=var2, ntk12=ntk12)


def _identity_sqrt_map(state: KernelState, qkov: Tensor, bias: Tensor | None) -> KernelState:
    r"""``linear_scaling=False``, identity:
    :math:`\Sigma \leftarrow \sigma_{QK}^2\sigma_{OV}^2 s\, \Sigma + \sigma_b^2`, etc."""
    add_bias: Callable[[Tensor], Tensor] = (lambda t: t) if bias is None else (lambda t: t + bias)

    def total(t: Tensor) -> Tensor:  # the sum over all pairs of positions, kept as (1, 1)
        return t.sum(dim=(-2, -1), keepdim=True)

    s = total(state.cov12.square())
    cov12 = add_bias(qkov * s * state.cov12)
    if state.diag:
        var1 = var2 = cov12
    else:
        var1 = add_bias(qkov * total(state.var1.square()) * state.var1)
        var2 = add_bias(qkov * total(state.var2.square()) * state.var2)
        cov12 = exact_values(cov12, var1, state.coincident, state.layout.ndim)
    ntk12 = state.ntk12
    if state.track_ntk:
        if ntk12 is None:
            inherited = 4 * s * state.cov12
        else:
            inherited = 2 * total(state.cov12 * ntk12) * state.cov12 + s * (ntk12 + 4 * state.cov12)
        ntk12 = add_bias(qkov * inherited)
    return state.replace(cov12=cov12, var1=var1, var2=var2, ntk12=ntk12)
