r"""Functions of a symmetric positive semi-definite operator applied to vectors, by Lanczos.

For a symmetric :math:`A \in \mathbb R^{n\times n}` known only through products :math:`A V`, a
start vector :math:`b` and :math:`k` steps of the Lanczos recurrence

.. math::
    \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}, \qquad
    q_1 = b / \lVert b\rVert, \quad \alpha_j = q_j^\top (A q_j - \beta_{j-1} q_{j-1}),

give a basis :math:`Q_k = [q_1, \dots, q_k]` of the Krylov space
:math:`\mathcal K_k(A, b) = \operatorname{span}\{b, Ab, \dots, A^{k-1}b\}` and the tridiagonal
:math:`T_k = Q_k^\top A Q_k` (diagonal :math:`\alpha`, off-diagonal :math:`\beta`). Then

.. math::
    f(A)\, b \approx \lVert b\rVert\, Q_k f(T_k)\, e_1, \qquad
    b^\top f(A)\, b \approx \lVert b\rVert^2\, e_1^\top f(T_k)\, e_1
        = \lVert b\rVert^2 \sum_i (e_1^\top s_i)^2 f(\theta_i),

with :math:`T_k = S \operatorname{diag}(\theta) S^\top` (Ritz values :math:`\theta`). The first is
exact when :math:`f` is a polynomial of degree :math:`< k`, so its error is that of the best
polynomial approximation of :math:`f` on the spectrum (Saad 1992; Golub & Meurant 2010,
*Matrices, Moments and Quadrature with Applications*, ch. 6–7); the second is the
:math:`k`-point Gauss quadrature of the spectral measure of :math:`b`, exact for polynomials of
degree :math:`< 2k` (Golub & Meurant 2010; Ubaru, Chen & Saad 2017, "Fast estimation of
tr(f(A)) via stochastic Lanczos quadrature"), so it converges about twice as fast. Functions
that are smooth on the spectrum, like :math:`(1 - e^{-\tau\lambda})/\lambda`, need a few dozen
steps; :math:`1/\lambda` needs up to about :math:`\sqrt{\kappa}\,\log(2/\varepsilon)/2` (the CG
bound), so a ridge that bounds the condition number :math:`\kappa` matters.

The recurrence runs without reorthogonalization. In floating point the :math:`q_j` lose
orthogonality once Ritz values converge and copies of them appear, but :math:`Q_k f(T_k) e_1`
and the quadrature still converge (later): the computed quantities satisfy
:math:`A Q_k = Q_k T_k + \beta_k q_{k+1} e_k^\top + F_k` with :math:`F_k` at round-off level, and
the error is governed by how well polynomials approximate :math:`f` on a slightly enlarged
spectral interval (Druskin & Knizhnerman 1991, "Error bounds in the simple Lanczos procedure for
computing functions of symmetric matrices and eigenvalues"; Druskin, Greenbaum & Knizhnerman
1998, "Using nonorthogonal Lanczos vectors in the computation of matrix functions"; Greenbaum
1989).

Memory stays :math:`O(n c)` for :math:`c` start vectors, plus an optional, bounded store of
Lanczos vectors:

* :func:`lanczos` (pass 1) keeps :math:`q_{j-1}, q_j` and the coefficients :math:`\alpha, \beta`.
  Quadratic forms need nothing more (:meth:`LanczosRun.quadratic_forms`), and projections
  :math:`L^\top f(A)\, b` onto a few fixed vectors :math:`L` (``left``) are accumulated as
  :math:`L^\top q_j` on the way (:meth:`LanczosRun.projections`).
* :meth:`LanczosRun.apply` (pass 2) forms :math:`\lVert b\rVert \sum_j q_j\, [f(T_k) e_1]_j`. The
  first Lanczos vectors, as many as fit in ``keep_bytes``, were stored by pass 1; the others are
  regenerated from the stored coefficients, one product per step (two-pass Lanczos; Frommer &
  Simoncini 2008, "Matrix functions", in *Model Order Reduction*). Regeneration with fixed
  coefficients amplifies any difference between the products of the two passes exponentially
  (the same mechanism as the loss of orthogonality), so the products must be deterministic: the
  replay uses the very same blocks as pass 1, and checks that it reproduces :math:`\alpha`.

The cost model is the number of products: each is one pass over the :math:`n^2` entries of a
kernel matrix computed on the fly, so all start vectors advance together, one product with an
``(n, c)`` block per step, and many functions (for example one per training time) are evaluated
from the same run, since :math:`T_k` does not depend on :math:`f`. Convergence is judged every
``check_every`` steps per column from the small problems alone: the relative change of
:math:`f(T_k) e_1` (of its first entry, for quadratic forms) since the previous check, for every
function, enlarged by :math:`r/(1 - r)` when the changes shrink only by a ratio :math:`r` per check
(the tail of a geometric series: slow, linear convergence). Converged columns leave the block;
the others go on until ``max_iterations``, with a warning. Ritz values come from
eigendecompositions of the small tridiagonals: batched dense LAPACK up to
:data:`BATCHED_RITZ_MAX` steps, then LAPACK's MRRR ``stemr`` through SciPy, :math:`O(k^2)` each.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from .._progress import progress_bar, track
from .._validation import integer_argument, real_argument
from ..errors import NumericalWarning

__all__ = ["lanczos", "largest_eigenvalue", "check_options", "LanczosRun", "MatrixFunction", "MatMul"]

#: ``f``: Ritz values ``(a, k)`` of ``a`` tridiagonals (float64 on the CPU, round-off negatives clipped to 0) to
#: values ``(F, a, k)`` of F functions (elementwise, except that a function may use each row's largest value)
MatrixFunction = Callable[[Tensor], Tensor]
#: ``V -> A V``, ``(n, a) -> (n, a)``
MatMul = Callable[[Tensor], Tensor]

#: a step with beta <= BREAKDOWN * n * eps * ||T|| ends its column: the Krylov space is invariant up to round-off
BREAKDOWN = 10.0
#: pass 2 warns when its recomputed diagonal of T differs from pass 1's by more than this (relative to ||T||)
REPLAY_TOLERANCE = 1e-8


def _ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(k,)`` and eigenvectors ``(k, k)`` of the tridiagonal (diagonal ``alpha``, off-diagonal ``beta``).

    CPU float64 (the problems are small): LAPACK ``stemr`` (MRRR) through SciPy (a dependency of
    GPyTorch), with the dense symmetric solver as a fallback where MRRR does not converge or SciPy
    is missing.
    """
    d = alpha.detach().to("cpu", torch.float64).numpy()
    e = beta.detach().to("cpu", torch.float64).numpy()
    try:
        import scipy.linalg

        values, vectors = scipy.linalg.eigh_tridiagonal(d, e, lapack_driver="stemr")
    except (ImportError, np.linalg.LinAlgError, ValueError):
        values, vectors = np.linalg.eigh(np.diag(d) + np.diag(e, 1) + np.diag(e, -1))
    return torch.from_numpy(values), torch.from_numpy(vectors)


