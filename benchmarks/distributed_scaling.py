"""Strong scaling of a sharded NTK exact GP (gpntk.distributed) from 1 to 2 processes.

    nice -n 15 python benchmarks/distributed_scaling.py [--n 10000] [--repeats 3] [--larger 20000 40000]

For each process count the script starts that many gloo processes (one thread each) on this
machine; each builds the same data (n points in [0, 1]^16, y = sin(6 x_0) + noise), a
``ShardedKernel(ScaleKernel(NTKKernel(mlp(depth=3))), store=True)`` ExactGP (each rank keeps its
rows, ``n^2 / p`` numbers, whatever the process count), and times, after one warm-up:

* ``mll_step``: one marginal-likelihood step (forward + backward) on GPyTorch's CG path
  (``max_cholesky_size`` 1000, GPyTorch's default tolerances, pivoted-Cholesky preconditioner),
  which evaluates this rank's rows of the kernel once without and once with autograd;
* ``mll_forward`` / ``mll_backward``: the step's two halves, the marginal likelihood (CG solves and
  Lanczos, including the first evaluation of this rank's rows) and its backward (the hyperparameter
  gradients, block by block);
* ``product``: one product ``K @ V`` with 10 columns through linear_operator's public ``@``, which
  rebuilds the operator from its tensors and so evaluates this rank's rows again (a kernel
  evaluation without autograd, plus the product).

Medians over the repeats; the speed-up is the 1-process median over the 2-process median.
``--ceiling`` also measures what this machine allows for perfectly parallel work of the same kind:
``rows``, an evaluation of ``n / p`` rows of the same kernel against ``n`` other points without
autograd (compiled, as in the step), in each of ``p`` processes at once with no communication
(barriers only, to start the repeats together); its speed-up is the 1-process median (all ``n``
rows) over the 2-process median (``n / 2`` rows each). Two processes on two cores that share a
physical core or memory bandwidth run slower than one alone, and that speed-up is the bound.
Each
``--larger`` n is then tried with 2 processes (one step) and the largest n that finished is
reported. The load average is recorded: on a loaded machine the measured speed-up is pessimistic.
Results go to ``--out`` (default benchmarks/results/distributed_scaling.json).
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

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_scaling.json"


def worker(n: int, repeats: int) -> None:
    import gpytorch
    import torch
    import torch.distributed as dist

    import gpntk
    from gpntk.distributed import ShardedKernel

    torch.set_num_threads(1)
    gpntk.distributed.initialize()
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 16, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            net = gpntk.layers.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
            self.covar_module = ShardedKernel(gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net)), store=True)

        def forward(self, z):  # type: ignore[no-untyped-def]
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    steps, forwards, backwards, products = [], [], [], []
    with gpytorch.settings.max_cholesky_size(1000):
        for step in range(repeats + 1):
            torch.manual_seed(step)
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            loss = -mll(model(x), y)
            middle = time.perf_counter()
            loss.backward()
            steps.append(time.perf_counter() - start)
            forwards.append(middle - start)
            backwards.append(steps[-1] - forwards[-1])
            if rank == 0:
                print(f"  n={n} step {step}: {steps[-1]:.2f} s", file=sys.stderr, flush=True)
        with torch.no_grad():
            op = model.covar_module(x).evaluate_kernel()
            v = torch.randn(n, 10, generator=g, dtype=torch.float64)
            for _ in range(repeats):
                start = time.perf_counter()
                op @ v
                products.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({
            "mll_step": steps[1:], "mll_forward": forwards[1:], "mll_backward": backwards[1:], "product": products,
        }), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def ceiling_worker(n: int, repeats: int) -> None:
    """``n / world`` rows of the step's kernel against all ``n`` points, ``repeats`` times (no autograd)."""
    import torch
    import torch.distributed as dist

    import gpntk

    torch.set_num_threads(1)
    gpntk.distributed.initialize()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    g = torch.Generator().manual_seed(0)
    x, columns = (torch.rand(n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    net = gpntk.layers.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    kernel = gpntk.NTKKernel(net).double()
    mine = x[rank * n // world: (rank + 1) * n // world]  # other points as columns: never a symmetric plan
    times = []
    with torch.no_grad(), gpntk.settings.fusion(True):
        for repeat in range(repeats + 1):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            kernel(mine, columns).to_dense()
            times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"rows": times[1:]}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def run(world: int, n: int, repeats: int, ceiling: bool = False) -> dict | None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--ceiling-worker" if ceiling else "--worker", "--n", str(n),
               "--repeats", str(repeats)]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(world)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        return None
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--larger", type=int, nargs="*", default=[])
    parser.add_argument("--ceiling", action="store_true", help="also measure perfectly parallel kernel rows")
    parser.add_argument("--ceiling-repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--ceiling-worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.n, args.repeats)
        return
    if args.ceiling_worker:
        ceiling_worker(args.n, args.repeats)
        return
    result: dict = {"n": args.n, "repeats": args.repeats, "cpus": os.cpu_count()}
    result["load_average_before"] = os.getloadavg()
    for world in (1, 2):
        print(f"{world} process(es), n = {args.n}", flush=True)
        times = run(world, args.n, args.repeats)
        if times is None:
            raise SystemExit(f"the {world}-process run failed")
        result[f"{world}"] = {key: {"all": value, "median": statistics.median(value)} for key, value in times.items()}
        print(f"  median MLL step {result[str(world)]['mll_step']['median']:.2f} s, "
              f"product {result[str(world)]['product']['median']:.3f} s", flush=True)
    for key in ("mll_step", "mll_forward", "mll_backward", "product"):
        result[f"speedup_{key}"] = result["1"][key]["median"] / result["2"][key]["median"]
        print(f"speed-up 1 -> 2 processes, {key}: {result[f'speedup_{key}']:.2f}x", flush=True)
    if args.ceiling:
        for world in (1, 2):
            print(f"ceiling: kernel rows in {world} process(es) at once, n = {args.n}", flush=True)
            times = run(world, args.n, args.ceiling_repeats, ceiling=True)
            if times is None:
                raise SystemExit(f"the {world}-process ceiling run failed")
            result[f"{world}"]["rows"] = {"all": times["rows"], "median": statistics.median(times["rows"])}
        result["speedup_rows"] = result["1"]["rows"]["median"] / result["2"]["rows"]["median"]
        print(f"speed-up 1 -> 2 processes, rows (perfectly parallel): {result['speedup_rows']:.2f}x", flush=True)
    result["largest_n_2_processes"] = args.n
    for n in args.larger:
        print(f"2 processes, n = {n}", flush=True)
        times = run(2, n, 1)
        if times is None:
            break
        result["largest_n_2_processes"] = n
        result[f"n{n}_2_processes"] = times
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"largest n reached with 2 processes: {result['largest_n_2_processes']}; wrote {args.out}")


if __name__ == "__main__":
    main()
