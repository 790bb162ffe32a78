r"""The trained-ensemble posterior against ensembles of finite networks actually trained by gradient descent.

Four hundred ReLU networks of width 1024 (``net.finite(width)``, NTK parameterization, one hidden
layer, 3 inputs, 2 outputs) are each trained by plain full-batch gradient descent
``θ ← θ − lr·∇θ loss`` on ``loss = 1/(2nk)·‖f(X) − Y‖²`` (n = 8 points, k = 2 outputs), all on the
same data, from independent initialisations. The empirical mean and variance of their outputs at
test and training inputs after T steps are compared with ``TrainedEnsemble.moments(x, t=T)``:

* ``regime="ntk"``: every layer trained;
* ``regime="nngp"``: the hidden layer is built ``Dense(..., trainable=False)`` (its weights get
  ``requires_grad=False``), so only the readout is trained; compared with regime ``"nngp"`` of
  the all-trainable network with the same hyperparameters.

Tolerance. For every network the *linearised infinite-width* prediction from the same
initialisation, ``f_lin = f_0(x) + G(x, X) G⁻¹(I − e^{−τG})(Y − f_0(X))`` (G the analytic NTK or
NNGP, τ = lr·T/(nk), computed here independently of gpntk.posterior), splits each trained output
as ``f_T = f_lin + d``:

* ``f_lin`` is linear in ``f_0``, and for one hidden layer ``f_0`` has mean 0 and covariance
  exactly the NNGP at *any* width (the hidden pre-activations are exactly Gaussian), so the
  sample mean and standard deviation of ``f_lin`` differ from the posterior's only by Monte Carlo
  error: standard error ``sqrt(var/N)`` for the mean and ``sd/sqrt(2(N−1))`` for the standard
  deviation (``var·sqrt(2/(N−1))`` for the variance; Gaussian formula, ``f_0`` is Gaussian up to
  O(1/width) excess kurtosis). ``test_linearized_ensemble_matches_posterior_without_allowance``
  checks this part alone;
* ``d`` is the finite-width (and discrete-time) deviation. By Cauchy–Schwarz and Minkowski,
  *exactly for the samples*, ``|mean(d)| ≤ rms(d)`` and ``|sd(f_lin + d) − sd(f_lin)| ≤ rms(d)``.
  ``rms(d)`` is measured per point from the ensemble itself; it is O(1/sqrt(width)) (one network's
  kernel fluctuates by O(1/sqrt(width)) around the analytic one and moves by as much during
  training). ``test_finite_width_allowance_is_small`` checks that rms(d)·sqrt(width) is O(1)
  relative to the initial residual, and ``test_allowance_shrinks_like_inverse_sqrt_width`` that a
  width-256 ensemble has twice the rms(d) (measured: 1.99 and 2.05).

The allowance is what makes late times pass in the ``ntk`` regime: at T = 240 the trained
ensemble's mean at some *training* inputs is ~30 standard errors from μ_T (the posterior's
variance there has shrunk, and the finite networks' kernels have moved during training; the mean
of the linearised predictions, with the same initialisations, is within 3 SE), yet within rms(d).

So every point must satisfy ``|mean_emp − μ_T| ≤ Z·SE_mean + rms(d)`` and
``|sd_emp − sqrt(Σ_T)| ≤ Z·SE_sd + rms(d)``. The check can fail: evaluating the posterior at
t = 2T or T/2 (a time convention off by a factor 2, e.g. forgetting the k in n·k) is rejected by a
wide margin. Discrete gradient descent follows gradient flow for t = T steps because
lr = max_learning_rate/20, i.e. lr·λ_max/(nk) = 0.1 (the discrete-time factor (1 − z)^T differs
from e^{−zT} by at most z/(2e) ≈ 2 % of a residual component; this is inside rms(d) too).

The ensemble is trained as one computation: the networks built by ``net.finite`` have their
parameters stacked along a leading dimension and the same layer maps (``NTKLinear`` scaling,
``ElementwiseActivation`` function) applied with batched matrix products; one autograd call on the
sum of the per-network losses gives every network its own gradient. A test checks this against a
plain per-network training loop on the ``nn.Module`` itself. Networks run in float32 (their
statistical errors are ~1e-2), the posterior in float64. Everything is seeded (deterministic).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _ensemble_study import PosteriorAgreementTests, check_plain_training, run_study
from torch import nn

from gpntk import layers as L
from gpntk.core.finite import ElementwiseActivation, NTKLinear

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"

N_NETWORKS = 400
WIDTH = 1024
SMALL_WIDTH = 256  # a second, cheaper ensemble measures how the finite-width allowance scales
N_TRAIN, N_TEST, D, K = 8, 4, 3, 2
WEIGHT_VARIANCE, BIAS_VARIANCE = 2.0, 0.1
LR_FRACTION = 1 / 20  # of post.max_learning_rate(regime): lr·λmax/(nk) = 0.1
STEPS = (60, 240)  # τ·λmax = 6 and 24
Z = 4.0  # standard errors allowed (48 mean and 48 sd comparisons per regime)
CHUNK = 100  # networks trained together in one batched computation
DTYPE = torch.float64  # of the data and the posterior; the networks run in float32
REGIMES = ("ntk", "nngp")


# --- the data and the architectures -------------------------------------------------------------
def make_data(
    n_train: int = N_TRAIN, n_test: int = N_TEST, d: int = D, k: int = K, seed: int = 0, target_scale: float = 2.0
):
    """Gaussian inputs; targets of standard deviation ``target_scale`` (twice the prior's output
    scale, so that training moves the outputs well beyond the Monte Carlo noise)."""
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randn(n_train, d, generator=g, dtype=DTYPE)
    train_y = target_scale * torch.randn(n_train, k, generator=g, dtype=DTYPE)
    test_x = torch.randn(n_test, d, generator=g, dtype=DTYPE)
    return train_x, train_y, test_x


def architectures(
    activation: str = "relu", depth: int = 1, weight_variance=WEIGHT_VARIANCE, bias_variance=BIAS_VARIANCE
):
    """``(net, trained)``: the all-trainable MLP and, per regime, the architecture that is trained.

    For ``"nngp"`` every hidden ``Dense`` is frozen (``trainable=False``) and only the readout is
    trained; the posterior is always that of ``net`` with the regime's name.
    """
    net = L.mlp(depth, activation, weight_variance=weight_variance, bias_variance=bias_variance)
    act = net.layers[1]
    frozen = []
    for _ in range(depth):
        frozen += [L.Dense(weight_variance, bias_variance, trainable=False), act]
    frozen.append(L.Dense(weight_variance, bias_variance))
    return net, {"ntk": net, "nngp": L.serial(*frozen)}


# --- a batch of finite networks trained as one computation ---------------------------------------
def stack_networks(models: list[nn.Sequential]) -> list[tuple]:
    """The layers of identically structured ``net.finite()`` networks with parameters stacked on dim 0.

    Each entry is ``("affine", W (N, out, in), b (N, out) or None, weight scale, bias scale)`` or
    ``("act", fn)``. Stacked tensors keep the modules' ``requires_grad`` (frozen layers stay frozen).
    """
    layers = []
    for modules in zip(*[list(model) for model in models]):
        first = modules[0]
        if isinstance(first, NTKLinear):
            weight = torch.stack([m.weight.detach() for m in modules]).requires_grad_(first.weight.requires_grad)
            bias = None
            if first.bias is not None:
                bias = torch.stack([m.bias.detach() for m in modules]).requires_grad_(first.bias.requires_grad)
            scale = first.weight_std / math.sqrt(weight.shape[-1])
            layers.append(("affine", weight, bias, scale, first.bias_std))
        elif isinstance(first, ElementwiseActivation):
            layers.append(("act", first.fn))
        else:  # pragma: no cover - net.finite() of an MLP builds only these two
            raise TypeError(f"cannot batch {type(first).__name__}")
    return layers


def stacked_forward(layers: list[tuple], x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(N, n, k)`` of all networks on inputs ``x (n, d)``: NTKLinear.forward, batched."""
    h = x
    for layer in layers:
        if layer[0] == "affine":
            _, weight, bias, scale, bias_scale = layer
            h = torch.matmul(h, weight.transpose(-1, -2)) * scale
            if bias is not None:
                h = h + bias_scale * bias.unsqueeze(-2)
        else:
            h = layer[1](h)
    return h


