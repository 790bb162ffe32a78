"""Sums and products of gpntk kernels with each other and with GPyTorch kernels are exact.

GPyTorch multiplies two kernel matrices exactly only when one of them is dense; otherwise
``MulLinearOperator`` replaces each factor by a root decomposition (Cholesky with jitter below
``max_cholesky_size``, Lanczos of rank at most 100 above it). Every posterior here is compared
with a dense reference built from the factors' own matrices (each factor evaluated on its own,
combined by hand, solved by a float64 Cholesky), never with the composed gpntk model itself.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, IndexKernel, MultitaskKernel, RBFKernel, ScaleKernel
from linear_operator.utils.warnings import NumericalWarning as LinearOperatorNumericalWarning

import gpntk
from gpntk import layers as L

DTYPE = torch.float64
NOISE = 1e-2


def relu_net() -> L.Serial:
    return L.mlp(2, "relu", weight_variance=1.7, bias_variance=0.2)


def erf_net() -> L.Serial:
    return L.mlp(1, "erf", weight_variance=2.5, bias_variance=0.3)


def data(n: int, d: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=generator, dtype=DTYPE) * 2 - 1
    y = torch.sin(3 * x).sum(-1) + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)
    test_x = torch.rand(40, d, generator=generator, dtype=DTYPE) * 2 - 1
    return x, y, test_x


def dense(kernel, x1, x2=None) -> torch.Tensor:
    """One kernel's own matrix, evaluated on its own (no composition involved)."""
    with torch.no_grad():
        return kernel(x1, x1 if x2 is None else x2).to_dense()


