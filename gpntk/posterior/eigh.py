r"""The eigendecomposition solver: ``solver="eigh"``.

One symmetric eigendecomposition :math:`G = V \Lambda V^\top` of the regularized training kernel
per regime, cached (regimes with the same dynamics share it), so any number of times costs only
matrix products; the filter :math:`(1 - e^{-\tau\lambda})/\lambda = \tau\, \varphi_1(\tau\lambda)`
is evaluated with ``expm1`` (exact for tiny and zero eigenvalues, see
:func:`~gpntk.posterior.time_filter.time_filter`); negative round-off eigenvalues are clipped to
zero, and eigenvalues below ``n·eps·λ_max`` count as zero at every time. With the
eigenvectors :math:`V` of :math:`G`, :math:`g = g_t(\Lambda)` and :math:`h = h_t(\Lambda)`:

.. math::
    \mu_t = G(X_*, X)\, V\, g\, V^\top Y, \qquad
    \Sigma_t = P_{**} - G_{*X} V h V^\top G_{X*} \quad (G = P), \\
    \Sigma_t = P_{**} - W^\top V^\top P_{X*} - P_{*X} V W + W^\top (V^\top P V) W, \quad
    W = g\, V^\top G_{X*} \quad (G \ne P).

Changing the ridge shifts the eigenvalues and keeps the eigenvectors (:meth:`EighSolver.with_diag_reg`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Literal, cast

import torch
from torch import Tensor

from .._progress import progress_bar
from ..errors import NumericalWarning
from .kernel_cache import KernelCache
from .solver import REGIME_KERNELS, Covariance, TrainingProblem
from .time_filter import time_filter, warn_dropped
from .variance import repair_diagonal, repair_variances

__all__ = ["EighSolver", "Spectrum"]


@dataclass(frozen=True)
class Spectrum:
    """The eigendecomposition of the training kernel of one regime, and what is reused per time."""

    eigenvalues: Tensor  # (n,), clipped at 0
    unclipped: Tensor  # (n,), as computed (a ridge shift acts on these)
    eigenvectors: Tensor  # (n, n)
    targets: Tensor  # V^T Y, (n, k)
    prior_in_basis: Tensor | None  # V^T P(X, X) V (n, n) when P differs from G, else None
    rank_cutoff: float  # eigenvalues below this count as zero at t = inf


def rank_cutoff(eigenvalues: Tensor, n: int) -> float:
    """Eigenvalues (ascending) at most n·ε·λ_max count as zero."""
    scale = eigenvalues[-1].clamp_min(torch.finfo(eigenvalues.dtype).tiny).item()
    return n * torch.finfo(eigenvalues.dtype).eps * scale


class EighSolver:
    """The posterior from cached eigendecompositions of the training kernels (see the module docstring)."""

    name: Literal["eigh"] = "eigh"

    def __init__(self, problem: TrainingProblem, spectra: dict[str, Spectrum] | None = None):
        self.problem = problem
        #: the eigendecomposition per regime, computed on first use
        self.spectra: dict[str, Spectrum] = {} if spectra is None else spectra

    @property
    def num_products(self) -> int:
        return 0

    def prepare(self, regime: str) -> None:
        self.train_kernels(regime)

    def train_kernels(self, regime: str) -> tuple[Tensor, Tensor | None]:
        """(G(X, X) + reg·I, P(X, X)) for the regime; P is None when it equals G (and then includes reg)."""
        problem = self.problem
        train_x = problem.snapshot.train_x
        eye = torch.eye(problem.num_train, dtype=train_x.dtype, device=train_x.device)
        dynamics, prior = REGIME_KERNELS[regime]
        with torch.no_grad():
            regularized = problem.train_kernels.get(dynamics) + problem.diag_reg * eye
            return regularized, (None if prior == dynamics else problem.train_kernels.get(prior))

    def spectrum(self, regime: str) -> Spectrum:
        """The regime's :class:`Spectrum`, computed on first use (warns about negative eigenvalues beyond round-off)."""
        if regime not in self.spectra:
            with progress_bar(2, f"posterior ({regime})", unit="step") as bar:  # the kernels, their eigenvectors
                dynamics, prior = self.train_kernels(regime)
                bar.update(1)
                self._decompose(regime, dynamics, prior)
                bar.update(1)
        return self.spectra[regime]

    def _decompose(self, regime: str, dynamics: Tensor, prior: Tensor | None) -> None:
        """Store the regime's :class:`Spectrum` from its regularized dynamics kernel and its prior kernel."""
        # regimes with the same dynamics ("ntk", "ntkgp") share one eigendecomposition
        kind = REGIME_KERNELS[regime][0]
        shared = next((s for r, s in self.spectra.items() if REGIME_KERNELS[r][0] == kind), None)
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
                stacklevel=4,  # _decompose <- spectrum <- the solver <- the caller
            )
        eigenvalues = eigenvalues.clamp_min(0)
        prior_in_basis = None if prior is None else eigenvectors.mT @ prior @ eigenvectors
        self.spectra[regime] = Spectrum(
            eigenvalues, unclipped, eigenvectors, eigenvectors.mT @ self.problem.train_y, prior_in_basis,
            rank_cutoff(eigenvalues, self.problem.num_train),
        )

    def with_diag_reg(self, problem: TrainingProblem) -> EighSolver:
        r""":math:`G + r' I = V (\Lambda + (r' - r) I) V^\top`: the decompositions so far, eigenvalues shifted."""
        shift = problem.diag_reg - self.problem.diag_reg
        spectra = {}
        for regime, spectrum in self.spectra.items():
            unclipped = spectrum.unclipped + shift
            eigenvalues = unclipped.clamp_min(0)
            spectra[regime] = replace(
                spectrum, eigenvalues=eigenvalues, unclipped=unclipped,
                rank_cutoff=rank_cutoff(eigenvalues, problem.num_train),
            )
        return EighSolver(problem, spectra)

    def filters(self, spectrum: Spectrum, t: float, factor: float = 1.0) -> Tensor:
        r""":math:`(1 - e^{-c\tau\lambda})/\lambda` per eigenvalue for one time.

        ``factor`` :math:`c`: 1 for :math:`g_t`, 2 for :math:`h_t`.

        Eigenvalues at most ``rank_cutoff`` count as zero at every time (see
        :func:`~gpntk.posterior.time_filter.time_filter`); a warning says when that could matter
        (:func:`~gpntk.posterior.time_filter.warn_dropped`).
        """
        lam = spectrum.eigenvalues
        tau = t * self.problem.time_scale()
        if factor == 1.0:
            warn_dropped(int((lam <= spectrum.rank_cutoff).sum()), lam.numel(), spectrum.rank_cutoff, tau, lam.dtype)
        return time_filter(lam, factor * tau, spectrum.rank_cutoff)

    def moments(
        self, test_x: Tensor, cross: KernelCache, test: KernelCache, times: list[float], regime: str,
        covariance: Covariance,
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean (T, m, k), cov (T, m, m) / (T, m) / None)`` from the eigendecomposition of the training kernel."""
        spectrum = self.spectrum(regime)
        dynamics, prior = REGIME_KERNELS[regime]
        dynamics_v = cross.get(dynamics) @ spectrum.eigenvectors  # G(X*, X) V, (m, n)
        prior_v = None
        if covariance is not None and spectrum.prior_in_basis is not None:
            prior_v = cross.get(prior) @ spectrum.eigenvectors
        prior_tt = None if covariance is None else test.get(prior) if covariance == "full" else test.diagonal(prior)
        means, covs = [], []
        n = self.problem.num_train
        for t_value in times:
            g = self.filters(spectrum, t_value)
            means.append(dynamics_v @ (g.unsqueeze(-1) * spectrum.targets))
            if prior_tt is None:
                continue
            if prior_v is None:  # G = P: Σ_t = P_tt - G_tx V diag(h) V^T G_xt, h = (1 - e^{-2τλ})/λ
                h = self.filters(spectrum, t_value, factor=2.0)
                cov, scale = _shared_kernel_covariance(dynamics_v, h, prior_tt)
            else:
                prior_in_basis = cast(Tensor, spectrum.prior_in_basis)  # P differs from G (prior_v is set)
                cov, scale = _distinct_kernel_covariance(dynamics_v * g, prior_v, prior_in_basis, prior_tt)
            if covariance == "diag":
                covs.append(repair_variances(cov, prior_tt + scale, n))
            else:
                covs.append(repair_diagonal((cov + cov.mT) / 2, prior_tt.diagonal() + scale, n))
        return torch.stack(means), (torch.stack(covs) if covs else None)

    def train_loss(self, times: list[float], regime: str, include_variance: bool) -> Tensor:
        """``train_loss`` per time, ``(T,)``: the loss of the mean plus, optionally, the trace of Σ_t(X, X)."""
        spectrum = self.spectrum(regime)
        lam = spectrum.eigenvalues
        unregularized = (lam - self.problem.diag_reg).clamp_min(0)  # eigenvalues of G(X, X) itself
        n, k = self.problem.num_train, self.problem.num_outputs
        losses: list[Tensor] = []
        for t_value in times:
            g = self.filters(spectrum, t_value)
            fitted = unregularized * g  # μ_t(X) = V diag(fitted) V^T Y
            residual = (fitted - 1).unsqueeze(-1) * spectrum.targets
            loss = residual.square().sum()
            if include_variance:
                if spectrum.prior_in_basis is None:  # P(X, X) = G(X, X) = V diag(λ - reg) V^T
                    trace = (unregularized - unregularized.square() * (2 * g - lam * g.square())).sum()
                else:  # V^T Σ_t(X, X) V = (I - D) S (I - D), D = diag(fitted)
                    trace = (spectrum.prior_in_basis.diagonal() * (1 - fitted).square()).sum()
                loss = loss + k * trace
            losses.append(loss.clamp_min(0) / (2 * n * k))
        return torch.stack(losses)

    def largest_eigenvalue(self, regime: str) -> float:
        return self.spectrum(regime).eigenvalues[-1].item()


def _shared_kernel_covariance(dynamics_v: Tensor, h: Tensor, prior_tt: Tensor) -> tuple[Tensor, Tensor]:
    r"""When :math:`G = P`: :math:`P_{**} - G_{*X} V \operatorname{diag}(h) V^\top G_{X*}` and a scale.

    ``prior_tt`` is ``(m, m)``, or ``(m,)`` for the variances alone (then the result is ``(m,)``).
    The scale (the subtracted diagonal, non-negative) is what the variances are computed from
    besides the prior variance, for :func:`~gpntk.posterior.variance.repair_variances`.
    """
    explained = (dynamics_v.square() * h).sum(-1)  # the diagonal of the subtracted term, >= 0
    if prior_tt.dim() == 1:
        return prior_tt - explained, explained
    return prior_tt - (dynamics_v * h) @ dynamics_v.mT, explained


def _distinct_kernel_covariance(
    weighted: Tensor, prior_v: Tensor, prior_in_basis: Tensor, prior_tt: Tensor
) -> tuple[Tensor, Tensor]:
    r"""When :math:`G \ne P`: :math:`\Sigma_t` from ``weighted`` :math:`= G_{*X} V \operatorname{diag}(g)`, and a scale.

    ``prior_v`` is :math:`P_{*X} V`, ``prior_in_basis`` :math:`V^\top P(X, X) V`; ``prior_tt``
    ``(m, m)``, or ``(m,)`` for the variances alone. The scale sums the magnitudes of the terms
    subtracted from and added to the prior variance.
    """
    in_prior = weighted @ prior_in_basis  # G_tx V diag(g) V^T P(X, X) V
    quadratic = (in_prior * weighted).sum(-1)
    crossed = (weighted * prior_v).sum(-1)
    scale = 2 * crossed.abs() + quadratic.abs()
    if prior_tt.dim() == 1:
        return prior_tt - 2 * crossed + quadratic, scale
    cross_term = weighted @ prior_v.mT
    return prior_tt - cross_term - cross_term.mT + in_prior @ weighted.mT, scale
