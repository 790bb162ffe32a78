r"""Gram matrices of datasets of graphs of different sizes: :func:`graph_kernel_matrices`.

A graph-level kernel evaluates every pair of graphs on the covariance between their nodes, so a
pair costs :math:`O(N N')` numbers per layer (and :math:`O(N N' (N + N'))` for an aggregation).
Padding every graph of a dataset to its largest (PROTEINS: 620 nodes, 39 on average) would make
that hundreds of times larger; instead the graphs are sorted by size and cut into buckets of
similar sizes, and each pair of buckets is evaluated with both padded to the larger of the two
bucket sizes. Padding never changes a value (:class:`~gpntk.core.graph_inputs.GraphInputs`:
pooling skips padding nodes), so the result is the exact Gram matrix.

Networks of the GNTK's form (:func:`gpntk.layers.gntk`: ``Aggregate``, ``Dense`` and activation
layers, readouts by pooling and one ``Dense``, jumping knowledge) take a faster path without any
padding, :mod:`gpntk.kernels.graph_tiles`: tiles of graphs as disjoint unions with sparse
block-diagonal adjacencies, whose one pass also yields the Gram matrices of every shallower
network (:func:`graph_kernel_matrices_by_depth`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence, TextIO

import torch
from torch import Tensor

from .._progress import ProgressBar, progress_bar
from .._validation import integer_argument, real_argument
from ..core.graph_inputs import GraphDataset
from ..core.layer import Layer, check_network
from ..errors import ArchitectureError
from ..layers.dense import Dense
from .dense import nngp_and_ntk
from .graph_dataset import BucketPair, bucket_pairs
from .graph_tiles import plan_of, tiled_graph_kernels

__all__ = ["graph_kernel_matrices", "graph_kernel_matrices_by_depth"]

METHODS = ("auto", "tiles", "buckets")

Graph = tuple[Any, Any]


def graph_kernel_matrices(  # long: documented arguments, the dispatch to tiles, the padded path
    net: Layer,
    graphs: Sequence[Graph],
    others: Sequence[Graph] | None = None,
    *,
    track_ntk: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    bucket_growth: float = 1.25,
    pairs_per_call: int = 4096,
    progress: bool | TextIO | None = None,
    method: str = "auto",
    tile_bytes: int = 2 * 2**20,
) -> tuple[Tensor, Tensor | None]:
    r"""The NNGP and NTK Gram matrices ``(Σ, Θ or None)`` of a graph network on lists of graphs.

    :param net: a graph-level architecture (``Aggregate``, dense layers, pooling over the nodes;
        e.g. :func:`gpntk.layers.gntk`), evaluated with its current hyperparameters (no gradients).
    :param graphs: ``(features (n_g, C), adjacency (n_g, n_g))`` pairs, any sizes (tensors or
        NumPy arrays; dense or torch sparse adjacencies, row :math:`u` what node :math:`u` receives).
    :param others: a second list (``None``: ``graphs`` itself; the result is then symmetric and
        only its upper triangle of buckets is evaluated).
    :param bucket_growth: graphs whose node counts differ by at most this factor share a bucket
        (padded to the bucket's largest; see :class:`~gpntk.GraphDataset`).
    :param pairs_per_call: how many pairs of graphs one evaluation takes at most (memory: about
        ``pairs_per_call · N²`` numbers per intermediate tensor).
    :param progress: ``None`` (default): a progress bar on stderr when it is a terminal, for
        computations longer than a second (:class:`gpntk.settings.progress`); ``True`` (stderr) or a
        text stream: a progress line with pairs done, elapsed time and an estimate of the time
        left, whatever the stream; ``False``: nothing.
    :param method: ``"tiles"``: the tiled evaluation without padding
        (:mod:`gpntk.kernels.graph_tiles`; networks of :func:`gpntk.layers.gntk`'s form only,
        :func:`~gpntk.kernels.graph_tiles.plan_of`, else an ``ArchitectureError``);
        ``"buckets"``: padded buckets of similar sizes evaluated by the generic layer recursion
        (any graph-level network); ``"auto"`` (default): tiles where the network allows it
        (and its hyperparameters are single values), else buckets.
    :param tile_bytes: tiled path: the bytes of one ``N_I x N_J`` node-by-node tile tensor (a few
        such tensors are alive at once). Small tiles keep the chain of elementwise passes in the CPU
        caches: the default 2 MiB was about 8x faster than 256 MiB tiles (NCI1, one thread).
        ``bucket_growth`` and ``pairs_per_call`` are unused on this path.
    :return: ``(Σ, Θ)``, each ``(len(graphs), len(others))`` (``Θ`` is ``None`` without ``track_ntk``);
        without ``others``, exactly symmetric (the mean of the matrix and its transpose, which
        differ by rounding: up to about 1e-10 relative in the NTK, where two nodes of different
        graphs have correlation one; see ``docs/graphs.md``).
    """
    growth = real_argument("bucket_growth", bucket_growth, minimum=1.0)
    pairs_per_call = integer_argument("pairs_per_call", pairs_per_call, minimum=1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dataset = GraphDataset([*graphs, *(others or [])], growth=growth)
    check_network(net, dataset)
    if method != "buckets" and _tiles_apply(net, dtype, device, required=method == "tiles"):
        plan = plan_of(net)
        assert plan is not None
        by_depth = _tiled(net, dataset, len(graphs), others is not None, (plan.depth,), track_ntk, dtype, device,
                          tile_bytes, progress)
        return by_depth[plan.depth]
    like = torch.empty(0, dtype=dtype, device=device)
    index1 = torch.arange(len(graphs), device=like.device)
    index2 = index1 if others is None else torch.arange(len(graphs), len(dataset), device=like.device)
    pairs = list(bucket_pairs(dataset, index1, index2, others is None, like))
    total = sum(len(p.positions1) * len(p.positions2) for p in pairs)
    reporter: _Progress | _Bar
    if progress is None:
        reporter = _Bar(progress_bar(total, "graph kernel", unit="pair"))
    else:
        reporter = _Progress(progress, total)
    cov = torch.empty(len(index1), len(index2), dtype=dtype, device=like.device)
    ntk = torch.empty_like(cov) if track_ntk else None
    with torch.no_grad():
        for pair in pairs:
            _fill(net, pair, (cov, ntk), pairs_per_call, reporter)
    reporter.finish()
    if others is None:  # K(G, G') and K(G', G) may differ in the last digits (summation order): symmetric
        cov = (cov + cov.transpose(0, 1)) / 2
        ntk = None if ntk is None else (ntk + ntk.transpose(0, 1)) / 2
    return cov, ntk


def graph_kernel_matrices_by_depth(
    net: Layer,
    graphs: Sequence[Graph],
    depths: Sequence[int],
    others: Sequence[Graph] | None = None,
    *,
    track_ntk: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    tile_bytes: int = 2 * 2**20,
    progress: bool | TextIO | None = None,
) -> dict[int, tuple[Tensor, Tensor | None]]:
    r"""``{D: (Σ, Θ or None)}``: the Gram matrices of ``net`` cut after its ``D``-th BLOCK, each ``D`` of ``depths``.

    ``net`` must have :func:`gpntk.layers.gntk`'s form (the tiled path,
    :mod:`gpntk.kernels.graph_tiles`; else an ``ArchitectureError``); a BLOCK is an
    ``Aggregate`` and the layers up to the next one. A readout (pooling and its ``Dense``) depends
    only on the layers before it, so the pass through ``net`` gives every shallower network's
    kernel on the way (:func:`~gpntk.kernels.graph_tiles.truncated_readouts`): readouts deeper than
    ``D`` are dropped and, where none of the rest reads depth ``D``, the last readout moves to the
    end of BLOCK ``D``. So for ``net = gntk(L, R, jumping_knowledge=jk)`` the result at ``D`` is
    the Gram matrix of ``gntk(D, R, jumping_knowledge=jk)`` (same hyperparameter values), for
    ``0 <= D <= L``. The cost is that of the deepest requested ``D``. Other arguments as in
    :func:`graph_kernel_matrices`.
    """
    dataset = GraphDataset([*graphs, *(others or [])])
    check_network(net, dataset)
    _tiles_apply(net, dtype, device, required=True)
    wanted = tuple(dict.fromkeys(integer_argument("depth", d, minimum=0) for d in depths))
    if not wanted:
        raise ValueError("depths must name at least one depth")
    return _tiled(net, dataset, len(graphs), others is not None, wanted, track_ntk, dtype, device, tile_bytes,
                  progress)


def _tiles_apply(net: Layer, dtype: torch.dtype, device: torch.device | str | None, required: bool) -> bool:
    """Whether the tiled path evaluates ``net``; with ``required``, an ``ArchitectureError`` saying why not."""
    plan = plan_of(net)
    reason = None
    if plan is None:
        reason = ("the network is not of gntk's form (Aggregate / Dense / activation layers, readouts by "
                  "GlobalSumPool or GlobalAvgPool then one Dense, jumping knowledge by FanOut/Parallel/FanInSum)")
    else:
        like = torch.empty(0, dtype=dtype, device=device)
        layers = [op for op in plan.ops if isinstance(op, Dense)] + [r.dense for r in plan.readouts]
        names = [(layer, name) for layer in layers for name in layer.hyperparameter_names]
        if any(layer.hyperparameter(name, like).numel() != 1 for layer, name in names):
            reason = "its hyperparameters have batch dimensions"
    if reason is not None and required:
        raise ArchitectureError(f"the tiled graph kernels cannot evaluate this network: {reason}")
    return reason is None


def _tiled(
    net: Layer, dataset: GraphDataset, count: int, rectangular: bool, depths: tuple[int, ...], track_ntk: bool,
    dtype: torch.dtype, device: torch.device | str | None, tile_bytes: int, progress: bool | TextIO | None,
) -> dict[int, tuple[Tensor, Tensor | None]]:
    """The tiled path (:func:`~gpntk.kernels.graph_tiles.tiled_graph_kernels`) with a progress report."""
    plan = plan_of(net)
    assert plan is not None
    tile_bytes = integer_argument("tile_bytes", tile_bytes, minimum=8)
    first = list(range(count))
    second = list(range(count, len(dataset))) if rectangular else None
    total = count * (len(dataset) - count) if rectangular else count * (count + 1) // 2
    reporter: _Progress | _Bar
    if progress is None:
        reporter = _Bar(progress_bar(total, "graph kernel", unit="pair"))
    else:
        reporter = _Progress(progress, total)
    result = tiled_graph_kernels(
        net, plan, dataset, first, second, depths, track_ntk=track_ntk, dtype=dtype, device=device,
        tile_bytes=tile_bytes, advance=reporter.advance,
    )
    reporter.finish()
    return result


def _fill(
    net: Layer, pair: BucketPair, targets: tuple[Tensor, Tensor | None], pairs_per_call: int,
    reporter: "_Progress | _Bar",
) -> None:
    """The kernels of one pair of buckets into ``targets``, ``pairs_per_call`` pairs of graphs at a time."""
    chunk = max(1, pairs_per_call // len(pair.positions2))
    for start in range(0, len(pair.positions1), chunk):
        part = slice(start, start + chunk)
        a = pair.rows1[part]
        b = a if (pair.rows2 is pair.rows1 and len(pair.positions1) <= chunk) else pair.rows2
        kernels = nngp_and_ntk(net, a, b, input_shape=pair.format, track_ntk=targets[1] is not None)
        rows, cols = pair.positions1[part], pair.positions2
        for target, block in zip(targets, kernels):
            if target is not None and block is not None:
                target[rows.unsqueeze(-1), cols] = block
                if pair.mirrored:
                    target[cols.unsqueeze(-1), rows] = block.transpose(0, 1)
        reporter.advance(len(rows) * len(cols))


class _Bar:
    """A progress bar (:func:`gpntk._progress.progress_bar`) as a reporter of pairs done."""

    def __init__(self, bar: ProgressBar):
        self.bar = bar

    def advance(self, pairs: int) -> None:
        self.bar.update(pairs)

    def finish(self) -> None:
        self.bar.close()


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
