"""Large CPU kernel matrices are advised onto transparent huge pages (``gpntk.kernels.memory``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import gpntk
from gpntk import settings
from gpntk.kernels import memory
from gpntk.kernels.dense import nngp_and_ntk
from gpntk.kernels.memory import HUGE_PAGE_BYTES, empty_matrix

LINUX = sys.platform.startswith("linux")


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_matrices_are_contiguous_writable_and_aligned():
    like = torch.zeros(1, dtype=torch.float64)
    shape = (3, 1100, 1000)  # 26.4 MB
    assert 8 * 3 * 1100 * 1000 >= settings.HUGE_PAGE_MIN_BYTES
    out = empty_matrix(shape, like)
    assert out.shape == shape and out.dtype == torch.float64 and out.is_contiguous()
    out.fill_(2.5)
    out[1, 7, 9] = -1.0
    assert float(out.sum()) == 2.5 * (out.numel() - 1) - 1.0
    if LINUX:
        assert out.data_ptr() % HUGE_PAGE_BYTES == 0  # starts on a 2 MiB boundary


@pytest.mark.skipif(
    not (LINUX and Path("/sys/kernel/mm/transparent_hugepage").is_dir()),
    reason="needs Linux with transparent huge pages (madvise, /proc/self/smaps)",
)
def test_large_matrices_carry_the_huge_page_advice():
    like = torch.zeros(1, dtype=torch.float32)
    out = empty_matrix((2100, 2100), like)  # 17.6 MB
    assert "hg" in _vm_flags(out.data_ptr())  # MADV_HUGEPAGE set on its mapping


def test_no_advice_when_switched_off_or_small(monkeypatch):
    """Switched off, or below the size threshold, ``madvise`` is never called.

    (Checked on the calls, not on the mapping's flags: memory the allocator hands out again may
    sit in a mapping an earlier matrix of this process advised, where the flag stays set.)
    """
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(memory, "_MADVISE", lambda *args: calls.append(args) or 0)
    like = torch.zeros(1, dtype=torch.float32)
    with settings.huge_pages(False):
        plain = empty_matrix((2100, 2100), like)
    small = empty_matrix((100, 100), like)
    assert calls == []
    assert plain.shape == (2100, 2100) and small.shape == (100, 100) and small.dtype == torch.float32
    advised = empty_matrix((2100, 2100), like)
    assert len(calls) == 1
    start, length, advice = calls[0]
    assert start == advised.data_ptr() and start % HUGE_PAGE_BYTES == 0
    assert length == 2100 * 2100 * 4 // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES and advice == 14


def test_kernel_values_do_not_depend_on_the_setting():
    net = gpntk.layers.mlp(2, "relu")
    x = torch.randn(1500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        advised = nngp_and_ntk(net, x)
        with settings.huge_pages(False):
            plain = nngp_and_ntk(net, x)
    for a, b in zip(advised, plain):
        assert torch.equal(a, b)


def test_switch_rejects_non_booleans():
    with pytest.raises((TypeError, ValueError), match="huge_pages"):
        settings.huge_pages("yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("recompute", [False, True], ids=["plain-autograd", "recomputed"])
def test_gradients_through_huge_page_matrices(recompute):
    """Matrices filled block by block with gradients (plain autograd, or the recomputing backward) on huge
    pages: the same values and gradients as on ordinary pages."""
    net = gpntk.layers.mlp(1, "relu")
    x = torch.randn(1500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def values_and_gradients(advised: bool):
        for p in net.parameters():
            p.grad = None
        points = x.clone().requires_grad_(True)
        with settings.huge_pages(advised), settings.recompute_backward(recompute):
            cov, ntk = nngp_and_ntk(net, points)
            (ntk.sin().sum() + cov.sum()).backward()
        return [cov.detach(), points.grad, *(p.grad.clone() for p in net.parameters())]

    for a, b in zip(values_and_gradients(True), values_and_gradients(False)):
        assert torch.equal(a, b)
