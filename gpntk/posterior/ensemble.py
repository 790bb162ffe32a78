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
* ``"nngp"``: only the readout trained, :math:`G = P = \Sigma` (NTK parameterization only: refused
  for networks with standard-parameterized layers, whose readout has another tangent kernel);
* ``"ntkgp"``: the NTK-GP of He, Lakshminarayanan & Teh (2020), ensembles trained with an added
  random function, :math:`G = P = \Theta`; at :math:`t = \infty` it is the exact GP posterior with
  the NTK as prior covariance.

When :math:`G = P` the covariance simplifies to
:math:`P(x, x') - G(x, X) G^{-1}(I - e^{-2\tau G}) G(X, x')`. As :math:`t \to \infty` the mean is
ridgeless kernel regression and the variance vanishes at the training inputs.

``diag_reg`` is absolute and is added to the training kernel that drives the dynamics
(:math:`G(X, X) + \text{diag\_reg}\, I`) and, where the prior is that same kernel, to
:math:`P(X, X)` too (the conventions of Neural Tangents' ``gradient_descent_mse_ensemble``).

:class:`TrainedEnsemble` is a façade: it checks the arguments (:mod:`~gpntk.posterior.arguments`,
:mod:`gpntk._validation`), takes the snapshot (:mod:`~gpntk.posterior.snapshot`), keeps the test
kernels (:mod:`~gpntk.posterior.kernel_cache`), and hands the linear algebra to a solver
(:class:`~gpntk.posterior.solver.PosteriorSolver`): :mod:`~gpntk.posterior.eigh` (an
eigendecomposition of the training kernel) or :mod:`~gpntk.posterior.krylov` (Lanczos, the
default above :data:`~gpntk.posterior.EIGH_MAX_TRAIN` training points, the training kernel
touched only through products). Both filter the spectrum with
:func:`~gpntk.posterior.time_filter.time_filter`: eigenvalues below ``n·eps·λ_max`` (Ritz values
below ``n·eps·θ_max`` with Lanczos) are indistinguishable from round-off and treated as exactly
zero at *every* time, as by the pseudo-inverse at :math:`t = \infty`: for a PSD kernel their
exact contribution vanishes, while the computed one would be round-off times :math:`\tau`. So
the mean approaches its limit monotonically in every eigendirection, for singular kernels in
float32 as in float64. A warning says when that could matter
(:func:`~gpntk.posterior.time_filter.warn_dropped`). Variances, differences of non-negative
terms, are set to zero where round-off makes them negative, with a warning beyond
:data:`~gpntk.posterior.variance.VARIANCE_ROUNDING`
(:func:`~gpntk.posterior.variance.repair_variances`).
"""

from __future__ import annotations

import copy
from typing import Literal, cast

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator, IdentityLinearOperator, KroneckerProductLinearOperator
from torch import Tensor

from .._validation import non_negative_number, positive_integer, positive_number, training_times
from ..core.graph_inputs import GraphFormat
from ..core.layer import InputShape, Layer
from .arguments import (
    as_points,
    check_architecture,
    check_regime,
    check_solver_options,
    check_targets,
    check_test_inputs,
)
from .eigh import EighSolver
from .kernel_cache import KernelCache, TestKernelCache
from .krylov import KrylovSolver
from .snapshot import EnsembleSnapshot
from .solver import (
    REGIME_KERNELS,
    Covariance,
    PosteriorSolver,
    Regime,
    Solver,
    SolverName,
    TrainingProblem,
    TrainProduct,
    resolve_solver,
)

__all__ = ["TrainedEnsemble"]


def make_solver(
    name: SolverName, problem: TrainingProblem, tolerance: float, max_iterations: int, product: TrainProduct | None
) -> PosteriorSolver:
    """The solver object for a resolved ``solver`` name (the only place the name is looked at)."""
    if name == "lanczos":
        return KrylovSolver(problem, tolerance, max_iterations, product)
    return EighSolver(problem)


class TrainedEnsemble:
    r"""The posterior of an ensemble of infinitely wide networks trained by gradient descent for time t.

    :param net: the architecture; the ensemble keeps a snapshot of it (see below).
    :param train_x: training inputs ``(n, d)`` (copied); a 1-D tensor ``(n,)`` holds ``n``
        one-feature points, ``(n, 1)``, as for GPyTorch kernels (the same for every ``test_x``).
    :param train_y: real training targets ``(n,)`` or ``(n, k)`` (copied).
    :param learning_rate: :math:`\eta` of the gradient descent the time is counted in.
    :param diag_reg: absolute ridge added to the training kernel (0 for ridgeless).
    :param input_shape: ``(C, W)`` or ``(C, H, W)`` for spatial architectures (rows of the inputs
        hold channels-first tensors), or a graph format (:class:`~gpntk.GraphInputs`: rows are
        padded graphs; :class:`~gpntk.GraphDataset`: rows are indices of registered graphs;
        :class:`~gpntk.NodeGraph`: rows are node indices of one graph, a transductive node-level
        posterior), as for :class:`~gpntk.NTKKernel`.
    :param solver: ``"eigh"`` (an eigendecomposition of the :math:`n \times n` training kernel),
        ``"lanczos"`` (matrix functions applied to vectors, the kernel never formed; see
        :mod:`~gpntk.posterior.krylov`) or ``"auto"``: eigh up to :data:`EIGH_MAX_TRAIN` training
        points, Lanczos above. The chosen one is ``self.solver``.
    :param tolerance: Lanczos: stop when the estimated relative error of every result is at most
        this (:func:`gpntk.posterior.lanczos.lanczos`: the change between checks five steps apart,
        enlarged when convergence is slow); means are judged as vectors over the test points, variances
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
        input_shape: InputShape = None,
        solver: Solver = "auto",
        tolerance: float = 1e-8,
        max_iterations: int = 1000,
        train_product: TrainProduct | None = None,
    ):
        train_x = as_points(train_x)
        shape = check_architecture(net, train_x, input_shape)
        check_targets(train_y, train_x.shape[0])
        learning_rate = positive_number("learning_rate", learning_rate)
        diag_reg = non_negative_number("diag_reg", diag_reg)
        self._tolerance, self._max_iterations = check_solver_options(solver, tolerance, max_iterations, train_product)
        # the snapshot: a frozen copy of the architecture, its hyperparameter values, the data
        snapshot = EnsembleSnapshot.take(net, train_x, train_y, shape)
        problem = TrainingProblem(snapshot, learning_rate, diag_reg, KernelCache(snapshot, snapshot.train_x, None))
        name = resolve_solver(solver, snapshot.num_train)
        self._solver = make_solver(name, problem, self._tolerance, self._max_iterations, train_product)
        self._test_kernels = TestKernelCache(snapshot)

    # --- the snapshot and the settings ------------------------------------------------------------
    @property
    def _snapshot(self) -> EnsembleSnapshot:
        return self._solver.problem.snapshot

    @property
    def net(self) -> Layer:
        """A copy of the architecture this ensemble was built with, hyperparameters as at construction.

        A fresh copy on every access: editing it does not change the ensemble (build a new one).
        """
        return copy.deepcopy(self._snapshot.net)

    @property
    def hyperparameters(self) -> dict[str, Tensor]:
        """Copies of the hyperparameter values the ensemble uses, keyed as in ``Hyperparameters``."""
        return {name: value.clone() for name, value in self._snapshot.hyper.items()}

    @property
    def train_x(self) -> Tensor:
        """The training inputs ``(n, d)`` (the ensemble's copy)."""
        return self._snapshot.train_x

    @property
    def train_y(self) -> Tensor:
        """The training targets as ``(n, k)`` (1-D targets get a trailing dimension; the ensemble's copy)."""
        return self._snapshot.train_y

    @property
    def input_shape(self) -> tuple[int, ...] | GraphFormat | None:
        return self._snapshot.input_shape

    @property
    def learning_rate(self) -> float:
        r""":math:`\eta`. Settable: only the time scale depends on it, nothing cached needs recomputing."""
        return self._solver.problem.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self._solver.problem = self._solver.problem.with_learning_rate(positive_number("learning_rate", value))

    @property
    def diag_reg(self) -> float:
        """The ridge added to the training kernel (see :meth:`with_diag_reg` for another one)."""
        return self._solver.problem.diag_reg

    @property
    def solver(self) -> Literal["eigh", "lanczos"]:
        """The solver in use, ``"eigh"`` or ``"lanczos"`` (``"auto"`` resolved at construction)."""
        return self._solver.name

    @property
    def tolerance(self) -> float:
        """The Lanczos solver's relative tolerance (as given; fixed at construction)."""
        return self._tolerance

    @property
    def max_iterations(self) -> int:
        """The Lanczos solver's limit on products per solve (as given; fixed at construction)."""
        return self._max_iterations

    @property
    def num_products(self) -> int:
        """Products with the training kernel so far (Lanczos solver), each a pass over its n^2 entries."""
        return self._solver.num_products

    @property
    def num_train(self) -> int:
        return self._snapshot.num_train

    @property
    def num_outputs(self) -> int:
        return self._snapshot.num_outputs

    def with_diag_reg(self, diag_reg: float) -> "TrainedEnsemble":
        r"""The same ensemble with the ridge ``diag_reg`` instead, reusing every kernel matrix and eigendecomposition.

        :math:`G + r' I = V (\Lambda + (r' - r) I) V^\top`: the eigenvectors do not depend on the
        ridge, so with ``solver="eigh"`` the new ensemble shifts the eigenvalues of the
        decompositions already computed (and shares the training and test kernels), which makes
        choosing ``diag_reg`` on validation data as cheap as choosing ``t``. With the Lanczos solver
        nothing is stored to reuse; the result is a new ensemble with the same settings. ``self``
        is unchanged.
        """
        diag_reg = non_negative_number("diag_reg", diag_reg)
        other = copy.copy(self)
        other._solver = self._solver.with_diag_reg(self._solver.problem.with_diag_reg(diag_reg))
        other._test_kernels = self._test_kernels.copy()
        return other

    def _prepare(self, test_x: Tensor, regime: str) -> None:
        """Compute (and cache) every kernel matrix ``moments(test_x, t, regime)`` needs (for timing)."""
        self._solver.prepare(regime)
        cross, test = self._test_kernels.kernels(as_points(test_x).to(self.train_x))
        dynamics, prior = REGIME_KERNELS[regime]
        cross.get(dynamics), cross.get(prior), test.get(prior)

    # --- the posterior ----------------------------------------------------------------------------
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
        self, test_x: Tensor, t: float | Tensor, regime: str, covariance: Covariance
    ) -> tuple[Tensor, Tensor | None]:
        """Checks, then the solver's ``(mean (T, m, k), cov)``, shaped as the arguments ask."""
        regime = check_regime(regime, self._snapshot.net)
        times, batched = training_times(t)
        test_x = as_points(test_x)
        check_test_inputs(test_x, self.train_x.shape[-1], self.input_shape)
        test_x = test_x.to(self.train_x)
        cross, test = self._test_kernels.kernels(test_x)
        mean, cov = self._solver.moments(test_x, cross, test, times, regime, covariance)
        mean = mean if batched else mean[0]
        if not self._snapshot.multi_output:
            mean = mean.squeeze(-1)
        return mean, (None if cov is None else cov if batched else cov[0])

    def __call__(
        self, test_x: Tensor, t: float | Tensor, regime: Regime = "ntk"
    ) -> MultivariateNormal | MultitaskMultivariateNormal:
        """The ensemble's outputs at ``test_x`` after time ``t`` as a GPyTorch distribution."""
        mean, cov = self.moments(test_x, t, regime)
        if not self._snapshot.multi_output:
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
        n = positive_integer("n", n)
        mean, cov = self.moments(test_x, t, regime)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        root = eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)  # (..., m, m)
        m = cov.shape[-1]
        k = self.num_outputs
        shape = (n, *cov.shape[:-2], m, k)
        noise = torch.randn(shape, generator=generator, dtype=cov.dtype, device=cov.device)
        draws = root @ noise  # (n, ..., m, k)
        if not self._snapshot.multi_output:
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
        regime = check_regime(regime, self._snapshot.net)
        times, batched = training_times(t)
        losses = self._solver.train_loss(times, regime, include_variance)
        return losses if batched else losses[0]

    def max_learning_rate(self, regime: Regime = "ntk") -> float:
        r"""The largest stable learning rate of discrete gradient descent, :math:`2nk/\lambda_{\max}(G)`.

        Full-batch gradient descent on :math:`\frac{1}{2nk}\lVert f - Y\rVert^2` of the linearised
        network multiplies the residual by :math:`I - \eta G/(nk)` per step, which converges iff
        :math:`\eta < 2nk/\lambda_{\max}`.
        """
        regime = check_regime(regime, self._snapshot.net)
        return 2 * self.num_train * self.num_outputs / self._solver.largest_eigenvalue(regime)

    def __repr__(self) -> str:
        return (
            f"TrainedEnsemble({self._snapshot.net!r}, n={self.num_train}, k={self.num_outputs}, "
            f"learning_rate={self.learning_rate}, diag_reg={self.diag_reg}, solver={self.solver!r})"
        )
