"""Exactness at coincident points: identical input rows give identical kernel rows.

References: the kernel of a point with itself from the per-point recursion (``diag=True``), and
the kernel rows of the other copy, which must agree to 1e-14 relative (float64); and the t = ∞
posterior, which must interpolate the training data at identical inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import gpntk
from gpntk import layers as L

ACTIVATIONS = ["relu", "abs", "leaky_relu", "sign", "erf", "gelu", "sin", "gaussian", "tanh"]


def data(n: int = 30, d: int = 5, seed: int = 0) -> torch.Tensor:
    """Random rows with row 1 = row 0, row 7 = row 3 and row 12 = row 0 (three copies)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x[1] = x[0]
    x[7] = x[3]
    x[12] = x[0]
    return x


def relative_row_gap(k: torch.Tensor, i: int, j: int) -> float:
    return ((k[i] - k[j]).abs().max() / k.abs().max()).item()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kernel_type", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_identical_rows_give_identical_kernel_rows(activation, kernel_type):
    """K(x, x), K(x, x.clone()) and K(x, y) with y holding copies: rows of identical inputs agree to 1e-14.

    Measured before: 2.3e-7 for the ReLU NTK (the correlation of two identical rows rounded below
    one, and arccos turned 1e-16 into 1e-8).
    """
    net = L.mlp(depth=3, activation=activation, weight_variance=1.7, bias_variance=0.1)
    kernel = kernel_type(net)
    x = data()
    y = torch.cat([x[:5], torch.randn(4, 5, dtype=torch.float64)]).clone()
    for other in (x, x.clone(), y):
        k = kernel(x, other).to_dense()
        for i, j in [(0, 1), (3, 7), (0, 12)]:
            assert relative_row_gap(k, i, j) <= 1e-14
    # K(x, x): columns too, and the coincident entries equal the per-point kernel exactly
    k = kernel(x).to_dense()
    diag = kernel(x, diag=True)
    assert torch.equal(k.diagonal(), diag)
    for i, j in [(0, 1), (3, 7), (0, 12), (1, 12)]:
        assert k[i, j] == diag[i] == diag[j]
        assert relative_row_gap(k.T, i, j) <= 1e-14


def test_row_gap_relu_ntk_measured_case():
    """The issue's case: K[0, 0] - K[0, 1] for two identical rows of a ReLU NTK is exactly 0."""
    torch.manual_seed(0)
    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    for seed in range(5):
        x = data(20, 7, seed)
        k = gpntk.NTKKernel(net)(x, x.clone()).to_dense()
        assert k[0, 0] == k[0, 1] == k[1, 0] == k[1, 1]
        assert relative_row_gap(k, 0, 1) <= 1e-15


def test_diag_agrees_with_the_full_matrix_for_equal_but_distinct_tensors():
    """kernel(x1, x2, diag=True) with x2 an equal copy equals the diagonal of the full matrix bitwise."""
    net = L.mlp(depth=2, activation="relu", weight_variance=2.0, bias_variance=0.1)
    x = data()
    for kernel in (gpntk.NTKKernel(net), gpntk.NNGPKernel(net)):
        full = kernel(x).to_dense().diagonal()
        assert torch.equal(kernel(x, x.clone(), diag=True), full)
        assert torch.equal(kernel(x, diag=True), full)


def test_blocked_evaluation_keeps_coincident_rows_exact():
    """Kernels computed in blocks (rows 0 and 12 in different blocks) are exact across blocks too."""
    from gpntk.kernels.dense import nngp_and_ntk

    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    x = data()
    for other in (None, x.clone()):
        cov, ntk = nngp_and_ntk(net, x, other, block_elements=64)
        for k in (cov, ntk):
            assert k[0, 12] == k[0, 0] == k[12, 12]
            assert relative_row_gap(k, 0, 12) <= 1e-15


def test_spatial_inputs_coincident_rows():
    """A CNN with pooling: identical images give identical kernel rows."""
    net = L.serial(L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(),
                   L.Conv(3, weight_variance=2.0), L.ReLU(), L.GlobalAvgPool(), L.Dense())
    torch.manual_seed(0)
    x = torch.randn(6, 2 * 5 * 5, dtype=torch.float64)
    x[4] = x[1]
    kernel = gpntk.NTKKernel(net, input_shape=(2, 5, 5))
    k = kernel(x, x.clone()).to_dense()
    assert relative_row_gap(k, 1, 4) <= 1e-14
    assert k[1, 4] == k[1, 1]
    torch.testing.assert_close(kernel(x, diag=True), k.diagonal(), rtol=1e-14, atol=0)


def test_trained_ensemble_interpolates_identical_inputs():
    """t = ∞: two identical training inputs (same target) get identical means; a test point equal to a
    training point reproduces its target to ~1e-12.

    Measured before: means 3.0 and -1.5e-8 at two identical inputs; a test point equal to a training
    point 1.4e-9 off.
    """
    torch.manual_seed(0)
    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    x = data(20, 7)
    y = torch.sin(x.sum(-1))
    post = gpntk.TrainedEnsemble(net, x, y)
    with pytest.warns(gpntk.NumericalWarning):  # the duplicated rows make the training kernel singular
        mean, _ = post.moments(x, t=math.inf)
    assert mean[0] == mean[1] == mean[12]
    assert mean[3] == mean[7]
    torch.testing.assert_close(mean, y, rtol=0, atol=1e-11)
    for i in (0, 3, 5):
        test_mean, _ = post.moments(x[i:i + 1].clone(), t=math.inf)
        assert abs(test_mean[0] - y[i]) <= 1e-12 * (1 + y.abs().max())


