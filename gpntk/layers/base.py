"""The architecture language: layers that map a :class:`~gpntk.state.KernelState` to another.

Every layer does three things:

* ``check(signature)`` validates its place in the architecture when the network is built and
  says what it hands on (:class:`Signature`), so invalid compositions fail early and clearly;
* ``kernel_map(state, hyper)`` maps the infinite-width kernel state, reading its
  hyperparameters from ``hyper`` (never from ``self``), so that the same code runs under
  GPyTorch's lazy, batched and indexed kernel evaluations;
* ``build_finite(in_features, width, out_features, is_output, generator)`` builds the finite-width
  torch module in NTK parameterization whose infinite-width limit the kernel is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator

import gpytorch
import torch
from torch import Tensor, nn

from ..errors import ArchitectureError
from ..state import KernelState

__all__ = ["Layer", "Signature", "Hyperparameters", "Serial", "serial", "Identity"]


@dataclass(frozen=True)
class Signature:
    """What a layer hands on to the next one, for the build-time checks.

    ``gaussian``: whether the outputs are Gaussian pre-activations (an affine layer was just
    applied), so that a nonlinearity may follow; ``None`` while unknown, at the start of a block
    built on its own (``serial`` checks its inside when it is built, and the whole network is
    checked from the input when a kernel or a finite network is made of it). ``last``: the name
    of the layer that produced the outputs, for messages.
    """

    gaussian: bool | None = False
    last: str = "the input"


class Hyperparameters:
    """The current hyperparameter tensors of a network, as passed to a covariance function.

    GPyTorch hands a kernel's covariance function its parameters as arguments (expanded,
    indexed or sliced along batch dimensions), so layers read them from here by key rather than
    from their own attributes. Keys are ``"{name}_{i}"`` with ``i`` the position of the layer
    among the network's distinct parameterized layers (a layer reused in several places has one
    key, so its hyperparameters are shared).
    """

    def __init__(self, net: "Layer", values: dict[str, Tensor]):
        self._index = {id(layer): i for i, layer in enumerate(parameterized_layers(net))}
        self._values = values

    def get(self, layer: "Layer", name: str) -> Tensor:
        return self._values[hyperparameter_key(self._index[id(layer)], name)]

    @staticmethod
    def collect(net: "Layer", like: Tensor | None = None) -> dict[str, Tensor]:
        """The tensors of every distinct parameterized layer of ``net``, keyed for :meth:`get`.

        With ``like``, in its dtype and device (see :meth:`Layer.hyperparameter`).
        """
        values = {}
        for i, layer in enumerate(parameterized_layers(net)):
            for name in layer.hyperparameter_names:
                values[hyperparameter_key(i, name)] = layer.hyperparameter(name, like)
        return values


def hyperparameter_key(index: int, name: str) -> str:
    return f"{name}_{index}"


def parameterized_layers(net: "Layer") -> list["Layer"]:
    """Distinct layers of ``net`` with hyperparameters, in a fixed order (first appearance)."""
    seen: dict[int, Layer] = {}
    for module in net.modules():
        if isinstance(module, Layer) and module.hyperparameter_names and id(module) not in seen:
            seen[id(module)] = module
    return list(seen.values())


class Layer(gpytorch.Module):
    """Base class of every layer. Subclasses override :meth:`check` and :meth:`kernel_map`."""

    #: names of the constrained hyperparameters (properties) this layer owns
    hyperparameter_names: tuple[str, ...] = ()

    def hyperparameter(self, name: str, like: Tensor | None = None) -> Tensor:
        """The current value of hyperparameter ``name``, in the dtype and device of ``like``."""
        value = getattr(self, name)
        return value if like is None else value.to(like)

    def check(self, signature: Signature) -> Signature:
        raise NotImplementedError

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        raise NotImplementedError

    def build_finite(
        self,
        in_features: int | None,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, int | None]:
        """The finite-width torch module of this layer and its number of output features.

        ``in_features`` is ``None`` when not yet known (the module then infers it lazily);
        hidden affine layers get ``width`` outputs and the network's output layer
        (``is_output``) gets ``out_features``.
        """
        raise NotImplementedError

    def children_layers(self) -> Iterator["Layer"]:
        return iter(())

    def expand_hyperparameters(self, batch_shape: torch.Size) -> None:
        """Give this layer's hyperparameters the batch shape ``batch_shape`` (values broadcast)."""

    def index_hyperparameters(self, index: tuple) -> None:
        """Index the batch dimensions of this layer's hyperparameters (``kernel[i]``)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, *args, **kwargs):  # pragma: no cover - layers are descriptions, not modules
        raise TypeError(
            f"{self.name} describes an architecture and is not called on tensors: use "
            "gpntk.NTKKernel(net) / gpntk.NNGPKernel(net) for kernels or net.finite(width) for a network."
        )

    def finite(
        self,
        width: int,
        *,
        in_features: int | None = None,
        out_features: int = 1,
        generator: torch.Generator | None = None,
    ) -> nn.Module:
        """The finite-width network of this architecture in NTK parameterization.

        Every hidden affine layer has ``width`` output features and the readout has
        ``out_features``. Each affine layer computes
        :math:`h = \\sigma_w / \\sqrt{n_{in}}\\, W x + \\sigma_b\\, b` with
        :math:`W, b \\sim \\mathcal N(0, 1)` drawn from ``generator``, and takes the current values
        of the layer's hyperparameters. Weights of a layer object used in several places are
        independent (only the hyperparameters are shared); frozen layers
        (``trainable=False``) have ``requires_grad=False`` weights. ``in_features`` may be left
        out: it is then inferred from the first batch of inputs.
        """
        width = _positive_integer("width", width)
        out_features = _positive_integer("out_features", out_features)
        if in_features is not None:
            in_features = _positive_integer("in_features", in_features)
        self.check(Signature())
        module, _ = self.build_finite(in_features, width, out_features, True, generator)
        return module


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
        self.check(Signature(gaussian=None, last="the start of this serial block"))

    def children_layers(self) -> Iterator[Layer]:
        return iter(self.layers)

    def check(self, signature: Signature) -> Signature:
        for layer in self.layers:
            signature = layer.check(signature)
        return signature

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        for layer in self.layers:
            state = layer.kernel_map(state, hyper)
        return state

    def build_finite(self, in_features, width, out_features, is_output, generator=None):
        modules = []
        features = in_features
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            module, features = layer.build_finite(features, width, out_features, is_output and i == last, generator)
            modules.append(module)
        return nn.Sequential(*modules), features

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"serial({inner})"


def _positive_integer(name: str, value) -> int:
    """``value`` as an int (Python or numpy integers), or a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def serial(*layers: Layer) -> Serial:
    """Compose layers in sequence; the architecture is checked now, not when it is used."""
    return Serial(*layers)


class Identity(Layer):
    """The identity layer: passes the state on unchanged."""

    def check(self, signature: Signature) -> Signature:
        return signature

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        return state

    def build_finite(self, in_features, width, out_features, is_output, generator=None):
        return nn.Identity(), in_features

    def __repr__(self) -> str:
        return "Identity()"
