"""How fast do finite networks approach their infinite-width kernels?

For ReLU / Erf / GELU MLPs of depth 1-3 this prints, per width (64 ... 4096), the relative
Frobenius error between the Monte Carlo average (over ``--samples`` random initialisations) of
the empirical NTK / NNGP of ``net.finite(width)`` and the analytic ``NTKKernel`` / ``NNGPKernel``
on a few inputs (self-kernel), and the slope of log(error) against log(width) fitted by least
squares. Expected slope: -1/2 (Monte Carlo spread of a width-n network's kernel ~ n^-1/2; the
finite-width bias ~ 1/n is smaller at these widths). ``spread`` is the relative spread of one
network's kernel around the mean (its slope is the steadiest estimate of the exponent).

The NNGP of one network is ``f(x) f(x')ᵀ`` averaged over ``out_features`` output channels, so
its spread is ~ n^-1/2 + out_features^-1/2; the NNGP runs use
``out_features = --nngp-channels-per-width * width`` so both terms shrink together.

The same is then reported for architectures beyond MLPs (``--architectures``, with
``--arch-samples`` networks at widths ``--arch-widths``, smaller because wide convolutional
networks are slow): a 1-D CNN with global average pooling (``cnn1d``, inputs 2 x 8), a 2-D CNN
with Flatten (``cnn2d``, 1 x 5 x 5), a residual MLP (``resmlp``) and, on request, a 2-D CNN with
AvgPool and GlobalAvgPool (``pool2d``, 2 x 4 x 4) and an MLP with LayerNorm and FanInConcat
(``normcat``). Same expected slope: -1/2.

    python benchmarks/monte_carlo_convergence.py                 # moderate: 32 samples
    python benchmarks/monte_carlo_convergence.py --samples 128 --widths 64 256 1024 4096
    python benchmarks/monte_carlo_convergence.py --skip-mlp --architectures cnn1d cnn2d resmlp pool2d normcat
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import gpntk
from gpntk import layers as L
from gpntk._progress import track  # a bar on stderr when it is a terminal (gpntk.settings.progress)

WEIGHT_VARIANCE = {"relu": 2.0, "erf": 1.5, "gelu": 1.7}


def architectures() -> dict:
    """``name: (net, input_shape)``; ``input_shape`` is None for vector inputs (then ``--d`` features)."""
    residual_branch = [L.ReLU(), L.Dense(2.0, 0.1), L.ReLU(), L.Dense(2.0, 0.1)]
    return {
        "cnn1d": (
            L.serial(L.Conv(3, padding="circular", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
                     L.GlobalAvgPool(), L.Dense(2.0, 0.1)),
            (2, 8),
        ),
        "cnn2d": (
            L.serial(L.Conv(3, weight_variance=2.0, bias_variance=0.05), L.ReLU(),
                     L.Conv(3, weight_variance=2.0, bias_variance=0.05), L.ReLU(), L.Flatten(), L.Dense(2.0, 0.1)),
            (1, 5, 5),
        ),
        "resmlp": (
            L.serial(L.Dense(2.0, 0.1), L.FanOut(2), L.parallel(residual_branch, L.Identity()), L.FanInSum(),
                     L.ReLU(), L.Dense(2.0, 0.1)),
            None,
        ),
        "pool2d": (
            L.serial(L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2),
                     L.Conv(2, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1)),
            (2, 4, 4),
        ),
        "normcat": (
            L.serial(L.Dense(1.5, 0.2), L.LayerNorm(), L.FanOut(2),
                     L.parallel([L.ReLU(), L.Dense(2.0, 0.1)], [L.Erf(), L.Dense(1.5, 0.1)]), L.FanInConcat(),
                     L.Dense(1.0, 0.1)),
            None,
        ),
    }


def inputs(n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]  # a nearly opposite pair
    return x


def slope(widths, values) -> float:
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def convergence(
    net, x, xn, widths, args, seed: int, kind: str, input_shape=None, samples: int | None = None
) -> tuple[list[float], list[float]]:
    """Per width: the relative Frobenius error of the Monte Carlo mean, and one network's relative spread."""
    samples = args.samples if samples is None else samples
    kernel_class = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    kernel = kernel_class(net, input_shape=input_shape)
    with torch.no_grad():
        exact = kernel(x, x).to_dense()
    errors, spreads = [], []
    for width in track(widths, f"Monte Carlo {kind}", unit="width"):
        out_features = 1 if kind == "ntk" else args.nngp_channels_per_width * width
        mean, se = gpntk.monte_carlo_kernel(
            net, xn, width=width, n_samples=samples, kind=kind,
            out_features=out_features, seed=seed + width, input_shape=input_shape,
        )
        mean, se = mean.double().cpu(), se.double().cpu()
        errors.append(((mean - exact).norm() / exact.norm()).item())
        spreads.append(((se * math.sqrt(samples)).norm() / exact.norm()).item())
    return errors, spreads


