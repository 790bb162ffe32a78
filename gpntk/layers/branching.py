r"""Branching architectures: ``FanOut``, ``parallel`` and the fan-in layers that merge branches.

``FanOut(n)`` hands its input to ``n`` branches, ``parallel(b1, ..., bn)`` applies branch ``i`` to
the ``i``-th, and ``FanInSum`` / ``FanInProd`` / ``FanInConcat`` merge them, e.g. a residual block
``serial(FanOut(2), parallel(serial(ReLU(), Dense(...)), Identity()), FanInSum())``.

Merging is exact at infinite width when the branches' outputs are uncorrelated, which holds when
all branches but one end with their own affine layer (a fresh zero-mean function); sums and
products of branches that are both nonlinear functions of the same input would need their
cross-covariance, which no layer computes, so they are refused. Concatenation needs nothing of the
kind: a dense layer after it sees each branch's channels with their own weights. Independence is
tracked for every enclosing ``FanOut`` (``Signature.outer_independent``), so nested residual blocks
``h + (b + g(b))``, whose inner sum is a fresh function with respect to ``h``, merge exactly
(:func:`merged_independence`).
"""

from __future__ import annotations

from typing import Iterator, Sequence, cast

import torch
from torch import Tensor, nn

from .._validation import integer_argument
from ..core.coincident import common_pairs
from ..core.finite import Branches, MergeBranches, ParallelBranches
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Shapes, Signature, Signatures, States
from ..core.state import KernelState
from ..errors import ArchitectureError
from .base import Serial

__all__ = ["FanOut", "Parallel", "parallel", "FanInSum", "FanInConcat", "FanInProd"]


def _is_unknown(signature: Signatures) -> bool:
    return not isinstance(signature, tuple) and signature.channels is None and signature.gaussian is None


class FanOut(Layer):
    """Hands its input to ``num`` branches (a ``parallel`` or a fan-in layer must follow)."""

    def __init__(self, num: int) -> None:
        super().__init__()
        try:
            self.num = integer_argument("FanOut num", num, minimum=1)
        except ValueError as error:
            raise ArchitectureError(str(error)) from None

    # hands on one signature / state per branch: wider than Layer.check / kernel_map
    def check(self, signature: Signature) -> tuple[Signature, ...]:
        # copies of one function are not independent of each other, but each stays what it was with
        # respect to the branches of enclosing FanOuts (independent of them if it was fresh)
        outer = (*signature.outer_independent, signature.independent is True)
        return (signature.after(self, independent=False, outer_independent=outer),) * self.num

    def kernel_map(
        self, state: KernelState, hyper: Hyperparameters
    ) -> tuple[KernelState, ...]:
        return (state,) * self.num

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shapes]:
        return Branches(self.num), [in_shape] * self.num

    def __repr__(self) -> str:
        return f"FanOut({self.num})"


class Parallel(Layer):
    """Applies branch ``i`` to the ``i``-th input of a ``FanOut``."""

    takes_branches = True

    def __init__(self, *branches: Layer | Sequence[Layer]) -> None:
        super().__init__()
        if not branches:
            raise ArchitectureError("parallel() needs at least one branch")
        built = []
        for branch in branches:
            if isinstance(branch, (list, tuple)):
                branch = Serial(*branch)
            if not isinstance(branch, Layer):
                raise ArchitectureError(f"parallel() takes gpntk layers or lists of them, got {type(branch).__name__}")
            built.append(branch)
        self.branches = nn.ModuleList(built)

    @property
    def _branches(self) -> Sequence[Layer]:
        return cast("Sequence[Layer]", self.branches)

    def children_layers(self) -> Iterator[Layer]:
        return iter(self._branches)

    # takes and hands on one signature / state per branch: wider than Layer.check / kernel_map
    def check(self, signature: Signatures) -> Signatures:
        if _is_unknown(signature):
            signature = (cast(Signature, signature),) * len(self.branches)
        if not isinstance(signature, tuple):
            raise ArchitectureError(
                f"parallel() with {len(self.branches)} branches needs FanOut({len(self.branches)}) before it, "
                f"not {signature.last}"
            )
        if len(signature) != len(self.branches):
            raise ArchitectureError(
                f"parallel() has {len(self.branches)} branches but gets {len(signature)} inputs "
                f"(FanOut({len(signature)}))"
            )
        out = []
        for branch, sig in zip(self._branches, signature):
            if isinstance(sig, tuple) and not branch.takes_branches:
                raise ArchitectureError("a branch of parallel() got nested branches; merge them inside the branch")
            out.append(branch.check(sig))
        return tuple(out)

    def needs_full(self, after: bool) -> bool:
        return any(branch.needs_full(after) for branch in self._branches)

    def kernel_map(self, state: States, hyper: Hyperparameters) -> States:
        states = cast("tuple[KernelState, ...]", state)  # check() refuses a single input
        return tuple(branch.kernel_map(s, hyper).settle() for branch, s in zip(self._branches, states))

    def build_finite(
        self,
        in_shape: Shapes,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shapes]:
        modules, shapes = [], []
        for branch, shape in zip(self._branches, cast("list[Shape]", in_shape)):  # one shape per branch
            module, out = branch.build_finite(shape, width, out_features, is_output, generator)
            modules.append(module)
            shapes.append(out)
        return ParallelBranches(modules), shapes

    def __repr__(self) -> str:
        return f"parallel({', '.join(repr(b) for b in self._branches)})"


