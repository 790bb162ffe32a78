"""The scale ladder: time, peak memory and accuracy of five ways to run an NTK GP, as n grows.

    OMP_NUM_THREADS=1 python benchmarks/scale_ladder.py                     # the full ladder (about an hour)
    python benchmarks/scale_ladder.py --n 1000 2000 --methods dense svgp    # a part of it
    python benchmarks/scale_ladder.py --plot-only                           # redraw the figure from the JSON

One model: ``ScaleKernel(NTKKernel(mlp(3, "relu")))`` with a constant mean and a Gaussian
likelihood, float64, on ``n`` training points of a smooth function of 16 standard-normal inputs plus
noise (``scale.py``'s problem), predicting at ``--test`` held-out points. The hyperparameters
(σw², σb², outputscale, mean) are fitted once, by the exact marginal likelihood at ``--fit-n``
points (Cholesky, L-BFGS), with the noise variance fixed at its true value (fitted too, it falls to
its lower bound 1e-4: the NTK's rough part at coincident inputs absorbs the noise), and then
**held fixed** for every method and every n, so that
the methods differ only in how they do inference and their accuracy can be compared:

* ``dense``: exact inference with the stored n x n kernel and a Cholesky factorisation
  (``backend="dense"``, ``max_cholesky_size`` above n), exact predictive variances;
* ``cg``: exact inference without storing the kernel (``backend="blockwise"``: products
  recomputed block by block) on GPyTorch's conjugate-gradient path, LOVE variances of rank
  ``--root`` (``fast_pred_var``);
* ``distributed``: ``cg``'s model with ``gpntk.distributed.ShardedKernel(..., store=True)`` over
  ``--world`` gloo processes on this machine (each holds n²/world kernel entries), rank 0 measured;
* ``sgpr``: GPyTorch's SGPR (``InducingPointKernel``, Titsias 2009) with ``--m`` inducing points
  drawn at random from the training inputs (kept fixed); its predictions are GPyTorch's defaults,
  which add ``sgpr_diagonal_correction`` (the training covariance's diagonal made exact, as in
  FITC), so they differ from Titsias's variational posterior; that posterior is computed too
  (``sgpr_diagonal_correction(False)``) as SVGP's target;
* ``svgp``: GPyTorch's SVGP (Hensman et al. 2013) with the same inducing points,
  ``NaturalVariationalDistribution`` trained by natural gradients (``gpytorch.optim.NGD``) for
  ``--epochs`` epochs of minibatches of about ``--batch`` points with step sizes 1 / (t + 1), which
  reach Titsias's optimum in one epoch (see ``_svgp_epochs``); the hyperparameters receive
  gradients but are not stepped. Where SGPR ran at the same n, ``mean_rmse_vs_titsias`` checks
  that it did: the RMS difference of the predictive means from Titsias's (GPyTorch's SGPR with
  ``sgpr_diagonal_correction(False)``, whose variances are not Titsias's and are not compared).

Measured per (method, n), each in a fresh worker process: ``train_s``, one training pass with
hyperparameter gradients (the exact methods and SGPR: one marginal-likelihood step, forward and
backward, the second one: ``first_train_s``, the first, includes the one-off torch.compile of a
large kernel under ``gpntk.settings.fusion("auto")``; SVGP: one epoch, the median over epochs), ``predict_s`` (predictive mean and variance
at the test points), the worker's peak resident memory (``process_peak_mib``: its whole life,
imports included, as a user running a script sees it; ``peak_mib``: above the resident memory
after loading the data), test RMSE and mean NLL, and, where a reference at the same n exists
(``dense``, else ``cg``), the accuracy against it: ``mean_rmse_vs_ref`` (RMS difference of the
predictive means over the test targets' standard deviation) and ``std_ratio_vs_ref`` (median and
extreme ratios of the predictive standard deviations; the table shows them against ``dense``
only, as ``cg``'s variances are LOVE's approximations).

Each method climbs ``--n`` up to its ``--max-n`` and stops early once its runs have used
``--budget`` seconds or a run fails (out of memory, an error). Progress is printed; results go to
``benchmarks/results/scale_ladder.json`` after every run; the figure (time and memory vs n,
log-log) to ``docs/images/scale_ladder.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _memory import peak_rss_kib, reset_peak_rss, status_kib  # noqa: E402

RESULTS = HERE / "results" / "scale_ladder.json"
FIGURE = HERE.parent / "docs" / "images" / "scale_ladder.png"
METHODS = ("dense", "cg", "distributed", "sgpr", "svgp")
MAX_N = {"dense": 10_000, "cg": 20_000, "distributed": 20_000, "sgpr": 200_000, "svgp": 1_000_000}
LADDER = (1_000, 2_000, 5_000, 10_000, 20_000, 100_000, 200_000, 1_000_000)


# ----------------------------------------------------------------------------------- the problem
def problem(n: int, test: int, noise: float, seed: int = 0):
    """``n`` training and ``test`` held-out points (the same for every n): 16 standard-normal inputs,
    the target ``sin(x0) + 0.5 x1 x2 / (1 + |x2|) + 0.3 cos(2 x3)`` plus Gaussian noise of std ``noise``."""
    import torch

    def draw(count: int, generator_seed: int):
        g = torch.Generator().manual_seed(generator_seed)
        x = torch.randn(count, 16, generator=g, dtype=torch.float64)
        f = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] / (1 + x[:, 2].abs()) + 0.3 * torch.cos(2 * x[:, 3])
        return x, f + noise * torch.randn(count, generator=g, dtype=torch.float64)

    return (*draw(n, seed), *draw(test, seed + 1))


def base_kernel(hyper: dict | None, backend: str = "auto"):
    """``ScaleKernel(NTKKernel(mlp(3, "relu")))`` at the given hyperparameters."""
    import gpytorch

    import gpntk

    net = gpntk.layers.mlp(3, "relu", weight_variance=2.0, bias_variance=0.1)
    kernel = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net, backend=backend)).double()
    if hyper is not None:
        layer = net.layers[0]
        layer.weight_variance, layer.bias_variance = hyper["weight_variance"], hyper["bias_variance"]
        kernel.outputscale = hyper["outputscale"]
    return kernel


def exact_model(x, y, hyper: dict | None, backend: str = "auto", sharded: bool = False):
    import gpytorch

    from gpntk.distributed import ShardedKernel

    class GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            kernel = base_kernel(hyper, backend)
            self.covar_module = ShardedKernel(kernel, store=True) if sharded else kernel

        def forward(self, z):  # type: ignore[no-untyped-def]
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    return _with_likelihood_hyper(GP().double(), hyper)


def sgpr_model(x, y, hyper: dict, inducing):
    import gpytorch

    class SGPR(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.InducingPointKernel(
                base_kernel(hyper), inducing_points=inducing.clone(), likelihood=likelihood)

        def forward(self, z):  # type: ignore[no-untyped-def]
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = _with_likelihood_hyper(SGPR().double(), hyper)
    model.covar_module.inducing_points.requires_grad_(False)
    return model


def svgp_model(hyper: dict, inducing):
    import gpytorch

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self) -> None:
            distribution = gpytorch.variational.NaturalVariationalDistribution(inducing.shape[0])
            strategy = gpytorch.variational.VariationalStrategy(
                self, inducing.clone(), distribution, learn_inducing_locations=False)
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = base_kernel(hyper)

        def forward(self, z):  # type: ignore[no-untyped-def]
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = SVGP().double()
    model.mean_module.constant.data.fill_(hyper["mean"])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = hyper["noise"]
    return model, likelihood


def _with_likelihood_hyper(model, hyper: dict | None):
    if hyper is not None:
        model.likelihood.noise = hyper["noise"]
        model.mean_module.constant.data.fill_(hyper["mean"])
    return model


# ------------------------------------------------------------------------------------- workers
def fit_hyperparameters(spec: dict) -> dict:
    """The exact GP's hyperparameters at ``fit_n`` points (Cholesky, L-BFGS on the marginal likelihood), noise fixed."""
    import gpytorch
    import torch

    x, y, _, _ = problem(spec["fit_n"], spec["test"], spec["noise"])
    model = exact_model(x, y, None, backend="dense")
    model.likelihood.noise = spec["noise"] ** 2  # fixed at the truth: fitted, it falls to its lower bound 1e-4
    model.likelihood.raw_noise.requires_grad_(False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=60, line_search_fn="strong_wolfe")
    model.train()

    def closure():
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    with gpytorch.settings.max_cholesky_size(10**9):
        optimizer.step(closure)
        loss = closure().item()
    layer = model.covar_module.base_kernel.net.layers[0]
    return {
        "weight_variance": layer.weight_variance.item(), "bias_variance": layer.bias_variance.item(),
        "outputscale": model.covar_module.outputscale.item(), "noise": model.likelihood.noise.item(),
        "mean": model.mean_module.constant.item(), "loss": loss, "fit_n": spec["fit_n"],
    }


