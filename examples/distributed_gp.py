"""An NTK exact GP whose kernel matrices are divided among processes (gpntk.distributed).

    python examples/distributed_gp.py                              # one process
    torchrun --nproc_per_node=2 examples/distributed_gp.py         # two processes (gloo on CPU, NCCL on GPUs)

Every rank holds the same data and runs the same program; each computes only its tiles of the
kernel matrices, and GPyTorch's CG runs the same iterations on every rank. Rank 0 then fits the
same model with the plain kernel in one process and prints, last, the largest difference of the
predictions (mean and variance). With one process the two runs are the same computation (0.0);
with several, products are summed in another order, and the CG iterates (which GPyTorch stops
at a tolerance of 1e-4 here) carry those round-off differences.
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


def fit_and_predict(train_x, train_y, test_x, sharded, iterations=10):
    net = L.mlp(depth=2, activation="relu", weight_variance=2.0, bias_variance=0.1)
    covar = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net))
    model = GP(train_x, train_y, ShardedKernel(covar) if sharded else covar).to(train_x)
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

    loss, mean, variance = fit_and_predict(train_x, train_y, test_x, sharded=True)
    if rank == 0:
        rmse = (mean - y[600:].to(device)).square().mean().sqrt().item()
        print(f"{world} process(es): final loss {loss:.4f}, test RMSE {rmse:.4f}")
        _, ref_mean, ref_variance = fit_and_predict(train_x, train_y, test_x, sharded=False)
        difference = max((mean - ref_mean).abs().max().item(), (variance - ref_variance).abs().max().item())
        print(f"max abs difference from single process: {difference:.3g}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
