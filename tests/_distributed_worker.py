"""One rank of a distributed test: ``python _distributed_worker.py SCENARIO OUT [VARIANT]`` under a gloo group.

The group comes from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
set by :func:`_distributed_case.run_ranks`). The rank saves its results, or the error it raised
(``{"error": class name, "message": text}``), to OUT.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _distributed_case as case  # noqa: E402

import gpntk.distributed  # noqa: E402


def bad_use(variant: str) -> dict[str, torch.Tensor]:
    """Misuse that must raise on every rank: different data sizes, or unseeded probe vectors."""
    rank = dist.get_rank()
    x, y, _ = case.data()
    kernel = gpntk.distributed.ShardedKernel(case.base_kernel().double())
    if variant == "sizes":
        kernel(x[: case.N - rank]).evaluate_kernel()  # rank 1 holds one point fewer
    elif variant == "rhs":
        v = torch.full((case.N, 2), float(rank), dtype=torch.float64)  # different vectors on each rank
        with torch.no_grad():
            kernel(x) @ v
    return {}


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    gpntk.distributed.initialize()
    try:
        result = bad_use(sys.argv[3]) if scenario == "bad" else case.SCENARIOS[scenario](sharded=True)
    except Exception as error:  # reported to the test, which checks that both ranks raised it
        result = {"error": type(error).__name__, "message": str(error)}
    torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
