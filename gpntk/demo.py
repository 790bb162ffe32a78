"""``gpntk demo``: fit NTK and NNGP Gaussian processes to a small built-in regression problem.

Runs on a CPU in a few seconds with no data of the user's: Friedman's function #1, an exact GP
with ``ScaleKernel(NTKKernel(mlp(3, "relu")))`` (and the NNGP, and an RBF baseline) trained by
the marginal likelihood, then held-out accuracy and calibration and a few predictions with
uncertainty.
"""

from __future__ import annotations

import math
import time

import gpytorch
import torch

from . import layers as L
from .kernels import NNGPKernel, NTKKernel


def make_problem(n_train: int = 200, n_test: int = 500, noise: float = 1.0, seed: int = 0):
    """Friedman's (1991) regression function #1 on [0, 1]^10, five informative inputs, standardised.

    y = 10 sin(π x1 x2) + 20 (x3 - 1/2)² + 10 x4 + 5 x5 + ε, ε ~ N(0, noise²); inputs are centred
    and scaled to unit variance (dot-product kernels such as the NNGP/NTK see angles and norms,
    so centring matters), targets are standardised with the training statistics.
    """
    generator = torch.Generator().manual_seed(seed)

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
    def __init__(self, train_x, train_y, likelihood, covar_module):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit(name: str, covar_module, train_x, train_y, iterations: int = 150, lr: float = 0.05):
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


def evaluate(model, likelihood, test_x, test_y):
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = likelihood(model(test_x))
        mean, var = pred.mean, pred.variance
    rmse = (mean - test_y).square().mean().sqrt().item()
    nll = (0.5 * torch.log(2 * math.pi * var) + 0.5 * (mean - test_y).square() / var).mean().item()
    inside = ((test_y - mean).abs() <= 1.96 * var.sqrt()).double().mean().item()
    return mean, var, rmse, nll, inside


def describe_net(net) -> str:
    dense = net.layers[0]
    return (
        f"mlp(depth=3, relu): σw² = {dense.weight_variance.item():.3f}, "
        f"σb² = {dense.bias_variance.item():.3f}"
    )


def run(print_fn=print, iterations: int = 150) -> dict[str, float]:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = make_problem()
    print_fn("gpntk demo: infinitely wide networks as Gaussian processes")
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
    print_fn(f"\nfitted NTK hyperparameters: {describe_net(net)}, "
             f"outputscale = {model.covar_module.outputscale.item():.3f}, "
             f"noise = {likelihood.noise.item():.4f}")
    print_fn("\nNTK-GP predictions at the first test points (mean ± 2σ of a noisy observation):")
    print_fn(f"{'truth':>8s} {'mean':>8s} {'± 2σ':>7s}")
    for i in range(8):
        print_fn(f"{test_y[i].item():8.3f} {mean[i].item():8.3f} {2 * var[i].sqrt().item():7.3f}")
    return results


def main() -> None:
    run()


if __name__ == "__main__":
    main()
