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

import math
import operator
import weakref
from dataclasses import dataclass, replace
from typing import Any, Iterator, NoReturn, Sequence, Union, cast

import gpytorch
import torch
from torch import Tensor, nn

from ..errors import ArchitectureError
from ..state import KernelState

__all__ = ["Layer", "Signature", "Hyperparameters", "Serial", "serial", "Identity", "check_network"]

#: finite-width shapes of one input: ``(features,)`` / ``(C, *spatial)``, or None (vector, unknown)
Shape = Union[tuple[int, ...], None]


@dataclass(frozen=True)
class Signature:
    """What a layer hands on to the next one, for the build-time checks.

    ``gaussian``: whether the outputs are Gaussian pre-activations with one variance per position
    (an affine layer was just applied), so that a nonlinearity may follow. ``spatial``: the
    spatial shape of the outputs (``()`` for vectors). ``channels``: ``"input"`` while the
    features are the network's inputs, ``"hidden"`` after an affine layer (their number is the
    width). ``independent``: the outputs are a fresh zero-mean function (an affine layer's with
    its own weights), independent of any sibling branch, so that branches can be summed or
    multiplied exactly. ``None`` means unknown, at the start of a block built on its own
    (``serial`` checks its inside when it is built, and the whole network is checked from the
    input when a kernel or a finite network is made of it). ``last``: the name of the layer that
    produced the outputs, for messages.
    """

    gaussian: bool | None = False
    last: str = "the input"
    spatial: tuple[int, ...] | None = ()
    channels: str | None = "input"
    independent: bool | None = False

    def after(self, layer: "Layer", **changes: Any) -> "Signature":
        """This signature handed on by ``layer``, with ``changes``."""
        return replace(self, last=layer.name, **changes)


#: what flows between layers at build time: one signature, or one per branch after FanOut
Signatures = Union[Signature, tuple[Signature, ...]]
#: what branch-aware layers (Serial, Identity, FanOut, ...) map: one state, or one per branch
States = Union[KernelState, tuple[KernelState, ...]]
#: finite-width shapes handed between branch-aware layers: one shape, or one per branch of a FanOut
Shapes = Union[Shape, list[Shape]]

UNKNOWN = Signature(gaussian=None, last="the start of this block", spatial=None, channels=None, independent=None)


def check_network(net: "Layer", input_shape: Sequence[int] | None = None) -> Signature:
    """Check ``net`` from its input: with ``input_shape`` ``(C, *spatial)`` for spatial inputs.

    The network must end with one non-spatial output (flattened or pooled), so that its kernel
    is one number per pair of inputs.
    """
    spatial = tuple(input_shape[1:]) if input_shape is not None else ()
    signature = net.check(Signature(spatial=spatial))
    if isinstance(signature, tuple):
        raise ArchitectureError(
            f"the network ends with {len(signature)} parallel branches; combine them with FanInSum(), "
            "FanInConcat() or FanInProd()"
        )
    if signature.spatial:
        raise ArchitectureError(
            f"the network's outputs still have spatial shape {signature.spatial} (after "
            f"{signature.last}); end it with Flatten() or GlobalAvgPool() and a Dense readout"
        )
    return signature


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


#: layer -> (error list, key prefix) of the load_state_dict that last loaded it (see Layer._load_from_state_dict)
_LOAD_PASSES: "weakref.WeakKeyDictionary[Layer, tuple[list[str], str]]" = weakref.WeakKeyDictionary()


