r"""The trained ensemble: what infinitely wide networks predict after training for time t.

Gradient flow on the loss :math:`\frac{1}{2nk}\lVert f(X) - Y\rVert_F^2` with learning rate
:math:`\eta` moves an infinitely wide network linearly in function space with its constant
neural tangent kernel (Jacot et al. 2018; Lee et al. 2019). Counting time :math:`t` in steps and
writing :math:`\tau = \eta t / (nk)`, the output at inputs :math:`x` is

.. math::
    f_t(x) = f_0(x) - G(x, X)\, G^{-1}\bigl(I - e^{-\tau G}\bigr)\,\bigl(f_0(X) - Y\bigr),

with :math:`G` the kernel that drives training and :math:`f_0` the network at initialization,
a centred GP with covariance :math:`P`. Over the random initialisations the outputs form a GP at
every time (Lee et al. 2019, eqs. 15–16):

.. math::
    \mu_t(x) &= G(x, X)\, A_t\, Y, \qquad A_t = G^{-1}\bigl(I - e^{-\tau G}\bigr), \\
    \Sigma_t(x, x') &= P(x, x') - G(x, X) A_t P(X, x') - P(x, X) A_t G(X, x')
        + G(x, X) A_t P(X, X) A_t G(X, x').

Regimes:

* ``"ntk"``: every layer trained, :math:`G = \Theta`, :math:`P = \Sigma` (the NNGP);
* ``"nngp"``: only the readout trained, :math:`G = P = \Sigma`;
* ``"ntkgp"``: the NTK-GP of He, Lakshminarayanan & Teh (2020), ensembles trained with an added
  random function, :math:`G = P = \Theta`; at :math:`t = \infty` it is the exact GP posterior with
  the NTK as prior covariance.

When :math:`G = P` the covariance simplifies to
:math:`P(x, x') - G(x, X) G^{-1}(I - e^{-2\tau G}) G(X, x')`. As :math:`t \to \infty` the mean is
ridgeless kernel regression and the variance vanishes at the training inputs.

``diag_reg`` is absolute and is added to the training kernel that drives the dynamics
(:math:`G(X, X) + \text{diag\_reg}\, I`) and, where the prior is that same kernel, to
:math:`P(X, X)` too (the conventions of Neural Tangents' ``gradient_descent_mse_ensemble``).

Numerics: one symmetric eigendecomposition :math:`G = V \Lambda V^\top` per regime, cached, so
any number of times costs only matrix products; the filter
:math:`(1 - e^{-\tau\lambda})/\lambda = \tau\, \varphi_1(\tau\lambda)` is evaluated with
``expm1`` (exact for tiny and zero eigenvalues); negative round-off eigenvalues are clipped to
zero; at :math:`t = \infty` eigenvalues below ``n·eps·λ_max`` are treated as zero (a
pseudo-inverse) with a warning, instead of producing huge or NaN values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator, IdentityLinearOperator, KroneckerProductLinearOperator
from torch import Tensor

from .kernels.dense import kernel_diagonal, nngp_and_ntk
from .kernels.infinite_width import _check_input_shape
from .layers.base import Hyperparameters, Layer, check_network
from .validation import check_inputs

__all__ = ["TrainedEnsemble", "Regime"]

Regime = Literal["ntk", "nngp", "ntkgp"]
_REGIMES = ("ntk", "nngp", "ntkgp")


@dataclass(frozen=True)
class _Spectrum:
    """The eigendecomposition of the training kernel of one regime, and what is reused per time."""

    eigenvalues: Tensor  # (n,), clipped at 0
    eigenvectors: Tensor  # (n, n)
    targets: Tensor  # V^T Y, (n, k)
    prior_in_basis: Tensor | None  # V^T P(X, X) V (n, n) when P differs from G, else None
    rank_cutoff: float  # eigenvalues below this count as zero at t = inf


#: the kernel matrices each regime needs: (dynamics G, prior P), as "nngp" / "ntk"
_REGIME_KERNELS = {"ntk": ("ntk", "nngp"), "nngp": ("nngp", "nngp"), "ntkgp": ("ntk", "ntk")}


class _KernelCache:
    """Kernel matrices between fixed inputs and the training inputs, computed only when needed.

    One pass of the layer recursion gives the NNGP and, when asked for, the NTK; a regime that needs
    only the NNGP never computes the NTK.
    """

    def __init__(self, net: Layer, x1: Tensor, x2: Tensor | None, input_shape: tuple[int, ...] | None):
        self.net, self.x1, self.x2, self.input_shape = net, x1, x2, input_shape
        self._values: dict[str, Tensor] = {}

    def diagonal(self, kind: str) -> Tensor:
        """The per-point kernel :math:`k(x, x)` of ``x1`` (``x2`` is None), ``(n,)``, without the matrix."""
        key = f"{kind}_diag"
        if key not in self._values:
            hyper = {name: value.detach() for name, value in Hyperparameters.collect(self.net, like=self.x1).items()}
            self._values[key] = kernel_diagonal(
                self.x1, self.x1, net=self.net, output=kind, hyper=hyper, input_shape=self.input_shape
            )
        return self._values[key]

    def get(self, kind: str) -> Tensor:
        if kind not in self._values:
            nngp, ntk = nngp_and_ntk(
                self.net, self.x1, self.x2, input_shape=self.input_shape, detach_hyperparameters=True,
                track_ntk=kind == "ntk",
            )
            self._values["nngp"] = nngp
            if ntk is not None:
                self._values["ntk"] = ntk
        return self._values[kind]


class TrainedEnsemble:
    r"""The posterior of an ensemble of infinitely wide networks trained by gradient descent for time t.

    :param net: the architecture (its current hyperparameters are used).
    :param train_x: training inputs ``(n, d)``.
    :param train_y: training targets ``(n,)`` or ``(n, k)``.
    :param learning_rate: :math:`\eta` of the gradient descent the time is counted in.
    :param diag_reg: absolute ridge added to the training kernel (0 for ridgeless).
    :param input_shape: ``(C, W)`` or ``(C, H, W)`` for spatial architectures (rows of the inputs
        hold channels-first tensors), as for :class:`~gpntk.NTKKernel`.

    ``post(test_x, t, regime)`` returns a GPyTorch ``MultivariateNormal`` for 1-D targets and a
    ``MultitaskMultivariateNormal`` (covariance :math:`\Sigma_t \otimes I_k`) for ``(n, k)``
    targets; ``t`` is a float, ``math.inf`` or a 1-D tensor of times, which adds a leading batch
    dimension. Kernels are evaluated in the dtype of ``train_x`` (float64 recommended) with the
    network's hyperparameters at construction time treated as constants: gradients flow to
    ``test_x`` (e.g. for acquisition optimisation), not to the hyperparameters or training data.
    """

    def __init__(
        self,
        net: Layer,
        train_x: Tensor,
        train_y: Tensor,
        learning_rate: float = 1.0,
        diag_reg: float = 0.0,
        input_shape: tuple[int, ...] | None = None,
    ):
        if not isinstance(net, Layer):
            raise TypeError(f"TrainedEnsemble needs an architecture built from gpntk.layers, got {type(net).__name__}")
        self.input_shape = _check_input_shape(input_shape)
        check_network(net, self.input_shape)
        check_inputs("train_x", train_x, batched=False)
        if self.input_shape is not None and train_x.shape[-1] != math.prod(self.input_shape):
            raise ValueError(
                f"input_shape {self.input_shape} needs {math.prod(self.input_shape)} features per row, "
                f"got {train_x.shape[-1]}"
            )
        if not torch.is_tensor(train_y):
            raise TypeError(f"train_y must be a torch.Tensor, got {type(train_y).__name__}")
        if train_y.dim() not in (1, 2):
            raise ValueError(f"train_y must have shape (n,) or (n, k), got {tuple(train_y.shape)}")
        if train_y.shape[0] != train_x.shape[0]:
            raise ValueError(
                f"train_x has {train_x.shape[0]} points but train_y has {train_y.shape[0]} targets"
            )
        if not torch.isfinite(train_y).all():
            raise ValueError(f"train_y contains {int((~torch.isfinite(train_y)).sum())} NaN or infinite values")
        learning_rate = float(learning_rate)
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive and finite, got {learning_rate}")
        diag_reg = float(diag_reg)
        if not math.isfinite(diag_reg) or diag_reg < 0:
            raise ValueError(f"diag_reg must be non-negative and finite, got {diag_reg}")
        self.net = net
        self.train_x = train_x
        self._multi_output = train_y.dim() == 2
        self.train_y = train_y.to(train_x) if self._multi_output else train_y.to(train_x).unsqueeze(-1)
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self._train_kernels_cache = _KernelCache(net, train_x.detach(), None, self.input_shape)
        self._spectra: dict[str, _Spectrum] = {}
        self._test_cache: tuple[Tensor, _KernelCache, _KernelCache] | None = None

    # ----------------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.train_y.shape[1]

    def _time_scale(self) -> float:
        """τ per unit of t: η / (n·k)."""
        return self.learning_rate / (self.num_train * self.num_outputs)

    def _train_kernels(self, regime: str) -> tuple[Tensor, Tensor | None]:
        """(G(X, X) + reg·I, P(X, X)) for the regime; P is None when it equals G (and then includes reg)."""
        eye = torch.eye(self.num_train, dtype=self.train_x.dtype, device=self.train_x.device)
        dynamics, prior = _REGIME_KERNELS[regime]
        with torch.no_grad():
            regularized = self._train_kernels_cache.get(dynamics) + self.diag_reg * eye
            return regularized, (None if prior == dynamics else self._train_kernels_cache.get(prior))

    def _spectrum(self, regime: str) -> _Spectrum:
        if regime not in self._spectra:
            dynamics, prior = self._train_kernels(regime)
            eigenvalues, eigenvectors = torch.linalg.eigh(dynamics)
            scale = eigenvalues[-1].clamp_min(torch.finfo(eigenvalues.dtype).tiny)
            if eigenvalues[0] < -1e-6 * scale:
                warnings.warn(
                    f"the {regime} training kernel has a negative eigenvalue {eigenvalues[0].item():.3g} "
                    f"(largest {scale.item():.3g}) beyond round-off; it is clipped to zero",
                    RuntimeWarning,
                    stacklevel=3,
                )
            eigenvalues = eigenvalues.clamp_min(0)
            prior_in_basis = None if prior is None else eigenvectors.mT @ prior @ eigenvectors
            cutoff = self.num_train * torch.finfo(eigenvalues.dtype).eps * scale.item()
            self._spectra[regime] = _Spectrum(
                eigenvalues, eigenvectors, eigenvectors.mT @ self.train_y, prior_in_basis, cutoff
            )
        return self._spectra[regime]

    def _filters(self, spectrum: _Spectrum, t: float) -> Tensor:
        r""":math:`g = (1 - e^{-\tau\lambda})/\lambda` per eigenvalue, for one time."""
        lam = spectrum.eigenvalues
        if math.isinf(t):
            small = lam <= spectrum.rank_cutoff
            if bool(small.any()):
                warnings.warn(
                    f"the training kernel is numerically singular ({int(small.sum())} of {lam.numel()} "
                    f"eigenvalues below {spectrum.rank_cutoff:.3g}); at t = inf those directions are "
                    "never fitted (pseudo-inverse); consider diag_reg > 0",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return torch.where(small, torch.zeros_like(lam), 1 / torch.where(small, torch.ones_like(lam), lam))
        tau = t * self._time_scale()
        z = tau * lam
        # τ·φ1(z) with φ1(z) = (1 - e^{-z}) / z, φ1(0) = 1
        phi1 = torch.where(z > 0, -torch.expm1(-z) / torch.where(z > 0, z, torch.ones_like(z)), torch.ones_like(z))
        return tau * phi1

    def _test_kernels(self, test_x: Tensor) -> tuple[_KernelCache, _KernelCache]:
        """Lazily computed kernels (test, train) and (test, test), cached for the last ``test_x``."""
        cache = self._test_cache
        if cache is None or cache[0].shape != test_x.shape or not torch.equal(cache[0], test_x):
            cache = (
                test_x.detach().clone(),
                _KernelCache(self.net, test_x, self.train_x.detach(), self.input_shape),
                _KernelCache(self.net, test_x, None, self.input_shape),
            )
            self._test_cache = cache
        return cache[1], cache[2]

    def _prepare(self, test_x: Tensor, regime: str) -> None:
        """Compute (and cache) every kernel matrix ``moments(test_x, t, regime)`` needs (for timing)."""
        self._train_kernels(regime)
        cross, test = self._test_kernels(test_x.to(self.train_x))
        dynamics, prior = _REGIME_KERNELS[regime]
        cross.get(dynamics), cross.get(prior), test.get(prior)

    # ----------------------------------------------------------------------------------------
    def moments(
        self, test_x: Tensor, t: float | Tensor, regime: Regime = "ntk", diag: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""``(mean, cov)`` of the ensemble's outputs at ``test_x`` after training for time ``t``.

        ``mean`` is ``(m,)`` for 1-D targets and ``(m, k)`` otherwise; ``cov`` is ``(m, m)`` (shared
        by all outputs), or with ``diag=True`` only its diagonal ``(m,)``, the variances, computed
        without any test-by-test kernel (the per-point recursion and the test-by-train kernels
        only). A 1-D tensor of ``T`` times adds a leading dimension: ``(T, m[, k])`` and
        ``(T, m, m)`` / ``(T, m)``.
        """
        return self._moments(test_x, t, regime, "diag" if diag else "full")

    def mean(self, test_x: Tensor, t: float | Tensor, regime: Regime = "ntk") -> Tensor:
        r"""The ensemble's mean :math:`\mu_t` at ``test_x`` alone (no covariance, no test-by-test kernel)."""
        return self._moments(test_x, t, regime, None)[0]

    def _moments(self, test_x: Tensor, t, regime: str, covariance: str | None) -> tuple[Tensor, Tensor | None]:
        regime = _check_regime(regime)
        times, batched = _check_times(t)
        check_inputs("test_x", test_x, batched=False)
        if test_x.shape[-1] != self.train_x.shape[-1]:
            raise ValueError(
                f"test_x has {test_x.shape[-1]} features but train_x has {self.train_x.shape[-1]}"
            )
        test_x = test_x.to(self.train_x)
        spectrum = self._spectrum(regime)
        cross, test = self._test_kernels(test_x)
        dynamics, prior = _REGIME_KERNELS[regime]
        dynamics_v = cross.get(dynamics) @ spectrum.eigenvectors  # (m, n)
        prior_v = None
        if covariance is not None and spectrum.prior_in_basis is not None:
            prior_v = cross.get(prior) @ spectrum.eigenvectors
        if covariance == "full":
            prior_tt = test.get(prior)
        elif covariance == "diag":
            prior_tt = test.diagonal(prior)
        means, covs = [], []
        for t_value in times:
            g = self._filters(spectrum, t_value)
            means.append(dynamics_v @ (g.unsqueeze(-1) * spectrum.targets))
            if covariance is None:
                continue
            if prior_v is None:
                # G = P: Σ_t = P_tt - G_tx V diag(2g - λg²) V^T G_xt
                h = 2 * g - spectrum.eigenvalues * g.square()
                if covariance == "diag":
                    covs.append(prior_tt - (dynamics_v.square() * h).sum(-1))
                    continue
                cov = prior_tt - (dynamics_v * h) @ dynamics_v.mT
            else:
                weighted = dynamics_v * g  # G_tx V diag(g)
                if covariance == "diag":
                    quadratic = ((weighted @ spectrum.prior_in_basis) * weighted).sum(-1)
                    covs.append(prior_tt - 2 * (weighted * prior_v).sum(-1) + quadratic)
                    continue
                cross_term = weighted @ prior_v.mT
                cov = prior_tt - cross_term - cross_term.mT + weighted @ spectrum.prior_in_basis @ weighted.mT
            covs.append((cov + cov.mT) / 2)
        mean = torch.stack(means) if batched else means[0]
        if not self._multi_output:
            mean = mean.squeeze(-1)
        if covariance is None:
            return mean, None
        return mean, (torch.stack(covs) if batched else covs[0])

    def __call__(
        self, test_x: Tensor, t: float | Tensor, regime: Regime = "ntk"
    ) -> MultivariateNormal | MultitaskMultivariateNormal:
        """The ensemble's outputs at ``test_x`` after time ``t`` as a GPyTorch distribution."""
        mean, cov = self.moments(test_x, t, regime)
        if not self._multi_output:
            return MultivariateNormal(mean, DenseLinearOperator(cov))
        eye = IdentityLinearOperator(self.num_outputs, dtype=cov.dtype, device=cov.device)
        if cov.dim() == 3:
            eye = eye.expand(cov.shape[0], self.num_outputs, self.num_outputs)
        covariance = KroneckerProductLinearOperator(DenseLinearOperator(cov), eye)
        return MultitaskMultivariateNormal(mean, covariance, interleaved=True)

    def sample(
        self,
        test_x: Tensor,
        t: float | Tensor,
        n: int,
        regime: Regime = "ntk",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""``n`` draws of the ensemble's outputs: ``(n, [T,] m[, k])``.

        Uses an eigendecomposition of the covariance with round-off negative eigenvalues clipped,
        so it works where the covariance is singular (at the training inputs as :math:`t \to \infty`).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        mean, cov = self.moments(test_x, t, regime)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        root = eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)  # (..., m, m)
        m = cov.shape[-1]
        k = self.num_outputs
        shape = (n, *cov.shape[:-2], m, k)
        noise = torch.randn(shape, generator=generator, dtype=cov.dtype, device=cov.device)
        draws = root @ noise  # (n, ..., m, k)
        if not self._multi_output:
            draws = draws.squeeze(-1)
        return mean + draws

    def train_loss(self, t: float | Tensor, regime: Regime = "ntk", include_variance: bool = True) -> Tensor:
        r"""The training loss :math:`\frac{1}{2nk}\mathbb E\lVert f_t(X) - Y\rVert^2` over the ensemble at time ``t``.

        With ``include_variance=False``, the loss of the ensemble mean
        :math:`\frac{1}{2nk}\lVert\mu_t(X) - Y\rVert^2` (for ridgeless training
        :math:`\frac{1}{2nk}\lVert e^{-\tau G} Y\rVert^2`). The expected loss adds
        :math:`\frac{1}{2n}\operatorname{tr}\Sigma_t(X, X)`. Costs :math:`O(n)` per time once the
        regime's eigendecomposition exists. Returns a scalar tensor, or ``(T,)`` for a tensor of times.
        """
        regime = _check_regime(regime)
        times, batched = _check_times(t)
        spectrum = self._spectrum(regime)
        lam = spectrum.eigenvalues
        unregularized = (lam - self.diag_reg).clamp_min(0)  # eigenvalues of G(X, X) itself
        losses = []
        for t_value in times:
            g = self._filters(spectrum, t_value)
            fitted = unregularized * g  # μ_t(X) = V diag(fitted) V^T Y
            residual = (fitted - 1).unsqueeze(-1) * spectrum.targets
            loss = residual.square().sum()
            if include_variance:
                if spectrum.prior_in_basis is None:  # P(X, X) = G(X, X) = V diag(λ - reg) V^T
                    trace = (unregularized - unregularized.square() * (2 * g - lam * g.square())).sum()
                else:  # V^T Σ_t(X, X) V = (I - D) S (I - D), D = diag(fitted)
                    trace = (spectrum.prior_in_basis.diagonal() * (1 - fitted).square()).sum()
                loss = loss + self.num_outputs * trace
            losses.append(loss.clamp_min(0) / (2 * self.num_train * self.num_outputs))
        return torch.stack(losses) if batched else losses[0]

    def max_learning_rate(self, regime: Regime = "ntk") -> float:
        r"""The largest stable learning rate of discrete gradient descent, :math:`2nk/\lambda_{\max}(G)`.

        Full-batch gradient descent on :math:`\frac{1}{2nk}\lVert f - Y\rVert^2` of the linearised
        network multiplies the residual by :math:`I - \eta G/(nk)` per step, which converges iff
        :math:`\eta < 2nk/\lambda_{\max}`.
        """
        spectrum = self._spectrum(_check_regime(regime))
        return 2 * self.num_train * self.num_outputs / spectrum.eigenvalues[-1].item()

    def __repr__(self) -> str:
        return (
            f"TrainedEnsemble({self.net!r}, n={self.num_train}, k={self.num_outputs}, "
            f"learning_rate={self.learning_rate}, diag_reg={self.diag_reg})"
        )


def _check_regime(regime: str) -> str:
    if regime not in _REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(_REGIMES)}")
    return regime


def _check_times(t) -> tuple[list[float], bool]:
    if torch.is_tensor(t):
        if t.dim() > 1:
            raise ValueError(f"t must be a number or a 1-D tensor of times, got shape {tuple(t.shape)}")
        batched = t.dim() == 1
        values = [float(v) for v in t.reshape(-1).tolist()]
        if batched and not values:
            raise ValueError("t is an empty tensor of times")
    else:
        try:
            values = [float(t)]
        except (TypeError, ValueError):
            raise TypeError(f"t must be a number, math.inf or a 1-D tensor of times, got {t!r}") from None
        batched = False
    for value in values:
        if math.isnan(value) or value < 0:
            raise ValueError(f"training time t must be >= 0 (or math.inf), got {value}")
    return values, batched
