"""Bayesian optimisation with BoTorch: an NTK kernel against BoTorch's default kernel.

    python examples/bayesopt_botorch.py                      # quick: Branin 2-D, 2 seeds, 8 iterations
    python examples/bayesopt_botorch.py --full               # Hartmann 6-D, 10 seeds, 30 iterations
    python examples/bayesopt_botorch.py --function hartmann6 --seeds 5 --iterations 20 --figure bo.png

Maximises a standard test function from ``botorch.test_functions`` (negated, as BoTorch does, so
that larger is better) with a Sobol initial design followed by one ``qLogExpectedImprovement``
point per iteration.  Every iteration refits a ``SingleTaskGP`` (inputs ``Normalize``-d to the unit
cube, outcomes ``Standardize``-d, hyperparameters by ``fit_gpytorch_mll``) with

* (a) BoTorch's default covariance (an RBF kernel with ARD lengthscales and dimension-scaled
  priors), and
* (b) ``ScaleKernel(NTKKernel(mlp(2, "relu")))``: the neural tangent kernel of an infinitely wide
  two-hidden-layer ReLU network, with learnt σw², σb² and output scale.

The NTK is not translation invariant: it depends on the norms of the inputs and the angles between
them.  On the unit cube every input lies in the positive orthant, the angles are small and the
kernel varies little across the domain, so the NTK sees the *centred* inputs ``2x - 1`` in
``[-1, 1]^d`` (the kernel wrapper ``gpntk.kernels.Centered``).  The centring is inside the kernel
rather than a second input transform because BoTorch checks that transformed training inputs lie in the unit cube and warns
otherwise.  ``--no-center`` turns it off for comparison.

Prints, per iteration, the best value found (mean ± standard error over seeds) and the log10 regret
for both kernels, and saves a figure of the best value against the iteration (``--figure``).
A short second part fits a two-output ``SingleTaskGP`` (the Branin–Currin problem) with
``NTKKernel(..., batch_shape=torch.Size([2]))`` and prints the per-output hyperparameters.
Everything runs in float64, and the script checks that no warning about the model, the kernel
or numerics was raised.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from botorch.acquisition import qLogExpectedImprovement
from botorch.exceptions.warnings import BotorchWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.input import Normalize
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf
from botorch.test_functions import Ackley, Branin, Hartmann
from botorch.test_functions.multi_objective import BraninCurrin
from botorch.utils.sampling import draw_sobol_samples
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.utils.warnings import GPInputWarning
from linear_operator.utils.warnings import NumericalWarning

import gpntk
from gpntk import layers as L
from gpntk.kernels import Centered

DTYPE = torch.float64

FUNCTIONS = {
    "branin": lambda: Branin(negate=True, dtype=DTYPE),
    "hartmann6": lambda: Hartmann(dim=6, negate=True, dtype=DTYPE),
    "ackley4": lambda: Ackley(dim=4, negate=True, dtype=DTYPE),
}


def ntk_covariance(center: bool = True, batch_shape: torch.Size = torch.Size([])) -> Kernel:
    ntk = gpntk.NTKKernel(L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1), batch_shape=batch_shape)
    return ScaleKernel(Centered(ntk) if center else ntk, batch_shape=batch_shape)


def fit_model(train_X, train_Y, bounds, kernel: str, center: bool) -> SingleTaskGP:
    covar = None if kernel == "default" else ntk_covariance(center)
    model = SingleTaskGP(
        train_X,
        train_Y,
        covar_module=covar,
        input_transform=Normalize(d=train_X.shape[-1], bounds=bounds),
        outcome_transform=Standardize(m=train_Y.shape[-1]),
    )
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def run_bo(problem, kernel: str, seed: int, n_init: int, iterations: int, opt: dict, center: bool) -> torch.Tensor:
    """Best value after the initial design and after each iteration: shape (iterations + 1,)."""
    torch.manual_seed(seed)
    bounds = problem.bounds
    X = draw_sobol_samples(bounds=bounds, n=n_init, q=1, seed=seed).squeeze(-2)
    Y = problem(X).unsqueeze(-1)
    best = [Y.max().item()]
    for _ in range(iterations):
        model = fit_model(X, Y, bounds, kernel, center)
        acqf = qLogExpectedImprovement(model, best_f=Y.max())
        candidate, _ = optimize_acqf(acqf, bounds=bounds, q=1, **opt)
        X = torch.cat([X, candidate])
        Y = torch.cat([Y, problem(candidate).unsqueeze(-1)])
        best.append(Y.max().item())
    return torch.tensor(best, dtype=DTYPE)


def multi_output_demo(center: bool, n: int = 12, seed: int = 0) -> None:
    """A two-output SingleTaskGP with one set of NTK hyperparameters per output."""
    problem = BraninCurrin(negate=True, dtype=DTYPE)
    X = draw_sobol_samples(bounds=problem.bounds, n=n, q=1, seed=seed).squeeze(-2)
    Y = problem(X)  # (n, 2)
    covar = ntk_covariance(center, batch_shape=torch.Size([2]))
    model = SingleTaskGP(
        X, Y, covar_module=covar,
        input_transform=Normalize(d=2, bounds=problem.bounds), outcome_transform=Standardize(m=2),
    )
    assert model._aug_batch_shape == torch.Size([2])
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    dense = next(m for m in covar.modules() if isinstance(m, L.Dense))  # mlp(shared=True): one Dense
    wv = dense.weight_variance.detach().reshape(-1)
    bv = dense.bias_variance.detach().reshape(-1)
    scale = covar.outputscale.detach().reshape(-1)
    noise = model.likelihood.noise.detach().reshape(-1)
    print(f"\nTwo-output SingleTaskGP on Branin-Currin ({n} Sobol points), NTKKernel(batch_shape=[2]):")
    print(f"  {'output':<10}{'sigma_w^2':>11}{'sigma_b^2':>11}{'outputscale':>13}{'noise':>11}")
    for i, name in enumerate(["Branin", "Currin"]):
        print(f"  {name:<10}{wv[i].item():>11.4f}{bv[i].item():>11.4f}{scale[i].item():>13.3e}{noise[i].item():>11.2e}")
    model.eval()
    test = draw_sobol_samples(bounds=problem.bounds, n=64, q=1, seed=seed + 1).squeeze(-2)
    with torch.no_grad():
        post = model.posterior(test)
    truth = problem(test)
    corr = [torch.corrcoef(torch.stack([post.mean[:, i], truth[:, i]]))[0, 1].item() for i in range(2)]
    print(f"  posterior mean shape {tuple(post.mean.shape)}, dtype {post.mean.dtype}; "
          f"correlation with the truth on 64 test points: {corr[0]:.3f}, {corr[1]:.3f}")


def kernel_warnings(caught) -> list:
    return [
        w for w in caught
        if issubclass(w.category, (BotorchWarning, GPInputWarning, NumericalWarning))
        or "gpntk" in str(w.filename)
        or "kernel" in str(w.message).lower()
        or "covar" in str(w.message).lower()
    ]


def save_figure(results: dict, problem_name: str, optimum: float, n_init: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, best), color in zip(results.items(), ["tab:blue", "tab:red"]):
        it = torch.arange(best.shape[1])
        mean = best.mean(0)
        se = best.std(0) / math.sqrt(best.shape[0]) if best.shape[0] > 1 else torch.zeros_like(mean)
        ax.plot(it, mean, color=color, label=label)
        ax.fill_between(it, mean - se, mean + se, color=color, alpha=0.2)
    ax.axhline(optimum, color="k", ls="--", lw=1, label="optimum")
    n_seeds = next(iter(results.values())).shape[0]
    ax.set_xlabel(f"iteration (after {n_init} Sobol points)")
    ax.set_ylabel("best value found")
    ax.set_title(f"{problem_name} (negated), qLogEI, mean ± s.e. over {n_seeds} seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--figure", default="bayesopt-botorch.png", help="where to save the figure")
    parser.add_argument("--function", choices=sorted(FUNCTIONS), default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--init", type=int, default=None, help="Sobol initial points (default 2d + 1)")
    parser.add_argument("--full", action="store_true", help="Hartmann 6-D, 10 seeds, 30 iterations")
    parser.add_argument("--no-center", action="store_true", help="feed the NTK the [0, 1]^d inputs")
    args, _ = parser.parse_known_args(argv)  # tolerate a test runner's argv

    full = args.full
    name = args.function or ("hartmann6" if full else "branin")
    seeds = args.seeds or (10 if full else 2)
    iterations = args.iterations or (30 if full else 8)
    problem = FUNCTIONS[name]()
    d = problem.dim
    n_init = args.init or 2 * d + 1
    opt = dict(num_restarts=10, raw_samples=512) if full else dict(num_restarts=2, raw_samples=64)
    center = not args.no_center
    optimum = float(problem.optimal_value)  # already negated
    labels = {"default": "BoTorch default (RBF)", "ntk": "ScaleKernel(NTK), ReLU depth 2"}

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {}
        for kernel, label in labels.items():
            t0 = time.perf_counter()
            results[label] = torch.stack(
                [run_bo(problem, kernel, s, n_init, iterations, opt, center) for s in range(seeds)]
            )
            print(f"{label}: {seeds} seeds x {iterations} iterations in {time.perf_counter() - t0:.1f} s")
        multi_output_demo(center)

    print(f"\n{name} ({d}-D, negated; optimum {optimum:.4f}), {n_init} Sobol points + {iterations} "
          f"qLogEI iterations, {seeds} seeds; best value mean ± s.e. and mean log10 regret:")
    cols = list(results)
    print(f"{'iter':>5}" + "".join(f"{c:>40}" for c in cols))
    for i in range(iterations + 1):
        if not (i % max(1, iterations // 10) == 0 or i == iterations):
            continue
        row = f"{i:>5}"
        for c in cols:
            best = results[c][:, i]
            se = best.std().item() / math.sqrt(seeds) if seeds > 1 else 0.0
            regret = torch.log10((optimum - best).clamp_min(1e-12)).mean().item()
            row += f"{best.mean().item():>18.4f} ± {se:<7.4f} ({regret:+6.2f})   "
        print(row)

    save_figure(results, name, optimum, n_init, args.figure)
    print(f"\nsaved {args.figure}; total {time.perf_counter() - start:.1f} s")

    bad = kernel_warnings(caught)
    others = [w for w in caught if w not in bad]
    if others:
        print(f"{len(others)} unrelated warning(s): " + "; ".join(f"{w.category.__name__}: {w.message}" for w in others[:3]))
    assert not bad, "warnings about the model/kernel:\n" + "\n".join(
        f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in bad
    )
    print("no warnings about the model, the kernel or numerics were raised")


if __name__ == "__main__":
    main()
