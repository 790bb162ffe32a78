"""``gpntk demo``: what infinitely wide networks predict, and NTK kernels fitted as GPs.

Runs on a CPU in under a minute with no data of the user's, in two parts:

1. The trained ensemble (:class:`~gpntk.TrainedEnsemble`): an infinite ensemble of infinitely
   wide Erf networks trained by gradient descent on a noisy 1-D sine, its mean ± 2σ after
   training for t = 0, early, late and ∞ steps, in both the NTK (all layers trained) and the
   NNGP (readout only) regimes, as a table and a figure (PNG) in which the band pinches to zero at
   the training points as t → ∞.
2. Kernels as GPyTorch GPs: exact GPs with ``ScaleKernel(NTKKernel(mlp(3, "relu")))``, the NNGP
   and an RBF baseline fitted by the marginal likelihood on Friedman's function #1, with
   held-out accuracy and calibration.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, cast

import gpytorch
import torch
from torch import Tensor

from .. import layers as L
from .._validation import integer_argument, real_argument
from ..kernels import NNGPKernel, NTKKernel
from ..posterior import TrainedEnsemble

#: the training times shown by the demo, in gradient-descent steps at DEMO_LEARNING_RATE
DEMO_TIMES = (0.0, 10.0, 100.0, 1000.0, math.inf)
DEMO_LEARNING_RATE = 0.2

#: where the demo prints (``print`` by default)
PrintFn = Callable[[str], object]


def make_sine_problem(
    n_train: int = 8, noise: float = 0.1, seed: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noisy samples of sin(x) on [-π, π] (as in the Neural Tangents cookbook) and a test grid."""
    n_train = integer_argument("n_train", n_train, minimum=1)
    noise = real_argument("noise", noise, minimum=0)
    generator = torch.Generator().manual_seed(integer_argument("seed", seed))
    train_x = torch.linspace(-math.pi, math.pi, n_train, dtype=torch.float64).unsqueeze(-1)
    train_x = train_x + 0.3 * torch.rand(n_train, 1, generator=generator, dtype=torch.float64)
    train_y = torch.sin(train_x).squeeze(-1) + noise * torch.randn(n_train, generator=generator, dtype=torch.float64)
    test_x = torch.linspace(-1.5 * math.pi, 1.5 * math.pi, 301, dtype=torch.float64).unsqueeze(-1)
    return train_x, train_y, test_x, torch.sin(test_x).squeeze(-1)


def run_posterior(print_fn: PrintFn = print, figure: str | None = "gpntk-demo.png") -> dict[str, float]:
    """Part 1: the trained ensemble's mean and uncertainty at several training times."""
    train_x, train_y, test_x, test_y = make_sine_problem()
    net = L.serial(
        L.Dense(weight_variance=4.0, bias_variance=1.0), L.Erf(),
        L.Dense(weight_variance=4.0, bias_variance=1.0), L.Erf(),
        L.Dense(weight_variance=4.0, bias_variance=1.0),
    )
    post = TrainedEnsemble(net, train_x, train_y, learning_rate=DEMO_LEARNING_RATE)
    times = torch.tensor(DEMO_TIMES, dtype=torch.float64)
    print_fn("Part 1 - an infinite ensemble of infinitely wide Erf networks (depth 2) trained by gradient")
    print_fn(f"descent (learning rate {DEMO_LEARNING_RATE}) on {len(train_x)} noisy samples of sin(x); "
             "mean and uncertainty after t steps:\n")
    print_fn(
        f"{'regime':6s} {'t':>7s} {'train loss':>11s} {'test RMSE':>10s} {'σ at train x':>13s} {'σ on [-π, π]':>13s}"
    )
    inside = test_x.squeeze(-1).abs() <= math.pi
    results = {}
    curves = {}
    for regime in ("ntk", "nngp"):
        means, covs = post.moments(test_x, times, regime)
        _, train_covs = post.moments(train_x, times, regime)
        losses = post.train_loss(times, regime)
        curves[regime] = (means, covs.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt())
        for i, t in enumerate(DEMO_TIMES):
            rmse = (means[i][inside] - test_y[inside]).square().mean().sqrt().item()
            train_sd = train_covs[i].diagonal().clamp_min(0).sqrt().max().item()
            test_sd = curves[regime][1][i][inside].mean().item()
            label = "inf" if math.isinf(t) else f"{t:g}"
            print_fn(f"{regime:6s} {label:>7s} {losses[i].item():11.4f} {rmse:10.4f} {train_sd:13.2e} {test_sd:13.4f}")
            results[f"{regime}_t{label}_train_sd"] = train_sd
            results[f"{regime}_t{label}_rmse"] = rmse
    print_fn("\nThe uncertainty at the training inputs vanishes as t -> inf (ridgeless training interpolates);")
    print_fn(f"(the largest stable learning rate of discrete gradient descent here is {post.max_learning_rate():.3f})")
    if figure:
        saved = _plot_posterior(figure, train_x, train_y, test_x, test_y, curves)
        print_fn(f"figure: {saved}" if saved else "figure skipped: install matplotlib (pip install 'gpntk[plot]')")
    return results


