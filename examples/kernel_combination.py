"""Combining the NTK with periodic and RBF kernels in GPyTorch, on a synthetic CO2-like curve.

    python examples/kernel_combination.py                   # about 10-20 s on one CPU thread
    python examples/kernel_combination.py --full            # more marginal-likelihood steps
    python examples/kernel_combination.py --figure out.png

The data: a synthetic monthly series shaped like the Mauna Loa CO2 record, 15 years from 1990:
a smooth accelerating trend (315 + 1.2 (t - 1990) + 0.012 (t - 1990)² ppm), a yearly seasonal
cycle of amplitude about 3 ppm with a second harmonic, and Gaussian noise of standard deviation
0.3 ppm (seed 0). The first 10 years (120 months) are the training set, the last 5 years
(60 months) the extrapolation test set. Inputs (years) and targets are standardized with the
training mean and std; float64 throughout. RMSE is reported in ppm, the NLL per test point in
standardized units.

The models: exact GPyTorch GPs with a constant mean and a Gaussian likelihood, and covariance

* ``ScaleKernel(NTKKernel(mlp(2, "relu")))`` alone;
* ``ScaleKernel(NTKKernel(...)) + ScaleKernel(PeriodicKernel())``: trend + seasonality;
* ``ScaleKernel(NTKKernel(...)) + ScaleKernel(PeriodicKernel() * RBFKernel())``: trend + a
  seasonal cycle whose shape may drift (locally periodic);
* ``ScaleKernel(RBFKernel()) + ScaleKernel(PeriodicKernel())``: a classical baseline whose
  trend component reverts to the constant mean away from the data.

All hyperparameters (σw², σb² of the network, output scales, period, length scales, noise) are
fitted by the exact marginal likelihood with Adam; the period starts at one year. For each model
the script prints the training negative log marginal likelihood per point, the extrapolation test
RMSE, the mean test NLL of the predictive distribution (noise included), the coverage of its
central 95% interval and the fitted period, and saves a figure of the predictive means ± 2 std.
"""

import argparse
import math
import time

import gpytorch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402

STEPS = {"default": 150, "full": 500}  # Adam steps on the marginal likelihood
START, YEARS, TRAIN_YEARS = 1990.0, 15, 10


def make_data(seed: int = 0):
    """Monthly (years, ppm) of the synthetic CO2-like series."""
    g = torch.Generator().manual_seed(seed)
    years = START + torch.arange(12 * YEARS, dtype=torch.float64) / 12
    s = years - START
    trend = 315 + 1.2 * s + 0.012 * s**2
    season = 2.8 * torch.sin(2 * math.pi * s) + 0.8 * torch.cos(4 * math.pi * s + 0.5)
    ppm = trend + season + 0.3 * torch.randn(len(years), generator=g, dtype=torch.float64)
    return years, ppm


def mlp():
    return L.mlp(depth=2, activation="relu", weight_variance=2.0, bias_variance=0.5)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def periodic(period: float):
    kernel = gpytorch.kernels.PeriodicKernel()
    kernel.period_length = period
    return kernel


def rbf(lengthscale: float):
    kernel = gpytorch.kernels.RBFKernel()
    kernel.lengthscale = lengthscale
    return kernel


def kernels(period: float):
    """name -> a function building the covariance module (``period``: one year in standardized inputs)."""
    scale = gpytorch.kernels.ScaleKernel
    return {
        "NTK": lambda: scale(gpntk.NTKKernel(mlp())),
        "NTK + Periodic": lambda: scale(gpntk.NTKKernel(mlp())) + scale(periodic(period)),
        "NTK + Periodic×RBF": lambda: scale(gpntk.NTKKernel(mlp())) + scale(periodic(period) * rbf(1.0)),
        "RBF + Periodic": lambda: scale(rbf(1.0)) + scale(periodic(period)),
    }


def fitted_period(covar_module) -> float:
    for module in covar_module.modules():
        if isinstance(module, gpytorch.kernels.PeriodicKernel):
            return module.period_length.item()
    return math.nan


