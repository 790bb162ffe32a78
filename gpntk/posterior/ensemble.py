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

Numerics, ``solver="eigh"``: one symmetric eigendecomposition :math:`G = V \Lambda V^\top` per
regime, cached, so any number of times costs only matrix products; the filter
:math:`(1 - e^{-\tau\lambda})/\lambda = \tau\, \varphi_1(\tau\lambda)` is evaluated with
``expm1`` (exact for tiny and zero eigenvalues); negative round-off eigenvalues are clipped to
zero. Eigenvalues below ``n·eps·λ_max`` (Ritz values below ``n·eps·θ_max`` with Lanczos) are
indistinguishable from round-off and treated as exactly zero at *every* time, as by the
pseudo-inverse at :math:`t = \infty` (see :func:`_time_filter`): for a PSD kernel their exact
contribution vanishes, while the computed one would be round-off times :math:`\tau`. So the
mean approaches its limit monotonically in every eigendirection, for singular kernels in
float32 as in float64. A warning says when that could matter (:func:`_warn_dropped`).
Variances, differences of non-negative terms, are set to zero where round-off makes them
negative, with a warning beyond :data:`VARIANCE_ROUNDING` (:func:`_repair_variances`).

The ensemble is a snapshot: a frozen copy of the network and its hyperparameter values, and
copies of the data, taken at construction (see :class:`TrainedEnsemble`).

Numerics, ``solver="lanczos"`` (:mod:`gpntk.lanczos`; the default above :data:`EIGH_MAX_TRAIN`
training points): the :math:`n \times n` training kernel is never formed, only products
:math:`G(X, X)\, V` computed block by block (an injectable ``train_product``, by default
:func:`gpntk.kernels.blockwise.kernel_matmul`), each a pass over the :math:`n^2` pairs, which is
the cost. Every quantity is a matrix function of :math:`G` between vectors, for the filters
:math:`g_t(\lambda) = (1 - e^{-\tau\lambda})/\lambda` and
:math:`h_t = 2 g_t - \lambda g_t^2 = (1 - e^{-2\tau\lambda})/\lambda`:

* the mean :math:`\mu_t = G(X_*, X)\, g_t(G)\, Y`: Lanczos from the columns of :math:`Y`,
  with :math:`G(X_*, X)\, q_j` accumulated on the way (one pass);
* when :math:`G = P`, the variances :math:`P(x, x) - b_x^\top h_t(G)\, b_x` with
  :math:`b_x = G(X, x)` by Gauss quadrature, and the covariance
  :math:`P(X_*, X_*) - G(X_*, X)\, h_t(G)\, G(X, X_*)` from the same projections (one pass);
* when :math:`G \ne P` (``"ntk"``), :math:`W = g_t(G)\, G(X, X_*)` (two-pass Lanczos) and one
  more product :math:`P(X, X)\, W`:
  :math:`\Sigma_t = P_{**} - W^\top P(X, X_*) - P(X_*, X) W + W^\top P(X, X) W`.

All columns (targets and test points) share one Lanczos run, one product with an ``(n, k + m)``
block per step, and all times come from it (the tridiagonals do not depend on :math:`t`). The
number of steps grows with :math:`\sqrt{\tau\lambda_{\max}}` at finite times and with
:math:`\sqrt{\lambda_{\max}/\lambda_{\min}}` at :math:`t = \infty`, where ``diag_reg > 0``
keeps it bounded (without a ridge :math:`1/\lambda` on a nearly singular kernel may not
converge within ``max_iterations``). The test-by-train kernels are ``(m, n)`` dense matrices.
Memory: :math:`O(n (k + m))` numbers times a small constant, plus at most
:data:`LANCZOS_MEMORY_BYTES` of stored Lanczos vectors or projections.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Sequence, cast

import numpy as np
import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator, IdentityLinearOperator, KroneckerProductLinearOperator
from torch import Tensor

from .._validation import check_input_shape, check_inputs
from ..core.hyperparameters import Hyperparameters, parameterized_layers
from ..core.layer import Layer, check_network
from ..errors import NumericalWarning
from ..kernels.blockwise import kernel_matmul
from ..kernels.dense import Output, evaluate, kernel_diagonal
from .lanczos import LanczosRun, MatrixFunction, lanczos, largest_eigenvalue

__all__ = ["TrainedEnsemble", "Regime", "REGIMES", "Solver", "TrainProduct", "EIGH_MAX_TRAIN"]

Regime = Literal["ntk", "nngp", "ntkgp"]
REGIMES = ("ntk", "nngp", "ntkgp")
Solver = Literal["auto", "eigh", "lanczos"]
_SOLVERS = ("auto", "eigh", "lanczos")

#: ``solver="auto"`` uses the eigendecomposition up to this many training points and Lanczos above.
#: At n = 8000 the dense path holds a few n x n float64 matrices (0.5 GB each) and its
#: eigendecomposition takes minutes on a laptop CPU, while a Lanczos step (one pass over the n^2
#: kernel pairs) takes seconds; below, the dense path is faster unless t is small.
EIGH_MAX_TRAIN = 8000
#: memory (bytes) the Lanczos solver may spend beyond its O(n (k + m)) working blocks: Lanczos vectors
#: kept for pass 2 (fewer replayed products), or the projections a full covariance is assembled from
LANCZOS_MEMORY_BYTES = 2**30
#: Rademacher probes of the Hutchinson estimate of tr Sigma_t(X, X) in ``train_loss`` (Lanczos solver)
TRACE_PROBES = 64

#: ``train_product(V, kinds)``: the products ``K_kind(X, X) @ V`` of the (unregularized) training
#: kernels, ``V`` ``(n, c)``, one ``(n, c)`` tensor per kind in ``kinds`` (a subset of ``("nngp", "ntk")``)
TrainProduct = Callable[[Tensor, Sequence[str]], Sequence[Tensor]]


