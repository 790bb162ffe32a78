r"""Graph-level Gram matrices of GNTK-like networks by tiles of disjoint unions: :func:`tiled_graph_kernels`.

A tile is a run of consecutive graphs taken as one graph, their disjoint union, with the
block-diagonal sparse adjacency :math:`A_I` of its :math:`N_I` nodes. For two tiles :math:`I, J`
the covariance between all their nodes is one dense :math:`N_I \times N_J` matrix, and the
layers of a GNTK (:func:`gpntk.layers.gntk`) act on it without padding:

* ``Aggregate``: :math:`\Sigma \leftarrow A_I \Sigma A_J^\top` (and :math:`\Theta`), two sparse
  products, :math:`O(\mathrm{nnz}\cdot N)`; block-diagonal, so the block of two graphs only
  ever depends on that block;
* ``Dense``: :math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
  :math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma'`, elementwise;
* an activation: its dual on every pair of nodes, given both nodes' variances
  :math:`\Sigma_{uu}`, which come from each graph's own node-by-node covariance (a first pass
  per graph, graphs of one size batched, :math:`O(\sum_g n_g^3)`);
* pooling then the readout ``Dense``: segment sums :math:`P_I^\top \Sigma P_J` with sparse
  ``(G, N)`` pooling matrices (divided by :math:`n_g n_{g'}` for the mean).

The values are those of the padded evaluation (:func:`gpntk.graph_kernel_matrices` with
``method="buckets"``) up to rounding: the same elementwise formulas on the same numbers, sums in
another order. Pairs of identical graphs (a graph with itself included) take the per-graph pass's
values, as the padded evaluation's coincident pairs do (:mod:`gpntk.core.coincident`).

Tiles are small (``tile_bytes``, 2 MiB by default: about 500 x 500 node pairs), so that the chain of
elementwise passes of a tile stays in the CPU caches (measured 8x faster than 256 MiB tiles); each
run of ``Dense`` and activation layers between two aggregations or readouts is one function,
compiled into one loop under :class:`gpntk.settings.fusion` (``True``, or ``"auto"`` for large
Gram matrices, :data:`COMPILE_MIN_ELEMENTS`).

Every readout depends only on the layers before it, so one pass through a network of
:math:`L` BLOCKs yields the Gram matrices of the networks truncated to any depth
:math:`D \le L` (:func:`truncated_readouts`).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, cast

import torch
from torch import Tensor

from .. import settings
from ..activations.base import Activation
from ..core.graph_inputs import GraphDataset
from ..core.layer import Layer
from ..errors import ArchitectureError
from ..layers.base import Serial
from ..layers.branching import FanInSum, FanOut, Parallel
from ..layers.dense import Dense
from ..layers.graph import Aggregate
from ..layers.pooling import GlobalAvgPool, GlobalSumPool
from .fusion import FusionPolicy

__all__ = ["GraphPlan", "Readout", "plan_of", "truncated_readouts", "tiled_graph_kernels"]

COMPILE_MIN_ELEMENTS = 5 * 10**8
"""Under ``gpntk.settings.fusion("auto")``, the activations of the tiles are compiled (one fused loop each,
measured 4x faster than eager on a CPU) when they take at least this many node pairs in all: compiling
costs tens of seconds once per process, eager evaluation about 50 ns per node pair."""


@dataclass(frozen=True)
class Readout:
    """A readout ``pool`` + ``dense`` after the first ``position`` node operations of a plan."""

    position: int
    average: bool
    dense: Dense


@dataclass(frozen=True)
class GraphPlan:
    """A network as node operations (``Aggregate``, ``Dense``, activations) and readouts summed at the end."""

    ops: tuple[Layer, ...]
    readouts: tuple[Readout, ...]

    def depth_at(self, position: int) -> int:
        """The number of ``Aggregate`` among the first ``position`` operations."""
        return sum(isinstance(op, Aggregate) for op in self.ops[:position])

    @property
    def depth(self) -> int:
        return self.depth_at(len(self.ops))


def _flat(layer: Layer) -> list[Layer]:
    if type(layer) is Serial:
        return [item for child in layer.layers for item in _flat(cast(Layer, child))]
    return [layer]


def _node_op(layer: Layer) -> bool:
    if type(layer) is Aggregate:
        return True
    if type(layer) is Dense:
        return layer.in_width is None
    return isinstance(layer, Activation) and type(layer).kernel_map is Activation.kernel_map


def _readout(layers: list[Layer], position: int) -> Readout | None:
    if len(layers) == 2 and type(layers[0]) in (GlobalSumPool, GlobalAvgPool) and type(layers[1]) is Dense:
        dense = layers[1]
        if dense.in_width is None:
            return Readout(position, type(layers[0]) is GlobalAvgPool, dense)
    return None


def _walk(layers: list[Layer], ops: list[Layer], readouts: list[Readout]) -> bool:
    """Append ``layers``' node operations and readouts; ``False`` where they are not of the GNTK's form."""
    for i, layer in enumerate(layers):
        if _node_op(layer):
            ops.append(layer)
            continue
        rest = layers[i:]
        found = _readout(rest, len(ops))
        if found is not None:
            readouts.append(found)
            return True
        if not (type(layer) is FanOut and len(rest) == 3 and type(rest[1]) is Parallel and type(rest[2]) is FanInSum):
            return False
        branches = [_flat(cast(Layer, b)) for b in rest[1].branches]
        if layer.num != len(branches):
            return False
        deeper = [b for b in branches if _readout(b, len(ops)) is None]
        readouts.extend(r for b in branches if (r := _readout(b, len(ops))) is not None)
        return len(deeper) == 0 or (len(deeper) == 1 and _walk(deeper[0], ops, readouts))
    return False


def plan_of(net: Layer) -> GraphPlan | None:
    """The plan of a network of :func:`gpntk.layers.gntk`'s form, or ``None`` (then the padded path is used).

    Accepted: a chain of ``Aggregate``, ``Dense`` (NTK parameterization) and elementwise
    activations ending in a readout (``GlobalSumPool`` or ``GlobalAvgPool`` then one ``Dense``),
    where ``FanOut(k)`` + ``Parallel`` + ``FanInSum`` may split readouts off the chain (all
    branches but at most one are readouts, the other continues the chain), every ``Dense`` a layer
    of its own (a layer used twice shares its weights between two places, which this path does not
    model).
    """
    ops: list[Layer] = []
    readouts: list[Readout] = []
    if not _walk(_flat(net), ops, readouts) or not readouts:
        return None
    dense = [op for op in ops if isinstance(op, Dense)] + [r.dense for r in readouts]
    if len({id(layer) for layer in dense}) != len(dense):  # a layer used twice: shared weights, correlated terms
        return None
    return GraphPlan(tuple(ops), tuple(readouts))


def truncated_readouts(plan: GraphPlan, depth: int) -> tuple[Readout, ...]:
    """The readouts of the network cut after its ``depth``-th BLOCK (``Aggregate`` and the operations up to the next).

    Readouts of deeper layers are dropped; if none of those kept reads depth ``depth`` itself, the
    network's last readout moves to the end of that BLOCK. For ``gntk(L)`` this gives
    ``gntk(depth)`` (with jumping knowledge, the readouts of depths ``0..depth``; without, the
    last readout after BLOCK ``depth``), with the hyperparameters of the layers kept.
    """
    if not 0 <= depth <= plan.depth:
        raise ValueError(f"depth must be in [0, {plan.depth}] (the network's BLOCKs), got {depth}")
    aggregates = [i for i, op in enumerate(plan.ops) if isinstance(op, Aggregate)]
    end = aggregates[depth] if depth < len(aggregates) else len(plan.ops)
    kept = [r for r in plan.readouts if r.position <= end and plan.depth_at(r.position) <= depth]
    if not any(plan.depth_at(r.position) == depth for r in kept):
        last = plan.readouts[-1]
        kept.append(Readout(end, last.average, last.dense))
    return tuple(kept)


class _Side:
    """The graphs of one tile as one disjoint union: features, sparse adjacency and pooling, node variances."""

    def __init__(self, dataset: GraphDataset, index: Sequence[int], like: Tensor, variances: dict[int, Tensor],
                 offsets: Tensor):
        graphs = [dataset.graphs[i] for i in index]
        sizes = torch.tensor([f.shape[0] for f, _ in graphs])
        self.features = torch.cat([f for f, _ in graphs]).to(like)
        n = int(sizes.sum())
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        entries = [(a.nonzero(), a[a != 0], int(s)) for (_, a), s in zip(graphs, starts[:-1].tolist())]
        edges = torch.cat([e + s for e, _, s in entries]).transpose(0, 1)
        weights = torch.cat([w for _, w, _ in entries])
        union = torch.sparse_coo_tensor(edges, weights, (n, n), check_invariants=True)
        self.adjacency = _csr(union.coalesce().to(like))
        node_graph = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
        pool = torch.sparse_coo_tensor(
            torch.stack([node_graph, torch.arange(n)]), torch.ones(n, dtype=like.dtype), (len(graphs), n),
            check_invariants=True,
        )
        self.pool = _csr(pool.to(like.device))
        self.sizes = sizes.to(like)
        nodes = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in index])
        self.variances = {k: v[nodes.to(v.device)] for k, v in variances.items()}


def _csr(t: Tensor) -> Tensor:
    with warnings.catch_warnings():  # torch calls its CSR layout beta; the products used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return t.to_sparse_csr()


def _affine(dense: Dense, like: Tensor) -> Callable[[Tensor], Tensor]:
    w = dense.hyperparameter("weight_variance", like)
    if dense.has_bias:
        b = dense.hyperparameter("bias_variance", like)
        return lambda k: w * k + b
    return lambda k: w * k


def _dense_step(
    dense: Dense, cov: Tensor, ntk: Tensor | None, track: bool, like: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The NTK-parameterized ``Dense``: ``(σ_w² Σ + σ_b², σ_w² Θ + Σ')`` (no NTK term when frozen)."""
    out = _affine(dense, like)(cov)
    if not track:
        return out, None
    scaled = None if ntk is None else dense.hyperparameter("weight_variance", like) * ntk
    if dense.trainable:
        return out, (out if scaled is None else scaled + out)
    return out, scaled


