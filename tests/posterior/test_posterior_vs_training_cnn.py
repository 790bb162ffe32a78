r"""The trained-ensemble posterior of a *convolutional* network against finite CNNs trained by gradient descent.

The architecture is a 1-D convolution (window 3, circular padding) with ReLU, global average
pooling and a dense readout,

    ``Conv(3, "circular", 2.0, 0.1) → ReLU → GlobalAvgPool → Dense(2.0, 0.1)``

on rows of 12 features read as channels-first ``(2, 6)`` tensors. Four hundred networks
``cnn.finite(256, input_shape=(2, 6), out_features=2)`` (NTK parameterization) are each trained by
plain full-batch gradient descent ``θ ← θ − lr·∇θ [1/(2nk)·‖f(X) − Y‖²]`` (n = 8 points, k = 2
outputs, lr = ``max_learning_rate(regime)``/20), all on the same data, from independent
initialisations, and the empirical mean and standard deviation of their outputs at 4 test and the
8 training inputs after T steps are compared with ``TrainedEnsemble.moments(x, t=T, regime)``:

* ``regime="ntk"``: every layer trained;
* ``regime="nngp"``: the convolution is built ``Conv(..., trainable=False)`` (``requires_grad=False``
  weights), only the readout is trained; compared with regime ``"nngp"`` of the all-trainable CNN.

The argument is that of ``tests/test_posterior_vs_training.py`` (one-hidden-layer MLP), whose
module docstring has it in full. Briefly: each network's output splits as ``f_T = f_lin + d`` with
``f_lin = f_0(x) + G(x, X) G⁻¹(I − e^{−τG})(Y − f_0(X))`` its linearised infinite-width prediction
from the same initialisation (G the analytic NTK or NNGP from ``nngp_and_ntk``, τ = lr·T/(nk),
computed here without gpntk.posterior). The network has one hidden layer, a convolution, whose
pre-activations at every (input, position) are linear in the Gaussian weights, hence exactly
jointly Gaussian at any width; after ReLU and pooling, the readout output ``f_0`` is a centred
Gaussian (conditionally on the hidden layer) whose covariance averages to exactly the NNGP. So
``f_lin`` differs from the posterior only by Monte Carlo error (standard errors ``sqrt(var/N)``
for the mean, ``sd/sqrt(2(N−1))`` for the standard deviation), and ``d`` is bounded *exactly for
the samples* by ``|mean(d)| ≤ rms(d)`` and ``|sd(f_lin + d) − sd(f_lin)| ≤ rms(d)`` (Cauchy–Schwarz,
Minkowski), with rms(d) — finite width and discrete time, O(1/sqrt(width)) — measured per point
from the ensemble. Every (point, output) must satisfy

    ``|mean_emp − μ_T| ≤ Z·SE_mean + rms(d)`` and ``|sd_emp − sqrt(Σ_T)| ≤ Z·SE_sd + rms(d)``,

Z = 4. As for the MLP, the allowance is what makes late times pass in the ``ntk`` regime: at
T = 240 the trained ensemble's mean at some training inputs is ~12 standard errors from μ_T (the
linearised ensemble's is within 2 SE), yet well within rms(d). Companion tests check the pieces:
the linearised ensemble alone matches within Z SE with no allowance; rms(d)·sqrt(width) is O(1)
relative to the initial residual; a width-64 ensemble has about twice the rms(d) of the width-256
one (1/sqrt(width)); and the check has power — the posterior at t = 2T or T/2 (a time convention
off by a factor 2) is rejected.

Times T = 120 and 240 steps (τ·λmax = 12 and 24): the negative control is weakest for
readout-only training at early times (at T = 60 the posterior at T/2 is rejected only by an excess
of ~2.1), so the earliest time is 120, where its worst excess is ~2.7.

Training is batched by hand: the parameters of the ``nn.Module`` networks are stacked along a
leading dimension and forward pass and gradients (written out: the model is small; ~3.5 times
faster here than ``torch.func.vmap`` of ``functional_call`` with autograd) are batched matrix
products over the stacked networks; a test checks the result against a plain per-network
autograd loop on the ``nn.Module`` itself (this also checks the patch extraction against
``NTKConv``). Networks run in float32 (statistical errors are ~1e-2), kernels and posterior in
float64. Everything is seeded (deterministic). Measured runtime of the file: 12-17 s
single-threaded (pytest, on a shared 2-core machine).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from _ensemble_study import PosteriorAgreementTests, check_plain_training, run_study
from torch import Tensor, nn

from gpntk import layers as L
from gpntk.core.finite import NTKConv, NTKLinear
from gpntk.kernels.dense import nngp_and_ntk

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

N_NETWORKS = 400
WIDTH = 256  # channels of the hidden convolution
SMALL_WIDTH = 64  # a second, cheaper ensemble measures how the finite-width allowance scales
INPUT_SHAPE = (2, 6)  # channels, positions: rows of 12 features
KERNEL_SIZE = 3
N_TRAIN, N_TEST, K = 8, 4, 2
WEIGHT_VARIANCE, BIAS_VARIANCE = 2.0, 0.1
LR_FRACTION = 1 / 20  # of post.max_learning_rate(regime): lr·λmax/(nk) = 0.1
STEPS = (120, 240)  # τ·λmax = 12 and 24
Z = 4.0  # standard errors allowed (48 mean and 48 sd comparisons per regime: 12 points, 2 outputs, 2 times)
CHUNK = 50  # networks trained together in one batched computation
DTYPE = torch.float64  # of the data, kernels and posterior; the networks run in float32
REGIMES = ("ntk", "nngp")


# --- the data and the architectures -------------------------------------------------------------
def make_data(seed: int = 0, target_scale: float = 2.0):
    """Gaussian inputs ``(n, 12)``; targets ``(n, K)`` of standard deviation ``target_scale``
    (about twice the prior's output scale, so training moves the outputs well beyond the noise)."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(INPUT_SHAPE)
    train_x = torch.randn(N_TRAIN, d, generator=g, dtype=DTYPE)
    train_y = target_scale * torch.randn(N_TRAIN, K, generator=g, dtype=DTYPE)
    test_x = torch.randn(N_TEST, d, generator=g, dtype=DTYPE)
    return train_x, train_y, test_x


def cnn(trainable_conv: bool = True):
    return L.serial(
        L.Conv(KERNEL_SIZE, padding="circular", weight_variance=WEIGHT_VARIANCE, bias_variance=BIAS_VARIANCE,
               trainable=trainable_conv),
        L.ReLU(),
        L.GlobalAvgPool(),
        L.Dense(WEIGHT_VARIANCE, BIAS_VARIANCE),
    )


def architectures():
    """``(net, trained)``: the all-trainable CNN (whose posterior is used in both regimes) and, per
    regime, the architecture whose finite networks are trained."""
    net = cnn()
    return net, {"ntk": net, "nngp": cnn(trainable_conv=False)}


# --- a batch of finite CNNs trained as one computation -------------------------------------------
def patches(x: Tensor) -> Tensor:
    """Rows ``(n, C·P)`` to circular windows ``(n, P, C·3)``: feature ``c·3 + j`` at position ``p`` is
    channel ``c`` at position ``p − 1 + j`` (mod P), the layout of ``NTKConv``'s fan-in."""
    x = x.reshape(x.shape[0], *INPUT_SHAPE)  # (n, C, P)
    windows = torch.stack([x.roll(1, -1), x, x.roll(-1, -1)], dim=-1)  # (n, C, P, 3)
    return windows.transpose(1, 2).flatten(2)


@dataclass
class StackedCNNs:
    """The parameters of identically built ``net.finite()`` CNNs, stacked on dim 0.

    ``h = s·U·patch + s_b·b`` (U ``(N, W, C·3)``, b ``(N, 1, W)``), ``φ = mean over positions of
    relu(h)``, ``f = s'·V·φ + s'_b·c`` (V ``(N, k, W)``, c ``(N, 1, k)``).
    """

    conv_weight: Tensor
    conv_bias: Tensor
    readout_weight: Tensor
    readout_bias: Tensor
    scales: tuple[float, float, float, float]  # s, s_b, s', s'_b
    conv_trainable: bool

    @classmethod
    def of(cls, models: list[nn.Module], dtype: torch.dtype) -> "StackedCNNs":
        convs, readouts = [], []
        for model in models:
            (conv,) = [m for m in model.modules() if isinstance(m, NTKConv)]
            (readout,) = [m for m in model.modules() if isinstance(m, NTKLinear) and m is not conv.linear]
            (window,) = conv.windows
            assert (window.size, window.stride, window.circular) == (KERNEL_SIZE, 1, True)
            convs.append(conv.linear)
            readouts.append(readout)
        first, last = convs[0], readouts[0]

        def stack(tensors):
            return torch.stack([t.detach() for t in tensors]).to(dtype)

        return cls(
            stack([c.weight for c in convs]),
            stack([c.bias for c in convs]).unsqueeze(1),
            stack([r.weight for r in readouts]),
            stack([r.bias for r in readouts]).unsqueeze(1),
            (first.weight_std / math.sqrt(first.weight.shape[1]), first.bias_std,
             last.weight_std / math.sqrt(last.weight.shape[1]), last.bias_std),
            first.weight.requires_grad,
        )

    def hidden(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activation signs ``(N, n, P, W)`` and pooled features ``φ (N, n, W)`` of ``patches(x)``."""
        s, s_b, _, _ = self.scales
        n, positions, fan_in = windows.shape
        pre = torch.matmul(windows.reshape(n * positions, fan_in), self.conv_weight.transpose(1, 2))
        pre = pre.mul_(s).add_(self.conv_bias, alpha=s_b).view(-1, n, positions, pre.shape[-1])
        active = pre > 0
        return active, pre.clamp_(min=0).mean(2)

    def readout(self, features: Tensor) -> Tensor:
        _, _, s, s_b = self.scales
        return torch.baddbmm(self.readout_bias * s_b, features, self.readout_weight.transpose(1, 2), alpha=s)

    def __call__(self, windows: Tensor) -> Tensor:
        """Outputs ``(N, n, k)`` of every network."""
        return self.readout(self.hidden(windows)[1])

    def step(self, windows: Tensor, targets: Tensor, learning_rate: float, features=None) -> None:
        """One gradient-descent step of every network on ``1/(2nk)·‖f(X) − Y‖²``.

        With ``r = (f − Y)/(nk)``: ``∂/∂V = s'·rᵀφ``, ``∂/∂c = s'_b·Σ_i r_i``, ``∂/∂φ = s'·rV``,
        ``∂/∂h = 1[h > 0]·(∂/∂φ)/P`` at every position, ``∂/∂U = s·Σ_{i,p} (∂/∂h)ᵀ patch``,
        ``∂/∂b = s_b·Σ_{i,p} ∂/∂h``. ``features`` (φ of a frozen convolution) skips the hidden layer.
        """
        s, s_b, s_out, s_out_b = self.scales
        n, k = targets.shape
        if features is None:
            active, features = self.hidden(windows)
        residual = (self.readout(features) - targets) / (n * k)  # (N, n, k)
        grad_readout_weight = s_out * torch.bmm(residual.transpose(1, 2), features)
        grad_readout_bias = s_out_b * residual.sum(1, keepdim=True)
        if self.conv_trainable:
            positions = windows.shape[1]
            grad_features = torch.bmm(residual, self.readout_weight).mul_(s_out / positions)  # (N, n, W)
            grad_pre = (active * grad_features.unsqueeze(2)).flatten(1, 2)  # (N, n·P, W)
            grad_conv_weight = s * torch.matmul(grad_pre.transpose(1, 2), windows.flatten(0, 1))
            self.conv_weight.sub_(learning_rate * grad_conv_weight)
            self.conv_bias.sub_((learning_rate * s_b) * grad_pre.sum(1, keepdim=True))
        self.readout_weight.sub_(learning_rate * grad_readout_weight)
        self.readout_bias.sub_(learning_rate * grad_readout_bias)


def train_ensemble(
    arch,
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    *,
    n_networks: int,
    width: int,
    learning_rate: float,
    steps: tuple[int, ...],
    seed: int = 1,
    chunk: int = CHUNK,
    dtype: torch.dtype = torch.float32,
):
    """Train ``n_networks`` CNNs ``arch.finite(width)`` by full-batch GD; outputs on ``eval_x``.

    Returns ``(f0, {T: fT})``, each ``(n_networks, len(eval_x), k)`` in float64: the outputs at
    initialisation and after ``T`` steps of ``θ ← θ − lr·∇θ [1/(2nk)·‖f(X) − Y‖²]``.
    """
    k = train_y.shape[1]
    gen = torch.Generator().manual_seed(seed)
    windows, eval_windows, y = patches(train_x.to(dtype)), patches(eval_x.to(dtype)), train_y.to(dtype)
    initial, trained = [], {t: [] for t in steps}
    with torch.no_grad():
        for start in range(0, n_networks, chunk):
            models = [
                arch.finite(width, input_shape=INPUT_SHAPE, out_features=k, generator=gen)
                for _ in range(min(chunk, n_networks - start))
            ]
            nets = StackedCNNs.of(models, dtype)
            frozen = None if nets.conv_trainable else (nets.hidden(windows)[1], nets.hidden(eval_windows)[1])
            initial.append(nets(eval_windows).double())
            for step in range(1, max(steps) + 1):
                nets.step(windows, y, learning_rate, None if frozen is None else frozen[0])
                if step in trained:
                    out = nets(eval_windows) if frozen is None else nets.readout(frozen[1])
                    trained[step].append(out.double())
    return torch.cat(initial), {t: torch.cat(v) for t, v in trained.items()}


@functools.lru_cache(maxsize=None)
def study(regime: str, width: int = WIDTH, n_networks: int = N_NETWORKS, steps: tuple[int, ...] = STEPS) -> dict:
    """Train the ensemble of ``regime`` once; everything the tests look at."""
    net, arch = architectures()
    return run_study(net, arch, regime, make_data(), train_ensemble, width=width, n_networks=n_networks,
                     steps=steps, lr_fraction=LR_FRACTION, input_shape=INPUT_SHAPE)


# --- the tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
def test_learning_rate_is_a_twentieth_of_the_stability_limit(regime):
    """``max_learning_rate`` is 2nk/λmax of the analytic training kernel: lr·λmax/(nk) = 0.1."""
    train_x, train_y, _ = make_data()
    net, _ = architectures()
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(net, train_x, input_shape=INPUT_SHAPE)
    lam_max = torch.linalg.eigvalsh(ntk if regime == "ntk" else nngp)[-1].item()
    lr = study(regime)["lr"]
    assert lr * lam_max / (N_TRAIN * K) == pytest.approx(0.1, rel=1e-10)


class TestPosteriorAgreement(PosteriorAgreementTests):
    """The CNN ensembles against the posterior (tests in ``_ensemble_study.PosteriorAgreementTests``)."""

    z, n_test, width, small_width, steps = Z, N_TEST, WIDTH, SMALL_WIDTH, STEPS
    allowance_bounds = (1, 2)

    def study(self, regime, width=None, n_networks=None, steps=None):
        return study(regime, width or WIDTH, n_networks or N_NETWORKS, steps or STEPS)


def test_batched_training_equals_plain_training_of_one_network():
    """The stacked computation is ordinary gradient descent on each ``nn.Module`` (autograd, one
    network at a time): same initial outputs, same outputs after training, in float64."""
    train_x, train_y, test_x = make_data()
    eval_x = torch.cat([test_x, train_x])
    _, arch = architectures()
    steps, lr, width, n_networks = 25, 0.5, 16, 3
    n, k = train_y.shape
    for regime in REGIMES:
        f0, out = train_ensemble(arch[regime], train_x, train_y, eval_x, n_networks=n_networks, width=width,
                                 learning_rate=lr, steps=(steps,), seed=7, chunk=2, dtype=torch.float64)
        gen = torch.Generator().manual_seed(7)
        for i in range(n_networks):
            model = arch[regime].finite(width, input_shape=INPUT_SHAPE, out_features=k, generator=gen).double()
            trained = check_plain_training(model, f0[i], out[steps][i], train_x, train_y, eval_x, lr, steps,
                                           n_trainable=4 if regime == "ntk" else 2)
            assert (trained - f0[i]).abs().max() > 0.1  # training moved the outputs