class _BlockwiseProduct:
    """The default :data:`TrainProduct`: :func:`~gpntk.kernels.blockwise.kernel_matmul` on the training inputs.

    ``hyper`` is the ensemble's snapshot of the network's hyperparameters (constants).
    """

    def __init__(self, net: Layer, hyper: dict[str, Tensor], train_x: Tensor, input_shape: tuple[int, ...] | None):
        self.net, self.hyper, self.x, self.input_shape = net, hyper, train_x, input_shape

    def __call__(self, rhs: Tensor, kinds: Sequence[str]) -> tuple[Tensor, ...]:
        return kernel_matmul(
            self.net, self.x, self.x, self.hyper, rhs, kinds=cast("tuple[Output, ...]", tuple(kinds)),
            input_shape=self.input_shape,
        )


@dataclass(frozen=True)
class _Spectrum:
    """The eigendecomposition of the training kernel of one regime, and what is reused per time."""

    eigenvalues: Tensor  # (n,), clipped at 0
    unclipped: Tensor  # (n,), as computed (a ridge shift acts on these)
    eigenvectors: Tensor  # (n, n)
    targets: Tensor  # V^T Y, (n, k)
    prior_in_basis: Tensor | None  # V^T P(X, X) V (n, n) when P differs from G, else None
    rank_cutoff: float  # eigenvalues below this count as zero at t = inf


#: the kernel matrices each regime needs: (dynamics G, prior P), as "nngp" / "ntk"
_REGIME_KERNELS: dict[str, tuple[Output, Output]] = {
    "ntk": ("ntk", "nngp"), "nngp": ("nngp", "nngp"), "ntkgp": ("ntk", "ntk")
}


class _KernelCache:
    """Kernel matrices between fixed inputs and the training inputs, computed only when needed.

    One pass of the layer recursion gives the NNGP and, when asked for, the NTK; a regime that needs
    only the NNGP never computes the NTK. ``hyper`` is the ensemble's snapshot of the network's
    hyperparameters. The values keep the autograd graph of ``x1`` (so a cache must not outlive one
    differentiable call; see :meth:`TrainedEnsemble._test_kernels`).
    """

    def __init__(
        self, net: Layer, hyper: dict[str, Tensor], x1: Tensor, x2: Tensor | None, input_shape: tuple[int, ...] | None
    ):
        self.net, self.hyper, self.x1, self.x2, self.input_shape = net, hyper, x1, x2, input_shape
        self._values: dict[str, Tensor] = {}

    def diagonal(self, kind: Output) -> Tensor:
        """The per-point kernel :math:`k(x, x)` of ``x1`` (``x2`` is None), ``(n,)``, without the matrix."""
        key = f"{kind}_diag"
        if key not in self._values:
            self._values[key] = kernel_diagonal(
                self.x1, self.x1, net=self.net, output=kind, hyper=self.hyper, input_shape=self.input_shape
            )
        return self._values[key]

    def get(self, kind: str) -> Tensor:
        if kind not in self._values:
            x2 = self.x1 if self.x2 is None else self.x2
            nngp, ntk = evaluate(
                self.net, self.x1, x2, self.hyper, input_shape=self.input_shape, track_ntk=kind == "ntk"
            )
            self._values["nngp"] = nngp
            if ntk is not None:
                self._values["ntk"] = ntk
        return self._values[kind]