def _check_hyperparameters(plan: GraphPlan, like: Tensor) -> bool:
    layers = [op for op in plan.ops if isinstance(op, Dense)] + [r.dense for r in plan.readouts]
    return all(
        layer.hyperparameter(name, like).numel() == 1 for layer in layers for name in layer.hyperparameter_names
    )


def _readout_terms(
    plan_readouts: dict[int, tuple[Readout, ...]], position: int,
    pooled: Callable[[bool], tuple[Tensor, Tensor | None]],
    out: dict[int, list[Tensor | None]], track: bool, like: Tensor,
) -> None:
    """Add the readouts at ``position`` of every requested depth to ``out[depth] = [Σ, Θ]``."""
    cache: dict[bool, tuple[Tensor, Tensor | None]] = {}
    for depth, readouts in plan_readouts.items():
        for r in readouts:
            if r.position != position:
                continue
            if r.average not in cache:
                cache[r.average] = pooled(r.average)
            s, t = cache[r.average]
            cov, ntk = _dense_step(r.dense, s, t, track, like)
            acc = out[depth]
            acc[0] = cov if acc[0] is None else acc[0] + cov
            if track:
                term = ntk if ntk is not None else torch.zeros_like(cov)
                acc[1] = term if acc[1] is None else acc[1] + term