def _predict(model, likelihood, spec: dict) -> tuple[float, object, object]:
    """Predictive mean and variance (noise included) at the test points: (seconds, mean, variance)."""
    import gpytorch
    import torch

    _, _, xt, _ = problem(0, spec["test"], spec["noise"])
    love = spec["method"] in ("cg", "distributed")
    model.eval()
    start = time.perf_counter()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(love), \
            gpytorch.settings.max_root_decomposition_size(spec["root"]):
        prediction = likelihood(model(xt))
        mean, variance = prediction.mean, prediction.variance
    return time.perf_counter() - start, mean, variance


def _exact_training_pass(model, x, y) -> float:
    """One marginal-likelihood step with hyperparameter gradients (forward and backward), in seconds."""
    import gpytorch

    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    start = time.perf_counter()
    (-mll(model(x), y)).backward()
    return time.perf_counter() - start


def _svgp_epochs(model, likelihood, x, y, spec: dict) -> list[float]:
    """Natural-gradient epochs of the variational parameters (hyperparameters get gradients, not steps).

    With a Gaussian likelihood and fixed hyperparameters, the minibatch natural-gradient step is
    θ ← (1 − ρ) θ + ρ θ̂_b, where θ̂_b, the natural parameters that minibatch ``b`` alone (scaled by
    n / |b|) makes optimal, does not depend on θ (Hensman et al. 2013). Step sizes ρ_t = 1 / (t + 1)
    make θ the running average of the θ̂_b: after one epoch of equal-size minibatches it is the
    full-data optimum, SGPR's (Titsias 2009) variational posterior for the same inducing points.
    """
    import gpytorch
    import torch

    n = x.shape[0]
    elbo = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=n)
    ngd = gpytorch.optim.NGD(model.variational_parameters(), num_data=n, lr=1.0)
    g = torch.Generator().manual_seed(3)
    epochs, step = [], 0
    model.train()
    for epoch in range(spec["epochs"]):
        start = time.perf_counter()
        for batch in torch.randperm(n, generator=g).tensor_split(max(1, round(n / spec["batch"]))):
            for group in ngd.param_groups:
                group["lr"] = 1.0 / (step + 1)
            ngd.zero_grad()
            model.zero_grad()
            (-elbo(model(x[batch]), y[batch])).backward()
            ngd.step()
            step += 1
        epochs.append(time.perf_counter() - start)
        print(f"    svgp n={n} epoch {epoch + 1}/{spec['epochs']}: {epochs[-1]:.1f} s", file=sys.stderr, flush=True)
    return epochs


