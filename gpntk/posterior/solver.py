r"""What the two posterior solvers share: the regimes, the training problem, and the protocol they implement.

:class:`PosteriorSolver` is the linear algebra behind :class:`~gpntk.posterior.TrainedEnsemble`:
:class:`~gpntk.posterior.eigh.EighSolver` (one eigendecomposition of the :math:`n \times n`
training kernel per regime) and :class:`~gpntk.posterior.krylov.KrylovSolver` (Lanczos, the
training kernel touched only through products). Both work on a :class:`TrainingProblem`. The
``solver="auto"|"eigh"|"lanczos"`` argument becomes a name with :func:`resolve_solver`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional, Protocol, Sequence

from torch import Tensor

from ..kernels.dense import Output
from .kernel_cache import KernelCache
from .snapshot import EnsembleSnapshot

__all__ = [
    "Regime", "REGIMES", "Solver", "SOLVERS", "SolverName", "Covariance", "TrainProduct", "EIGH_MAX_TRAIN",
    "REGIME_KERNELS", "TrainingProblem", "PosteriorSolver", "resolve_solver",
]

Regime = Literal["ntk", "nngp", "ntkgp"]
REGIMES = ("ntk", "nngp", "ntkgp")
Solver = Literal["auto", "eigh", "lanczos"]
SOLVERS = ("auto", "eigh", "lanczos")
#: a resolved solver
SolverName = Literal["eigh", "lanczos"]
#: what a moments call computes besides the mean: the full ``(m, m)`` covariance, its diagonal, or nothing
Covariance = Optional[Literal["full", "diag"]]

#: ``solver="auto"`` uses the eigendecomposition up to this many training points and Lanczos above.
#: At n = 8000 the dense path holds a few n x n float64 matrices (0.5 GB each) and its
#: eigendecomposition takes minutes on a laptop CPU, while a Lanczos step (one pass over the n^2
#: kernel pairs) takes seconds; below, the dense path is faster unless t is small.
EIGH_MAX_TRAIN = 8000

#: ``train_product(V, kinds)``: the products ``K_kind(X, X) @ V`` of the (unregularized) training
#: kernels, ``V`` ``(n, c)``, one ``(n, c)`` tensor per kind in ``kinds`` (a subset of ``("nngp", "ntk")``)
TrainProduct = Callable[[Tensor, Sequence[str]], Sequence[Tensor]]

#: the kernel matrices each regime needs: (dynamics G, prior P), as "nngp" / "ntk"
REGIME_KERNELS: dict[str, tuple[Output, Output]] = {
    "ntk": ("ntk", "nngp"), "nngp": ("nngp", "nngp"), "ntkgp": ("ntk", "ntk")
}


def resolve_solver(solver: Solver, num_train: int) -> SolverName:
    """``"auto"``: ``"eigh"`` up to :data:`EIGH_MAX_TRAIN` training points, ``"lanczos"`` above; else as given."""
    if solver == "auto":
        return "lanczos" if num_train > EIGH_MAX_TRAIN else "eigh"
    return solver


@dataclass(frozen=True)
class TrainingProblem:
    r"""The training problem both solvers work on: the snapshot, :math:`\eta`, the ridge, the training kernels.

    ``train_kernels`` caches the kernels of the training inputs against themselves (shared by
    ensembles that differ only in ``diag_reg``, see :meth:`with_diag_reg`).
    """

    snapshot: EnsembleSnapshot
    learning_rate: float
    diag_reg: float
    train_kernels: KernelCache

    @property
    def num_train(self) -> int:
        return self.snapshot.num_train

    @property
    def num_outputs(self) -> int:
        return self.snapshot.num_outputs

    @property
    def train_y(self) -> Tensor:
        """The targets, ``(n, k)``."""
        return self.snapshot.train_y

    def time_scale(self) -> float:
        """τ per unit of t: η / (n·k)."""
        return self.learning_rate / (self.num_train * self.num_outputs)

    def with_diag_reg(self, diag_reg: float) -> TrainingProblem:
        """The same problem with another ridge, sharing the training kernels."""
        return replace(self, diag_reg=diag_reg)

    def with_learning_rate(self, learning_rate: float) -> TrainingProblem:
        """The same problem with another learning rate (only the time scale depends on it)."""
        return replace(self, learning_rate=learning_rate)


class PosteriorSolver(Protocol):
    """The linear algebra of a trained ensemble for one :class:`TrainingProblem`.

    Results carry a leading dimension of ``T`` times; the façade removes it for a single time.
    """

    problem: TrainingProblem

    @property
    def name(self) -> SolverName:
        """``"eigh"`` or ``"lanczos"``."""
        ...

    @property
    def num_products(self) -> int:
        """Products with the training kernel so far (Lanczos), each a pass over its n^2 entries; 0 for eigh."""
        ...

    def prepare(self, regime: str) -> None:
        """Compute (and cache) the training-kernel matrices the solver keeps for ``regime`` (for timing)."""
        ...

    def moments(
        self, test_x: Tensor, cross: KernelCache, test: KernelCache, times: list[float], regime: str,
        covariance: Covariance,
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean (T, m, k), cov (T, m, m) / (T, m) / None)`` at ``test_x`` (kernels ``cross``, ``test``)."""
        ...

    def train_loss(self, times: list[float], regime: str, include_variance: bool) -> Tensor:
        """The expected training loss (or that of the mean) per time, ``(T,)``."""
        ...

    def largest_eigenvalue(self, regime: str) -> float:
        r""":math:`\lambda_{\max}` of the regime's regularized kernel :math:`G(X, X) + \text{diag\_reg}\, I`."""
        ...

    def with_diag_reg(self, problem: TrainingProblem) -> PosteriorSolver:
        """A solver for ``problem`` (this one with another ``diag_reg``), reusing what does not depend on the ridge."""
        ...
