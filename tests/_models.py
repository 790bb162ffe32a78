"""Shared by the tests: a plain GPyTorch exact GP around any covariance module, and a float64 test-case mixin."""

from __future__ import annotations

import gpytorch
import torch


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, covar_module, likelihood, mean_module=None):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean() if mean_module is None else mean_module
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class Float64Defaults:
    """A ``unittest`` mixin running each test with float64 as torch's default dtype (the reference precision)."""

    def setUp(self):
        self._default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        super().setUp()

    def tearDown(self):
        super().tearDown()
        torch.set_default_dtype(self._default_dtype)
