r"""The Lanczos (Krylov) solver: ``solver="lanczos"``, the training kernel touched only through products.

The :math:`n \times n` training kernel is never formed, only products :math:`G(X, X)\, V`
computed block by block (an injectable :data:`~gpntk.posterior.TrainProduct`, by default
:class:`~gpntk.posterior.kernel_cache.BlockwiseProduct`), each a pass over the :math:`n^2`
pairs, which is the cost. Every quantity is a matrix function of :math:`G` between vectors, for
the filters :math:`g_t(\lambda) = (1 - e^{-\tau\lambda})/\lambda` and
:math:`h_t = 2 g_t - \lambda g_t^2 = (1 - e^{-2\tau\lambda})/\lambda`
(:func:`gpntk.posterior.lanczos.lanczos`):

* the mean :math:`\mu_t = G(X_*, X)\, g_t(G)\, Y`: Lanczos from the columns of :math:`Y`,
  with :math:`G(X_*, X)\, q_j` accumulated on the way (one pass);
* when :math:`G = P`, the variances :math:`P(x, x) - b_x^\top h_t(G)\, b_x` with
  :math:`b_x = G(X, x)` by Gauss quadrature, and the covariance
  :math:`P(X_*, X_*) - G(X_*, X)\, h_t(G)\, G(X, X_*)` from the same projections (one pass);
* when :math:`G \ne P` (``"ntk"``), :math:`W = g_t(G)\, G(X, X_*)` (two-pass Lanczos) and one
  more product :math:`P(X, X)\, W`:
  :math:`\Sigma_t = P_{**} - W^\top P(X, X_*) - P(X_*, X) W + W^\top P(X, X) W`.

All columns (targets and test points) share one Lanczos run, one product with an ``(n, k + m)``
block per step, and all times come from it (the tridiagonals do not depend on :math:`t`). Memory:
:math:`O(n (k + m))` numbers times a small constant, plus at most :data:`LANCZOS_MEMORY_BYTES` of
stored Lanczos vectors or projections.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from ..kernels.dense import Output
from .kernel_cache import BlockwiseProduct, KernelCache
from .lanczos import LanczosRun, MatMul, MatrixFunction, lanczos, largest_eigenvalue
from .solver import REGIME_KERNELS, Covariance, TrainingProblem, TrainProduct
from .time_filter import RitzFilter
from .variance import repair_diagonal, repair_variances

__all__ = ["KrylovSolver", "LANCZOS_MEMORY_BYTES", "TRACE_PROBES", "control_variate_mean"]

#: memory (bytes) the Lanczos solver may spend beyond its O(n (k + m)) working blocks: Lanczos vectors
#: kept for pass 2 (fewer replayed products), or the projections a full covariance is assembled from
LANCZOS_MEMORY_BYTES = 2**30
#: Rademacher probes of the Hutchinson estimate of tr Sigma_t(X, X) in ``train_loss`` (Lanczos solver)
TRACE_PROBES = 64


def _h_filter(theta: Tensor, g: Tensor) -> Tensor:
    r""":math:`h_t = 2 g_t - \theta g_t^2 = (1 - e^{-2\tau\theta})/\theta` from :math:`g_t`."""
    return 2 * g - theta * g.square()


class KrylovSolver:
    """The posterior by Lanczos on products with the training kernel (see the module docstring).

    ``tolerance`` and ``max_iterations`` are those of :func:`~gpntk.posterior.lanczos.lanczos`;
    ``product`` computes the products (default :class:`~gpntk.posterior.kernel_cache.BlockwiseProduct`).
    """

    name: Literal["lanczos"] = "lanczos"

    def __init__(
        self, problem: TrainingProblem, tolerance: float, max_iterations: int, product: TrainProduct | None = None
    ):
        self.problem, self.tolerance, self.max_iterations = problem, tolerance, max_iterations
        self.product: TrainProduct = BlockwiseProduct(problem.snapshot) if product is None else product
        #: products with the training kernel so far, each a pass over its n^2 entries
        self.num_products = 0
        self.largest: dict[str, float] = {}

    def prepare(self, regime: str) -> None:
        """Nothing to precompute: the training kernel is never formed."""

    def with_diag_reg(self, problem: TrainingProblem) -> KrylovSolver:
        """Nothing is stored to reuse: a new solver with the same settings and product."""
        return KrylovSolver(problem, self.tolerance, self.max_iterations, self.product)

    # --- products and filters -------------------------------------------------------------------
    def train_products(self, rhs: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, ...]:
        """``K_kind(X, X) @ rhs`` for each kind, by the product (counted in ``num_products``)."""
        out = tuple(self.product(rhs, kinds))
        self.num_products += 1
        if len(out) != len(kinds) or any(o.shape != rhs.shape for o in out):
            raise ValueError(
                f"train_product returned shapes {[tuple(o.shape) for o in out]} for kinds {kinds}, "
                f"expected {len(kinds)} of {tuple(rhs.shape)}"
            )
        return out

    def dynamics_operator(self, regime: str) -> MatMul:
        r""":math:`V \mapsto (G(X, X) + \text{diag\_reg}\, I)\, V` for the regime, by products."""
        kind, reg = REGIME_KERNELS[regime][0], self.problem.diag_reg

        def matmul(rhs: Tensor) -> Tensor:
            (out,) = self.train_products(rhs, (kind,))
            return out + reg * rhs if reg else out

        return matmul

    def ritz_filters(self, times: list[float], combine: Callable[[Tensor, Tensor], Tensor] | None = None) -> RitzFilter:
        r"""Ritz values :math:`\theta` ``(a, k)`` to ``(T, a, k)``: :math:`g_t(\theta)` per time, or ``combine``."""
        problem = self.problem
        eps = torch.finfo(problem.snapshot.train_x.dtype).eps
        return RitzFilter([t * problem.time_scale() for t in times], combine, problem.num_train, eps)

    def run(
        self, matmul: MatMul, start: Tensor, functions: MatrixFunction | Sequence[MatrixFunction], **options: Any
    ) -> LanczosRun:
        """:func:`~gpntk.posterior.lanczos.lanczos` with the solver's tolerance and iteration limit."""
        return lanczos(
            matmul, start, functions, tolerance=self.tolerance, max_iterations=self.max_iterations, **options
        )

    def largest_eigenvalue(self, regime: str) -> float:
        if regime not in self.largest:
            train_x = self.problem.snapshot.train_x
            with torch.no_grad():
                self.largest[regime] = largest_eigenvalue(
                    self.dynamics_operator(regime), self.problem.num_train, dtype=train_x.dtype, device=train_x.device,
                )
        return self.largest[regime]

    # --- moments --------------------------------------------------------------------------------
    def moments(
        self, test_x: Tensor, cross: KernelCache, test: KernelCache, times: list[float], regime: str,
        covariance: Covariance,
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean (T, m, k), cov (T, m, m) / (T, m) / None)`` by Lanczos (see the module docstring)."""
        if torch.is_grad_enabled() and test_x.requires_grad:
            raise NotImplementedError(
                "gradients with respect to test_x need solver='eigh'; the Lanczos solver computes values only"
            )
        dynamics, prior = REGIME_KERNELS[regime]
        with torch.no_grad():
            dynamics_xt = cross.get(dynamics).mT  # G(X, X*), (n, m)
            matmul = self.dynamics_operator(regime)
            g = self.ritz_filters(times)
            if covariance is None:
                run = self.run(matmul, self.problem.train_y, g, left=dynamics_xt)
                g.warn(self.problem.train_y.dtype)
                return run.projections(), None
            prior_tt = test.diagonal(prior) if covariance == "diag" else test.get(prior)
            if dynamics == prior:  # G = P: one pass
                mean, values, scale = self._shared_kernel_moments(matmul, dynamics_xt, prior_tt, g, times, covariance)
            else:  # W = g(G) G(X, X*) by two passes
                mean, values, scale = self._distinct_kernel_moments(
                    matmul, dynamics_xt, cross, prior_tt, g, times, prior
                )
            # negative variances: repaired within round-off plus the solver's tolerance (see repair_variances)
            n, allowance = self.problem.num_train, self.tolerance
            if covariance == "diag":
                return mean, repair_variances(values, scale, n, allowance)
            return mean, repair_diagonal(values, scale, n, allowance)

    def _shared_kernel_moments(
        self, matmul: MatMul, dynamics_xt: Tensor, prior_tt: Tensor, g: RitzFilter, times: list[float],
        covariance: Literal["full", "diag"],
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""When :math:`G = P`: the mean, :math:`P_{**} - G_{*X} h_t(G) G_{X*}` (or its diagonal) and its scale.

        Variances by Gauss quadrature; a full covariance from projections if they fit in
        :data:`LANCZOS_MEMORY_BYTES`, else by pass 2.
        """
        targets, (_, k), m = self.problem.train_y, self.problem.train_y.shape, dynamics_xt.shape[1]
        diag = covariance == "diag"
        projections_fit = m * (k + m) * self.max_iterations * targets.element_size() <= LANCZOS_MEMORY_BYTES
        projected = not diag and projections_fit
        h = self.ritz_filters(times, _h_filter)
        run = self.run(
            matmul,
            torch.cat([targets, dynamics_xt], dim=-1),
            [g] * k + [h] * m,
            quadrature=[False] * k + [diag] * m,
            # variances P(x, x) - b^T h(G) b converge relative to themselves, not to b^T h(G) b
            reference=torch.cat([targets.new_zeros(k), prior_tt]) if diag else None,
            left=dynamics_xt,
            left_columns=range(k + m if projected else k),
            keep_bytes=LANCZOS_MEMORY_BYTES if not diag and not projected else 0,
        )
        g.warn(targets.dtype)
        h.warn(targets.dtype)
        projections = run.projections()  # (T, m, k [+ m])
        mean = projections[..., :k]
        if diag:
            explained = run.quadratic_forms()[:, k:]
            return mean, prior_tt - explained, prior_tt + explained.abs()
        quadratic = projections[..., k:] if projected else dynamics_xt.mT @ run.apply(matmul)[..., k:]
        cov = prior_tt - quadratic
        scale = prior_tt.diagonal() + quadratic.diagonal(dim1=-2, dim2=-1).abs()
        return mean, (cov + cov.mT) / 2, scale

    def _distinct_kernel_moments(
        self, matmul: MatMul, dynamics_xt: Tensor, cross: KernelCache, prior_tt: Tensor, g: RitzFilter,
        times: list[float], prior: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""When :math:`G \ne P`: the mean, :math:`\Sigma_t` (or its diagonal, for ``(m,)`` ``prior_tt``) and its scale.

        :math:`W = g_t(G)\, G(X, X_*)` by two-pass Lanczos, then one product :math:`P(X, X)\, W`.
        """
        targets, (n, k), m = self.problem.train_y, self.problem.train_y.shape, dynamics_xt.shape[1]
        run = self.run(
            matmul, torch.cat([targets, dynamics_xt], dim=-1), [g] * (k + m), quadrature=[False] * (k + m),
            reference=None, left=dynamics_xt, left_columns=range(k), keep_bytes=LANCZOS_MEMORY_BYTES,
        )
        g.warn(targets.dtype)
        mean = run.projections()[..., :k]  # (T, m, k)
        weighted = run.apply(matmul)[..., k:]  # W = g(G) G(X, X*), (T, n, m)
        prior_xt = cross.get(prior).mT  # P(X, X*), (n, m)
        (prior_weighted,) = self.train_products(weighted.movedim(0, -2).reshape(n, -1), (prior,))
        prior_weighted = prior_weighted.reshape(n, len(times), m).movedim(-2, 0)  # P(X, X) W
        crossed = (weighted * prior_xt).sum(-2)
        quadratic = (weighted * prior_weighted).sum(-2)
        diag = prior_tt.dim() == 1
        scale = (prior_tt if diag else prior_tt.diagonal()) + 2 * crossed.abs() + quadratic.abs()
        if diag:
            return mean, prior_tt - 2 * crossed + quadratic, scale
        cross_term = weighted.mT @ prior_xt
        cov = prior_tt - cross_term - cross_term.mT + weighted.mT @ prior_weighted
        return mean, (cov + cov.mT) / 2, scale

    # --- training loss --------------------------------------------------------------------------
    def train_loss(self, times: list[float], regime: str, include_variance: bool) -> Tensor:
        """``train_loss`` for each time, ``(T,)``, by Lanczos (see ``TrainedEnsemble.train_loss``)."""
        dynamics, prior = REGIME_KERNELS[regime]
        same, reg = dynamics == prior, self.problem.diag_reg
        targets, (n, k) = self.problem.train_y, self.problem.train_y.shape

        def residual(theta: Tensor, g: Tensor) -> Tensor:  # r = 1 - K g with K = G - reg I
            return 1 - (theta - reg).clamp_min(0) * g

        def variance(theta: Tensor, g: Tensor) -> Tensor:  # Σ_t(X, X) = K - K h(G) K when G = P
            unregularized = (theta - reg).clamp_min(0)
            return unregularized - unregularized.square() * (2 * g - theta * g.square())

        squared = self.ritz_filters(times, lambda theta, g: residual(theta, g).square())
        start, functions, quadrature = targets, [squared] * k, [True] * k
        probes = None
        if include_variance:
            generator = torch.Generator(device="cpu").manual_seed(0)
            probes = torch.randint(0, 2, (n, TRACE_PROBES), generator=generator).to(targets) * 2 - 1
            start = torch.cat([targets, probes], dim=-1)
            functions += [self.ritz_filters(times, variance if same else residual)] * TRACE_PROBES
            quadrature += [same] * TRACE_PROBES
        with torch.no_grad():
            matmul = self.dynamics_operator(regime)
            run = self.run(
                matmul, start, functions, quadrature=quadrature,
                keep_bytes=LANCZOS_MEMORY_BYTES if include_variance and not same else 0,
            )
            for function in {id(f): f for f in functions}.values():
                function.warn(targets.dtype)
            forms = run.quadratic_forms()  # (T, k [+ probes])
            loss = forms[:, :k].sum(-1)
            if probes is not None:
                loss = loss + k * self._trace_estimate(run, forms, matmul, probes, len(times), prior, same)
        return loss.clamp_min(0) / (2 * n * k)

    def _trace_estimate(
        self, run: LanczosRun, forms: Tensor, matmul: MatMul, probes: Tensor, num_times: int, prior: Output, same: bool
    ) -> Tensor:
        r"""Hutchinson's estimate of :math:`\operatorname{tr}\Sigma_t(X, X)` per time ``(T,)``, prior as control.

        When :math:`G = P` (``same``): :math:`z^\top \Sigma_t z` by quadrature (``forms``) and
        :math:`z^\top K z = |z|^2 (\alpha_0 - \text{reg})` from the first step; otherwise
        :math:`z^\top R P R z` with :math:`R = r_t(G)`: :math:`R z` by pass 2, then
        :math:`P [R z, z]` in one product.
        """
        k, n, reg = self.problem.num_outputs, self.problem.num_train, self.problem.diag_reg
        if same:
            samples = forms[:, k:]
            controls = run.norms[k:].square() * (run.alpha[0, k:] - reg)
        else:
            fitted = run.apply(matmul)[..., k:]  # (T, n, probes)
            columns = torch.cat([fitted.movedim(0, -2).reshape(n, -1), probes], dim=-1)
            (prior_columns,) = self.train_products(columns, (prior,))
            prior_fitted = prior_columns[:, : -TRACE_PROBES].reshape(n, num_times, TRACE_PROBES).movedim(-2, 0)
            samples = (fitted * prior_fitted).sum(-2)
            controls = (probes * prior_columns[:, -TRACE_PROBES:]).sum(-2)
        return control_variate_mean(samples, controls, self.problem.train_kernels.diagonal(prior).sum())


def control_variate_mean(samples: Tensor, controls: Tensor, control_mean: Tensor) -> Tensor:
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