def _plot_posterior(
    path: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    curves: dict[str, tuple[Tensor, Tensor]],
) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, len(DEMO_TIMES), figsize=(3.2 * len(DEMO_TIMES), 5.6), sharex=True, sharey=True)
    x = test_x.squeeze(-1).numpy()
    for row, regime in enumerate(("ntk", "nngp")):
        means, sds = curves[regime]
        for col, t in enumerate(DEMO_TIMES):
            ax = axes[row, col]
            mean, sd = means[col].numpy(), sds[col].numpy()
            ax.fill_between(x, mean - 2 * sd, mean + 2 * sd, color="tab:blue", alpha=0.25, lw=0, label="mean ± 2σ")
            ax.plot(x, test_y.numpy(), color="0.5", lw=1, ls="--", label="sin(x)")
            ax.plot(x, mean, color="tab:blue", lw=1.5, label="ensemble mean")
            ax.scatter(
                train_x.squeeze(-1).numpy(), train_y.numpy(), color="tab:red", s=14, zorder=3, label="training data"
            )
            ax.set_title(f"{regime.upper()}, t = {'∞' if math.isinf(t) else f'{t:g}'}", fontsize=10)
            ax.set_ylim(-4.5, 4.5)
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle("gpntk: trained infinite ensembles of Erf networks after t steps of gradient descent")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def make_problem(
    n_train: int = 200, n_test: int = 500, noise: float = 1.0, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Friedman's (1991) regression function #1 on [0, 1]^10, five informative inputs, standardised.

    y = 10 sin(π x1 x2) + 20 (x3 - 1/2)² + 10 x4 + 5 x5 + ε, ε ~ N(0, noise²); inputs are centred
    and scaled to unit variance (dot-product kernels such as the NNGP/NTK see angles and norms,
    so centring matters), targets are standardised with the training statistics.
    """
    n_train = integer_argument("n_train", n_train, minimum=2)
    n_test = integer_argument("n_test", n_test, minimum=1)
    noise = real_argument("noise", noise, minimum=0)
    generator = torch.Generator().manual_seed(integer_argument("seed", seed))

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 10, generator=generator, dtype=torch.float64)
        f = 10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
        return x, f

    train_x, train_f = draw(n_train)
    test_x, test_f = draw(n_test)
    train_y = train_f + noise * torch.randn(n_train, generator=generator, dtype=torch.float64)
    x_mean, x_std = train_x.mean(0), train_x.std(0)
    y_mean, y_std = train_y.mean(), train_y.std()
    return (
        (train_x - x_mean) / x_std,
        (train_y - y_mean) / y_std,
        (test_x - x_mean) / x_std,
        (test_f - y_mean) / y_std,
    )


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, train_x: Tensor, train_y: Tensor, likelihood: Any, covar_module: Any) -> None:
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x: Tensor) -> Any:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit(
    name: str, covar_module: Any, train_x: Tensor, train_y: Tensor, iterations: int = 150, lr: float = 0.05
) -> tuple[ExactGP, Any, float, float, float]:
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ExactGP(train_x, train_y, likelihood, covar_module).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    with torch.no_grad():
        initial = mll(model(train_x), train_y).item()
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = mll(model(train_x), train_y).item()
    return model, likelihood, initial, final, time.perf_counter() - start


def evaluate(
    model: ExactGP, likelihood: Any, test_x: Tensor, test_y: Tensor
) -> tuple[Tensor, Tensor, float, float, float]:
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = likelihood(model(test_x))
        mean, var = pred.mean, pred.variance
    rmse = (mean - test_y).square().mean().sqrt().item()
    nll = (0.5 * torch.log(2 * math.pi * var) + 0.5 * (mean - test_y).square() / var).mean().item()
    inside = ((test_y - mean).abs() <= 1.96 * var.sqrt()).double().mean().item()
    return mean, var, rmse, nll, inside


def describe_net(net: L.Serial) -> str:
    dense = net._layers[0]
    return (
        f"mlp(depth=3, relu): σw² = {dense.weight_variance.item():.3f}, "
        f"σb² = {dense.bias_variance.item():.3f}"
    )


def run(print_fn: PrintFn = print, iterations: int = 150, figure: str | None = "gpntk-demo.png") -> dict[str, float]:
    """Both parts of the demo; returns the numbers it printed that tests check."""
    print_fn("gpntk demo: infinitely wide neural networks as Gaussian processes\n")
    results = run_posterior(print_fn, figure)
    print_fn("")
    results.update(run_kernel_fit(print_fn, iterations))
    return results


def run_kernel_fit(print_fn: PrintFn = print, iterations: int = 150) -> dict[str, float]:
    """Part 2: NTK, NNGP and RBF kernels fitted as exact GPs by the marginal likelihood."""
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = make_problem()
    print_fn("Part 2 - the NTK and NNGP as GPyTorch kernels, fitted by the marginal likelihood")
    print_fn(f"data: Friedman #1 (10 inputs, 5 informative, noise σ=1), {len(train_x)} training and "
             f"{len(test_x)} test points, standardised\n")

    ntk_net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    nngp_net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    candidates = {
        "NTK  (ReLU, depth 3)": (gpytorch.kernels.ScaleKernel(NTKKernel(ntk_net)), ntk_net),
        "NNGP (ReLU, depth 3)": (gpytorch.kernels.ScaleKernel(NNGPKernel(nngp_net)), nngp_net),
        "RBF  (baseline)": (gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), None),
    }
    print_fn(f"{'kernel':22s} {'MLL before':>11s} {'MLL after':>10s} {'test RMSE':>10s} "
             f"{'test NLL':>9s} {'95% cover':>10s} {'fit time':>9s}")
    results = {}
    fitted = {}
    for name, (kernel, net) in candidates.items():
        model, likelihood, before, after, seconds = fit(name, kernel, train_x, train_y, iterations)
        mean, var, rmse, nll, cover = evaluate(model, likelihood, test_x, test_y)
        fitted[name] = (model, likelihood, net, mean, var)
        results[name] = rmse
        print_fn(f"{name:22s} {before:11.3f} {after:10.3f} {rmse:10.4f} {nll:9.3f} {cover:10.1%} {seconds:8.2f}s")

    model, likelihood, net, mean, var = fitted["NTK  (ReLU, depth 3)"]
    print_fn(f"\nfitted NTK hyperparameters: {describe_net(cast(L.Serial, net))}, "
             f"outputscale = {model.covar_module.outputscale.item():.3f}, "
             f"noise = {likelihood.noise.item():.4f}")
    print_fn("\nNTK-GP predictions at the first test points (mean ± 2σ of a noisy observation):")
    print_fn(f"{'truth':>8s} {'mean':>8s} {'± 2σ':>7s}")
    for i in range(8):
        print_fn(f"{test_y[i].item():8.3f} {mean[i].item():8.3f} {2 * var[i].sqrt().item():7.3f}")
    return results


def main(figure: str | None = "gpntk-demo.png") -> None:
    run(figure=figure)


if __name__ == "__main__":
    main()