def reference_posterior(K, Ks, Kss_diag, y, noise=NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the exact GP posterior by a float64 Cholesky."""
    chol = torch.linalg.cholesky(K + noise * torch.eye(K.shape[-1], dtype=K.dtype))
    alpha = torch.cholesky_solve(y.unsqueeze(-1), chol).squeeze(-1)
    v = torch.linalg.solve_triangular(chol, Ks.mT, upper=False)
    return Ks @ alpha, Kss_diag - (v**2).sum(-2)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = NOISE
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def gp_posterior(covar, x, y, test_x) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GPyTorch's posterior mean and variance, and the number of jitter warnings it emitted."""
    model = GP(x, y, covar).double().eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        posterior = model(test_x)
        mean, variance = posterior.mean, posterior.variance
    return mean, variance, jitter_warnings(caught)


def jitter_warnings(caught) -> int:
    return sum(issubclass(w.category, LinearOperatorNumericalWarning) and "jitter" in str(w.message) for w in caught)


def rbf(lengthscale: float = 0.7) -> RBFKernel:
    kernel = RBFKernel()
    kernel.lengthscale = lengthscale
    return kernel


def scaled(kernel, scale: float = 1.3) -> ScaleKernel:
    out = ScaleKernel(kernel)
    out.outputscale = scale
    return out


# (name, composed kernel, function of the factors' dense matrices giving the reference matrix)
COMPOSITIONS = {
    "ntk*nngp": lambda a, b: (
        gpntk.NTKKernel(a) * gpntk.NNGPKernel(b),
        lambda f: f(gpntk.NTKKernel(a)) * f(gpntk.NNGPKernel(b)),
    ),
    "ntk*rbf": lambda a, b: (gpntk.NTKKernel(a) * rbf(), lambda f: f(gpntk.NTKKernel(a)) * f(rbf())),
    "rbf*nngp": lambda a, b: (rbf() * gpntk.NNGPKernel(b), lambda f: f(rbf()) * f(gpntk.NNGPKernel(b))),
    "scale(ntk)*nngp": lambda a, b: (
        scaled(gpntk.NTKKernel(a)) * gpntk.NNGPKernel(b),
        lambda f: 1.3 * f(gpntk.NTKKernel(a)) * f(gpntk.NNGPKernel(b)),
    ),
    "scale(ntk*rbf)+nngp": lambda a, b: (
        scaled(gpntk.NTKKernel(a) * rbf()) + gpntk.NNGPKernel(b),
        lambda f: 1.3 * f(gpntk.NTKKernel(a)) * f(rbf()) + f(gpntk.NNGPKernel(b)),
    ),
    "additive(ntk, rbf, nngp)": lambda a, b: (
        AdditiveKernel(gpntk.NTKKernel(a), rbf(), gpntk.NNGPKernel(b)),
        lambda f: f(gpntk.NTKKernel(a)) + f(rbf()) + f(gpntk.NNGPKernel(b)),
    ),
    "ntk*ntk*rbf": lambda a, b: (
        gpntk.NTKKernel(a) * gpntk.NTKKernel(b) * rbf(),
        lambda f: f(gpntk.NTKKernel(a)) * f(gpntk.NTKKernel(b)) * f(rbf()),
    ),
}


def _composition(name):
    covar, reference = COMPOSITIONS[name](relu_net(), erf_net())
    return covar, reference


@pytest.mark.parametrize("name", list(COMPOSITIONS))
@pytest.mark.parametrize("cholesky", [True, False], ids=["cholesky", "cg"])
def test_composed_posterior_equals_dense_reference(name, cholesky):
    """Posterior mean and variance of composed kernels equal the dense reference.

    On the Cholesky path (``max_cholesky_size >= n``) to 1e-8 and without jitter; on the
    iterative path (``max_cholesky_size < n``, as for n > 800 by default) with a tight CG
    tolerance, to 1e-4 (conjugate gradients reach 3e-6 here for the mean of an RBF x RBF model as
    for NTK x NNGP), where a Lanczos root of rank <= 100 of a gpntk factor was off by 1e-2 to 1.
    """
    x, y, test_x = data(300)
    covar, reference = _composition(name)
    K = reference(lambda k: dense(k, x))
    Ks = reference(lambda k: dense(k, test_x, x))
    Kss = reference(lambda k: dense(k, test_x)).diagonal()
    ref_mean, ref_var = reference_posterior(K, Ks, Kss, y)
    if cholesky:
        with gpytorch.settings.max_cholesky_size(10_000):
            mean, var, jitters = gp_posterior(covar, x, y, test_x)
        tolerance = 1e-8
        assert jitters == 0
    else:
        with (
            gpytorch.settings.max_cholesky_size(100),
            gpytorch.settings.eval_cg_tolerance(1e-12),
            gpytorch.settings.max_cg_iterations(2000),
            gpytorch.settings.fast_pred_var(False),
        ):
            mean, var, _ = gp_posterior(covar, x, y, test_x)
        tolerance = 1e-4
    scale = y.abs().max()
    assert (mean - ref_mean).abs().max() <= tolerance * scale
    assert (var - ref_var).abs().max() <= tolerance * Kss.abs().max()


# --------------------------------------------------------------------------------------------
# multitask: IndexKernel (Hadamard), MultitaskKernel (Kronecker), BoTorch MultiTaskGP
# --------------------------------------------------------------------------------------------
class HadamardGP(gpytorch.models.ExactGP):
    """GPyTorch's Hadamard multitask model: k((x, i), (x', j)) = k_x(x, x') B[i, j]."""

    def __init__(self, x, i, y, data_kernel):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = NOISE
        super().__init__((x, i), y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.data_kernel = data_kernel
        self.task_kernel = IndexKernel(num_tasks=2, rank=1)
        self.task_kernel.covar_factor.data = torch.tensor([[1.0], [0.6]])
        self.task_kernel.var = torch.tensor([0.3, 0.5])

    def forward(self, x, i):
        covar = self.data_kernel(x).mul(self.task_kernel(i))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)


def hadamard_data(n_per_task: int):
    x, y, test_x = data(2 * n_per_task, seed=1)
    i = torch.arange(2).repeat_interleave(n_per_task).unsqueeze(-1)
    y = y + 0.5 * i.squeeze(-1)
    test_i = torch.arange(2).repeat(test_x.shape[0] // 2).unsqueeze(-1)
    return x, i, y, test_x, test_i


def hadamard_check(data_kernel, n_per_task, tolerance, **settings) -> int:
    x, i, y, test_x, test_i = hadamard_data(n_per_task)
    model = HadamardGP(x, i, y, data_kernel).double().eval()
    with torch.no_grad():
        B = model.task_kernel.covar_matrix.to_dense()
        K = dense(data_kernel, x) * B[i, i.mT]
        Ks = dense(data_kernel, test_x, x) * B[test_i, i.mT]
        Kss = dense(data_kernel, test_x).diagonal() * B[test_i.squeeze(-1), test_i.squeeze(-1)]
    ref_mean, ref_var = reference_posterior(K, Ks, Kss, y)
    with (
        gpytorch.settings.max_cholesky_size(settings.get("max_cholesky_size", 10_000)),
        gpytorch.settings.eval_cg_tolerance(1e-12),
        gpytorch.settings.max_cg_iterations(4000),
        warnings.catch_warnings(record=True) as caught,
        torch.no_grad(),
    ):
        warnings.simplefilter("always")
        posterior = model(test_x, test_i)
        mean, var = posterior.mean, posterior.variance
    assert (mean - ref_mean).abs().max() <= tolerance * y.abs().max()
    assert (var - ref_var).abs().max() <= tolerance * Kss.abs().max()
    return jitter_warnings(caught)


@pytest.mark.parametrize("max_cholesky_size", [10_000, 100], ids=["cholesky", "cg"])
def test_hadamard_index_kernel_posterior(max_cholesky_size):
    """NTK x IndexKernel (Hadamard multitask) equals the dense reference, as RBF x IndexKernel does."""
    tolerance = 1e-8 if max_cholesky_size > 1000 else 1e-4
    jitters = hadamard_check(gpntk.NTKKernel(relu_net()), 150, tolerance, max_cholesky_size=max_cholesky_size)
    rbf_jitters = hadamard_check(rbf(), 150, tolerance, max_cholesky_size=max_cholesky_size)
    assert jitters <= rbf_jitters


@pytest.mark.slow
def test_hadamard_at_two_thousand_points_on_the_cholesky_path():
    """The issue's setting, 1000 points x 2 tasks = 2000 rows, Cholesky path: equal to 1e-8."""
    assert hadamard_check(gpntk.NTKKernel(relu_net()), 1000, 1e-8) == 0


def test_multitask_kernel_posterior():
    """MultitaskKernel(NTK) (a Kronecker product with the task covariance) equals the dense reference."""
    x, y, test_x = data(120)
    Y = torch.stack([y, 0.5 * y + torch.cos(2 * x[:, 0])], -1)
    data_kernel = gpntk.NTKKernel(relu_net())
    covar = MultitaskKernel(data_kernel, num_tasks=2, rank=1)
    covar.task_covar_module.covar_factor.data = torch.tensor([[1.0], [0.6]])

    class MultitaskGP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, has_global_noise=False)
            likelihood.task_noises = torch.tensor([NOISE, NOISE])
            super().__init__(x, Y, likelihood)
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ZeroMean(), num_tasks=2)
            self.covar_module = covar

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    model = MultitaskGP().double().eval()
    with torch.no_grad():
        B = covar.task_covar_module.covar_matrix.to_dense()
        K = torch.kron(dense(data_kernel, x), B)
        Ks = torch.kron(dense(data_kernel, test_x, x), B)
        Kss = torch.kron(dense(data_kernel, test_x), B).diagonal()
        with gpytorch.settings.max_cholesky_size(10_000):
            posterior = model(test_x)
            mean, var = posterior.mean, posterior.variance
    ref_mean, ref_var = reference_posterior(K, Ks, Kss, Y.reshape(-1))
    assert (mean.reshape(-1) - ref_mean).abs().max() <= 1e-8 * Y.abs().max()
    assert (var.reshape(-1) - ref_var).abs().max() <= 1e-8 * Kss.max()


