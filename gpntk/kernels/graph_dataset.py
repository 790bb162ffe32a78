r"""Graph-level kernels on graph indices (:class:`~gpntk.core.graph_inputs.GraphDataset`), bucket by bucket.

The requested graphs of each side are grouped into buckets of similar sizes
(:func:`~gpntk.core.graph_inputs.size_buckets`); every pair of buckets is evaluated as rows of
:class:`~gpntk.core.graph_inputs.GraphInputs` padded to the larger of the two bucket sizes (by
the dense engine, in blocks, with gradients), and the blocks are placed into the result. A pair of
graphs of :math:`N` and :math:`N'` nodes then costs about :math:`O(N N')` per layer however large
the dataset's largest graph is. Padding never changes a value, so the result is the kernel of the
graphs themselves. The kernel matrix is always stored (dense backend); products for Krylov
solvers (:func:`dataset_kernel_matmul`) hold one pair of buckets at a time.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from ..core.graph_inputs import GraphDataset, GraphInputs, size_buckets
from .planning import batch_shape_of

__all__ = ["BucketPair", "bucket_pairs", "dataset_kernels", "dataset_kernel_diagonal", "dataset_kernel_matmul"]

#: evaluates one pair of buckets: ``(fmt, rows1, rows2) -> (Σ, Θ or None)``
BlockEvaluator = Callable[[GraphInputs, Tensor, Tensor], tuple[Tensor, Tensor | None]]


class BucketPair(NamedTuple):
    """One pair of buckets: positions into each side's indices, and both sides as rows of one padded format."""

    positions1: Tensor
    positions2: Tensor
    format: GraphInputs
    rows1: Tensor
    rows2: Tensor
    mirrored: bool  # the two sides are the same graphs and this block also stands for its transpose


def bucket_pairs(
    dataset: GraphDataset, index1: Tensor, index2: Tensor, same: bool, like: Tensor
) -> Iterator[BucketPair]:
    """Every pair of buckets of ``index1`` × ``index2`` to evaluate (with ``same``, on and above the diagonal).

    Within one bucket of the same graphs, ``rows2 is rows1`` (the engine then uses the per-point
    recursion on the diagonal).
    """
    buckets1 = dataset.buckets(index1)
    buckets2 = buckets1 if same else dataset.buckets(index2)
    sizes = dataset.sizes
    for a, p1 in enumerate(buckets1):
        for b, p2 in enumerate(buckets2):
            if same and b < a:
                continue
            g1, g2 = index1[p1], index2[p2]
            nodes = int(max(sizes[g1.cpu()].max(), sizes[g2.cpu()].max()))
            fmt, rows1 = dataset.rows(g1, nodes, like)
            rows2 = rows1 if same and a == b else dataset.rows(g2, nodes, like)[1]
            yield BucketPair(p1, p2, fmt, rows1, rows2, same and b > a)


def _same(dataset: GraphDataset, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, bool]:
    index1 = dataset.indices(x1)
    index2 = index1 if x2 is x1 else dataset.indices(x2)
    return index1, index2, x1 is x2 or torch.equal(index1, index2)


def dataset_kernels(
    x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], dataset: GraphDataset, evaluate_block: BlockEvaluator
) -> tuple[Tensor, Tensor | None]:
    """``(Σ(x1, x2), Θ(x1, x2) or None)``, ``(*batch, n1, n2)``, for graph-index rows ``x1`` ``(n1, 1)`` and ``x2``."""
    index1, index2, same = _same(dataset, x1, x2)
    batch = batch_shape_of(x1, x2, hyper)
    outputs: list[Tensor | None] = [None, None]
    for pair in bucket_pairs(dataset, index1, index2, same, x1):
        p1, p2 = pair.positions1, pair.positions2
        for which, block in enumerate(evaluate_block(pair.format, pair.rows1, pair.rows2)):
            if block is None:
                continue
            target = outputs[which]
            if target is None:
                target = outputs[which] = block.new_zeros(*batch, len(index1), len(index2))
            block = block.expand(*batch, len(p1), len(p2))
            target[..., p1.unsqueeze(-1), p2] = block
            if pair.mirrored:
                target[..., p2.unsqueeze(-1), p1] = block.transpose(-1, -2)
    return outputs[0], outputs[1]  # type: ignore[return-value]  # one bucket pair at least: Σ is set


def dataset_kernel_diagonal(
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    dataset: GraphDataset,
    diagonal: Callable[[GraphInputs, Tensor, Tensor], Tensor],
) -> Tensor:
    """The diagonal :math:`k(x_{1,i}, x_{2,i})` ``(*batch, n)``; ``diagonal(fmt, rows1, rows2)`` evaluates one bucket.

    Pairs are bucketed by the larger graph of each pair, so both graphs of a pair share a padding;
    when ``x1 is x2`` ``rows2 is rows1`` (the per-point recursion).
    """
    index1, index2, _ = _same(dataset, x1, x2)
    batch = batch_shape_of(x1, x2, hyper)
    sizes = dataset.sizes
    largest = torch.maximum(sizes[index1.cpu()], sizes[index2.cpu()])
    out: Tensor | None = None
    for positions in size_buckets(largest, dataset.growth):
        nodes = int(largest[positions].max())
        positions = positions.to(index1.device)
        fmt, rows1 = dataset.rows(index1[positions], nodes, x1)
        rows2 = rows1 if x2 is x1 else dataset.rows(index2[positions], nodes, x1)[1]
        part = diagonal(fmt, rows1, rows2)
        if out is None:
            out = part.new_zeros(*batch, len(index1))
        out[..., positions] = part.expand(*batch, len(positions))
    assert out is not None  # at least one point
    return out


def dataset_kernel_matmul(
    x1: Tensor,
    x2: Tensor,
    rhs: Tensor,
    hyper: dict[str, Tensor],
    dataset: GraphDataset,
    kinds: tuple[str, ...],
    evaluate_block: BlockEvaluator,
) -> tuple[Tensor, ...]:
    """The products :math:`K(x_1, x_2)\\,V` for each kernel in ``kinds``, one pair of buckets at a time."""
    index1, index2, same = _same(dataset, x1, x2)
    batch = torch.broadcast_shapes(batch_shape_of(x1, x2, hyper), rhs.shape[:-2])
    outputs = [rhs.new_zeros(*batch, len(index1), rhs.shape[-1]) for _ in kinds]
    for pair in bucket_pairs(dataset, index1, index2, same, x1):
        cov, ntk = evaluate_block(pair.format, pair.rows1, pair.rows2)
        for out, kind in zip(outputs, kinds):
            block = ntk if kind == "ntk" else cov
            assert block is not None  # the NTK is computed when asked for
            out[..., pair.positions1, :] += block @ rhs[..., pair.positions2, :]
            if pair.mirrored:
                out[..., pair.positions2, :] += block.transpose(-1, -2) @ rhs[..., pair.positions1, :]
    return tuple(outputs)
