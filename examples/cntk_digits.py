"""The CNTK of a small CNN as a classifier of scikit-learn's 8×8 digits, next to the MLP NTK and a finite CNN.

    python examples/cntk_digits.py           # about 35 s on a 2-core CPU (the test suite runs it)
    python examples/cntk_digits.py --full    # 1000 training images: about 12 minutes, a better number

Every image is a row of 64 pixels (channels first: ``input_shape=(1, 8, 8)``). Three classifiers
see the same stratified train/test split, with one-hot targets and class = argmax of the output:

* the infinite ensemble of CNNs trained by gradient descent, ``gpntk.TrainedEnsemble(cnn, ...)``
  in the ``"ntk"`` regime, at ``t = inf`` (kernel regression with the CNTK) and after as many
  steps as the finite network below is trained for;
* the same for a ReLU MLP at ``t = inf`` (``L.mlp``, vectors, no ``input_shape``);
* one finite CNN of the same architecture, ``cnn.finite(width, ...)`` (NTK parameterization),
  trained by full-batch gradient descent on the same mean squared error.

Prints a table of test accuracy, training loss (expected over the ensemble for the infinite
ones) and wall-clock time per method.

Cost: with a pooling layer at the end the CNTK carries a covariance for every pair of spatial
positions, P² numbers per pair of images (P = 64 pixels: 4096). The first convolution has stride
2, so its output, the nonlinearities and the second convolution live on 4×4 positions (P² = 256);
only the input covariance and the first convolution work on 8×8. That makes the CNTK three to
four times cheaper than with a stride-1 first layer (measured on one idle CPU core: 0.17 instead of
0.6 ms per pair of images), which keeps this script short enough for the test suite.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

import gpntk
from gpntk import layers as L

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
SEED = 0
#: gradient descent learning rate as a fraction of the largest stable one, 2nk/λmax(CNTK)
LEARNING_RATE_FRACTION = 0.8


@dataclass(frozen=True)
class Sizes:
    train: int  # training images
    test: int  # test images
    width: int  # channels of the finite CNN
    steps: int  # full-batch gradient descent steps of the finite CNN (and the finite-t ensemble)


#: the default keeps the whole script well under a minute on two CPU cores (it runs in the tests)
QUICK = Sizes(train=200, test=300, width=64, steps=400)
#: ``--full``: 1000 training images and every remaining image as the test set
FULL = Sizes(train=1000, test=797, width=64, steps=1000)


def cnn() -> L.Layer:
    """Conv(3, stride 2) → ReLU → Conv(3) → ReLU → global average pooling → Dense readout."""
    return L.serial(
        L.Conv(3, stride=2, weight_variance=2.0, bias_variance=0.05),
        L.ReLU(),
        L.Conv(3, weight_variance=2.0, bias_variance=0.05),
        L.ReLU(),
        L.GlobalAvgPool(),
        L.Dense(2.0, 0.05),
    )


def mlp() -> L.Layer:
    """Two hidden ReLU layers and a readout, on the 64 pixels as a vector."""
    return L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.05)


def load_split(sizes: Sizes) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardized images (float64 rows of 64 pixels) and labels, split with a fixed seed.

    Pixels are 0..16; each image is centred and scaled to unit variance over its own pixels. The
    kernels of ReLU networks depend on the input norms as well as the angles between inputs, and
    images differ in how much ink they hold; after standardization every image has the same norm,
    so the kernels compare shapes, not stroke thickness (it also puts the inputs on the scale the
    weight variance 2 of a ReLU network is made for). Standardizing each image on its own uses no
    statistics of the test set.
    """
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(), train_size=sizes.train, test_size=sizes.test,
        random_state=SEED, stratify=labels.numpy(),
    )
    return x[train], labels[train], x[test], labels[test]


def one_hot_targets(labels: Tensor) -> Tensor:
    """One-hot targets shifted by -1/10 (0.9 for the class, -0.1 elsewhere).

    Each row then sums to zero: the outputs do not have to fit a common offset of 1/10 that carries
    no information about the class, and a test point unlike every training image, whose prediction
    shrinks towards the prior mean 0, gets no class preferred. The argmax is unchanged by the shift.
    """
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).double() - 1 / NUM_CLASSES


def accuracy(outputs: Tensor, labels: Tensor) -> float:
    return (outputs.argmax(-1) == labels).double().mean().item()


