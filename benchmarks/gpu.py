"""GPU benchmark: dense, blockwise and KeOps kernel products, an ExactGP MLL step and a posterior at rising n.

One prepared run that measures what ``kernel_backend("auto")`` needs to choose a matrix-free
backend on a CUDA device (``gpntk/kernels/measured_backends.py``), in at most about 8 minutes
including cold KeOps compiles:

    python benchmarks/gpu.py                     # on a CUDA machine: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --cpu-smoke         # anywhere: tiny sizes and budgets (what the tests run)
    python benchmarks/gpu.py --recommend benchmarks/results/gpu.json   # the table entry it supports
    python benchmarks/gpu.py --apply benchmarks/results/gpu.json       # write that entry into the table

The model: the NTK of a depth-``--depth`` (3) ReLU mlp, σw² = 2, σb² = 0.1, on ``n`` x ``--d``
(16) inputs uniform in [0, 1]^d, y = sin(6 x_0) + 0.1 noise. Backends: ``dense``
(``gpntk.kernels.dense.evaluate``, the matrix stored), ``blockwise``
(``gpntk.kernels.blockwise``, recomputed block by block) and ``keops`` (``gpntk.contrib.keops``).

1. **Agreement** at the smallest size, before any timing: ``K @ V`` of every backend and dtype
   against a float64 dense reference, max|a - ref| / max|ref| (tolerance 1e-9 in float64, 1e-3
   in float32). The first KeOps call of each dtype compiles its formula (a cold compile, cached
   under ``.cache/keops`` of the checkout); its time is recorded.
2. **Products** ``K @ V`` (``--columns`` 8 columns, what a CG iteration multiplies) per backend and
   dtype (``--dtypes``, default float32 and float64) at ``--product-sizes`` (1e4 ... 1e5; KeOps on to
   1e6). Dense: building K, then the stored product is timed too (``matmul_s``).
3. **MLL step**: one Adam step of GPyTorch's ``ExactMarginalLogLikelihood`` (forward + backward) of
   ``ScaleKernel(NTKKernel(net, backend=...))`` with a constant mean and a Gaussian likelihood, on
   GPyTorch's CG path (``max_cholesky_size`` ``--max-cholesky``, 800), at ``--mll-sizes``
   in ``--model-dtype`` (float32). The first step's loss (same seed, same probe vectors) is
   recorded per backend.
4. **Posterior**: ``TrainedEnsemble(net, x, y, diag_reg=1e-3, solver="lanczos",
   train_product=...)``, then ``moments(x_test, t=10, "ntk", diag=True)`` at ``--test`` points:
   dense stored products, blockwise (the default ``train_product``) or KeOps products.

Each (phase, backend, dtype) walks its sizes upwards while its time budget lasts
(``--product-budget``, ``--mll-budget``, ``--posterior-budget`` seconds): a size runs only if
the previous one's cost, scaled by (n_next / n)², fits both that budget and the global deadline
(``--deadline`` seconds after the start, 450); first-call compile time counts against the deadline
only. Each measurement makes one untimed first call
(compile, warm-up; blockwise products make ``FUSION_AFTER_CALLS`` more at their first size so
that fusion "auto" reaches its steady state), then up to ``--repeats`` (3) timed calls, fewer when
the budget runs out; ``torch.cuda.synchronize()`` around each. Reported: the median, the first
call, the number of repeats, and the peak memory above the start of the call
(``torch.cuda.max_memory_allocated`` on CUDA, which does not see KeOps' own buffers; the resident
set on CPU). Dense sizes that would not fit in free GPU memory are skipped; a failure (out of
memory, a KeOps or compile error) is recorded and ends that backend's ladder, never the run.

Robustness: the run is a supervisor (no torch) and a worker process. The worker rewrites the JSON
(``--out``, default ``benchmarks/results/gpu.json``) after every measurement and names the one in
progress; if it dies (a CUDA error) or passes the deadline, the supervisor records the failure and
restarts it on the remaining work (at most twice) or stops it. The JSON holds the device name,
versions, the configuration, the agreement checks, every measurement, why each ladder stopped and
the recommended table entry (``recommend``: KeOps only where it agreed and was faster than
blockwise at every size both measured from ``keops_from_rows`` on, for products and MLL steps).

Threads: ``--threads`` (1) intra-op threads. ``--cpu-smoke`` (automatic without CUDA): sizes 200,
400, 800, budgets of a few seconds, CG from 100 rows on; it checks the script, not the hardware,
and ``--apply`` refuses its results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
TABLE_MODULE = ROOT / "gpntk" / "kernels" / "measured_backends.py"
BACKENDS = ("dense", "blockwise", "keops")
PHASES = ("product", "mll", "posterior")
TOLERANCE = {"float64": 1e-9, "float32": 1e-3}
DECIDING_PHASES = ("product", "mll")  # what choose_backend's choice affects (the posterior takes its own product)
#: n x n matrices a dense measurement holds at its peak (products: Σ, Θ and blocks; MLL: the autograd graph)
DENSE_MATRICES = {"product": 3, "mll": 24, "posterior": 3}

GPU_DEFAULTS = {
    "product_sizes": [10_000, 20_000, 50_000, 100_000], "keops_product_sizes": [200_000, 500_000, 1_000_000],
    "mll_sizes": [10_000, 20_000, 50_000, 100_000], "posterior_sizes": [10_000, 20_000, 50_000, 100_000],
    "product_budget": 25.0, "mll_budget": 40.0, "posterior_budget": 30.0, "deadline": 450.0,
    "max_cholesky": 800, "test": 1000, "repeats": 3,
}
SMOKE_DEFAULTS = {
    "product_sizes": [200, 400, 800], "keops_product_sizes": [], "mll_sizes": [200, 400],
    "posterior_sizes": [200, 400], "product_budget": 3.0, "mll_budget": 4.0, "posterior_budget": 4.0,
    "deadline": 240.0, "max_cholesky": 100, "test": 50, "repeats": 2,
}


# --- results file ---------------------------------------------------------------------------------
def load_results(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_results(results: dict, path: Path) -> None:
    """Atomically (a temporary file, then a rename): a killed run leaves the last complete JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def family_key(phase: str, backend: str, dtype: str) -> str:
    return f"{phase}/{backend}/{dtype}"


