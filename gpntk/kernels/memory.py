r"""Large kernel matrices allocated on transparent huge pages.

The first write to freshly allocated memory faults every page into the process: with the 4 KiB
pages Linux uses by default an :math:`n \times n` float64 matrix costs :math:`2 n^2 / 1024`
page faults (32768 for n = 4000), each one a trip into the kernel that also zeroes its page.
Measured on this project's 2-core CPU, one thread: allocating and filling a 4000 x 4000 float64
matrix takes 55 ms on 4 KiB pages and 12 ms on 2 MiB pages, while the whole dense NNGP + NTK of a
depth-3 ReLU network at that size takes about 0.3 s: two fresh outputs cost a quarter of it.

Linux backs anonymous memory with 2 MiB *transparent huge pages* either always or, in the common
``madvise`` mode (``/sys/kernel/mm/transparent_hugepage/enabled``), only where the program asks with
``madvise(MADV_HUGEPAGE)``. :func:`empty_matrix` asks for the kernel matrices gpntk fills on CPUs
(from :data:`~gpntk.settings.HUGE_PAGE_MIN_BYTES` on): it allocates 2 MiB more than needed, starts
the matrix at a 2 MiB boundary of that buffer and advises the aligned range. The values are the
same either way; only the time of the first write changes. Where the advice is unavailable (not
Linux, huge pages ``never``, a failing call) the memory is ordinary pages.
:class:`gpntk.settings.huge_pages` turns this off (``GPNTK_HUGE_PAGES=0``).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import settings
from .._transforms import is_transformed

__all__ = ["empty_matrix", "HUGE_PAGE_BYTES"]

HUGE_PAGE_BYTES = 2**21
"""The size of a transparent huge page on x86-64 and most ARM64 Linux kernels (2 MiB)."""

_MADV_HUGEPAGE = 14  # from <sys/mman.h> (Linux)


def _load_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(addr, length, advice)``, or ``None`` where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def empty_matrix(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, with the dtype and device of ``like``.

    On CPUs, for at least :data:`~gpntk.settings.HUGE_PAGE_MIN_BYTES` bytes, its memory is
    advised to be backed by transparent huge pages (see the module docstring); otherwise, and
    under ``torch.func`` transforms, it is ``like.new_empty(shape)``.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    size = like.element_size()
    if (
        _MADVISE is None
        or not settings.huge_pages.on()
        or like.device.type != "cpu"
        or numel * size < settings.HUGE_PAGE_MIN_BYTES
        or is_transformed(like)
    ):
        return like.new_empty(shape)
    with torch.no_grad():
        buffer = torch.empty(numel + HUGE_PAGE_BYTES // size, dtype=like.dtype)
        skip = -buffer.data_ptr() % HUGE_PAGE_BYTES  # bytes to the first 2 MiB boundary
        if skip % size:  # never with torch's 64-byte aligned allocations; plain pages then
            return like.new_empty(shape)
        start = buffer.data_ptr() + skip
        advised = (numel * size) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if advised:
            _MADVISE(start, advised, _MADV_HUGEPAGE)  # a refusal (huge pages "never") leaves plain pages
        strides = [1] * len(shape)
        for dim in range(len(shape) - 2, -1, -1):
            strides[dim] = strides[dim + 1] * shape[dim + 1]
        return buffer.new_empty(0).set_(buffer.untyped_storage(), skip // size, shape, strides)
