"""Uncertainty calibration of NTK/NNGP GPs and trained ensembles on scikit-learn's diabetes data.

    python examples/calibration_diabetes.py                  # about 10-20 s on one CPU thread
    python examples/calibration_diabetes.py --quick          # fewer marginal-likelihood steps
    python examples/calibration_diabetes.py --full           # more steps
    python examples/calibration_diabetes.py --figure out.png

The data: scikit-learn's bundled diabetes regression set (442 patients, 10 features, a disease
progression score; no download), split at random (seed 0) into 70% training and 30% test rows;
features and targets standardized with the training mean and std; float64 throughout. All
metrics are in standardized target units.

The models:

* exact GPyTorch GPs with ``ScaleKernel(NTKKernel(mlp(3, "relu")))``, ``ScaleKernel(NNGPKernel(...))``
  and ``ScaleKernel(RBFKernel())`` (a baseline), a constant mean and a Gaussian likelihood, all
  hyperparameters (σw², σb², output scale, noise, length scale) fitted by the exact marginal
  likelihood with Adam; the predictive distribution includes the likelihood noise;
* the trained ensemble ``TrainedEnsemble(mlp(3, "relu"), ...)`` (fixed σw² = 2, σb² = 0.1) in the
  ``"ntk"`` and ``"nngp"`` regimes, trained at 0.5 times the largest stable learning rate of that
  regime for t = 10, 100, 1000, 10000 and ∞ steps. Its spread over random initialisations is
  epistemic only, so its predictive distribution is N(μ_t, σ_t² + s_t²) with s_t² the mean squared
  training residual of the ensemble mean μ_t at that same t (a plug-in noise estimate: large early
  in training, near zero at t = ∞ where the ensemble interpolates the training targets).

For each model the script prints the test RMSE, the mean Gaussian negative log likelihood and the
empirical coverage of the central 95% interval, and saves a figure: reliability curves (observed
against nominal coverage of central intervals, levels 0.1 to 0.95) and NLL and 95% coverage of the
ensembles against t.
"""

import argparse
import math
import time

import gpytorch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402

TIMES = (10.0, 100.0, 1000.0, 10000.0, math.inf)  # gradient-descent steps
LEVELS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], dtype=torch.float64)
STEPS = {"quick": 30, "default": 100, "full": 300}  # Adam steps on the marginal likelihood
LR_FRACTION = 0.5
DIAG_REG = 1e-4


def load_split(seed: int = 0, train_fraction: float = 0.7):
    data = load_diabetes()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    y = torch.as_tensor(data.target, dtype=torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(x)))
    train, test = perm[:n_train], perm[n_train:]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x, y = (x - x_mean) / x_std, (y - y_mean) / y_std
    return x[train], y[train], x[test], y[test]


