"""Trained finite ensembles against the infinite-width posterior, at several training times.

An ensemble of ``--networks`` one-hidden-layer MLPs of width ``--width`` (``net.finite``, NTK
parameterization) is trained by full-batch gradient descent on ``1/(2nk)·‖f(X) − Y‖²`` with
``lr = --lr-fraction × TrainedEnsemble.max_learning_rate(regime)``; after each of ``--steps``
steps the empirical mean and variance of the outputs at test and training inputs are compared
with ``TrainedEnsemble.moments(x, t=T, regime)``. Regime ``ntk`` trains every layer; ``nngp``
trains only the readout (hidden ``Dense(..., trainable=False)``) and is compared with regime
``nngp`` of the all-trainable network.

Columns (per regime, time T and point set; max / median over points and output channels):

* ``τλmax``: lr·T·λmax/(nk), how far training has gone along the stiffest direction;
* ``|Δμ|/SE``: |mean_emp − μ_T| / sqrt(var_emp/N);
* ``var emp/inf``: var_emp / Σ_T(x, x) (its Monte Carlo standard error is ``sqrt(2/(N−1))``,
  printed in the header);
* ``lin |Δμ|/SE``: the same for the linearised infinite-width predictions from the networks' own
  initial outputs (pure Monte Carlo error, no finite-width effect: should look like |N(0,1)|);
* ``rms(d)/SE``: the finite-width deviation d = trained − linearised, root mean square over the
  ensemble, in units of SE: the allowance of the test (``|mean(d)| ≤ rms(d)`` exactly);
* ``excess``: max of |Δμ| / (Z·SE + rms(d)) and |Δsd| / (Z·SE_sd + rms(d)): ≤ 1 passes, the
  criterion of tests/test_posterior_vs_training.py (Z = 4);
* ``@2T``/``@T/2``: that excess against the posterior at the wrong time 2T / T/2 (> 1: rejected).

    python benchmarks/ensemble_vs_infinite.py                                # ~5-10 min on 2 busy cores
    python benchmarks/ensemble_vs_infinite.py --steps 20 60 200 600 2000     # long training, ~25 min

The per-network cost is ~0.2-0.8 ms per step at width 2048 on a (busy) 2-core CPU in the ``ntk``
regime; in ``nngp`` the frozen hidden layer's outputs are computed once, so only the readout costs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_posterior_vs_training import (  # noqa: E402  (the test's trainer and reference, one source)
    Z,
    architectures,
    compare,
    linearized_infinite,
    make_data,
    train_ensemble,
)

from gpntk.posterior import TrainedEnsemble  # noqa: E402


def summarize(values: torch.Tensor) -> tuple[float, float]:
    return values.max().item(), values.median().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=int, default=500)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 60, 200, 600])
    parser.add_argument("--regimes", nargs="+", default=["ntk", "nngp"], choices=["ntk", "nngp"])
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--weight-variance", type=float, default=2.0)
    parser.add_argument("--bias-variance", type=float, default=0.1)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--d", type=int, default=3)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--target-scale", type=float, default=2.0)
    parser.add_argument("--lr-fraction", type=float, default=0.05, help="of the regime's max_learning_rate()")
    parser.add_argument("--chunk", type=int, default=100, help="networks trained in one batched computation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train_x, train_y, test_x = make_data(args.n_train, args.n_test, args.d, args.k, target_scale=args.target_scale)
    net, arch = architectures(args.activation, args.depth, args.weight_variance, args.bias_variance)
    eval_x = torch.cat([test_x, train_x])
    steps = tuple(sorted(set(args.steps)))
    n, k, m, N = args.n_train, args.k, args.n_test, args.networks
    print(
        f"{N} networks of width {args.width} ({args.activation}, depth {args.depth}, σw²={args.weight_variance}, "
        f"σb²={args.bias_variance}), n={n} training points in {args.d}-D, k={k} outputs, {m} test points; "
        f"lr = {args.lr_fraction} x max_learning_rate; float32 networks, float64 posterior.\n"
        f"Monte Carlo SE of the variance ratio: {math.sqrt(2 / (N - 1)):.3f}; entries are max / median over "
        "points and outputs.\n"
    )
    header = (
        f"{'regime':<6} {'T':>5} {'τλmax':>6} {'points':<5} | {'|Δμ|/SE':>11} | {'var emp/inf':>17} | "
        f"{'lin |Δμ|/SE':>11} | {'rms(d)/SE':>11} | {'excess':>6} {'@2T':>5} {'@T/2':>5}"
    )
    total = time.perf_counter()
    for regime in args.regimes:
        lr = args.lr_fraction * TrainedEnsemble(net, train_x, train_y).max_learning_rate(regime)
        post = TrainedEnsemble(net, train_x, train_y, learning_rate=lr)
        lam_max = 2 * n * k / post.max_learning_rate(regime)
        start = time.perf_counter()
        f0, outputs = train_ensemble(
            arch[regime], train_x, train_y, eval_x,
            n_networks=N, width=args.width, learning_rate=lr, steps=steps, seed=args.seed, chunk=args.chunk,
        )
        train_time = time.perf_counter() - start
        print(f"regime {regime}: lr = {lr:.4g}, training {N} x {max(steps)} steps took {train_time:.1f} s")
        print(header)
        print("-" * len(header))
        for t in steps:
            lin = linearized_infinite(net, regime, train_x, train_y, eval_x, f0, lr, t)
            allowance = (outputs[t] - lin).square().mean(0).sqrt()
            res = {}
            for label, when in (("ok", t), ("2T", 2 * t), ("T/2", t / 2)):
                mean, cov = post.moments(eval_x, when, regime)
                res[label] = compare(outputs[t], mean, cov.diagonal(), allowance)
            mean, cov = post.moments(eval_x, t, regime)
            lin_c = compare(lin, mean, cov.diagonal(), torch.zeros_like(mean))
            for name, rows in (("test", slice(0, m)), ("train", slice(m, None))):
                c = res["ok"]

                def ex(r):
                    return max(r["mean_excess"][rows].max().item(), r["sd_excess"][rows].max().item())

                zmax, zmed = summarize(c["z_mean"][rows])
                vr = c["var_ratio"][rows]
                lmax, lmed = summarize(lin_c["z_mean"][rows])
                amax, amed = summarize(c["allowance_over_se"][rows])
                print(
                    f"{regime:<6} {t:>5} {lr * t * lam_max / (n * k):>6.1f} {name:<5} | {zmax:>5.2f} {zmed:>5.2f} | "
                    f"{vr.min().item():>5.3f} {vr.median().item():>5.3f} {vr.max().item():>5.3f} | "
                    f"{lmax:>5.2f} {lmed:>5.2f} | {amax:>5.2f} {amed:>5.2f} | "
                    f"{ex(c):>6.2f} {ex(res['2T']):>5.1f} {ex(res['T/2']):>5.1f}"
                )
        print()
    print(f"total wall time {time.perf_counter() - total:.1f} s (Z = {Z})")


if __name__ == "__main__":
    main()