@pytest.mark.slow
def test_botorch_multitask_gp_fit_has_no_more_jitter_than_rbf():
    """BoTorch's MultiTaskGP (a Hadamard product inside) fits an NTK without jitter warnings RBF would not emit."""
    pytest.importorskip("botorch")  # an optional extra
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import MultiTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    x, i, y, test_x, test_i = hadamard_data(40)
    train_X = torch.cat([x, i.to(DTYPE)], -1)

    def fit(covar) -> tuple[int, torch.Tensor]:
        model = MultiTaskGP(train_X, y.unsqueeze(-1), task_feature=-1, covar_module=covar)
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 30}})
            posterior = model.posterior(torch.cat([test_x, test_i.to(DTYPE)], -1))
            mean = posterior.mean
        return jitter_warnings(caught), mean

    ours, mean = fit(gpntk.NTKKernel(relu_net()))
    theirs, _ = fit(ScaleKernel(RBFKernel()))
    assert torch.isfinite(mean).all()
    assert ours <= theirs


# --------------------------------------------------------------------------------------------
# matrix-free operators
# --------------------------------------------------------------------------------------------
def test_dense_backend_gives_gpytorch_a_tensor():
    """Where the dense backend is chosen, forward returns a tensor, as RBF's does."""
    x = torch.randn(7, 3, dtype=DTYPE)
    assert torch.is_tensor(gpntk.NTKKernel(relu_net()).forward(x, x))
    assert torch.is_tensor(gpntk.NNGPKernel(relu_net(), backend="dense").forward(x, x))


def test_root_decomposition_of_a_matrix_free_factor_warns():
    """A product GPyTorch can only form from root decompositions of matrix-free factors warns.

    (A product with a dense factor is formed densely, exactly.)
    """
    x, y, test_x = data(60)
    covar = gpntk.NTKKernel(relu_net(), backend="blockwise", block_elements=256) * gpntk.NNGPKernel(
        erf_net(), backend="blockwise", block_elements=256
    )
    model = GP(x, y, covar).double().eval()
    with pytest.warns(gpntk.ApproximationWarning, match="root decomposition"), torch.no_grad():
        model(test_x).mean


@pytest.mark.parametrize("max_cholesky_size", [10_000, 100], ids=["cholesky", "cg"])
def test_hadamard_with_the_empirical_kernel(max_cholesky_size):
    """EmpiricalNTKKernel x IndexKernel equals the dense reference: the empirical kernel reaches
    GPyTorch as a tensor, so no root decomposition replaces it (a Lanczos root of it was off)."""
    torch.manual_seed(0)
    model = relu_net().finite(64, in_features=2).double()
    tolerance = 1e-8 if max_cholesky_size > 1000 else 1e-4
    jitters = hadamard_check(gpntk.EmpiricalNTKKernel(model), 150, tolerance, max_cholesky_size=max_cholesky_size)
    assert jitters <= hadamard_check(rbf(), 150, tolerance, max_cholesky_size=max_cholesky_size)