class TrainedEnsemble:
    r"""The posterior of an ensemble of infinitely wide networks trained by gradient descent for time t.

    :param net: the architecture; the ensemble keeps a snapshot of it (see below).
    :param train_x: training inputs ``(n, d)`` (copied).
    :param train_y: real training targets ``(n,)`` or ``(n, k)`` (copied).
    :param learning_rate: :math:`\eta` of the gradient descent the time is counted in.
    :param diag_reg: absolute ridge added to the training kernel (0 for ridgeless).
    :param input_shape: ``(C, W)`` or ``(C, H, W)`` for spatial architectures (rows of the inputs
        hold channels-first tensors), as for :class:`~gpntk.NTKKernel`.
    :param solver: ``"eigh"`` (an eigendecomposition of the :math:`n \times n` training kernel),
        ``"lanczos"`` (matrix functions applied to vectors, the kernel never formed; see the
        module docstring) or ``"auto"``: eigh up to :data:`EIGH_MAX_TRAIN` training points,
        Lanczos above. The chosen one is ``self.solver``.
    :param tolerance: Lanczos: stop when the estimated relative error of every result is at most
        this (:func:`gpntk.lanczos.lanczos`: the change between checks five steps apart, enlarged
        when convergence is slow); means are judged as vectors over the test points, variances
        relative to themselves (floored at 1e-3 of the prior variance). Measured errors against
        ``"eigh"`` are about this size or smaller.
    :param max_iterations: Lanczos: the most products with the training kernel per solve; beyond,
        a warning (raise it, or at :math:`t = \infty` use ``diag_reg > 0``).
    :param train_product: Lanczos: how :math:`K(X, X)\, V` is computed (:data:`TrainProduct`);
        default :func:`~gpntk.kernels.blockwise.kernel_matmul`, block by block. ``num_products``
        counts its calls.

    ``post(test_x, t, regime)`` returns a GPyTorch ``MultivariateNormal`` for 1-D targets and a
    ``MultitaskMultivariateNormal`` (covariance :math:`\Sigma_t \otimes I_k`) for ``(n, k)``
    targets; ``t`` is a number (Python or NumPy), ``math.inf``, or a 1-D tensor or NumPy array of
    times, which adds a leading batch dimension. Kernels are evaluated in the dtype of ``train_x``
    (float64 recommended).

    **A snapshot.** The ensemble is fixed at construction: it keeps a deep copy of ``net`` and
    the values of its hyperparameters (in the dtype of ``train_x``), and copies of ``train_x``
    and ``train_y``. Nothing that later happens to the network or the tensors passed in (fitting
    a GP whose kernel shares ``net``, an optimiser step, an in-place edit) changes its answers.
    After changing the hyperparameters, build a new ensemble
    (``TrainedEnsemble(net, train_x, train_y, ...)``) to use them. ``post.net`` returns a fresh
    copy of the snapshot architecture each time (editing it changes nothing). Networks whose
    hyperparameters have a batch shape (e.g. after ``NTKKernel(net, batch_shape=[m])``) are
    refused: build one ensemble per batch element from an unbatched network.

    **Gradients** flow to ``test_x`` (e.g. for acquisition optimisation; ``solver="eigh"`` only),
    not to the hyperparameters or training data. Repeated calls, calls after ``torch.no_grad``
    calls and different leaves with equal values each get their own graph (kernels are cached
    for reuse only on calls that need no gradient).
    """

    def __init__(
        self,
        net: Layer,
        train_x: Tensor,
        train_y: Tensor,
        learning_rate: float = 1.0,
        diag_reg: float = 0.0,
        input_shape: tuple[int, ...] | None = None,
        solver: Solver = "auto",
        tolerance: float = 1e-8,
        max_iterations: int = 1000,
        train_product: TrainProduct | None = None,
    ):
        if not isinstance(net, Layer):
            raise TypeError(f"TrainedEnsemble needs an architecture built from gpntk.layers, got {type(net).__name__}")
        self.input_shape = check_input_shape(input_shape)
        check_network(net, self.input_shape)
        check_inputs("train_x", train_x, batched=False)
        if self.input_shape is not None and train_x.shape[-1] != math.prod(self.input_shape):
            raise ValueError(
                f"input_shape {self.input_shape} needs {math.prod(self.input_shape)} features per row, "
                f"got {train_x.shape[-1]}"
            )
        if not torch.is_tensor(train_y):
            raise TypeError(f"train_y must be a torch.Tensor, got {type(train_y).__name__}")
        if train_y.is_complex():
            raise TypeError(
                f"train_y must be real, got dtype {train_y.dtype}: the posterior of real-valued networks "
                "has no complex targets (fit the real and imaginary parts as two outputs, (n, 2))"
            )
        if train_y.dtype == torch.bool:
            raise TypeError("train_y must hold numbers, got a bool tensor")
        if train_y.dim() not in (1, 2):
            raise ValueError(f"train_y must have shape (n,) or (n, k), got {tuple(train_y.shape)}")
        if train_y.shape[0] != train_x.shape[0]:
            raise ValueError(
                f"train_x has {train_x.shape[0]} points but train_y has {train_y.shape[0]} targets"
            )
        if train_y.dim() == 2 and train_y.shape[1] == 0:
            raise ValueError("train_y has no outputs (shape (n, 0))")
        if not torch.isfinite(train_y).all():
            raise ValueError(f"train_y contains {int((~torch.isfinite(train_y)).sum())} NaN or infinite values")
        learning_rate = _check_positive_number("learning_rate", learning_rate)
        diag_reg = _check_diag_reg(diag_reg)
        if solver not in _SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(_SOLVERS)}")
        if not _is_real_number(tolerance) or not 0 < float(tolerance) < 1:
            raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
        if not _is_integer(max_iterations) or int(max_iterations) < 1:
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
        if train_product is not None and not callable(train_product):
            raise TypeError(f"train_product must be callable, got {type(train_product).__name__}")
        # the snapshot: a frozen copy of the architecture, its hyperparameter values, the data
        self._net, self._hyper = _snapshot(net, like=train_x)
        self.train_x = train_x.detach().clone()
        self._multi_output = train_y.dim() == 2
        train_y = train_y.detach().to(self.train_x, copy=True)
        self.train_y = train_y if self._multi_output else train_y.unsqueeze(-1)
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self._train_kernels_cache = _KernelCache(self._net, self._hyper, self.train_x, None, self.input_shape)
        self._spectra: dict[str, _Spectrum] = {}
        self._test_cache: tuple[Tensor, _KernelCache, _KernelCache] | None = None
        if solver == "auto":
            solver = "lanczos" if train_x.shape[0] > EIGH_MAX_TRAIN else "eigh"
        self.solver: Literal["eigh", "lanczos"] = solver
        self.tolerance = float(tolerance)
        self.max_iterations = int(max_iterations)
        if train_product is None:
            train_product = _BlockwiseProduct(self._net, self._hyper, self.train_x, self.input_shape)
        self._product = train_product
        #: products with the training kernel so far (Lanczos solver), each a pass over its n^2 entries
        self.num_products = 0
        self._largest: dict[str, float] = {}

    @property
    def net(self) -> Layer:
        """A copy of the architecture this ensemble was built with, hyperparameters as at construction.

        A fresh copy on every access: editing it does not change the ensemble (build a new one).
        """
        return copy.deepcopy(self._net)

    @property
    def hyperparameters(self) -> dict[str, Tensor]:
        """Copies of the hyperparameter values the ensemble uses, keyed as in ``Hyperparameters``."""
        return {name: value.clone() for name, value in self._hyper.items()}

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
            # regimes with the same dynamics ("ntk", "ntkgp") share one eigendecomposition
            kind = _REGIME_KERNELS[regime][0]
            shared = next((s for r, s in self._spectra.items() if _REGIME_KERNELS[r][0] == kind), None)
            if shared is not None:
                eigenvalues, eigenvectors = shared.unclipped, shared.eigenvectors
            else:
                eigenvalues, eigenvectors = torch.linalg.eigh(dynamics)
            unclipped = eigenvalues
            scale = eigenvalues[-1].clamp_min(torch.finfo(eigenvalues.dtype).tiny)
            if eigenvalues[0] < -1e-6 * scale:
                warnings.warn(
                    f"the {regime} training kernel has a negative eigenvalue {eigenvalues[0].item():.3g} "
                    f"(largest {scale.item():.3g}) beyond round-off; it is clipped to zero",
                    NumericalWarning,
                    stacklevel=3,
                )
            eigenvalues = eigenvalues.clamp_min(0)
            prior_in_basis = None if prior is None else eigenvectors.mT @ prior @ eigenvectors
            self._spectra[regime] = _Spectrum(
                eigenvalues, unclipped, eigenvectors, eigenvectors.mT @ self.train_y, prior_in_basis,
                self._rank_cutoff(eigenvalues),
            )
        return self._spectra[regime]

    def _rank_cutoff(self, eigenvalues: Tensor) -> float:
        """Eigenvalues at most n·ε·λ_max count as zero at t = ∞."""
        scale = eigenvalues[-1].clamp_min(torch.finfo(eigenvalues.dtype).tiny).item()
        return self.num_train * torch.finfo(eigenvalues.dtype).eps * scale

    def with_diag_reg(self, diag_reg: float) -> "TrainedEnsemble":
        r"""The same ensemble with the ridge ``diag_reg`` instead, reusing every kernel matrix and eigendecomposition.

        :math:`G + r' I = V (\Lambda + (r' - r) I) V^\top`: the eigenvectors do not depend on the
        ridge, so with ``solver="eigh"`` the new ensemble shifts the eigenvalues of the
        decompositions already computed (and shares the training and test kernels), which makes
        choosing ``diag_reg`` on validation data as cheap as choosing ``t``. With the Lanczos solver
        nothing is stored to reuse; the result is a new ensemble with the same settings. ``self``
        is unchanged.
        """
        diag_reg = _check_diag_reg(diag_reg)
        other = copy.copy(self)
        other.diag_reg = diag_reg
        other._largest = {}
        other.num_products = 0
        shift = diag_reg - self.diag_reg
        other._spectra = {}
        for regime, spectrum in self._spectra.items():
            unclipped = spectrum.unclipped + shift
            eigenvalues = unclipped.clamp_min(0)
            other._spectra[regime] = replace(
                spectrum, eigenvalues=eigenvalues, unclipped=unclipped, rank_cutoff=other._rank_cutoff(eigenvalues)
            )
        return other

    def _filters(self, spectrum: _Spectrum, t: float, factor: float = 1.0) -> Tensor:
        r""":math:`(1 - e^{-c\tau\lambda})/\lambda` per eigenvalue for one time.

        ``factor`` :math:`c`: 1 for :math:`g_t`, 2 for :math:`h_t`.

        Eigenvalues at most ``rank_cutoff`` count as zero at every time (see :func:`_time_filter`);
        a warning says when that could matter (:func:`_warn_dropped`).
        """
        lam = spectrum.eigenvalues
        tau = t * self._time_scale()
        if factor == 1.0:
            _warn_dropped(int((lam <= spectrum.rank_cutoff).sum()), lam.numel(), spectrum.rank_cutoff, tau, lam.dtype)
        return _time_filter(lam, factor * tau, spectrum.rank_cutoff)

    def _test_kernels(self, test_x: Tensor) -> tuple[_KernelCache, _KernelCache]:
        """Lazily computed kernels (test, train) and (test, test).

        A call that records gradients (grad mode on and ``test_x`` requiring grad) gets new kernels
        built on its own ``test_x``: a cache keyed by value would hand one leaf's graph to another
        leaf of equal value, or a graph already freed by ``backward``. Only calls that need no
        gradient share kernels, cached for the last ``test_x`` by value (and dtype, device).
        """
        differentiable = torch.is_grad_enabled() and test_x.requires_grad
        if differentiable:
            return (
                _KernelCache(self._net, self._hyper, test_x, self.train_x, self.input_shape),
                _KernelCache(self._net, self._hyper, test_x, None, self.input_shape),
            )
        with torch.no_grad():
            cache = self._test_cache
            if cache is None or not _same_values(cache[0], test_x):
                key = test_x.detach().clone()
                cache = (
                    key,
                    _KernelCache(self._net, self._hyper, key, self.train_x, self.input_shape),
                    _KernelCache(self._net, self._hyper, key, None, self.input_shape),
                )
                self._test_cache = cache
        return cache[1], cache[2]

    def _prepare(self, test_x: Tensor, regime: str) -> None:
        """Compute (and cache) every kernel matrix ``moments(test_x, t, regime)`` needs (for timing)."""
        if self.solver == "eigh":
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
        mean, cov = self._moments(test_x, t, regime, "diag" if diag else "full")
        return mean, cast(Tensor, cov)  # a covariance was asked for

    def mean(self, test_x: Tensor, t: float | Tensor, regime: Regime = "ntk") -> Tensor:
        r"""The ensemble's mean :math:`\mu_t` at ``test_x`` alone (no covariance, no test-by-test kernel)."""
        return self._moments(test_x, t, regime, None)[0]

    def _moments(
        self, test_x: Tensor, t: float | Tensor, regime: str, covariance: str | None
    ) -> tuple[Tensor, Tensor | None]:
        regime = _check_regime(regime)
        times, batched = _check_times(t)
        check_inputs("test_x", test_x, batched=False)
        if test_x.shape[-1] != self.train_x.shape[-1]:
            raise ValueError(
                f"test_x has {test_x.shape[-1]} features but train_x has {self.train_x.shape[-1]}"
            )
        test_x = test_x.to(self.train_x)
        if self.solver == "lanczos":
            mean, cov = self._moments_lanczos(test_x, times, regime, covariance)
        else:
            mean, cov = self._moments_eigh(test_x, times, regime, covariance)
        mean = mean if batched else mean[0]
        if not self._multi_output:
            mean = mean.squeeze(-1)
        return mean, (None if cov is None else cov if batched else cov[0])

    def _moments_eigh(
        self, test_x: Tensor, times: list[float], regime: str, covariance: str | None
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean (T, m, k), cov (T, m, m) / (T, m) / None)`` from the eigendecomposition of the training kernel."""
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
        n = self.num_train
        for t_value in times:
            g = self._filters(spectrum, t_value)
            means.append(dynamics_v @ (g.unsqueeze(-1) * spectrum.targets))
            if covariance is None:
                continue
            if prior_v is None:
                # G = P: Σ_t = P_tt - G_tx V diag(h) V^T G_xt, h = (1 - e^{-2τλ})/λ
                h = self._filters(spectrum, t_value, factor=2.0)
                explained = (dynamics_v.square() * h).sum(-1)  # the diagonal of the subtracted term, >= 0
                scale = explained
                if covariance == "diag":
                    covs.append(_repair_variances(prior_tt - explained, prior_tt + scale, n))
                    continue
                cov = prior_tt - (dynamics_v * h) @ dynamics_v.mT
            else:
                weighted = dynamics_v * g  # G_tx V diag(g)
                prior_in_basis = cast(Tensor, spectrum.prior_in_basis)  # P differs from G (prior_v is set)
                in_prior = weighted @ prior_in_basis  # G_tx V diag(g) V^T P(X, X) V
                quadratic = (in_prior * weighted).sum(-1)
                crossed = (weighted * prior_v).sum(-1)
                scale = 2 * crossed.abs() + quadratic.abs()
                if covariance == "diag":
                    covs.append(_repair_variances(prior_tt - 2 * crossed + quadratic, prior_tt + scale, n))
                    continue
                cross_term = weighted @ prior_v.mT
                cov = prior_tt - cross_term - cross_term.mT + in_prior @ weighted.mT
            cov = (cov + cov.mT) / 2
            covs.append(_repair_diagonal(cov, prior_tt.diagonal() + scale, n))
        return torch.stack(means), (torch.stack(covs) if covs else None)

    # --- the Lanczos solver -----------------------------------------------------------------
    def _train_products(self, rhs: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, ...]:
        """``K_kind(X, X) @ rhs`` for each kind, by ``train_product`` (counted in ``num_products``)."""
        out = tuple(self._product(rhs, kinds))
        self.num_products += 1
        if len(out) != len(kinds) or any(o.shape != rhs.shape for o in out):
            raise ValueError(
                f"train_product returned shapes {[tuple(o.shape) for o in out]} for kinds {kinds}, "
                f"expected {len(kinds)} of {tuple(rhs.shape)}"
            )
        return out

    def _dynamics_operator(self, regime: str) -> Callable[[Tensor], Tensor]:
        r""":math:`V \mapsto (G(X, X) + \text{diag\_reg}\, I)\, V` for the regime, by products."""
        kind, reg = _REGIME_KERNELS[regime][0], self.diag_reg

        def matmul(rhs: Tensor) -> Tensor:
            (out,) = self._train_products(rhs, (kind,))
            return out + reg * rhs if reg else out

        return matmul

    def _ritz_filters(
        self, times: list[float], combine: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> "_RitzFilter":
        r"""Ritz values :math:`\theta` ``(a, k)`` to ``(T, a, k)``: :math:`g_t(\theta)` per time, or ``combine(θ, g)``.

        Ritz values below ``n·eps·θ_max`` (per tridiagonal) count as zero at every time (a
        pseudo-inverse at :math:`t = \infty`, as for the eigendecomposition; see :func:`_time_filter`).
        """
        return _RitzFilter(
            [t * self._time_scale() for t in times], combine, self.num_train, torch.finfo(self.train_x.dtype).eps
        )

    def _lanczos(
        self,
        matmul: Callable[[Tensor], Tensor],
        start: Tensor,
        functions: MatrixFunction | Sequence[MatrixFunction],
        **options: Any,
    ) -> LanczosRun:
        return lanczos(
            matmul, start, functions, tolerance=self.tolerance, max_iterations=self.max_iterations, **options
        )

    def _moments_lanczos(
        self, test_x: Tensor, times: list[float], regime: str, covariance: str | None
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean (T, m, k), cov (T, m, m) / (T, m) / None)`` by Lanczos (see the module docstring)."""
        if torch.is_grad_enabled() and test_x.requires_grad:
            raise NotImplementedError(
                "gradients with respect to test_x need solver='eigh'; the Lanczos solver computes values only"
            )
        cross, test = self._test_kernels(test_x)
        dynamics, prior = _REGIME_KERNELS[regime]
        same = dynamics == prior  # G = P: one pass; else W = g(G) G(X, X*) by two passes
        with torch.no_grad():
            dynamics_xt = cross.get(dynamics).mT  # G(X, X*), (n, m)
            targets, (n, k), m = self.train_y, self.train_y.shape, dynamics_xt.shape[1]
            matmul = self._dynamics_operator(regime)
            g = self._ritz_filters(times)
            dtype, n_eps = targets.dtype, self.num_train
            if covariance is None:
                run = self._lanczos(matmul, targets, g, left=dynamics_xt)
                g.warn(dtype)
                return run.projections(), None
            itemsize = targets.element_size()
            # G = P, full covariance: G(X*, X) h(G) G(X, X*) from projections if they fit, else pass 2
            projections_fit = m * (k + m) * self.max_iterations * itemsize <= LANCZOS_MEMORY_BYTES
            projected = covariance == "full" and same and projections_fit
            second_pass = not same or (covariance == "full" and not projected)
            h = self._ritz_filters(times, lambda theta, g: 2 * g - theta * g.square())
            prior_tt = test.diagonal(prior) if covariance == "diag" else test.get(prior)
            run = self._lanczos(
                matmul,
                torch.cat([targets, dynamics_xt], dim=-1),
                [g] * k + [h if same else g] * m,
                quadrature=[False] * k + [same and covariance == "diag"] * m,
                # variances P(x, x) - b^T h(G) b converge relative to themselves, not to b^T h(G) b
                reference=torch.cat([targets.new_zeros(k), prior_tt]) if same and covariance == "diag" else None,
                left=dynamics_xt,
                left_columns=range(k + m if projected else k),
                keep_bytes=LANCZOS_MEMORY_BYTES if second_pass else 0,
            )
            g.warn(dtype)
            h.warn(dtype)
            projections = run.projections()  # (T, m, k [+ m])
            mean = projections[..., :k]
            # negative variances: repaired within round-off plus the solver's tolerance (see _repair_variances)
            allowance = self.tolerance
            if same and covariance == "diag":
                explained = run.quadratic_forms()[:, k:]
                return mean, _repair_variances(prior_tt - explained, prior_tt + explained.abs(), n_eps, allowance)
            if same:
                quadratic = projections[..., k:] if projected else dynamics_xt.mT @ run.apply(matmul)[..., k:]
                cov = prior_tt - quadratic
                cov = (cov + cov.mT) / 2
                scale = prior_tt.diagonal() + quadratic.diagonal(dim1=-2, dim2=-1).abs()
                return mean, _repair_diagonal(cov, scale, n_eps, allowance)
            weighted = run.apply(matmul)[..., k:]  # W = g(G) G(X, X*), (T, n, m)
            prior_xt = cross.get(prior).mT  # P(X, X*), (n, m)
            (prior_weighted,) = self._train_products(weighted.movedim(0, -2).reshape(n, -1), (prior,))
            prior_weighted = prior_weighted.reshape(n, len(times), m).movedim(-2, 0)  # P(X, X) W
            crossed = (weighted * prior_xt).sum(-2)
            quadratic = (weighted * prior_weighted).sum(-2)
            prior_diagonal = prior_tt if covariance == "diag" else prior_tt.diagonal()
            scale = prior_diagonal + 2 * crossed.abs() + quadratic.abs()
            if covariance == "diag":
                return mean, _repair_variances(prior_tt - 2 * crossed + quadratic, scale, n_eps, allowance)
            cross_term = weighted.mT @ prior_xt
            cov = prior_tt - cross_term - cross_term.mT + weighted.mT @ prior_weighted
            return mean, _repair_diagonal((cov + cov.mT) / 2, scale, n_eps, allowance)

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
        if not _is_integer(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
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

        With ``solver="lanczos"`` the loss of the mean is a Gauss quadrature
        :math:`\sum_j y_j^\top r_t(G)^2 y_j`, :math:`r_t(\lambda) = 1 - (\lambda - \text{reg})\, g_t(\lambda)`,
        and the trace is a Hutchinson estimate from :data:`TRACE_PROBES` seeded Rademacher probes
        :math:`z` (:math:`z^\top \Sigma_t(X, X) z` by quadrature when :math:`G = P`, by two-pass
        Lanczos and one more product otherwise), with the prior :math:`z^\top P(X, X) z`, whose
        trace is known exactly (the per-point kernel), as a control variate: exact at
        :math:`t = 0`, and otherwise of relative error about
        :math:`\sqrt{2(1 - \rho^2)/\text{probes}}\,\lVert\Sigma_t\rVert_F / \operatorname{tr}\Sigma_t`
        (:math:`\rho`: the correlation of the two quadratic forms over probes).
        """
        regime = _check_regime(regime)
        times, batched = _check_times(t)
        if self.solver == "lanczos":
            lanczos_losses = self._train_loss_lanczos(times, regime, include_variance)
            return lanczos_losses if batched else lanczos_losses[0]
        spectrum = self._spectrum(regime)
        lam = spectrum.eigenvalues
        unregularized = (lam - self.diag_reg).clamp_min(0)  # eigenvalues of G(X, X) itself
        losses: list[Tensor] = []
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
        regime = _check_regime(regime)
        if self.solver == "lanczos":
            if regime not in self._largest:
                with torch.no_grad():
                    self._largest[regime] = largest_eigenvalue(
                        self._dynamics_operator(regime), self.num_train, dtype=self.train_x.dtype,
                        device=self.train_x.device,
                    )
            largest = self._largest[regime]
        else:
            largest = self._spectrum(regime).eigenvalues[-1].item()
        return 2 * self.num_train * self.num_outputs / largest

    def _train_loss_lanczos(self, times: list[float], regime: str, include_variance: bool) -> Tensor:
        """``train_loss`` for each time, ``(T,)``, by Lanczos (see :meth:`train_loss`)."""
        dynamics, prior = _REGIME_KERNELS[regime]
        same, reg = dynamics == prior, self.diag_reg
        targets, (n, k) = self.train_y, self.train_y.shape

        def residual(theta: Tensor, g: Tensor) -> Tensor:  # r = 1 - K g with K = G - reg I
            return 1 - (theta - reg).clamp_min(0) * g

        def variance(theta: Tensor, g: Tensor) -> Tensor:  # Σ_t(X, X) = K - K h(G) K when G = P
            unregularized = (theta - reg).clamp_min(0)
            return unregularized - unregularized.square() * (2 * g - theta * g.square())

        squared = self._ritz_filters(times, lambda theta, g: residual(theta, g).square())
        start, functions, quadrature = targets, [squared] * k, [True] * k
        if include_variance:
            generator = torch.Generator(device="cpu").manual_seed(0)
            probes = torch.randint(0, 2, (n, TRACE_PROBES), generator=generator).to(targets) * 2 - 1
            start = torch.cat([targets, probes], dim=-1)
            functions += [self._ritz_filters(times, variance if same else residual)] * TRACE_PROBES
            quadrature += [same] * TRACE_PROBES
        with torch.no_grad():
            matmul = self._dynamics_operator(regime)
            run = self._lanczos(
                matmul, start, functions, quadrature=quadrature,
                keep_bytes=LANCZOS_MEMORY_BYTES if include_variance and not same else 0,
            )
            for function in {id(f): f for f in functions}.values():
                function.warn(targets.dtype)
            forms = run.quadratic_forms()  # (T, k [+ probes])
            loss = forms[:, :k].sum(-1)
            if include_variance:
                if same:  # z^T Σ_t z by quadrature; z^T K z = |z|^2 (α_0 - reg) from the first step
                    samples = forms[:, k:]
                    controls = run.norms[k:].square() * (run.alpha[0, k:] - reg)
                else:  # z^T R P R z with R = r(G): R z by pass 2, then P [R z, z] in one product
                    fitted = run.apply(matmul)[..., k:]  # (T, n, probes)
                    columns = torch.cat([fitted.movedim(0, -2).reshape(n, -1), probes], dim=-1)
                    (prior_columns,) = self._train_products(columns, (prior,))
                    prior_fitted = prior_columns[:, : -TRACE_PROBES].reshape(n, len(times), TRACE_PROBES).movedim(-2, 0)
                    samples = (fitted * prior_fitted).sum(-2)
                    controls = (probes * prior_columns[:, -TRACE_PROBES:]).sum(-2)
                trace = _control_variate_mean(samples, controls, self._train_kernels_cache.diagonal(prior).sum())
                loss = loss + k * trace
        return loss.clamp_min(0) / (2 * n * k)

    def __repr__(self) -> str:
        return (
            f"TrainedEnsemble({self._net!r}, n={self.num_train}, k={self.num_outputs}, "
            f"learning_rate={self.learning_rate}, diag_reg={self.diag_reg}, solver={self.solver!r})"
        )


class _RitzFilter:
    """A :data:`~gpntk.lanczos.MatrixFunction` of the training times that remembers Ritz values it treated as zero.

    Once a Ritz value falls below the cutoff it stays below (the smallest Ritz value decreases
    with the steps and the cutoff grows with the largest), so what the last evaluations dropped
    is what the results dropped; :meth:`warn` reports it like the eigendecomposition does.
    """

    def __init__(
        self, taus: list[float], combine: Callable[[Tensor, Tensor], Tensor] | None, n: int, eps: float
    ) -> None:
        self.taus, self.combine, self.n, self.eps = taus, combine, n, eps
        self.dropped, self.size, self.cutoff = 0, 0, 0.0

    def __call__(self, theta: Tensor) -> Tensor:
        cutoff: Tensor | float
        if theta.shape[-1]:
            cutoff = self.n * self.eps * theta.amax(-1, keepdim=True)
            small = theta <= cutoff
            dropped = int(small.sum(-1).max())
            if dropped:
                self.dropped = max(self.dropped, dropped)
                self.size = max(self.size, theta.shape[-1])
                self.cutoff = max(self.cutoff, float(cutoff[small.any(-1)].max()))
        else:
            cutoff = 0.0
        rows = []
        for tau in self.taus:
            g = _time_filter(theta, tau, cutoff)
            rows.append(g if self.combine is None else self.combine(theta, g))
        return torch.stack(rows)

    def warn(self, dtype: torch.dtype) -> None:
        """Warn (:func:`_warn_dropped`, longest time) if Ritz values were treated as zero where it could matter."""
        _warn_dropped(self.dropped, self.size, self.cutoff, max(self.taus), dtype)


def _control_variate_mean(samples: Tensor, controls: Tensor, control_mean: Tensor) -> Tensor:
    r"""The mean of ``samples`` ``(T, p)`` with ``controls`` ``(p,)`` of known mean as a control variate, ``(T,)``.

    :math:`\bar a - c\,(\bar b - \mathbb E b)` with
    :math:`c = \widehat{\operatorname{cov}}(a, b) / \widehat{\operatorname{var}}(b)`.
    """
    centred = controls - controls.mean()
    variance = centred.square().sum()
    if variance <= 0:
        return samples.mean(-1)
    slope = ((samples - samples.mean(-1, keepdim=True)) * centred).sum(-1) / variance
    return samples.mean(-1) - slope * (controls.mean() - control_mean)


def _time_filter(lam: Tensor, tau: float, cutoff: float | Tensor) -> Tensor:
    r""":math:`g = (1 - e^{-\tau\lambda})/\lambda = \tau\,\varphi_1(\tau\lambda)` elementwise (``expm1``: exact near 0).

    At :math:`\tau = \infty`, :math:`1/\lambda`. Eigenvalues :math:`\lambda \le` ``cutoff`` count
    as exactly zero *at every time*, and their directions are never fitted (:math:`g = 0`), as
    at :math:`t = \infty` (a pseudo-inverse): such an eigenvalue is indistinguishable from
    round-off, and for a PSD kernel a zero eigenvector :math:`v` has :math:`G(x, X)\, v = 0`, so
    the exact contribution :math:`G(x, X)\, v\, \tau\, v^\top Y` is zero while the computed one is
    round-off times :math:`\tau` (unbounded as :math:`t` grows). With this convention
    :math:`0 \le \lambda g \le 1` and :math:`g` increases with :math:`t` to its value at
    :math:`t = \infty`, so every spectral component of the mean approaches its limit
    monotonically.
    """
    small = lam <= cutoff
    if math.isinf(tau):
        return torch.where(small, torch.zeros_like(lam), 1 / torch.where(small, torch.ones_like(lam), lam))
    z = tau * lam
    # τ·φ1(z) with φ1(z) = (1 - e^{-z}) / z (z > 0 wherever λ is above the cutoff, unless τ = 0: φ1(0) = 1)
    positive = z > 0
    phi1 = torch.where(positive, -torch.expm1(-z) / torch.where(positive, z, torch.ones_like(z)), torch.ones_like(z))
    return torch.where(small, torch.zeros_like(lam), tau * phi1)


#: at a finite time, directions with eigenvalues below the cutoff are dropped silently while they could have
#: been fitted by at most this fraction, 1 - exp(-τ·cutoff) (relative to the dtype's sqrt(eps)); beyond, a warning
DROPPED_FIT_WARNING = 1.0


def _warn_dropped(count: int, total: int, cutoff: float, tau: float, dtype: torch.dtype) -> None:
    r"""Warn that ``count`` eigen- (or Ritz) values at most ``cutoff`` were treated as zero, where that could matter.

    At :math:`t = \infty` always (a pseudo-inverse). At a finite time only when such a direction
    could have been fitted by more than :math:`\sqrt{\varepsilon}` (:data:`DROPPED_FIT_WARNING`
    times it): :math:`1 - e^{-\tau \cdot \text{cutoff}}`; below, the exact contribution of the
    dropped directions is smaller than that fraction of the targets' component in them.
    """
    if count == 0:
        return
    if math.isinf(tau):
        warnings.warn(
            f"the training kernel is numerically singular ({count} of {total} eigenvalues below "
            f"{cutoff:.3g}); at t = inf those directions are never fitted (pseudo-inverse); consider diag_reg > 0",
            NumericalWarning,
            stacklevel=5,
        )
    elif -math.expm1(-tau * cutoff) > DROPPED_FIT_WARNING * math.sqrt(torch.finfo(dtype).eps):
        warnings.warn(
            f"the training kernel is numerically singular ({count} of {total} eigenvalues below {cutoff:.3g}, "
            f"indistinguishable from round-off); those directions are treated as exactly zero and never fitted, "
            f"although at this time (tau * cutoff = {tau * cutoff:.3g}) a true eigenvalue that small could have "
            "been partly fitted; consider diag_reg > 0 or float64",
            NumericalWarning,
            stacklevel=5,
        )


#: a negative variance of size at most VARIANCE_ROUNDING * n * eps * (the sum of the magnitudes of the terms it
#: is computed from) is round-off and set to zero silently; a larger one is set to zero with a NumericalWarning
VARIANCE_ROUNDING = 10.0


def _repair_variances(variances: Tensor, scale: Tensor, n: int, allowance: float = 0.0) -> Tensor:
    r"""Negative ``variances`` set to zero; a :class:`NumericalWarning` when one is beyond round-off.

    A variance :math:`P(x, x) - q` is a difference of non-negative terms whose magnitudes sum to
    ``scale``; its round-off is bounded by :data:`VARIANCE_ROUNDING` :math:`\cdot n \varepsilon`
    ``scale`` (plus ``allowance`` ``scale``: the Lanczos solver's tolerance). Negative values
    within that bound are set to zero silently, larger ones too but with a warning (the result
    lost precision: an ill-conditioned training kernel, float32, or an unconverged solver).
    """
    eps = torch.finfo(variances.dtype).eps
    bound = (VARIANCE_ROUNDING * n * eps + allowance) * scale.detach().abs()
    worst = (-variances.detach() - bound).max() if variances.numel() else None
    if worst is not None and worst > 0:
        ratio = (-variances.detach() / scale.detach().abs().clamp_min(torch.finfo(variances.dtype).tiny)).max()
        warnings.warn(
            f"{int((variances.detach() < -bound).sum())} posterior variances were negative beyond round-off "
            f"(down to {variances.detach().min().item():.3g}, {ratio.item():.2g} of the terms they are computed "
            f"from; the bound is {VARIANCE_ROUNDING * n * eps + allowance:.2g}) and were set to zero: the training "
            "kernel is ill-conditioned for this dtype; consider diag_reg > 0 or float64",
            NumericalWarning,
            stacklevel=5,
        )
    return variances.clamp_min(0)


def _repair_diagonal(cov: Tensor, scale: Tensor, n: int, allowance: float = 0.0) -> Tensor:
    """``cov`` ``(m, m)`` with its diagonal repaired by :func:`_repair_variances`."""
    diagonal = cov.diagonal(dim1=-2, dim2=-1)
    repaired = _repair_variances(diagonal, scale, n, allowance)
    return cov + torch.diag_embed(repaired - diagonal)


def _snapshot(net: Layer, like: Tensor) -> tuple[Layer, dict[str, Tensor]]:
    """A frozen deep copy of ``net`` and its hyperparameter values (detached copies in the dtype of ``like``).

    Networks with batched hyperparameters (a batch shape before the trailing ``(1, 1)``) are
    refused.
    """
    for layer in parameterized_layers(net):
        for name in layer.hyperparameter_names:
            value = layer.hyperparameter(name)
            if value.dim() > 2 or value.numel() != 1:
                raise ValueError(
                    f"TrainedEnsemble needs one value per hyperparameter, but {layer.name}.{name} has shape "
                    f"{tuple(value.shape)} (a batch of hyperparameters, e.g. after NTKKernel(net, batch_shape=...)); "
                    "build one ensemble per batch element from a network with unbatched hyperparameters"
                )
    try:
        frozen = copy.deepcopy(net)
    except Exception as error:  # pragma: no cover - every gpntk layer can be copied
        raise TypeError(f"TrainedEnsemble keeps a copy of the network, but it cannot be copied: {error}") from error
    frozen.requires_grad_(False)
    hyper = {name: value.detach().clone() for name, value in Hyperparameters.collect(frozen, like=like).items()}
    return frozen, hyper


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype, device and values."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b.detach()))


def _is_real_number(value: object) -> bool:
    """A real number: Python or NumPy (not bool), or a one-element real tensor."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def _is_integer(value: object) -> bool:
    """An integer: Python or NumPy (not bool)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Integral)


def _check_positive_number(name: str, value: Any) -> float:
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def _check_diag_reg(diag_reg: Any) -> float:
    if not _is_real_number(diag_reg):
        raise TypeError(f"diag_reg must be a number, got {type(diag_reg).__name__}")
    diag_reg = float(diag_reg)
    if not math.isfinite(diag_reg) or diag_reg < 0:
        raise ValueError(f"diag_reg must be non-negative and finite, got {diag_reg}")
    return diag_reg


def _check_regime(regime: str) -> Regime:
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    return cast(Regime, regime)


def _check_times(t: Any) -> tuple[list[float], bool]:
    """The times as floats and whether they were a 1-D tensor or array (a batch).

    ``t`` is a real number (Python or NumPy, ``math.inf``), or a 1-D tensor or NumPy array of them
    (a 0-d one counts as a number).
    """
    if isinstance(t, np.ndarray):
        if t.dtype.kind not in "iuf":
            raise TypeError(f"t must hold real numbers, got a NumPy array of dtype {t.dtype}")
        t = torch.from_numpy(np.asarray(t, dtype=np.float64))
    if torch.is_tensor(t):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold real numbers, got a tensor of dtype {t.dtype}")
        if t.dim() > 1:
            raise ValueError(f"t must be a number or a 1-D tensor of times, got shape {tuple(t.shape)}")
        batched = t.dim() == 1
        values = [float(v) for v in t.detach().reshape(-1).tolist()]
        if batched and not values:
            raise ValueError("t is an empty tensor of times")
    else:
        if not _is_real_number(t):
            raise TypeError(
                f"t must be a number, math.inf or a 1-D tensor of times, got {t!r} ({type(t).__name__})"
            )
        values = [float(t)]
        batched = False
    for value in values:
        if math.isnan(value) or value < 0:
            raise ValueError(f"training time t must be >= 0 (or math.inf), got {value}")
    return values, batched
