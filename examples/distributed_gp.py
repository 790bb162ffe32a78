"""An NTK exact GP whose kernel matrices are divided among processes (gpntk.distributed).

    python examples/distributed_gp.py                              # one process
    torchrun --nproc_per_node=2 examples/distributed_gp.py         # two processes (gloo on CPU, NCCL on GPUs)

Every rank holds the same data and runs the same program; each computes only its rows of the
kernel matrices, and GPyTorch's CG runs the same iterations on every rank. Rank 0 then runs the
single-process fit (the same sharded kernel on a group of one process: what `python
examples/distributed_gp.py` computes) and prints, last, the largest difference of the predictions
(mean and variance). The row blocks do not depend on the number of processes and products are
concatenated, never summed across processes, so the difference is 0 (bitwise equal).

(The plain, unsharded kernel evaluates K(X, X) by mirroring its upper triangle; its entries differ
from the sharded kernel's by round-off, 1e-15 here, which CG at the tolerance of 1e-4 used here and
ten optimizer steps turn into differences of about 1e-4 in the predictions.)
"""

import gpytorch
import torch
import torch.distributed as dist

import gpntk
from gpntk import layers as L
from gpntk.distributed import ShardedKernel


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar_module):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_and_predict(train_x, train_y, test_x, group=None, iterations=10):
    """Fit and predict with the kernel sharded over ``group`` (default: every process)."""
    net = L.mlp(depth=2, activation="relu", weight_variance=2.0, bias_variance=0.1)
    covar = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net))
    model = GP(train_x, train_y, ShardedKernel(covar, group=group)).to(train_x)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    # GPyTorch's CG path (n > max_cholesky_size), where the sharded products do the work
    with gpytorch.settings.max_cholesky_size(100), gpytorch.settings.cg_tolerance(1e-4):
        model.train()
        for step in range(iterations):
            torch.manual_seed(step)  # the same probe vectors on every rank (and in the reference)
            optimizer.zero_grad()
            loss = -mll(model(train_x), train_y)
            loss.backward()  # hyperparameter gradients are summed over ranks inside
            optimizer.step()
        model.eval()
        with torch.no_grad(), gpytorch.settings.eval_cg_tolerance(1e-4):
            pred = model.likelihood(model(test_x))
    return loss.item(), pred.mean, pred.variance


def main():
    device = gpntk.distributed.initialize()  # under torchrun: joins the group; else nothing
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 6, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * torch.randn(800, generator=g, dtype=torch.float64)
    train_x, train_y, test_x = x[:600].to(device), y[:600].to(device), x[600:].to(device)

    # a group of rank 0 alone, for its single-process reference run (every rank must create it)
    alone = dist.new_group([0]) if dist.is_initialized() else None

    loss, mean, variance = fit_and_predict(train_x, train_y, test_x)
    if rank == 0:
        rmse = (mean - y[600:].to(device)).square().mean().sqrt().item()
        print(f"{world} process(es): final loss {loss:.4f}, test RMSE {rmse:.4f}")
        _, ref_mean, ref_variance = fit_and_predict(train_x, train_y, test_x, group=alone)
        difference = max((mean - ref_mean).abs().max().item(), (variance - ref_variance).abs().max().item())
        print(f"max abs difference from single process: {difference:.3g}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
