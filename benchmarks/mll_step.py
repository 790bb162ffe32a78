"""One ExactGP marginal-likelihood training step: gpntk's NTK and NNGP against GPyTorch's RBF and BoTorch's IBNN.

Every kind trains the same model in ONE process, side by side: GPyTorch's ``ExactGP`` with a
constant mean, a Gaussian likelihood and ``ScaleKernel(kernel)`` on ``n`` points uniform in
[0, 1]^``--d`` (16), y = sin(6 x_0) + 0.1 noise, float64; one step is ``zero_grad``, the loss
``-ExactMarginalLogLikelihood``, ``backward`` and an Adam step (lr 0.01). Kinds (``--kinds``):

* ``rbf``:  ``gpytorch.kernels.RBFKernel()``, the reference every ratio is taken to;
* ``nngp``, ``ntk``: ``gpntk.NNGPKernel`` / ``gpntk.NTKKernel`` of a depth-3 ReLU ``mlp``
  (σw² = 2, σb² = 0.1), with gpntk's defaults (``kernel_backend`` and ``fusion`` "auto");
* ``ibnn``: BoTorch's ``InfiniteWidthBNNKernel(depth=3)`` (the NNGP of the same network).

Paths (``--paths``): ``cholesky`` (``max_cholesky_size`` ``--mcs-cholesky``, 100000: GPyTorch
factorizes) and ``cg`` (``max_cholesky_size`` ``--mcs-cg``, 800, GPyTorch's default: conjugate
gradients and stochastic trace estimates above 800 rows). Every step runs under GPyTorch's own
defaults (``gpntk.settings.gpytorch_defaults``): importing BoTorch for the ``ibnn`` kind turns
GPyTorch's fast computations off, which would make the ``cg`` path factorize by Cholesky too (the
CG rows of runs with ``ibnn`` before this fix were Cholesky steps). The settings in effect are in
the JSON (``gpytorch_settings``). For each ``n`` (``--n``, default 2000
4000 10000) and path a fresh model per kind makes its first step (reported separately: the cold
cost, compiles included), then ``--repeats`` (3) rounds in which every kind makes one step in
turn (interleaved, so that a slower or busier machine affects all kinds alike). Reported per kind:
the median of the timed steps and its ratio to RBF's, the first step, the whole fit (first step
included) and its ratio, the losses, the peak resident memory of a step above the memory before
it (VmHWM reset per step; Linux), and per step the number of calls of the kernel's ``forward``
and, for gpntk, of kernel evaluations: ``gpntk.kernels.dense.evaluate`` and ``evaluate_output``
(counted wherever gpntk imported them) and the blockwise backend's products and bilinear derivatives
(``BlockwiseKernelOperator._products`` / ``_bilinear_derivative``).

Threads: ``--threads`` (1) intra-op threads, with OMP/MKL/OPENBLAS_NUM_THREADS set to match.
``--fresh-process``: each kind in its own process instead (not interleaved), which also reports
the peak resident set of the whole process, as a user would see it.

    python benchmarks/mll_step.py                                  # n = 2000 4000 10000, both paths: long
    python benchmarks/mll_step.py --n 2000 --paths cholesky --repeats 2
    python benchmarks/mll_step.py --n 4000 --paths cg --kinds rbf ntk --fresh-process

Writes ``--out`` (default ``benchmarks/results/mll_step.json``) after every (n, path) and prints a
markdown table for the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_rss_kib, reset_peak_rss, status_kib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mll_step.json"
KINDS = ("rbf", "nngp", "ntk", "ibnn")
PATHS = ("cholesky", "cg")
GPNTK_KINDS = ("nngp", "ntk")


def pin_threads(threads: int) -> None:
    """Before torch is imported: every BLAS / OpenMP pool at ``threads``."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def data(n: int, d: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def base_kernel(kind: str) -> Any:
    import gpytorch

    if kind == "rbf":
        return gpytorch.kernels.RBFKernel()
    if kind == "ibnn":
        from botorch.models.kernels.infinite_width_bnn import InfiniteWidthBNNKernel

        return InfiniteWidthBNNKernel(depth=3)
    import gpntk

    net = gpntk.layers.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    return (gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel)(net)