def print_summary(summary: dict, kinds) -> None:
    for kind in kinds:
        s = np.array([v for key, v in summary.items() if key[-1] == kind])
        if not len(s):
            continue
        print(
            f"\n{kind}: slope of the error {s[:, 0].mean():.2f} (range {s[:, 0].min():.2f} .. {s[:, 0].max():.2f}), "
            f"of the spread {s[:, 1].mean():.2f} (range {s[:, 1].min():.2f} .. {s[:, 1].max():.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--samples", type=int, default=32, help="networks per width")
    parser.add_argument("--activations", nargs="+", default=list(WEIGHT_VARIANCE))
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kinds", nargs="+", default=["ntk", "nngp"], choices=["ntk", "nngp"])
    parser.add_argument("--bias-variance", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=6, help="number of inputs")
    parser.add_argument("--d", type=int, default=5, help="input dimension")
    parser.add_argument("--nngp-channels-per-width", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="of the networks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small products)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-mlp", action="store_true", help="only the --architectures")
    parser.add_argument(
        "--architectures", nargs="*", default=["cnn1d", "cnn2d", "resmlp"], choices=list(architectures()),
        help="further architectures (none: give the flag without names)",
    )
    parser.add_argument("--arch-widths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="widths for --architectures")
    parser.add_argument("--arch-samples", type=int, default=128,
                        help="networks per width for --architectures (their networks are narrower, so cheap)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    x = inputs(args.n, args.d)
    xn = x.to(dtype=getattr(torch, args.dtype), device=args.device)
    if not args.skip_mlp:
        mlp_convergence(args, x, xn)
    if args.architectures:
        architecture_convergence(args)


def mlp_convergence(args, x: torch.Tensor, xn: torch.Tensor) -> None:
    widths = sorted(args.widths)
    print(
        f"Monte Carlo convergence: {args.samples} networks per width, {args.n} inputs in {args.d}-D, "
        f"{args.dtype} networks on {args.device}, NNGP with out_features = "
        f"{args.nngp_channels_per_width} x width; relative Frobenius error of the mean (and of one "
        "network's spread)\n"
    )
    header = f"{'activation':<10} {'depth':>5} {'kernel':>6} | " + " ".join(f"{w:>7}" for w in widths)
    header += " | slope(err) slope(spread) | time"
    print(header)
    print("-" * len(header))
    summary = {}
    config = 0
    for act in args.activations:
        for depth in args.depths:
            net = L.mlp(depth, act, weight_variance=WEIGHT_VARIANCE.get(act, 1.0), bias_variance=args.bias_variance)
            for kind in args.kinds:
                config += 1  # independent random networks for every configuration
                start = time.perf_counter()
                errors, spreads = convergence(net, x, xn, widths, args, args.seed + 100_000 * config, kind)
                elapsed = time.perf_counter() - start
                s_err, s_spread = slope(widths, errors), slope(widths, spreads)
                summary[(act, depth, kind)] = (s_err, s_spread)
                print(
                    f"{act:<10} {depth:>5} {kind:>6} | " + " ".join(f"{e:7.4f}" for e in errors)
                    + f" | {s_err:10.2f} {s_spread:14.2f} | {elapsed:5.1f}s",
                    flush=True,
                )
                print(f"{'':<10} {'':>5} {'spread':>6} | " + " ".join(f"{s:7.4f}" for s in spreads))
    print_summary(summary, args.kinds)


def architecture_convergence(args) -> None:
    """The same study for convolutional, pooling, residual and normalised networks."""
    widths = sorted(args.arch_widths)
    nets = architectures()
    print(
        f"\nArchitectures: {args.arch_samples} networks per width, {args.n} inputs (vectors: {args.d}-D), "
        f"{args.dtype} networks on {args.device}, NNGP with out_features = {args.nngp_channels_per_width} x width\n"
    )
    header = f"{'network':<10} {'input':>9} {'kernel':>6} | " + " ".join(f"{w:>7}" for w in widths)
    header += " | slope(err) slope(spread) | time"
    print(header)
    print("-" * len(header))
    summary = {}
    for index, name in enumerate(args.architectures):
        net, input_shape = nets[name]
        x = inputs(args.n, math.prod(input_shape) if input_shape else args.d)
        xn = x.to(dtype=getattr(torch, args.dtype), device=args.device)
        shape = "x".join(map(str, input_shape)) if input_shape else f"{args.d}"
        for k, kind in enumerate(args.kinds):
            start = time.perf_counter()
            errors, spreads = convergence(
                net, x, xn, widths, args, args.seed + 10_000_000 + 100_000 * (2 * index + k), kind, input_shape,
                samples=args.arch_samples,
            )
            elapsed = time.perf_counter() - start
            s_err, s_spread = slope(widths, errors), slope(widths, spreads)
            summary[(name, kind)] = (s_err, s_spread)
            print(
                f"{name:<10} {shape:>9} {kind:>6} | " + " ".join(f"{e:7.4f}" for e in errors)
                + f" | {s_err:10.2f} {s_spread:14.2f} | {elapsed:5.1f}s",
                flush=True,
            )
            print(f"{'':<10} {'':>9} {'spread':>6} | " + " ".join(f"{s:7.4f}" for s in spreads))
    print_summary(summary, args.kinds)

if __name__ == "__main__":
    main()