def fit(covar_module, train_x, train_y, test_x, steps: int):
    """Fit by the exact marginal likelihood; return (train NLML per point, predictive mean, variance, model)."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(train_x, train_y, likelihood, covar_module).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nlml = -mll(model(train_x), train_y).item()
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = likelihood(model(test_x))
        return nlml, pred.mean, pred.variance, model


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default="kernel-combination.png", help="where to save the figure")
    parser.add_argument("--full", action="store_true", help=f"{STEPS['full']} marginal-likelihood steps")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    steps = STEPS["full" if args.full else "default"]
    start = time.perf_counter()

    years, ppm = make_data()
    n_train = 12 * TRAIN_YEARS
    x_mean, x_std = years[:n_train].mean(), years[:n_train].std()
    y_mean, y_std = ppm[:n_train].mean(), ppm[:n_train].std()
    x = ((years - x_mean) / x_std).unsqueeze(-1)
    y = (ppm - y_mean) / y_std
    train_x, train_y, test_x, test_y = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    period = (1 / x_std).item()  # one year in standardized inputs
    print(f"synthetic CO2-like series: {n_train} training months ({START:.0f}-{START + TRAIN_YEARS:.0f}), "
          f"{len(test_x)} test months (extrapolation); {steps} Adam steps", flush=True)

    rows, curves = [], {}
    for name, make in kernels(period).items():
        torch.manual_seed(0)
        nlml, mean, variance, model = fit(make(), train_x, train_y, x, steps)
        test_mean, test_var = mean[n_train:], variance[n_train:]
        rmse = ((test_mean - test_y).square().mean().sqrt() * y_std).item()
        nll = (0.5 * torch.log(2 * math.pi * test_var) + 0.5 * (test_y - test_mean).square() / test_var).mean().item()
        cover = ((test_y - test_mean).abs() <= 1.96 * test_var.sqrt()).double().mean().item()
        period_months = 12 * fitted_period(model.covar_module) / period
        rows.append((name, nlml, rmse, nll, cover, period_months))
        curves[name] = (mean * y_std + y_mean, variance.sqrt() * y_std)
        print(f"  fitted {name} ({time.perf_counter() - start:.1f} s)", flush=True)

    print(f"{'kernel':<20s} {'train NLML':>10s} {'test RMSE':>10s} {'test NLL':>9s} {'cover95':>8s} "
          f"{'period':>7s}")
    for name, nlml, rmse, nll, cover, period_months in rows:
        period_text = f"{period_months:7.2f}" if math.isfinite(period_months) else f"{'-':>7s}"
        print(f"{name:<20s} {nlml:10.3f} {rmse:10.3f} {nll:9.3f} {cover:8.3f} {period_text}")
    print("(train NLML: negative log marginal likelihood per training point; RMSE in ppm; "
          "NLL in standardized units; period in months)")

    plot(years, ppm, n_train, curves, rows, args.figure)
    print(f"saved {args.figure}; {time.perf_counter() - start:.1f} s", flush=True)
    assert all(math.isfinite(r[2]) and math.isfinite(r[3]) for r in rows)
    return rows


def plot(years, ppm, n_train, curves, rows, path):
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True)
    metrics = {name: (rmse, nll) for name, _, rmse, nll, _, _ in rows}
    for ax, (name, (mean, std)) in zip(axes.flat, curves.items()):
        ax.fill_between(years, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.25, lw=0, label="mean ± 2 std")
        ax.plot(years, mean, color="C0", lw=1.2, label="predictive mean")
        ax.plot(years[:n_train], ppm[:n_train], "k.", ms=3, label="training data")
        ax.plot(years[n_train:], ppm[n_train:], ".", color="C3", ms=3, label="held-out data")
        ax.axvline(years[n_train].item() - 1 / 24, color="gray", lw=0.8, ls="--")
        rmse, nll = metrics[name]
        ax.set_title(f"{name}: test RMSE {rmse:.2f} ppm, NLL {nll:.2f}")
        ax.grid(alpha=0.3)
    low, high = ppm.min().item() - 3, ppm.max().item() + 3
    for ax in axes.flat[1:]:  # the NTK alone keeps its own, much wider, scale
        ax.set_ylim(low, high)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    for ax in axes[1]:
        ax.set_xlabel("year")
    for ax in axes[:, 0]:
        ax.set_ylabel("ppm")
    fig.suptitle("Extrapolating a synthetic CO2-like series 5 years ahead: NTK alone, NTK + periodic "
                 "kernels, RBF + periodic")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