def worker(spec: dict) -> dict:
    """One (method, n) in this fresh process: build, one training pass, predictions, memory."""
    import resource

    import gpytorch
    import torch

    import gpntk

    torch.set_num_threads(1)
    if spec["method"] == "distributed":
        gpntk.distributed.initialize()
    n, hyper, method = spec["n"], spec["hyper"], spec["method"]
    torch.manual_seed(0)  # the same probe vectors on every rank (distributed), and from run to run
    x, y, _, yt = problem(n, spec["test"], spec["noise"])
    inducing = x[torch.randperm(n, generator=torch.Generator().manual_seed(2))[: spec["m"]]]
    startup_kib = peak_rss_kib(False)  # imports and data (resetting VmHWM below resets ru_maxrss too)
    reset_ok = reset_peak_rss()
    base = status_kib("VmRSS") or 0
    extra: dict = {}
    if method == "svgp":
        model, likelihood = svgp_model(hyper, inducing)
        extra["epochs_s"] = _svgp_epochs(model, likelihood, x, y, spec)
        train_s = statistics.median(extra["epochs_s"])
        predict_s, mean, var = _predict(model, likelihood, spec)
    else:
        if method == "sgpr":
            model = sgpr_model(x, y, hyper, inducing)
        else:
            backend = "dense" if method == "dense" else "blockwise"
            model = exact_model(x, y, hyper, backend=backend, sharded=method == "distributed")
        with gpytorch.settings.max_cholesky_size(n + 1 if method == "dense" else spec["max_cholesky_size"]):
            extra["first_train_s"] = _exact_training_pass(model, x, y)  # may include torch.compile (fusion "auto")
            train_s = _exact_training_pass(model, x, y)
            predict_s, mean, var = _predict(model, model.likelihood, spec)
    peak = (peak_rss_kib(reset_ok) - base) / 1024
    if method == "sgpr" and spec.get("save"):  # Titsias's posterior, SVGP's optimum (see _svgp_epochs)
        with gpytorch.settings.sgpr_diagonal_correction(False), gpytorch.settings.max_cholesky_size(n + 1):
            _, vfe_mean, vfe_var = _predict(sgpr_model(x, y, hyper, inducing), model.likelihood, spec)
        torch.save({"mean": vfe_mean, "var": vfe_var}, spec["save"].replace(".pt", "_vfe.pt"))
    nll = 0.5 * (torch.log(2 * torch.pi * var) + (yt - mean) ** 2 / var)
    if spec.get("save"):
        torch.save({"mean": mean, "var": var}, spec["save"])
    return {
        "train_s": train_s, "predict_s": predict_s, "peak_mib": peak, "base_mib": base / 1024,
        "process_peak_mib": max(startup_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
        "rmse": (mean - yt).square().mean().sqrt().item(), "nll": nll.mean().item(), **extra,
    }


# ----------------------------------------------------------------------------- running workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(spec: dict, world: int = 1) -> dict:
    """``worker(spec)`` in ``world`` fresh processes (gloo ranks when > 1); rank 0's result or an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    stdout, stderr = outputs[0]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    codes = [p.returncode for p in procs]
    if any(codes) or not lines:
        tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
        reason = "killed (out of memory?)" if any(c in (-9, 137) for c in codes) else tail
        return {"error": f"rc={codes}: {reason}", "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def accuracy(saved: Path, reference: Path, noise: float) -> dict:
    """Predictions against the reference's at the same n: RMS mean difference / std(y), std ratios."""
    import torch

    from_run, from_ref = torch.load(saved), torch.load(reference)
    _, _, _, yt = problem(0, from_run["mean"].shape[0], noise)
    ratio = (from_run["var"] / from_ref["var"]).sqrt()
    return {
        "mean_rmse_vs_ref": ((from_run["mean"] - from_ref["mean"]).square().mean().sqrt() / yt.std()).item(),
        "std_ratio_vs_ref": {"median": ratio.median().item(), "min": ratio.min().item(), "max": ratio.max().item()},
    }


def _print_row(method: str, n: int, row: dict) -> None:
    if "error" in row:
        print(f"{method:>12} n={n:>8}: failed after {row['wall_s']:.0f} s: {row['error']}", flush=True)
        return
    vs = ""
    if "mean_rmse_vs_ref" in row:
        r = row["std_ratio_vs_ref"]
        vs = (f", vs {row['reference']}: mean {row['mean_rmse_vs_ref']:.1e}, "
              f"std ratio {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    if "mean_rmse_vs_titsias" in row:
        vs += f", mean vs Titsias {row['mean_rmse_vs_titsias']:.1e}"
    print(f"{method:>12} n={n:>8}: train {row['train_s']:.2f} s, predict {row['predict_s']:.2f} s, "
          f"peak +{row['peak_mib']:.0f} MiB (process {row['process_peak_mib']:.0f} MiB), "
          f"RMSE {row['rmse']:.4f}, NLL {row['nll']:.3f}{vs}, wall {row['wall_s']:.0f} s", flush=True)


def climb(method: str, args: argparse.Namespace, hyper: dict, cache: Path, results: dict) -> None:
    """Run ``method`` up the ladder until its maximum n, its time budget, or a failure."""
    spent = 0.0
    for n in sorted(n for n in args.n if n <= args.max_n.get(method, MAX_N[method])):
        if spent >= args.budget:
            print(f"{method:>12}: budget of {args.budget:.0f} s spent, stopping before n = {n}", flush=True)
            break
        saved = cache / f"{method}_{n}.pt"
        spec = {key: getattr(args, key) for key in ("test", "noise", "m", "batch", "epochs", "root",
                                                    "max_cholesky_size")}
        spec.update(method=method, n=n, hyper=hyper, save=str(saved))
        print(f"{method:>12} n={n:>8}: running", flush=True)
        row = run_worker(spec, world=args.world if method == "distributed" else 1)
        spent += row["wall_s"]
        for reference in ("dense", "cg"):
            ref = cache / f"{reference}_{n}.pt"
            if "error" not in row and reference != method and ref.exists():
                row.update(reference=reference, **accuracy(saved, ref, args.noise))
                break
        sgpr = cache / f"sgpr_{n}_vfe.pt"  # Titsias's predictive mean
        if method == "svgp" and "error" not in row and sgpr.exists():  # has SVGP reached SGPR's optimum?
            row["mean_rmse_vs_titsias"] = accuracy(saved, sgpr, args.noise)["mean_rmse_vs_ref"]
        results["runs"].append({"method": method, "n": n, **row})
        _print_row(method, n, row)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        if "error" in row:
            break


def markdown_table(results: dict) -> str:
    """The ladder as the markdown table of docs/scaling.md."""
    lines = ["| method | n | training pass (s) | prediction (s) | peak memory (MiB) | test RMSE | "
             "mean vs exact | std ratio vs exact |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['n']:,} | failed: {row['error'][:40]} | | | | | |")
            continue
        vs = ("", "")
        if "mean_rmse_vs_ref" in row:
            r = row["std_ratio_vs_ref"]
            # cg's variances are LOVE's: no reference for the variances where dense did not run
            std = f"{r['median']:.3f} [{r['min']:.2f}, {r['max']:.2f}]" if row["reference"] == "dense" else "–"
            vs = (f"{row['mean_rmse_vs_ref']:.1e} ({row['reference']})", std)
        lines.append(f"| {row['method']} | {row['n']:,} | {row['train_s']:.3g} | {row['predict_s']:.3g} | "
                     f"{row['process_peak_mib']:,.0f} | {row['rmse']:.4f} | {vs[0]} | {vs[1]} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Training-pass time, prediction time and peak memory against n, log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("train_s", "training pass (s)\n(MLL step; SVGP: one epoch)"), ("predict_s", "prediction (s)"),
              ("process_peak_mib", "peak resident memory (MiB)"))
    for ax, (key, label) in zip(axes, panels):
        for method in METHODS:
            rows = [row for row in results["runs"] if row["method"] == method and "error" not in row]
            if rows:
                ax.loglog([row["n"] for row in rows], [row[key] for row in rows], "o-", label=method)
        ax.set_xlabel("training points n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"depth-3 ReLU NTK GP, float64, 1 thread per process, {results['settings']['m']} inducing points")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=list(LADDER))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-n", type=json.loads, default={},
                        help='per-method maximum n, JSON, e.g. \'{"cg": 5000}\'')
    parser.add_argument("--budget", type=float, default=900.0, help="seconds per method before it stops climbing")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--fit-n", type=int, default=2000)
    parser.add_argument("--m", type=int, default=512, help="inducing points (SGPR, SVGP)")
    parser.add_argument("--batch", type=int, default=1024, help="SVGP minibatch size")
    parser.add_argument("--epochs", type=int, default=1, help="SVGP epochs")
    parser.add_argument("--root", type=int, default=30, help="rank of LOVE's variances (cg, distributed)")
    parser.add_argument("--max-cholesky-size", type=int, default=800, help="GPyTorch's CG threshold (cg, distributed)")
    parser.add_argument("--world", type=int, default=2, help="processes of the distributed method")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for the predictions (default: a temporary one)")
    parser.add_argument("--reuse-fit", action="store_true", help="take the hyperparameters from the JSON of --out")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure and table from --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(args.out.read_text())
    else:
        import tempfile

        import torch

        results = {"torch": torch.__version__, "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": []}
        if args.reuse_fit:
            fit = json.loads(args.out.read_text())["hyperparameters"]
        else:
            print("fitting the hyperparameters (exact GP, Cholesky) at n =", args.fit_n, flush=True)
            fit = run_worker({"fit_n": args.fit_n, "test": args.test, "noise": args.noise, "method": "fit"})
        if "error" in fit:
            raise SystemExit(f"the hyperparameter fit failed: {fit['error']}")
        results["hyperparameters"] = fit
        print("  " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items()), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache or Path(tmp)
            cache.mkdir(parents=True, exist_ok=True)
            for method in [m for m in METHODS if m in args.methods]:  # dense and cg first: the references
                climb(method, args, fit, cache, results)
        results["load_average_after"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results))
    if args.figure and str(args.figure):
        plot(results, args.figure)
        print(f"wrote {args.out} and {args.figure}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        print(json.dumps(fit_hyperparameters(spec) if spec["method"] == "fit" else worker(spec)), flush=True)
    else:
        main()
