"""A plain GPyTorch exact GP around any covariance module, shared by the tests."""

from __future__ import annotations

import gpytorch


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, covar_module, likelihood, mean_module=None):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean() if mean_module is None else mean_module
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