class Layer(gpytorch.Module):
    """Base class of every layer. Subclasses override :meth:`check` and :meth:`kernel_map`."""

    #: names of the constrained hyperparameters (properties) this layer owns
    hyperparameter_names: tuple[str, ...] = ()
    #: whether the layer acts on the branches of a FanOut (parallel, FanIn*) rather than one input
    takes_branches: bool = False
    #: whether the layer has weights (Dense, Conv): the last ones form the network's readout
    is_affine: bool = False

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load as torch does, failing loudly when one shared parameter gets different values.

        A layer object used in several places (``mlp(shared=True)``, a layer reused in two
        branches or by two kernels of one model) appears under several keys of a state dict, all
        meaning one parameter; torch would load each key in turn and keep the last. Within one
        ``load_state_dict`` (recognised by its list of error messages) a layer visited again
        checks that the values match the ones it already loaded; if they differ, an error
        message makes ``load_state_dict`` raise ``RuntimeError``.
        """
        previous = _LOAD_PASSES.get(self)
        if previous is not None and previous[0] is error_msgs:
            first_prefix = previous[1]
            for name, param in self._parameters.items():
                key = prefix + name
                if param is None or key not in state_dict:
                    continue
                incoming = state_dict[key]
                same = incoming.shape == param.shape and torch.equal(
                    incoming.detach().to(device=param.device, dtype=param.dtype), param.detach()
                )
                if not same:
                    error_msgs.append(
                        f"{first_prefix}{name} and {key} are one shared parameter (the layer object "
                        f"{self.name} is used in several places, e.g. mlp(shared=True)) but the state dict "
                        "gives them different values; only one could be kept. Load it into an architecture "
                        "with the same sharing (e.g. mlp(shared=False)) or make the values equal."
                    )
        else:
            _LOAD_PASSES[self] = (error_msgs, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def hyperparameter(self, name: str, like: Tensor | None = None) -> Tensor:
        """The current value of hyperparameter ``name``, in the dtype and device of ``like``."""
        value = getattr(self, name)
        return value if like is None else value.to(like)

    def check(self, signature: Signature) -> Signature:
        raise NotImplementedError

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        raise NotImplementedError

    def needs_full(self, after: bool) -> bool:
        """Whether this layer's input must hold the full position-by-position covariance.

        ``after``: whether its output must. Pointwise and convolutional maps need the full
        covariance exactly when their output does; pooling always needs it.
        """
        return after

    def contains_affine(self) -> bool:
        return self.is_affine or any(layer.contains_affine() for layer in self.children_layers())

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        """The finite-width torch module of this layer and the shape of one output.

        ``in_shape`` is ``(features,)`` for vectors (``None`` when not yet known: the module
        then infers it lazily) and ``(C, *spatial)`` for spatial inputs, channels first. Hidden
        affine layers get ``width`` output channels; ``is_output`` says no affine layer follows,
        so affine layers get ``out_features``.
        """
        raise NotImplementedError

    def children_layers(self) -> Iterator["Layer"]:
        return iter(())

    def expand_hyperparameters(self, batch_shape: torch.Size) -> None:
        """Give this layer's hyperparameters the batch shape ``batch_shape`` (values broadcast)."""

    def index_hyperparameters(self, index: tuple[Any, ...]) -> None:
        """Index the batch dimensions of this layer's hyperparameters (``kernel[i]``)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, *args: Any, **kwargs: Any) -> NoReturn:  # pragma: no cover - layers are descriptions, not modules
        raise TypeError(
            f"{self.name} describes an architecture and is not called on tensors: use "
            "gpntk.NTKKernel(net) / gpntk.NNGPKernel(net) for kernels or net.finite(width) for a network."
        )

    def finite(
        self,
        width: int,
        *,
        in_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        out_features: int = 1,
        generator: torch.Generator | None = None,
    ) -> nn.Module:
        """The finite-width network of this architecture in NTK parameterization.

        Every hidden affine layer has ``width`` output channels and the readout has
        ``out_features``. Each affine layer computes
        :math:`h = \\sigma_w / \\sqrt{n_{in}}\\, W x + \\sigma_b\\, b` with
        :math:`W, b \\sim \\mathcal N(0, 1)` drawn from ``generator`` (:math:`n_{in}` is the
        fan-in: input channels times window size for a convolution), and takes the current
        values of the layer's hyperparameters. Weights of a layer object used in several places
        are independent (only the hyperparameters are shared); frozen layers
        (``trainable=False``) have ``requires_grad=False`` weights.

        The module maps rows ``(n, d)`` to ``(n, out_features)``, like the kernels: with an
        ``input_shape`` ``(C, *spatial)`` each row holds a channels-first tensor of ``d =
        C·H·W`` features. ``in_features`` may be left out for vector inputs: it is then inferred
        from the first batch.
        """
        width = _positive_integer("width", width)
        out_features = _positive_integer("out_features", out_features)
        if in_features is not None:
            in_features = _positive_integer("in_features", in_features)
        shape: Shape = None if in_features is None else (in_features,)
        if input_shape is not None:
            input_shape = tuple(_positive_integer("input_shape entries", s) for s in input_shape)
            if in_features is not None and in_features != math.prod(input_shape):
                raise ValueError(f"in_features={in_features} does not match input_shape {input_shape}")
            shape = input_shape
        check_network(self, input_shape)
        module, _ = self.build_finite(shape, width, out_features, True, generator)
        if input_shape is not None and len(input_shape) >= 2:
            from ..finite import RowsToTensors

            module = nn.Sequential(RowsToTensors(input_shape), module)
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


def _positive_integer(name: str, value: Any) -> int:
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
