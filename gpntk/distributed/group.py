r"""The process group a sharded kernel works in: ranks, the one collective it uses, replication checks.

Every rank of a sharded computation holds the same inputs and runs the same iterations (CG,
Lanczos) on the same replicated vectors; only the kernel's entries are divided among ranks (Wang
et al. 2019, "Exact Gaussian Processes on a Million Data Points", NeurIPS). Each product is a
rank's rows of the result, concatenated with one ``all_gather`` (no sums across ranks, so the
result does not depend on the number of ranks). Where torch.distributed is not initialized, or
the group has one process, :class:`Communicator` is a group of one: the same code runs and the
gathers are no-ops.

A rank whose vectors differ from the others' (probe vectors drawn from differently seeded
generators, different training data) would silently mix rows of different problems, or hang when
its CG stops at another iteration. :class:`Communicator` therefore checks, on every gather, that the
tensors every rank believes to be replicated are bitwise equal: a 63-bit :func:`fingerprint` per
rank rides along in the same ``all_gather`` (in 21-bit pieces, exact in float32 and float64), and
a mismatch raises :class:`ReplicationError` on every rank at once.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "ReplicationError", "fingerprint", "initialize"]

#: bits per piece of a fingerprint: a float32 holds integers up to 2**24 exactly
_PIECE_BITS = 21
_PIECES = 3
_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


class ReplicationError(RuntimeError):
    """Tensors that must be equal on every rank of a sharded computation differ between ranks."""


def initialize(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes, and return the device this rank should use.

    Under ``torchrun`` (environment variables ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) the default group is initialized with ``backend`` (default: ``"nccl"`` when
    CUDA is available, else ``"gloo"``) and, on CUDA, the rank's device is ``cuda:LOCAL_RANK``.
    Without those variables (``python script.py``) nothing is initialized and the device is
    ``cuda`` when available, else ``cpu``: the same script runs single-process. Calling it again
    once the group exists only returns the device.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set (torchrun?) but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return device


def fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    r"""A 63-bit hash of the shapes and the exact bits of ``tensors``, as three exact integers in float64.

    Each tensor's bits are read as integers :math:`b_i` and combined as
    :math:`\sum_i (2i + 1)\, b_i` (wrapping modulo :math:`2^{64}`), so a change of any bit or
    a swap of two entries changes the hash (up to collisions). Cost: one pass over the entries.
    """
    h = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else None)
    for t in tensors:
        t = t.detach()
        h = h * 1_000_003 + t.dim()
        for size in t.shape:
            h = h * 1_000_003 + size
        if t.numel() == 0:
            continue
        bits = t.contiguous().reshape(-1)
        if bits.dtype.is_floating_point:
            bits = bits.view(_INT_OF[bits.element_size()])
        bits = bits.to(torch.int64)
        weights = torch.arange(1, 2 * bits.numel(), 2, dtype=torch.int64, device=bits.device)
        h = h * 1_000_003 + (bits * weights).sum()
    h = h & (2**63 - 1)
    mask = 2**_PIECE_BITS - 1
    pieces = [(h >> (_PIECE_BITS * k)) & mask for k in reversed(range(_PIECES))]
    return torch.stack(pieces).to(torch.float64)


class Communicator:
    """A process group as a sharded kernel sees it: ``rank``, ``size`` and checked concatenations.

    :param group: a ``torch.distributed`` process group (``None``: the default group). Where
        torch.distributed is not initialized the communicator is a group of one process.
    :param check_replicated: whether every concatenation also verifies that the tensors the caller names
        as replicated are equal on all ranks (:func:`fingerprint`; default on: it costs one pass
        over those tensors and nothing in communication).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, check_replicated: bool = True):
        self.group = group
        self.check_replicated = check_replicated
        initialized = dist.is_available() and dist.is_initialized()
        if group is not None and not initialized:
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        self.size = dist.get_world_size(group) if initialized else 1
        self.rank = dist.get_rank(group) if initialized else 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process (so that concatenations communicate)."""
        return self.size > 1

    def concat(
        self, part: Tensor, counts: Sequence[int], replicated: Sequence[Tensor] = (), what: str = "vectors"
    ) -> Tensor:
        """The ranks' ``part`` tensors concatenated along dimension 0, in rank order, on every rank.

        ``part`` has ``counts[rank]`` entries along dimension 0 (every rank knows every count: they
        come from the row plan, :mod:`gpntk.distributed.rows`) and the same other dimensions on all
        ranks. One ``all_gather`` (of parts padded to the largest count): no arithmetic, so the
        result holds each rank's numbers bit for bit. ``replicated``: tensors that must be bitwise
        equal on all ranks (for example the right-hand side of a product), checked in the same
        ``all_gather``; ``what`` names them in the error.
        """
        if part.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {part.shape[0]} entries, its plan says {counts[self.rank]}")
        if not self.distributed:
            return part
        rest = part.shape[1:]
        width = max(counts) * rest.numel()
        check = self.check_replicated and len(replicated) > 0
        flat = part.new_zeros(width + (_PIECES if check else 0))
        flat[: part.numel()] = part.reshape(-1)
        if check:
            flat[width:] = fingerprint(replicated).to(flat.dtype)
        gathered = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(gathered, flat, group=self.group)
        if check:
            differ = [rank for rank in range(self.size) if not torch.equal(gathered[rank][width:], gathered[0][width:])]
            if differ:
                raise ReplicationError(
                    f"the {what} differ between ranks (rank 0 and ranks {differ}); every rank of a sharded "
                    "kernel must hold the same inputs and run the same iterations. Seed every rank's "
                    "generator identically before drawing random probe vectors (torch.manual_seed(seed) "
                    "on every rank), and pass every rank the same data."
                )
        pieces = [g[: count * rest.numel()].view(count, *rest) for g, count in zip(gathered, counts)]
        return torch.cat(pieces)

    def check_same(self, tensors: dict[str, Tensor], device: torch.device, values: bool = True) -> None:
        """Raise on every rank when the named tensors' shapes (and, with ``values``, values) differ between ranks.

        One ``all_reduce`` of ``size x (2 + 3)`` numbers per tensor: its rows, its columns and
        its :func:`fingerprint`.
        """
        if not self.distributed:
            return
        names = list(tensors)
        table = torch.zeros(self.size, len(names), 2 + _PIECES, dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            t = tensors[name]
            rows = t.shape[-2] if t.dim() >= 2 else t.numel()
            cols = t.shape[-1] if t.dim() >= 1 else 1
            table[self.rank, i, 0], table[self.rank, i, 1] = rows, cols
            if values:
                table[self.rank, i, 2:] = fingerprint([t]).to(device)
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)
        for i, name in enumerate(names):
            for rank in range(1, self.size):
                mine, theirs = table[0, i], table[rank, i]
                if not torch.equal(mine[:2], theirs[:2]):
                    raise ValueError(
                        f"{name} has shape (..., {int(mine[0])}, {int(mine[1])}) on rank 0 but "
                        f"(..., {int(theirs[0])}, {int(theirs[1])}) on rank {rank}: a sharded kernel needs "
                        "the same inputs on every rank"
                    )
                if not torch.equal(mine, theirs):
                    raise ReplicationError(
                        f"{name} differs in value between rank 0 and rank {rank}: a sharded kernel needs "
                        "the same inputs and hyperparameters on every rank"
                    )
