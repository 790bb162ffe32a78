"""Speed, memory and agreement of gpntk's trained-ensemble posterior against Neural Tangents.

Both libraries compute the mean and covariance of an infinite ensemble of infinitely wide
depth-``--depth`` ReLU MLPs (σw² = 2, σb² = 0.1, NTK parameterization) trained by gradient flow,
on the same data, for ``--num-times`` training times (``--num-times - 1`` log-spaced ones and
t = ∞), in float64:

* gpntk:  ``TrainedEnsemble(net, x, y, lr, diag_reg).moments(x_test, times, regime)``;
* Neural Tangents: ``nt.predict.gradient_descent_mse_ensemble(kernel_fn, x, y, lr, diag_reg,
  diag_reg_absolute_scale=True)(t=times, x_test=x_test, get=regime, compute_cov=True)``.

Neural Tangents (JAX) and gpntk (torch) live in different virtual environments, so this script
runs each library in its own worker process (it re-invokes itself with ``--worker``; NT under
``--nt-python``), passes the data through a temporary ``.npz`` and reads back timings and
results. Workers run one after the other, never concurrently.

What is timed, per repeat (median over ``--repeats`` after one untimed warm-up run of the whole
pipeline at the same shapes, so JAX's jit / op compilation and torch's first-call overheads are
excluded from the medians; the warm-up run's wall time is shown separately as "first call"):

* ``kernels``: every kernel matrix the posterior needs. gpntk: ``TrainedEnsemble(...)`` and the
  training, test-train and test-test kernels the regime uses, computed by its cached private
  ``_prepare`` (the NTK only where the regime needs it). NT: exactly the ``kernel_fn`` calls that ``predict_fn`` makes
  (recorded during the warm-up), with ``kernel_fn`` jitted (``--nt-no-jit`` for eager).
* ``predict``: everything else, for all times at once: eigendecomposition of the training kernel
  and the per-time products. gpntk: ``moments(x_test, times, regime)`` with the kernels cached.
  NT: a fresh ``gradient_descent_mse_ensemble`` whose ``kernel_fn`` returns the precomputed
  kernels, then ``predict_fn(t=times, ...)``.
* ``eigh``: for reference, the symmetric eigendecomposition of the n x n training kernel alone
  (``torch.linalg.eigh`` / ``jnp.linalg.eigh``), which is part of ``predict``.

Memory: the peak resident set size (VmHWM, reset after imports and data loading where the kernel
allows it, else ``getrusage`` ru_maxrss) of each worker process, and the RSS after imports
(baseline). tracemalloc is not used: it cannot see torch / XLA buffers allocated in C++.

Agreement: for every time, ``max|gpntk - NT| / max|NT|`` of the mean and of the covariance; the
worst over times is reported (and where it occurs); they should agree to about 1e-8.

gpntk is run as a user calls it (``--libs gpntk-nograd`` adds a run under ``torch.no_grad()``;
the two differ only if ``moments`` builds autograd graphs, as it did before its kernels were
computed with detached hyperparameters). gpntk's layers are converted with ``net.double()`` so
that their hyperparameters are exactly NT's (``--gpntk-float32-params`` keeps the float32 ones).

The machine may be shared: the table shows the load average, the process CPU time and the
minimum besides the median. Multi-threaded BLAS / LAPACK (OpenMP) can slow down by 10x or more
when other jobs occupy the cores (threads spin at barriers waiting for a descheduled peer);
``--threads 1`` or ``--omp-passive`` give steadier numbers there.

    .venv/bin/python benchmarks/posterior_speed.py                      # n=2000, m=500, k=1, ntk
    .venv/bin/python benchmarks/posterior_speed.py --n 500 --repeats 2  # quick
    .venv/bin/python benchmarks/posterior_speed.py --regime nngp --k 3

Neural Tangents is installed with ``bash /work/shared/tools/install-neural-tangents.sh .venv-nt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _memory import peak_rss_kib, reset_peak_rss, status_kib

DEFAULT_NT_PYTHON = "/work/main/.venv-nt/bin/python"
INSTALL_HINT = "bash /work/shared/tools/install-neural-tangents.sh /work/main/.venv-nt"
LIBS = ("gpntk", "gpntk-nograd", "nt")
LABELS = {"gpntk": "gpntk", "gpntk-nograd": "gpntk (no_grad)", "nt": "Neural Tangents"}


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)
# ---------------------------------------------------------------------------------------------
# workers
def _median(values: list[float]) -> float:
    return statistics.median(values)


def worker_gpntk(args) -> dict:
    import torch

    import gpntk
    from gpntk.kernels.dense import nngp_and_ntk
    from gpntk.posterior import TrainedEnsemble

    data = dict(np.load(args.data))
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    if y.shape[1] == 1:
        y = y[:, 0]
    xt = torch.from_numpy(data["x_test"])
    times = torch.from_numpy(data["times"])
    net = gpntk.layers.mlp(args.depth, "relu", args.weight_variance, args.bias_variance)
    if not args.gpntk_float32_params:
        # layers store their hyperparameters in float32 by default; TrainedEnsemble casts them to the
        # data's dtype, so σb² = 0.1 would enter the float64 kernels as 0.09999997914 (2e-7 off).
        # .double() restores the exact values (gpntk remembers them), the same model as NT's.
        net = net.double()
    no_grad = args.worker == "gpntk-nograd"
    grad_ctx = torch.no_grad if no_grad else torch.enable_grad

    baseline = status_kib("VmRSS") or 0
    reset_ok = reset_peak_rss()

    cpu: list[float] = []

    def run():  # the ensemble is local: the previous repeat's is freed before the next is built
        with grad_ctx():
            c0, t0 = time.process_time(), time.perf_counter()
            ens = TrainedEnsemble(net, x, y, learning_rate=args.lr, diag_reg=args.diag_reg)
            ens._prepare(xt, args.regime)  # every kernel matrix moments() needs, cached on the ensemble
            t1 = time.perf_counter()
            mean, cov = ens.moments(xt, times, args.regime)
            t2, c2 = time.perf_counter(), time.process_time()
        cpu.append(c2 - c0)
        return mean, cov, t1 - t0, t2 - t1

    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t_first = time.perf_counter()
        mean, cov, k_first, p_first = run()
        first = time.perf_counter() - t_first
        del mean, cov
        kern, pred = [], []
        for i in range(args.repeats):
            mean, cov, k, p = run()
            kern.append(k)
            pred.append(p)
            if i + 1 < args.repeats:
                del mean, cov
        caught += [f"{rec.category.__name__}: {rec.message}" for rec in w]
    peak = peak_rss_kib(reset_ok)

    # eigh alone, on the training kernel that drives the dynamics in this regime
    with torch.no_grad():
        nngp_xx, ntk_xx = nngp_and_ntk(net, x)
        dyn = (nngp_xx if args.regime == "nngp" else ntk_xx) + args.diag_reg * torch.eye(x.shape[0], dtype=x.dtype)
        eig = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            torch.linalg.eigh(dyn)
            eig.append(time.perf_counter() - t0)

    mean = mean.detach().numpy()
    if mean.ndim == 2:
        mean = mean[..., None]
    with torch.no_grad():  # the kernels, for the comparison with NT's (same function TrainedEnsemble uses)
        kernels = dict(zip(("nngp_xx", "ntk_xx"), nngp_and_ntk(net, x)))
        kernels.update(zip(("nngp_tx", "ntk_tx"), nngp_and_ntk(net, xt, x)))
        kernels["nngp_tt"] = nngp_and_ntk(net, xt)[0]
    np.savez(args.out, mean=mean, cov=cov.detach().numpy(), **{k: v.detach().numpy() for k, v in kernels.items()})
    return {
        "versions": f"gpntk {getattr(gpntk, '__version__', '?')}, torch {torch.__version__}",
        "threads": f"torch intra-op threads {torch.get_num_threads()}, hyperparameters in "
                   f"{'float32 (as constructed)' if args.gpntk_float32_params else 'float64 (net.double())'}",
        "first": {"kernels": k_first, "predict": p_first, "total": first},
        "kernels": kern,
        "predict": pred,
        "eigh": eig,
        "cpu": cpu[1:],  # the timed repeats (the first entry is the warm-up)
        "rss_baseline_kib": baseline,
        "rss_peak_kib": peak,
        "rss_peak_reset": reset_ok,
        "warnings": sorted(set(caught)),
    }


def worker_nt(args) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    data = dict(np.load(args.data))
    x = jnp.asarray(data["x_train"])
    y = jnp.asarray(data["y_train"])
    xt = jnp.asarray(data["x_test"])
    times = jnp.asarray(data["times"])
    assert x.dtype == jnp.float64, x.dtype

    w_std, b_std = math.sqrt(args.weight_variance), math.sqrt(args.bias_variance)
    layers = []
    for _ in range(args.depth):
        layers += [stax.Dense(512, W_std=w_std, b_std=b_std), stax.Relu()]
    layers += [stax.Dense(1, W_std=w_std, b_std=b_std)]
    _, _, kernel_fn = stax.serial(*layers)
    kfn = kernel_fn if args.nt_no_jit else jax.jit(kernel_fn, static_argnames="get")

    def block(tree):
        return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)

    def role(a):
        if a is None:
            return None
        if a is x:
            return "train"
        if a is xt:
            return "test"
        return f"shape{tuple(a.shape)}"

    def key(x1, x2, get, kwargs):
        if kwargs:
            raise NotImplementedError(f"unexpected kernel_fn kwargs {kwargs}")
        return (role(x1), role(x2), get if isinstance(get, str) else tuple(get))

    arrays = {"train": x, "test": xt, None: None}

    def make_predictor(kernel_lookup):
        return nt.predict.gradient_descent_mse_ensemble(
            kernel_lookup, x, y, learning_rate=args.lr, diag_reg=args.diag_reg, diag_reg_absolute_scale=True
        )

    # warm-up: the whole pipeline with the real (jitted) kernel_fn, recording its calls
    calls: list = []

    def recording_kernel_fn(x1, x2=None, get=None, **kwargs):
        calls.append(key(x1, x2, get, kwargs))
        return kfn(x1, x2, get)

    baseline = status_kib("VmRSS") or 0
    reset_ok = reset_peak_rss()

    cpu: list[float] = []
    last_cache: dict = {}

    def run(record=False):
        last_cache.clear()  # let the previous repeat's kernels go, so the peak is that of one run
        c0, t0 = time.process_time(), time.perf_counter()
        if record:
            out = make_predictor(recording_kernel_fn)(t=times, x_test=xt, get=args.regime, compute_cov=True)
            block(out)
            t1 = time.perf_counter()
            cpu.append(time.process_time() - c0)
            return out, t1 - t0, 0.0
        cache = {}
        for k in calls:
            cache[k] = block(kfn(arrays[k[0]], arrays[k[1]], k[2]))
        t1 = time.perf_counter()

        def lookup(x1, x2=None, get=None, **kwargs):
            return cache[key(x1, x2, get, kwargs)]

        out = make_predictor(lookup)(t=times, x_test=xt, get=args.regime, compute_cov=True)
        block(out)
        last_cache.clear()
        last_cache.update(cache)
        t2, c2 = time.perf_counter(), time.process_time()
        cpu.append(c2 - c0)
        return out, t1 - t0, t2 - t1

    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, first, _ = run(record=True)
        del out
        kern, pred = [], []
        for i in range(args.repeats):
            out, k, p = run()
            kern.append(k)
            pred.append(p)
            if i + 1 < args.repeats:
                del out
        caught += [f"{rec.category.__name__}: {rec.message}" for rec in w]
    peak = peak_rss_kib(reset_ok)

    k_dd = kfn(x, None, args.regime)
    dyn = k_dd + args.diag_reg * jnp.eye(x.shape[0], dtype=x.dtype)
    block(jnp.linalg.eigh(dyn))  # compile
    eig = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        block(jnp.linalg.eigh(dyn))
        eig.append(time.perf_counter() - t0)

    mean = np.asarray(out.mean)
    cov = np.asarray(out.covariance)
    kernels = {}
    for (r1, r2, get), value in last_cache.items():
        for g in ("nngp", "ntk"):
            if get == g or (isinstance(get, tuple) and g in get):
                arr = value if isinstance(get, str) else getattr(value, g)
                pair = {("train", None): "xx", ("test", "train"): "tx", ("test", None): "tt"}[(r1, r2)]
                kernels[f"{g}_{pair}"] = np.asarray(arr)
    np.savez(args.out, mean=mean, cov=cov, **kernels)
    return {
        "versions": f"neural-tangents {nt.__version__}, jax {jax.__version__}, "
        f"kernel_fn {'eager' if args.nt_no_jit else 'jitted'}",
        "threads": f"XLA CPU devices {jax.device_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        "first": {"kernels": float("nan"), "predict": float("nan"), "total": first},
        "kernels": kern,
        "predict": pred,
        "eigh": eig,
        "cpu": cpu[1:],  # the timed repeats (the first entry is the warm-up)
        "kernel_calls": [list(map(str, c)) for c in calls],
        "rss_baseline_kib": baseline,
        "rss_peak_kib": peak,
        "rss_peak_reset": reset_ok,
        "warnings": sorted(set(caught)),
    }


# ---------------------------------------------------------------------------------------------
# orchestration
def make_data(args) -> dict:
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.d))
    xt = rng.standard_normal((args.m, args.d))
    w = rng.standard_normal((args.d, args.k)) / math.sqrt(args.d)
    y = np.sin(2 * x @ w) + 0.1 * rng.standard_normal((args.n, args.k))
    finite = np.logspace(args.log10_tmin, args.log10_tmax, args.num_times - 1)
    times = np.concatenate([finite, [np.inf]])
    return {"x_train": x, "y_train": y, "x_test": xt, "times": times}


def run_worker(lib: str, python: str, args, tmp: Path) -> dict:
    out = tmp / f"{lib}.npz"
    meta = tmp / f"{lib}.json"
    cmd = [
        python, os.path.abspath(__file__), "--worker", lib, "--data", str(tmp / "data.npz"), "--out", str(out),
        "--meta", str(meta), "--repeats", str(args.repeats), "--regime", args.regime, "--lr", str(args.lr),
        "--diag-reg", str(args.diag_reg), "--depth", str(args.depth),
        "--weight-variance", str(args.weight_variance), "--bias-variance", str(args.bias_variance),
    ]
    if args.nt_no_jit:
        cmd.append("--nt-no-jit")
    if args.gpntk_float32_params:
        cmd.append("--gpntk-float32-params")
    env = dict(os.environ)
    if args.threads:
        n = str(args.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
        if lib == "nt":
            # XLA's own matmuls are single-threaded with this flag; LAPACK (eigh) follows the BLAS
            # variables above. There is no XLA flag for an exact count > 1.
            if args.threads == 1:
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {lib} worker failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    result = json.loads(meta.read_text())
    result["load_before"] = load
    result["arrays"] = dict(np.load(out))
    return result


def compare(a: dict, b: dict, times: np.ndarray) -> dict:
    """max|a - b| / max|b| per time, for mean and cov; worst time and t = inf."""
    res = {}
    for name in ("mean", "cov"):
        x, ref = a[name], b[name]
        if x.shape != ref.shape:
            raise SystemExit(f"{name} shapes differ: {x.shape} vs {ref.shape}")
        per_t = np.array([np.abs(x[i] - ref[i]).max() / max(np.abs(ref[i]).max(), 1e-300) for i in range(len(times))])
        if not np.all(np.isfinite(per_t)):
            bad = [float(times[i]) for i in np.flatnonzero(~np.isfinite(per_t))]
            res[name] = {"worst": float("nan"), "at": bad[0], "at_index": int(np.flatnonzero(~np.isfinite(per_t))[0]),
                         "inf": float(per_t[-1]), "nonfinite_times": bad}
            continue
        i = int(per_t.argmax())
        res[name] = {"worst": float(per_t[i]), "at": float(times[i]), "at_index": i, "inf": float(per_t[-1]),
                     "median": float(np.median(per_t)), "per_t": per_t}
    return res


def reference_moments(kern: dict, y: np.ndarray, t_list, args) -> list[tuple[np.ndarray, np.ndarray]]:
    """A third, plain-numpy evaluation of the posterior from one library's kernels, for attribution.

    t = inf by a linear solve; a finite t with τ·λmax <= 2 by the Taylor series of
    A_t = τ·φ1(τG) (no eigendecomposition); other times by numpy's eigh.
    """
    n, k = y.shape
    if args.regime == "ntk":
        g_xx = kern["ntk_xx"] + args.diag_reg * np.eye(n)
        p_xx, g_tx, p_tx = kern["nngp_xx"], kern["ntk_tx"], kern["nngp_tx"]
    else:
        g_xx = kern["nngp_xx"] + args.diag_reg * np.eye(n)
        p_xx, g_tx, p_tx = g_xx, kern["nngp_tx"], kern["nngp_tx"]
    p_tt = kern["nngp_tt"]
    rhs = np.concatenate([y, g_tx.T], axis=1)  # (n, k + m)
    lam_max = np.linalg.eigvalsh(g_xx)[-1]
    eig = None
    out = []
    for t in t_list:
        if math.isinf(t):
            a_rhs = np.linalg.solve(g_xx, rhs)
        else:
            tau = args.lr * t / (n * k)
            if tau * lam_max <= 2:
                term = tau * rhs
                a_rhs = term.copy()
                for j in range(1, 200):
                    term = -tau * (g_xx @ term) / (j + 1)
                    a_rhs += term
                    if np.abs(term).max() <= 1e-18 * np.abs(a_rhs).max():
                        break
            else:
                if eig is None:
                    eig = np.linalg.eigh(g_xx)
                lam, vec = np.maximum(eig[0], 0), eig[1]
                z = tau * lam
                filt = np.where(z > 0, -np.expm1(-z) / np.where(z > 0, lam, 1.0), tau)
                a_rhs = vec @ (filt[:, None] * (vec.T @ rhs))
        a_y, w = a_rhs[:, :k], a_rhs[:, k:]  # A Y, A G_xt
        mean = g_tx @ a_y
        cross = p_tx @ w
        cov = p_tt - cross - cross.T + w.T @ p_xx @ w
        out.append((mean, (cov + cov.T) / 2))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def attribution(results: dict, data: dict, args, agreements: dict) -> None:
    """Where a gpntk / NT difference comes from: the kernels or the posterior algebra."""
    nt = results["nt"]["arrays"]
    print()
    print("Kernels: max|gpntk - NT| / max|NT| (train-train and test-test split into off-diagonal / diagonal)")
    for name in ("nngp_xx", "ntk_xx", "nngp_tx", "ntk_tx", "nngp_tt"):
        for lib in results:
            if lib == "nt" or name not in nt or name not in results[lib]["arrays"]:
                continue
            a, b = results[lib]["arrays"][name], nt[name]
            line = f"  {name:8s} {LABELS[lib]:22s} all {rel(a, b):.2e}"
            if name.endswith(("xx", "tt")):
                off = ~np.eye(a.shape[0], dtype=bool)
                line += (f"   off-diag {np.abs(a - b)[off].max() / np.abs(b).max():.2e}"
                         f"   diag {np.abs(np.diag(a) - np.diag(b)).max() / np.abs(b).max():.2e}")
            print(line)
            break  # the kernels do not depend on the grad mode
    times = data["times"]
    gp_lib = next(iter(agreements))
    agreement = agreements[gp_lib]
    picks = sorted({0, len(times) // 2, len(times) - 1} | {agreement[n]["at_index"] for n in ("mean", "cov")})
    t_list = [float(times[i]) for i in picks]
    y = data["y_train"]
    gp = results[gp_lib]["arrays"]
    print()
    print(f"Attribution at t = {', '.join(f'{t:.3g}' for t in t_list)}: a plain-numpy posterior (solve at t=inf,")
    print("Taylor series where τλmax <= 2, else numpy eigh) from each library's own kernels, and from the other's:")
    ref_gp = reference_moments(gp, y, t_list, args)
    ref_nt = reference_moments(nt, y, t_list, args)
    print(
        f"  {'t':>9s} | {'gpntk vs ref(gpntk K)':>23s} | {'NT vs ref(NT K)':>23s} | "
        f"{'ref(gpntk K) vs ref(NT K)':>25s}"
    )
    print(f"  {'':>9s} | {'mean':>11s} {'cov':>11s} | {'mean':>11s} {'cov':>11s} | {'mean':>12s} {'cov':>12s}")
    for j, i in enumerate(picks):
        (mg, cg), (mn, cn) = ref_gp[j], ref_nt[j]
        mean_g, cov_g = gp["mean"][i], gp["cov"][i]
        mean_n, cov_n = nt["mean"][i], nt["cov"][i]
        print(f"  {times[i]:9.3g} | {rel(mean_g, mg):11.2e} {rel(cov_g, cg):11.2e} | {rel(mean_n, mn):11.2e} "
              f"{rel(cov_n, cn):11.2e} | {rel(mg, mn):12.2e} {rel(cg, cn):12.2e}")
    print(f"  (gpntk columns from the '{LABELS[gp_lib]}' run)")


def fmt_mib(kib: int) -> str:
    return f"{kib / 1024:8.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="training points")
    p.add_argument("--d", type=int, default=32, help="input dimension")
    p.add_argument("--k", type=int, default=1, help="targets per point")
    p.add_argument("--m", type=int, default=500, help="test points")
    p.add_argument("--num-times", type=int, default=50, help="training times: num-times - 1 log-spaced, plus inf")
    p.add_argument("--log10-tmin", type=float, default=-1.0)
    p.add_argument("--log10-tmax", type=float, default=6.0)
    p.add_argument("--regime", choices=["ntk", "nngp"], default="ntk")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate (time is in steps)")
    p.add_argument("--diag-reg", type=float, default=0.0, help="absolute ridge on the training kernel")
    p.add_argument("--depth", type=int, default=3, help="hidden ReLU layers")
    p.add_argument("--weight-variance", type=float, default=2.0)
    p.add_argument("--bias-variance", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    p.add_argument("--libs", nargs="+", choices=LIBS, default=["gpntk", "nt"])
    p.add_argument("--nt-python", default=DEFAULT_NT_PYTHON, help="python of the Neural Tangents venv")
    p.add_argument("--gpntk-python", default=sys.executable, help="python of the gpntk venv")
    p.add_argument("--nt-no-jit", action="store_true", help="run NT's kernel_fn eagerly instead of jax.jit")
    p.add_argument("--gpntk-float32-params", action="store_true",
                   help="keep gpntk's layers in their default float32 (hyperparameters rounded to float32; "
                        "by default the net is converted with .double())")
    p.add_argument("--omp-passive", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE in the workers: OpenMP threads sleep instead of spinning "
                        "at barriers (much steadier on a machine shared with other jobs)")
    p.add_argument("--threads", type=int, default=0, help="limit BLAS/OMP/XLA threads (0: library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-attribution", action="store_true",
                   help="skip the kernel comparison and the numpy re-evaluation of the posterior")
    p.add_argument("--per-time", action="store_true", help="print the relative difference at every time")
    # worker-only
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--meta", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = worker_nt(args) if args.worker == "nt" else worker_gpntk(args)
        Path(args.meta).write_text(json.dumps(result))
        return

    if args.num_times < 2:
        p.error("--num-times must be >= 2")
    if "nt" in args.libs and not os.access(args.nt_python, os.X_OK):
        print(
            f"Neural Tangents' python not found at {args.nt_python}.\n"
            f"Create its virtual environment (about 2.6 GB, a few minutes) with\n    {INSTALL_HINT}\n"
            "or pass --nt-python PATH (or --libs gpntk gpntk-nograd to skip NT).",
            file=sys.stderr,
        )
        sys.exit(2)

    data = make_data(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="posterior_speed_") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "data.npz", **data)
        for lib in args.libs:
            python = args.nt_python if lib == "nt" else args.gpntk_python
            print(f"running {LABELS[lib]} ...", file=sys.stderr, flush=True)
            results[lib] = run_worker(lib, python, args, tmp)

    report(results, data, args)


def report(results: dict, data: dict, args) -> None:
    times = data["times"]
    print()
    print(
        f"Trained-ensemble posterior, depth-{args.depth} ReLU MLP (σw²={args.weight_variance}, "
        f"σb²={args.bias_variance}), regime={args.regime}, float64"
    )
    print(
        f"n={args.n} train, d={args.d}, k={args.k}, m={args.m} test, {len(times)} times "
        f"(logspace 1e{args.log10_tmin:g}..1e{args.log10_tmax:g} + inf), lr={args.lr:g}, "
        f"diag_reg={args.diag_reg:g}; mean and full covariance"
    )
    threads = "defaults" if not args.threads else args.threads
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, threads={threads}"
        f"{', OMP_WAIT_POLICY=PASSIVE' if args.omp_passive else ''}; medians of {args.repeats} repeats after 1 "
        "untimed warm-up run\n(compile time NOT in the medians; 'first' = the warm-up's wall time for the whole "
        "pipeline, incl. JAX compilation / first-call overheads)"
    )
    for lib, r in results.items():
        print(f"  {LABELS[lib]:22s} {r['versions']}; {r['threads']}; 1-min load avg before: {r['load_before']:.2f}")
    print()
    cols = ["kernels s", "predict s", "(eigh s)", "total s", "min tot s", "cpu s", "first s", "base MiB",
            "peak MiB", "peak-base"]
    header = f"{'':22s}" + "".join(f"{c:>11s}" for c in cols)
    print(header)
    print("-" * len(header))
    med = {}
    for lib, r in results.items():
        totals = [a + b for a, b in zip(r["kernels"], r["predict"])]
        med[lib] = {
            "kernels": _median(r["kernels"]), "predict": _median(r["predict"]), "eigh": _median(r["eigh"]),
            "total": _median(totals), "min": min(totals), "cpu": _median(r["cpu"]), "first": r["first"]["total"],
            "base": r["rss_baseline_kib"] / 1024, "peak": r["rss_peak_kib"] / 1024,
        }
        med[lib]["delta"] = med[lib]["peak"] - med[lib]["base"]
        row = med[lib]
        print(
            f"{LABELS[lib]:22s}"
            + "".join(f"{row[key]:11.3f}" for key in ("kernels", "predict", "eigh", "total", "min"))
            + "".join(f"{row[key]:11.2f}" for key in ("cpu", "first"))
            + "".join(f"{row[key]:11.0f}" for key in ("base", "peak", "delta"))
        )
    if "nt" in med:
        for lib in med:
            if lib == "nt":
                continue
            a, b = med["nt"], med[lib]
            ratios = {key: (a[key] / b[key] if b[key] > 0 else float("nan")) for key in a}
            cells = [f"{ratios[key]:10.2f}x" for key in ("kernels", "predict", "eigh", "total", "min", "cpu")]
            cells += [f"{'':11s}", f"{'':11s}"] + [f"{ratios[key]:10.2f}x" for key in ("peak", "delta")]
            print(f"{'NT / ' + LABELS[lib]:22s}" + "".join(cells))
    print(
        "ratios > 1: NT slower / uses more memory than gpntk. kernels = all kernel matrices; predict = eigh + all "
        "times' products;\n(eigh s) = the n x n eigendecomposition alone (part of predict); cpu = process CPU time "
        "of kernels+predict\n(all threads; steadier than wall time when other jobs share the machine)."
    )
    peak_reset = all(r["rss_peak_reset"] for r in results.values())
    print(
        "peak = VmHWM of the worker process "
        + ("reset after imports and data loading" if peak_reset else "(ru_maxrss, incl. imports)")
        + " (warm-up and repeats included); base = RSS after imports and data loading (NT imports TensorFlow)."
    )

    agreements = {}
    if "nt" in results:
        print()
        print("Agreement with Neural Tangents: max|Δ| / max|NT| per time (worst over the times, and at t = inf)")
        for lib in results:
            if lib == "nt":
                continue
            c = agreements[lib] = compare(results[lib]["arrays"], results["nt"]["arrays"], times)
            for name in ("mean", "cov"):
                e = c[name]
                line = (
                    f"  {LABELS[lib]:22s} {name:4s}: worst {e['worst']:.2e} at t={e['at']:.3g}, "
                    f"at t=inf {e['inf']:.2e}"
                )
                if "median" in e:
                    line += f", median over times {e['median']:.2e}"
                if "nonfinite_times" in e:
                    line += f"  NON-FINITE at t={e['nonfinite_times']}"
                print(line)
                if args.per_time and "per_t" in e:
                    print("      " + " ".join(f"{t:.3g}:{v:.1e}" for t, v in zip(times, e["per_t"])))
            worst = max(c["mean"]["worst"], c["cov"]["worst"])
            if not worst <= 1e-7:
                print(f"  WARNING: {LABELS[lib]} and NT differ by {worst:.2e} (> 1e-7): investigate")
    for lib, r in results.items():
        for w in r["warnings"]:
            print(f"  warning from {LABELS[lib]}: {w}")
    if agreements and not args.no_attribution:
        attribution(results, data, args, agreements)
    if "nt" in results:
        print(f"NT kernel_fn calls (timed under 'kernels'): {results['nt']['kernel_calls']}")


if __name__ == "__main__":
    main()
