"""Posterior bands of an infinitely wide trained ensemble at several training times t, on a 1-D toy.

    python examples/posterior_bands.py                   # a few seconds on one CPU thread
    python examples/posterior_bands.py --full            # 20 finite networks of width 1024
    python examples/posterior_bands.py --figure out.png

The data: 8 training inputs spread over [-2.5, 2.5] (seed 0), targets sin(2x) plus Gaussian noise
of standard deviation 0.1; the bands are drawn on 300 points of [-4, 4]. float64 throughout.

The models: ``TrainedEnsemble(L.mlp(2, "relu", σw² = 2, σb² = 0.5), ...)`` (ridgeless,
``diag_reg = 0``) trained by full-batch gradient descent on the mean squared loss at 0.5 times
its largest stable learning rate (``max_learning_rate``), in the ``"ntk"`` regime (every layer
trained) and the ``"nngp"`` regime (only the readout trained), at t = 0, 10, 100, 1000 and ∞
steps. The bands are μ_t ± 2σ_t, with σ_t² the variance of the ensemble's outputs over random
initialisations (epistemic only; no noise is added). As t → ∞ the mean interpolates the training
targets and the variance at the training inputs goes to zero.

For comparison with real networks, an ensemble of finite networks ``net.finite(width)`` (NTK
parameterization; default 10 networks of width 256) is trained by plain full-batch gradient
descent with the same learning rate for the same number of steps (default t = 100); its mean
± 2 std over the ensemble is overlaid on the infinite-width ``"ntk"`` band at that time.

Printed: the learning rate per regime; for each regime and t, the mean σ_t at the training
inputs and at the grid points, the RMSE of μ_t against the noisy training targets and against
sin(2x) on the grid points inside [-2.5, 2.5] (the interval the training inputs cover); for the
finite ensemble its mean σ at the training inputs and on the grid next to the infinite-width ones,
and the mean gap between the two ensemble means in units of the infinite-width σ. The figure has
one panel per t (both regimes) and one with the finite ensemble.
"""

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402

TIMES = (0.0, 10.0, 100.0, 1000.0, math.inf)  # gradient-descent steps
LR_FRACTION = 0.5
NOISE_STD = 0.1
FINITE = {"default": (10, 256), "full": (20, 1024)}  # (networks, width)


def make_net():
    return L.mlp(depth=2, activation="relu", weight_variance=2.0, bias_variance=0.5)


def target(x):
    return torch.sin(2 * x)


