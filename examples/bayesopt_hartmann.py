"""Bayesian optimisation of Hartmann-6 with trained network ensembles as BoTorch models.

    python examples/bayesopt_hartmann.py            # quick: 2 seeds, 4 iterations, tiny optimiser budget
    python examples/bayesopt_hartmann.py --full     # 8 seeds, 40 iterations (the docs' numbers)
    python examples/bayesopt_hartmann.py --seeds 4 --iterations 20 --figure hartmann.png

Maximises the negated Hartmann-6 function (optimum 3.32237) from 10 Sobol points, one
``LogExpectedImprovement`` point per iteration (``optimize_acqf``), with five models refitted every
iteration on all the data so far:

* ``NTK ensemble, t = inf``: ``gpntk.botorch.TrainedEnsembleModel(regime="ntk", t=math.inf)``,
  the ensemble of infinitely wide ReLU networks (``mlp(2, "relu")``) trained to convergence:
  mean = ridgeless NTK regression, covariance from the NNGP prior of the initial networks;
* ``NTK ensemble, t = 20``: the same ensemble stopped after 20 gradient-descent steps
  (learning rate 1; the leading kernel directions are fitted, the small ones not);
* ``NNGP ensemble, t = inf``: only the readout trained (regime ``"nngp"``), i.e. the exact NNGP GP
  posterior without noise;
* ``InfiniteWidthBNNKernel``: BoTorch's ``SingleTaskGP`` with its own infinite-width kernel (NNGP
  of a depth-3 ReLU network, fitted weight/bias variances and noise);
* ``Matern-5/2``: ``SingleTaskGP`` with ``ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=6))``;
* (``--methods ntk_gp``) ``SingleTaskGP`` with ``ScaleKernel(Centered(NTKKernel(default_priors(mlp(2, "relu")))))``,
  σw², σb², output scale and noise fitted (the default log-normal priors make them identifiable);
  the last fitted values are printed.

The ensembles see ``Normalize`` followed by ``gpntk.botorch.Center`` (inputs in ``[-1, 1]^6``) and
``Standardize``-d outcomes; their network hyperparameters are fixed (σw² = 2, σb² = 0.1: He
initialisation), ``--fit`` fits them every iteration by the marginal likelihood of the matching
NTK/NNGP GP (``gpntk.botorch.fit_network``, with ``gpntk.layers.default_priors``). The GPs see ``Normalize``-d inputs and
``Standardize``-d outcomes, hyperparameters by ``fit_gpytorch_mll``. Everything is float64. The
script prints the mean log10 regret (± standard error over seeds) and saves a regret plot.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.kernels import InfiniteWidthBNNKernel
from botorch.models.transforms.input import ChainedInputTransform, Normalize
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Hartmann
from botorch.utils.sampling import draw_sobol_samples
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood

import gpntk
from gpntk import layers as L
from gpntk.botorch import Center, TrainedEnsembleModel, fit_network
from gpntk.kernels import Centered

DTYPE = torch.float64
PROBLEM = Hartmann(dim=6, negate=True, dtype=DTYPE)
D = PROBLEM.dim
BOUNDS = PROBLEM.bounds
OPTIMUM = float(PROBLEM.optimal_value)
FINITE_T = 20.0

METHODS = {
    "ntk_inf": "NTK ensemble, t = inf",
    "ntk_t": f"NTK ensemble, t = {FINITE_T:g}",
    "nngp_inf": "NNGP ensemble, t = inf",
    "bnn": "InfiniteWidthBNNKernel GP",
    "matern": "Matern-5/2 GP",
    "ntk_gp": "ScaleKernel(NTK) GP",
}
#: run without --methods (the NTK GP is compared in examples/bayesopt_botorch.py; --methods ntk_gp adds it)
DEFAULT_METHODS = ("ntk_inf", "ntk_t", "nngp_inf", "bnn", "matern")


def network():
    """mlp(2, "relu"), σw² = 2, σb² = 0.1; when fitted, each variance stays >= 1e-6.

    The lower bound matters with log-normal priors: with the default positive constraint a line
    search step can drive σb² to exactly 0 (softplus underflow), where the prior's log density fails.
    """
    return L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1,
                 weight_variance_constraint=GreaterThan(1e-6), bias_variance_constraint=GreaterThan(1e-6))


def centring() -> ChainedInputTransform:
    return ChainedInputTransform(normalize=Normalize(D, bounds=BOUNDS), center=Center(D))


def ensemble(X, Y, t: float, regime: str, fit: bool, fitted_values: list):
    net = network()
    if fit:  # log-normal priors centred on σw² = 2, σb² = 0.1 keep tiny designs from an all-noise fit
        fitted = fit_network(X, Y, L.default_priors(net), kernel="nngp" if regime == "nngp" else "ntk",
                             input_transform=centring(), outcome_transform=Standardize(m=1))
        net = fitted.net
        fitted_values.append(fitted.hyperparameters)
    return TrainedEnsembleModel(X, Y, net, t=t, regime=regime, input_transform=centring(),
                                outcome_transform=Standardize(m=1))


def gp(X, Y, covar):
    model = SingleTaskGP(X, Y, covar_module=covar, input_transform=Normalize(D, bounds=BOUNDS),
                         outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def ntk_gp(X, Y, fitted_values: list):
    """SingleTaskGP with ScaleKernel(Centered(NTKKernel)): σw², σb², output scale and noise fitted.

    ``L.default_priors`` puts log-normal priors centred on σw² = 2, σb² = 0.1 on the network's
    variances, which makes σw², σb² and the output scale identifiable (without them only their
    product is: fits wander to σw² ~ 1e3 with an output scale ~ 1e-9).
    """
    ntk = gpntk.NTKKernel(L.default_priors(network()))
    covar = ScaleKernel(Centered(ntk))
    model = gp(X, Y, covar)
    fitted_values.append({
        "weight_variance": ntk.weight_variance.item(), "bias_variance": ntk.bias_variance.item(),
        "outputscale": covar.outputscale.item(), "noise": model.likelihood.noise.item(),
    })
    return model


def build(method: str, X, Y, fit: bool, fitted_values: list):
    if method == "ntk_inf":
        return ensemble(X, Y, math.inf, "ntk", fit, fitted_values)
    if method == "ntk_t":
        return ensemble(X, Y, FINITE_T, "ntk", fit, fitted_values)
    if method == "nngp_inf":
        return ensemble(X, Y, math.inf, "nngp", fit, fitted_values)
    if method == "ntk_gp":
        return ntk_gp(X, Y, fitted_values)
    if method == "bnn":
        return gp(X, Y, InfiniteWidthBNNKernel(depth=3))
    return gp(X, Y, ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=D)))


def run(method: str, seed: int, n_init: int, iterations: int, opt: dict, fit: bool, fitted_values: list):
    """The best value after the initial design and after each iteration, ``(iterations + 1,)``."""
    torch.manual_seed(seed)
    X = draw_sobol_samples(bounds=BOUNDS, n=n_init, q=1, seed=seed).squeeze(-2)
    Y = PROBLEM(X).unsqueeze(-1)
    best = [Y.max().item()]
    for _ in range(iterations):
        model = build(method, X, Y, fit, fitted_values)
        acqf = LogExpectedImprovement(model, best_f=Y.max())
        candidate, _ = optimize_acqf(acqf, bounds=BOUNDS, q=1, **opt)
        X = torch.cat([X, candidate])
        Y = torch.cat([Y, PROBLEM(candidate).unsqueeze(-1)])
        best.append(Y.max().item())
    return torch.tensor(best, dtype=DTYPE)


def log_regret(best: torch.Tensor) -> torch.Tensor:
    return torch.log10((OPTIMUM - best).clamp_min(1e-12))


def save_figure(results: dict, n_init: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, best in results.items():
        regret = log_regret(best)
        it = torch.arange(regret.shape[1])
        mean = regret.mean(0)
        se = regret.std(0) / math.sqrt(regret.shape[0]) if regret.shape[0] > 1 else torch.zeros_like(mean)
        line, = ax.plot(it, mean, label=label)
        ax.fill_between(it, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    seeds = next(iter(results.values())).shape[0]
    ax.set_xlabel(f"iteration (after {n_init} Sobol points)")
    ax.set_ylabel("log10 regret of the best value")
    ax.set_title(f"Hartmann-6, LogEI, mean ± s.e. over {seeds} seeds")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--full", action="store_true", help="8 seeds, 40 iterations, the full optimiser budget")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--init", type=int, default=10, help="Sobol initial points")
    parser.add_argument("--fit", action="store_true", help="fit the ensembles' σw², σb² by the matching GP")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, of " + ",".join(METHODS))
    parser.add_argument("--figure", default="bayesopt-hartmann.png")
    args, _ = parser.parse_known_args(argv)  # tolerate a test runner's argv

    seeds = args.seeds or (8 if args.full else 2)
    iterations = args.iterations or (40 if args.full else 4)
    opt = dict(num_restarts=8, raw_samples=256) if args.full else dict(num_restarts=2, raw_samples=32)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")

    results = {}
    fitted_values: dict[str, list] = {method: [] for method in methods}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in methods:
            t0 = time.perf_counter()
            results[METHODS[method]] = torch.stack(
                [run(method, s, args.init, iterations, opt, args.fit, fitted_values[method]) for s in range(seeds)]
            )
            print(f"{METHODS[method]:<26}: {seeds} seeds x {iterations} iterations in {time.perf_counter() - t0:.1f} s")

    print(f"\nHartmann-6 (negated, optimum {OPTIMUM:.5f}), {args.init} Sobol points + {iterations} LogEI "
          f"iterations, {seeds} seeds, optimize_acqf {opt}; mean log10 regret ± s.e.:")
    print(f"{'iter':>5}" + "".join(f"{c:>28}" for c in results))
    step = max(1, iterations // 8)
    for i in list(range(0, iterations + 1, step)) + ([iterations] if iterations % step else []):
        row = f"{i:>5}"
        for best in results.values():
            regret = log_regret(best[:, i])
            se = regret.std().item() / math.sqrt(seeds) if seeds > 1 else 0.0
            row += f"{regret.mean().item():>20.2f} ± {se:<5.2f}"
        print(row)
    for method, values in fitted_values.items():
        if values:  # the last seed's final fit
            print(f"\n{METHODS[method]}, last fitted hyperparameters: "
                  + ", ".join(f"{k} = {v:.4g}" for k, v in values[-1].items()))
    save_figure(results, args.init, args.figure)
    print(f"\nsaved {args.figure}; total {time.perf_counter() - start:.1f} s")
    kinds: dict[str, int] = {}
    for w in caught:
        key = f"{w.category.__name__}: {str(w.message)[:90]}"
        kinds[key] = kinds.get(key, 0) + 1
    for key, count in kinds.items():
        print(f"warning x{count}: {key}")


if __name__ == "__main__":
    main()