def _self_pass(  # long: one recursion over equal-size groups of graphs, readouts and variances recorded
    plan: GraphPlan, dataset: GraphDataset, readouts: dict[int, tuple[Readout, ...]], track: bool, like: Tensor,
    last: int,
) -> tuple[dict[int, list[Tensor | None]], dict[int, Tensor]]:
    """Each graph with itself: the Gram diagonal ``{depth: [Σ (n,), Θ (n,)]}`` and per-activation node variances."""
    n = len(dataset)
    sizes = dataset.sizes
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    activations = [i for i, op in enumerate(plan.ops[:last]) if isinstance(op, Activation)]
    variances = {i: torch.empty(int(offsets[-1]), dtype=like.dtype, device=like.device) for i in activations}
    diag: dict[int, list[Tensor | None]] = {
        d: [torch.zeros(n, dtype=like.dtype, device=like.device), None] for d in readouts
    }
    if track:
        for d in readouts:
            diag[d][1] = torch.zeros(n, dtype=like.dtype, device=like.device)
    for size in torch.unique(sizes).tolist():
        members = torch.nonzero(sizes == size).flatten()
        x = torch.stack([dataset.graphs[i][0] for i in members.tolist()]).to(like)
        a = torch.stack([dataset.graphs[i][1] for i in members.tolist()]).to(like)
        nodes = (offsets[members].unsqueeze(-1) + torch.arange(size)).flatten().to(like.device)
        cov = torch.einsum("gic,gjc->gij", x, x) / x.shape[-1]
        ntk: Tensor | None = None
        out: dict[int, list[Tensor | None]] = {d: [None, None] for d in readouts}

        def pooled(average: bool, cov: Tensor, ntk: Tensor | None) -> tuple[Tensor, Tensor | None]:
            scale = float(size * size) if average else 1.0
            return cov.sum((-2, -1)) / scale, (None if ntk is None else ntk.sum((-2, -1)) / scale)

        for position in range(last + 1):
            _readout_terms(readouts, position, lambda avg: pooled(avg, cov, ntk), out, track, like)
            if position == last:
                break
            op = plan.ops[position]
            if isinstance(op, Aggregate):
                cov = a @ cov @ a.transpose(-1, -2)
                ntk = None if ntk is None else a @ ntk @ a.transpose(-1, -2)
            elif isinstance(op, Dense):
                cov, ntk = _dense_step(op, cov, ntk, track, like)
            else:
                assert isinstance(op, Activation)
                q = torch.diagonal(cov, dim1=-2, dim2=-1)
                variances[position][nodes] = q.flatten()
                need_dot = track and ntk is not None
                k, kdot = op.dual(q.unsqueeze(-1), cov, q.unsqueeze(-2), need_dot)
                k_point, kdot_point = op.dual_diag(q, need_dot)
                cov = torch.diagonal_scatter(k, k_point, dim1=-2, dim2=-1)
                if need_dot:
                    assert kdot is not None and kdot_point is not None and ntk is not None
                    ntk = torch.diagonal_scatter(kdot, kdot_point, dim1=-2, dim2=-1) * ntk
        for d, (s, t) in out.items():
            target = diag[d]
            assert target[0] is not None and s is not None
            target[0][members.to(like.device)] = s
            if track:
                assert target[1] is not None and t is not None
                target[1][members.to(like.device)] = t
    return diag, variances


