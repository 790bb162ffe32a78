"""Serial composition and the identity: the layers that only arrange other layers.

The layer protocol itself (:class:`Layer`, :class:`Signature`, :func:`check_network`) lives in
:mod:`gpntk.core.layer`; it is re-exported here for ``gpntk.layers``.
"""

from __future__ import annotations

from typing import Iterator, Sequence, cast

import torch
from torch import nn

from ..core.hyperparameters import Hyperparameters
from ..core.layer import UNKNOWN, Layer, Shape, Signature, Signatures, States, check_network
from ..errors import ArchitectureError

__all__ = ["Layer", "Signature", "Hyperparameters", "Serial", "serial", "Identity", "check_network"]


class Serial(Layer):
    """Layers applied one after another: :math:`f = f_L \\circ \\cdots \\circ f_1`."""

    def __init__(self, *layers: Layer):
        super().__init__()
        flat: list[Layer] = []
        for layer in layers:
            if isinstance(layer, (list, tuple)):
                flat.extend(layer)
            else:
                flat.append(layer)
        for layer in flat:
            if not isinstance(layer, Layer):
                raise ArchitectureError(
                    f"serial() takes gpntk layers, got {type(layer).__name__}: {layer!r}"
                )
        if not flat:
            raise ArchitectureError("serial() needs at least one layer")
        self.layers = nn.ModuleList(flat)
        self.takes_branches = flat[0].takes_branches
        self.check(UNKNOWN)

    @property
    def _layers(self) -> Sequence[Layer]:
        return cast("Sequence[Layer]", self.layers)

    def children_layers(self) -> Iterator[Layer]:
        return iter(self._layers)

    # takes and returns the branches of a FanOut too (takes_branches): wider than Layer.check
    def check(self, signature: Signatures) -> Signatures:
        for layer in self._layers:
            if isinstance(signature, tuple) and not layer.takes_branches:
                raise ArchitectureError(
                    f"{layer.name} gets the {len(signature)} branches of a FanOut; apply parallel(...) to "
                    "them or combine them with FanInSum(), FanInConcat() or FanInProd() first"
                )
            signature = layer.check(signature)  # type: ignore[arg-type]  # tuples reach takes_branches layers only
        return signature

    def needs_full(self, after: bool) -> bool:
        for layer in reversed(self._layers):
            after = layer.needs_full(after)
        return after

    # maps the branches of a FanOut too (takes_branches): wider than Layer.kernel_map
    def kernel_map(self, state: States, hyper: Hyperparameters) -> States:
        layers = self._layers
        keep = [False] * len(layers)
        after = _keep_full(state)
        for i in range(len(layers) - 1, -1, -1):
            keep[i] = after
            after = layers[i].needs_full(after)
        for layer, keep_full in zip(layers, keep):
            # tuples reach takes_branches layers only
            state = _settle(layer.kernel_map(_with_keep_full(state, keep_full), hyper))  # type: ignore[arg-type]
        return state

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        modules = []
        shape = in_shape
        layers = self._layers
        for i, layer in enumerate(layers):
            last = is_output and not any(later.contains_affine() for later in layers[i + 1 :])
            module, shape = layer.build_finite(shape, width, out_features, last, generator)
            modules.append(module)
        return nn.Sequential(*modules), shape

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self._layers)
        return f"serial({inner})"


def _keep_full(state: States) -> bool:
    if isinstance(state, tuple):
        return any(s.keep_full for s in state)
    return state.keep_full


def _with_keep_full(state: States, keep_full: bool) -> States:
    if isinstance(state, tuple):
        return tuple(s.replace(keep_full=keep_full) for s in state)
    return state.replace(keep_full=keep_full)


def _settle(state: States) -> States:
    if isinstance(state, tuple):
        return tuple(s.settle() for s in state)
    return state.settle()


def serial(*layers: Layer) -> Serial:
    """Compose layers in sequence; the architecture is checked now, not when it is used."""
    return Serial(*layers)


class Identity(Layer):
    """The identity layer: passes the state on unchanged."""

    takes_branches = True  # passes branches on unchanged too

    # passes the branches of a FanOut on too (takes_branches): wider than Layer.check / kernel_map
    def check(self, signature: Signatures) -> Signatures:
        return signature

    def kernel_map(self, state: States, hyper: Hyperparameters) -> States:
        return state

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        return nn.Identity(), in_shape

    def __repr__(self) -> str:
        return "Identity()"
