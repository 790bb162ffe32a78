"""The empirical NTK of finite networks converges to the infinite-width NTK as the width grows.

    python examples/finite_vs_infinite.py

Prints, for growing widths, the relative error of the Monte Carlo average of the empirical NTK
of `net.finite(width)` against `gpntk.NTKKernel(net)`, and the fitted slope (about -1/2).
"""

import math

import torch

import gpntk
from gpntk import layers as L


def main(widths=(16, 64, 256, 1024), n_samples=8):
    net = L.mlp(depth=2, activation="erf", weight_variance=2.0, bias_variance=0.1)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    analytic = gpntk.NTKKernel(net)(x).to_dense().detach()
    errors = []
    print(f"{'width':>6s} {'relative error':>15s}")
    for width in widths:
        mean, _ = gpntk.monte_carlo_kernel(net, x, width=width, n_samples=n_samples, kind="ntk", seed=1)
        error = ((mean - analytic).norm() / analytic.norm()).item()
        errors.append(error)
        print(f"{width:6d} {error:15.4f}")
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(widths[-1]) - math.log(widths[0]))
    print(f"slope of log(error) vs log(width): {slope:.2f} (theory: -0.5)")


if __name__ == "__main__":
    main()