def mlp():
    return L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_gp(covar_module, train_x, train_y, test_x, steps: int):
    """Fit by the exact marginal likelihood; return the predictive mean and variance (noise included)."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(train_x, train_y, likelihood, covar_module).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (-mll(model(train_x), train_y)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = likelihood(model(test_x))
        return pred.mean, pred.variance, likelihood.noise.item()


def ensemble_predictions(regime: str, train_x, train_y, test_x):
    """Per time t: (mean, variance incl. the plug-in noise s_t², s_t²) of the trained ensemble at test_x."""
    probe = gpntk.TrainedEnsemble(mlp(), train_x, train_y, learning_rate=1.0, diag_reg=DIAG_REG)
    learning_rate = LR_FRACTION * probe.max_learning_rate(regime)
    post = gpntk.TrainedEnsemble(mlp(), train_x, train_y, learning_rate=learning_rate, diag_reg=DIAG_REG)
    times = torch.tensor(TIMES, dtype=torch.float64)
    means, variances = post.moments(test_x, times, regime=regime, diag=True)
    train_means = post.mean(train_x, times, regime=regime)
    out = []
    for i in range(len(TIMES)):
        noise = (train_y - train_means[i]).square().mean().clamp_min(1e-8)
        out.append((means[i], variances[i].clamp_min(0) + noise, noise.item()))
    return learning_rate, out


def metrics(mean, variance, y):
    """RMSE, mean Gaussian NLL, observed coverage of the central intervals at LEVELS (tensor)."""
    rmse = (mean - y).square().mean().sqrt().item()
    nll = (0.5 * torch.log(2 * math.pi * variance) + 0.5 * (y - mean).square() / variance).mean().item()
    z = torch.distributions.Normal(0.0, 1.0).icdf((1 + LEVELS) / 2).to(y)
    inside = (y - mean).abs().unsqueeze(0) <= z.unsqueeze(1) * variance.sqrt().unsqueeze(0)
    return rmse, nll, inside.double().mean(1)


def plot(rows, ensemble_rows, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="ideal")
    for name, _, _, coverage in rows:
        ax.plot(LEVELS, coverage, "o-", ms=3, label=name)
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("observed coverage (test set)")
    ax.set_title("reliability")
    ax.legend(fontsize=7)
    # ensemble metrics against t; t = inf drawn at 10x the largest finite time
    finite = [t for t in TIMES if math.isfinite(t)]
    positions = [t if math.isfinite(t) else 10 * max(finite) for t in TIMES]
    for regime, style in (("ntk", "o-"), ("nngp", "s--")):
        nll = [r[2] for r in ensemble_rows if r[0] == regime]
        cov95 = [r[3][-1].item() for r in ensemble_rows if r[0] == regime]
        axes[1].plot(positions, nll, style, label=f"ensemble, {regime}")
        axes[2].plot(positions, cov95, style, label=f"ensemble, {regime}")
    for name, _, nll, coverage in rows:
        if name.startswith("GP"):
            axes[1].axhline(nll, lw=0.8, ls=":", color="gray")
            axes[2].axhline(coverage[-1].item(), lw=0.8, ls=":", color="gray")
    axes[2].axhline(0.95, color="k", lw=1, label="nominal 0.95")
    labels = [f"{t:g}" if math.isfinite(t) else "∞" for t in TIMES]
    for ax, title in ((axes[1], "test NLL (dotted: GPs)"), (axes[2], "95% interval coverage (dotted: GPs)")):
        ax.set_xscale("log")
        ax.set_xticks(positions, labels)
        ax.minorticks_off()
        ax.set_xlabel("training time t (steps at 0.5 × max stable learning rate)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Calibration on scikit-learn's diabetes data (standardized targets, 30% held out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default="calibration-diabetes.png", help="where to save the figure")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"{STEPS['quick']} marginal-likelihood steps")
    size.add_argument("--full", action="store_true", help=f"{STEPS['full']} marginal-likelihood steps")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    steps = STEPS["quick" if args.quick else "full" if args.full else "default"]
    start = time.perf_counter()

    train_x, train_y, test_x, test_y = load_split()
    print(f"diabetes: {len(train_x)} training and {len(test_x)} test rows, {train_x.shape[1]} features; "
          f"GP hyperparameters: {steps} Adam steps", flush=True)

    rows = []  # (name, rmse, nll, coverage at LEVELS)
    kernels = {
        "GP, NTK": lambda: gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(mlp())),
        "GP, NNGP": lambda: gpytorch.kernels.ScaleKernel(gpntk.NNGPKernel(mlp())),
        "GP, RBF": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()),
    }
    noise_of = {}
    for name, make in kernels.items():
        torch.manual_seed(0)
        mean, variance, noise = fit_gp(make(), train_x, train_y, test_x, steps)
        rows.append((name, *metrics(mean, variance, test_y)))
        noise_of[name] = noise

    ensemble_rows = []  # (regime, t, nll, coverage, name, rmse, noise)
    for regime in ("ntk", "nngp"):
        learning_rate, predictions = ensemble_predictions(regime, train_x, train_y, test_x)
        for t, (mean, variance, noise) in zip(TIMES, predictions):
            rmse, nll, coverage = metrics(mean, variance, test_y)
            name = f"ensemble {regime}, t={t:g}"
            ensemble_rows.append((regime, t, nll, coverage, name, rmse, noise))
        print(f"ensemble {regime}: learning rate {learning_rate:.3g} ({LR_FRACTION} of the stable edge)", flush=True)

    print(f"{'model':<26s} {'RMSE':>7s} {'NLL':>8s} {'cover95':>8s} {'noise var':>10s}")
    for name, rmse, nll, coverage in rows:
        print(f"{name:<26s} {rmse:7.3f} {nll:8.3f} {coverage[-1].item():8.3f} {noise_of[name]:10.3g}", flush=True)
    for _, _, nll, coverage, name, rmse, noise in ensemble_rows:
        print(f"{name:<26s} {rmse:7.3f} {nll:8.3f} {coverage[-1].item():8.3f} {noise:10.3g}", flush=True)
    print("(noise var: the GP's fitted likelihood noise; for the ensemble the mean squared training residual at t)")

    # reliability curves: the GPs and the NTK ensemble at two times
    curves = list(rows)
    for regime, t, nll, coverage, name, rmse, _ in ensemble_rows:
        if regime == "ntk" and t in (100.0, 1000.0, math.inf):
            curves.append((name, rmse, nll, coverage))
    plot(curves, ensemble_rows, args.figure)
    print(f"saved {args.figure}; {time.perf_counter() - start:.1f} s", flush=True)
    assert all(math.isfinite(r[2]) for r in rows)
    return rows, ensemble_rows


if __name__ == "__main__":
    main()