def parallel(*branches: Layer | Sequence[Layer]) -> Parallel:
    """Branches applied side by side to the outputs of a ``FanOut``; a list is a ``serial`` branch."""
    return Parallel(*branches)


class _FanIn(Layer):
    """Merges the branches of a ``FanOut``."""

    takes_branches = True
    how: str
    needs_independence = True

    # takes one signature / state per branch
    def check(self, signature: Signatures) -> Signature:
        if _is_unknown(signature):
            assert not isinstance(signature, tuple)  # _is_unknown is False for branches
            return signature.after(self)
        if not isinstance(signature, tuple):
            raise ArchitectureError(
                f"{self.name} merges the branches of a FanOut, but gets one input ({signature.last})"
            )
        known = {s.spatial for s in signature if s.spatial is not None}
        if len(known) > 1:
            raise ArchitectureError(
                f"{self.name} gets branches of different spatial shapes {sorted(known)}; they must match"
            )
        channels = {s.channels for s in signature if s.channels is not None}
        if len(channels) > 1:
            raise ArchitectureError(
                f"{self.name} gets a branch with the network's input features and one with hidden "
                "features (width); put an affine layer (Dense/Conv) in the first so the numbers match"
            )
        dependent = [i for i, s in enumerate(signature) if s.independent is False]
        if self.needs_independence and len(dependent) > 1:
            raise ArchitectureError(
                f"{self.name} of branches {dependent} is not computable: more than one branch is a function "
                "of the same input without its own affine layer at the end, so the branches are correlated "
                "and their cross-covariance would be needed; end all branches but one with Dense or Conv"
            )
        spatial = next(iter(known)) if known else None
        return self.merged(signature, spatial, next(iter(channels)) if channels else None)

    def merged(
        self, signatures: tuple[Signature, ...], spatial: tuple[int, ...] | None, channels: str | None
    ) -> Signature:
        raise NotImplementedError

    def kernel_map(self, state: States, hyper: Hyperparameters) -> KernelState:
        states = list(cast("tuple[KernelState, ...]", state))  # check() refuses a single input
        if len({s.layout for s in states}) > 1:  # some branch already dropped to the diagonal
            states = [s.replace(keep_full=False).settle() for s in states]
        first = states[0]
        cov12 = self.combine([s.cov12 for s in states])
        if first.diag:
            var1 = var2 = cov12
        else:
            var1, var2 = self.combine([s.var1 for s in states]), self.combine([s.var2 for s in states])
        ntk12 = self.combine_ntk(states) if first.track_ntk else None
        # a pair identical in one branch may not be in another (after a Dropout): keep the common ones
        coincident = common_pairs([s.coincident for s in states])
        return first.replace(
            cov12=cov12, var1=var1, var2=var2, ntk12=ntk12, keep_full=first.keep_full, coincident=coincident
        )

    def combine(self, tensors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def combine_ntk(self, states: Sequence[KernelState]) -> Tensor | None:
        present = [s.ntk12 for s in states if s.ntk12 is not None]
        if not present:
            return None
        return self.combine([s.ntk_or_zeros() for s in states])

    def build_finite(
        self,
        in_shape: Shapes,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shapes]:
        shapes = list(cast("list[Shape]", in_shape))  # one shape per branch
        if self.how == "concat":
            known = cast("list[tuple[int, ...]]", shapes)  # as before, a None shape raises TypeError in s[1:]
            rest = {tuple(s[1:]) for s in known}
            if len(rest) > 1 or any(s is None for s in shapes):
                raise ArchitectureError(f"FanInConcat gets branches of shapes {shapes}, which do not concatenate")
            return MergeBranches(self.how), (sum(s[0] for s in known), *known[0][1:])
        if len({s for s in shapes}) > 1:
            raise ArchitectureError(
                f"{self.name} gets branches of finite shapes {shapes}; they must match (put the readout Dense "
                f"after {self.name})"
            )
        return MergeBranches(self.how), shapes[0]

    def __repr__(self) -> str:
        return f"{self.name}()"


class FanInSum(_FanIn):
    r"""Sum of the branches: :math:`\Sigma = \sum_i \Sigma_i`, :math:`\Theta = \sum_i \Theta_i`
    (uncorrelated branches)."""

    how = "sum"

    def merged(
        self, signatures: tuple[Signature, ...], spatial: tuple[int, ...] | None, channels: str | None
    ) -> Signature:
        gaussian = [s.gaussian for s in signatures]
        independent, outer = merged_independence(signatures)
        return Signature(
            gaussian=all(g is True for g in gaussian) or (None if None in gaussian else False),
            last=self.name, spatial=spatial, channels=channels,
            independent=independent, outer_independent=outer, graph=merged_graph(signatures),
        )

    def combine(self, tensors: Sequence[Tensor]) -> Tensor:
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out


class FanInProd(_FanIn):
    r"""Elementwise product of the branches (uncorrelated branches):

    .. math::
        \Sigma = \prod_i \Sigma_i, \qquad \Theta = \sum_i \Theta_i \prod_{j \ne i} \Sigma_j.
    """

    how = "prod"

    def merged(
        self, signatures: tuple[Signature, ...], spatial: tuple[int, ...] | None, channels: str | None
    ) -> Signature:
        # the product of fresh functions is not treated as fresh: refused in enclosing sums, as before
        outer = (False,) * (min(len(s.outer_independent) for s in signatures) - 1)
        return Signature(
            gaussian=False, last=self.name, spatial=spatial, channels=channels, independent=False,
            outer_independent=outer, graph=merged_graph(signatures),
        )

    def combine(self, tensors: Sequence[Tensor]) -> Tensor:
        out = tensors[0]
        for t in tensors[1:]:
            out = out * t
        return out

    def combine_ntk(self, states: Sequence[KernelState]) -> Tensor | None:
        total: Tensor | None = None
        for i, state in enumerate(states):
            if state.ntk12 is None:
                continue
            term = state.ntk12
            for j, other in enumerate(states):
                if j != i:
                    term = term * other.cov12
            total = term if total is None else total + term
        return total


class FanInConcat(_FanIn):
    r"""Concatenation along the channels: :math:`\Sigma = \frac1n \sum_i \Sigma_i`, same for :math:`\Theta`.

    At infinite width every branch has the same (infinite) number of channels, so a dense layer
    after the concatenation weighs them equally. The branches need not be independent.
    """

    how = "concat"
    needs_independence = False

    def merged(
        self, signatures: tuple[Signature, ...], spatial: tuple[int, ...] | None, channels: str | None
    ) -> Signature:
        independent, outer = merged_independence(signatures)
        return Signature(
            gaussian=False, last=self.name, spatial=spatial, channels=channels,
            independent=independent, outer_independent=outer, graph=merged_graph(signatures),
        )

    def combine(self, tensors: Sequence[Tensor]) -> Tensor:
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out / len(tensors)


def merged_graph(signatures: Sequence[Signature]) -> bool | None:
    """Whether the merged branches' positions are graph nodes: as the branches say (``None`` if unknown)."""
    graphs = {s.graph for s in signatures}
    if True in graphs:
        return True
    return None if None in graphs else False


def merged_independence(signatures: Sequence[Signature]) -> tuple[bool, tuple[bool, ...]]:
    """``independent`` and ``outer_independent`` of the sum (or concatenation) of branches.

    The branches come from one ``FanOut``, whose own entry is the last of each branch's
    ``outer_independent``. A sum of functions that are each fresh with respect to the branches of
    an enclosing ``FanOut`` (a zero-mean function of affine weights no other branch has) is
    fresh with respect to them too: its covariance with them vanishes, in Σ and in Θ. So
    ``h + (b + g(b))`` with ``b``, ``g`` ending in their own affine layers merges exactly, while
    ``h + (relu(h) + g(h))`` is refused (``relu(h)`` is correlated with ``h``).
    """
    depth = min(len(s.outer_independent) for s in signatures)
    if depth == 0:  # the enclosing FanOuts are not known (a block checked on its own)
        return all(s.independent is True for s in signatures), ()
    columns = zip(*(s.outer_independent[:depth] for s in signatures))
    fresh = tuple(all(column) for column in columns)
    return fresh[-1], fresh[:-1]