def trainable(layers: list[tuple]) -> list[torch.Tensor]:
    return [p for layer in layers if layer[0] == "affine" for p in layer[1:3] if p is not None and p.requires_grad]


def train_ensemble(
    arch,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    *,
    n_networks: int,
    width: int,
    learning_rate: float,
    steps: tuple[int, ...],
    seed: int = 1,
    chunk: int = CHUNK,
    dtype: torch.dtype = torch.float32,
):
    """Train ``n_networks`` networks ``arch.finite(width)`` by full-batch GD; outputs on ``eval_x``.

    Returns ``(f0, {T: fT})`` with ``f0`` and each ``fT`` of shape ``(n_networks, len(eval_x), k)``
    in float64: the outputs at initialisation and after ``T`` steps of
    ``θ ← θ − lr·∇θ [1/(2nk)·‖f(X) − Y‖²]``.
    """
    n, k = train_y.shape
    gen = torch.Generator().manual_seed(seed)
    x, y, xe = train_x.to(dtype), train_y.to(dtype), eval_x.to(dtype)
    initial, trained = [], {t: [] for t in steps}
    for start in range(0, n_networks, chunk):
        models = [
            arch.finite(width, in_features=x.shape[1], out_features=k, generator=gen).to(dtype)
            for _ in range(min(chunk, n_networks - start))
        ]
        layers = stack_networks(models)
        params = trainable(layers)
        # the layers before the first trained one never change: their outputs are computed once
        first = next(
            i for i, layer in enumerate(layers) if any(torch.is_tensor(p) and p.requires_grad for p in layer[1:3])
        )
        with torch.no_grad():
            features, eval_features = stacked_forward(layers[:first], x), stacked_forward(layers[:first], xe)
            initial.append(stacked_forward(layers[first:], eval_features).double())
        for step in range(1, max(steps) + 1):
            out = stacked_forward(layers[first:], features)
            loss = (out - y).square().sum() / (2 * n * k)  # the sum of the per-network losses
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(learning_rate * g)
            if step in trained:
                with torch.no_grad():
                    trained[step].append(stacked_forward(layers[first:], eval_features).double())
    return torch.cat(initial), {t: torch.cat(v) for t, v in trained.items()}


