"""Attention NTK, CNTK and MLP NTK as kernel-regression classifiers of a UCR time series set.

    python examples/sequence_classification.py                      # about 20 s on one CPU core
    python examples/sequence_classification.py --figure out.png

ItalyPowerDemand (UCR archive, Dau et al. 2019; shipped in ``benchmarks/data/italy_power_demand``):
one day of Italian power demand per series (24 hourly values), class 1 = October to March,
class 2 = April to September; the archive's split of 67 training and 1029 test days. Three
infinitely wide networks classify the days by kernel regression on the one-hot labels (the mean
of the infinite ensemble trained to t = ∞, :class:`gpntk.TrainedEnsemble`):

* self-attention: ``Conv(3) → ReLU → GlobalSelfAttention(softmax) → ReLU → GlobalAvgPool → Dense``
  on ``input_shape=(1, 24)``;
* a CNN: ``Conv(3) → ReLU → Conv(3) → ReLU → GlobalAvgPool → Dense`` on the same inputs;
* an MLP with two hidden ReLU layers on the 24 values as a vector.

Prints the test accuracies and saves a figure (the two classes' training days, and the
accuracies next to the Euclidean 1-nearest-neighbour baseline). The full comparison, with an SVM
as well and timings, is ``benchmarks/sequence_classification.py`` (``docs/sequence-classification.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

import gpntk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIGURE = "sequence-classification.png"


def load_benchmark():
    """``benchmarks/sequence_classification.py`` as a module: the data reader and the three networks."""
    path = ROOT / "benchmarks" / "sequence_classification.py"
    spec = importlib.util.spec_from_file_location("sequence_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sequence_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help=f"where to save the figure (default {DEFAULT_FIGURE})")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    bench = load_benchmark()
    split = bench.load_split()
    print(f"ItalyPowerDemand: {len(split.train_x)} training and {len(split.test_x)} test days of 24 hours")

    accuracies = {}
    targets = torch.from_numpy(bench.one_hot_targets(split.train_y.numpy(), split.classes))
    for name in bench.KERNELS:
        kernel = bench.ntk(name, split.length)
        with torch.no_grad():
            ridge = 1e-4 * kernel(split.train_x, diag=True).mean().item()
        post = gpntk.TrainedEnsemble(kernel.net, split.train_x, targets, learning_rate=1.0, diag_reg=ridge,
                                     input_shape=kernel.input_shape)
        with torch.no_grad():
            mean = post.mean(split.test_x, math.inf)  # (m, 2): kernel regression
        accuracies[name] = (mean.argmax(-1) == split.test_y).double().mean().item()
    baseline = bench.nearest_neighbour_euclidean(split.train_x.numpy(), split.test_x.numpy(), split.train_y.numpy())
    accuracies["1-NN Euclidean"] = float((baseline == split.test_y.numpy()).mean())
    for name, value in accuracies.items():
        print(f"{name:<16s} test accuracy {value:.4f}")
    save_figure(split, accuracies, args.figure)
    print(f"figure saved to {args.figure}")
    return accuracies


def save_figure(split, accuracies: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    hours = range(1, split.length + 1)
    for c, (label, color) in enumerate(zip(("Oct-Mar", "Apr-Sep"), ("tab:blue", "tab:orange"))):
        days = split.train_x[split.train_y == c]
        for day in days:
            left.plot(hours, day, color=color, alpha=0.15, lw=0.8)
        left.plot(hours, days.mean(0), color=color, lw=2.5, label=f"class {split.class_labels[c]} ({label}), mean")
    left.set(xlabel="hour of the day", ylabel="z-normalised demand", title="training days")
    left.legend(fontsize=8)
    names = list(accuracies)
    bars = right.bar(names, [accuracies[n] for n in names], color=["tab:green", "tab:purple", "tab:red", "tab:gray"])
    right.bar_label(bars, fmt="%.3f", fontsize=8)
    right.set(ylim=(0.5, 1.0), ylabel="test accuracy (1029 days)", title="kernel regression (NTK, t = inf)")
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
