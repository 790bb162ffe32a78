"""The façade and its solvers: one solver object per ensemble, chosen once, and settings that reach it."""

from __future__ import annotations

import pytest
import torch

from gpntk import layers as L
from gpntk.posterior import TrainedEnsemble
from gpntk.posterior.eigh import EighSolver
from gpntk.posterior.krylov import KrylovSolver
from gpntk.posterior.solver import PosteriorSolver


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)
    return x, y, torch.randn(5, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("solver, kind", [("eigh", EighSolver), ("lanczos", KrylovSolver)])
def test_the_solver_name_becomes_one_solver_object(solver, kind):
    x, y, _ = _problem()
    post = TrainedEnsemble(L.mlp(1, "relu"), x, y, diag_reg=1e-3, solver=solver)
    engine: PosteriorSolver = post._solver
    assert isinstance(engine, kind) and engine.name == post.solver == solver
    shifted = post.with_diag_reg(0.1)
    assert isinstance(shifted._solver, kind) and shifted._solver is not engine
    # the training kernels are shared, the ridge is not
    assert shifted._solver.problem.train_kernels is engine.problem.train_kernels
    assert engine.problem.diag_reg == 1e-3 and shifted._solver.problem.diag_reg == 0.1


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
def test_a_learning_rate_set_later_equals_a_new_ensemble(solver):
    """The CLI sets post.learning_rate after max_learning_rate(); only the time scale changes."""
    x, y, test_x = _problem()
    net = L.mlp(2, "erf")
    post = TrainedEnsemble(net, x, y, diag_reg=1e-3, solver=solver)
    post.moments(test_x, 2.0)
    post.learning_rate = 0.25
    fresh = TrainedEnsemble(net, x, y, learning_rate=0.25, diag_reg=1e-3, solver=solver)
    assert post.learning_rate == 0.25
    for ours, theirs in zip(post.moments(test_x, 2.0), fresh.moments(test_x, 2.0)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post.train_loss(3.0), fresh.train_loss(3.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_learning_rate_set_later_is_checked_as_at_construction(value):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    post = TrainedEnsemble(L.mlp(1), x, y, learning_rate=0.5)
    with pytest.raises(ValueError, match="learning_rate"):
        post.learning_rate = value
    assert post.learning_rate == 0.5
