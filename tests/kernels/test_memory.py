"""Memory of matrix-free exact GPs: no tensor anywhere near n x n is ever allocated.

The reference is the size of every tensor torch allocates (each operator's outputs, seen by a
``TorchDispatchMode``, forward and backward alike), not a wall-clock or RSS threshold: with the
blockwise backend one marginal-likelihood step (CG, its pivoted-Cholesky preconditioner and their
gradients) and a LOVE prediction hold O(n) vectors and one block at a time. The control, the dense
backend, must allocate the n x n matrix, so the counter is seen to work.

Measured before the fix: GPyTorch's pivoted-Cholesky backward asks for ``(n, 15)`` single entries
of the kernel (a batch of 1 x 1 kernels) and the coincident-row search copied every row of both
inputs twice and sorted them (``2 n 15 d`` numbers; 290 MiB live and 4.8 s at n = 20 000).
"""

from __future__ import annotations

import traceback

import gpytorch
import linear_operator
import pytest
import torch
from _models import ExactGP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gpntk
from gpntk import layers as L
from gpntk.core.coincident import RowIds

N, D, BLOCK = 300, 4, 4096


class LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor (numbers in its storage) any operator returns, with the operator."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views are not new
                numbers = t.untyped_storage().nbytes() // t.element_size()
                if numbers > self.largest:
                    stack = "".join(traceback.format_stack(limit=16)[:-1])
                    self.largest, self.where = numbers, f"{func} -> {tuple(t.shape)}, at\n{stack}"
        return out


def _fit_step_and_predict(backend: str) -> LargestAllocation:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 30, D, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(N + 30, generator=g, dtype=torch.float64)
    kernel = gpytorch.kernels.ScaleKernel(
        gpntk.NTKKernel(L.mlp(3, "relu", weight_variance=2.0, bias_variance=0.1), backend=backend, block_elements=BLOCK)
    ).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.05
    model = ExactGP(x[:N], y[:N], kernel, likelihood)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    counter = LargestAllocation()
    with (
        gpytorch.settings.max_cholesky_size(0),
        linear_operator.settings.max_cholesky_size(0),  # also where BoTorch's import raised it
        gpytorch.settings.fast_computations(True, True, True),  # CG and Lanczos, whatever an earlier test set
        gpytorch.settings.min_preconditioning_size(0),  # the pivoted-Cholesky preconditioner, as at large n
        gpntk.settings.fusion(False),
        counter,
    ):
        model.train()
        loss = -mll(model(x[:N]), y[:N])
        loss.backward()
        model.eval()
        with torch.no_grad(), gpytorch.settings.fast_pred_var(), gpytorch.settings.max_root_decomposition_size(10):
            prediction = likelihood(model(x[N:]))
            prediction.mean, prediction.variance
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return counter


@pytest.mark.filterwarnings("ignore:CG terminated")
def test_matrix_free_mll_step_and_prediction_allocate_no_large_tensor():
    """Blockwise: the largest tensor of a CG marginal-likelihood step with gradients and a LOVE prediction.

    Allowed: blocks (``BLOCK`` numbers), vectors of ``n x (probes + 1)``, the pivoted-Cholesky factor
    ``n x 15`` and GPyTorch's gathered inputs of its ``(n, 15)`` entries (``n 15 d`` numbers). The
    bound, a quarter of the n x n matrix, is below twice that gather, what the coincident-row search
    allocated before (a copy of both inputs' rows).
    """
    counter = _fit_step_and_predict("blockwise")
    assert counter.largest < N * N // 4, counter.where


def test_dense_backend_control_allocates_the_matrix():
    """The counter sees an n x n matrix where one is stored (the dense backend)."""
    assert _fit_step_and_predict("dense").largest >= N * N


def test_coincident_pairs_of_a_batch_of_single_entries():
    """RowIds on ``(n, m, 1, d)`` inputs (GPyTorch's batches of 1 x 1 kernels) finds exactly the equal rows.

    Reference: every pair compared with ``torch.equal`` in Python. Covers an exact copy, ``-0.0``
    against ``0.0`` (equal) and rows with NaN (equal to nothing, not even themselves).
    """
    g = torch.Generator().manual_seed(3)
    points = torch.randn(6, 3, generator=g, dtype=torch.float64)
    points[2] = points[0]
    points[4] = torch.tensor([0.0, 1.0, 2.0])
    points[5] = torch.tensor([-0.0, 1.0, 2.0])
    points[1, 1] = float("nan")
    rows = torch.tensor([0, 1, 2, 3, 4, 5]).unsqueeze(-1).expand(6, 4)
    cols = torch.tensor([0, 1, 2, 5]).unsqueeze(0).expand(6, 4)
    x1, x2 = points[rows].unsqueeze(-2), points[cols].unsqueeze(-2)  # (6, 4, 1, 3)
    counter = LargestAllocation()
    with counter:
        found = RowIds(x1, x2).block()
    assert found is not None and found.mask is not None
    want = torch.tensor(
        [[bool(torch.equal(points[i], points[j])) and not bool(points[i].isnan().any()) for j in (0, 1, 2, 5)]
         for i in range(6)]
    )
    assert torch.equal(found.mask[..., 0, 0], want)
    assert want.sum() == 6  # rows 0 and 2 with points 0 and 2, row 4 and row 5 with point 5
    assert counter.largest <= x1.numel()  # no copy of the rows: one boolean per pair and feature at most
