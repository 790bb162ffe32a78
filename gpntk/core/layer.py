"""The layer protocol: what every layer of the architecture language implements.

Every layer does three things:

* ``check(signature)`` validates its place in the architecture when the network is built and
  says what it hands on (:class:`Signature`), so invalid compositions fail early and clearly;
* ``kernel_map(state, hyper)`` maps the infinite-width kernel state
  (:class:`~gpntk.core.state.KernelState`), reading its hyperparameters from ``hyper``
  (:class:`~gpntk.core.hyperparameters.Hyperparameters`, never from ``self``), so that the same
  code runs under GPyTorch's lazy, batched and indexed kernel evaluations;
* ``build_finite(in_features, width, out_features, is_output, generator)`` builds the finite-width
  torch module in NTK parameterization whose infinite-width limit the kernel is.

The concrete layers live in :mod:`gpntk.layers` (and the activations in
:mod:`gpntk.activations`); this module holds only what they all share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Sequence, Union

import gpytorch
import torch
from torch import Tensor, nn

from .._validation import integer_argument
from ..errors import ArchitectureError
from .finite import RowsToTensors
from .finite_graph import GraphDatasetNetwork, NodeGraphNetwork, PaddedGraphNetwork
from .graph_inputs import GraphDataset, GraphInputs, NodeGraph
from .state import KernelState

if TYPE_CHECKING:
    from .hyperparameters import Hyperparameters

__all__ = ["Layer", "Signature", "Shape", "Signatures", "States", "Shapes", "UNKNOWN", "check_network", "InputShape"]

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

    ``independent`` is about the innermost enclosing ``FanOut``; ``outer_independent`` holds the
    same for each ``FanOut`` outside it, outermost first (empty outside nested branches, or where
    they are not known). Inside a residual branch ``b = Dense(...)`` handed to a nested
    ``FanOut``, the copies of ``b`` depend on each other but each is still a fresh function with
    respect to the outer ``FanOut``'s other branches, so ``h + (b + g(b))`` merges exactly.
    A layer that changes ``independent`` (``True``: its own affine weights, a fresh function
    for every enclosing ``FanOut``; ``False``: a nonlinearity) sets every outer entry alike,
    unless it gives ``outer_independent`` itself.

    ``features``: the number of input features (channels)
    the outputs have, where known: the network's own inputs' (``d``, or ``C`` for spatial inputs,
    when the kernel or network knows it), so that a first layer in standard parameterization
    can check its ``in_width``; ``None`` (unknown) after any layer that does not pass it on.

    ``graph``: whether the positions are the nodes of graphs (:mod:`gpntk.core.graph_inputs`),
    which have no order: ``Aggregate`` needs them, layers of ordered positions (convolutions,
    windowed pooling, ``Flatten``, attention) refuse them. ``None``: unknown.
    """

    gaussian: bool | None = False
    last: str = "the input"
    spatial: tuple[int, ...] | None = ()
    channels: str | None = "input"
    independent: bool | None = False
    outer_independent: tuple[bool, ...] = ()
    features: int | None = None
    graph: bool | None = False

    def after(self, layer: "Layer", **changes: Any) -> "Signature":
        """This signature handed on by ``layer``, with ``changes`` (``features`` unknown unless given)."""
        if "independent" in changes and "outer_independent" not in changes:
            changes["outer_independent"] = (changes["independent"] is True,) * len(self.outer_independent)
        return replace(self, last=layer.name, **{"features": None, **changes})


#: what flows between layers at build time: one signature, or one per branch after FanOut
Signatures = Union[Signature, tuple[Signature, ...]]
#: what branch-aware layers (Serial, Identity, FanOut, ...) map: one state, or one per branch
States = Union[KernelState, tuple[KernelState, ...]]
#: finite-width shapes handed between branch-aware layers: one shape, or one per branch of a FanOut
Shapes = Union[Shape, list[Shape]]

UNKNOWN = Signature(
    gaussian=None, last="the start of this block", spatial=None, channels=None, independent=None, graph=None
)

#: what ``input_shape`` may be: a spatial shape ``(C, *spatial)``, a graph format, or None (vectors)
InputShape = Union[Sequence[int], GraphInputs, NodeGraph, GraphDataset, None]