def families_started(results: dict) -> set[str]:
    """Families with a measurement or a stop recorded (a resumed worker skips them)."""
    done = {family_key(m["phase"], m["backend"], m["dtype"]) for m in results.get("measurements", [])}
    return done | {s["family"] for s in results.get("stops", [])}


# --- the recommendation: the table entry a results file supports ----------------------------------
def recommend(results: dict, evidence: str | None = None) -> dict:
    """The ``MeasuredBackend`` fields (a dict) ``results`` supports for its device class.

    KeOps only if every KeOps agreement check passed and, at every size ``n >= keops_from_rows``
    where KeOps and blockwise both completed a product or MLL measurement (any dtype), KeOps'
    median was lower in all of them; ``keops_from_rows`` is the smallest such measured size.
    Otherwise blockwise. ``evidence``: the results file's repository path.
    """
    entry = {
        "device_class": results.get("device_class", "cpu"), "matrix_free": "blockwise", "keops_from_rows": 0,
        "evidence": evidence, "device": results.get("device", ""),
    }
    checks = [a for a in results.get("agreement", []) if a["backend"] == "keops"]
    agreed = bool(checks) and all(a.get("ok") for a in checks)
    wins = _keops_wins(results)
    if not agreed or not wins:
        why = ("KeOps not measured" if not checks else "KeOps did not pass the agreement check" if not agreed
               else "KeOps and blockwise never both measured")
        entry["summary"] = f"blockwise: {why}" + _ratio_text(results)
        return entry
    sizes = sorted(wins)
    start = None
    for n in reversed(sizes):  # the smallest n from which KeOps wins at every measured size
        if not wins[n]:
            break
        start = n
    if start is None:
        entry["summary"] = "blockwise: KeOps slower at the largest common size" + _ratio_text(results)
        return entry
    entry.update(matrix_free="keops", keops_from_rows=start)
    entry["summary"] = f"KeOps faster than blockwise from n = {start}" + _ratio_text(results)
    return entry