class EvaluationCounter:
    """Counts gpntk's kernel evaluations inside ``with counter:`` (the wrappers are removed on exit).

    ``evaluate``: calls of ``gpntk.kernels.dense.evaluate`` or ``evaluate_output`` (one stored matrix)
    through every gpntk module that imported them; ``blockwise_products`` / ``blockwise_derivatives``:
    calls of ``BlockwiseKernelOperator``'s ``_products`` / ``_bilinear_derivative``. Names a refactoring
    removed are simply not counted.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._restore: list[tuple[Any, str, Any]] = []

    def _wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    def _patch(self, owner: Any, attribute: str, value: Any) -> None:
        self._restore.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def __enter__(self) -> "EvaluationCounter":
        import gpntk.kernels.backends  # noqa: F401  (loads the modules that import evaluate)
        import gpntk.kernels.blockwise as blockwise
        import gpntk.kernels.dense as dense

        for function in ("evaluate", "evaluate_output"):  # both count as one dense evaluation
            original = getattr(dense, function, None)
            if original is None:
                continue
            counted = self._wrap(original, "evaluate")
            for name, module in list(sys.modules.items()):
                if name.startswith("gpntk") and getattr(module, function, None) is original:
                    self._patch(module, function, counted)
        operator = blockwise.BlockwiseKernelOperator
        for method, name in (("_products", "blockwise_products"), ("_bilinear_derivative", "blockwise_derivatives")):
            if method in vars(operator):
                self._patch(operator, method, self._wrap(vars(operator)[method], name))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attribute, value in reversed(self._restore):
            setattr(owner, attribute, value)
        self._restore.clear()

    def take(self) -> dict[str, int]:
        """The counts since the last call (then reset)."""
        out = dict(self.counts)
        self.counts.clear()
        return out


class Model:
    """One kind's GP, likelihood, optimizer and the record of its steps."""

    def __init__(self, kind: str, x: Any, y: Any, counter: EvaluationCounter) -> None:
        import gpytorch
        import torch

        class GP(gpytorch.models.ExactGP):
            def __init__(self, covar: Any) -> None:
                super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
                self.mean_module = gpytorch.means.ConstantMean()
                self.covar_module = covar

            def forward(self, z: Any) -> Any:
                return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

        self.kind, self.x, self.y, self.counter = kind, x, y, counter
        kernel = base_kernel(kind)
        self.forward_calls = 0
        forward = kernel.forward

        def counted_forward(*args: Any, **kwargs: Any) -> Any:
            self.forward_calls += 1
            return forward(*args, **kwargs)

        kernel.forward = counted_forward
        self.model = GP(gpytorch.kernels.ScaleKernel(kernel)).double()
        self.model.train()
        self.mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.model.likelihood, self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.steps: list[dict] = []

    def step(self, max_cholesky: int) -> dict:
        self.counter.take()
        self.forward_calls = 0
        reset_ok = reset_peak_rss()
        base = status_kib("VmRSS") or 0
        start, cpu_start = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad()
        with gpytorch_settings(max_cholesky):
            loss = -self.mll(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        record = {
            "seconds": seconds, "cpu_seconds": cpu_seconds, "loss": loss.item(),
            "peak_mib": (peak_rss_kib(reset_ok) - base) / 1024,
            "forward_calls": self.forward_calls, **self.counter.take(),
        }
        self.steps.append(record)
        return record

    def summary(self) -> dict:
        first, timed = self.steps[0], self.steps[1:]
        counts = {key: statistics.median(s.get(key, 0) for s in timed) for key in
                  ("forward_calls", "evaluate", "blockwise_products", "blockwise_derivatives")} if timed else {}
        return {
            "first_s": first["seconds"], "steps_s": [s["seconds"] for s in timed],
            "median_s": statistics.median(s["seconds"] for s in timed) if timed else first["seconds"],
            # CPU time of this process: on a shared machine, less sensitive to other load than wall time
            "median_cpu_s": statistics.median(s["cpu_seconds"] for s in timed) if timed else first["cpu_seconds"],
            "first_cpu_s": first["cpu_seconds"],
            "fit_s": sum(s["seconds"] for s in self.steps), "steps": len(self.steps),
            "losses": [s["loss"] for s in self.steps], "peak_step_mib": max(s["peak_mib"] for s in self.steps),
            "first_step_counts": {k: first.get(k, 0) for k in ("forward_calls", "evaluate", "blockwise_products",
                                                                "blockwise_derivatives")},
            "per_step_counts": counts,
        }


@contextlib.contextmanager
def gpytorch_settings(max_cholesky: int) -> Iterator[None]:
    """GPyTorch's own defaults (importing BoTorch for the ``ibnn`` kind turns its fast computations off, which would
    make the CG path factorize by Cholesky), with ``max_cholesky_size`` set to pick the path."""
    import gpytorch

    import gpntk

    with gpntk.settings.gpytorch_defaults(), gpytorch.settings.max_cholesky_size(max_cholesky):
        yield


def settings_in_effect(max_cholesky: int) -> dict:
    """The GPyTorch settings every step of a path runs under (recorded in the JSON)."""
    import gpytorch

    with gpytorch_settings(max_cholesky):
        fast = gpytorch.settings.fast_computations
        return {"max_cholesky_size": gpytorch.settings.max_cholesky_size.value(),
                "fast_log_prob": fast.log_prob.on(), "fast_solves": fast.solves.on(),
                "fast_covar_root_decomposition": fast.covar_root_decomposition.on(),
                "max_eager_kernel_size": gpytorch.settings.max_eager_kernel_size.value(),
                "cholesky_max_tries": gpytorch.settings.cholesky_max_tries.value()}


def measure(
    n: int, path: str, args: argparse.Namespace, counter: EvaluationCounter, log: Callable[[str], None]
) -> dict:
    """All kinds at one ``n`` and path, interleaved; their summaries with ratios to RBF."""
    x, y = data(n, args.d)
    max_cholesky = args.mcs_cholesky if path == "cholesky" else args.mcs_cg
    models = [Model(kind, x, y, counter) for kind in args.kinds]
    for model in models:  # the cold steps
        record = model.step(max_cholesky)
        log(f"n={n} {path} {model.kind}: first step {record['seconds']:.3f} s (loss {record['loss']:.4f})")
    for round_ in range(args.repeats):
        for model in models:
            record = model.step(max_cholesky)
            log(f"n={n} {path} {model.kind}: step {round_ + 1} {record['seconds']:.3f} s")
    kinds = {model.kind: model.summary() for model in models}
    add_ratios(kinds)
    return {"n": n, "path": path, "max_cholesky_size": max_cholesky,
            "gpytorch_settings": settings_in_effect(max_cholesky), "kinds": kinds}


def add_ratios(kinds: dict[str, dict]) -> None:
    if "rbf" not in kinds:
        return
    for summary in kinds.values():
        summary["ratio_to_rbf"] = summary["median_s"] / kinds["rbf"]["median_s"]
        summary["cpu_ratio_to_rbf"] = summary["median_cpu_s"] / kinds["rbf"]["median_cpu_s"]
        summary["fit_ratio_to_rbf"] = summary["fit_s"] / kinds["rbf"]["fit_s"]


def environment(args: argparse.Namespace) -> dict:
    import gpytorch
    import torch

    import gpntk

    return {
        "script": "benchmarks/mll_step.py", "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "gpytorch": gpytorch.__version__, "gpntk": gpntk.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("worker",)},
    }


def table(results: list[dict]) -> str:
    """The markdown table of the docs: one row per (n, path, kind)."""
    lines = ["| n | path | kind | median step | × RBF | CPU s of a step | × RBF (CPU) | first step | whole fit | × RBF "
             "| forward / evaluations per step | peak of a step |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in results:
        for kind, s in row["kinds"].items():
            counts = s.get("per_step_counts", {})
            evals = f"{counts.get('forward_calls', 0):g}"
            if kind in GPNTK_KINDS:
                evals += (f" / {counts.get('evaluate', 0):g} dense, {counts.get('blockwise_products', 0):g}"
                          f"+{counts.get('blockwise_derivatives', 0):g} blockwise")
            ratio = f"{s['ratio_to_rbf']:.2f}×" if "ratio_to_rbf" in s else ""
            fit_ratio = f"{s['fit_ratio_to_rbf']:.2f}×" if "fit_ratio_to_rbf" in s else ""
            peak = f"{s['process_peak_mib']:.0f} MiB (process)" if "process_peak_mib" in s else \
                f"+{s['peak_step_mib']:.0f} MiB"
            cpu_ratio = f"{s['cpu_ratio_to_rbf']:.2f}×" if "cpu_ratio_to_rbf" in s else ""
            cpu = f"{s['median_cpu_s']:.3f} s" if "median_cpu_s" in s else ""
            lines.append(f"| {row['n']} | {row['path']} | {kind} | {s['median_s']:.3f} s | {ratio} | {cpu} | "
                         f"{cpu_ratio} | "
                         f"{s['first_s']:.3f} s | {s['fit_s']:.2f} s | {fit_ratio} | {evals} | {peak} |")
    return "\n".join(lines)


def run_fresh(args: argparse.Namespace, n: int, path: str, log: Callable[[str], None]) -> dict:
    """Each kind in its own process (``--worker``); the whole process's peak resident set is added."""
    kinds = {}
    for kind in args.kinds:
        cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--paths", path, "--kinds", kind,
               "--repeats", str(args.repeats), "--d", str(args.d), "--threads", str(args.threads),
               "--mcs-cholesky", str(args.mcs_cholesky), "--mcs-cg", str(args.mcs_cg)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            log(f"n={n} {path} {kind}: worker failed (rc {proc.returncode}): {tail}")
            continue
        out = json.loads(lines[-1])
        kinds[kind] = out["kinds"][kind] | {"process_peak_mib": out["process_peak_mib"]}
        log(f"n={n} {path} {kind}: median step {kinds[kind]['median_s']:.3f} s, process peak "
            f"{out['process_peak_mib']:.0f} MiB")
    add_ratios(kinds)
    max_cholesky = args.mcs_cholesky if path == "cholesky" else args.mcs_cg
    return {"n": n, "path": path, "max_cholesky_size": max_cholesky,
            "gpytorch_settings": settings_in_effect(max_cholesky), "kinds": kinds, "fresh_process": True}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 4000, 10000])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per kind after the first")
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mcs-cholesky", type=int, default=100_000, help="max_cholesky_size of the Cholesky path")
    parser.add_argument("--mcs-cg", type=int, default=800, help="max_cholesky_size of the CG path")
    parser.add_argument("--fresh-process", action="store_true", help="each kind in its own process")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    pin_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {text}", file=sys.stderr if args.worker else sys.stdout,
              flush=True)

    if args.worker:  # one kind, one n, one path; the JSON line on stdout
        with EvaluationCounter() as counter:
            row = measure(args.n[0], args.paths[0], args, counter, log)
        print(json.dumps({**row, "process_peak_mib": peak_rss_kib(False) / 1024}), flush=True)
        return row
    with EvaluationCounter() as counter:
        return run_all(args, counter, log)


def run_all(args: argparse.Namespace, counter: EvaluationCounter, log: Callable[[str], None]) -> dict:
    report = {**environment(args), "results": []}
    log(f"torch {report['torch']}, gpytorch {report['gpytorch']}, {report['threads']} thread(s); kinds "
        f"{' '.join(args.kinds)}; writing {args.out}")
    for n in args.n:
        for path in args.paths:
            row = run_fresh(args, n, path, log) if args.fresh_process else measure(n, path, args, counter, log)
            report["results"].append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
            print(table([row]), flush=True)
    print("\n" + table(report["results"]), flush=True)
    return report


if __name__ == "__main__":
    main()