#: tridiagonals up to this size are eigendecomposed together (batched dense LAPACK, O(k^3) each);
#: larger ones one by one with MRRR (O(k^2) each)
BATCHED_RITZ_MAX = 64


def _coefficients(alpha: Tensor, beta: Tensor, functions: Sequence[MatrixFunction]) -> list[Tensor]:
    r""":math:`f(T) e_1`, ``(F, k)`` per column, for the tridiagonals of ``a`` columns of the same length ``k``.

    ``alpha`` is ``(k, a)``, ``beta`` ``(k - 1, a)``; ``functions`` has one entry per column.
    Columns sharing a function are evaluated together. Float64 on the CPU.
    """
    alpha = alpha.detach().to("cpu", torch.float64)
    beta = beta.detach().to("cpu", torch.float64)
    k, a = alpha.shape
    out: list[Tensor | None] = [None] * a
    if k <= BATCHED_RITZ_MAX:
        matrices = torch.diag_embed(alpha.mT) + torch.diag_embed(beta.mT, 1) + torch.diag_embed(beta.mT, -1)
        values, vectors = torch.linalg.eigh(matrices)  # (a, k), (a, k, k)
        groups: dict[int, list[int]] = {}
        for j, function in enumerate(functions):
            groups.setdefault(id(function), []).append(j)
        for columns in groups.values():
            weights = functions[columns[0]](values[columns].clamp_min(0))  # (F, g, k)
            first = vectors[columns][:, 0, :]  # (g, k)
            coefficients = torch.einsum("fgi,gi,gji->fgj", weights, first, vectors[columns])
            for position, j in enumerate(columns):
                out[j] = coefficients[:, position]
        return cast("list[Tensor]", out)  # every column filled
    for j in range(a):
        values, vectors = _ritz(alpha[:, j], beta[:, j])
        weights = functions[j](values.clamp_min(0).unsqueeze(0))[:, 0]  # (F, k)
        out[j] = (weights * vectors[0]) @ vectors.mT
    return cast("list[Tensor]", out)  # every column filled