def _medians(results: dict, backend: str) -> dict[tuple[str, str, int], float]:
    return {
        (m["phase"], m["dtype"], m["n"]): m["median_s"]
        for m in results.get("measurements", [])
        if m["backend"] == backend and m["status"] == "ok" and m["phase"] in DECIDING_PHASES
    }


def _keops_wins(results: dict) -> dict[int, bool]:
    """Per size measured by both: whether KeOps was faster than blockwise in every phase and dtype there."""
    keops, blockwise = _medians(results, "keops"), _medians(results, "blockwise")
    wins: dict[int, bool] = {}
    for key in keops.keys() & blockwise.keys():
        wins[key[2]] = wins.get(key[2], True) and keops[key] < blockwise[key]
    return wins


def _ratio_text(results: dict) -> str:
    """``; KeOps / blockwise: product float32 0.41x at n = 100000, ...`` at each phase's largest common n."""
    keops, blockwise = _medians(results, "keops"), _medians(results, "blockwise")
    common = keops.keys() & blockwise.keys()
    parts = []
    for phase, dtype in sorted({(p, d) for p, d, _ in common}):
        n = max(k[2] for k in common if k[:2] == (phase, dtype))
        parts.append(f"{phase} {dtype} {keops[phase, dtype, n] / blockwise[phase, dtype, n]:.2f}x at n = {n}")
    return "; KeOps / blockwise: " + ", ".join(parts) if parts else ""


def entry_source(entry: dict) -> str:
    """The entry as the lines of ``MEASURED_BACKENDS`` in ``gpntk/kernels/measured_backends.py``."""
    cls = entry["device_class"]
    evidence = "None" if entry["evidence"] is None else json.dumps(entry["evidence"])
    return (
        f"    {json.dumps(cls)}: MeasuredBackend(\n"
        f"        {json.dumps(cls)}, {json.dumps(entry['matrix_free'])}, keops_from_rows={entry['keops_from_rows']},\n"
        f"        evidence={evidence},\n"
        f"        device={json.dumps(entry['device'])},\n"
        f"        summary={json.dumps(entry['summary'])},\n"
        f"    ),\n"
    )


def apply_entry(entry: dict, module: Path = TABLE_MODULE) -> None:
    """Replace the device class's entry between ``# begin <class>`` and ``# end <class>`` in ``module``."""
    cls = entry["device_class"]
    lines = module.read_text().splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.strip().startswith(f"# begin {cls}")]
    end = [i for i, line in enumerate(lines) if line.strip() == f"# end {cls}"]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise SystemExit(f"{module} has no '# begin {cls}' ... '# end {cls}' block: edit the table by hand")
    lines[begin[0] + 1: end[0]] = [entry_source(entry)]
    module.write_text("".join(lines))


def evidence_path(path: Path) -> str:
    """The results file as a repository path (the table cites it; it must be committed with the entry)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        raise SystemExit(f"{path} is outside the repository: save it under benchmarks/results/ and commit it") from None


def recommend_command(path: Path, apply: bool) -> None:
    results = load_results(path)
    if results.get("config", {}).get("smoke") and apply:
        raise SystemExit(f"{path} is a --cpu-smoke run: tiny sizes are no measurement, the table keeps its entry")
    entry = recommend(results, evidence_path(path) if apply else str(path))
    print(entry_source(entry), end="")
    if apply:
        apply_entry(entry)
        print(f"written into {TABLE_MODULE.relative_to(ROOT)}; commit it together with {entry['evidence']}")


# --- the worker: timing ------------------------------------------------------------------------------
class Clock:
    """The global deadline and one family's budget."""

    def __init__(self, deadline_at: float, budget: float) -> None:
        self.deadline_at, self.budget, self.spent = deadline_at, budget, 0.0

    def left(self, running: float = 0.0) -> float:
        """Seconds left, ``running`` seconds into a measurement not yet added to ``spent``."""
        return min(self.budget - self.spent - running, self.deadline_at - time.time())


