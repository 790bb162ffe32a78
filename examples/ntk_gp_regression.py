"""An exact GP with an NTK kernel added to an RBF, fitted by the marginal likelihood.

    python examples/ntk_gp_regression.py

Prints the learnt network hyperparameters and the held-out error of NTK+RBF against RBF alone.
"""

import math

import gpytorch
import torch

import gpntk
from gpntk import layers as L


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_and_score(covar_module, train_x, train_y, test_x, test_y, iterations=100):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(train_x, train_y, likelihood, covar_module).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(iterations):
        optimizer.zero_grad()
        (-mll(model(train_x), train_y)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model.likelihood(model(test_x))
    rmse = (pred.mean - test_y).square().mean().sqrt().item()
    return model, rmse


def main():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    f = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3].abs()
    y = f + 0.1 * torch.randn(300, generator=g, dtype=torch.float64)
    train_x, train_y, test_x, test_y = x[:200], y[:200], x[200:], f[200:]

    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    ntk_plus_rbf = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net)) + gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel()
    )
    model, rmse_ntk = fit_and_score(ntk_plus_rbf, train_x, train_y, test_x, test_y)
    _, rmse_rbf = fit_and_score(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), train_x, train_y, test_x, test_y
    )
    dense = net.layers[0]
    print(f"learnt σw² = {dense.weight_variance.item():.3f}, σb² = {dense.bias_variance.item():.3f}")
    print(f"test RMSE: NTK + RBF {rmse_ntk:.4f}   RBF alone {rmse_rbf:.4f}   (predicting 0: {test_y.std().item():.4f})")
    assert math.isfinite(rmse_ntk)


if __name__ == "__main__":
    main()