def _tile_pass(  # long: the recursion on one N_I x N_J tile, orientation alternating at each aggregation
    plan: GraphPlan, left: _Side, right: _Side, readouts: dict[int, tuple[Readout, ...]], track: bool, like: Tensor,
    last: int, run: "_Runs",
) -> dict[int, list[Tensor | None]]:
    """``{depth: [Σ (G_I, G_J), Θ or None]}`` of the graphs of two tiles."""
    cov = left.features @ right.features.transpose(0, 1) / left.features.shape[-1]
    ntk: Tensor | None = None
    flipped = False  # cov holds the transpose, (N_J, N_I), contiguous
    out: dict[int, list[Tensor | None]] = {d: [None, None] for d in readouts}

    def pool(t: Tensor, average: bool, flipped: bool) -> Tensor:
        a, b = (right, left) if flipped else (left, right)
        s = (b.pool @ (a.pool @ t).transpose(0, 1).contiguous()).transpose(0, 1)  # (G_a, G_b)
        if average:
            s = s / (a.sizes.unsqueeze(-1) * b.sizes.unsqueeze(0))
        return s.transpose(0, 1) if flipped else s

    position = 0
    while True:
        _readout_terms(
            readouts, position,
            lambda avg: (pool(cov, avg, flipped), None if ntk is None else pool(ntk, avg, flipped)),
            out, track, like,
        )
        if position == last:
            break
        if isinstance(plan.ops[position], Aggregate):
            first, second = (right, left) if flipped else (left, right)
            cov = second.adjacency @ (first.adjacency @ cov).transpose(0, 1).contiguous()
            ntk = None if ntk is None else second.adjacency @ (first.adjacency @ ntk).transpose(0, 1).contiguous()
            flipped = not flipped
            position += 1
        else:
            end = run.ends[position]
            activations = [i for i in range(position, end) if i in run.activations]
            rows = tuple((right if flipped else left).variances[i].unsqueeze(-1) for i in activations)
            cols = tuple((left if flipped else right).variances[i].unsqueeze(0) for i in activations)
            cov, ntk = run(position, cov, rows, cols, ntk, track)
            position = end
    return out


