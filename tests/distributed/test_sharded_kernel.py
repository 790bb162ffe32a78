"""gpntk.distributed in one process: the row plan, the gather over ranks (emulated), exactness, errors.

The gathers over ranks are emulated here by operators that believe they are rank r of p and put
their rows in place among zeros, summed by the test; tests/distributed/test_two_ranks.py runs real
gloo processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _distributed_case as case
import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator

import gpntk
from gpntk.distributed import ShardedKernel, ShardedTrainProduct
from gpntk.distributed.group import Communicator, fingerprint
from gpntk.distributed.operator import ShardedKernelOperator
from gpntk.distributed.rows import MAX_BLOCK_ELEMENTS, plan_rows


class _Rank(Communicator):
    """Rank ``rank`` of ``size``, whose concatenations hold its own part among zeros (the test sums the ranks)."""

    def __init__(self, rank: int, size: int):
        super().__init__()
        self.rank, self.size = rank, size

    def concat(self, part, counts, replicated=(), what="vectors"):  # type: ignore[no-untyped-def]
        out = part.new_zeros(sum(counts), *part.shape[1:])
        start = sum(counts[: self.rank])
        out[start : start + counts[self.rank]] = part
        return out


@pytest.mark.parametrize("shape", [(700, 700), (90, 700), (5, 700), (3000, 3000)])
def test_row_blocks_do_not_depend_on_the_world_size(shape):
    """Every world size deals the same blocks, contiguously, in row order, balanced to one block."""
    blocks = plan_rows(*shape, 1)[0]
    assert blocks[0].start == 0 and blocks[-1].stop == shape[0]
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert all((b.stop - b.start) * shape[1] <= MAX_BLOCK_ELEMENTS for b in blocks)
    for world in (2, 3, 5):
        plan = plan_rows(*shape, world)
        assert [b for rank in plan for b in rank] == blocks
        assert max(map(len, plan)) - min(map(len, plan)) <= 1


def test_fingerprint_sees_one_bit_and_a_swap():
    t = torch.randn(50, 3, dtype=torch.float64)
    flipped = t.clone()
    flipped[7, 1] = torch.nextafter(flipped[7, 1], torch.tensor(2.0, dtype=torch.float64))
    swapped = t.clone()
    swapped[[3, 4]] = t[[4, 3]]
    assert torch.equal(fingerprint([t]), fingerprint([t.clone()]))
    assert not torch.equal(fingerprint([t]), fingerprint([flipped]))
    assert not torch.equal(fingerprint([t]), fingerprint([swapped]))
    assert (fingerprint([t]) < 2**21).all() and (fingerprint([t]) == fingerprint([t]).round()).all()


def _operators(kernel, x1, x2, world):
    named = list(kernel.named_parameters())
    names, values = tuple(n for n, _ in named), [v for _, v in named]
    return [
        ShardedKernelOperator(x1, x2, *values, kernel=kernel, names=names, comm=_Rank(r, world), store=store)
        for r in range(world)
        for store in [r % 2 == 0]  # stored rows on some ranks, recomputed on others
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sum_of_ranks_is_the_dense_kernel(float64_default, world):
    x, _, test_x = case.data(300)
    kernel = case.base_kernel()
    v = torch.randn(300, 4)
    with torch.no_grad():
        for x1 in (x, test_x):
            dense = kernel(x1, x).to_dense()
            ops = _operators(kernel, x1, x, world)
            torch.testing.assert_close(sum(op @ v for op in ops), dense @ v, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(sum(op.to_dense() for op in ops), dense, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sum_of_ranks_gradients_are_the_dense_gradients(float64_default, world):
    """Bilinear derivatives (the MLL's backward) and the dense matrix's backward, against autograd of the dense one."""
    x, _, _ = case.data(200)
    x = x.clone().requires_grad_(world == 2)  # input gradients too, on one of the cases
    kernel = case.base_kernel()
    params = [p for _, p in kernel.named_parameters()]
    u, v, g = torch.randn(200, 3), torch.randn(200, 3), torch.randn(200, 200)
    targets = params + ([x] if x.requires_grad else [])
    dense = kernel(x, x).to_dense()
    expected_bilinear = torch.autograd.grad((u * (dense @ v)).sum(), targets, retain_graph=True)
    expected_dense = torch.autograd.grad((g * dense).sum(), targets)
    for loss_of, expected in (
        (lambda op: (u * op.matmul(v)).sum(), expected_bilinear),  # linear_operator's Matmul: _bilinear_derivative
        (lambda op: (g * op.to_dense()).sum(), expected_dense),
    ):
        grads = [torch.zeros_like(t) for t in targets]
        for op in _operators(kernel, x, x, world):
            for total, grad in zip(grads, torch.autograd.grad(loss_of(op), targets)):
                total += grad
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_one_process_gp_is_the_plain_gp():
    """Without torch.distributed the sharded kernel runs the same CG iterations on the same numbers.

    Its products are the plain kernel's bit for bit (rows of the same matrix product), so the MLL and
    the predictions are too; gradients of the kernel's parameters are sums over row blocks, in another
    order than the plain kernel's one autograd pass, so they agree to round-off.
    """
    plain, sharded = case.gp_results(sharded=False), case.gp_results(sharded=True)
    assert plain.keys() == sharded.keys()
    for key in plain:
        if key.startswith("grad:covar_module."):
            torch.testing.assert_close(sharded[key], plain[key], rtol=1e-13, atol=1e-18)
        else:
            assert torch.equal(plain[key], sharded[key]), key


def test_preconditioner_rows_and_diagonal_match_the_dense_kernel(float64_default):
    x, _, _ = case.data(300)
    kernel = case.base_kernel()
    with torch.no_grad():
        dense, op = kernel(x).to_dense(), ShardedKernel(kernel)(x).evaluate_kernel()
        torch.testing.assert_close(op.diagonal(), dense.diagonal(), rtol=1e-14, atol=1e-14)
        rows = torch.tensor([[5], [17]])
        columns = torch.arange(300)
        torch.testing.assert_close(op[..., rows, columns], dense[rows, columns], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(
            op.pivoted_cholesky(rank=8), DenseLinearOperator(dense).pivoted_cholesky(rank=8), rtol=1e-10, atol=1e-10
        )


def test_trained_ensemble_with_sharded_product_is_the_default_one():
    plain, sharded = case.ensemble_results(sharded=False), case.ensemble_results(sharded=True)
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=1e-12, atol=1e-14)


def test_bad_use_raises_clear_errors():
    with pytest.raises(TypeError, match="gpytorch.kernels.Kernel"):
        ShardedKernel(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="store"):
        ShardedKernel(gpytorch.kernels.RBFKernel(), store="yes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not initialized"):
        ShardedKernel(gpytorch.kernels.RBFKernel(), group=object())  # type: ignore[arg-type]
    x = torch.randn(20, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rhs must be"):
        ShardedTrainProduct(gpntk.layers.mlp(depth=1), x)(torch.randn(19, 2, dtype=torch.float64), ("ntk",))
    with pytest.raises(ValueError, match="kinds"):
        ShardedTrainProduct(gpntk.layers.mlp(depth=1), x)(torch.randn(20, 2, dtype=torch.float64), ("rbf",))


def test_any_gpytorch_kernel(float64_default):
    x = torch.randn(150, 3)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()) + gpntk.NNGPKernel(gpntk.layers.mlp(depth=2))
    v = torch.randn(150, 2)
    with torch.no_grad():
        torch.testing.assert_close(ShardedKernel(kernel)(x) @ v, kernel(x).to_dense() @ v, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_two_rank_reference_does_not_depend_on_importing_botorch():
    """The test session imports BoTorch (which changes GPyTorch's defaults); the ranks do not."""
    pytest.importorskip("botorch")
    code = (
        "import sys; sys.path.insert(0, 'tests'); import _distributed_case as c\n"
        "a = c.gp_results(False)\nimport botorch\nb = c.gp_results(False)\n"
        "assert all(bool((a[k] == b[k]).all()) for k in a), [k for k in a if not (a[k] == b[k]).all()]\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
