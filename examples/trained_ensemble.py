"""Training curves and predictive uncertainty of an infinite ensemble over training time.

    python examples/trained_ensemble.py

Prints the expected training loss, the test error of the ensemble mean and the mean predictive
standard deviation at 50 training times (one eigendecomposition, reused for every time).
"""

import math

import torch

import gpntk
from gpntk import layers as L


def main():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=torch.float64)) + 0.05 * torch.randn(120, generator=g, dtype=torch.float64)
    train_x, train_y, test_x, test_y = x[:80], y[:80], x[80:], y[80:]
    net = L.mlp(depth=3, activation="gelu", weight_variance=2.0, bias_variance=0.1)
    post = gpntk.TrainedEnsemble(net, train_x, train_y, learning_rate=0.5, diag_reg=1e-4)
    print(f"largest stable learning rate: {post.max_learning_rate():.3f}")
    times = torch.cat([torch.logspace(-1, 5, 49, dtype=torch.float64), torch.tensor([math.inf], dtype=torch.float64)])
    means, covs = post.moments(test_x, times, regime="ntk")
    losses = post.train_loss(times, regime="ntk")
    print(f"{'t':>10s} {'train loss':>11s} {'test RMSE':>10s} {'mean σ':>8s}")
    for i in range(0, len(times), 7):
        rmse = (means[i] - test_y).square().mean().sqrt().item()
        sd = covs[i].diagonal().clamp_min(0).sqrt().mean().item()
        print(f"{times[i].item():10.3g} {losses[i].item():11.5f} {rmse:10.4f} {sd:8.4f}")


if __name__ == "__main__":
    main()