class _Runs:
    """The runs of ``Dense`` and activation layers between aggregations and readouts, each one (compiled) loop."""

    def __init__(self, plan: GraphPlan, readouts: dict[int, tuple[Readout, ...]], last: int, like: Tensor,
                 fused: bool):
        stops = {r.position for rs in readouts.values() for r in rs}
        canonical = _canonical(plan.ops[:last])
        self.activations = set(canonical)
        self.ends: dict[int, int] = {}
        self.steps: dict[int, tuple[tuple[str, ...], tuple[Layer, ...], tuple[Tensor, ...]]] = {}
        for start, op in enumerate(plan.ops[:last]):
            if isinstance(op, Aggregate):
                continue
            end = start + 1
            while end < last and not isinstance(plan.ops[end], Aggregate) and end not in stops:
                end += 1
            self.ends[start] = end
            kinds, acts, values = [], [], []
            for i in range(start, end):
                layer = plan.ops[i]
                if isinstance(layer, Dense):
                    kinds.append("dense" + ("+bias" if layer.has_bias else "") + ("" if layer.trainable else "-frozen"))
                    values.append(layer.hyperparameter("weight_variance", like))
                    if layer.has_bias:
                        values.append(layer.hyperparameter("bias_variance", like))
                else:
                    kinds.append("activation")
                    acts.append(canonical[i])
            self.steps[start] = (tuple(kinds), tuple(acts), tuple(values))
        self.policy, self.fused = FusionPolicy(), fused

    def __call__(self, start: int, cov: Tensor, rows: tuple[Tensor, ...], cols: tuple[Tensor, ...],
                 ntk: Tensor | None, track: bool) -> tuple[Tensor, Tensor | None]:
        kinds, acts, values = self.steps[start]
        return self.policy.run(_elementwise_run, (kinds, acts, values, cov, rows, cols, ntk, track), self.fused)


def _elementwise_run(
    kinds: tuple[str, ...], acts: tuple[Activation, ...], values: tuple[Tensor, ...], cov: Tensor,
    rows: tuple[Tensor, ...], cols: tuple[Tensor, ...], ntk: Tensor | None, track: bool,
) -> tuple[Tensor, Tensor | None]:
    r"""``Dense`` (:math:`\sigma_w^2 \Sigma + \sigma_b^2`, :math:`\sigma_w^2 \Theta + \Sigma'`) and activation
    (:math:`k(\Sigma)`, :math:`\dot k\, \Theta`) maps in turn on a tile; ``ntk=None``: a zero NTK (with
    ``track``) or none.

    ``kinds``: ``"dense"`` (``+bias``, ``-frozen``) or ``"activation"``; ``values``: each ``Dense``'s
    variances in turn, ``acts``, ``rows`` ``(N_a, 1)`` and ``cols`` ``(1, N_b)`` (node variances) each
    activation's.
    """
    a = v = 0
    for kind in kinds:
        if kind == "activation":
            k, kdot = acts[a].dual(rows[a], cov, cols[a], ntk is not None)
            ntk = None if ntk is None else cast(Tensor, kdot) * ntk
            cov, a = k, a + 1
            continue
        w = values[v]
        new = w * cov + values[v + 1] if "+bias" in kind else w * cov
        v += 2 if "+bias" in kind else 1
        scaled = None if ntk is None else w * ntk
        if not kind.endswith("-frozen") and track:
            ntk = new if scaled is None else scaled + new
        else:
            ntk = scaled
        cov = new
    return cov, ntk


def _canonical(ops: Sequence[Layer]) -> dict[int, Layer]:
    """Each activation mapped to the first equal one (type, repr, no hyperparameters): one compiled loop each."""
    first: dict[tuple[type, str], Layer] = {}
    out = {}
    for i, op in enumerate(ops):
        if isinstance(op, Activation):
            key = (type(op), repr(op))
            out[i] = first.setdefault(key, op) if not op.hyperparameter_names else op
    return out


def _tiles(sizes: Tensor, index: Sequence[int], nodes: int) -> list[list[int]]:
    """Consecutive runs of ``index`` of at most ``nodes`` nodes (at least one graph each)."""
    tiles: list[list[int]] = [[]]
    count = 0
    for i in index:
        n = int(sizes[i])
        if tiles[-1] and count + n > nodes:
            tiles.append([])
            count = 0
        tiles[-1].append(i)
        count += n
    return tiles


