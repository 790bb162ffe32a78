r"""Default priors on a network's variances: what makes ``ScaleKernel(NTKKernel(net))`` identifiable.

**Why the variances are not identified by the data.** Take a ReLU network of :math:`L` ``Dense``
layers sharing one pair :math:`(\sigma_w^2, \sigma_b^2)` (``mlp(L - 1, "relu")``). ReLU is
positively homogeneous, so its dual maps are too: :math:`\hat\Sigma(c\Sigma) = c\,\hat\Sigma(\Sigma)`
and :math:`\dot\Sigma(c\Sigma) = \dot\Sigma(\Sigma)` for :math:`c > 0`. Without bias the recursion
:math:`\Sigma^{\ell+1} = \sigma_w^2 \hat\Sigma^{\ell}`,
:math:`\Theta^{\ell+1} = \sigma_w^2 \dot\Sigma^{\ell} \Theta^{\ell} + \Sigma^{\ell+1}` then gives
exactly

.. math::
    \Sigma(x, x'; \sigma_w^2) = (\sigma_w^2)^L\, \Sigma(x, x'; 1), \qquad
    \Theta(x, x'; \sigma_w^2) = (\sigma_w^2)^L\, \Theta(x, x'; 1),

so in ``ScaleKernel`` only the product :math:`s\,(\sigma_w^2)^L` of the outputscale :math:`s` and
:math:`(\sigma_w^2)^L` enters the marginal likelihood: the likelihood is constant along the curve
:math:`s \propto (\sigma_w^2)^{-L}`. With a bias, write :math:`\Sigma^\ell = (\sigma_w^2)^\ell
T^\ell` and :math:`u = \sigma_b^2 / \sigma_w^2`: then :math:`T^1 = x \cdot x'/d + u` and
:math:`T^{\ell+1} = \hat T^\ell + u\, (\sigma_w^2)^{-\ell}`, so along
:math:`(\sigma_w^2 \to \infty,\ u \text{ fixed},\ s\, (\sigma_w^2)^L \text{ fixed})` the kernel
only loses the biases of the deeper layers, which the data barely see: the likelihood is nearly
flat there too. Optimisers drift along these directions (a fit on Hartmann-6 lands on
:math:`\sigma_w^2 = 864`, :math:`\sigma_b^2 = 2635`, :math:`s = 10^{-11}`), which makes the
fitted values meaningless and the optimisation ill conditioned.

**The fix: a prior on each variance.** :func:`default_priors` puts a log-normal prior centred on
the value each variance has when it is called, :math:`\log \sigma_w^2 \sim \mathcal N(\log
\sigma_{w,0}^2, s_w^2)` and :math:`\log \sigma_b^2 \sim \mathcal N(\log \sigma_{b,0}^2, s_b^2)`.
Along a flat direction of the likelihood the log posterior then falls as
:math:`(\log \sigma_w^2 - \log \sigma_{w,0}^2)^2 / (2 s_w^2)`, so the MAP estimate stays within a
few :math:`s_w` of :math:`\sigma_{w,0}^2` and the outputscale carries the overall scale of the
data. Centred on ``mlp``'s default :math:`\sigma_w^2 = 2`, the critical value of ReLU networks
(:math:`\sigma_w^2\, \mathbb E[\phi'(z)^2] = 1`: pre-activations keep a variance of order one
at every depth), the variances stay interpretable: :math:`\sigma_w^2` near 2 and
:math:`\sigma_b^2 / \sigma_w^2` the relative weight of the biases. The bias prior is wider
(default :math:`s_b = 1.5`) as the data do identify the bias up to the near-symmetry above.

An alternative documented parameterisation: fix :math:`\sigma_w^2` (e.g.
``layer.raw_weight_variance.requires_grad_(False)``) and learn :math:`\sigma_b^2` and the
outputscale; without bias this loses nothing, as the kernel is then exactly
:math:`(\sigma_w^2)^L` times a fixed kernel.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import GreaterThan, Positive
from gpytorch.priors import LogNormalPrior

from .._validation import real_argument
from ..core.hyperparameters import parameterized_layers
from ..core.layer import Layer
from .affine import Affine

__all__ = ["default_priors"]


def default_priors(net: Layer, *, weight_scale: float = 0.5, bias_scale: float = 1.5) -> Layer:
    r"""Give every learnable variance of ``net`` a log-normal prior centred on its current value; returns ``net``.

    For each distinct affine layer (``Dense``, ``Conv``, ..., ``GlobalSelfAttention``) and each
    of its hyperparameters :math:`v` (:math:`\sigma_w^2`, :math:`\sigma_b^2` when the layer has a
    bias, attention's key/query/value/out variances), a
    :class:`gpytorch.priors.LogNormalPrior` with :math:`\log v \sim \mathcal N(\log v_0, s^2)`,
    :math:`v_0` the current value (per batch element for batched hyperparameters) and :math:`s`
    ``bias_scale`` for :math:`\sigma_b^2`, ``weight_scale`` for the others. A shared layer
    (``mlp(shared=True)``) gets one prior per variance, counted once by the marginal likelihood.
    Variances that already have a prior keep it. A variance under GPyTorch's default
    ``Positive`` constraint gets ``GreaterThan(1e-6 · v₀)`` instead (same value), so that no
    optimiser step can make it exactly 0, where the log-normal density is undefined. See the
    module docstring for why this makes ``ScaleKernel(NTKKernel(net))`` identifiable.

    One line, before building the kernels::

        covar_module = ScaleKernel(gpntk.NTKKernel(L.default_priors(L.mlp(3, "relu"))))

    :param net: the network (changed in place: the priors are registered on its layers).
    :param weight_scale: :math:`s_w > 0`, the standard deviation of :math:`\log \sigma_w^2`
        (0.5: a factor :math:`e^{\pm 1} \approx 2.7` at two standard deviations).
    :param bias_scale: :math:`s_b > 0`, that of :math:`\log \sigma_b^2`.
    :raises ValueError: if ``net`` has no learnable variance.
    """
    if not isinstance(net, Layer):
        raise TypeError(
            f"default_priors() takes a network built from gpntk.layers, got {type(net).__name__} "
            "(for a kernel, pass kernel.net)"
        )
    weight_scale = real_argument("weight_scale", weight_scale, minimum=0, strict=True)
    bias_scale = real_argument("bias_scale", bias_scale, minimum=0, strict=True)
    layers = [layer for layer in parameterized_layers(net) if isinstance(layer, Affine)]
    if not layers:
        raise ValueError(f"default_priors(): the network {net!r} has no learnable variance")
    for layer in layers:
        for name in layer.hyperparameter_names:
            if hasattr(layer, f"{name}_prior"):
                continue
            value = layer.hyperparameter(name).detach()
            scale = bias_scale if name == "bias_variance" else weight_scale
            _keep_away_from_zero(layer, name, value)
            layer.set_prior(name, LogNormalPrior(value.log().clone(), torch.full_like(value, scale)))
    return net


#: the lower bound :func:`default_priors` gives a variance under GPyTorch's default ``Positive``
#: constraint, relative to the prior's centre: ``FLOOR`` · v₀ lies more than 9 prior standard
#: deviations below v₀ for every scale up to 1.5, so the bound never binds at a sensible MAP
FLOOR = 1e-6


def _keep_away_from_zero(layer: Affine, name: str, value: torch.Tensor) -> None:
    r"""Replace a default ``Positive`` constraint of ``name`` by ``GreaterThan(FLOOR · min v₀)``, same value.

    Under ``Positive`` (softplus) a large optimiser step on the raw parameter can make the variance
    exactly 0 (softplus underflows below -104 in float32, -745 in float64), where the log-normal
    density is not defined: ``log_prob`` then raises ``ValueError`` inside the optimiser
    (seen with BoTorch's ``fit_gpytorch_mll``). A user-given constraint is kept as it is.
    """
    constraint = getattr(layer, f"raw_{name}_constraint")
    if type(constraint) is not Positive:
        return
    floor = FLOOR * value.min().item()
    layer.register_constraint(f"raw_{name}", GreaterThan(floor), replace=True)
    layer._set_variance(name, value)