def make_data(n_train: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train_x = torch.linspace(-2.5, 2.5, n_train, dtype=torch.float64) + 0.15 * torch.randn(
        n_train, generator=g, dtype=torch.float64
    )
    train_y = target(train_x) + NOISE_STD * torch.randn(n_train, generator=g, dtype=torch.float64)
    grid = torch.linspace(-4.0, 4.0, 300, dtype=torch.float64)
    return train_x.unsqueeze(-1), train_y, grid.unsqueeze(-1)


def train_finite(net, train_x, train_y, test_x, learning_rate: float, steps: int, n_networks: int, width: int,
                 seed: int = 1):
    """Outputs at test_x ``(n_networks, m)`` of finite networks trained by full-batch GD for ``steps`` steps.

    The loss is 1/(2n) ||f(X) - Y||², the one ``TrainedEnsemble`` counts time in.
    """
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for _ in range(n_networks):
        model = net.finite(width, in_features=train_x.shape[-1], generator=generator).to(train_x)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=learning_rate)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (model(train_x).squeeze(-1) - train_y).square().sum() / (2 * len(train_y))
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            outputs.append(model(test_x).squeeze(-1))
    return torch.stack(outputs)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default="posterior-bands.png", help="where to save the figure")
    parser.add_argument("--full", action="store_true",
                        help=f"{FINITE['full'][0]} finite networks of width {FINITE['full'][1]}")
    parser.add_argument("--finite-steps", type=int, default=100, help="training steps of the finite ensemble")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    n_networks, width = FINITE["full" if args.full else "default"]
    start = time.perf_counter()

    train_x, train_y, grid = make_data()
    net = make_net()
    times = torch.tensor(TIMES, dtype=torch.float64)
    print(f"{len(train_x)} training points, {len(grid)} grid points; net: mlp(2, relu, σw²=2, σb²=0.5)")

    # one ensemble serves both regimes; with learning_rate=1 its time is η·t, so t steps at
    # learning rate η are asked for as time η·t
    post = gpntk.TrainedEnsemble(net, train_x, train_y)
    results = {}  # regime -> (learning rate, means (T, m), stds (T, m), train stds (T, n), train means (T, n))
    for regime in ("ntk", "nngp"):
        learning_rate = LR_FRACTION * post.max_learning_rate(regime)
        means, variances = post.moments(grid, times * learning_rate, regime=regime, diag=True)
        train_means, train_vars = post.moments(train_x, times * learning_rate, regime=regime, diag=True)
        results[regime] = (learning_rate, means, variances.clamp_min(0).sqrt(), train_vars.clamp_min(0).sqrt(),
                           train_means)
        print(f"regime {regime}: learning rate {learning_rate:.4g} ({LR_FRACTION} of the stable edge)")

    truth = target(grid.squeeze(-1))
    inside = grid.squeeze(-1).abs() <= 2.5  # the interval the training inputs cover
    print(f"{'regime':<6s} {'t':>6s} {'σ at train':>11s} {'σ on grid':>10s} {'train RMSE':>11s} {'RMSE inside':>12s}")
    for regime, (_, means, stds, train_stds, train_means) in results.items():
        for i, t in enumerate(TIMES):
            train_rmse = (train_means[i] - train_y).square().mean().sqrt().item()
            grid_rmse = (means[i] - truth)[inside].square().mean().sqrt().item()
            print(f"{regime:<6s} {t:6g} {train_stds[i].mean().item():11.2e} {stds[i].mean().item():10.3f} "
                  f"{train_rmse:11.4f} {grid_rmse:12.3f}", flush=True)

    # finite networks trained by gradient descent, against the infinite-width "ntk" band at that time
    steps = args.finite_steps
    learning_rate = results["ntk"][0]
    finite_out = train_finite(net, train_x, train_y, torch.cat([grid, train_x]), learning_rate, steps,
                              n_networks, width)
    finite_grid, finite_train = finite_out[:, : len(grid)], finite_out[:, len(grid):]
    inf_mean, inf_var = post.moments(grid, steps * learning_rate, regime="ntk", diag=True)
    inf_std = inf_var.clamp_min(0).sqrt()
    _, inf_train_var = post.moments(train_x, steps * learning_rate, regime="ntk", diag=True)
    finite_mean, finite_std = finite_grid.mean(0), finite_grid.std(0)
    print(f"finite ensemble: {n_networks} networks of width {width}, {steps} GD steps at learning rate "
          f"{learning_rate:.4g}")
    print(f"{'':<24s} {'σ at train':>11s} {'σ on grid':>10s}")
    print(f"{'infinite width (ntk)':<24s} {inf_train_var.clamp_min(0).sqrt().mean().item():11.2e} "
          f"{inf_std.mean().item():10.3f}")
    print(f"{'finite ensemble':<24s} {finite_train.std(0).mean().item():11.2e} {finite_std.mean().item():10.3f}")
    mean_gap = ((finite_mean - inf_mean).abs().mean() / inf_std.mean()).item()
    print(f"mean |finite mean - infinite mean| on the grid: {mean_gap:.3f} infinite-width σ "
          f"(Monte Carlo error alone: about {1 / math.sqrt(n_networks) * math.sqrt(2 / math.pi):.2f})")

    plot(train_x, train_y, grid, results, (steps, width, n_networks, finite_grid, inf_mean, inf_std), args.figure)
    print(f"saved {args.figure}; {time.perf_counter() - start:.1f} s", flush=True)
    final_train_std = results["ntk"][3][-1].max().item()
    assert final_train_std < 1e-3 * results["ntk"][2][0].mean().item(), final_train_std
    return results


def plot(train_x, train_y, grid, results, finite, path):
    x = grid.squeeze(-1)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True, sharey=True)
    colors = {"ntk": "C0", "nngp": "C1"}
    for ax, (i, t) in zip(axes.flat, enumerate(TIMES)):
        for regime, (_, means, stds, _, _) in results.items():
            ax.fill_between(x, means[i] - 2 * stds[i], means[i] + 2 * stds[i], color=colors[regime], alpha=0.2,
                            lw=0)
            ax.plot(x, means[i], color=colors[regime], lw=1.5, label=f"{regime}: μ_t ± 2σ_t")
        ax.set_title("t = ∞" if math.isinf(t) else f"t = {t:g} steps")
    steps, width, n_networks, finite_grid, inf_mean, inf_std = finite
    ax = axes.flat[len(TIMES)]
    ax.fill_between(x, inf_mean - 2 * inf_std, inf_mean + 2 * inf_std, color="C0", alpha=0.2, lw=0)
    ax.plot(x, inf_mean, color="C0", lw=1.5, label="infinite width, ntk")
    for j, out in enumerate(finite_grid):
        ax.plot(x, out, color="C3", lw=0.5, alpha=0.5, label="trained finite networks" if j == 0 else None)
    finite_mean, finite_std = finite_grid.mean(0), finite_grid.std(0)
    ax.plot(x, finite_mean, "--", color="C3", lw=1.2, label="their mean ± 2 std")
    for sign in (-1, 1):
        ax.plot(x, finite_mean + sign * 2 * finite_std, ":", color="C3", lw=1.2)
    ax.set_title(f"t = {steps} steps: {n_networks} networks of width {width}")
    for ax in axes.flat:
        ax.plot(x, target(x), "k:", lw=0.8)
        ax.plot(train_x.squeeze(-1), train_y, "ko", ms=4)
        ax.set_ylim(-3.5, 3.5)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    axes[1, 2].legend(fontsize=8, loc="lower left")
    for ax in axes[1]:
        ax.set_xlabel("x")
    fig.suptitle("Trained-ensemble posteriors of mlp(2, relu) over training time "
                 f"(GD at {LR_FRACTION} × max stable learning rate; dots: training data, dotted: sin 2x)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
