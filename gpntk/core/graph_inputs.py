r"""How graphs reach a kernel: the two input formats of graph kernels, and adjacency normalisation.

Kernels and networks read inputs as rows of a tensor ``x`` of shape ``(..., n, d)``. Graphs come
in two formats, passed where a spatial network takes ``input_shape``:

* :class:`GraphInputs` (**graph-level** kernels, one kernel value per pair of graphs): each row is
  one graph padded to ``nodes`` nodes: its node features, its adjacency and a mask of its real
  nodes, flattened (:meth:`GraphInputs.pack`, :meth:`GraphInputs.from_graphs`). Graphs of
  different sizes share one format; padding nodes never change a kernel value.
* :class:`NodeGraph` (**node-level** kernels on one fixed graph, one value per pair of its
  nodes): the graph (features and a sparse adjacency) lives in the format, and each row of ``x``
  is the index of a node, ``(..., n, 1)``, so that a GPyTorch ``ExactGP`` fits on node indices.

Adjacency convention (as ``gpntk.layers.Aggregate``): message passing is
:math:`h'_i = \sum_j A_{ij} h_j`, so row :math:`i` of :math:`A` lists what node :math:`i`
receives; weighted and directed adjacencies are allowed. :func:`normalized_adjacency` gives the
usual normalisations of a GCN (Kipf & Welling 2017): row :math:`D^{-1}A`, symmetric
:math:`D^{-1/2} A D^{-1/2}` and column :math:`A D^{-1}`, with or without self-loops
:math:`A + I`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._transforms import is_transformed
from .._validation import check_input_shape, check_kernel_inputs, integer_argument

__all__ = [
    "GraphInputs", "NodeGraph", "GraphDataset", "GraphFormat", "GraphTensors", "normalized_adjacency", "Normalization",
    "checked_input_shape", "check_rows_of", "as_float_tensor", "size_buckets",
]

Normalization = Literal["row", "symmetric", "column"]
NORMALIZATIONS = ("row", "symmetric", "column")


class GraphTensors(NamedTuple):
    """Padded graphs: ``features`` ``(..., n, N, C)``, ``adjacency`` ``(..., n, N, N)``, ``mask`` ``(..., n, N)``."""

    features: Tensor
    adjacency: Tensor
    mask: Tensor


@dataclass(frozen=True)
class GraphInputs:
    r"""The format of graph-level inputs: each row of ``x`` is one graph padded to ``nodes`` nodes.

    A row holds, flattened in this order, the node features ``(nodes, channels)`` (node-major,
    channels last), the adjacency ``(nodes, nodes)`` (row :math:`i` is what node :math:`i`
    receives) and the mask ``(nodes,)`` (1 for a real node, 0 for padding): ``row_features =
    nodes·channels + nodes² + nodes`` numbers. Padding nodes have zero features and no edges;
    pooling skips them (``GlobalAvgPool`` averages over the real nodes), so a graph's kernel values
    do not depend on how far it is padded.

    The input kernel of two nodes is :math:`h \cdot h' / C` (Neural Tangents' convention, as for
    vectors); node features are the "positions" of a spatial input, and a ``Dense`` layer acts on
    each node with the same weights.

    Build rows with :meth:`from_graphs` (a list of graphs of any sizes) or :meth:`pack` (already
    padded arrays); pass the format as ``input_shape`` to :class:`~gpntk.NTKKernel`,
    :class:`~gpntk.NNGPKernel`, :class:`~gpntk.TrainedEnsemble` or ``net.finite(width, ...)``.
    """

    nodes: int
    channels: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", integer_argument("GraphInputs nodes", self.nodes, minimum=1))
        object.__setattr__(self, "channels", integer_argument("GraphInputs channels", self.channels, minimum=1))

    @property
    def spatial(self) -> tuple[int, ...]:
        """The "positions" of one input: its (padded) nodes."""
        return (self.nodes,)

    @property
    def row_features(self) -> int:
        """Numbers per row of ``x``: features, adjacency and mask."""
        n = self.nodes
        return n * self.channels + n * n + n

    def pack(self, features: Any, adjacency: Any, mask: Any | None = None) -> Tensor:
        """Rows ``(..., n, row_features)`` of padded ``features`` ``(..., n, N, C)``, ``adjacency`` ``(..., n, N, N)``.

        ``mask`` ``(..., n, N)`` marks the real nodes (default: all ``N`` are real, i.e. padding
        nodes count as isolated nodes of the graph). The result has the features' floating dtype
        (float64 for integer or NumPy inputs) and is checked like any kernel input.
        """
        f = as_float_tensor("features", features)
        a = as_float_tensor("adjacency", adjacency).to(f)
        n, c = self.nodes, self.channels
        if f.dim() < 3 or f.shape[-2:] != (n, c):
            raise ValueError(
                f"GraphInputs({n}, {c}).pack needs features of shape (..., n, {n}, {c}), got {tuple(f.shape)}"
            )
        if a.shape != (*f.shape[:-2], n, n):
            raise ValueError(
                f"GraphInputs({n}, {c}).pack needs an adjacency of shape {(*f.shape[:-2], n, n)}, got {tuple(a.shape)}"
            )
        m = torch.ones(f.shape[:-1], dtype=f.dtype) if mask is None else as_float_tensor("mask", mask).to(f)
        if m.shape != f.shape[:-1]:
            raise ValueError(f"GraphInputs.pack needs a mask of shape {tuple(f.shape[:-1])}, got {tuple(m.shape)}")
        x = torch.cat([f.flatten(-2), a.flatten(-2), m], dim=-1)
        self.check_rows("the packed graphs", x)
        return x

    def unpack(self, x: Tensor) -> GraphTensors:
        """The padded graphs of rows ``x`` ``(..., n, row_features)`` (views, no copies)."""
        n, c = self.nodes, self.channels
        features = x[..., : n * c].unflatten(-1, (n, c))
        adjacency = x[..., n * c : n * c + n * n].unflatten(-1, (n, n))
        return GraphTensors(features, adjacency, x[..., n * c + n * n :])

    @classmethod
    def from_graphs(
        cls, graphs: Sequence[tuple[Any, Any]], nodes: int | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple["GraphInputs", Tensor]:
        """The format and the rows ``(len(graphs), row_features)`` of a list of ``(features, adjacency)`` graphs.

        Graph ``g`` has features ``(n_g, C)`` and adjacency ``(n_g, n_g)`` (dense or a torch
        sparse tensor; NumPy arrays are accepted); all are padded to ``nodes`` nodes (default: the
        largest graph's).
        """
        if len(graphs) == 0:
            raise ValueError("GraphInputs.from_graphs needs at least one graph")
        parts = [(as_float_tensor("features", f, dtype), as_float_tensor("adjacency", a, dtype)) for f, a in graphs]
        channels = {f.shape[-1] if f.dim() == 2 else -1 for f, _ in parts}
        if len(channels) != 1 or -1 in channels:
            raise ValueError(
                f"every graph needs features of shape (n_g, C) with one C, got channels {sorted(channels)}"
            )
        largest = max(f.shape[0] for f, _ in parts)
        size = largest if nodes is None else integer_argument("nodes", nodes, minimum=1)
        if size < largest:
            raise ValueError(f"nodes={size} is smaller than the largest graph ({largest} nodes)")
        fmt = cls(size, channels.pop())
        features = torch.zeros(len(parts), size, fmt.channels, dtype=dtype)
        adjacency = torch.zeros(len(parts), size, size, dtype=dtype)
        mask = torch.zeros(len(parts), size, dtype=dtype)
        for g, (f, a) in enumerate(parts):
            k = f.shape[0]
            if a.shape != (k, k):
                raise ValueError(f"graph {g} has {k} nodes but an adjacency of shape {tuple(a.shape)}")
            features[g, :k], adjacency[g, :k, :k], mask[g, :k] = f, a, 1
        return fmt, fmt.pack(features, adjacency, mask)

    def check_rows(self, name: str, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` holds graphs of this format (padding without features or edges)."""
        if x.shape[-1] != self.row_features:
            raise ValueError(
                f"{name}: {self!r} needs {self.row_features} numbers per row ({self.nodes}·{self.channels} "
                f"features, {self.nodes}² adjacency, {self.nodes} mask), got {x.shape[-1]}"
            )
        if x.numel() == 0 or is_transformed(x):  # inside vmap/grad transforms values cannot be read
            return
        g = self.unpack(x.detach())
        if not bool(((g.mask == 0) | (g.mask == 1)).all()):
            raise ValueError(f"{name}: the node mask must hold 0 (padding) or 1 (a real node)")
        padding = g.mask == 0
        if bool((g.features.abs().sum(-1) * padding).any()):
            raise ValueError(f"{name}: padding nodes (mask 0) must have zero features")
        edges = g.adjacency.abs()
        if bool(((edges.sum(-1) + edges.sum(-2)) * padding).any()):
            raise ValueError(f"{name}: padding nodes (mask 0) must have no edges (zero adjacency rows and columns)")

    def __repr__(self) -> str:
        return f"GraphInputs(nodes={self.nodes}, channels={self.channels})"


class _RegisteredGraphs:
    """What the index formats share: data copied at construction, never changed, shared by deep copies.

    Subclasses list their tensors in :meth:`_tensors`; rows of ``x`` are indices (one number a
    row), and the "positions" of a state are nodes (``spatial``, from ``nodes``).
    """

    @property
    def nodes(self) -> int:
        """The largest number of nodes a state holds."""
        raise NotImplementedError

    def _tensors(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _freeze(self) -> None:
        """Record the tensors' versions, for :meth:`check_unchanged`."""
        self._versions = tuple(t._version for t in self._tensors())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """The object itself: it is data that never changes (a batched kernel's deep copy shares it)."""
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled: fresh tensors, so the in-place guard starts from their versions."""
        self.__dict__.update(state)
        self._after_unpickling()
        self._freeze()

    def _after_unpickling(self) -> None:
        """Reset caches of derived values (none by default)."""

    def check_unchanged(self) -> None:
        """Raise ``RuntimeError`` if the tensors were modified in place after construction.

        Kernels read them at every evaluation (and may cache values derived from them), so an
        in-place change would make earlier and later values disagree silently.
        """
        if tuple(t._version for t in self._tensors()) != self._versions:
            name = type(self).__name__
            raise RuntimeError(
                f"this {name}'s tensors were modified in place after it was built; kernels and ensembles built on "
                f"it would mix old and new values. Build a new {name} instead."
            )

    @property
    def spatial(self) -> tuple[int, ...]:
        """The "positions" of a state: nodes."""
        return (self.nodes,)

    @property
    def row_features(self) -> int:
        """Numbers per row of ``x``: one index."""
        return 1


class NodeGraph(_RegisteredGraphs):
    r"""One fixed graph whose nodes are the inputs of a node-level kernel (GCN-NTK / GCN-NNGP).

    :param features: node features ``(N, C)``; the input kernel of two nodes is :math:`h \cdot h' / C`.
    :param adjacency: ``(N, N)``, row :math:`i` what node :math:`i` receives: a torch sparse
        tensor (kept sparse, so large graphs never form a dense :math:`N \times N` adjacency), or a
        dense tensor / NumPy array (made sparse). Use :meth:`from_edges` for an edge list with a
        normalisation.

    A kernel built with ``input_shape=graph`` takes node indices: rows ``(..., n, 1)`` of whole
    numbers in ``[0, N)`` in a floating dtype (GPyTorch's inputs; the kernel's dtype follows it),
    e.g. ``torch.arange(N, dtype=torch.float64)[:, None]``.
    The kernel of the whole graph is computed once per evaluation (every node's value depends on
    its neighbourhood) and the requested entries are read from it.
    """

    def __init__(self, features: Any, adjacency: Any):
        x = as_float_tensor("NodeGraph features", features)
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"NodeGraph features must be (N, C) with N, C >= 1, got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("NodeGraph features contain NaN or infinite values")
        n = x.shape[0]
        a = adjacency if torch.is_tensor(adjacency) else torch.as_tensor(np.asarray(adjacency))
        if a.shape != (n, n):
            raise ValueError(f"NodeGraph adjacency must be ({n}, {n}) for {n} nodes, got {tuple(a.shape)}")
        a = (a.to_sparse_coo() if a.layout != torch.sparse_coo else a).coalesce().to(x.dtype)
        if not bool(torch.isfinite(a.values()).all()):
            raise ValueError("NodeGraph adjacency contains NaN or infinite values")
        self.features = x.clone()  # the graph's own copies: later changes to the caller's tensors do not reach it
        self.adjacency = a.clone()
        self._input_kernels: dict[tuple[torch.dtype, torch.device], tuple[Tensor, int]] = {}
        self._freeze()

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.features, self.adjacency.values(), self.adjacency.indices())

    def _after_unpickling(self) -> None:
        self._input_kernels = {}

    def input_kernel(self, like: Tensor) -> Tensor:
        r"""The input kernel :math:`\Sigma_0 = X X^\top / C` ``(N, N)`` in ``like``'s dtype and device (cached)."""
        self.check_unchanged()
        key = (like.dtype, like.device)
        cached = self._input_kernels.get(key)
        if cached is None or cached[1] != cached[0]._version:  # (re)computed if anything wrote into it
            x = self.features.to(like)
            kernel = x @ x.transpose(-1, -2) / self.channels
            cached = self._input_kernels[key] = (kernel, kernel._version)
        return cached[0]

    @classmethod
    def from_edges(
        cls,
        features: Any,
        edges: Any,
        *,
        weights: Any | None = None,
        normalization: Normalization | None = None,
        self_loops: bool = False,
    ) -> "NodeGraph":
        """The graph of an edge list ``edges`` ``(2, E)``: edge ``k`` goes from ``edges[0, k]`` to ``edges[1, k]``.

        Both directions of an undirected edge must be listed (as in PyTorch Geometric's
        ``edge_index``). ``weights`` ``(E,)`` (default 1); repeated edges add up. Then
        :func:`normalized_adjacency` with ``normalization`` and ``self_loops``.
        """
        x = as_float_tensor("NodeGraph features", features)
        e = torch.as_tensor(np.asarray(edges) if not torch.is_tensor(edges) else edges)
        if e.dim() != 2 or e.shape[0] != 2 or e.is_floating_point():
            raise ValueError(f"edges must be an integer tensor of shape (2, E), got {tuple(e.shape)} {e.dtype}")
        n = x.shape[0]
        if e.numel() and (int(e.min()) < 0 or int(e.max()) >= n):
            raise ValueError(f"edges name nodes outside [0, {n})")
        w = torch.ones(e.shape[1], dtype=x.dtype) if weights is None else as_float_tensor("weights", weights).to(x)
        if w.shape != (e.shape[1],):
            raise ValueError(f"weights must have shape ({e.shape[1]},), got {tuple(w.shape)}")
        receivers, senders = e[1].long(), e[0].long()
        index = torch.stack([receivers, senders])
        adjacency = torch.sparse_coo_tensor(index, w, (n, n), check_invariants=True).coalesce()
        return cls(x, normalized_adjacency(adjacency, normalization, self_loops=self_loops))

    @property
    def nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    def indices(self, x: Tensor) -> Tensor:
        """The node indices of rows ``x`` ``(..., n, 1)`` as a long tensor ``(..., n)`` (checked)."""
        self.check_unchanged()
        self.check_rows("x", x)
        return x[..., 0].long()

    def check_rows(self, name: str, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` ``(..., n, 1)`` holds integer node indices in ``[0, N)``."""
        if x.shape[-1] != 1:
            raise ValueError(
                f"{name}: a node-level kernel takes node indices, rows of shape (..., n, 1), got {tuple(x.shape)}"
            )
        _check_whole_indices(name, x, self.nodes, "node")

    def __repr__(self) -> str:
        return f"NodeGraph(nodes={self.nodes}, channels={self.channels}, edges={self.adjacency._nnz()})"


class GraphDataset(_RegisteredGraphs):
    r"""A registered list of graphs of any sizes, whose indices are the inputs of a graph-level kernel.

    :param graphs: ``(features (n_g, C), adjacency (n_g, n_g))`` pairs (tensors or NumPy arrays;
        dense or torch sparse adjacencies, row :math:`u` what node :math:`u` receives).

    A kernel built with ``input_shape=dataset`` takes graph indices: rows ``(n, 1)`` of whole
    numbers in ``[0, len(dataset))``, so an ``ExactGP`` fits on them. Unlike rows of
    :class:`GraphInputs`, which hold every graph padded to one size (for PROTEINS, 620² numbers a
    graph), each evaluation groups the requested graphs into buckets of similar sizes and pads
    each pair of buckets only to the larger of the two (:mod:`gpntk.kernels.graph_dataset`); the
    values are those of :class:`GraphInputs` (padding never changes a kernel value). Rows have no
    batch dimensions (the kernel's hyperparameters may).

    The graphs are copied when the dataset is built; changing them in place afterwards raises an
    error at the next evaluation.
    """

    def __init__(self, graphs: Sequence[tuple[Any, Any]], growth: float = 1.25):
        if len(graphs) == 0:
            raise ValueError("GraphDataset needs at least one graph")
        parts = []
        for g, (f, a) in enumerate(graphs):
            features = as_float_tensor("features", f, torch.float64).clone()
            adjacency = as_float_tensor("adjacency", a, torch.float64).clone()
            if features.dim() != 2 or adjacency.shape != (features.shape[0], features.shape[0]):
                raise ValueError(
                    f"graph {g}: features must be (n_g, C) and adjacency (n_g, n_g), got {tuple(features.shape)} "
                    f"and {tuple(adjacency.shape)}"
                )
            if not (bool(torch.isfinite(features).all()) and bool(torch.isfinite(adjacency).all())):
                raise ValueError(f"graph {g} contains NaN or infinite values")
            parts.append((features, adjacency))
        channels = {f.shape[1] for f, _ in parts}
        if len(channels) != 1:
            raise ValueError(f"every graph needs the same number of feature channels, got {sorted(channels)}")
        self.graphs: tuple[tuple[Tensor, Tensor], ...] = tuple(parts)
        self.sizes = torch.tensor([f.shape[0] for f, _ in parts])
        self.growth = float(growth)
        self._channels = channels.pop()
        self._freeze()

    def __len__(self) -> int:
        return len(self.graphs)

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for graph in self.graphs for t in graph)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def nodes(self) -> int:
        """The largest graph's number of nodes."""
        return int(self.sizes.max())

    def check_rows(self, name: str, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` ``(n, 1)`` holds whole graph indices in ``[0, len(self))``."""
        if x.shape[-1] != 1 or x.dim() != 2:
            raise ValueError(
                f"{name}: a GraphDataset kernel takes graph indices, rows of shape (n, 1) without batch dimensions, "
                f"got {tuple(x.shape)}"
            )
        _check_whole_indices(name, x, len(self), "graph")

    def indices(self, x: Tensor) -> Tensor:
        """The graph indices of rows ``x`` ``(n, 1)`` as a long tensor ``(n,)`` (checked)."""
        self.check_unchanged()
        self.check_rows("x", x)
        return x[..., 0].long()

    def buckets(self, index: Tensor) -> list[Tensor]:
        """Positions into ``index`` grouped by the sizes of those graphs (:func:`size_buckets`)."""
        return [p.to(index.device) for p in size_buckets(self.sizes[index.cpu()], self.growth)]

    def rows(self, index: Tensor, nodes: int, like: Tensor) -> tuple[GraphInputs, Tensor]:
        """The graphs ``index`` as rows of :class:`GraphInputs` padded to ``nodes`` nodes (``like``'s dtype, device)."""
        fmt = GraphInputs(nodes, self.channels)
        picked = [self.graphs[i] for i in index.tolist()]
        features = torch.zeros(len(picked), nodes, self.channels, dtype=like.dtype)
        adjacency = torch.zeros(len(picked), nodes, nodes, dtype=like.dtype)
        mask = torch.zeros(len(picked), nodes, dtype=like.dtype)
        for g, (f, a) in enumerate(picked):
            k = f.shape[0]
            features[g, :k], adjacency[g, :k, :k], mask[g, :k] = f, a, 1
        rows = torch.cat([features.flatten(-2), adjacency.flatten(-2), mask], dim=-1)
        return fmt, rows.to(like.device)

    def __repr__(self) -> str:
        return f"GraphDataset({len(self)} graphs, up to {self.nodes} nodes, channels={self.channels})"


def size_buckets(sizes: Tensor, growth: float) -> list[Tensor]:
    """Positions into ``sizes`` ``(n,)`` grouped by size: sorted, a new group past ``growth`` × the group's smallest.

    Graphs of one group are padded to the group's largest, which is then at most ``growth`` times
    any of its graphs' size.
    """
    order = torch.argsort(sizes, stable=True).tolist()
    groups: list[list[int]] = []
    first = 0.0
    for position in order:
        size = float(sizes[position])
        if groups and size <= growth * first:
            groups[-1].append(position)
        else:
            groups.append([position])
            first = size
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def _check_whole_indices(name: str, x: Tensor, count: int, what: str) -> None:
    """Raise ``ValueError`` unless ``x`` holds whole numbers in ``[0, count)`` (skipped inside transforms)."""
    if x.numel() == 0 or is_transformed(x):
        return
    values = x.detach()
    if values.is_floating_point() and not bool((values == values.round()).all()):
        raise ValueError(f"{name}: {what} indices must be whole numbers")
    if int(values.min()) < 0 or int(values.max()) >= count:
        raise ValueError(f"{name}: {what} indices must lie in [0, {count}) for these {count} {what}s")


#: the input formats of graph kernels
GraphFormat = Union[GraphInputs, NodeGraph, GraphDataset]


def normalized_adjacency(adjacency: Tensor, normalization: Normalization | None, *, self_loops: bool = False) -> Tensor:
    r"""The GCN propagation matrix of ``adjacency`` ``(N, N)`` (dense or sparse COO, kept as given).

    With ``self_loops`` first :math:`A \leftarrow A + I`. Then, with degrees
    :math:`d_i = \sum_j A_{ij}` (what node :math:`i` receives) and column sums
    :math:`c_j = \sum_i A_{ij}`: ``"row"`` :math:`D^{-1} A` (the mean of the neighbours),
    ``"symmetric"`` :math:`D^{-1/2} A D^{-1/2}` (Kipf & Welling 2017), ``"column"``
    :math:`A\, C^{-1}`; ``None`` leaves :math:`A`. A node without edges has degree 0 and keeps a
    zero row (it receives nothing), as in Sabanayagam et al. (2023).
    """
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {normalization!r}")
    n = adjacency.shape[-1]
    if adjacency.dim() != 2 or adjacency.shape[0] != n:
        raise ValueError(f"normalized_adjacency needs a square (N, N) adjacency, got {tuple(adjacency.shape)}")
    sparse = adjacency.layout == torch.sparse_coo
    if sparse:
        a = adjacency.coalesce()
        index, values = a.indices(), a.values()
        if self_loops:
            loops = torch.arange(n, device=values.device)
            index = torch.cat([index, torch.stack([loops, loops])], dim=1)
            values = torch.cat([values, values.new_ones(n)])
            a = torch.sparse_coo_tensor(index, values, (n, n), check_invariants=True).coalesce()
            index, values = a.indices(), a.values()
        if normalization is None:
            return a
        rows = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index[0], values)
        cols = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index[1], values)
        left, right = _scales(normalization, rows, cols)
        scaled = values * left[index[0]] * right[index[1]]
        return torch.sparse_coo_tensor(index, scaled, (n, n), check_invariants=True).coalesce()
    a = adjacency + torch.eye(n, dtype=adjacency.dtype, device=adjacency.device) if self_loops else adjacency
    if normalization is None:
        return a
    left, right = _scales(normalization, a.sum(-1), a.sum(-2))
    return left[:, None] * a * right[None, :]


def _scales(normalization: Normalization, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """The row and column factors of a normalisation, given row and column sums (0 for empty ones)."""

    def inverse(d: Tensor, power: float) -> Tensor:
        return torch.where(d > 0, d.clamp_min(torch.finfo(d.dtype).tiny) ** -power, torch.zeros_like(d))

    ones = torch.ones_like(rows)
    if normalization == "row":
        return inverse(rows, 1.0), ones
    if normalization == "column":
        return ones, inverse(cols, 1.0)
    return inverse(rows, 0.5), inverse(rows, 0.5)


def as_float_tensor(name: str, value: Any, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` (tensor, array or nested lists) as a floating tensor (float64 unless already floating)."""
    if torch.is_tensor(value):
        t = value.to_dense() if value.layout != torch.strided else value
    else:
        t = torch.as_tensor(np.asarray(value))
    if dtype is not None:
        return t.to(dtype)
    return t if t.is_floating_point() else t.to(torch.float64)


def checked_input_shape(input_shape: Any) -> tuple[int, ...] | GraphFormat | None:
    """``input_shape`` checked: a graph format as it is, else a tuple of positive ints ``(C, *spatial)`` or ``None``."""
    if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
        return input_shape
    return check_input_shape(input_shape)


def check_rows_of(input_shape: Any, x1: Tensor, x2: Tensor, *, diag: bool) -> None:
    """The inputs of a kernel call (``_validation.check_kernel_inputs``), read through a graph format if any."""
    if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
        check_kernel_inputs(x1, x2, diag=diag)
        input_shape.check_rows("x1", x1)
        if x2 is not x1:
            input_shape.check_rows("x2", x2)
    else:
        check_kernel_inputs(x1, x2, diag=diag, input_shape=input_shape)
