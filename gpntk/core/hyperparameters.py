"""The hyperparameter values a kernel evaluation reads: one snapshot per evaluation, never written back."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from torch import Tensor

from .layer import Layer

__all__ = ["Hyperparameters", "hyperparameter_key", "parameterized_layers"]


class Hyperparameters:
    """A read-only snapshot of a network's hyperparameter tensors, as passed to a covariance function.

    GPyTorch hands a kernel's covariance function its parameters as arguments (expanded,
    indexed or sliced along batch dimensions), so layers read them from here by key rather than
    from their own attributes. Keys are ``"{name}_{i}"`` with ``i`` the position of the layer
    among the network's distinct parameterized layers (a layer reused in several places has one
    key, so its hyperparameters are shared).

    The snapshot is frozen: it has no setters, its mapping is a read-only view, and nothing in
    gpntk writes a value back into the network. :meth:`collect` only reads the network.
    """

    __slots__ = ("_index", "_values")
    _index: dict[int, int]
    _values: Mapping[str, Tensor]

    def __init__(self, net: Layer, values: Mapping[str, Tensor]):
        object.__setattr__(self, "_index", {id(layer): i for i, layer in enumerate(parameterized_layers(net))})
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Hyperparameters is a read-only snapshot")

    @property
    def values(self) -> Mapping[str, Tensor]:
        """The tensors by key (a read-only view)."""
        return self._values

    def get(self, layer: Layer, name: str) -> Tensor:
        """The value of ``layer``'s hyperparameter ``name``."""
        return self._values[hyperparameter_key(self._index[id(layer)], name)]

    @staticmethod
    def collect(net: Layer, like: Tensor | None = None) -> dict[str, Tensor]:
        """The tensors of every distinct parameterized layer of ``net``, keyed for :meth:`get`.

        With ``like``, in its dtype and device (see :meth:`Layer.hyperparameter`). Reads the
        network and changes nothing in it.
        """
        values = {}
        for i, layer in enumerate(parameterized_layers(net)):
            for name in layer.hyperparameter_names:
                values[hyperparameter_key(i, name)] = layer.hyperparameter(name, like)
        return values


def hyperparameter_key(index: int, name: str) -> str:
    """The key of hyperparameter ``name`` of the ``index``-th parameterized layer."""
    return f"{name}_{index}"


def parameterized_layers(net: "Layer") -> list["Layer"]:
    """Distinct layers of ``net`` with hyperparameters, in a fixed order (first appearance)."""
    seen: dict[int, Layer] = {}
    for module in net.modules():
        if isinstance(module, Layer) and module.hyperparameter_names and id(module) not in seen:
            seen[id(module)] = module
    return list(seen.values())