@functools.lru_cache(maxsize=None)
def study(regime: str, width: int = WIDTH, n_networks: int = N_NETWORKS, steps: tuple[int, ...] = STEPS) -> dict:
    """Train the ensemble of ``regime`` once; everything the tests look at."""
    net, arch = architectures()
    return run_study(net, arch, regime, make_data(), train_ensemble, width=width, n_networks=n_networks,
                     steps=steps, lr_fraction=LR_FRACTION)


class TestPosteriorAgreement(PosteriorAgreementTests):
    """The MLP ensembles against the posterior (tests in ``_ensemble_study.PosteriorAgreementTests``)."""

    z, n_test, width, small_width, steps = Z, N_TEST, WIDTH, SMALL_WIDTH, STEPS
    allowance_bounds = (1.5, 8)

    def study(self, regime, width=None, n_networks=None, steps=None):
        return study(regime, width or WIDTH, n_networks or N_NETWORKS, steps or STEPS)


def test_batched_training_equals_plain_training_of_one_network():
    """The stacked computation is ordinary gradient descent on each ``nn.Module``."""
    train_x, train_y, test_x = make_data()
    eval_x = torch.cat([test_x, train_x])
    _, arch = architectures()
    steps, lr, width = 25, 0.2, 64
    for regime in REGIMES:
        f0, out = train_ensemble(arch[regime], train_x, train_y, eval_x, n_networks=3, width=width,
                                 learning_rate=lr, steps=(steps,), seed=7, chunk=3, dtype=torch.float64)
        gen = torch.Generator().manual_seed(7)
        for i in range(3):
            model = arch[regime].finite(width, in_features=D, out_features=train_y.shape[1], generator=gen).double()
            check_plain_training(model, f0[i], out[steps][i], train_x, train_y, eval_x, lr, steps,
                                 n_trainable=4 if regime == "ntk" else 2)
