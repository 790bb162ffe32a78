"""The empirical NTK of finite networks converges to the infinite-width NTK as the width grows.

    python examples/finite_vs_infinite.py                   # a few seconds on one CPU thread
    python examples/finite_vs_infinite.py --full            # widths up to 4096, 32 networks each
    python examples/finite_vs_infinite.py --figure out.png

The data: 6 random inputs in 5 dimensions (standard normal, seed 0), float64.

The models: the architecture ``L.mlp(2, "erf", σw² = 2, σb² = 0.1)``; its analytic NTK
``gpntk.NTKKernel(net)`` on the 6 inputs, and the empirical NTKs (``gpntk.empirical_ntk``) of the
finite networks ``net.finite(width)`` in NTK parameterization, for widths 16, 64, 256, 1024 (with
``--full`` up to 4096), 8 randomly initialised networks per width (32 with ``--full``).

Printed, per width: the relative Frobenius error ``‖K̂ − K‖_F / ‖K‖_F`` of the Monte Carlo
average of the empirical NTKs (what ``gpntk.monte_carlo_kernel`` returns), and the mean and
standard deviation of that error for one network at a time; then the fitted slopes of
log(error) against log(width) (theory: −1/2, the spread of one network's NTK around its limit
shrinks like 1/√width). The figure shows both errors against the width on log-log axes with a
reference 1/√width line, and a scatter of empirical against analytic kernel entries for single
networks at the smallest and the largest width.
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402

SETTINGS = {"default": ((16, 64, 256, 1024), 8), "full": ((16, 64, 256, 1024, 4096), 32)}


def slope(widths, errors) -> float:
    """Least-squares slope of log(error) against log(width)."""
    lw = torch.log(torch.tensor(widths, dtype=torch.float64))
    le = torch.log(torch.tensor(errors, dtype=torch.float64))
    lw = lw - lw.mean()
    return ((lw * (le - le.mean())).sum() / lw.square().sum()).item()


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default="finite-vs-infinite.png", help="where to save the figure")
    parser.add_argument("--full", action="store_true", help="widths up to 4096, 32 networks per width")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    widths, n_samples = SETTINGS["full" if args.full else "default"]
    start = time.perf_counter()

    net = L.mlp(depth=2, activation="erf", weight_variance=2.0, bias_variance=0.1)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    analytic = gpntk.NTKKernel(net)(x).to_dense().detach()

    errors, single_means, single_stds, samples_of = [], [], [], {}
    print(f"{'width':>6s} {'relative error':>15s} {'one network':>12s} {'± std':>7s}")
    for width in widths:
        # the networks gpntk.monte_carlo_kernel(net, x, width=width, n_samples=n_samples, seed=1) draws,
        # kept one by one for the single-network errors
        generator = torch.Generator().manual_seed(1)
        samples = torch.stack([
            gpntk.empirical_ntk(net.finite(width, in_features=x.shape[-1], generator=generator).to(x), x)
            for _ in range(n_samples)
        ]).detach()
        samples_of[width] = samples
        error = ((samples.mean(0) - analytic).norm() / analytic.norm()).item()
        single = torch.linalg.matrix_norm(samples - analytic) / analytic.norm()
        errors.append(error)
        single_means.append(single.mean().item())
        single_stds.append(single.std().item())
        print(f"{width:6d} {error:15.4f} {single_means[-1]:12.4f} {single_stds[-1]:7.4f}", flush=True)
    print(f"slope of log(error) vs log(width): {slope(widths, errors):.2f} averaged over {n_samples} networks, "
          f"{slope(widths, single_means):.2f} for one network (theory: -0.5)")

    plot(widths, errors, single_means, single_stds, n_samples, analytic, samples_of, args.figure)
    print(f"saved {args.figure}; {time.perf_counter() - start:.1f} s", flush=True)
    return widths, errors, single_means


def plot(widths, errors, single_means, single_stds, n_samples, analytic, samples_of, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    ax.errorbar(widths, single_means, yerr=single_stds, fmt="o-", capsize=3, label="one network (mean ± std)")
    ax.plot(widths, errors, "s-", label=f"average of {n_samples} networks")
    reference = single_means[0] * (widths[0] / torch.tensor(widths, dtype=torch.float64)).sqrt()
    ax.plot(widths, reference, "k--", lw=1, label="∝ 1/√width")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("‖K̂ − K‖_F / ‖K‖_F")
    ax.set_title("relative error of the empirical NTK")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    rows, cols = torch.triu_indices(len(analytic), len(analytic))  # each entry of the symmetric kernel once
    lo, hi = analytic.min().item(), analytic.max().item()
    pad = 0.15 * (hi - lo)
    for ax, width in zip(axes[1:], (widths[0], widths[-1])):
        samples = samples_of[width]
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k:", lw=1)
        for i, sample in enumerate(samples):
            ax.plot(analytic[rows, cols], sample[rows, cols], "o", ms=3, alpha=0.5, color="C0",
                    label=f"{len(samples)} networks" if i == 0 else None)
        ax.plot(analytic[rows, cols], samples.mean(0)[rows, cols], "x", color="C3", ms=6, label="their average")
        ax.set_xlabel("analytic NTK entry Θ(x, x')")
        ax.set_ylabel("empirical NTK entry")
        ax.set_title(f"width {width}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    shared = (min(a.get_ylim()[0] for a in axes[1:]), max(a.get_ylim()[1] for a in axes[1:]))
    for ax in axes[1:]:
        ax.set_ylim(*shared)
    fig.suptitle("Empirical NTK of net.finite(width) against NTKKernel(net): mlp(2, erf), 6 inputs in 5-D")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