def _identical_pairs(dataset: GraphDataset, first: Sequence[int], second: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(row, column, graph)`` of the pairs of identical graphs (same features and adjacency, bit for bit)."""
    def key(i: int) -> str:
        f, a = dataset.graphs[i]
        content = f.numpy().tobytes() + b"|" + a.numpy().tobytes() + repr(tuple(f.shape)).encode()
        return hashlib.sha1(content).hexdigest()

    columns: dict[str, list[int]] = {}
    for c, j in enumerate(second):
        columns.setdefault(key(j), []).append(c)
    pairs: list[tuple[int, int, int]] = []
    for r, i in enumerate(first):
        pairs.extend((r, c, i) for c in columns.get(key(i), []))
    return pairs


def _fused(elements: int) -> bool:
    """Whether the tiles' activations run compiled (:class:`gpntk.settings.fusion`; ``"auto"``: from
    :data:`COMPILE_MIN_ELEMENTS` activation entries on)."""
    mode = settings.fusion.current()
    return mode is True or (mode == "auto" and elements >= COMPILE_MIN_ELEMENTS)


def tiled_graph_kernels(  # long: tiling, the per-graph pass, the tile loop and the coincident pairs
    net: Layer, plan: GraphPlan, dataset: GraphDataset, first: Sequence[int], second: Sequence[int] | None,
    depths: Sequence[int], *, track_ntk: bool, dtype: torch.dtype, device: torch.device | str | None,
    tile_bytes: int, advance: Callable[[int], None],
) -> dict[int, tuple[Tensor, Tensor | None]]:
    r"""``{depth: (Σ, Θ or None)}``, each ``(len(first), len(second))``: graphs ``first`` x ``second`` of ``dataset``.

    ``second=None``: ``first`` with itself (tiles :math:`I \le J` only; the result is exactly
    symmetric). ``tile_bytes``: the size of one ``N_I x N_J`` tensor of a tile (a few are alive at
    once). ``advance(pairs)`` is called after each tile with its distinct pairs of graphs.
    """
    like = torch.empty(0, dtype=dtype, device=device)
    if not _check_hyperparameters(plan, like):
        raise ArchitectureError("the tiled graph kernels take one value per hyperparameter (no batch of them)")
    readouts = {d: truncated_readouts(plan, d) for d in depths}
    last = max(r.position for rs in readouts.values() for r in rs)
    with torch.no_grad():  # as the tiles below: recorded, its intermediates would all stay alive (12 GB for NCI1)
        diag, variances = _self_pass(plan, dataset, readouts, track_ntk, like, last)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), dataset.sizes.cumsum(0)])
    nodes = max(1, int((tile_bytes / like.element_size()) ** 0.5))
    columns = first if second is None else second
    tiles1 = _tiles(dataset.sizes, first, nodes)
    tiles2 = tiles1 if second is None else _tiles(dataset.sizes, second, nodes)
    sides1 = [_Side(dataset, t, like, variances, offsets) for t in tiles1]
    sides2 = sides1 if second is None else [_Side(dataset, t, like, variances, offsets) for t in tiles2]
    per_pair = sum(isinstance(op, Activation) for op in plan.ops[:last])
    node_pairs = sum(int(dataset.sizes[i]) for i in first) * sum(int(dataset.sizes[i]) for i in columns)
    run = _Runs(plan, readouts, last, like, _fused(per_pair * node_pairs // (2 if second is None else 1)))
    starts1 = [0] + torch.tensor([len(t) for t in tiles1]).cumsum(0).tolist()
    starts2 = [0] + torch.tensor([len(t) for t in tiles2]).cumsum(0).tolist()
    shape = (len(first), len(columns))
    result = {d: [torch.empty(shape, dtype=dtype, device=like.device),
                  torch.empty(shape, dtype=dtype, device=like.device) if track_ntk else None] for d in depths}
    with torch.no_grad():
        for i, left in enumerate(sides1):
            for j, right in enumerate(sides2):
                if second is None and j < i:
                    continue
                blocks = _tile_pass(plan, left, right, readouts, track_ntk, like, last, run)
                rows = slice(starts1[i], starts1[i + 1])
                cols = slice(starts2[j], starts2[j + 1])
                for d, tile_values in blocks.items():
                    for target, block in zip(result[d], tile_values):
                        if target is None or block is None:
                            continue
                        if second is None and i == j:
                            block = (block + block.transpose(0, 1)) / 2
                        target[rows, cols] = block
                        if second is None and i != j:
                            target[cols, rows] = block.transpose(0, 1)
                k = len(tiles1[i])
                advance(k * (k + 1) // 2 if second is None and i == j else k * len(tiles2[j]))
        for r, c, g in _identical_pairs(dataset, first, columns):
            for d in depths:
                for target, own in zip(result[d], diag[d]):
                    if target is not None and own is not None:
                        target[r, c] = own[g]
    return {d: (cast(Tensor, values[0]), values[1]) for d, values in result.items()}