class Device:
    """Synchronization and peak memory on the benchmark's device (CUDA, or the CPU's resident set)."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> int:
        """Start a peak measurement; returns the current level."""
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return int(self.torch.cuda.memory_allocated())
        from _memory import reset_peak_rss, status_kib

        self._reset_ok = reset_peak_rss()
        return (status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated())
        from _memory import peak_rss_kib

        return peak_rss_kib(getattr(self, "_reset_ok", False)) * 1024

    def free_bytes(self) -> int | None:
        return int(self.torch.cuda.mem_get_info()[0]) if self.cuda else None

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def timed(call: Callable[[], Any], dev: Device, clock: Clock, repeats: int, warmups: int = 0) -> dict:
    """One first call (plus ``warmups`` untimed ones), then up to ``repeats`` timed calls within ``clock``."""
    start = time.perf_counter()
    base = dev.reset_peak()
    dev.sync()
    out = call()
    dev.sync()
    first = time.perf_counter() - start
    first_peak = dev.peak() - base
    values = out[1] if isinstance(out, tuple) else {}
    out = None
    for _ in range(warmups):
        call()
        dev.sync()
    times: list[float] = []
    base = dev.reset_peak()
    while len(times) < repeats and (not times or clock.left(time.perf_counter() - start) > times[-1]):
        dev.sync()
        t0 = time.perf_counter()
        out = call()
        dev.sync()
        times.append(time.perf_counter() - t0)
        out = None
    peak = dev.peak() - base
    return {
        "first_s": first, "times_s": times, "median_s": statistics.median(times), "repeats": len(times),
        "peak_bytes": max(peak, 0), "first_peak_bytes": max(first_peak, 0), "values": values,
        "wall_s": time.perf_counter() - start,
    }


# --- the worker: what is measured ------------------------------------------------------------------
class Problem:
    """Data, network and hyperparameters of one size and dtype, on the device."""

    def __init__(self, torch: Any, n: int, dtype: Any, device: Any, args: argparse.Namespace) -> None:
        from gpntk import layers as L
        from gpntk.core.hyperparameters import Hyperparameters

        g = torch.Generator().manual_seed(0)
        x = torch.rand(n + args.test, args.d, generator=g, dtype=torch.float64)
        y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n + args.test, generator=g, dtype=torch.float64)
        self.x, self.x_test = x[:n].to(device, dtype), x[n:].to(device, dtype)
        self.y = y[:n].to(device, dtype)
        self.v = torch.randn(n, args.columns, generator=g, dtype=torch.float64).to(device, dtype)
        self.net = L.mlp(args.depth, "relu", weight_variance=2.0, bias_variance=0.1)
        self.hyper = {k: t.detach() for k, t in Hyperparameters.collect(self.net, like=self.x).items()}


def product_call(backend: str, p: Problem, fusion: Any) -> Callable[[], Any]:
    """One product ``K @ V`` (dense: build K, then multiply)."""
    from gpntk.kernels.blockwise import kernel_matmul
    from gpntk.kernels.dense import evaluate

    if backend == "dense":
        return lambda: evaluate(p.net, p.x, p.x, p.hyper, track_ntk=True, fusion=fusion)[1] @ p.v
    if backend == "blockwise":
        return lambda: kernel_matmul(p.net, p.x, p.x, p.hyper, p.v, fusion=fusion)[0]
    if backend == "keops":
        from gpntk.contrib.keops import keops_covariance

        return lambda: keops_covariance(p.x, p.x, net=p.net, output="ntk", hyper=p.hyper) @ p.v
    raise ValueError(f"unknown backend {backend!r}")


def stored_matmul(p: Problem, dev: Device, repeats: int) -> float:
    """The median time of ``K @ V`` with the dense K stored (what each CG iteration costs then)."""
    from gpntk.kernels.dense import evaluate

    k = evaluate(p.net, p.x, p.x, p.hyper, track_ntk=True)[1]
    times = []
    for _ in range(max(repeats, 1)):
        dev.sync()
        t0 = time.perf_counter()
        k @ p.v
        dev.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mll_call(torch: Any, backend: str, p: Problem, max_cholesky: int) -> Callable[[], Any]:
    """One Adam step of the exact marginal likelihood (forward + backward), on the CG path."""
    import gpytorch

    import gpntk

    x, y = p.x, p.y

    class GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(p.net, backend=backend))

        def forward(self, z: Any) -> Any:
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().to(device=x.device, dtype=x.dtype)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(0)  # the same CG probe vectors for every backend

    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        with gpytorch.settings.max_cholesky_size(max_cholesky):
            loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        return None, {"loss": loss.item()}

    return step


def posterior_call(backend: str, p: Problem) -> Callable[[], Any]:
    """A trained ensemble (Lanczos) and its mean and variances at the test points."""
    from gpntk import TrainedEnsemble
    from gpntk.kernels.dense import evaluate

    def product_of(matrices: dict) -> Callable[..., Any]:
        return lambda v, kinds: tuple(matrices[kind] @ v for kind in kinds)

    def call() -> Any:
        product = None
        if backend == "dense":
            cov, ntk = evaluate(p.net, p.x, p.x, p.hyper, track_ntk=True)
            product = product_of({"nngp": cov, "ntk": ntk})
        elif backend == "keops":
            from gpntk.contrib.keops import keops_covariance

            product = product_of(
                {k: keops_covariance(p.x, p.x, net=p.net, output=k, hyper=p.hyper) for k in ("nngp", "ntk")}
            )
        ensemble = TrainedEnsemble(
            p.net, p.x, p.y, learning_rate=1.0, diag_reg=1e-3, solver="lanczos", train_product=product
        )
        mean, variance = ensemble.moments(p.x_test, 10.0, "ntk", diag=True)
        return (mean, variance), {"num_products": ensemble.num_products, "mean_norm": float(mean.norm())}

    return call


# --- the worker: agreement and the ladders ----------------------------------------------------------
class Run:
    """The results being written (after every measurement), the device and the deadline."""

    def __init__(self, results: dict, out: Path, dev: Device, deadline_at: float, args: argparse.Namespace) -> None:
        self.results, self.out, self.dev, self.deadline_at, self.args = results, out, dev, deadline_at, args
        self.t0 = time.time()

    def save(self, current: dict | None = None) -> None:
        self.results["current"] = current
        self.results["elapsed_s"] = time.time() - self.results["started_at"]
        write_results(self.results, self.out)

    def log(self, text: str) -> None:
        print(f"[{time.time() - self.results['started_at']:6.1f} s] {text}", flush=True)

    def stop(self, family: str, reason: str) -> None:
        self.results["stops"].append({"family": family, "reason": reason})
        self.save()
        self.log(f"{family}: stop ({reason})")


def _relative(a: Any, b: Any) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def agreement(run: Run, torch: Any, backends: list[str]) -> None:
    """Every backend's and dtype's ``K @ V`` against a float64 dense reference at the smallest size."""
    if run.results.get("agreement_done"):
        return
    from gpntk.kernels.dense import evaluate

    args, dev = run.args, run.dev
    n = args.product_sizes[0]
    ref_problem = Problem(torch, n, torch.float64, dev.device, args)
    ref = evaluate(ref_problem.net, ref_problem.x, ref_problem.x, ref_problem.hyper)[1] @ ref_problem.v
    for dtype in args.dtypes:
        p = Problem(torch, n, getattr(torch, dtype), dev.device, args)
        for backend in backends:
            check: dict[str, Any] = {"backend": backend, "dtype": dtype, "n": n, "tolerance": TOLERANCE[dtype]}
            run.save(current={"phase": "agreement", **check})
            start = time.perf_counter()
            try:
                out = product_call(backend, p, None)()
                dev.sync()
                check.update(first_s=time.perf_counter() - start, rel_err=_relative(out, ref))
                check["ok"] = check["rel_err"] <= TOLERANCE[dtype]
            except Exception as error:  # recorded, never fatal: a backend that fails is not chosen
                check.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
                check["first_s"] = time.perf_counter() - start
            run.results["agreement"].append(check)
            run.save()
            verdict = f"rel. error {check['rel_err']:.2e} ({'ok' if check['ok'] else 'FAILED'})" \
                if "rel_err" in check else f"failed: {check['error']}"
            run.log(f"agreement {backend} {dtype} n={n}: {verdict}, first call {check['first_s']:.1f} s")
        del p
    run.results["agreement_done"] = True
    run.save()
    dev.clean()


def make_call(
    torch: Any, phase: str, backend: str, p: Problem, fusion: Any, args: argparse.Namespace
) -> Callable[[], Any]:
    if phase == "product":
        return product_call(backend, p, fusion)
    if phase == "mll":
        return mll_call(torch, backend, p, args.max_cholesky)
    return posterior_call(backend, p)


def measure(run: Run, torch: Any, phase: str, backend: str, dtype: str, n: int, fusion: Any, warmups: int,
            clock: Clock) -> dict:
    """One measurement (recorded whatever happens)."""
    args, dev = run.args, run.dev
    record: dict[str, Any] = {"phase": phase, "backend": backend, "dtype": dtype, "n": n}
    run.save(current=dict(record))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = Problem(torch, n, getattr(torch, dtype), dev.device, args)
            record.update(timed(make_call(torch, phase, backend, p, fusion, args), dev, clock, args.repeats, warmups))
            if phase == "product" and backend == "dense":
                record["matmul_s"] = stored_matmul(p, dev, args.repeats)
        record["status"] = "ok"
        record["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})[:3]
    except Exception as error:  # out of memory, a KeOps or compiler failure: recorded, the run goes on
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:400])
    record["wall_s"] = time.perf_counter() - start
    # a compile in the first call counts against the deadline, not against the ladder's budget
    compile_s = max(record.get("first_s", 0.0) - record.get("median_s", 0.0), 0.0)
    clock.spent += record["wall_s"] - compile_s
    run.results["measurements"].append(record)
    run.save()
    p = None
    dev.clean()
    if record["status"] == "ok":
        run.log(f"{phase} {backend} {dtype} n={n}: median {record['median_s']:.4g} s over {record['repeats']} "
                f"(first {record['first_s']:.3g} s), peak {record['peak_bytes'] / 2**20:.0f} MiB")
    else:
        run.log(f"{phase} {backend} {dtype} n={n}: FAILED {record['error']}")
    return record


def ladder(run: Run, torch: Any, phase: str, backend: str, dtype: str, sizes: list[int], budget: float) -> None:
    """Rising sizes of one (phase, backend, dtype) while its budget and the deadline last."""
    family = family_key(phase, backend, dtype)
    if family in families_started(run.results):
        return  # a resumed run: done (or failed) before
    from gpntk import settings
    from gpntk.kernels.fusion import FusionPolicy

    clock, fusion, last = Clock(run.deadline_at, budget), FusionPolicy(), None
    itemsize = 8 if dtype == "float64" else 4
    for i, n in enumerate(sizes):
        warmups = getattr(settings, "FUSION_AFTER_CALLS", 2) if i == 0 and phase == "product" else 0
        if last is not None:
            estimate = last["median_s"] * (2 + warmups) * (n / last["n"]) ** 2
            if estimate > clock.left():
                return run.stop(family, f"budget: n = {n} would take about {estimate:.0f} s, {clock.left():.0f} s left")
        if clock.left() <= 0:
            return run.stop(family, "deadline or budget spent")
        free = run.dev.free_bytes()
        need = DENSE_MATRICES[phase] * n * n * itemsize
        if backend == "dense" and free is not None and need > 0.9 * free:
            return run.stop(family, f"dense n = {n} needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        last = measure(run, torch, phase, backend, dtype, n, fusion, warmups, clock)
        if last["status"] != "ok":
            return run.stop(family, "failed")
    run.stop(family, "all sizes done")


def device_name(torch: Any, device: Any) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def keops_status() -> tuple[str | None, str | None]:
    """``(pykeops version, why KeOps cannot run)``."""
    try:
        import pykeops
    except ImportError as error:
        return None, f"pykeops is not installed ({error})"
    return getattr(pykeops, "__version__", "?"), None


def header(torch: Any, device: Any, args: argparse.Namespace, started_at: float) -> dict:
    import gpntk

    version, _ = keops_status()
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "resume", "deadline_at", "recommend", "apply")}
    return {
        "script": "benchmarks/gpu.py", "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "started_at": started_at, "device_class": device.type, "device": device_name(torch, device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpntk": gpntk.__version__, "pykeops": version,
        "keops_cache": os.environ.get("KEOPS_CACHE_FOLDER"), "threads": torch.get_num_threads(),
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "config": config, "agreement": [], "measurements": [], "stops": [], "current": None, "finished": False,
    }


def worker(args: argparse.Namespace) -> None:
    """Measure everything within the deadline, writing ``args.out`` as it goes."""
    os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))  # before pykeops is imported
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    out = Path(args.out)
    if args.resume and out.exists():
        results = load_results(out)
    else:
        results = header(torch, device, args, args.started_at)
        write_results(results, out)
    dev = Device(torch, device)
    run = Run(results, out, dev, args.deadline_at, args)
    run.log(f"{results['device']}, torch {results['torch']}, CUDA {results['cuda']}, pykeops {results['pykeops']}; "
            f"writing {out}")
    backends = list(args.backends)
    _, keops_missing = keops_status()
    if "keops" in backends and keops_missing:
        backends.remove("keops")
        if "keops" not in {s["family"] for s in results["stops"]}:
            run.stop("keops", keops_missing)
    agreement(run, torch, backends)
    order = [b for b in ("blockwise", "keops", "dense") if b in backends]
    for dtype in args.dtypes:
        for backend in order:
            sizes = args.product_sizes + (args.keops_product_sizes if backend == "keops" else [])
            ladder(run, torch, "product", backend, dtype, sizes, args.product_budget)
    for phase, sizes, budget in (("mll", args.mll_sizes, args.mll_budget),
                                 ("posterior", args.posterior_sizes, args.posterior_budget)):
        for backend in order:
            ladder(run, torch, phase, backend, args.model_dtype, sizes, budget)
    evidence = str(out)
    try:
        evidence = out.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        pass
    results["recommended"] = recommend(results, evidence)
    results["finished"] = True
    run.save()
    print("\n".join(summary_lines(results)), flush=True)


def summary_lines(results: dict) -> list[str]:
    """A markdown table of the measurements, the MLL losses and the recommended table entry."""
    lines = [f"\n## {results['device']} ({results['device_class']})", "",
             "| phase | backend | dtype | n | median | first call | repeats | peak |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["measurements"]:
        if m["status"] == "ok":
            extra = f" (stored product {m['matmul_s']:.3g} s)" if "matmul_s" in m else ""
            lines.append(f"| {m['phase']} | {m['backend']} | {m['dtype']} | {m['n']} | {m['median_s']:.4g} s{extra} | "
                         f"{m['first_s']:.3g} s | {m['repeats']} | {m['peak_bytes'] / 2**20:.0f} MiB |")
        else:
            lines.append(f"| {m['phase']} | {m['backend']} | {m['dtype']} | {m['n']} | {m['status']}: "
                         f"{m.get('error', '')[:80]} | | | |")
    losses = {m["backend"]: m["values"]["loss"] for m in results["measurements"]
              if m["phase"] == "mll" and m["status"] == "ok" and m["n"] == results["config"]["mll_sizes"][0]}
    if losses:
        lines.append("\nfirst MLL loss at the smallest n (same probes): "
                     + ", ".join(f"{b} {v:.6g}" for b, v in losses.items()))
    if "recommended" in results:
        lines += ["", "recommended entry of MEASURED_BACKENDS (python benchmarks/gpu.py --apply <json> writes it):",
                  entry_source(results["recommended"]).rstrip()]
    return lines


# --- the supervisor ----------------------------------------------------------------------------------
def record_death(out: Path, why: str) -> None:
    """The worker died or was killed: fail the measurement in progress and stop its family."""
    if not out.exists():
        return
    results = load_results(out)
    current = results.get("current")
    if current:
        results["measurements" if current.get("phase") in PHASES else "agreement"].append(
            {**current, "status": "failed", "ok": False, "error": why})
        if current.get("phase") in PHASES:
            family = family_key(current["phase"], current["backend"], current["dtype"])
            results["stops"].append({"family": family, "reason": why})
        else:
            results["agreement_done"] = True  # never retried: KeOps without a passed check is not recommended
    results["current"] = None
    results.setdefault("deaths", []).append(why)
    write_results(results, out)


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the worker in a child process; record its death, restart it (twice at most) or kill it at the deadline."""
    started_at = time.time()
    deadline_at = started_at + args.deadline
    hard = deadline_at + args.grace
    out = Path(args.out)
    resume: list[str] = []
    for attempt in range(3):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--started-at", str(started_at),
               "--deadline-at", str(deadline_at), *resume, *argv]
        proc = subprocess.Popen(cmd, env={**os.environ, "KEOPS_CACHE_FOLDER": os.environ.get(
            "KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))})
        try:
            rc = proc.wait(timeout=max(hard - time.time(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            record_death(out, f"killed at the global deadline ({args.deadline + args.grace:.0f} s)")
            print(f"gpu.py: worker killed at the deadline; partial results in {out}", flush=True)
            return 1
        if rc == 0:
            return 0
        record_death(out, f"worker exited with status {rc}")
        print(f"gpu.py: worker exited with status {rc} (attempt {attempt + 1})", flush=True)
        if time.time() > deadline_at - 30:
            break
        resume = ["--resume"]
    return 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (default benchmarks/results/gpu.json)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"],
                        help="dtypes of the products")
    parser.add_argument("--model-dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the MLL steps and posteriors")
    for name in ("product-sizes", "keops-product-sizes", "mll-sizes", "posterior-sizes"):
        parser.add_argument(f"--{name}", type=int, nargs="*", default=None)
    for name in ("product-budget", "mll-budget", "posterior-budget", "deadline"):
        parser.add_argument(f"--{name}", type=float, default=None, help="seconds")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds past the deadline before a kill")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-cholesky", type=int, default=None, help="GPyTorch's max_cholesky_size for the MLL step")
    parser.add_argument("--test", type=int, default=None, help="test points of the posterior")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inline", action="store_true", help="measure in this process (no supervisor)")
    parser.add_argument("--recommend", metavar="JSON", help="print the table entry a results file supports")
    parser.add_argument("--apply", metavar="JSON", help="write that entry into gpntk/kernels/measured_backends.py")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    """Fill the size, budget and deadline defaults of the mode (GPU, or the CPU smoke run)."""
    args.cpu_smoke = args.cpu_smoke or not cuda
    defaults = SMOKE_DEFAULTS if args.cpu_smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.smoke = args.cpu_smoke
    args.started_at = time.time() if args.started_at is None else args.started_at
    args.deadline_at = args.started_at + args.deadline if args.deadline_at is None else args.deadline_at
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.recommend or args.apply:
        recommend_command(Path(args.apply or args.recommend), apply=bool(args.apply))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _memory
    if args.worker or args.inline:
        import torch

        worker(resolve(args, torch.cuda.is_available()))
        return 0
    if args.deadline is None:
        args.deadline = SMOKE_DEFAULTS["deadline"] if args.cpu_smoke else GPU_DEFAULTS["deadline"]
    return supervise(args, argv)


if __name__ == "__main__":
    sys.exit(main())
