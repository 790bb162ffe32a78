r"""Which tiles of a kernel matrix each rank computes: a balanced, deterministic division of the work.

A kernel matrix :math:`K(x_1, x_2)` (``n1 x n2``) is cut into tiles by gpntk's block planner
(:func:`gpntk.kernels.planning.block_plan`, one number per pair). For :math:`K(X, X)` only the
tiles on and above the diagonal are listed, each off-diagonal one standing for its mirror below
the diagonal too (it serves :math:`K_{rc} V_c` and :math:`K_{rc}^\top V_r`), so the ranks
together evaluate about :math:`n^2/2` pairs, as one process does; otherwise tiles are row bands
(the row partition of Wang et al. 2019) or squares. Tiles go to ranks by the
longest-processing-time rule: largest first, each to the rank with the least work so far (a tile
on the diagonal counts half: the kernel computes its symmetric half once), ties to the lower rank.
Every rank computes the same plan from the sizes alone, without communicating.
"""

from __future__ import annotations

import math

from ..kernels.planning import block_plan

__all__ = ["Tile", "tile_side", "plan_tiles"]

#: ``(rows, cols, on_diagonal, mirrored)``, as in :func:`gpntk.kernels.planning.block_plan`
Tile = tuple[slice, slice, bool, bool]

#: the largest tile side: a float64 tile of 2048 x 2048 holds 32 MiB
MAX_TILE_SIDE = 2048
#: the smallest tile side (smaller tiles cost more in per-call overhead than they gain in balance)
MIN_TILE_SIDE = 64


def tile_side(n1: int, n2: int, world_size: int) -> int:
    """The side of the tiles: about four tile rows per rank (one tile row for one process), 64 to 2048 points."""
    side = math.ceil(max(n1, n2) / (4 * world_size)) if world_size > 1 else MAX_TILE_SIDE
    return max(MIN_TILE_SIDE, min(MAX_TILE_SIDE, side))


def _cost(tile: Tile) -> float:
    rows, cols, diagonal, _ = tile
    return (rows.stop - rows.start) * (cols.stop - cols.start) * (0.5 if diagonal else 1.0)


def plan_tiles(n1: int, n2: int, symmetric: bool, mirror: bool, world_size: int) -> list[list[Tile]]:
    """The tiles of each rank (``world_size`` lists), covering an ``n1 x n2`` kernel exactly once.

    ``symmetric``: the kernel is :math:`K(X, X)` (the inputs hold the same points); ``mirror``:
    an off-diagonal tile may stand for its transpose too (not when gradients with respect to the
    inputs are wanted: a mirrored tile's input gradients would belong to other rows).
    """
    if n1 == 0 or n2 == 0:
        return [[] for _ in range(world_size)]
    side = tile_side(n1, n2, world_size)
    if symmetric:
        tiles = block_plan(n1, n2, 1, side * side, True, mirror)
    else:  # squares (block_plan's row bands would be too thin to balance for wide kernels)
        tiles = [
            (slice(i, min(i + side, n1)), slice(j, min(j + side, n2)), False, False)
            for i in range(0, n1, side)
            for j in range(0, n2, side)
        ]
    order = sorted(range(len(tiles)), key=lambda k: (-_cost(tiles[k]), k))
    loads = [0.0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for k in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += _cost(tiles[k])
        owned[rank].append(k)
    return [[tiles[k] for k in sorted(ks)] for ks in owned]
