r"""Graph-level Gram matrices: the padded-bucket path against the tiled path, pairs of graphs per second.

Usage (from the repository root; one thread, the machine is shared)::

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/graph_gram_speed.py --dataset NCI1 --graphs 400 --blocks 3 9

For each ``L`` in ``--blocks``: ``gntk(L, R)`` (jumping knowledge, sum readout, Du et al.'s
``A + I`` aggregation) on the first ``--graphs`` graphs, the NTK and NNGP Gram matrix by
:func:`gpntk.graph_kernel_matrices` with ``method="buckets"`` and ``method="tiles"``, each
``--repeats`` times in this process, alternating (after one compiled call that compiles); the tiled
path both eagerly and with its activations
compiled (``gpntk.settings.fusion(True)``; the first compiled call pays the compilation, reported
apart); prints the median wall time, the distinct pairs :math:`n(n+1)/2` per second and the largest
relative difference of the results to the padded path's. With
``--by-depth`` the tiled path's :func:`gpntk.graph_kernel_matrices_by_depth` is timed too, giving
every ``L`` of ``--blocks`` from one pass at the largest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graph_data  # noqa: E402

import gpntk  # noqa: E402
from gpntk.kernels.graph_gram import graph_kernel_matrices, graph_kernel_matrices_by_depth  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "graphs" / "tu"


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="NCI1")
    p.add_argument("--root", default="/work/shared/data/graphs/tu")
    p.add_argument("--graphs", type=int, default=400)
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 9])
    p.add_argument("--mlp-layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-buckets", action="store_true", help="time the tiled path only")
    p.add_argument("--by-depth", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = graph_data.load_tu(args.dataset, root=Path(args.root))
    graphs = [(x, a + torch.eye(len(a)).numpy()) for x, a in data.graphs[: args.graphs]]
    n = len(graphs)
    pairs = n * (n + 1) // 2
    print(f"{args.dataset}: {n} graphs, {sum(len(a) for _, a in graphs)} nodes, R={args.mlp_layers}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    for blocks in args.blocks:
        net = gpntk.layers.gntk(blocks, args.mlp_layers)
        methods = {"tiles": False, "compiled": True} if args.skip_buckets else {
            "buckets": False, "tiles": False, "compiled": True}
        times: dict[str, list[float]] = {m: [] for m in methods}
        results = {}
        for round_ in range(args.repeats + 1):  # a first round: the compilation alone
            for m, fused in methods.items():
                if round_ == 0 and not fused:
                    times[m].append(float("nan"))
                    continue
                with gpntk.settings.fusion(fused):
                    results[m], t = timed(lambda: graph_kernel_matrices(
                        net, graphs, method="buckets" if m == "buckets" else "tiles", progress=False))
                times[m].append(t)
        print(f"L={blocks}: first compiled call {times['compiled'][0]:.1f} s (compilation included)", flush=True)
        for m in methods:
            t = statistics.median(times[m][1:])
            line = f"L={blocks}: {m:9s} median {t:8.2f} s ({pairs / t:9.0f} pairs/s)"
            if "buckets" in methods:
                ratio = statistics.median(times["buckets"][1:]) / t
                s_err = relative(results[m][0], results["buckets"][0])
                k_err = relative(results[m][1], results["buckets"][1])
                line += f"  speed-up {ratio:5.1f}x  max rel. diff NNGP {s_err:.1e} NTK {k_err:.1e}"
            print(line, flush=True)
    if args.by_depth:
        net = gpntk.layers.gntk(max(args.blocks), args.mlp_layers)
        with gpntk.settings.fusion(True):
            _, t = timed(lambda: graph_kernel_matrices_by_depth(net, graphs, args.blocks, progress=False))
        print(f"by depth {tuple(args.blocks)} in one pass: {t:.2f} s", flush=True)


if __name__ == "__main__":
    main()