class _Recurrence:
    r"""The latest Lanczos vectors :math:`q_{j-1}, q_j` of every column, ``(n, c)`` each, and :math:`\beta_{j-1}`."""

    def __init__(self, start: Tensor, norms: Tensor):
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.q = torch.where(norms > 0, start / safe, torch.zeros_like(start))
        self.q_prev = torch.zeros_like(start)
        self.beta_prev = torch.zeros_like(norms)

    def residual(self, index: Tensor, product: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r""":math:`(\alpha, u)` with :math:`u = (A q - \beta_{j-1} q_{j-1}) - \alpha q` (Paige), columns ``index``.

        ``alpha`` given: use it (pass 2) and return the recomputed one, for checking.
        """
        q = self.q[:, index]
        u = product - self.beta_prev[index] * self.q_prev[:, index]
        computed = (q * u).sum(-2)
        return computed, u - (computed if alpha is None else alpha) * q

    def advance(self, index: Tensor, u: Tensor, beta: Tensor) -> None:
        r""":math:`q_{j+1} = u / \beta_j` for the columns ``index`` (0 where :math:`\beta_j = 0`, a breakdown)."""
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        self.q_prev[:, index] = self.q[:, index]
        self.q[:, index] = torch.where(beta > 0, u / safe, torch.zeros_like(u))
        self.beta_prev[index] = beta


@dataclass
class LanczosRun:
    r"""The outcome of :func:`lanczos` on ``c`` start columns: tridiagonals and :math:`f(T) e_1`.

    ``alpha`` and ``beta`` are ``(steps, c)``; column ``j`` uses its first ``lengths[j]`` entries
    (columns leave the block when they converge; ``beta[lengths[j] - 1, j]`` is 0 after a
    breakdown, an invariant Krylov space, where the results are exact).
    """

    start: Tensor  # (n, c) the start vectors b
    norms: Tensor  # (c,) their norms
    alpha: Tensor  # (steps, c)
    beta: Tensor  # (steps, c)
    lengths: list[int]  # Lanczos steps per column
    coefficients: list[Tensor]  # per column f(T) e1, (F, length), float64 on the CPU
    left_projections: Tensor | None  # (steps, m, c_left) L^T q_j of the columns left_columns
    left_columns: Tensor | None  # (c_left,) the columns projected
    basis: list[Tensor]  # the first Lanczos vectors q_0, q_1, ..., (n, c) each, kept for pass 2
    converged: bool
    max_change: float  # the largest estimated relative error of an unconverged column at the last check
    products: int  # products with A in pass 1 (steps of the block recurrence)
    replay_products: int = 0  # products with A in pass 2 (apply)

    @property
    def num_functions(self) -> int:
        return self.coefficients[0].shape[0] if self.coefficients else 0

    def _active(self, step: int) -> Tensor:
        """The columns that took part in step ``step`` of pass 1, in order."""
        return torch.tensor([j for j, length in enumerate(self.lengths) if length > step], device=self.start.device)

    def _weights(self) -> Tensor:
        r""":math:`\lVert b\rVert\, f(T) e_1` per column, zero-padded, ``(F, steps, c)``, like ``start``."""
        steps, c = self.alpha.shape
        out = torch.zeros(self.num_functions, steps, c, dtype=torch.float64)
        for j, coef in enumerate(self.coefficients):
            out[:, : coef.shape[-1], j] = coef
        return out.to(self.start) * self.norms

    def quadratic_forms(self) -> Tensor:
        r"""Gauss quadrature :math:`\lVert b\rVert^2 e_1^\top f(T) e_1` per function and column, ``(F, c)``."""
        first = [c[:, 0] if c.shape[-1] else c.new_zeros(c.shape[0]) for c in self.coefficients]
        return torch.stack(first, dim=-1).to(self.start) * self.norms.square()

    def projections(self) -> Tensor:
        r""":math:`L^\top f(A)\, b \approx \lVert b\rVert \sum_j (L^\top q_j)\, [f(T) e_1]_j`, ``(F, m, c)``.

        Needs ``left`` in :func:`lanczos`; ``c`` counts the columns ``left_columns`` only.
        """
        if self.left_projections is None:
            raise ValueError("this Lanczos run accumulated no projections (pass left= to lanczos)")
        weights = self._weights()[..., self.left_columns]
        return torch.einsum("smc,fsc->fmc", self.left_projections, weights)

    def apply(self, matmul: MatMul) -> Tensor:
        r"""Pass 2: :math:`f(A)\, B \approx \lVert b\rVert\, Q f(T) e_1` per column, ``(F, n, c)``.

        Stored Lanczos vectors are used as they are; the rest are regenerated with ``matmul``
        (the operator of pass 1, which must be deterministic) from the stored coefficients, one
        product per step on the same blocks as pass 1 (counted in ``replay_products``). Warns
        when the regenerated vectors do not reproduce :math:`\alpha` (see
        :data:`REPLAY_TOLERANCE`). Memory :math:`O(F n c)`.
        """
        weights = self._weights()  # (F, steps, c)
        n, c = self.start.shape
        out = self.start.new_zeros(weights.shape[0], n, c)
        total, stored = max(self.lengths, default=0), len(self.basis)
        state = _Recurrence(self.start, self.norms)
        deviation = 0.0
        for step in track(range(total), "Lanczos pass 2", unit="step"):
            if step < stored:
                state.q = self.basis[step]
            out += state.q * weights[:, step].unsqueeze(-2)
            if step + 1 >= total or step + 1 < stored:
                continue
            if step < stored:  # the last stored vector: continue the recurrence from it
                state.q = self.basis[step].clone()
                state.q_prev = self.basis[step - 1].clone() if step > 0 else torch.zeros_like(state.q)
                state.beta_prev = self.beta[step - 1].clone() if step > 0 else torch.zeros_like(self.norms)
            index = self._active(step)
            alpha = self.alpha[step, index]
            recomputed, u = state.residual(index, matmul(state.q[:, index]), alpha)
            self.replay_products += 1
            scale = (alpha.abs() + self.beta[step, index]).clamp_min(torch.finfo(alpha.dtype).tiny)
            deviation = max(deviation, float(((recomputed - alpha).abs() / scale).max()))
            state.advance(index, u, self.beta[step, index])
        if deviation > REPLAY_TOLERANCE:
            warnings.warn(
                f"pass 2 of Lanczos did not reproduce the Lanczos vectors of pass 1 (relative deviation "
                f"{deviation:.2g}): the product is not deterministic, so the result may be inaccurate; keep "
                "more Lanczos vectors (a larger memory budget) or make the product deterministic",
                NumericalWarning,
                stacklevel=2,
            )
        return out


def check_options(tolerance: float, max_iterations: int, check_every: int) -> None:
    """The options of :func:`lanczos` and :func:`largest_eigenvalue`: a positive tolerance, positive integers."""
    real_argument("tolerance", tolerance, minimum=0, strict=True)
    for name, value in (("max_iterations", max_iterations), ("check_every", check_every)):
        integer_argument(name, value, minimum=1)


@dataclass
class _Columns:
    """What :func:`lanczos` does with each of its ``c`` start columns, checked."""

    functions: list[MatrixFunction]  # one per column
    quadratic: list[bool]  # converge on the quadratic form (Gauss quadrature) rather than the vector
    offsets: list[float | None]  # a reference r in the units of f(T) e1: r / |b|^2
    projected: Tensor | None  # the columns whose L^T q_j are accumulated (with left)
    left_position: dict[int, int]  # column -> its position among the projected ones

    @staticmethod
    def check(
        start: Tensor,
        norms: Tensor,
        functions: MatrixFunction | Sequence[MatrixFunction],
        quadrature: bool | Sequence[bool],
        reference: Tensor | None,
        left: Tensor | None,
        left_columns: Sequence[int] | None,
    ) -> _Columns:
        """The per-column settings from :func:`lanczos`'s arguments (see there); ValueError on a mismatch."""
        n, c = start.shape
        per_column = list(functions) if isinstance(functions, Sequence) else [functions] * c
        quadratic = [bool(quadrature)] * c if isinstance(quadrature, bool) else [bool(v) for v in quadrature]
        if len(per_column) != c or len(quadratic) != c:
            raise ValueError(f"functions and quadrature need one entry per column ({c})")
        if reference is not None and reference.shape != (c,):
            raise ValueError(f"reference must have shape ({c},), got {tuple(reference.shape)}")
        projected = None
        if left is not None:
            if left.dim() != 2 or left.shape[0] != n:
                raise ValueError(f"left must be (n, m) with n = {n}, got shape {tuple(left.shape)}")
            projected = (
                torch.arange(c) if left_columns is None else torch.as_tensor(list(left_columns), dtype=torch.long)
            )
            projected = projected.to(start.device)
        left_position = {} if projected is None else {int(j): position for position, j in enumerate(projected)}
        offsets: list[float | None] = [None] * c
        if reference is not None:
            offsets = (reference / norms.square().clamp_min(torch.finfo(start.dtype).tiny)).tolist()
        return _Columns(per_column, quadratic, offsets, projected, left_position)


class _FirstPass:
    """The state of pass 1 of :func:`lanczos`: the recurrence, the tridiagonals, and per column f(T) e1 and its error.

    :meth:`step` advances the unconverged columns by one product; :meth:`judge` updates their
    coefficients and convergence estimates; :meth:`outcome` assembles the :class:`LanczosRun`.
    """

    def __init__(
        self, start: Tensor, norms: Tensor, columns: _Columns, left: Tensor | None, max_iterations: int,
        keep_bytes: int,
    ):
        n, c = start.shape
        self.start, self.norms, self.columns, self.left, self.keep_bytes = start, norms, columns, left, keep_bytes
        self.state = _Recurrence(start, norms)
        self.alphas, self.betas = start.new_zeros(max_iterations, c), start.new_zeros(max_iterations, c)
        self.projections: list[Tensor] = []  # L^T q_j of the projected columns
        self.basis: list[Tensor] = []  # the first Lanczos vectors, kept for pass 2
        self.block_bytes = n * c * start.element_size()
        self.lengths = [0] * c
        num_functions = [function(torch.ones(1, 1, dtype=torch.float64)).shape[0] for function in columns.functions]
        # a zero start vector needs no step: f(A) 0 = 0
        self.coefficients = [torch.zeros(f, 0, dtype=torch.float64) for f in num_functions]
        self.previous: list[Tensor | None] = [None] * c
        self.changes = [math.inf] * c  # error estimates
        self.last_changes = [math.inf] * c  # relative changes between the last two checks
        self.active = [bool(norm > 0) for norm in norms]
        self.scale = torch.zeros_like(norms)  # running max of |alpha|, beta per column: about ||A||
        self.breakdown_level = BREAKDOWN * n * torch.finfo(start.dtype).eps
        self.steps = 0

    def step(self, matmul: MatMul) -> tuple[Tensor, Tensor]:
        r"""One product with the block of active columns: their indices and :math:`\beta` (0 at a breakdown)."""
        state, projected, n = self.state, self.columns.projected, self.start.shape[0]
        index = torch.tensor([j for j, active in enumerate(self.active) if active], device=self.start.device)
        if projected is not None:
            self.projections.append(cast(Tensor, self.left).mT @ state.q[:, projected])  # projected implies left
        if (len(self.basis) + 1) * self.block_bytes <= self.keep_bytes:
            self.basis.append(state.q.clone())
        product = matmul(state.q[:, index])
        if product.shape != (n, index.numel()):
            raise ValueError(f"matmul returned shape {tuple(product.shape)}, expected {(n, index.numel())}")
        alpha, u = state.residual(index, product)
        beta = u.norm(dim=-2)
        self.scale[index] = torch.maximum(self.scale[index], torch.maximum(alpha.abs(), beta))
        beta = torch.where(beta <= self.breakdown_level * self.scale[index], torch.zeros_like(beta), beta)
        self.alphas[self.steps, index], self.betas[self.steps, index] = alpha, beta
        state.advance(index, u, beta)
        self.steps += 1
        return index, beta

    def judge(self, index: Tensor, beta: Tensor, check: bool, tolerance: float) -> None:
        """After a step: f(T) e1 of the columns checked or broken down, and which columns go on."""
        columns = index.tolist()
        finished = [position for position in range(len(columns)) if check or beta[position] == 0]
        if finished:
            chosen = index[finished]
            chosen_functions = [self.columns.functions[columns[p]] for p in finished]
            new = _coefficients(
                self.alphas[: self.steps, chosen], self.betas[: self.steps - 1, chosen], chosen_functions
            )
            for position, coefficient in zip(finished, new):
                self.coefficients[columns[position]] = coefficient
        stacked = None  # the projections so far, (steps, m, c_left) on the CPU, for checking projected columns
        if check and self.columns.projected is not None:
            stacked = torch.stack(self.projections).to("cpu", torch.float64)
        for position, j in enumerate(columns):
            self.lengths[j] = self.steps
            if beta[position] == 0:  # an invariant Krylov space: exact
                self.active[j], self.changes[j] = False, 0.0
            elif check:
                self._judge_column(j, stacked, tolerance)

    def _judge_column(self, j: int, stacked: Tensor | None, tolerance: float) -> None:
        """The error estimate of column ``j`` at a check, judged on what is returned."""
        # L^T Q f(T) e1 for projected columns, else f(T) e1
        columns = self.columns
        value = self.coefficients[j]
        if stacked is not None and j in columns.left_position and not columns.quadratic[j]:
            value = value @ stacked[:, :, columns.left_position[j]]
        change = _change(value, self.previous[j], columns.quadratic[j], columns.offsets[j])
        self.changes[j], self.last_changes[j] = _error_estimate(change, self.last_changes[j]), change
        self.previous[j] = value
        self.active[j] = self.changes[j] > tolerance

    def unconverged(self) -> list[int]:
        return [j for j, active in enumerate(self.active) if active]

    def outcome(self) -> LanczosRun:
        """The :class:`LanczosRun` of the steps so far."""
        left, unconverged = self.left, self.unconverged()
        left_projections = None
        if left is not None:
            left_projections = (
                torch.stack(self.projections) if self.projections
                else left.new_zeros(0, left.shape[1], len(cast(Tensor, self.columns.projected)))  # left: projected
            )
        return LanczosRun(
            start=self.start,
            norms=self.norms,
            alpha=self.alphas[: self.steps],
            beta=self.betas[: self.steps],
            lengths=self.lengths,
            coefficients=self.coefficients,
            left_projections=left_projections,
            left_columns=self.columns.projected,
            basis=self.basis,
            converged=not unconverged,
            max_change=max((self.changes[j] for j in unconverged), default=0.0),
            products=self.steps,
        )


def lanczos(  # long: the docstring documents twelve options; the body is 25 lines
    matmul: MatMul,
    start: Tensor,
    functions: MatrixFunction | Sequence[MatrixFunction],
    *,
    quadrature: bool | Sequence[bool] = False,
    reference: Tensor | None = None,
    left: Tensor | None = None,
    left_columns: Sequence[int] | None = None,
    keep_bytes: int = 0,
    tolerance: float = 1e-8,
    max_iterations: int = 1000,
    check_every: int = 5,
    warn: bool = True,
) -> LanczosRun:
    r"""Pass 1 of Lanczos on ``c`` start vectors at once: the tridiagonals and :math:`f(T) e_1` per column.

    :param matmul: :math:`V \mapsto A V` for a symmetric positive semi-definite :math:`A`,
        ``(n, a) -> (n, a)``; called once per step with the block of unconverged columns.
    :param start: the start vectors :math:`B`, ``(n, c)``.
    :param functions: the matrix functions, one callable for all columns or one per column
        (:data:`MatrixFunction`: Ritz values ``(a, k)`` to values ``(F, a, k)``; F functions, the
        same F for every column, for example one per training time).
    :param quadrature: per column (or for all): converge on the quadratic form
        :math:`b^\top f(A) b` (Gauss quadrature, :meth:`LanczosRun.quadratic_forms`) rather than
        on the vector :math:`f(A) b` (:meth:`LanczosRun.apply`, :meth:`LanczosRun.projections`).
    :param reference: optional ``(c,)``: judge the quadratic form :math:`q` of a column relative to
        :math:`\max(|r - q|, 10^{-3} |r|)` instead of :math:`|q|` (for a variance :math:`r - q`
        computed as a difference, e.g. a prior variance minus what the data explain).
    :param left: optional :math:`L`, ``(n, m)``: accumulate :math:`L^\top q_j` for
        :meth:`LanczosRun.projections` (memory ``steps·m·c``), for the columns ``left_columns``
        (default: all).
    :param keep_bytes: keep the first Lanczos vectors (``(n, c)`` blocks) up to this many bytes,
        so that :meth:`LanczosRun.apply` needs fewer products (none if all fit).
    :param tolerance: stop a column when the estimated relative error of :math:`f(T) e_1` (of its
        first entry with ``quadrature``) is at most this, for every function: the change since the
        previous check, enlarged when convergence is slow (:func:`_error_estimate`).
    :param max_iterations: the most products; unconverged columns then warn (``warn``).
    :param check_every: steps between convergence checks (each costs small eigendecompositions).
    """
    check_options(tolerance, max_iterations, check_every)
    if start.dim() != 2:
        raise ValueError(f"start must be (n, c), got shape {tuple(start.shape)}")
    norms = start.norm(dim=0)
    columns = _Columns.check(start, norms, functions, quadrature, reference, left, left_columns)
    run = _FirstPass(start, norms, columns, left, max_iterations, keep_bytes)
    with progress_bar(None, "Lanczos", unit="product") as bar:  # the number of steps is known when converged
        while any(run.active) and run.steps < max_iterations:
            index, beta = run.step(matmul)
            run.judge(index, beta, run.steps % check_every == 0 or run.steps == max_iterations, tolerance)
            bar.update(1)
    outcome = run.outcome()
    unconverged = run.unconverged()
    if unconverged and warn:
        warnings.warn(
            f"Lanczos did not converge in {max_iterations} iterations for {len(unconverged)} of {start.shape[1]} "
            f"columns (estimated relative error {outcome.max_change:.2g} > tolerance {tolerance:.2g}); raise "
            "max_iterations, loosen the tolerance, or add a ridge (diag_reg > 0) to bound the condition number",
            NumericalWarning,
            stacklevel=2,
        )
    return outcome


def _error_estimate(change: float, last_change: float) -> float:
    r"""The remaining relative error after a check: the change since the previous check, enlarged for slow convergence.

    If successive changes shrink geometrically by :math:`r` per check, the remaining error is
    :math:`\delta\, r/(1 - r)`; with :math:`r` estimated as the ratio of the last two changes
    (capped at 0.99), the estimate is :math:`\delta \max(1, r/(1 - r))`: never below the change
    itself, and larger where :math:`1/\lambda` on an ill-conditioned kernel converges slowly.
    """
    if change == 0 or not math.isfinite(last_change) or last_change == 0:
        return change
    ratio = min(change / last_change, 0.99)
    return change * max(1.0, ratio / (1 - ratio))


#: with a ``reference`` r, quadratic forms q are judged relative to max(|r - q|, REFERENCE_FLOOR |r|)
REFERENCE_FLOOR = 1e-3


def _change(current: Tensor, previous: Tensor | None, quadratic: bool, reference: float | None = None) -> float:
    """The relative change of ``f(T) e1`` (or of its first entry) since the previous check, worst over the functions."""
    if previous is None:
        return math.inf
    if quadratic:
        difference, size = (current[:, 0] - previous[:, 0]).abs(), current[:, 0].abs()
        if reference is not None:
            size = (reference - current[:, 0]).abs().clamp_min(REFERENCE_FLOOR * abs(reference))
    else:
        padded = torch.zeros_like(current)
        padded[:, : previous.shape[-1]] = previous
        difference, size = (current - padded).norm(dim=-1), current.norm(dim=-1)
    ratio = torch.where(difference == 0, torch.zeros_like(size), difference / size)
    return float(ratio.max()) if ratio.numel() else 0.0


def largest_eigenvalue(
    matmul: MatMul,
    n: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    tolerance: float = 1e-10,
    max_iterations: int = 300,
    check_every: int = 5,
    seed: int = 0,
) -> float:
    r"""The largest eigenvalue of a symmetric :math:`A` (``matmul``: ``(n, 1) -> (n, 1)``), by Lanczos.

    The largest Ritz value :math:`\theta_{\max}(T_k)` increases to :math:`\lambda_{\max}` from
    below, fast when :math:`\lambda_{\max}` is separated from the rest of the spectrum
    (Kaniel–Paige–Saad bounds); it stops when its relative change between checks is at most
    ``tolerance``. The start vector is a seeded Gaussian (deterministic, and almost surely not
    orthogonal to the top eigenvector).
    """
    check_options(tolerance, max_iterations, check_every)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(n, 1, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    state = _Recurrence(start, start.norm(dim=0))
    index = torch.zeros(1, dtype=torch.long, device=start.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    previous, top = None, 0.0
    for step in range(1, max_iterations + 1):
        alpha, u = state.residual(index, matmul(state.q))
        beta = u.norm(dim=-2)
        if beta[0] <= BREAKDOWN * n * torch.finfo(dtype).eps * max(abs(float(alpha[0])), float(beta[0])):
            beta = torch.zeros_like(beta)
        alphas.append(alpha[0])
        betas.append(beta[0])
        state.advance(index, u, beta)
        if step % check_every == 0 or beta[0] == 0 or step == max_iterations:
            top = float(_ritz(torch.stack(alphas), torch.stack(betas[:-1]))[0].max())
            if beta[0] == 0 or (previous is not None and abs(top - previous) <= tolerance * abs(top)):
                return top
            previous = top
    warnings.warn(
        f"the largest eigenvalue did not converge in {max_iterations} Lanczos iterations; "
        f"using the Ritz value {top:.6g}",
        NumericalWarning,
        stacklevel=2,
    )
    return top