def check_network(net: "Layer", input_shape: InputShape = None, in_features: int | None = None) -> Signature:
    """Check ``net`` from its input: with ``input_shape`` ``(C, *spatial)`` for spatial inputs.

    ``in_features``: the number of features of vector inputs, where known (``input_shape``
    gives ``C`` for spatial ones). The network must end with one non-spatial output (flattened
    or pooled), so that its kernel is one number per pair of inputs; on a
    :class:`~gpntk.core.graph_inputs.GraphInputs` format, pooled over the nodes; on a
    :class:`~gpntk.core.graph_inputs.NodeGraph`, one output per node (not pooled).
    """
    if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
        start = Signature(spatial=input_shape.spatial, features=input_shape.channels, graph=True)
        signature = net.check(start)
        if isinstance(input_shape, NodeGraph) and not isinstance(signature, tuple):
            if signature.spatial != input_shape.spatial:
                raise ArchitectureError(
                    f"a node-level kernel (NodeGraph) has one output per node, but the outputs of "
                    f"{signature.last} are {'pooled over the nodes' if signature.spatial == () else 'not per node'}; "
                    "remove the pooling (use GraphInputs for graph-level kernels)"
                )
            return signature
    else:
        spatial = tuple(input_shape[1:]) if input_shape is not None else ()
        features = input_shape[0] if input_shape is not None else in_features
        signature = net.check(Signature(spatial=spatial, features=features))
    if isinstance(signature, tuple):
        raise ArchitectureError(
            f"the network ends with {len(signature)} parallel branches; combine them with FanInSum(), "
            "FanInConcat() or FanInProd()"
        )
    if signature.spatial:
        raise ArchitectureError(
            f"the network's outputs still have spatial shape {signature.spatial} (after "
            f"{signature.last}); end it with "
            + ("GlobalSumPool() or GlobalAvgPool() over the nodes" if signature.graph
               else "Flatten() or GlobalAvgPool()")
            + " and a Dense readout"
        )
    return signature



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
        previous: tuple[list[str], str] | None = self.__dict__.get("_load_pass")
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
            self.__dict__["_load_pass"] = (error_msgs, prefix)  # this pass's message list, kept on the layer
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
        input_shape: InputShape = None,
        out_features: int = 1,
        generator: torch.Generator | None = None,
    ) -> nn.Module:
        """The finite-width network of this architecture in NTK parameterization.

        Every hidden affine layer has ``width`` output channels and the readout has
        ``out_features``. Layers built with ``parameterization="standard"`` get standard-parameterized
        modules (:mod:`gpntk.core.standard`) and refuse a number of inputs other than their
        ``in_width``. Each affine layer in NTK parameterization computes
        :math:`h = \\sigma_w / \\sqrt{n_{in}}\\, W x + \\sigma_b\\, b` with
        :math:`W, b \\sim \\mathcal N(0, 1)` drawn from ``generator`` (:math:`n_{in}` is the
        fan-in: input channels times window size for a convolution), and takes the current
        values of the layer's hyperparameters. Weights of a layer object used in several places
        are independent (only the hyperparameters are shared); frozen layers
        (``trainable=False``) have ``requires_grad=False`` weights.

        The module maps rows ``(n, d)`` to ``(n, out_features)``, like the kernels: with an
        ``input_shape`` ``(C, *spatial)`` each row holds a channels-first tensor of ``d =
        C·H·W`` features. ``in_features`` may be left out for vector inputs: it is then inferred
        from the first batch. With a graph format (:class:`~gpntk.GraphInputs`: rows of padded
        graphs; :class:`~gpntk.NodeGraph`: rows of node indices) the module reads its inputs as
        the graph kernels do (:mod:`gpntk.core.finite_graph`).
        """
        width = integer_argument("width", width, minimum=1)
        out_features = integer_argument("out_features", out_features, minimum=1)
        if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
            check_network(self, input_shape)
            body, _ = self.build_finite((input_shape.channels, input_shape.nodes), width, out_features, True, generator)
            if isinstance(input_shape, GraphInputs):
                return PaddedGraphNetwork(input_shape, body)
            if isinstance(input_shape, GraphDataset):
                return GraphDatasetNetwork(input_shape, body)
            return NodeGraphNetwork(input_shape, body)
        if in_features is not None:
            in_features = integer_argument("in_features", in_features, minimum=1)
        shape: Shape = None if in_features is None else (in_features,)
        if input_shape is not None:
            input_shape = tuple(integer_argument("input_shape entries", s, minimum=1) for s in input_shape)
            if in_features is not None and in_features != math.prod(input_shape):
                raise ValueError(f"in_features={in_features} does not match input_shape {input_shape}")
            shape = input_shape
        check_network(self, input_shape, in_features)
        module, _ = self.build_finite(shape, width, out_features, True, generator)
        if input_shape is not None and len(input_shape) >= 2:
            module = nn.Sequential(RowsToTensors(input_shape), module)
        return module

