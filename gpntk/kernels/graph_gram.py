r"""Gram matrices of datasets of graphs of different sizes: :func:`graph_kernel_matrices`.

A graph-level kernel evaluates every pair of graphs on the covariance between their nodes, so a
pair costs :math:`O(N N')` numbers per layer (and :math:`O(N N' (N + N'))` for an aggregation).
Padding every graph of a dataset to its largest (PROTEINS: 620 nodes, 39 on average) would make
that hundreds of times larger; instead the graphs are sorted by size and cut into buckets of
similar sizes, and each pair of buckets is evaluated with both padded to the larger of the two
bucket sizes. Padding never changes a value (:class:`~gpntk.core.graph_inputs.GraphInputs`:
pooling skips padding nodes), so the result is the exact Gram matrix.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence, TextIO

import torch
from torch import Tensor

from .._validation import integer_argument, real_argument
from ..core.graph_inputs import GraphInputs, as_float_tensor
from ..core.layer import Layer, check_network
from .dense import nngp_and_ntk

__all__ = ["graph_kernel_matrices"]

Graph = tuple[Any, Any]


def graph_kernel_matrices(
    net: Layer,
    graphs: Sequence[Graph],
    others: Sequence[Graph] | None = None,
    *,
    track_ntk: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    bucket_growth: float = 1.25,
    pairs_per_call: int = 4096,
    progress: bool | TextIO = False,
) -> tuple[Tensor, Tensor | None]:
    r"""The NNGP and NTK Gram matrices ``(Σ, Θ or None)`` of a graph network on lists of graphs.

    :param net: a graph-level architecture (``Aggregate``, dense layers, pooling over the nodes;
        e.g. :func:`gpntk.layers.gntk`), evaluated with its current hyperparameters (no gradients).
    :param graphs: ``(features (n_g, C), adjacency (n_g, n_g))`` pairs, any sizes (tensors or
        NumPy arrays; dense or torch sparse adjacencies, row :math:`u` what node :math:`u` receives).
    :param others: a second list (``None``: ``graphs`` itself; the result is then symmetric and
        only its upper triangle of buckets is evaluated).
    :param bucket_growth: graphs whose node counts differ by at most this factor share a bucket
        (padded to the bucket's largest).
    :param pairs_per_call: how many pairs of graphs one evaluation takes at most (memory: about
        ``pairs_per_call · N²`` numbers per intermediate tensor).
    :param progress: ``True`` (stderr) or a text stream: a progress line with pairs done, elapsed
        time and an estimate of the time left.
    :return: ``(Σ, Θ)``, each ``(len(graphs), len(others))`` (``Θ`` is ``None`` without ``track_ntk``).
    """
    growth = real_argument("bucket_growth", bucket_growth, minimum=1.0)
    pairs_per_call = integer_argument("pairs_per_call", pairs_per_call, minimum=1)
    left = _as_tensors(graphs, dtype, device)
    right = left if others is None else _as_tensors(others, dtype, device)
    channels = {f.shape[-1] for f, _ in left} | {f.shape[-1] for f, _ in right}
    if len(channels) != 1:
        raise ValueError(f"all graphs need the same number of feature channels, got {sorted(channels)}")
    check_network(net, GraphInputs(max(f.shape[0] for f, _ in [*left, *right]), channels.pop()))
    buckets1 = _buckets([f.shape[0] for f, _ in left], growth)
    buckets2 = buckets1 if others is None else _buckets([f.shape[0] for f, _ in right], growth)
    jobs = [
        (i, j) for i in range(len(buckets1)) for j in range(len(buckets2)) if others is not None or j >= i
    ]
    total_pairs = sum(len(buckets1[i]) * len(buckets2[j]) for i, j in jobs)
    reporter = _Progress(progress, total_pairs)
    cov = torch.empty(len(left), len(right), dtype=dtype, device=device)
    ntk = torch.empty_like(cov) if track_ntk else None
    with torch.no_grad():
        for i, j in jobs:
            symmetric = others is None
            _bucket_pair(net, left, right, buckets1[i], buckets2[j], symmetric and i == j, (cov, ntk),
                         mirror=symmetric and i != j, pairs_per_call=pairs_per_call, dtype=dtype, device=device,
                         reporter=reporter)
    reporter.finish()
    return cov, ntk


def _bucket_pair(
    net: Layer,
    left: list[tuple[Tensor, Tensor]],
    right: list[tuple[Tensor, Tensor]],
    rows: list[int],
    cols: list[int],
    same: bool,
    targets: tuple[Tensor, Tensor | None],
    *,
    mirror: bool,
    pairs_per_call: int,
    dtype: torch.dtype,
    device: Any,
    reporter: "_Progress",
) -> None:
    """The kernels between the graphs ``rows`` of ``left`` and ``cols`` of ``right``, padded alike, into ``targets``."""
    nodes = max(max(left[g][0].shape[0] for g in rows), max(right[g][0].shape[0] for g in cols))
    fmt, x1 = GraphInputs.from_graphs([left[g] for g in rows], nodes=nodes, dtype=dtype)
    x2 = x1 if same else GraphInputs.from_graphs([right[g] for g in cols], nodes=nodes, dtype=dtype)[1]
    x1, x2 = x1.to(device), x2.to(device)
    chunk = max(1, pairs_per_call // len(cols))
    c = torch.as_tensor(cols, device=targets[0].device)
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        a = x1[part]
        b = a if (same and len(rows) <= chunk) else x2
        kernels = nngp_and_ntk(net, a, b, input_shape=fmt, track_ntk=targets[1] is not None)
        r = torch.as_tensor(rows[part], device=c.device)
        for target, block in zip(targets, kernels):
            if target is not None and block is not None:
                _place(target, block, r, c, mirror)
        reporter.advance(len(r) * len(c))


def _as_tensors(graphs: Sequence[Graph], dtype: torch.dtype, device: Any) -> list[tuple[Tensor, Tensor]]:
    if len(graphs) == 0:
        raise ValueError("graph_kernel_matrices needs at least one graph")
    return [(as_float_tensor("features", f, dtype), as_float_tensor("adjacency", a, dtype)) for f, a in graphs]


def _buckets(sizes: list[int], growth: float) -> list[list[int]]:
    """Indices of graphs grouped by size: sorted, a new bucket whenever the size exceeds ``growth`` × the first's."""
    order = sorted(range(len(sizes)), key=lambda g: sizes[g])
    buckets: list[list[int]] = []
    for g in order:
        if buckets and sizes[g] <= growth * sizes[buckets[-1][0]]:
            buckets[-1].append(g)
        else:
            buckets.append([g])
    return buckets


def _place(target: Tensor, block: Tensor, rows: Tensor, cols: Tensor, mirror: bool) -> None:
    target[rows.unsqueeze(-1), cols.unsqueeze(0)] = block
    if mirror:
        target[cols.unsqueeze(-1), rows.unsqueeze(0)] = block.transpose(0, 1)


class _Progress:
    """A one-line progress report on a text stream: pairs done, elapsed, estimated time left."""

    def __init__(self, progress: bool | TextIO, total: int):
        self.stream: TextIO | None = sys.stderr if progress is True else (progress or None)
        self.total, self.done, self.start, self.last = total, 0, time.perf_counter(), -math.inf

    def advance(self, pairs: int) -> None:
        self.done += pairs
        now = time.perf_counter()
        if self.stream is None or (now - self.last < 0.5 and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else math.inf
        self.stream.write(
            f"\rgraph kernel: {self.done}/{self.total} pairs ({100 * self.done / self.total:5.1f}%), "
            f"{elapsed:7.1f} s elapsed, {left:7.1f} s left"
        )
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
