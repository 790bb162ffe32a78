"""Scale: kernel products without the matrix (dense / blockwise / KeOps), and exact GPs at growing n.

Two modes, each measurement in its own worker process (the script re-invokes itself with
``--worker``), one after the other, so that peak memory is that measurement's alone.

``products``: the product :math:`K V` of a depth-``--depth`` ReLU NTK (σw² = 2, σb² = 0.1) on
``n`` x ``--d`` standard-normal float64 inputs with ``V`` of ``--columns`` columns (what one
conjugate-gradient iteration of GPyTorch needs; it runs 1 + ``num_trace_samples`` columns), by

* ``dense``:     compute and store K (``gpntk.kernels.dense.evaluate``), then ``K @ V``; both
  times are reported: "build" once, then "product" per iteration;
* ``blockwise``: ``gpntk.kernels.blockwise.kernel_matmul`` (K recomputed block by block at every
  product, memory O(n)); steady state of ``gpntk.settings.fusion("auto")`` (two warm-up calls
  before the timed ones, so that large products run compiled);
* ``keops``:     ``gpntk.contrib.keops.keops_covariance(...) @ V`` (a pykeops reduction; the first
  call compiles the formula, reported as "first call");
* ``gpytorch-keops-rbf``: GPyTorch's own KeOps RBF kernel product at the same n, a peer: the
  cheapest matrix-free kernel product the ecosystem offers;
* ``floor``:     ``x @ x.T`` (one n x n matrix written once, the matmul floor of any dense kernel).

Throughput is kernel entries per second, n² / time of one product (for ``dense``, n² / build
time). Peak memory: the peak resident set size (VmHWM) over the timed calls minus the RSS before
them (Linux).

``gp``: an exact GP (GPyTorch ``ExactGP``, ``ScaleKernel(NTKKernel(mlp(depth, "relu")))``,
``GaussianLikelihood``, constant mean) on ``n`` training points of a smooth function of 16 inputs
plus noise: ``--steps`` Adam steps of the marginal likelihood with gradients (GPyTorch uses CG
above ``max_cholesky_size`` = 800), then predictions (mean and variance, ``fast_pred_var``) at
``--test`` points (``--root 0``: exact variances instead of LOVE's rank-``--root`` ones). Reports seconds per step, prediction time, test RMSE and mean NLL, the
peak RSS of the whole run above the RSS after loading the data, and the peak RSS of the worker
process over its whole life (``ru_maxrss``: imports, data, fit and prediction; what a user who runs
this as a script in a fresh process sees). ``--out``: write the results as JSON. ``--backends dense blockwise``
compares the stored kernel with the matrix-free one.

    .venv/bin/python benchmarks/scale.py products --n 2000 5000 10000 --backends dense blockwise floor
    .venv/bin/python benchmarks/scale.py gp --n 20000 --backends blockwise --steps 1 --test 1000 --out scale_gp.json
    .venv/bin/python benchmarks/scale.py gp --n 2000 5000 --backends dense blockwise
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_rss_kib, reset_peak_rss, status_kib  # noqa: E402


def _data(n: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, g


def _target(x):
    import torch

    return torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] / (1 + x[:, 2].abs()) + 0.3 * torch.cos(2 * x[:, 3])


def _net(depth: int):
    from gpntk import layers as L

    return L.mlp(depth, "relu", weight_variance=2.0, bias_variance=0.1)


def _timed(fn, repeats: int, warmups: int = 1) -> dict:
    first = time.perf_counter()
    for _ in range(warmups):
        fn()
    first = (time.perf_counter() - first) / warmups
    reset_ok = reset_peak_rss()
    base = status_kib("VmRSS") or 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"first": first, "median": statistics.median(times), "peak_mib": (peak_rss_kib(reset_ok) - base) / 1024}


def worker_products(spec: dict) -> dict:
    import torch

    from gpntk.core.hyperparameters import Hyperparameters

    n, backend = spec["n"], spec["backend"]
    x, g = _data(n, spec["d"], 0)
    v = torch.randn(n, spec["columns"], generator=g, dtype=torch.float64)
    net = _net(spec["depth"])
    hyper = {k: t.detach() for k, t in Hyperparameters.collect(net, like=x).items()}
    result: dict = {}
    with torch.no_grad():
        if backend == "dense":
            from gpntk.kernels.dense import evaluate

            holder = {}

            def build():
                holder["K"] = evaluate(net, x, x, hyper, track_ntk=True)[1]

            result["build"] = _timed(build, spec["repeats"], warmups=3)  # the steady state of fusion "auto", as blockwise
            result.update(_timed(lambda: holder["K"] @ v, spec["repeats"]))
            result["peak_mib"] = max(result["peak_mib"], result["build"]["peak_mib"] + n * n * 8 / 2**20)
        elif backend == "blockwise":
            from gpntk.kernels.blockwise import kernel_matmul

            result.update(_timed(lambda: kernel_matmul(net, x, x, hyper, v), spec["repeats"], warmups=3))
        elif backend == "keops":
            from gpntk.contrib.keops import keops_covariance

            result.update(_timed(lambda: keops_covariance(x, x, net=net, output="ntk", hyper=hyper) @ v, spec["repeats"]))
        elif backend == "gpytorch-keops-rbf":
            from gpytorch.kernels.keops import RBFKernel

            kernel = RBFKernel().double()
            result.update(_timed(lambda: kernel(x).evaluate_kernel() @ v, spec["repeats"]))
        elif backend == "floor":
            result.update(_timed(lambda: x @ x.T, spec["repeats"]))
        else:
            raise ValueError(f"unknown backend {backend!r}")
    seconds = result["build"]["median"] if backend == "dense" else result["median"]
    result["entries_per_s"] = n * n / seconds
    return result


def worker_gp(spec: dict) -> dict:
    import gpytorch
    import torch

    import gpntk

    n, backend = spec["n"], spec["backend"]
    x, g = _data(n + spec["test"], 16, 1)
    y = _target(x) + spec["noise"] * torch.randn(n + spec["test"], generator=g, dtype=torch.float64)
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(_net(spec["depth"]), backend=backend))

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = GP().double()
    model.likelihood.noise = 0.05
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    startup_kib = peak_rss_kib(False)  # imports and data (resetting VmHWM below also resets ru_maxrss)
    reset_ok = reset_peak_rss()
    base = status_kib("VmRSS") or 0
    step_times, losses = [], []
    model.train()
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    model.eval()
    start = time.perf_counter()
    love = spec["root"] > 0
    with torch.no_grad(), gpytorch.settings.fast_pred_var(love), gpytorch.settings.max_root_decomposition_size(max(spec["root"], 1)):
        prediction = model.likelihood(model(test_x))
        mean, variance = prediction.mean, prediction.variance
    predict = time.perf_counter() - start
    nll = 0.5 * (torch.log(2 * torch.pi * variance) + (test_y - mean) ** 2 / variance)
    return {
        "step_s": step_times, "losses": losses, "predict_s": predict,
        "rmse": (mean - test_y).square().mean().sqrt().item(), "nll": nll.mean().item(),
        "noise": model.likelihood.noise.item(), "peak_mib": (peak_rss_kib(reset_ok) - base) / 1024,
        "base_mib": base / 1024,
        # what a user sees: this fresh process's lifetime peak, imports and data included
        "process_peak_mib": max(startup_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
    }


def run_worker(mode: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
        return {"error": f"rc={proc.returncode}: {reason}", "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["products", "gp"])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--root", type=int, default=30, help="max_root_decomposition_size of fast_pred_var (LOVE); 0: exact variances")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, spec = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps((worker_products if mode == "products" else worker_gp)(spec)), flush=True)
        return
    args = parser.parse_args()
    backends = args.backends or (["dense", "blockwise", "floor"] if args.mode == "products" else ["dense", "blockwise"])
    import torch

    print(f"# {args.mode}: depth-{args.depth} ReLU NTK, float64, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {torch.get_num_threads()}")
    results: dict = {
        "mode": args.mode, "torch": torch.__version__, "cpus": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "runs": [],
    }
    for n in args.n:
        rows = {}
        for backend in backends:
            spec = dict(vars(args), n=n, backend=backend)
            spec.pop("backends"), spec.pop("worker"), spec.pop("out")
            rows[backend] = run_worker(args.mode, spec)
            _print_row(args.mode, n, backend, rows[backend])
            results["runs"].append({"n": n, "backend": backend, **rows[backend]})
            if args.out is not None:  # after every run: a long sweep keeps what it measured
                args.out.write_text(json.dumps(results, indent=1) + "\n")
        if args.mode == "products":
            _print_ratios(n, rows)


def _print_row(mode: str, n: int, backend: str, row: dict) -> None:
    if "error" in row:
        print(f"n={n:>7} {backend:>20}: failed after {row['wall_s']:.0f} s: {row['error']}", flush=True)
        return
    if mode == "products":
        extra = f" build {row['build']['median']:.3f} s" if "build" in row else ""
        print(
            f"n={n:>7} {backend:>20}: product {row['median']:.4f} s{extra}, first call {row['first']:.2f} s, "
            f"{row['entries_per_s']:.3g} entries/s, peak +{row['peak_mib']:.0f} MiB", flush=True,
        )
    else:
        steps = ", ".join(f"{s:.1f}" for s in row["step_s"])
        print(
            f"n={n:>7} {backend:>10}: MLL step(s) {steps} s, predict {row['predict_s']:.1f} s, "
            f"RMSE {row['rmse']:.4f}, NLL {row['nll']:.3f}, peak +{row['peak_mib']:.0f} MiB "
            f"(fresh process peak {row['process_peak_mib']:.0f} MiB), wall {row['wall_s']:.0f} s", flush=True,
        )


def _print_ratios(n: int, rows: dict) -> None:
    ok = {name: row for name, row in rows.items() if "error" not in row}
    if "blockwise" in ok:
        base = ok["blockwise"]["median"]
        for name, row in ok.items():
            if name != "blockwise":
                key = "build" if name == "dense" else None
                other = row["build"]["median"] if key else row["median"]
                label = "dense build" if key else name
                print(f"n={n:>7}   blockwise product / {label}: {base / other:.2f}x")
        if "dense" in ok:
            print(f"n={n:>7}   blockwise product / dense stored product: {base / ok['dense']['median']:.1f}x")


if __name__ == "__main__":
    main()
