"""Speed and memory of gpntk's dense NNGP / NTK kernels against Neural Tangents, BoTorch and the matmul floor.

For every configuration of the grid ``--n`` x ``--depth`` x ``--dtype`` x ``--activation`` the
kernels K(X, X) of an infinitely wide depth-``depth`` MLP (``depth`` hidden Dense + activation
layers and a Dense readout; σw² = 2, σb² = 0.1, NTK parameterization, input kernel x·x'/d) are
computed on the same inputs X (``n`` x ``--d`` standard normal, float64 data cast to the dtype) by

* ``gpntk``:        ``nngp_and_ntk(net, x)`` under ``torch.no_grad()``: NNGP and NTK from one pass,
  in the steady state of ``gpntk.settings.fusion("auto")`` (the default: torch.compile for
  evaluations of >= 2**23 numbers, i.e. n >= 2897 here, from the third evaluation of the same
  network on; the "fused" column says whether it applies; the benchmark sets ``fusion(True)``
  there so that the warm-up call is the compiling one);
* ``gpntk-eager``:  the same with ``fusion(False)`` (no torch.compile);
* ``gpntk-nngp``:   ``nngp_and_ntk(net, x, track_ntk=False)``: the NNGP alone (same fusion as ``gpntk``);
* ``nt``:           Neural Tangents, ``jax.jit(kernel_fn)(x, None, ("nngp", "ntk"))`` for
  ``stax.serial(*[Dense(1, W_std=√2, b_std=√0.1), Relu() | Erf()] * depth, Dense(1, ...))``;
  float64 through ``jax_enable_x64``, float32 without it;
* ``nt-nngp``:      the same, ``get="nngp"``;
* ``botorch``:      ``botorch.models.kernels.InfiniteWidthBNNKernel(depth)(x).to_dense()`` under
  ``torch.no_grad()`` (NNGP of a ReLU network only; skipped for other activations), with
  ``weight_var = 2``, ``bias_var = 0.1``. Its recursion starts from
  K⁰ = σw² x·x'/d + σb², the covariance of the first Dense layer's outputs under gpntk's input
  kernel x·x'/d, and applies ``depth`` ReLU + Dense steps, so ``depth`` means the same as for
  gpntk's ``mlp``: the kernels are the same function. BoTorch clamps the arccos argument to
  [-1 + acos_eps, 1 - acos_eps]; it is timed with its default ``acos_eps = 1e-7``, which perturbs
  the diagonal by about 1e-7 relative, so its agreement is reported both for the timed kernel and
  for ``acos_eps = 0`` (untimed, ``--botorch-acos-eps`` changes the timed value);
* ``matmul``:       ``x @ x.T`` in torch at the same dtype: the floor, one n x n output written once;
* ``matmul-hp``:    ``torch.mm(x, x.T, out=...)`` into an output allocated as gpntk allocates its kernel
  matrices (:func:`gpntk.kernels.memory.empty_matrix`: on transparent huge pages, where the first
  write to a fresh matrix costs a few hundred page faults instead of tens of thousands).

Each library runs in its own worker process (the script re-invokes itself with ``--worker``; NT
under ``--nt-python``), one configuration per process, the inputs passed through a temporary
``.npz`` and the kernels returned as temporary ``.npy`` files. Workers run one after the other,
never concurrently. Within a worker each measurement (e.g. gpntk, gpntk-eager, gpntk-nngp, in that
order) makes one untimed warm-up call, whose wall time is reported as "first call" (for gpntk with
fusion it includes torch.compile's tracing and the inductor compile or the load of its on-disk
cache, "cache" column: h = hit, m = miss; for NT the jit compile), then ``--repeats`` timed calls
(``--big-repeats`` for n >= ``--big-n``); the tables show medians. Results of one call are freed
before the next.

Memory: per measurement, the peak resident set size (VmHWM, reset after imports and data loading
and again after the warm-up call where the kernel allows it) minus the RSS at that reset: "peak"
over the timed calls, "first peak" over the warm-up call (which includes compilation). The
kernels themselves take n² x bytes x (2 for NNGP+NTK, 1 for NNGP) ("out MiB"). Inductor compiles
in worker subprocesses that are not counted. tracemalloc is not used: it cannot see torch / XLA
buffers.

Agreement: max|a - b| / max|b| over the whole matrices, for gpntk against NT (NNGP and NTK), the
eager and NNGP-only runs against NT, and BoTorch against gpntk's NNGP; in float32, also every
library against a float64 gpntk evaluation (eager, untimed, computed by the gpntk worker).

Threads: by default every library uses its own default (torch: one intra-op thread per core as
``torch.get_num_threads()`` reports; XLA: its Eigen pool over all CPUs). ``--threads k`` pins every
worker to the first k CPUs (sched_setaffinity, which both torch and XLA honour), sets
OMP/MKL/OPENBLAS_NUM_THREADS=k and ``torch.set_num_threads(k)``, and for k = 1 also
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``.

    .venv/bin/python benchmarks/kernel_speed.py                                     # the full grid (long)
    .venv/bin/python benchmarks/kernel_speed.py --n 4000 --depth 3 --dtype float64 --activation relu --repeats 5
    .venv/bin/python benchmarks/kernel_speed.py --n 1000 --libs gpntk nt matmul     # quick

Runtime (2-core CPU): n in {1000, 4000} x every depth, dtype and activation (24 configurations)
took 19 minutes, n = 8000, depth 3, ReLU, float64 alone 2 minutes; the full default grid (36
configurations) takes about an hour. Much of it is gpntk's first calls at n >= 2897: with a cold
inductor cache torch.compile takes 10-70 s per network and dtype (depth 10: about 60 s for
NNGP+NTK, 30 s more for the NNGP alone), with a warm one 5-15 s. Progress goes to stderr.
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
MEASUREMENTS = ("gpntk", "gpntk-eager", "gpntk-nngp", "nt", "nt-nngp", "botorch", "matmul", "matmul-hp")
WORKER_OF = {"gpntk": "gpntk", "gpntk-eager": "gpntk", "gpntk-nngp": "gpntk", "nt": "nt", "nt-nngp": "nt",
             "botorch": "botorch", "matmul": "matmul", "matmul-hp": "matmul"}
WORKERS = ("gpntk", "nt", "botorch", "matmul")
LABELS = {"gpntk": "gpntk", "gpntk-eager": "gpntk eager", "gpntk-nngp": "gpntk NNGP", "nt": "NT",
          "nt-nngp": "NT NNGP", "botorch": "BoTorch", "matmul": "X@X.T", "matmul-hp": "X@X.T hp"}
OUTPUTS = {"gpntk": ("nngp", "ntk"), "gpntk-eager": ("nngp", "ntk"), "gpntk-nngp": ("nngp",),
           "nt": ("nngp", "ntk"), "nt-nngp": ("nngp",), "botorch": ("nngp",), "matmul": (), "matmul-hp": ()}


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)
class Measurement:
    """Warm-up call, then ``repeats`` timed calls of ``fn``; peak RSS of each phase."""

    def __init__(self, fn, block, repeats: int):
        self.fn, self.block, self.repeats = fn, block, repeats

    def run(self) -> tuple[object, dict]:
        reset_ok = reset_peak_rss()
        base_first = status_kib("VmRSS") or 0
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.block(self.fn())
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        peak_first = peak_rss_kib()
        out = None
        reset_ok = reset_peak_rss() and reset_ok
        base = status_kib("VmRSS") or 0
        wall, cpu = [], []
        for _ in range(self.repeats):
            out = None  # free the previous call's kernels before the next call
            c0, t0 = time.process_time(), time.perf_counter()
            out = self.block(self.fn())
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peak = peak_rss_kib()
        return out, {
            "first": first, "first_cpu": first_cpu, "wall": wall, "cpu": cpu,
            "first_peak_kib": peak_first - base_first, "peak_kib": peak - base, "base_kib": base,
            "reset_ok": reset_ok,
        }


def _save(tmp: Path, name: str, arrays: dict) -> None:
    for key, value in arrays.items():
        np.save(tmp / f"{name}_{key}.npy", value)


def _set_threads_torch(torch, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# workers (one configuration each)
def worker_gpntk(spec: dict, tmp: Path) -> dict:
    import torch

    import gpntk
    from gpntk.kernels.dense import nngp_and_ntk
    from gpntk.kernels.fusion import FusionPolicy

    _set_threads_torch(torch, spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    x = torch.from_numpy(np.load(tmp / "data.npz")["x"]).to(dtype)
    net = gpntk.layers.mlp(spec["depth"], spec["activation"], spec["weight_variance"], spec["bias_variance"])
    if dtype == torch.float64:
        # hyperparameters are stored in float32; .double() gives the exact σb² = 0.1 of NT's float64 kernels
        net = net.double()
    elements = spec["n"] ** 2
    result = {
        "versions": f"gpntk {gpntk.__version__}, torch {torch.__version__}",
        "threads": f"torch {torch.get_num_threads()} intra-op threads",
        "fused": gpntk.settings.fusion.enabled_for(elements, False, gpntk.settings.FUSION_AFTER_CALLS),
        "measurements": {},
    }

    fusion = FusionPolicy()  # one owner for all calls, as a kernel object is for its evaluations

    def call(mode, track_ntk):
        def fn():
            with torch.no_grad(), gpntk.settings.fusion(mode):
                return nngp_and_ntk(net, x, track_ntk=track_ntk, fusion=fusion)
        return fn

    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        counters = None

    # fusion "auto" compiles a large evaluation from the third one of the same network on
    # (FUSION_AFTER_CALLS earlier ones run eagerly); the timed calls measure that steady state
    # directly, so the warm-up call is the one that compiles ("first call")
    steady = True if result["fused"] else "auto"
    plans = {"gpntk": (steady, True), "gpntk-nngp": (steady, False), "gpntk-eager": (False, True)}
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for name in spec["measurements"]:
            mode, track_ntk = plans[name]
            before = _inductor_counts(counters)
            out, stats = Measurement(call(mode, track_ntk), lambda o: o, spec["repeats"]).run()
            after = _inductor_counts(counters)
            stats["cache"] = {k: after[k] - before[k] for k in after}
            result["measurements"][name] = stats
            nngp, ntk = out
            arrays = {"nngp": nngp.numpy()}
            if track_ntk:
                arrays["ntk"] = ntk.numpy()
            _save(tmp, name, arrays)
            del out, nngp, ntk, arrays
        caught += [f"{rec.category.__name__}: {rec.message}" for rec in w]
    result["compiled"] = fusion.compiled and not fusion.failed
    result["compile_failed"] = fusion.failed
    if counters is not None:
        result["dynamo_stats"] = {k: int(v) for k, v in counters["stats"].items()}
    result["warnings"] = sorted(set(caught))
    if spec["f64_reference"]:
        with torch.no_grad(), gpntk.settings.fusion(False):
            nngp, ntk = nngp_and_ntk(net.double(), x.double())
        _save(tmp, "ref64", {"nngp": nngp.numpy(), "ntk": ntk.numpy()})
    return result


def _inductor_counts(counters) -> dict:
    if counters is None:
        return {"hit": 0, "miss": 0}
    c = counters["inductor"]
    return {"hit": int(c.get("fxgraph_cache_hit", 0)), "miss": int(c.get("fxgraph_cache_miss", 0))}


def worker_nt(spec: dict, tmp: Path) -> dict:
    import jax

    jax.config.update("jax_enable_x64", spec["dtype"] == "float64")
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    x = jnp.asarray(np.load(tmp / "data.npz")["x"].astype(spec["dtype"]))
    assert x.dtype == jnp.dtype(spec["dtype"]), x.dtype
    w_std, b_std = math.sqrt(spec["weight_variance"]), math.sqrt(spec["bias_variance"])
    act = {"relu": stax.Relu, "erf": stax.Erf}[spec["activation"]]
    layers = []
    for _ in range(spec["depth"]):
        layers += [stax.Dense(1, W_std=w_std, b_std=b_std), act()]
    layers += [stax.Dense(1, W_std=w_std, b_std=b_std)]
    _, _, kernel_fn = stax.serial(*layers)
    kfn = jax.jit(kernel_fn, static_argnames="get")

    def block(tree):
        return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)

    gets = {"nt": ("nngp", "ntk"), "nt-nngp": "nngp"}
    result = {
        "versions": f"neural-tangents {nt.__version__}, jax {jax.__version__}",
        "threads": f"XLA CPU, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        "measurements": {},
    }
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for name in spec["measurements"]:
            get = gets[name]
            out, stats = Measurement(lambda: kfn(x, None, get), block, spec["repeats"]).run()
            result["measurements"][name] = stats
            if isinstance(get, tuple):
                arrays = {g: np.asarray(getattr(out, g)) for g in get}
            else:
                arrays = {get: np.asarray(out)}
            _save(tmp, name, arrays)
            del out, arrays
        caught += [f"{rec.category.__name__}: {rec.message}" for rec in w]
    result["warnings"] = sorted(set(caught))
    return result


def worker_botorch(spec: dict, tmp: Path) -> dict:
    import botorch
    import torch
    from botorch.models.kernels import InfiniteWidthBNNKernel

    _set_threads_torch(torch, spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    x = torch.from_numpy(np.load(tmp / "data.npz")["x"]).to(dtype)

    def make(acos_eps):
        kernel = InfiniteWidthBNNKernel(depth=spec["depth"], acos_eps=acos_eps).to(dtype)
        # set after the dtype conversion, as tensors of the dtype: BoTorch's setters turn a Python float into a
        # tensor of torch's default dtype (float32) first, which would give σb² = 0.1000000015 in float64
        kernel.weight_var = torch.tensor(spec["weight_variance"], dtype=dtype)
        kernel.bias_var = torch.tensor(spec["bias_variance"], dtype=dtype)
        return kernel

    kernel = make(spec["botorch_acos_eps"])

    def fn():
        with torch.no_grad():
            return kernel(x).to_dense()

    result = {
        "versions": f"botorch {botorch.__version__}, torch {torch.__version__}",
        "threads": f"torch {torch.get_num_threads()} intra-op threads",
        "params": f"weight_var={kernel.weight_var.item()!r}, bias_var={kernel.bias_var.item()!r}, "
                  f"acos_eps={spec['botorch_acos_eps']:g}",
        "measurements": {},
    }
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, stats = Measurement(fn, lambda o: o, spec["repeats"]).run()
        caught += [f"{rec.category.__name__}: {rec.message}" for rec in w]
    result["measurements"]["botorch"] = stats
    _save(tmp, "botorch", {"nngp": out.numpy()})
    del out
    if spec["botorch_acos_eps"] != 0:  # untimed: the same kernel without the arccos clamp, for the agreement
        exact = make(0.0)
        with torch.no_grad():
            _save(tmp, "botorch0", {"nngp": exact(x).to_dense().numpy()})
    result["warnings"] = sorted(set(caught))
    return result


def worker_matmul(spec: dict, tmp: Path) -> dict:
    import torch

    _set_threads_torch(torch, spec["threads"])
    from gpntk.kernels.memory import empty_matrix

    x = torch.from_numpy(np.load(tmp / "data.npz")["x"]).to(getattr(torch, spec["dtype"]))
    n = x.shape[0]
    products = {
        "matmul": lambda: x @ x.T,
        # the same product into an output on transparent huge pages, as gpntk allocates its matrices
        "matmul-hp": lambda: torch.mm(x, x.T, out=empty_matrix((n, n), x)),
    }
    measured = {name: Measurement(products[name], lambda o: o, spec["repeats"]).run()[1]
                for name in spec["measurements"]}
    return {
        "versions": f"torch {torch.__version__}",
        "threads": f"torch {torch.get_num_threads()} intra-op threads",
        "measurements": measured,
        "warnings": [],
    }


# ---------------------------------------------------------------------------------------------
# orchestration
def run_worker(worker: str, spec: dict, tmp: Path, args) -> dict:
    python = args.nt_python if worker == "nt" else args.gpntk_python
    spec_path = tmp / f"{worker}_spec.json"
    meta = tmp / f"{worker}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [python, os.path.abspath(__file__), "--worker", worker, "--spec", str(spec_path), "--meta", str(meta)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cpus = None
    if args.threads:
        k = str(args.threads)
        env.update(OMP_NUM_THREADS=k, MKL_NUM_THREADS=k, OPENBLAS_NUM_THREADS=k)
        if worker == "nt" and args.threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]

    def preexec():  # runs in the child before exec: pin it (and the threads it will start) to the chosen CPUs
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {worker} worker failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    result = json.loads(meta.read_text())
    result["load_before"] = load
    result["process_s"] = time.perf_counter() - t0
    return result


def rel_error(a_path: Path, b_path: Path, rows: int = 512) -> tuple[float, float]:
    """``(max|a - b|, max off-diagonal |a - b|) / max|b|`` over whole matrices, read in row chunks (memory-mapped)."""
    a = np.load(a_path, mmap_mode="r")
    b = np.load(b_path, mmap_mode="r")
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: {a_path.name} {a.shape} vs {b_path.name} {b.shape}")
    diff = off = scale = 0.0
    for start in range(0, a.shape[0], rows):
        ca = np.asarray(a[start:start + rows], dtype=np.float64)
        cb = np.asarray(b[start:start + rows], dtype=np.float64)
        if not (np.all(np.isfinite(ca)) and np.all(np.isfinite(cb))):
            return float("nan"), float("nan")
        d = np.abs(ca - cb)
        diff = max(diff, float(d.max()))
        scale = max(scale, float(np.abs(cb).max()))
        i = np.arange(d.shape[0])
        d[i, start + i] = 0.0  # the diagonal of this row chunk
        off = max(off, float(d.max()))
    return diff / max(scale, 1e-300), off / max(scale, 1e-300)


def agreements(tmp: Path, cfg: dict, present: set) -> dict:
    """The relative differences of interest among the kernels the workers left in ``tmp``."""
    def have(name, out):
        return (tmp / f"{name}_{out}.npy").exists()

    pairs = {
        "gpntk~NT nngp": ("gpntk", "nt", "nngp"),
        "gpntk~NT ntk": ("gpntk", "nt", "ntk"),
        "eager~NT nngp": ("gpntk-eager", "nt", "nngp"),
        "eager~NT ntk": ("gpntk-eager", "nt", "ntk"),
        "nngp-only~NT": ("gpntk-nngp", "nt-nngp", "nngp"),
        "NT-nngp~NT": ("nt-nngp", "nt", "nngp"),
        "BoTorch~gpntk": ("botorch", "gpntk-nngp", "nngp"),
        "BoTorch(eps0)~gpntk": ("botorch0", "gpntk-nngp", "nngp"),
    }
    res = {}
    for label, (a, b, out) in pairs.items():
        if a.startswith("botorch") and not have(b, out):
            b = "gpntk" if have("gpntk", out) else "nt"  # BoTorch against whichever NNGP is there
        if have(a, out) and have(b, out):
            res[label] = rel_error(tmp / f"{a}_{out}.npy", tmp / f"{b}_{out}.npy")
    if cfg["dtype"] == "float32" and have("ref64", "nngp"):
        for name in ("gpntk", "gpntk-eager", "gpntk-nngp", "nt", "nt-nngp", "botorch", "botorch0"):
            for out in ("nngp", "ntk"):
                if have(name, out):
                    res[f"{name} {out}~f64"] = rel_error(tmp / f"{name}_{out}.npy", tmp / f"ref64_{out}.npy")
    return res


def make_x(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, n, d]).standard_normal((n, d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 8000], help="numbers of inputs")
    p.add_argument("--depth", type=int, nargs="+", default=[1, 3, 10], help="hidden layers")
    p.add_argument("--dtype", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    p.add_argument("--activation", nargs="+", choices=["relu", "erf"], default=["relu", "erf"])
    p.add_argument("--d", type=int, default=32, help="input dimension")
    p.add_argument("--weight-variance", type=float, default=2.0)
    p.add_argument("--bias-variance", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call (median)")
    p.add_argument("--big-n", type=int, default=8000, help="from this n on, --big-repeats timed calls")
    p.add_argument("--big-repeats", type=int, default=2, help="timed calls for n >= --big-n")
    p.add_argument("--libs", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                   help="measurements to run (grouped into one worker per library)")
    p.add_argument("--threads", type=int, default=0,
                   help="pin workers to this many CPUs and set torch / BLAS / OMP threads (0: library defaults)")
    p.add_argument("--botorch-acos-eps", type=float, default=1e-7, help="BoTorch's acos_eps for the timed kernel")
    p.add_argument("--no-f64-reference", action="store_true",
                   help="in float32, skip the (untimed) float64 gpntk kernels used to measure float32 errors")
    p.add_argument("--nt-python", default=DEFAULT_NT_PYTHON, help="python of the Neural Tangents venv")
    p.add_argument("--gpntk-python", default=sys.executable, help="python of the gpntk / BoTorch venv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write all raw results to this file")
    # worker-only
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--meta", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        fn = {"gpntk": worker_gpntk, "nt": worker_nt, "botorch": worker_botorch, "matmul": worker_matmul}[args.worker]
        Path(args.meta).write_text(json.dumps(fn(spec, Path(args.spec).parent)))
        return

    if {"nt", "nt-nngp"} & set(args.libs) and not os.access(args.nt_python, os.X_OK):
        p.error(f"Neural Tangents' python not found at {args.nt_python} (pass --nt-python, or leave nt out of --libs)")
    configs = [
        {"n": n, "depth": depth, "dtype": dtype, "activation": act}
        for n in args.n for depth in args.depth for dtype in args.dtype for act in args.activation
    ]
    rows = []
    t_start = time.perf_counter()
    for index, cfg in enumerate(configs, 1):
        repeats = args.big_repeats if cfg["n"] >= args.big_n else args.repeats
        wanted = [m for m in MEASUREMENTS if m in args.libs and not (m == "botorch" and cfg["activation"] != "relu")]
        tag = f"[{index}/{len(configs)}] n={cfg['n']} depth={cfg['depth']} {cfg['dtype']} {cfg['activation']}"
        row = {"config": cfg, "repeats": repeats, "workers": {}, "load": os.getloadavg()[0]}
        with tempfile.TemporaryDirectory(prefix="kernel_speed_") as tmp:
            tmp = Path(tmp)
            np.savez(tmp / "data.npz", x=make_x(cfg["n"], args.d, args.seed))
            for worker in WORKERS:
                names = [m for m in wanted if WORKER_OF[m] == worker]
                if not names:
                    continue
                spec = dict(cfg, measurements=names, repeats=repeats, threads=args.threads,
                            weight_variance=args.weight_variance, bias_variance=args.bias_variance,
                            botorch_acos_eps=args.botorch_acos_eps,
                            f64_reference=cfg["dtype"] == "float32" and not args.no_f64_reference)
                print(f"{tag}: {worker} ...", end="", file=sys.stderr, flush=True)
                r = run_worker(worker, spec, tmp, args)
                row["workers"][worker] = r
                meds = ", ".join(f"{m} {statistics.median(s['wall']):.3g}s" for m, s in r["measurements"].items())
                print(f" {r['process_s']:.1f}s ({meds})", file=sys.stderr, flush=True)
            row["agreement"] = agreements(tmp, cfg, set(wanted))
        rows.append(row)
    print(f"total {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
    report(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------
# report
def _stats(row: dict, name: str) -> dict | None:
    worker = row["workers"].get(WORKER_OF[name])
    return None if worker is None else worker["measurements"].get(name)


def _median(row: dict, name: str) -> float:
    s = _stats(row, name)
    return statistics.median(s["wall"]) if s and s["wall"] else float("nan")


def _cfg_cell(cfg: dict) -> str:
    return f"{cfg['n']:>6d} {cfg['depth']:>3d} {cfg['dtype'][5:]:>3s} {cfg['activation']:>4s}"


def _num(v: float, width: int = 8) -> str:
    if v != v:  # nan
        return f"{'-':>{width}s}"
    if v >= 100:
        return f"{v:{width}.1f}"
    if v >= 1:
        return f"{v:{width}.3f}"
    return f"{v:{width}.4f}"


def _ratio(a: float, b: float, width: int = 8) -> str:
    if a != a or b != b or b <= 0:
        return f"{'-':>{width}s}"
    return f"{a / b:{width - 1}.2f}x"


def report(rows: list[dict], args) -> None:
    print()
    print(f"Dense NNGP / NTK kernels K(X, X) of infinitely wide MLPs (σw²={args.weight_variance:g}, "
          f"σb²={args.bias_variance:g}, NTK parameterization), X: n x d={args.d} standard normal")
    threads = "library defaults" if not args.threads else f"{args.threads} (pinned)"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; threads: {threads}; medians of "
          f"{args.repeats} timed calls ({args.big_repeats} for n >= {args.big_n}) after 1 untimed warm-up call")
    seen = {}
    for row in rows:
        for worker, r in row["workers"].items():
            seen.setdefault(worker, f"{r['versions']}; {r['threads']}")
    for worker, text in seen.items():
        print(f"  {worker:8s} {text}")
    params = {}
    for row in rows:
        if "botorch" in row["workers"]:
            params.setdefault(row["config"]["dtype"], row["workers"]["botorch"]["params"])
    for dtype, text in params.items():
        print(f"  BoTorch kernel in {dtype}: {text}")

    cfg_head = f"{'n':>6s} {'dep':>3s} {'fp':>3s} {'act':>4s}"
    names = [m for m in MEASUREMENTS if any(_stats(r, m) for r in rows)]

    print()
    print("Wall time, median seconds (fused: whether gpntk's fusion 'auto' applied, i.e. torch.compile)")
    head = cfg_head + f" {'fused':>5s}" + "".join(f"{LABELS[m]:>12s}" for m in names)
    head += f"{'NT/gpntk':>10s}{'gpntk/mm':>10s}{'g/mm hp':>10s}{'BoT/gNNGP':>10s}{'NTnngp/g':>10s}{'eager/g':>10s}{'load':>6s}"
    print(head)
    print("-" * len(head))
    for row in rows:
        g = row["workers"].get("gpntk")
        fused = "-" if g is None else ("yes" if g["fused"] else "no")
        line = _cfg_cell(row["config"]) + f" {fused:>5s}" + "".join(_num(_median(row, m), 12) for m in names)
        line += _ratio(_median(row, "nt"), _median(row, "gpntk"), 10)
        line += _ratio(_median(row, "gpntk"), _median(row, "matmul"), 10)
        line += _ratio(_median(row, "gpntk"), _median(row, "matmul-hp"), 10)
        line += _ratio(_median(row, "botorch"), _median(row, "gpntk-nngp"), 10)
        line += _ratio(_median(row, "nt-nngp"), _median(row, "gpntk-nngp"), 10)
        line += _ratio(_median(row, "gpntk-eager"), _median(row, "gpntk"), 10)
        line += f"{row['load']:6.2f}"
        print(line)
    print("gpntk, gpntk eager, NT: NNGP and NTK together; gpntk NNGP, NT NNGP, BoTorch: NNGP alone; X@X.T: the "
          "floor; X@X.T hp: the same into an output on transparent huge pages (as gpntk's).\nRatios: NT/gpntk = NT "
          "(NNGP+NTK) / gpntk (NNGP+NTK); gpntk/mm = gpntk (NNGP+NTK) / X@X.T; g/mm hp = gpntk / X@X.T hp; "
          "BoT/gNNGP = BoTorch / gpntk NNGP;\nNTnngp/g = NT NNGP / gpntk NNGP; eager/g = gpntk eager / gpntk "
          "(the gain from fusion). load = 1-min load average before the configuration.")

    print()
    print("First call (the untimed warm-up), seconds: includes torch.compile for fused gpntk (cache: inductor "
          "FX-graph cache hits/misses), the jit for NT")
    head = cfg_head + "".join(f"{LABELS[m]:>12s}" for m in names) + f"{'cache h/m':>11s}"
    print(head)
    print("-" * len(head))
    for row in rows:
        line = _cfg_cell(row["config"])
        for m in names:
            s = _stats(row, m)
            line += _num(s["first"] if s else float("nan"), 12)
        cache = "-"
        g = row["workers"].get("gpntk")
        if g:
            hits = sum(s.get("cache", {}).get("hit", 0) for s in g["measurements"].values())
            miss = sum(s.get("cache", {}).get("miss", 0) for s in g["measurements"].values())
            cache = f"{hits}/{miss}"
        print(line + f"{cache:>11s}")

    print()
    reset_ok = all(s["reset_ok"] for row in rows for w in row["workers"].values() for s in w["measurements"].values())
    print("Peak memory, MiB above the RSS at the start of the phase ("
          + ("VmHWM reset after imports + data and after the warm-up" if reset_ok else
             "ru_maxrss/VmHWM NOT reset: includes imports and earlier phases") + "); timed calls | warm-up call")
    head = cfg_head + f"{'out MiB':>9s}" + "".join(f"{LABELS[m]:>16s}" for m in names) + f"{'NT/gpntk':>10s}"
    print(head)
    print("-" * len(head))
    for row in rows:
        cfg = row["config"]
        out_mib = cfg["n"] ** 2 * (4 if cfg["dtype"] == "float32" else 8) / 2**20
        line = _cfg_cell(cfg) + f"{out_mib:9.0f}"
        for m in names:
            s = _stats(row, m)
            line += f"{'-':>16s}" if s is None else f"{s['peak_kib'] / 1024:9.0f} |{s['first_peak_kib'] / 1024:5.0f}"
        sg, sn = _stats(row, "gpntk"), _stats(row, "nt")
        line += _ratio(sn["peak_kib"] / 1024, sg["peak_kib"] / 1024, 10) if sg and sn else f"{'-':>10s}"
        print(line)
    print("out MiB = one n x n kernel matrix (NNGP+NTK return two). RSS after imports + data, MiB: " + ", ".join(
        f"{w} {statistics.median([row['workers'][w]['measurements'][next(iter(row['workers'][w]['measurements']))]['base_kib'] for row in rows if w in row['workers']]) / 1024:.0f}"  # noqa: E501
        for w in WORKERS if any(w in row["workers"] for row in rows)))

    print()
    print("Agreement, max|a - b| / max|b|: whole matrices / off-diagonal entries only")
    labels = []
    for row in rows:
        for k in row["agreement"]:
            if k not in labels and not k.endswith("~f64"):
                labels.append(k)
    width = {k: max(len(k) + 2, 19) for k in labels}
    head = cfg_head + "".join(f"{k:>{width[k]}s}" for k in labels)
    print(head)
    print("-" * len(head))
    worst = {}
    for row in rows:
        line = _cfg_cell(row["config"])
        for k in labels:
            v = row["agreement"].get(k)
            line += f"{'-':>{width[k]}s}" if v is None else f"{f'{v[0]:.1e} / {v[1]:.1e}':>{width[k]}s}"
        print(line)
        for k, v in row["agreement"].items():
            key = (row["config"]["dtype"], k)
            old = worst.get(key, (0.0, 0.0))
            worst[key] = tuple(max(o, n) if n == n else float("nan") for o, n in zip(old, v))
    f32 = [(k, v) for (dtype, k), v in worst.items() if k.endswith("~f64")]
    if f32:
        print("float32 kernels against gpntk's float64 kernels (whole / off-diagonal), worst over the float32 "
              "configurations:")
        for i in range(0, len(f32), 4):
            print("  " + ", ".join(f"{k[:-4]} {v[0]:.1e} / {v[1]:.1e}" for k, v in f32[i:i + 4]))
    for (dtype, k), (whole, off) in worst.items():
        limit = 1e-10 if dtype == "float64" else 1e-4
        if k.startswith("BoTorch~") and args.botorch_acos_eps:
            limit = max(limit, 1e-5)  # the acos clamp
        if not off <= limit:
            print(f"  WARNING: {k} in {dtype}: off-diagonal entries differ by {off:.2e} (> {limit:g})")
        elif not whole <= limit:
            print(f"  note: {k} in {dtype}: only the diagonal differs by more than {limit:g} ({whole:.2e})")
    caught: dict = {}
    for row in rows:
        for worker, r in row["workers"].items():
            for w in r.get("warnings", []):
                caught.setdefault((worker, w), []).append(row["config"])
            if worker == "gpntk" and r.get("compile_failed"):
                print(f"  gpntk's torch.compile failed at {_cfg_cell(row['config']).split()} (ran eagerly)")
    for (worker, w), where in caught.items():
        print(f"  warning from the {worker} worker ({len(where)} of {len(rows)} configurations): {w}")


if __name__ == "__main__":
    main()
