"""What the trained-ensemble-vs-posterior tests share (MLP: ``test_posterior_vs_training.py``,
CNN: ``test_posterior_vs_training_cnn.py``; the statistical argument is in the MLP file's docstring).

``run_study`` trains an ensemble and splits every trained output into the linearised
infinite-width prediction from the same initialisation and a finite-width deviation ``d``; the
``check_*`` functions are the assertions both files make on a study.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from gpntk.kernels.dense import nngp_and_ntk
from gpntk.posterior import TrainedEnsemble


def linearized_infinite(net, regime: str, train_x, train_y, eval_x, f0, learning_rate: float, t: float,
                        input_shape=None) -> Tensor:
    """Per network, ``f0(x) + G(x, X) G⁻¹(I − e^{−τG})(Y − f0(X))`` with the analytic kernel G.

    ``f0`` holds the networks' initial outputs on ``eval_x`` whose last ``n`` rows are ``train_x``.
    An independent evaluation of the infinite-width linear dynamics (not gpntk.posterior).
    """
    n, k = train_y.shape
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(net, eval_x, train_x, input_shape=input_shape)
        nngp_xx, ntk_xx = nngp_and_ntk(net, train_x, input_shape=input_shape)
    g_ex, g_xx = (ntk, ntk_xx) if regime == "ntk" else (nngp, nngp_xx)
    lam, vec = torch.linalg.eigh(g_xx)
    tau = learning_rate * t / (n * k)
    filt = -torch.expm1(-tau * lam) / lam
    gain = g_ex @ vec @ torch.diag(filt) @ vec.T  # (m, n)
    return f0 + torch.einsum("an,Nnk->Nak", gain, train_y - f0[:, -n:])


def compare(trained: Tensor, mean_inf: Tensor, var_inf: Tensor, allowance: Tensor, z: float) -> dict:
    """Per (point, output): errors of the ensemble's mean and standard deviation and their tolerances.

    ``trained (N, m, k)``; ``mean_inf (m, k)``; ``var_inf (m,)``; ``allowance (m, k)`` = rms(d);
    ``z`` standard errors are allowed. ``excess`` is error / tolerance (≤ 1 passes).
    """
    n_networks = trained.shape[0]
    mean_emp, var_emp = trained.mean(0), trained.var(0)
    sd_inf = var_inf.clamp_min(0).sqrt().unsqueeze(-1).expand_as(mean_emp)
    se_mean = (var_emp / n_networks).sqrt()
    se_sd = sd_inf / math.sqrt(2 * (n_networks - 1))
    mean_error = (mean_emp - mean_inf).abs()
    sd_error = (var_emp.sqrt() - sd_inf).abs()
    return {
        "z_mean": mean_error / se_mean,
        "z_sd": sd_error / se_sd,
        "var_ratio": var_emp / sd_inf.square(),
        "mean_excess": mean_error / (z * se_mean + allowance),
        "sd_excess": sd_error / (z * se_sd + allowance),
        "allowance_over_se": allowance / se_mean,
    }


def run_study(net, arch, regime: str, data: tuple[Tensor, Tensor, Tensor], train: Callable, *, width: int,
              n_networks: int, steps: tuple[int, ...], lr_fraction: float, input_shape=None) -> dict:
    """Train the ensemble of ``regime`` once (``train(arch, train_x, train_y, eval_x, n_networks=, width=,
    learning_rate=, steps=)`` returns ``(f0, {steps: outputs})``); everything the tests look at."""
    train_x, train_y, test_x = data
    eval_x = torch.cat([test_x, train_x])
    learning_rate = lr_fraction * TrainedEnsemble(net, train_x, train_y, input_shape=input_shape).max_learning_rate(
        regime
    )
    post = TrainedEnsemble(net, train_x, train_y, learning_rate=learning_rate, input_shape=input_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small products: one thread is fastest, and far faster on a busy machine
    try:
        f0, outputs = train(
            arch[regime],
            train_x,
            train_y,
            eval_x,
            n_networks=n_networks,
            width=width,
            learning_rate=learning_rate,
            steps=steps,
        )
    finally:
        torch.set_num_threads(threads)
    scale = (train_y - f0[:, -train_x.shape[0] :]).square().mean().sqrt().item()  # initial residual; d ∝ it
    result = {"post": post, "eval_x": eval_x, "f0": f0, "scale": scale, "lr": learning_rate, "times": {}}
    for t in steps:
        lin = linearized_infinite(net, regime, train_x, train_y, eval_x, f0, learning_rate, t, input_shape)
        result["times"][t] = {
            "trained": outputs[t],
            "linearized": lin,
            "allowance": (outputs[t] - lin).square().mean(0).sqrt(),  # rms(d) per (point, output)
        }
    return result


def _posterior(study: dict, t: float, regime: str) -> tuple[Tensor, Tensor]:
    return study["post"].moments(study["eval_x"], t, regime, diag=True)


def check_matches_posterior(study: dict, regime: str, z: float, n_test: int) -> None:
    """Every point: |mean_emp − μ_T| ≤ z·SE + rms(d) and |sd_emp − sqrt(Σ_T)| ≤ z·SE_sd + rms(d)."""
    for steps, r in study["times"].items():
        c = compare(r["trained"], *_posterior(study, steps, regime), r["allowance"], z)
        print(
            f"\n{regime} T={steps}: max |Δmean|/SE {c['z_mean'].max():.2f} (test {c['z_mean'][:n_test].max():.2f}), "
            f"var ratio emp/inf {c['var_ratio'].min():.3f}..{c['var_ratio'].max():.3f}, "
            f"max |Δsd|/SE {c['z_sd'].max():.2f}, allowance/SE ≤ {c['allowance_over_se'].max():.2f}, "
            f"max excess mean {c['mean_excess'].max():.2f} sd {c['sd_excess'].max():.2f}"
        )
        assert c["mean_excess"].max() <= 1, f"{regime} T={steps}: ensemble mean off: excess {c['mean_excess']}"
        assert c["sd_excess"].max() <= 1, f"{regime} T={steps}: ensemble spread off: excess {c['sd_excess']}"


def check_wrong_times_rejected(study: dict, regime: str, z: float) -> None:
    """The same check against the posterior at t = 2T and t = T/2 fails by a wide margin (excess > 2)."""
    for steps, r in study["times"].items():
        for wrong in (2 * steps, steps / 2):
            c = compare(r["trained"], *_posterior(study, wrong, regime), r["allowance"], z)
            worst = max(c["mean_excess"].max().item(), c["sd_excess"].max().item())
            print(f"\n{regime} T={steps} vs posterior at t={wrong:g}: worst excess {worst:.2f}")
            assert worst > 2, f"{regime}: posterior at t={wrong} not rejected for ensembles trained {steps} steps"


def check_linearized_matches_posterior(study: dict, regime: str, z: float) -> None:
    """The Monte Carlo part alone: linearised predictions match within z standard errors, no allowance."""
    for steps, r in study["times"].items():
        mean_inf, var_inf = _posterior(study, steps, regime)
        c = compare(r["linearized"], mean_inf, var_inf, torch.zeros_like(mean_inf), z)
        print(f"\n{regime} T={steps}: linearised max |Δmean|/SE {c['z_mean'].max():.2f} |Δsd|/SE {c['z_sd'].max():.2f}")
        assert c["mean_excess"].max() <= 1, c["z_mean"]
        assert c["sd_excess"].max() <= 1, c["z_sd"]


def check_allowance_small(study: dict, regime: str, width: int, median_bound: float, max_bound: float) -> None:
    """rms(d)·sqrt(width)/(initial residual) is O(1): below the given median and max bounds."""
    for steps, r in study["times"].items():
        constant = r["allowance"] * math.sqrt(width) / study["scale"]
        print(
            f"\n{regime} T={steps}: rms(d) max {r['allowance'].max():.4f} median {r['allowance'].median():.4f} "
            f"(initial residual {study['scale']:.2f}); rms(d)·sqrt(width)/scale median {constant.median():.2f} "
            f"max {constant.max():.2f}"
        )
        assert constant.median() < median_bound
        assert constant.max() < max_bound


def allowance_ratio(narrow: dict, wide: dict, steps: int) -> float:
    """rms over points of rms(d) of a narrower ensemble relative to a wider one (1/sqrt(width) scaling)."""
    a, b = narrow["times"][steps]["allowance"], wide["times"][steps]["allowance"]
    return (a.square().mean() / b.square().mean()).sqrt().item()


class PosteriorAgreementTests:
    """The tests both files run on their studies; a ``Test*`` subclass sets the study and the bounds."""

    z: float
    n_test: int
    width: int
    small_width: int
    steps: tuple[int, ...]
    allowance_bounds: tuple[float, float]  # median and max of rms(d)·sqrt(width)/scale

    def study(self, regime: str, width: int | None = None, n_networks: int | None = None, steps=None) -> dict:
        raise NotImplementedError

    @pytest.mark.parametrize("regime", ["ntk", "nngp"])
    def test_trained_ensemble_matches_posterior(self, regime):
        check_matches_posterior(self.study(regime), regime, self.z, self.n_test)

    @pytest.mark.parametrize("regime", ["ntk", "nngp"])
    def test_time_off_by_factor_two_is_rejected(self, regime):
        check_wrong_times_rejected(self.study(regime), regime, self.z)

    @pytest.mark.parametrize("regime", ["ntk", "nngp"])
    def test_linearized_ensemble_matches_posterior_without_allowance(self, regime):
        check_linearized_matches_posterior(self.study(regime), regime, self.z)

    @pytest.mark.parametrize("regime", ["ntk", "nngp"])
    def test_finite_width_allowance_is_small(self, regime):
        median_bound, max_bound = self.allowance_bounds
        check_allowance_small(self.study(regime), regime, self.width, median_bound, max_bound)

    @pytest.mark.parametrize("regime", ["ntk", "nngp"])
    def test_allowance_shrinks_like_inverse_sqrt_width(self, regime):
        """A narrower ensemble has rms(d) larger by about sqrt(width / small_width)."""
        first = self.steps[:1]
        ratio = allowance_ratio(self.study(regime, self.small_width, 200, first), self.study(regime), first[0])
        expected = math.sqrt(self.width / self.small_width)
        print(
            f"\n{regime} T={first[0]}: rms(d) width {self.small_width} / width {self.width} = {ratio:.2f} "
            f"(1/sqrt(width): {expected:.0f})"
        )
        assert 0.75 * expected < ratio < 1.35 * expected


def check_plain_training(
    model,
    f0: Tensor,
    trained: Tensor,
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    learning_rate: float,
    steps: int,
    n_trainable: int,
) -> Tensor:
    """Train one ``nn.Module`` by plain autograd gradient descent on ``1/(2nk)·‖f(X) − Y‖²`` and check
    its initial and final outputs on ``eval_x`` against ``f0`` and ``trained`` (a batched scheme's)."""
    n, k = train_y.shape
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == n_trainable
    with torch.no_grad():
        torch.testing.assert_close(model(eval_x), f0)
    for _ in range(steps):
        model.zero_grad()
        loss = (model(train_x) - train_y).square().sum() / (2 * n * k)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= learning_rate * p.grad
    with torch.no_grad():
        final = model(eval_x)
    torch.testing.assert_close(final, trained)
    return final
