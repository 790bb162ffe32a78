r"""Dense evaluation of a network's kernels: run the layer recursion on whole matrices, or on blocks.

This is the backend behind :class:`~gpntk.kernels.NTKKernel` and
:class:`~gpntk.kernels.NNGPKernel` for matrices that fit in memory (and the per-block engine of
the matrix-free backend, :mod:`gpntk.kernels.blockwise`); :mod:`gpntk.kernels.backends` decides
which one a kernel matrix gets.

Kernels are computed in blocks of input pairs so that no intermediate tensor holds more than
``block_elements`` numbers (default :func:`default_block_elements`). Spatial architectures carry a
covariance per pair of positions (``P`` or ``P²`` numbers per pair of inputs, see
:mod:`gpntk.spatial`), so for them blocks bound the memory; on CPUs small blocks are also much
faster, because the dozens of elementwise passes of the recursion then run in cache instead of
allocating fresh memory for every pass (measured: a 2000 x 2000 depth-3 ReLU NTK 2.8x faster in
512 x 512 blocks, a CNN-with-pooling kernel 6x faster in blocks of 2**18 numbers than 2**23). For
inputs that are the same points only the blocks on and above the diagonal are computed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence, cast

import torch
from torch import Tensor

from .. import settings
from .._transforms import is_batched, is_transformed
from ..core.coincident import Coincidence, RowIds
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer
from ..core.spatial import Layout
from ..core.state import KernelState
from ..errors import NumericalWarning

__all__ = [
    "evaluate", "kernel_diagonal", "nngp_and_ntk", "same_inputs", "input_layout",
    "default_block_elements", "check_finite_kernel",
]

Output = Literal["ntk", "nngp"]

def default_block_elements(device: torch.device) -> int:
    """The most numbers one intermediate tensor of a block holds by default.

    On CPUs ``2**18`` (2 MiB in float64: the recursion's passes stay in cache); on GPUs ``2**25``
    (256 MiB in float64: large kernels launches, few blocks).
    """
    return 2**18 if device.type == "cpu" else 2**25


def same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x1`` and ``x2`` hold the same points (then diagonals use the per-point recursion).

    Inside a ``torch.func`` batching transform (``vmap``), where values cannot decide a branch,
    only ``x1 is x2`` counts (coincident rows are still found, see :mod:`gpntk.coincident`).
    """
    if x1 is x2:
        return True
    if x1.shape != x2.shape or is_batched(x1) or is_batched(x2):
        return False
    return bool(torch.equal(x1, x2))


def input_layout(net: Layer, input_shape: Sequence[int] | None) -> Layout:
    """The layout of the input kernel: spatial when ``input_shape`` has spatial dims, full if pooling follows."""
    if input_shape is None or len(input_shape) < 2:
        return Layout()
    return Layout(tuple(input_shape[1:]), full=net.needs_full(False))


def _kernels(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: Sequence[int] | None,
    track_ntk: bool,
    same: bool,
    diag: bool,
    coincident: Coincidence | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(Σ, Θ or None)`` of one block: the input kernel and every layer's map.

    ``same``: ``x1`` and ``x2`` are the same points; ``coincident``: the pairs of identical rows
    (:mod:`gpntk.coincident`). No data-dependent branch, so it compiles.
    """
    layout = input_layout(net, input_shape)
    state = KernelState.from_inputs(
        x1, x2, diag=diag, same_inputs=same, track_ntk=track_ntk, input_shape=input_shape, full=layout.full,
        coincident=coincident,
    )
    state = net.kernel_map(state, Hyperparameters(net, hyper))
    return state.cov12, (state.ntk_or_zeros() if track_ntk else None)


_compiled_kernels = None
_compile_failed = False
#: large evaluations seen so far per configuration (net, dtype, device, NTK or not), for fusion "auto"
_large_calls: dict[tuple[int, torch.dtype, torch.device, bool], int] = {}
#: the torch.compile backend (tests use "aot_eager" to check tracing without C++ compilation)
_COMPILE_BACKEND = "inductor"


def _use_fusion(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: Sequence[int] | None,
    track_ntk: bool,
    elements: int,
) -> bool:
    """Whether this evaluation runs compiled (:class:`gpntk.settings.fusion`); counts large evaluations.

    Spatial architectures always run eagerly: their recursion (window sums, layouts) takes minutes
    to trace and compile, and its cost is dominated by the spatial maps rather than by chains of
    elementwise passes.
    """
    if _compile_failed or (input_shape is not None and len(input_shape) >= 2):
        return False
    needs_grad = torch.is_grad_enabled() and (
        x1.requires_grad or x2.requires_grad or any(h.requires_grad for h in hyper.values())
    )
    previous = 0
    if elements >= settings.FUSION_MIN_ELEMENTS:
        key = (id(net), x1.dtype, x1.device, track_ntk)
        previous = _large_calls.get(key, 0)
        _large_calls[key] = previous + 1
    return settings.fusion.enabled_for(elements, needs_grad, previous)


#: ``_recursion``'s default: find the coincident pairs of the block itself
_FIND = object()


def _recursion(*args: Any, fused: bool, coincident: Any = _FIND) -> tuple[Tensor, Tensor | None]:
    """One block's kernels, ``_kernels(*args, coincident)``, through the compiled function when ``fused``.

    ``args`` are ``(net, x1, x2, hyper, input_shape, track_ntk, same, diag)``. The coincident pairs
    (data-dependent, so found outside the compiled function) are found here unless given.
    """
    global _compiled_kernels, _compile_failed
    if coincident is _FIND:
        x1, x2, diag = args[1], args[2], args[7]
        coincident = None if diag else RowIds(x1, x2).block()
    args = (*args, coincident)
    if not fused or _compile_failed:
        return _kernels(*args)
    if _compiled_kernels is None:
        _compiled_kernels = torch.compile(_kernels, dynamic=True, backend=_COMPILE_BACKEND)
    try:
        return _compiled_kernels(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to eager, once
        _compile_failed = True
        warnings.warn(
            f"torch.compile failed ({type(error).__name__}: {error}); gpntk evaluates kernels eagerly from "
            "now on (see gpntk.settings.fusion)",
            NumericalWarning,
            stacklevel=2,
        )
        return _kernels(*args)


def check_finite_kernel(*values: Tensor | None, inputs: Tensor | None = None) -> None:
    """Raise ``FloatingPointError`` if a kernel value (or product) computed from finite inputs is not finite.

    Inputs are checked for NaN and infinities before any evaluation, so a non-finite value here
    means the recursion overflowed the dtype's range (an ``Exp`` or polynomial activation on large
    variances, a deep network with a large weight variance, float32 on large inputs); it is
    reported rather than returned. ``inputs``: a right-hand side of a product, which may itself be
    non-finite (then nothing is checked). Skipped under ``torch.func`` transforms, where a
    data-dependent check is unavailable.
    """
    if inputs is not None and _unchecked(inputs):
        return
    for value in values:
        if value is None or _unchecked(value) or value.numel() == 0:
            continue
        if not bool(torch.isfinite(value).all()):
            if inputs is not None and not bool(torch.isfinite(inputs).all()):
                return
            count = int((~torch.isfinite(value)).sum())
            remedy = "float64, " if value.dtype != torch.float64 else ""
            raise FloatingPointError(
                f"the kernel overflowed: {count} of {value.numel()} values are NaN or infinite in {value.dtype} "
                "although the inputs are finite (the exact values exceed the dtype's range). Use "
                f"{remedy}smaller weight or bias variances, fewer layers, or rescaled inputs."
            )


def _unchecked(value: Tensor) -> bool:
    return is_transformed(value)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def block_plan(
    n1: int, n2: int, per_pair: int, budget: int, symmetric: bool, mirror: bool = True
) -> list[tuple[slice, slice, bool, bool]]:
    """The blocks ``(rows, cols, on_diagonal, mirrored)`` that cover an ``n1 x n2`` kernel.

    Each block holds at most ``budget`` numbers (``per_pair`` per pair of inputs). For a
    ``symmetric`` kernel K(X, X) the blocks are squares and ``on_diagonal`` blocks pair the same
    points; with ``mirror`` only blocks on and above the diagonal are listed, the ``mirrored``
    ones standing for their transpose below it too. Otherwise, when a whole row fits, blocks are
    full-width row bands.
    """
    if symmetric or n2 * per_pair > budget:
        size = max(1, math.isqrt(max(budget // per_pair, 1)))
        rows, cols = _blocks(n1, size), _blocks(n2, size)
    else:
        rows, cols = _blocks(n1, max(1, budget // (n2 * per_pair))), [slice(0, n2)]
    return [
        (r, c, symmetric and i == j, symmetric and mirror and j > i)
        for i, r in enumerate(rows)
        for j, c in enumerate(cols)
        if not (symmetric and mirror and j < i)
    ]


def batch_shape_of(x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> torch.Size:
    """The broadcast batch shape of the inputs and the hyperparameters."""
    return torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(h.shape[:-2] for h in hyper.values()))


def numbers_per_pair(
    net: Layer, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], input_shape: Sequence[int] | None
) -> int:
    """Numbers one pair of inputs takes in the recursion: spatial entries times the batch size."""
    return input_layout(net, input_shape).elements_per_pair * math.prod(batch_shape_of(x1, x2, hyper))


def kernel_blocks(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: Sequence[int] | None,
    block_elements: int | None,
    mirror: bool = True,
) -> tuple[list[tuple[slice, slice, bool, bool]], int, bool]:
    """``(blocks, numbers in the whole kernel, same points)`` of the kernel between ``x1`` and ``x2``.

    ``blocks`` as in :func:`block_plan`, for the budget ``block_elements`` (default
    :func:`default_block_elements`); "same points": ``x1`` and ``x2`` hold equal values.
    """
    budget = default_block_elements(x1.device) if block_elements is None else block_elements
    per_pair = numbers_per_pair(net, x1, x2, hyper, input_shape)
    n1, n2 = x1.shape[-2], x2.shape[-2]
    symmetric = same_inputs(x1, x2)
    if n1 * n2 * per_pair <= budget:
        blocks = [(slice(0, n1), slice(0, n2), symmetric, False)]
    else:
        blocks = block_plan(n1, n2, per_pair, budget, symmetric, mirror)
    return blocks, n1 * n2 * per_pair, symmetric


def evaluate(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    *,
    input_shape: Sequence[int] | None = None,
    track_ntk: bool = True,
    block_elements: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""``(Σ(x1, x2), Θ(x1, x2) or None)``, ``(..., n1, n2)`` each, in blocks where needed."""
    blocks, elements, symmetric = kernel_blocks(net, x1, x2, hyper, input_shape, block_elements)
    fused = _use_fusion(net, x1, x2, hyper, input_shape, track_ntk, elements)
    ids = RowIds(x1, x2)
    if len(blocks) == 1:
        cov, ntk = _recursion(
            net, x1, x2, hyper, input_shape, track_ntk, symmetric, False, fused=fused, coincident=ids.block()
        )
        check_finite_kernel(cov, ntk)
        return cov, ntk
    n1, n2 = x1.shape[-2], x2.shape[-2]
    outputs: list[Tensor | None] = [None, None]  # Σ and Θ, allocated at the first block
    for r, c, same, mirrored in blocks:
        a = x1[..., r, :]
        b = a if (same and x2 is x1) else x2[..., c, :]
        kernels = _recursion(
            net, a, b, hyper, input_shape, track_ntk, same, False, fused=fused, coincident=ids.block(r, c)
        )
        for which, block in enumerate(kernels):
            if block is None:
                continue
            target = outputs[which]
            if target is None:
                target = outputs[which] = block.new_empty(*block.shape[:-2], n1, n2)
            target[..., r, c] = block
            if mirrored:
                target[..., c, r] = block.transpose(-1, -2)
    check_finite_kernel(*outputs)
    return cast(Tensor, outputs[0]), outputs[1]  # Σ is always computed


def kernel_diagonal(
    x1: Tensor,
    x2: Tensor,
    *,
    net: Layer,
    output: Output,
    hyper: dict[str, Tensor],
    input_shape: Sequence[int] | None = None,
    block_elements: int | None = None,
) -> Tensor:
    r"""The diagonal :math:`k(x_{1,i}, x_{2,i})`, shape ``(..., n)``, without forming a matrix.

    When ``x1 is x2`` this is the exact per-point recursion on the variances :math:`\Sigma(x, x)`,
    :math:`\Theta(x, x)`; otherwise each pair is evaluated on its own, identical pairs taking the
    same per-point values (bitwise, see :mod:`gpntk.coincident`) with the derivatives of the pair
    formula in each argument. Points are taken in chunks so that a
    spatial covariance of at most ``block_elements`` numbers is held at once.
    """
    batch = batch_shape_of(x1, x2, hyper)
    budget = default_block_elements(x1.device) if block_elements is None else block_elements
    per_point = input_layout(net, input_shape).elements_per_pair
    chunks = _blocks(x1.shape[-2], max(1, budget // per_point))
    track_ntk = output == "ntk"
    parts = []
    same = x1 is x2
    for chunk in chunks:
        a = x1[..., chunk, :]
        b = a if x2 is x1 else x2[..., chunk, :]
        if same:
            cov, ntk = _recursion(net, a, b, hyper, input_shape, track_ntk, True, True, fused=False)
            out = cast(Tensor, cov if output == "nngp" else ntk).squeeze(-1)  # ntk is computed for "ntk"
        else:
            # every pair (x1_i, x2_i) as its own 1 x 1 kernel, with the point index as a batch dimension
            point_hyper = {name: value.unsqueeze(-3) for name, value in hyper.items()}
            cov, ntk = _recursion(
                net, a.unsqueeze(-2), b.unsqueeze(-2), point_hyper, input_shape, track_ntk, False, False, fused=False
            )
            out = cast(Tensor, cov if output == "nngp" else ntk)[..., 0, 0]
        parts.append(out)
    out = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    check_finite_kernel(out)
    return out.expand(*batch, x1.shape[-2])


def nngp_and_ntk(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    detach_hyperparameters: bool = False,
    track_ntk: bool = True,
    block_elements: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""Both kernel matrices :math:`(\Sigma(x_1, x_2), \Theta(x_1, x_2))` from one pass of the recursion.

    ``x1`` is ``(..., n1, d)``, ``x2`` is ``(..., n2, d)`` (``None`` for ``x1``); the network's
    current hyperparameters are cast to the dtype and device of ``x1`` (and treated as constants
    with ``detach_hyperparameters``). With ``track_ntk=False`` only the NNGP is computed (the NTK
    is returned as ``None``). Used where both kernels are needed at once (the trained-ensemble
    posterior).
    """
    x2 = x1 if x2 is None else x2
    hyper = Hyperparameters.collect(net, like=x1)
    if detach_hyperparameters:
        hyper = {name: value.detach() for name, value in hyper.items()}
    return evaluate(
        net, x1, x2, hyper, input_shape=input_shape, track_ntk=track_ntk, block_elements=block_elements
    )
