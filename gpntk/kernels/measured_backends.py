r"""Which matrix-free backend ``kernel_backend("auto")`` uses on each device class, and the measurement behind it.

The rule of ``"auto"`` (:func:`gpntk.kernels.backends.choose_backend`): the kernel matrix is
stored (dense) while it fits (:data:`gpntk.settings.DENSE_MAX_ELEMENTS`, or GPyTorch would
factorize it anyway); beyond that it is matrix-free, and *which* matrix-free backend is read from
:data:`MEASURED_BACKENDS`, keyed by the device class of the inputs (``torch.device.type``:
``"cpu"``, ``"cuda"``, ...):

* the torch backend ``"blockwise"`` (:mod:`gpntk.kernels.blockwise`) is the default, on every
  device class, measured or not;
* ``"keops"`` (:mod:`gpntk.contrib.keops`) only where the entry names it, which it may only do
  with ``evidence``: a benchmark result in the repository (``benchmarks/results/*.json`` written by
  ``benchmarks/gpu.py``) that shows KeOps faster than blockwise on that device class, from
  ``keops_from_rows`` rows on. Architectures without a KeOps formula stay blockwise there.

A device class without an entry (``"mps"``, ``"xpu"``, ...) gets the torch backends. The table is
data, not code: ``python benchmarks/gpu.py --recommend benchmarks/results/gpu.json`` prints the
entry a measurement supports and ``--apply`` writes it into this file (see ``docs/performance.md``);
``tests/kernels/test_measured_backends.py`` checks that every entry citing a JSON file agrees with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

__all__ = ["MatrixFree", "MeasuredBackend", "MEASURED_BACKENDS", "device_class", "matrix_free_backend"]

MatrixFree = Literal["blockwise", "keops"]


@dataclass(frozen=True)
class MeasuredBackend:
    """The matrix-free backend ``"auto"`` picks on one device class, and where the measurement is.

    :param device_class: ``torch.device.type`` of the inputs (``"cpu"``, ``"cuda"``).
    :param matrix_free: ``"blockwise"`` or ``"keops"``.
    :param keops_from_rows: with ``"keops"``: the fewest rows (``max(n1, n2)``) from which KeOps was
        measured faster; smaller matrix-free kernels stay blockwise. Ignored for ``"blockwise"``.
    :param evidence: where the measurement supporting the entry lives (a repository path of a
        benchmark JSON, or a documentation section); ``None``: not measured (allowed only for
        ``"blockwise"``, the default).
    :param device: the device the measurement ran on (``torch.cuda.get_device_name``, a CPU model).
    :param summary: the measured numbers in one line.
    """

    device_class: str
    matrix_free: MatrixFree
    keops_from_rows: int = 0
    evidence: str | None = None
    device: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        if self.matrix_free not in ("blockwise", "keops"):
            raise ValueError(f"matrix_free must be 'blockwise' or 'keops', got {self.matrix_free!r}")
        if self.matrix_free == "keops" and not self.evidence:
            raise ValueError(
                f"a 'keops' choice for device class {self.device_class!r} needs evidence: the benchmark result "
                "that measured it faster than blockwise (benchmarks/gpu.py)"
            )
        if self.keops_from_rows < 0:
            raise ValueError(f"keops_from_rows must be >= 0, got {self.keops_from_rows}")


MEASURED_BACKENDS: Mapping[str, MeasuredBackend] = MappingProxyType({
    "cpu": MeasuredBackend(
        "cpu", "blockwise", evidence="docs/scaling.md#measured (benchmarks/scale.py products)",
        device="2-core x86-64 CPU, one thread",
        summary="KeOps 8.5-8.9e6 entries/s, 6x slower than compiled blockwise at n = 5000-20000",
    ),
    # begin cuda (benchmarks/gpu.py --apply rewrites this entry)
    "cuda": MeasuredBackend("cuda", "blockwise", evidence=None, summary="not measured: the torch backends"),
    # end cuda
})
"""The measured choice per device class (see the module docstring for the rule)."""


def device_class(device: torch.device | str) -> str:
    """The device class of ``device``: its type, ``"cpu"`` or ``"cuda"`` (any index)."""
    return torch.device(device).type


def matrix_free_backend(
    device: torch.device | str,
    rows: int,
    keops_reason: Callable[[], str | None],
    table: Mapping[str, MeasuredBackend] | None = None,
) -> MatrixFree:
    """The matrix-free backend ``"auto"`` uses for a kernel of ``rows`` rows (``max(n1, n2)``) on ``device``.

    ``keops_reason()``: ``None`` when KeOps can evaluate the kernel, else why not (asked only where
    the table would pick KeOps). ``table``: :data:`MEASURED_BACKENDS` by default.
    """
    entry = (MEASURED_BACKENDS if table is None else table).get(device_class(device))
    if entry is None or entry.matrix_free == "blockwise" or entry.evidence is None:
        return "blockwise"
    if rows < entry.keops_from_rows or keops_reason() is not None:
        return "blockwise"
    return "keops"
