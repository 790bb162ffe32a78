"""Graph datasets for the graph-kernel benchmarks, and the graph-NTK protocol of Du et al. (2019).

Pure data and protocol: readers for the offline copies under ``../shared/data/graphs`` (see its README)
and the published reference numbers; no kernels. Everything is NumPy, float64 for features.

* :func:`load_tu` reads the six graph-classification sets (MUTAG, PTC, PROTEINS, NCI1, IMDBBINARY,
  IMDBMULTI) in the text format of GIN (Xu et al. 2019), with its ten published folds;
* :func:`load_planetoid` reads Cora / Citeseer with the public Planetoid split;
* :data:`PUBLISHED` holds the accuracies to compare with; :data:`GNTK_GRID`, :data:`GNTK_GRID_FULL` and
  :data:`SVM_C_GRID` the hyperparameters of the graph-NTK protocol.

Node features of the TU sets
----------------------------
As in the data loaders of GIN (``util.py`` of weihua916/powerful-gnns) and of the graph NTK
(``util.py`` of KangchengHou/gntk, the same code): a node's feature is the one-hot code of its tag,
with the tags relabelled over the whole dataset, so ``C`` = the number of distinct tags in the file
(MUTAG 9, PTC 19, PROTEINS 3, NCI1 37). The social sets have no node labels (every tag is 0); for
them the graph NTK's ``gram.py`` sets ``degree_as_tag`` (IMDBBINARY, IMDBMULTI, COLLAB), and the
tag is the node degree: the one-hot code of the degree over the *distinct degrees that occur in
the dataset* (IMDBBINARY 65 columns, IMDBMULTI 59), not over 0..max degree. The column order of
the one-hot code is irrelevant to any kernel built from inner products (we sort the tags; GIN uses
the iteration order of a Python set).

Graph labels are relabelled 0..k-1 in the order of first appearance in the file, as GIN does
(MUTAG's file labels are 2 and 0: 2 → 0, 0 → 1).

The file format and its checks
------------------------------
``NAME.txt``: the number of graphs, then per graph a line ``n label`` and ``n`` node lines
``tag k nbr_1 ... nbr_k [attributes...]`` (0-based neighbours within the graph). GIN parses any
columns after the ``k`` neighbours as continuous attributes but never uses them (its node features
are the one-hot tags only); none of the six files has such columns, and :func:`load_tu` ignores
them too (it notes their presence in :attr:`TUDataset.notes`). GIN builds an undirected
``networkx.Graph`` from the lists, which symmetrises one-directional entries and merges repeated
ones; :func:`load_tu` does the same (``A = max(A, Aᵀ)``) and records every such repair in
:attr:`TUDataset.notes`. Self-loops in a neighbour list are dropped (none occur); the adjacency
returned has a zero diagonal (the graph NTK adds the identity itself, see below).

Anomaly in the files: MUTAG's first graph (index 0) is corrupted in the GIN copy: its first nine
nodes carry the tags 0..8 (as if the node index had been written as the tag), so tags 7 and 8
occur only in that graph and MUTAG has 9 feature columns instead of its 7 atom types; its lists
have 16 one-directional entries and one repeated entry (node 3 lists node 2 twice). GIN and the
graph NTK use the graph as it is (symmetrised), and so do we.

The ten folds: every test fold has ⌊N/10⌋ graphs, so where N is not a multiple of 10 the test folds
do not cover the dataset: MUTAG's graphs 0, 13, 37, 114, 161, 163, 169, 187, PTC's 14, 171, 235,
267 and PROTEINS' 25, 314, 454 are in every training fold and never tested (the corrupted MUTAG
graph 0 among them). Each fold's train and test sets do partition the dataset, and the test folds
are pairwise disjoint.

Du et al.'s protocol (the graph NTK, NeurIPS 2019)
--------------------------------------------------
Read from the authors' code, KangchengHou/gntk (``gntk.py``, ``gram.py``, ``search.py``,
``run_gram.sh``, ``run_search.sh``), in the paper's notation (BLOCK, R, c_u, c_σ; its Sections 3-4):

* **Architecture.** ``L`` BLOCK operations, each an aggregation followed by ``R`` fully connected
  ReLU layers (``num_mlp_layers``); the code's ``num_layers`` counts the input layer, i.e.
  ``num_layers = L + 1`` (``num_layers = 2`` is one aggregation and one MLP; the repository's
  README calls that setting "2 BLOCK operations", which contradicts its code).
* **Aggregation with self-loops.** Every aggregation uses ``Ã = A + I`` (``gram.py`` builds
  ``A + Aᵀ + I`` from the edge list) and maps a covariance ``S`` between graphs G, G' to
  ``c_u c_u' Σ_{v ∈ N(u)∪{u}} Σ_{v' ∈ N(u')∪{u'}} S_vv'``. ``scale="uniform"``: ``c_u = 1``, i.e.
  ``Ã S Ã'ᵀ`` (sum aggregation). ``scale="degree"``: ``c_u = 1/(|N(u)|+1)``, i.e.
  ``P S P'ᵀ`` with ``P = D̃⁻¹Ã`` and ``D̃ = diag(Ã1)`` = diag(degree + 1): the row-normalised
  closed-neighbourhood *mean*, applied on both sides, each graph with its own degrees (the code's
  ``scale_mat = 1 / outer(rowsum(Ã), colsum(Ã'))`` on ``kron(Ã, Ã') vec(S)``). The same map is
  applied to the NNGP covariance Σ and to the NTK Θ at every aggregation; the first aggregation
  acts on the input covariance ``X Xᵀ``.
* **Fully connected layers.** No bias; ReLU with weight variance 2 (the paper's ``c_σ = 2``): the
  code's Σ ↦ (√(ΣᵤᵤΣᵥᵥ)/π)·(sin θ + (π − θ) cos θ) and Σ̇ = (π − θ)/π, Θ ↦ Θ·Σ̇ + Σ. The input
  covariance is the plain ``X Xᵀ`` of the one-hot features (no 1/C factor).
* **Readout.** Sum pooling over the nodes of both graphs: ``K(G, G') = 2 Σ_{u,u'} Θ^{(L)}_uu'``;
  with jumping knowledge the sum over the layers ``ℓ = 0..L`` of the same node sums, where layer 0
  is the *un-aggregated* input term ``X Xᵀ`` (``jump_ntk`` starts from it) and layer ℓ ≥ 1 is Θ after
  the ℓ-th block's MLP. The factor 2 is immaterial (see the SVM step).
* **Grid actually run** (``run_gram.sh``): ``num_mlp_layers`` ∈ {1, 2, 3}; ``scale`` ∈ {uniform,
  degree}; ``num_layers`` ∈ {10, 12, 14} (L ∈ {9, 11, 13}) for NCI1 and PTC, {2, 4} (L ∈ {1, 3}) for
  the others; ``--jk`` is never passed, so every released kernel uses jumping knowledge (``gram.py``
  default ``jk=1``). The script spells PTC as ``PTC1``, for which ``gram.py`` never sets
  ``degree_as_tag`` (a NameError), so the PTC kernels were not produced by the released script as
  is. :data:`GNTK_GRID` is this grid. :data:`GNTK_GRID_FULL` (L ∈ 1..14 for every set, with and
  without jumping knowledge) is the wider grid of P. Nikolaus's replication (ETH Zürich MSc thesis
  2020, github PhN01/thesis_gntk), whose non-nested run on it is within 0.6 points of Table 1.
* **Classifier** (``search.py``): scikit-learn ``SVC(kernel="precomputed", max_iter=5e5)`` with
  ``C`` on :data:`SVM_C_GRID` = 120 log-spaced values from 10⁻² to 10⁴; the Gram matrix is first
  divided by its smallest entry, and every C is run both on that matrix and on the normalised one
  ``K_ij / √(K_ii K_jj)``.
* **Selection and the reported number.** ``GridSearchCV`` with ``cv`` = the ten published
  (train, test) folds (the GIN splits) gives, per kernel, normalisation and C, the mean accuracy
  over the ten test folds; the reported accuracy is the best such mean over the whole grid
  (kernel hyperparameters × normalisation × C) per dataset, with the standard deviation over the
  ten folds at that setting. This is GIN's "best mean validation accuracy" protocol (Xu et al.
  2019, README of powerful-gnns): the hyperparameters are chosen on the folds that are reported,
  so it is optimistic: Nikolaus's nested re-run (C and kernel chosen by an inner 5-fold split)
  scores 0.4-6.5 points below his non-nested one. The aggregation over ``search.py``'s output CSVs
  is not in the repository; the paper reports the mean and standard deviation of the validation
  accuracies over the ten folds. All test folds have the same size, so the fold-size weighting of
  old scikit-learn's ``GridSearchCV`` (``iid=True``) changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

TU_DATASETS = ("MUTAG", "PTC", "PROTEINS", "NCI1", "IMDBBINARY", "IMDBMULTI")
PLANETOID_DATASETS = ("cora", "citeseer")
#: the social-network sets, whose tags are the node degrees (``gram.py`` of KangchengHou/gntk)
DEGREE_AS_TAG = frozenset({"IMDBBINARY", "IMDBMULTI", "COLLAB"})
#: other spellings of the folder names
ALIASES = {"IMDB-BINARY": "IMDBBINARY", "IMDB-B": "IMDBBINARY", "IMDB-MULTI": "IMDBMULTI", "IMDB-M": "IMDBMULTI",
           "PTC_MR": "PTC"}

DEFAULT_TU_ROOT = Path("../shared/data/graphs/tu")
DEFAULT_PLANETOID_ROOT = Path("../shared/data/graphs/planetoid")


# --- published numbers ---------------------------------------------------------------------------
class Published(NamedTuple):
    """A published test accuracy in %: ``mean`` ± ``std`` (``None`` where the paper gives none)."""

    mean: float
    std: float | None
    model: str
    citation: str


GNTK_CITATION = ("S. S. Du, K. Hou, B. Póczos, R. Salakhutdinov, R. Wang, K. Xu, \"Graph Neural Tangent Kernel: "
                 "Fusing Graph Neural Networks with Graph Kernels\", NeurIPS 2019, Table 1 (10-fold mean ± std)")
GCN_CITATION = ("T. N. Kipf, M. Welling, \"Semi-Supervised Classification with Graph Convolutional Networks\", "
                "ICLR 2017, Table 2 (public Planetoid split)")

#: Du et al.'s graph NTK on the six TU sets (also COLLAB 83.6 ± 1.0, not among our data), and a
#: trained 2-layer GCN on the Planetoid split; keys are :data:`TU_DATASETS` and :data:`PLANETOID_DATASETS`
PUBLISHED: dict[str, Published] = {
    "MUTAG": Published(90.0, 8.5, "GNTK", GNTK_CITATION),
    "PTC": Published(67.9, 6.9, "GNTK", GNTK_CITATION),
    "PROTEINS": Published(75.6, 4.2, "GNTK", GNTK_CITATION),
    "NCI1": Published(84.2, 1.5, "GNTK", GNTK_CITATION),
    "IMDBBINARY": Published(76.9, 3.6, "GNTK", GNTK_CITATION),
    "IMDBMULTI": Published(52.8, 4.6, "GNTK", GNTK_CITATION),
    "cora": Published(81.5, None, "GCN", GCN_CITATION),
    "citeseer": Published(70.3, None, "GCN", GCN_CITATION),
}


# --- protocol ------------------------------------------------------------------------------------
#: the SVM's C values (``np.logspace(-2, 4, 120)`` in ``search.py`` of KangchengHou/gntk), applied to the
#: Gram matrix divided by its smallest entry and to the normalised Gram matrix
SVM_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-2, 4, 120))
#: ``SVC(max_iter=...)`` in ``search.py``
SVM_MAX_ITER = 500_000


@dataclass(frozen=True)
class GNTKGrid:
    """Hyperparameters of the graph NTK (see the module docstring for their meaning).

    ``num_blocks`` maps a dataset to its numbers of BLOCK operations L (aggregation + MLP; Du et al.'s
    code passes ``num_layers = L + 1``). ``aggregation`` is ``"sum"`` (the code's ``scale="uniform"``,
    ``c_u = 1``) or ``"mean"`` (``scale="degree"``, ``c_u = 1/(|N(u)|+1)``, i.e. ``D̃⁻¹(A+I)`` on both
    sides); both on ``A + I``. ``normalise_gram``: whether the SVM sees ``K_ij / √(K_ii K_jj)``.
    """

    num_blocks: Mapping[str, tuple[int, ...]]
    mlp_layers: tuple[int, ...] = (1, 2, 3)
    jumping_knowledge: tuple[bool, ...] = (True,)
    aggregation: tuple[str, ...] = ("sum", "mean")
    normalise_gram: tuple[bool, ...] = (False, True)

    def kernels(self, name: str) -> Iterator[dict[str, object]]:
        """Every kernel setting for dataset ``name``: dicts with keys num_blocks, mlp_layers,
        jumping_knowledge, aggregation (the SVM's ``normalise_gram`` and C are not part of the kernel)."""
        blocks = self.num_blocks[_canonical(name)]
        for num_blocks, mlp, jk, agg in itertools.product(blocks, self.mlp_layers, self.jumping_knowledge,
                                                         self.aggregation):
            yield {"num_blocks": num_blocks, "mlp_layers": mlp, "jumping_knowledge": jk, "aggregation": agg}


#: the grid of Du et al.'s released ``run_gram.sh`` (``num_layers`` 10/12/14 for NCI1 and PTC, 2/4 otherwise,
#: always with jumping knowledge), in BLOCK operations
GNTK_GRID = GNTKGrid(num_blocks={"NCI1": (9, 11, 13), "PTC": (9, 11, 13), "MUTAG": (1, 3), "PROTEINS": (1, 3),
                                 "IMDBBINARY": (1, 3), "IMDBMULTI": (1, 3)})
#: a superset: L ∈ 1..14 for every set, with and without jumping knowledge (Nikolaus 2020's replication grid)
GNTK_GRID_FULL = GNTKGrid(num_blocks={name: tuple(range(1, 15)) for name in TU_DATASETS},
                          jumping_knowledge=(False, True))


# --- TU graph classification ---------------------------------------------------------------------
@dataclass
class TUDataset:
    """A graph-classification dataset in GIN's format.

    ``graphs[g] = (x, a)``: node features ``x`` of shape (n_g, C), float64 one-hot, and the dense 0/1
    symmetric adjacency ``a`` of shape (n_g, n_g), float64, zero diagonal (no self-loops). ``labels``:
    (num_graphs,) int64 in 0..num_classes-1. ``folds``: the ten (train, test) pairs of int64 graph
    indices from ``10fold_idx`` (each pair partitions the graphs; the test folds are disjoint but
    miss N mod 10 graphs, see the module docstring). ``tags``: per graph (n_g,) int64, the raw tag
    (or degree) behind the one-hot code. ``notes``: repairs made while reading (symmetrised or
    repeated neighbour entries, dropped self-loops, ignored attribute columns).
    """

    name: str
    graphs: list[tuple[NDArray[np.float64], NDArray[np.float64]]]
    labels: NDArray[np.int64]
    folds: list[tuple[NDArray[np.int64], NDArray[np.int64]]]
    tags: list[NDArray[np.int64]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def num_features(self) -> int:
        """C, the width of the one-hot node features."""
        return int(self.graphs[0][0].shape[1])

    @property
    def num_nodes(self) -> NDArray[np.int64]:
        """(num_graphs,) the node count n_g of every graph."""
        return np.array([x.shape[0] for x, _ in self.graphs], dtype=np.int64)

    def statistics(self) -> dict[str, float]:
        """Graph count, classes, features, node counts (max / mean / min), undirected edges (mean)."""
        nodes = self.num_nodes
        edges = np.array([a.sum() / 2 for _, a in self.graphs])
        return {"graphs": len(self), "classes": self.num_classes, "features": self.num_features,
                "max_nodes": int(nodes.max()), "mean_nodes": float(nodes.mean()), "min_nodes": int(nodes.min()),
                "mean_edges": float(edges.mean())}


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def _read_graphs(path: Path, notes: list[str]) -> tuple[list[NDArray[np.int64]], list[NDArray[np.float64]],
                                                         list[int]]:
    """Parse GIN's ``NAME.txt``: per graph its raw tags (n_g,), symmetric adjacency (n_g, n_g), raw label."""
    lines = path.read_text().splitlines()
    position = 0

    def next_row() -> list[str]:
        nonlocal position
        while position < len(lines) and not lines[position].strip():
            position += 1
        if position == len(lines):
            raise ValueError(f"{path}: ends early (line {position})")
        position += 1
        return lines[position - 1].split()

    num_graphs = int(next_row()[0])
    tags, adjacencies, labels = [], [], []
    attribute_lines = 0
    for g in range(num_graphs):
        header = next_row()
        if len(header) != 2:
            raise ValueError(f"{path}:{position}: expected 'n label', got {' '.join(header)!r}")
        n, label = int(header[0]), int(header[1])
        a = np.zeros((n, n))
        graph_tags = np.empty(n, dtype=np.int64)
        repeated = self_loops = 0
        for j in range(n):
            row = next_row()
            k = int(row[1])
            if len(row) < k + 2:
                raise ValueError(f"{path}:{position}: {k} neighbours announced, {len(row) - 2} given")
            attribute_lines += len(row) > k + 2
            graph_tags[j] = int(row[0])
            for v in (int(w) for w in row[2:k + 2]):
                if not 0 <= v < n:
                    raise ValueError(f"{path}:{position}: neighbour {v} outside graph {g} of {n} nodes")
                if v == j:
                    self_loops += 1
                    continue
                repeated += a[j, v] == 1
                a[j, v] = 1.0
        one_way = int((a > a.T).sum())
        if one_way or repeated or self_loops:
            notes.append(f"graph {g}: {one_way} one-directional neighbour entries symmetrised, {repeated} repeated "
                         f"entries merged, {self_loops} self-loops dropped")
        tags.append(graph_tags)
        adjacencies.append(np.maximum(a, a.T))
        labels.append(label)
    if any(line.strip() for line in lines[position:]):
        raise ValueError(f"{path}: text after the {num_graphs} graphs (line {position + 1})")
    if attribute_lines:
        notes.append(f"{attribute_lines} node lines have attribute columns after the neighbours; ignored (as GIN)")
    return tags, adjacencies, labels


def _read_folds(folder: Path, num_graphs: int) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    def read(path: Path) -> NDArray[np.int64]:
        return np.array([int(line) for line in path.read_text().split()], dtype=np.int64)

    folds = []
    for k in range(1, 11):
        train, test = read(folder / f"train_idx-{k}.txt"), read(folder / f"test_idx-{k}.txt")
        if np.intersect1d(train, test).size or len(train) + len(test) != num_graphs \
                or not np.array_equal(np.sort(np.concatenate([train, test])), np.arange(num_graphs)):
            raise ValueError(f"{folder}: fold {k} is not a train/test partition of the {num_graphs} graphs")
        folds.append((train, test))
    return folds


def load_tu(name: str, root: Path = DEFAULT_TU_ROOT, degree_as_tag: bool | None = None) -> TUDataset:
    """Read ``root/NAME/NAME.txt`` and ``root/NAME/10fold_idx`` (GIN's format, see the module docstring).

    ``name``: one of :data:`TU_DATASETS` (or an alias such as ``"IMDB-BINARY"``). ``degree_as_tag``:
    one-hot of the node degree instead of the tag; by default for the social sets (:data:`DEGREE_AS_TAG`),
    as Du et al. do. Returns a :class:`TUDataset` (features (n_g, C) float64 one-hot over the tags seen in
    the whole dataset, adjacency (n_g, n_g) float64 symmetric without self-loops, labels relabelled
    0..k-1 in order of first appearance, the ten folds).
    """
    name = _canonical(name)
    folder = Path(root) / name
    if not (folder / f"{name}.txt").is_file():
        raise FileNotFoundError(f"no {name}.txt under {folder} (datasets: {', '.join(TU_DATASETS)})")
    if degree_as_tag is None:
        degree_as_tag = name in DEGREE_AS_TAG
    notes: list[str] = []
    tags, adjacencies, raw_labels = _read_graphs(folder / f"{name}.txt", notes)
    if degree_as_tag:
        tags = [a.sum(axis=1).astype(np.int64) for a in adjacencies]
    values = np.unique(np.concatenate(tags))
    graphs = []
    for graph_tags, a in zip(tags, adjacencies):
        x = np.zeros((len(graph_tags), len(values)))
        x[np.arange(len(graph_tags)), np.searchsorted(values, graph_tags)] = 1.0
        graphs.append((x, a))
    label_ids: dict[int, int] = {}
    labels = np.array([label_ids.setdefault(label, len(label_ids)) for label in raw_labels], dtype=np.int64)
    return TUDataset(name, graphs, labels, _read_folds(folder / "10fold_idx", len(graphs)), tags, notes)


# --- Planetoid node classification ---------------------------------------------------------------
@dataclass
class PlanetoidDataset:
    """A citation graph with the public Planetoid split.

    ``features``: (N, F) float64 dense bag-of-words (0/1). ``edges``: (2, E) int64, both directions of
    every undirected edge, no self-loops (E = 2 × the undirected edge count). ``labels``: (N,) int64,
    -1 for unlabelled nodes: Citeseer's 15 nodes that are missing from the raw test file, which GCN's
    loader pads with zero features and no label (the shared README calls them isolated, but they
    have one or two edges each; Citeseer has 48 other nodes without edges). No split contains them.
    ``train_index`` / ``val_index`` / ``test_index``: int64 node indices (20 per class / 500 / 1000).
    """

    name: str
    features: NDArray[np.float64]
    edges: NDArray[np.int64]
    labels: NDArray[np.int64]
    train_index: NDArray[np.int64]
    val_index: NDArray[np.int64]
    test_index: NDArray[np.int64]

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def adjacency(self) -> NDArray[np.float64]:
        """(N, N) dense symmetric 0/1 adjacency without self-loops, float64."""
        a = np.zeros((self.num_nodes, self.num_nodes))
        a[self.edges[0], self.edges[1]] = 1.0
        return a


def load_planetoid(name: str, root: Path = DEFAULT_PLANETOID_ROOT) -> PlanetoidDataset:
    """Read ``root/name.npz`` (``name``: ``"cora"`` or ``"citeseer"``); the CSR feature keys become a dense
    (N, F) float64 array. Returns a :class:`PlanetoidDataset`."""
    path = Path(root) / f"{name.lower()}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} under {root} (datasets: {', '.join(PLANETOID_DATASETS)})")
    with np.load(path) as z:
        rows, cols = (int(s) for s in z["x_shape"])
        indptr = z["x_indptr"].astype(np.int64)
        features = np.zeros((rows, cols))
        np.add.at(features, (np.repeat(np.arange(rows), np.diff(indptr)), z["x_indices"]),
                  z["x_data"].astype(np.float64))
        return PlanetoidDataset(name.lower(), features, z["edges"].astype(np.int64), z["labels"].astype(np.int64),
                                *(z[key].astype(np.int64) for key in ("train_index", "val_index", "test_index")))
