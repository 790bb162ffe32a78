"""The problems the distributed tests solve, in one process (the reference) and on several ranks.

Every function builds its problem from fixed seeds, so each rank and the reference process hold
the same data. ``sharded=False`` runs the plain kernel (GPyTorch's own dense path, no gpntk.distributed
code), ``sharded=True`` wraps it in :class:`gpntk.distributed.ShardedKernel`. Results are dicts of
tensors (``torch.save``-able).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import gpytorch
import torch

import gpntk
from gpntk import layers as L
from gpntk.distributed import ShardedKernel, ShardedTrainProduct

N, D, M = 400, 4, 30
SCALE, Y_SCALE = 1e4, 1e2
WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"


def data(n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    test_x = torch.randn(M, D, generator=g, dtype=torch.float64)
    return x, y, test_x


def base_kernel() -> gpytorch.kernels.Kernel:
    net = L.mlp(depth=2, activation="relu", weight_variance=1.7, bias_variance=0.2)
    return gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net))


class GP(gpytorch.models.ExactGP):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, covar: gpytorch.kernels.Kernel):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


def cg_path() -> contextlib.ExitStack:
    """GPyTorch's iterative path at this small n: CG, Lanczos log-determinant, pivoted-Cholesky preconditioner.

    Every setting that changes the numbers is pinned: importing BoTorch changes GPyTorch's global
    defaults (``max_cholesky_size`` 800 -> 4096, ``max_eager_kernel_size`` 512 -> 4096,
    ``cholesky_max_tries`` 3 -> 6, and ``fast_computations`` off), so a reference computed in a
    process that imported it (the test session) would otherwise differ from ranks that did not.
    """
    stack = contextlib.ExitStack()
    for setting in (
        gpntk.settings.gpytorch_defaults(),
        gpytorch.settings.max_cholesky_size(50),
        gpytorch.settings.cg_tolerance(1e-5),
        gpytorch.settings.eval_cg_tolerance(1e-5), gpytorch.settings.max_cg_iterations(1000),
        gpytorch.settings.num_trace_samples(8),
    ):
        stack.enter_context(setting)
    return stack


def gp_results(sharded: bool) -> dict[str, torch.Tensor]:
    """The MLL, its gradients (by parameter name of the base model) and the predictive mean and variance."""
    x, y, test_x = data()
    covar = base_kernel()
    model = GP(x, y * Y_SCALE, ShardedKernel(covar) if sharded else covar).double()
    # GPyTorch's CG treats curvatures p'Ap below 1e-10 as zero (its eps), which stalls it near a relative
    # residual sqrt(1e-10 / lambda_min): with kernel and noise scaled by 1e4 it converges well below the
    # tolerance, and where it stops does not hinge on round-off
    model.likelihood.noise = SCALE
    (model.covar_module.base_kernel if sharded else model.covar_module).outputscale = SCALE
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    out: dict[str, torch.Tensor] = {}
    with cg_path():
        model.train()
        torch.manual_seed(1234)  # the probe vectors: the same on every rank and in the reference
        loss = mll(model(x), y * Y_SCALE)
        loss.backward()
        out["mll"] = loss.detach()
        for name, param in model.named_parameters():
            if sharded:  # the names of the base model's parameters
                name = name.replace("covar_module.base_kernel.", "covar_module.", 1)
            out["grad:" + name] = param.grad.clone()
        model.eval()
        with torch.no_grad():
            pred = model.likelihood(model(test_x))
            out["mean"], out["variance"] = pred.mean, pred.variance
    return out


def product_results(sharded: bool) -> dict[str, torch.Tensor]:
    """K(X, X) V, K(X, X) dense, K(X*, X) V and K(X*, X) dense."""
    x, _, test_x = data()
    covar = base_kernel().double()
    kernel = ShardedKernel(covar) if sharded else covar
    v = torch.randn(N, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        train, cross = kernel(x), kernel(test_x, x)
        return {"KV": train @ v, "K": train.to_dense(), "CV": cross @ v, "C": cross.to_dense()}


def ensemble_results(sharded: bool) -> dict[str, torch.Tensor]:
    """A TrainedEnsemble's posterior mean and variance by Lanczos at a finite time."""
    x, y, test_x = data(200)
    net = L.mlp(depth=2, activation="relu", weight_variance=1.7, bias_variance=0.2)
    product = ShardedTrainProduct(net, x) if sharded else None
    post = gpntk.TrainedEnsemble(net, x, y, diag_reg=1e-3, solver="lanczos", tolerance=1e-10, train_product=product)
    dist = post(test_x, t=50.0, regime="ntk")
    loss = post.train_loss(math.inf, regime="ntk", include_variance=False)
    return {"mean": dist.mean, "variance": dist.variance, "loss": loss, "products": torch.tensor(post.num_products)}


SCENARIOS = {"gp": gp_results, "products": product_results, "ensemble": ensemble_results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(scenario: str, out_dir: Path, world_size: int = 2, *extra: str) -> list[subprocess.CompletedProcess]:
    """Run ``scenario`` on ``world_size`` gloo processes; each rank saves its results to ``out_dir/rank{r}.pt``."""
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(Path(gpntk.__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out_dir / f"rank{rank}.pt"), *extra],
            env={**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world_size)
    ]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)  # a guard against a hung collective, not a timing
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done