def ensemble_means(post: gpntk.TrainedEnsemble, test_x: Tensor, times: Tensor) -> Tensor:
    """The ensemble's mean outputs ``(T, m, k)`` at ``test_x`` for each time.

    ``post.mean`` needs only the test-by-train kernel; ``moments`` would also compute the
    covariance between all pairs of test images (P² numbers each for the CNN).
    """
    with torch.no_grad():
        return post.mean(test_x, times, regime="ntk")


def train_finite_cnn(
    net: L.Layer, sizes: Sizes, train_x: Tensor, train_y: Tensor, test_x: Tensor, learning_rate: float
) -> tuple[float, Tensor]:
    """Train ``net.finite(width)`` by full-batch gradient descent; returns (final training loss, test outputs).

    The loss is ``mean((f - Y)²) / 2``, i.e. ‖f(X) - Y‖² / (2nk), the loss whose gradient flow
    ``TrainedEnsemble`` describes, so ``learning_rate`` and ``steps`` mean the same for both.
    float32 for speed.
    """
    generator = torch.Generator().manual_seed(SEED)
    model = net.finite(sizes.width, input_shape=INPUT_SHAPE, out_features=NUM_CLASSES, generator=generator)
    x, y = train_x.float(), train_y.float()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    for _ in range(sizes.steps):
        optimizer.zero_grad()
        loss = 0.5 * (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final_loss = 0.5 * (model(x) - y).square().mean().item()
        return final_loss, model(test_x.float()).double()


Row = tuple[str, float, float, float]  # method, test accuracy, training loss, seconds (nan: counted above)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--full", action="store_true", help=f"use {FULL.train} training images (minutes)")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    sizes = FULL if args.full else QUICK

    train_x, train_labels, test_x, test_labels = load_split(sizes)
    train_y = one_hot_targets(train_labels)
    print(f"digits: {len(train_x)} training and {len(test_x)} test images of 8x8 pixels, 10 classes")
    rows: list[Row] = []

    # MLP NTK: vectors, cheap (one number per pair of images).
    start = time.perf_counter()
    mlp_post = gpntk.TrainedEnsemble(mlp(), train_x, train_y, learning_rate=1.0, diag_reg=1e-4)
    mlp_mean = ensemble_means(mlp_post, test_x, torch.tensor([math.inf]))[0]
    mlp_loss = mlp_post.train_loss(math.inf).item()
    rows.append(("MLP NTK ensemble, t = inf", accuracy(mlp_mean, test_labels), mlp_loss, time.perf_counter() - start))

    # CNTK. Gradient descent runs at 0.8 times the stable edge 2nk/λmax of the CNTK's training
    # matrix (the finite network's own tangent kernel fluctuates around the CNTK, so not closer);
    # with learning_rate=1 in the constructor, `steps` steps at rate η are the time t = η·steps.
    net = cnn()
    start = time.perf_counter()
    cnn_post = gpntk.TrainedEnsemble(net, train_x, train_y, learning_rate=1.0, diag_reg=1e-4, input_shape=INPUT_SHAPE)
    learning_rate = LEARNING_RATE_FRACTION * cnn_post.max_learning_rate()
    times = torch.tensor([learning_rate * sizes.steps, math.inf], dtype=torch.float64)
    finite_t_mean, inf_mean = ensemble_means(cnn_post, test_x, times)
    finite_t_loss, inf_loss = cnn_post.train_loss(times).tolist()
    cntk_time = time.perf_counter() - start
    rows.append(("CNTK ensemble, t = inf", accuracy(inf_mean, test_labels), inf_loss, cntk_time))
    rows.append((f"CNTK ensemble, {sizes.steps} steps", accuracy(finite_t_mean, test_labels), finite_t_loss, math.nan))

    start = time.perf_counter()
    cnn_loss, outputs = train_finite_cnn(net, sizes, train_x, train_y, test_x, learning_rate)
    rows.append(
        (f"CNN width {sizes.width}, {sizes.steps} GD steps", accuracy(outputs, test_labels), cnn_loss,
         time.perf_counter() - start)
    )

    print(
        f"gradient descent: learning rate {learning_rate:.3g} ({LEARNING_RATE_FRACTION} of the stable edge), "
        f"{sizes.steps} steps"
    )
    print(f"{'method':<34s} {'test accuracy':>13s} {'train loss':>10s} {'time (s)':>9s}")
    for name, acc, loss, seconds in rows:
        shown = "(above)" if math.isnan(seconds) else f"{seconds:.1f}"
        print(f"{name:<34s} {acc:13.3f} {loss:10.2e} {shown:>9s}")
    return rows


if __name__ == "__main__":
    main()
