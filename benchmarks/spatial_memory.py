"""Memory of spatial kernels: numbers held per pair of inputs, and the measured peak of a whole kernel.

For typical convolutional networks this prints which layout the input kernel takes (the full
position-by-position covariance only when pooling follows, else its diagonal), the numbers per
pair of inputs, and, for one network, the peak resident memory of computing an ``n x n`` CNTK in
blocks (default ``block_elements``) against one block holding everything. Each measurement runs in
a fresh subprocess (``ru_maxrss``).

    python benchmarks/spatial_memory.py [--n 80]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from gpntk import layers as L
from gpntk.kernels.dense import input_layout


def networks():
    conv = lambda: L.Conv(3, weight_variance=2.0, bias_variance=0.05)  # noqa: E731
    return {
        "1-D CNN + GlobalAvgPool, (1, 128)": ((1, 128), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))),
        "CNN + GlobalAvgPool, digits (1, 8, 8)": ((1, 8, 8), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))),
        "CNN + Flatten, MNIST (1, 28, 28)": ((1, 28, 28), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.Flatten(), L.Dense(2.0, 0.0))),
        "CNN + GlobalAvgPool, MNIST (1, 28, 28)": ((1, 28, 28), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))),
        "CNN + Flatten, CIFAR (3, 32, 32)": ((3, 32, 32), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.Flatten(), L.Dense(2.0, 0.0))),
        "CNN + GlobalAvgPool, CIFAR (3, 32, 32)": ((3, 32, 32), L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))),
        "CNN + AvgPool(2) + GlobalAvgPool, CIFAR": ((3, 32, 32), L.serial(conv(), L.ReLU(), L.AvgPool(2), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))),
    }


MEASURE = """
import resource, sys, time, torch, gpntk
from gpntk import layers as L
torch.set_num_threads(1)
n, block = int(sys.argv[1]), (None if sys.argv[2] == 'default' else int(sys.argv[2]))
conv = lambda: L.Conv(3, weight_variance=2.0, bias_variance=0.05)
net = L.serial(conv(), L.ReLU(), conv(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.0))
x = torch.randn(n, 64, dtype=torch.float64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    k = gpntk.NTKKernel(net, input_shape=(1, 8, 8), block_elements=block)(x).to_dense()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(__import__('json').dumps({"seconds": seconds, "extra_mib": (peak - before) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80, help="images in the measured kernel")
    args = parser.parse_args()
    print(f"{'network':42s} {'layout':9s} {'numbers/pair':>13s} {'MiB/pair (f64)':>15s}")
    for name, (shape, net) in networks().items():
        layout = input_layout(net, shape)
        per_pair = layout.elements_per_pair
        print(f"{name:42s} {'full' if layout.full else 'diagonal':9s} {per_pair:13,d} {per_pair * 8 / 2**20:15.4f}")
    n = args.n
    whole = n * n * 64 * 64
    print(f"\nNTK of {n} digits images, CNN + GlobalAvgPool (P = 64, {whole:,} numbers per whole tensor):")
    for block in ("default", str(whole)):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(n), block], capture_output=True, text=True)
        label = "blocks of 2**18 (CPU default)" if block == "default" else "one block (everything at once)"
        if out.returncode != 0:
            print(f"  {label:32s} failed (exit {out.returncode}: killed for memory?)")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label:32s} peak +{result['extra_mib']:8.0f} MiB   {result['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