def test_float32_coincident_rows():
    """float32: identical rows give bitwise identical kernel entries with each other and the diagonal."""
    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    x = data().float()
    k = gpntk.NTKKernel(net)(x, x.clone()).to_dense()
    assert k[0, 1] == k[0, 0] == k[1, 1]
    assert relative_row_gap(k, 0, 1) <= 1e-6


def test_negative_zero_and_nan_rows():
    """-0.0 and 0.0 are the same input; a row containing NaN is coincident with nothing but itself."""
    from gpntk.core.coincident import coincident_pairs

    a = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [float("nan"), 1.0], [float("nan"), 1.0]], dtype=torch.float64)
    assert sorted(coincident_pairs(a, a.clone()).flat.tolist()) == [0, 1, 4, 5]  # (0,0), (0,1), (1,0), (1,1)
    # and each row of one tensor with itself
    assert sorted(coincident_pairs(a, a).flat.tolist()) == [0, 1, 4, 5, 10, 15]
    # the mask form (batched inputs) agrees
    mask = coincident_pairs(a.unsqueeze(0), a.clone().unsqueeze(0)).mask[0]
    assert mask.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_same_point_pairs_and_common_pairs():
    """After a Dropout only a point with itself stays coincident; merged branches keep the common pairs."""
    from gpntk.core.coincident import Coincidence, RowIds, common_pairs, same_point_pairs

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    ids = RowIds(x, x).block()
    assert ids is not None and ids.rows is not None and len(ids.rows) == 5  # 3 diagonal + 2 duplicates
    diagonal = same_point_pairs(ids, True, 3, 3)
    assert diagonal is not None and diagonal.flat is not None
    assert diagonal.flat.tolist() == [0, 4, 8]
    assert same_point_pairs(ids, False, 3, 3) is None and same_point_pairs(None, True, 3, 3) is None
    merged = common_pairs([ids, diagonal])
    assert merged is not None and sorted(merged.flat.tolist()) == [0, 4, 8]
    assert common_pairs([ids, ids]) is ids and common_pairs([ids, None]) is None
    mask = (x.unsqueeze(-2) == x.unsqueeze(-3)).all(-1)
    masked = same_point_pairs(Coincidence(mask=mask), True, 3, 3)
    assert masked is not None and torch.equal(masked.mask, torch.eye(3, dtype=torch.bool))
    both = common_pairs([Coincidence(mask=mask), masked])
    assert both is not None and torch.equal(both.mask, torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("collide", [False, True])
def test_row_ids_match_sorting_the_rows(dtype, collide, monkeypatch):
    """The hashed row ids (rows all distinct: one sort of integers) partition rows as ``torch.unique(dim=0)``
    does: with duplicates, -0.0 against 0.0, and every hash colliding (then rows are sorted themselves)."""
    from gpntk.core import coincident

    if collide:
        monkeypatch.setattr(coincident, "_HASH_BASE", 0)  # every row hashes to 0
    g = torch.Generator().manual_seed(7)
    for duplicates in (False, True):
        rows = (torch.randn(200, 6, generator=g, dtype=torch.float64) * 100).to(dtype)
        if duplicates:
            rows[5] = rows[17]
            rows[40] = rows[17]
            rows[60] = 0
            rows[61] = -rows[60] if dtype.is_floating_point else 0
        ids, distinct = coincident._distinct_row_ids(rows)
        reference = torch.unique(rows, dim=0, return_inverse=True)[1]
        assert distinct == int(reference.max()) + 1
        same = ids.unsqueeze(0) == ids.unsqueeze(1)
        assert torch.equal(same, reference.unsqueeze(0) == reference.unsqueeze(1))
        assert bool(same[5, 40]) == duplicates and bool(same[60, 61]) == duplicates


def test_blocks_of_distinct_rows_mark_each_point_with_itself():
    """Distinct rows of one tensor: a block's coincident pairs are exactly the pairs (i, i) it holds
    (a mask, which compiled loops fuse), none in a block off the diagonal."""
    from gpntk.core.coincident import RowIds

    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ids = RowIds(x, x)
    everything = (x.unsqueeze(-2) == x.unsqueeze(-3)).all(-1)
    for rows, cols in [(slice(0, 4), slice(0, 4)), (slice(2, 7), slice(4, 10)), (slice(6, 10), slice(0, 3))]:
        block = ids.block(rows, cols)
        expected = everything[rows, cols]
        if not bool(expected.any()):
            assert block is None
            continue
        assert block is not None and block.mask is not None
        assert torch.equal(block.mask, expected)
    other = RowIds(x, x.clone()).block()  # equal values in another tensor: coincident too, found by their ids
    assert other is not None and other.flat is not None and other.flat.tolist() == [11 * i for i in range(10)]
