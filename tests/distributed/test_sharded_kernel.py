"""gpntk.distributed in one process: the tile plan, the sum over ranks (emulated), exactness, errors.

The sums over ranks are emulated here by operators that believe they are rank r of p and a
sum taken by the test; tests/distributed/test_two_ranks.py runs real gloo processes.
"""

from __future__ import annotations

import _distributed_case as case
import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator

import gpntk
from gpntk.distributed import ShardedKernel, ShardedTrainProduct
from gpntk.distributed.group import Communicator, fingerprint
from gpntk.distributed.operator import ShardedKernelOperator
from gpntk.distributed.tiles import plan_tiles


class _Rank(Communicator):
    """Rank ``rank`` of ``size``, whose sums are left to the test."""

    def __init__(self, rank: int, size: int):
        super().__init__()
        self.rank, self.size = rank, size

    def sum(self, partial, replicated=(), what="vectors"):  # type: ignore[no-untyped-def]
        return partial


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("shape, symmetric", [((700, 700), True), ((700, 700), False), ((90, 700), False)])
def test_tiles_cover_every_entry_once(world, shape, symmetric):
    count = torch.zeros(shape, dtype=torch.int64)
    loads = []
    for tiles in plan_tiles(*shape, symmetric, True, world):
        load = 0
        for rows, cols, diagonal, mirrored in tiles:
            count[rows, cols] += 1
            if mirrored:
                count[cols, rows] += 1
            assert not diagonal or rows == cols
            load += (rows.stop - rows.start) * (cols.stop - cols.start)
        loads.append(load)
    assert torch.equal(count, torch.ones_like(count))
    if world > 1 and symmetric:  # balanced: no rank has much more than its share
        assert max(loads) <= 1.35 * sum(loads) / world


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
        for store in [r % 2 == 0]  # stored tiles on some ranks, recomputed on others
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


def test_one_process_gp_is_the_plain_gp_bit_for_bit():
    """Without torch.distributed the sharded kernel runs the same CG iterations on the same numbers."""
    plain, sharded = case.gp_results(sharded=False), case.gp_results(sharded=True)
    assert plain.keys() == sharded.keys()
    for key in plain:
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
