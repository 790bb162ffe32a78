"""The graph NTK on the six TU graph-classification sets (Du et al. 2019, Table 1) through gpntk.

    .venv/bin/python benchmarks/graph_classification.py --datasets MUTAG --grid paper --output mutag.json
    .venv/bin/python benchmarks/graph_classification.py --datasets MUTAG --grid quick --max-graphs 40 \
        --c-grid decades                                                              # a smoke test

(the documented run, in three parts, is in ``docs/graph-classification.md``)

Data: the GIN copies of MUTAG, PTC, PROTEINS, NCI1, IMDBBINARY and IMDBMULTI with their ten published
folds, read by ``benchmarks/graph_data.py`` (one-hot node tags; one-hot degrees for the IMDB sets), from
``--data`` (default ``../shared/data/graphs/tu`` next to the repository, not shipped with gpntk).

Kernel (:func:`gpntk.layers.gntk`, the GNTK of Du et al. 2019): ``blocks`` BLOCK operations, each an
aggregation over the closed neighbourhood followed by ``mlp_layers`` fully connected ReLU layers
(c_σ = 2, no bias), sum readout over the nodes, jumping knowledge (the sum of the readouts of depths
0..L). The aggregation is in the adjacency handed to gpntk: ``sum`` = ``A + I`` (Du et al.'s
``scale="uniform"``), ``degree`` = ``D̃⁻¹(A + I)`` with ``D̃ = diag((A + I)1)`` (their ``scale="degree"``,
c_u = 1/(|N(u)| + 1); :func:`gpntk.normalized_adjacency` with ``"row"`` and ``self_loops=True``).
:func:`gpntk.graph_kernel_matrices_by_depth` computes the NTK Gram matrices exactly, every ``L`` of the grid
for one (``mlp_layers``, aggregation) from one pass at the largest ``L`` (the tiled evaluation of
:mod:`gpntk.kernels.graph_tiles`; a readout depends only on the layers before it); the wall time of that
pass is measured once and recorded for each of its Grams (``seconds``, with ``shared_by`` the depths it
gave), after an untimed warm-up on two graphs.

Classifier and protocol (``search.py`` of Du et al.'s code): scikit-learn ``SVC(kernel="precomputed",
C, max_iter)`` on the Gram matrix divided by its smallest entry ("raw") and on the normalised Gram
``K_ij / √(K_ii K_jj)``, every C of the grid, fitted on each published training fold and scored on its
test fold. The reported accuracy is the best mean over the ten test folds over the whole grid (kernel ×
normalisation × C; the first best in grid order on ties), with the standard deviation over the ten
folds at that setting (``ddof = 0``, as ``GridSearchCV``). **This selects the hyperparameters on the
very folds it reports**, as GIN (Xu et al. 2019) and the GNTK did: it is optimistic. The script also
reports a **nested** variant that is honest: for every outer fold, the setting (kernel ×
normalisation × C) is chosen by an inner stratified ``--inner-folds``-fold cross-validation on that
fold's training graphs only (the raw Gram then divided by the smallest entry of the training block),
refitted on the training graphs and scored once on the test fold.

Options: ``--grid paper`` is Du et al.'s released grid (:data:`graph_data.GNTK_GRID`: L ∈ {9, 11, 13}
for NCI1 and PTC, L ∈ {1, 3} otherwise; mlp_layers ∈ {1, 2, 3}; sum and degree; jumping knowledge),
``budget`` (the default) the reduced per-dataset grid of the documented run (:data:`BUDGET_GRID`,
chosen from the measured cost of a Gram on this project's shared 2-core machine), ``quick`` one
shallow kernel pair. ``--c-grid paper`` is Du et al.'s 120 C values (``logspace(-2, 4, 120)``),
``thin`` 25 on the same range, ``decades`` 7. ``--max-iter`` is libsvm's iteration cap (Du et al.:
5·10⁵; fits that reach it are counted). ``--max-graphs`` keeps a stratified subset of the graphs (of
every dataset, or ``NAME=COUNT``) and restricts the published folds to it: the accuracies are then
*not* comparable to the published ones (fewer training graphs) and the JSON says so. ``--append``
keeps the other datasets' results already in ``--output`` (a run in several parts).

The script prints a table and writes JSON (``--output``) after each dataset: per dataset the best
accuracy and its setting, the published numbers and the difference in units of the published
standard deviation, the nested accuracy, the per-kernel best, every Gram's time and pairs/s, the
grid and every deviation from Du et al. (``reductions``), and the machine (threads, versions, load
average).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import gpntk

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "graphs" / "tu"
AGGREGATIONS = ("sum", "degree")
GRIDS = ("quick", "budget", "paper")
#: 25 log-spaced C from 10⁻² to 10⁴: the range of Du et al.'s 120 values, about 4 per decade
THIN_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-2, 4, 25))
#: one C per decade on the same range (smoke tests)
DECADE_C_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-2, 5))
DEFAULT_INNER_FOLDS = 3
SEED = 0


def _graph_data():
    """``benchmarks/graph_data.py`` (the TU reader and Du et al.'s protocol constants) as a module."""
    if "graph_data" not in sys.modules:
        spec = importlib.util.spec_from_file_location("graph_data", HERE / "graph_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["graph_data"] = module
        spec.loader.exec_module(module)
    return sys.modules["graph_data"]


graph_data = _graph_data()
C_GRIDS = {"paper": graph_data.SVM_C_GRID, "thin": THIN_C_GRID, "decades": DECADE_C_GRID}


# --- kernel settings and grids -------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSetting:
    """One GNTK: ``blocks`` BLOCKs of ``mlp_layers`` ReLU layers, ``aggregation`` ``"sum"`` or ``"degree"``,
    always with jumping knowledge (as every kernel Du et al. released)."""

    blocks: int
    mlp_layers: int
    aggregation: str

    @property
    def label(self) -> str:
        return f"L={self.blocks} R={self.mlp_layers} {self.aggregation}"

    def network(self) -> gpntk.layers.Layer:
        return gpntk.layers.gntk(self.blocks, self.mlp_layers, jumping_knowledge=True, readout="sum")


def product_grid(blocks: Sequence[int], mlp_layers: Sequence[int],
                 aggregations: Sequence[str] = AGGREGATIONS) -> list[KernelSetting]:
    return [KernelSetting(b, r, a) for b in blocks for r in mlp_layers for a in aggregations]


def paper_grid(name: str) -> list[KernelSetting]:
    """Du et al.'s released grid for ``name`` (:data:`graph_data.GNTK_GRID`; its ``"mean"`` is ``"degree"``)."""
    grid = graph_data.GNTK_GRID
    aggregations = tuple("degree" if a == "mean" else a for a in grid.aggregation)
    return product_grid(grid.num_blocks[name], grid.mlp_layers, aggregations)


#: the reduced grids of the documented run (see the docs for the measured costs behind them): the paper's
#: grid on MUTAG; shallow kernels elsewhere, fewer where one Gram costs minutes
BUDGET_GRID: dict[str, list[KernelSetting]] = {
    "MUTAG": paper_grid("MUTAG"),
    "PTC": product_grid((1, 3), (1,)),
    "PROTEINS": product_grid((1,), (1,), ("sum",)),
    "NCI1": product_grid((1, 3), (1,), ("sum",)),
    "IMDBBINARY": product_grid((1,), (1,)),
    "IMDBMULTI": product_grid((1,), (1,), ("sum",)),
}
QUICK_GRID = product_grid((1,), (1,))


def kernel_grid(grid: str, name: str, only: dict[str, Sequence] | None = None) -> list[KernelSetting]:
    """The kernels of ``grid`` for dataset ``name``; ``only``: keep those whose ``mlp_layers`` /
    ``aggregation`` are in the given values (e.g. ``{"mlp_layers": [1]}``: a part of the grid)."""
    settings = paper_grid(name) if grid == "paper" else BUDGET_GRID[name] if grid == "budget" else QUICK_GRID
    for field, values in (only or {}).items():
        settings = [s for s in settings if getattr(s, field) in values]
    return settings


# --- data ----------------------------------------------------------------------------------------
def stratified_subset(labels: np.ndarray, count: int, seed: int = SEED) -> np.ndarray:
    """Sorted indices of ``count`` graphs, each class in proportion to its share (largest remainders),
    drawn at random with ``seed``; all graphs when ``count >= len(labels)``."""
    n = len(labels)
    if count >= n:
        return np.arange(n)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * count / n
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: count - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def restrict_folds(folds: Sequence[tuple[np.ndarray, np.ndarray]], subset: np.ndarray,
                   labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The published folds on the graphs ``subset`` (positions in ``subset``); ``labels``: the subset's labels.

    Refuses a subset that leaves a test fold empty or a training fold with a single class.
    """
    position = np.full(max(int(subset.max()), max(int(f.max()) for fold in folds for f in fold)) + 1, -1)
    position[subset] = np.arange(len(subset))
    out = []
    for k, (train, test) in enumerate(folds, 1):
        tr, te = position[train], position[test]
        tr, te = tr[tr >= 0], te[te >= 0]
        if len(te) == 0 or len(np.unique(labels[tr])) < 2:
            raise ValueError(f"fold {k}: the subset of {len(subset)} graphs leaves no test graph or one class only")
        out.append((tr, te))
    return out


def with_self_loops(graphs: Sequence[tuple[np.ndarray, np.ndarray]], aggregation: str) -> list[tuple[Any, Any]]:
    """Each graph's adjacency as Du et al. aggregate: ``A + I`` (``"sum"``) or ``D̃⁻¹(A + I)`` (``"degree"``)."""
    if aggregation == "sum":
        return [(x, a + np.eye(len(a))) for x, a in graphs]
    if aggregation == "degree":
        return [(x, gpntk.normalized_adjacency(torch.from_numpy(a), "row", self_loops=True)) for x, a in graphs]
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


# --- Gram matrices -------------------------------------------------------------------------------
def ntk_gram(setting: KernelSetting, graphs: Sequence[tuple[np.ndarray, np.ndarray]],
             progress: bool = True) -> tuple[np.ndarray, float]:
    """The GNTK Gram matrix (n, n) of ``graphs`` (adjacencies without self loops) and its wall time in s."""
    prepared = with_self_loops(graphs, setting.aggregation)
    start = time.perf_counter()
    _, ntk = gpntk.graph_kernel_matrices(setting.network(), prepared, track_ntk=True, progress=progress)
    seconds = time.perf_counter() - start
    return symmetric_gram(ntk.numpy(), setting), seconds


#: the relative asymmetry a Gram may have, per ReLU layer of the network (see :func:`symmetric_gram`)
ASYMMETRY_PER_RELU_LAYER = 1e-8


def symmetric_gram(gram: np.ndarray, setting: KernelSetting) -> np.ndarray:
    """``gram`` averaged with its transpose, after checking that it is finite and symmetric to its accuracy.

    Θ(G, G') and Θ(G', G) of two graphs evaluated together (one size bucket, one tile) are computed
    separately and differ by rounding, amplified by the ReLU NTK's arccos at node pairs of correlation
    one: a rounding error of 1e-16 in ρ = 1 gives θ ≈ √(2·1e-16) ≈ 1.4e-8 instead of 0, and each of the
    ``blocks x mlp_layers`` ReLU layers adds such an error. The check allows
    :data:`ASYMMETRY_PER_RELU_LAYER` relative per ReLU layer. Measured largest relative differences: MUTAG
    5e-11 (L = R = 1); IMDB-MULTI, whose ego networks have many nodes of identical neighbourhoods,
    1.2e-8 at L = R = 3 (nine ReLU layers: allowed 9e-8).
    """
    rtol = ASYMMETRY_PER_RELU_LAYER * setting.blocks * setting.mlp_layers
    if not np.all(np.isfinite(gram)) or not np.allclose(gram, gram.T, rtol=rtol, atol=0):
        worst = float(np.max(np.abs(gram - gram.T) / np.maximum(np.abs(gram), np.abs(gram.T))))
        raise RuntimeError(f"{setting.label}: the Gram matrix is not finite and symmetric to {rtol:g} relative "
                           f"(largest relative difference {worst:.3g})")
    return (gram + gram.T) / 2


def scaled_raw(gram: np.ndarray, block: np.ndarray | None = None) -> np.ndarray:
    """``gram`` over its smallest entry (over ``gram[block][:, block]`` if given), as Du et al.'s ``search.py``;
    over its largest absolute entry if the smallest is not positive."""
    part = gram if block is None else gram[np.ix_(block, block)]
    low = float(part.min())
    return gram / (low if low > 0 else float(np.abs(part).max()))


def normalised(gram: np.ndarray) -> np.ndarray:
    """``K_ij / √(K_ii K_jj)``: the cosine of the feature maps."""
    d = np.sqrt(np.diag(gram))
    return gram / d[:, None] / d[None, :]


# --- the SVM protocol ----------------------------------------------------------------------------
class _Fits:
    """``SVC(kernel="precomputed", max_iter=max_iter)`` fits, counting those that stopped at ``max_iter``."""

    def __init__(self, max_iter: int = graph_data.SVM_MAX_ITER) -> None:
        self.max_iter = max_iter
        self.count = 0
        self.unconverged = 0

    def accuracy(self, matrix: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, c: float) -> float:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import SVC

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = SVC(kernel="precomputed", C=c, max_iter=self.max_iter)
            model.fit(matrix[np.ix_(train, train)], labels[train])
        self.count += 1
        self.unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return float(np.mean(model.predict(matrix[np.ix_(test, train)]) == labels[test]))


def fold_accuracies(matrix: np.ndarray, labels: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                    c_grid: Sequence[float], fits: _Fits) -> tuple[np.ndarray, np.ndarray]:
    """(len(c_grid), len(folds)) test accuracies of the SVM on the precomputed ``matrix``, and for each C
    (len(c_grid),) how many of its fits stopped at ``max_iter``."""
    accuracies, at_cap = [], []
    for c in c_grid:
        before = fits.unconverged
        accuracies.append([fits.accuracy(matrix, labels, tr, te, c) for tr, te in folds])
        at_cap.append(fits.unconverged - before)
    return np.array(accuracies), np.array(at_cap)


def nested_fold(grams: Sequence[np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                c_grid: Sequence[float], inner_folds: int, fits: _Fits) -> tuple[float, tuple[int, bool, float]]:
    """One outer fold of the nested protocol: (test accuracy, chosen (kernel index, normalised, C)).

    The setting with the best mean accuracy of a stratified ``inner_folds``-fold split of ``train``
    (seed :data:`SEED`; the first best in grid order on ties), refitted on all of ``train``.
    """
    from sklearn.model_selection import StratifiedKFold

    splits = [(train[a], train[b]) for a, b in
              StratifiedKFold(inner_folds, shuffle=True, random_state=SEED).split(train, labels[train])]
    best, choice, matrices = -1.0, None, {}
    for k, gram in enumerate(grams):
        for norm in (False, True):
            matrix = normalised(gram) if norm else scaled_raw(gram, train)
            matrices[k, norm] = matrix
            for c in c_grid:
                score = float(np.mean([fits.accuracy(matrix, labels, tr, va, c) for tr, va in splits]))
                if score > best:
                    best, choice = score, (k, norm, float(c))
    k, norm, c = choice
    return fits.accuracy(matrices[k, norm], labels, train, test, c), choice


def ntk_grams(settings: Sequence[KernelSetting], graphs: Sequence[tuple[np.ndarray, np.ndarray]],
              progress: bool = True) -> tuple[list[np.ndarray], float]:
    """The Gram matrices of ``settings`` (one ``mlp_layers`` and aggregation, any ``blocks``) from one pass.

    :func:`gpntk.graph_kernel_matrices_by_depth` through the deepest network yields every shallower one's
    Gram; returns them in the order of ``settings`` and the wall time of the pass in s (symmetry checked by
    :func:`symmetric_gram`).
    """
    if len({(s.mlp_layers, s.aggregation) for s in settings}) != 1:
        raise ValueError("ntk_grams needs settings of one mlp_layers and aggregation")
    deepest = max(settings, key=lambda s: s.blocks)
    prepared = with_self_loops(graphs, deepest.aggregation)
    start = time.perf_counter()
    by_depth = gpntk.graph_kernel_matrices_by_depth(deepest.network(), prepared, [s.blocks for s in settings],
                                                    track_ntk=True, progress=progress)
    seconds = time.perf_counter() - start
    grams = []
    for setting in settings:
        ntk = by_depth[setting.blocks][1]
        assert ntk is not None
        grams.append(symmetric_gram(ntk.numpy(), setting))
    return grams, seconds


def cached_grams(settings: Sequence[KernelSetting], graphs: Sequence[tuple[np.ndarray, np.ndarray]],
                 progress: bool, cache: Path | None, key: str) -> list[tuple[np.ndarray, float, bool]]:
    """:func:`ntk_grams`, each read from ``cache/key-label.npz`` when an earlier run saved it there (with the
    seconds it took then), else all computed in one pass and saved. Returns (Gram, seconds, whether it came
    from the cache) per setting."""
    paths = [None if cache is None else cache / f"{key} {s.label}.npz".replace(" ", "_").replace("=", "")
             for s in settings]
    stored = []
    for path in paths:
        if path is not None and path.is_file():
            data = np.load(path)
            if data["gram"].shape == (len(graphs), len(graphs)):
                stored.append((data["gram"], float(data["seconds"]), True))
                continue
        break
    if len(stored) == len(settings):
        return stored
    grams, seconds = ntk_grams(settings, graphs, progress)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for gram, path in zip(grams, paths):
            np.savez(path, gram=gram, seconds=seconds)
    return [(gram, seconds, False) for gram in grams]


def evaluate_dataset(name: str, grid: str, c_grid: Sequence[float], max_graphs: int | None, data_root: Path,
                     inner_folds: int, nested: bool, progress: bool = True,
                     max_iter: int = graph_data.SVM_MAX_ITER, gram_cache: Path | None = None,
                     only: dict[str, Sequence] | None = None) -> dict[str, Any]:
    """Every Gram of the grid for dataset ``name`` (``only``: a part of it, see :func:`kernel_grid`),
    the SVM protocol on them, and the result record."""
    data = graph_data.load_tu(name, data_root)
    subset = stratified_subset(data.labels, max_graphs) if max_graphs else np.arange(len(data))
    graphs = [data.graphs[g] for g in subset]
    labels = data.labels[subset]
    folds = restrict_folds(data.folds, subset, labels) if len(subset) < len(data) else list(data.folds)
    n = len(graphs)
    settings = kernel_grid(grid, name, only)
    if not settings:
        raise ValueError(f"{name}: no kernel of the {grid} grid is left by {only}")
    nodes = np.array([x.shape[0] for x, _ in graphs])
    print(f"{name}: {n} of {len(data)} graphs, {data.num_classes} classes, {data.num_features} features, "
          f"nodes {nodes.min()}..{nodes.max()} (mean {nodes.mean():.1f}); {len(settings)} kernels", flush=True)

    # one untimed evaluation on two graphs first: the first call of a process pays one-time set-up costs
    for setting in settings[:1]:
        ntk_gram(setting, graphs[:2], progress=False)
    computed: dict[str, tuple[np.ndarray, float, bool, list[int], float]] = {}
    for shared in dict.fromkeys((s.mlp_layers, s.aggregation) for s in settings):
        group = [s for s in settings if (s.mlp_layers, s.aggregation) == shared]
        load = os.getloadavg()[0]
        for setting, (gram, seconds, reused) in zip(group, cached_grams(group, graphs, progress, gram_cache,
                                                                         f"{name} {n}")):
            computed[setting.label] = (gram, seconds, reused, [s.blocks for s in group], load)
        print(f"  R={shared[0]} {shared[1]}: L in {[s.blocks for s in group]} from one pass, "
              f"{computed[group[0].label][1]:8.1f} s (load {load:.1f})", flush=True)
    grams, gram_records = [], []
    pairs = n * (n + 1) // 2
    for setting in settings:
        gram, seconds, reused, shared_by, load = computed[setting.label]
        gram_records.append({**asdict(setting), "label": setting.label, "seconds": seconds, "pairs": pairs,
                             "pairs_per_second": pairs / seconds, "shared_by": shared_by, "load_average_before": load,
                             "from_cache": reused})
        grams.append(gram)

    fits = _Fits(max_iter)
    svm_start = time.perf_counter()
    rows, caps = [], []  # (kernel index, normalised, accuracies (len(c_grid), folds)); fits at max_iter per C
    for k, gram in enumerate(grams):
        for norm in (False, True):
            accuracies, at_cap = fold_accuracies(normalised(gram) if norm else scaled_raw(gram), labels, folds,
                                                 c_grid, fits)
            rows.append((k, norm, accuracies))
            caps.append(at_cap)
    means = np.array([acc.mean(axis=1) for _, _, acc in rows])  # (settings × norms, C)
    r, ci = np.unravel_index(int(np.argmax(means)), means.shape)  # the first best in grid order
    k, norm, acc = rows[r]
    best = {"accuracy_mean": float(acc[ci].mean()), "accuracy_std": float(acc[ci].std()),
            "fold_accuracies": acc[ci].tolist(), "fits_at_max_iter": int(caps[r][ci]),
            "setting": {**asdict(settings[k]), "label": settings[k].label, "normalised_gram": norm,
                        "C": float(c_grid[ci])}}
    per_kernel = []
    for k, setting in enumerate(settings):
        mine = [(row_norm, a) for row_k, row_norm, a in rows if row_k == k]
        scores = [(a.mean(axis=1).max(), row_norm, int(a.mean(axis=1).argmax()), a) for row_norm, a in mine]
        score, row_norm, c_index, a = max(scores, key=lambda s: s[0])
        per_kernel.append({"label": setting.label, "accuracy_mean": float(score),
                           "accuracy_std": float(a[c_index].std()), "normalised_gram": row_norm,
                           "C": float(c_grid[c_index])})
    svm_seconds = time.perf_counter() - svm_start

    nested_record = None
    if nested:
        nested_start = time.perf_counter()
        outcomes = [nested_fold(grams, labels, tr, te, c_grid, inner_folds, fits) for tr, te in folds]
        accs = np.array([a for a, _ in outcomes])
        nested_record = {
            "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()), "fold_accuracies": accs.tolist(),
            "inner_folds": inner_folds,
            "chosen": [{"label": settings[k].label, "normalised_gram": nm, "C": c} for _, (k, nm, c) in outcomes],
            "seconds": time.perf_counter() - nested_start,
        }

    published = graph_data.PUBLISHED[name]
    subset_note = None if n == len(data) else (
        f"{n} of {len(data)} graphs (stratified random subset, seed {SEED}), the published folds restricted to "
        "them: fewer training graphs than Du et al., not comparable to the published accuracy")
    record = {
        "dataset": name, "graphs": n, "graphs_in_dataset": len(data), "classes": data.num_classes,
        "features": data.num_features, "nodes": {"min": int(nodes.min()), "mean": float(nodes.mean()),
                                                 "max": int(nodes.max())},
        "pairs": n * (n + 1) // 2, "test_graphs_per_fold": [len(te) for _, te in folds],
        "grid": grid, "kernels": [s.label for s in settings],
        "paper_grid": [s.label for s in paper_grid(name)],
        "c_grid": [float(c) for c in c_grid],
        "best": best,
        "published": {"accuracy_mean": published.mean / 100, "accuracy_std": published.std / 100,
                      "citation": published.citation},
        "difference_in_published_std": abs(best["accuracy_mean"] - published.mean / 100) / (published.std / 100),
        "nested": nested_record,
        "per_kernel_best": per_kernel,
        "grams": gram_records,
        # a pass shared by several depths is counted once
        "gram_seconds_total": float(sum({
            (g["mlp_layers"], g["aggregation"], tuple(g.get("shared_by") or [g["blocks"]])): g["seconds"]
            for g in gram_records}.values())),
        "svm_seconds": svm_seconds,
        "svm_fits": fits.count, "svm_fits_at_max_iter": fits.unconverged, "svm_max_iter": max_iter,
        "subset": subset_note,
        "reductions": reductions(name, settings, c_grid, subset_note, max_iter),
        "notes": data.notes,
    }
    kind = "normalised" if best["setting"]["normalised_gram"] else "raw"
    line = (f"  best {best['accuracy_mean']:.4f} ± {best['accuracy_std']:.4f} ({best['setting']['label']}, "
            f"{kind}, C={best['setting']['C']:.3g}); published {published.mean / 100:.3f} ± {published.std / 100:.3f}; "
            f"|diff| = {record['difference_in_published_std']:.2f} published std")
    if nested_record:
        line += f"; nested {nested_record['accuracy_mean']:.4f} ± {nested_record['accuracy_std']:.4f}"
    print(line, flush=True)
    return record


def reductions(name: str, settings: Sequence[KernelSetting], c_grid: Sequence[float],
               subset_note: str | None, max_iter: int = graph_data.SVM_MAX_ITER) -> list[str]:
    """Every way this run departs from Du et al.'s protocol on ``name``, in words."""
    out = []
    paper = paper_grid(name)
    if set(settings) != set(paper):
        out.append(f"kernel grid: {len(settings)} of Du et al.'s {len(paper)} kernels "
                   f"({', '.join(s.label for s in settings)})" if set(settings) <= set(paper) else
                   f"kernel grid: {', '.join(s.label for s in settings)} instead of Du et al.'s "
                   f"{', '.join(s.label for s in paper)}")
    if len(c_grid) != len(graph_data.SVM_C_GRID) or not np.allclose(c_grid, graph_data.SVM_C_GRID):
        out.append(f"C grid: {len(c_grid)} log-spaced values from {min(c_grid):g} to {max(c_grid):g} "
                   f"instead of Du et al.'s 120")
    if max_iter != graph_data.SVM_MAX_ITER:
        out.append(f"SVC(max_iter={max_iter}) instead of Du et al.'s {graph_data.SVM_MAX_ITER}")
    if subset_note:
        out.append(subset_note)
    return out


# --- the run -------------------------------------------------------------------------------------
def machine(threads: int) -> dict[str, Any]:
    import sklearn

    return {"threads": threads, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg()),
            "versions": {"gpntk": gpntk.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "scikit-learn": sklearn.__version__, "python": platform.python_version()}}


def parse_max_graphs(values: Sequence[str] | None, datasets: Sequence[str]) -> dict[str, int]:
    """``["20"]`` (every dataset) or ``["NCI1=1000", ...]`` → {dataset: count}."""
    out: dict[str, int] = {}
    for value in values or ():
        name, _, count = value.rpartition("=")
        names = [graph_data.ALIASES.get(name, name)] if name else list(datasets)
        if not count.isdigit() or int(count) < 20:
            raise ValueError(f"--max-graphs {value!r}: a count of at least 20 graphs (or NAME=COUNT) is needed")
        for n in names:
            if n not in graph_data.TU_DATASETS:
                raise ValueError(f"--max-graphs {value!r}: unknown dataset {n!r}")
            out[n] = int(count)
    return out


def table(records: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'dataset':<11s} {'graphs':>6s} {'kernels':>7s} {'accuracy (best mean)':>21s} {'published':>12s} "
             f"{'|diff|/std':>10s} {'nested':>15s} {'Gram time (s)':>13s}"]
    for r in records:
        b, p, nst = r["best"], r["published"], r["nested"]
        nested = f"{nst['accuracy_mean']:.3f} ± {nst['accuracy_std']:.3f}" if nst else "-"
        lines.append(f"{r['dataset']:<11s} {r['graphs']:6d} {len(r['kernels']):7d} "
                     f"{b['accuracy_mean']:13.3f} ± {b['accuracy_std']:.3f} "
                     f"{p['accuracy_mean']:6.3f} ± {p['accuracy_std']:.3f} {r['difference_in_published_std']:10.2f} "
                     f"{nested:>15s} {r['gram_seconds_total']:13.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--datasets", nargs="+", default=list(graph_data.TU_DATASETS),
                        help=f"some of {', '.join(graph_data.TU_DATASETS)} (default: all)")
    parser.add_argument("--grid", choices=GRIDS, default="budget",
                        help="kernel grid: Du et al.'s released one (paper), the documented reduced run (budget, "
                             "the default) or one shallow kernel pair (quick)")
    parser.add_argument("--c-grid", choices=tuple(C_GRIDS), default="paper",
                        help="SVM C values, log-spaced from 1e-2 to 1e4: Du et al.'s 120 (paper), 25 (thin) or 7 "
                             "(decades, for smoke tests)")
    parser.add_argument("--max-graphs", nargs="+", default=None, metavar="[NAME=]COUNT",
                        help="a stratified subset of COUNT graphs (of every dataset, or of NAME), folds restricted")
    parser.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                        help="also the nested protocol (settings chosen on the training folds)")
    parser.add_argument("--inner-folds", type=int, default=DEFAULT_INNER_FOLDS,
                        help=f"inner stratified folds of the nested protocol (default {DEFAULT_INNER_FOLDS})")
    parser.add_argument("--max-iter", type=int, default=graph_data.SVM_MAX_ITER,
                        help=f"SVC's max_iter (default Du et al.'s {graph_data.SVM_MAX_ITER}); fits that reach it "
                             "are counted in the JSON")
    parser.add_argument("--mlp-layers", type=int, nargs="+", default=None, metavar="R",
                        help="keep only the grid's kernels with these R (a part of the grid)")
    parser.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS, default=None,
                        help="keep only the grid's kernels with these aggregations (a part of the grid)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the folder of the TU datasets")
    parser.add_argument("--gram-cache", type=Path, default=None,
                        help="save each Gram matrix here (.npz with its time) and reuse it in later runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress line while a Gram is computed")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here (after each set)")
    parser.add_argument("--append", action="store_true",
                        help="keep the other datasets' results already in --output (a run in several parts)")
    args = parser.parse_args(argv)
    datasets = [graph_data.ALIASES.get(d, d) for d in args.datasets]
    unknown = [d for d in datasets if d not in graph_data.TU_DATASETS]
    if unknown:
        parser.error(f"--datasets: unknown {unknown} (choose from {', '.join(graph_data.TU_DATASETS)})")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.inner_folds < 2:
        parser.error("--inner-folds must be at least 2")
    if args.max_iter < 1:
        parser.error("--max-iter must be at least 1")
    if args.append and (args.output is None or not args.output.is_file()):
        parser.error("--append needs an existing --output file")
    try:
        max_graphs = parse_max_graphs(args.max_graphs, datasets)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    c_grid = C_GRIDS[args.c_grid]
    start = time.perf_counter()
    command = "python benchmarks/graph_classification.py " + " ".join(sys.argv[1:] if argv is None else argv)
    earlier: list[dict[str, Any]] = []
    if args.append:
        previous = json.loads(args.output.read_text())
        earlier = [r for r in previous["results"] if r["dataset"] not in datasets]
        parts = previous.get("parts") or [{"command": previous["command"], "machine": previous["machine"],
                                            "datasets": [r["dataset"] for r in previous["results"]],
                                            "wall_seconds": previous.get("wall_seconds")}]
        parts = [p for p in parts if any(r["dataset"] in p["datasets"] for r in earlier)]
    else:
        parts = []
    report: dict[str, Any] = {
        "benchmark": "GNTK graph classification (Du et al. 2019, Table 1)",
        "command": command,
        "grid": args.grid, "c_grid": args.c_grid, "nested": args.nested, "inner_folds": args.inner_folds,
        "svm_max_iter": args.max_iter,
        "protocol": ("SVC(kernel='precomputed', max_iter=5e5) on the Gram / its smallest entry and on the normalised "
                     "Gram, every C; best mean accuracy over the ten published test folds over kernel x "
                     "normalisation x C (selected on the test folds, as Du et al. and GIN); nested: chosen per "
                     "outer fold by an inner stratified split of its training graphs"),
        "machine": machine(args.threads), "results": list(earlier),
    }
    only = {k: v for k, v in (("mlp_layers", args.mlp_layers), ("aggregation", args.aggregations)) if v}
    report["grid_part"] = only or None
    this_part = {"command": command, "datasets": datasets, "machine": report["machine"]}
    report["parts"] = parts + [this_part]
    for name in datasets:
        record = evaluate_dataset(name, args.grid, c_grid, max_graphs.get(name), args.data, args.inner_folds,
                                  args.nested, progress=not args.no_progress, max_iter=args.max_iter,
                                  gram_cache=args.gram_cache, only=only)
        report["results"].append(record)
        this_part["wall_seconds"] = time.perf_counter() - start
        report["wall_seconds"] = sum(p.get("wall_seconds") or 0.0 for p in report["parts"])
        report["machine"]["load_average_end"] = list(os.getloadavg())
        if args.output is not None:
            args.output.write_text(json.dumps(report, indent=1))
    print(table(report["results"]))
    print(f"total {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
