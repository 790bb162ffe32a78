r"""GPyTorch kernels of infinitely wide networks: :class:`NTKKernel` and :class:`NNGPKernel`."""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Sequence, cast

import torch
from gpytorch.kernels import Kernel
from linear_operator.operators import LinearOperator
from torch import Tensor

from .. import settings
from .._validation import expanded_batch_shape, integer_argument, real_argument
from ..core.graph_inputs import GraphDataset, NodeGraph, check_rows_of, checked_input_shape
from ..core.hyperparameters import Hyperparameters, parameterized_layers
from ..core.layer import InputShape, Layer, check_network
from ..errors import AmbiguousHyperparameterError
from ..layers.affine import Affine
from .backends import InfiniteWidthKernelOperator, choose_backend, covariance_function
from .dense import evaluate, kernel_diagonal
from .engine import Output
from .fusion import FusionPolicy
from .planning import batch_shape_of
from .shared_priors import track_network_priors

__all__ = ["InfiniteWidthKernel", "NTKKernel", "NNGPKernel", "NeuralKernelSum"]


class InfiniteWidthKernel(Kernel):
    r"""Base class of the NTK and NNGP kernels of an architecture ``net``.

    :param net: the architecture, e.g. ``gpntk.layers.mlp(3, "relu")``. The net's layers own its
        hyperparameters (σw², σb² of every ``Dense``, with their constraints and priors): they
        appear among the kernel's parameters (``kernel.named_hyperparameters()``), are learnt by
        the marginal likelihood, and are shared with every other kernel built on the same ``net``
        object (use ``copy.deepcopy(net)`` for independent ones). ``kernel.net`` is the network the
        kernel evaluates: ``net`` itself, except for a batched kernel (below).
    :param input_shape: for spatial architectures, the shape ``(C, W)`` or ``(C, H, W)`` of one
        input; rows of ``x`` then hold ``C*H*W`` features in channels-first order. For graph
        networks (``Aggregate``), a graph format: :class:`~gpntk.GraphInputs` (each row one padded
        graph, a graph-level kernel), :class:`~gpntk.GraphDataset` (each row the index of a
        registered graph, evaluated by buckets of similar sizes) or :class:`~gpntk.NodeGraph` (each
        row a node index of one graph, a node-level kernel); the index formats always use the dense
        backend (see :mod:`gpntk.kernels.graph_dataset`, :mod:`gpntk.kernels.node_level`).
        ``None`` (default) treats rows as feature vectors.
    :param block_elements: the most numbers one intermediate tensor may hold: kernels are
        computed in blocks of input pairs of that size, so memory does not grow as
        :math:`n^2 P^2` for spatial architectures (default ``2**18`` on CPU, where small blocks
        are also faster, and ``2**25`` on GPU).
    :param backend: how kernel matrices are represented: ``"dense"`` (stored), ``"blockwise"``
        (matrix-free: every product recomputes the kernel block by block, memory :math:`O(n)`, for
        conjugate-gradient GPs at large n), ``"keops"`` (matrix-free pykeops formula), ``"auto"``;
        ``None`` (default) follows :class:`gpntk.settings.kernel_backend` (``"auto"``: dense while
        it fits, see there).
    :param batch_shape: GPyTorch batch shape: every hyperparameter gets shape
        ``(*batch_shape, 1, 1)`` (e.g. one set per output of a BoTorch multi-output model).
        Building a batched kernel never changes ``net``: unless the net's hyperparameters already
        have this batch shape (e.g. ``net`` is another batched kernel's ``.net``), the kernel
        works on its own deep copy, ``kernel.net``, whose hyperparameters are batched; read and
        set them there.
    :param active_dims: as for any GPyTorch kernel.

    Other GPyTorch ``Kernel`` arguments (``ard_num_dims``, ``lengthscale_prior``,
    ``lengthscale_constraint``, ``eps``) have no meaning here (the kernel has no length scale)
    and raise ``TypeError``; priors and constraints go on the layers
    (``Dense(weight_variance_prior=...)``, ``mlp(..., weight_variance_prior=...)``, or
    :func:`gpntk.layers.default_priors` for all of them).

    **Hyperparameters.** As ``RBFKernel.lengthscale``: ``kernel.weight_variance`` and
    ``kernel.bias_variance`` read (constrained values, shape ``(*batch_shape, 1, 1)``) and set
    (through the layer's constraint) :math:`\sigma_w^2, \sigma_b^2` when the network has one such
    pair (``mlp(..., shared=True)``, or any network whose affine layers are one layer object; a
    layer without bias reads 0). With several independent ones they raise
    :class:`~gpntk.AmbiguousHyperparameterError` (an ``AttributeError``) naming the per-layer
    paths. :attr:`layer_variances` maps every path, e.g. ``"net.layers.0.weight_variance"``, to
    its value; set one with ``kernel.initialize(**{"net.layers.0.weight_variance": 2.0})`` (the
    path is GPyTorch's ``initialize`` path) or ``kernel.net.layers[0].weight_variance = 2.0``.

    Calling the kernel returns GPyTorch's lazy kernel tensor of shape ``(..., n1, n2)``; when
    evaluated, :meth:`forward` gives a dense tensor wherever the dense backend is chosen (so
    GPyTorch multiplies, adds and factorizes it exactly, as it does an RBF kernel's) and a
    matrix-free operator otherwise (see ``backend``). ``diag=True`` returns the exact diagonal
    ``(..., n)`` from the per-point recursion.
    Inputs are ``(..., n, d)`` float tensors; the hyperparameters are cast to their dtype and
    device, and the input kernel is :math:`x \cdot x' / d` (Novak et al. 2020 convention).
    As for every GPyTorch kernel, a 1-D input ``(n,)`` is ``n`` one-feature points ``(n, 1)``.

    ``last_dim_is_batch=True`` (GPyTorch's convention, deprecated there and to be removed in
    GPyTorch 2.0, which warns) makes each of the ``d`` features a batch of one-feature inputs:
    the result is :math:`K[..., i, a, b] = k(x_{1,a,i}, x_{2,b,i})`, shape ``(..., d, n1, n2)``
    (``(..., d, n)`` with ``diag=True``), every feature with the same hyperparameters (a batched
    kernel's ``(*batch_shape, d, n1, n2)``); it is what ``AdditiveStructureKernel`` sums. It needs
    vector inputs: with an ``input_shape`` (images, sequences, graphs) the call raises ``ValueError``.
    """

    has_lengthscale = False
    _output: Output

    def __init__(
        self,
        net: Layer,
        input_shape: InputShape = None,
        batch_shape: torch.Size = torch.Size([]),
        active_dims: Sequence[int] | None = None,
        block_elements: int | None = None,
        backend: settings.Backend | None = None,
        **kwargs: Any,
    ):
        if not isinstance(net, Layer):
            raise TypeError(
                f"{type(self).__name__} needs an architecture built from gpntk.layers, got {type(net).__name__}"
            )
        _reject_unsupported_kwargs(type(self).__name__, kwargs)
        super().__init__(batch_shape=torch.Size(batch_shape), active_dims=active_dims)
        self.input_shape = checked_input_shape(input_shape)
        check_network(net, self.input_shape)
        net = _net_with_batch_shape(net, self.batch_shape)
        track_network_priors(net, type(self).__name__)
        self.net = net
        if block_elements is not None:
            block_elements = integer_argument("block_elements", block_elements, minimum=1)
        self.block_elements = block_elements
        #: this kernel's compile policy: it counts the kernel's own large evaluations (gpntk.settings.fusion)
        self.fusion = FusionPolicy()
        if backend is not None:
            settings.kernel_backend._check(backend)
            if backend == "keops":
                from .backends import keops_unsupported_reason

                reason = keops_unsupported_reason(net, self.input_shape)
                if reason is not None:
                    raise ValueError(f"backend='keops' cannot evaluate this kernel: {reason}")
            if backend == "blockwise" and isinstance(self.input_shape, (NodeGraph, GraphDataset)):
                raise ValueError(
                    f"backend='blockwise' cannot evaluate a kernel on {type(self.input_shape).__name__} indices "
                    "matrix-free: the dense backend computes it (a node kernel needs the whole graph's; graph "
                    "indices go bucket by bucket); use GraphInputs rows for matrix-free graph-level kernels"
                )
        self.backend = backend
        for layer in parameterized_layers(self.net):
            layer.expand_hyperparameters(self.batch_shape)

    @property
    def is_stationary(self) -> bool:
        return False

    # --- the network's variances, reachable as GPyTorch users expect ----------------------------------
    @property
    def layer_variances(self) -> dict[str, Tensor]:
        """Every learnable variance of the network, by its path from the kernel, in network order.

        E.g. ``{"net.layers.0.weight_variance": tensor([[2.]]), "net.layers.0.bias_variance":
        tensor([[0.1]])}`` for ``mlp(..., shared=True)`` (one layer object, listed once, at its
        first place). Values are the constrained ones (shape ``(*batch_shape, 1, 1)``), as
        ``RBFKernel.lengthscale``; each path works with ``kernel.initialize(**{path: value})``.
        Layers without bias list no ``bias_variance`` (theirs is fixed at 0).
        """
        return {
            f"{path}.{name}": getattr(layer, name)
            for path, layer in self._variance_layers() for name in layer.hyperparameter_names
        }

    @property
    def weight_variance(self) -> Tensor:
        r""":math:`\sigma_w^2` of the network's one weight-variance owner (``mlp(shared=True)``); see the class docs."""
        return getattr(self._single_owner("weight_variance"), "weight_variance")

    @weight_variance.setter
    def weight_variance(self, value: float | Tensor) -> None:
        setattr(self._single_owner("weight_variance"), "weight_variance", value)

    @property
    def bias_variance(self) -> Tensor:
        r""":math:`\sigma_b^2` of the network's one affine layer (0 without bias); see the class docs."""
        return getattr(self._single_owner("bias_variance"), "bias_variance")

    @bias_variance.setter
    def bias_variance(self, value: float | Tensor) -> None:
        setattr(self._single_owner("bias_variance"), "bias_variance", value)

    def __getattr__(self, name: str) -> Any:
        # A property that raises AttributeError falls back to __getattr__, whose torch message
        # ("object has no attribute") would hide ours: raise ours again.
        if name in _SHARED_VARIANCES:
            return getattr(self._single_owner(name), name)
        return super().__getattr__(name)

    def _variance_layers(self) -> list[tuple[str, Layer]]:
        """The network's distinct parameterized layers with their first path from the kernel."""
        paths: dict[int, str] = {}
        for path, module in self.named_modules():
            paths.setdefault(id(module), path)
        return [(paths[id(layer)], layer) for layer in parameterized_layers(self.net)]

    def _single_owner(self, name: str) -> Layer:
        """The one layer owning ``name`` (``weight_variance`` or ``bias_variance``); else a clear error."""
        if name == "weight_variance":
            owners = [(p, layer) for p, layer in self._variance_layers() if name in layer.hyperparameter_names]
        else:  # every affine layer has a bias variance, 0 without bias
            owners = [(p, layer) for p, layer in self._variance_layers() if isinstance(layer, Affine)]
        kernel = type(self).__name__
        if not owners:
            raise AttributeError(f"{kernel}'s network {self.net!r} has no layer with a {name}")
        if len(owners) == 1:
            return owners[0][1]
        paths = [f"{path}.{name}" for path, _ in owners]
        shown = ", ".join(paths[:6]) + (f", and {len(paths) - 6} more" if len(paths) > 6 else "")
        raise AmbiguousHyperparameterError(
            f"{kernel}.{name} exists when the network has one {name} (one layer object, as in "
            f"mlp(..., shared=True)), but this network has {len(owners)} independent ones: {shown}. Read them "
            f"with kernel.layer_variances; set one with kernel.initialize(**{{{paths[0]!r}: value}})"
        )

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | LinearOperator:
        x1, x2, hyper = self._checked_arguments(x1, x2, diag, last_dim_is_batch)
        options: dict[str, Any] = dict(
            net=self.net, output=self._output, input_shape=self.input_shape, block_elements=self.block_elements
        )
        if diag:
            return kernel_diagonal(x1, x2, hyper=hyper, **options)
        self.fusion.training = self.training
        options["fusion"] = self.fusion
        if choose_backend(self.net, x1, x2, hyper, self.input_shape, self.backend) == "dense":
            # a tensor: GPyTorch multiplies, adds and factorizes it exactly (as it does RBF's)
            hyper_kwargs: dict[str, Any] = hyper  # keyword arguments next to options: mypy cannot tell them apart
            return covariance_function(x1, x2, backend="dense", **options, **hyper_kwargs)
        return InfiniteWidthKernelOperator(
            x1, x2, covar_func=covariance_function, backend=self.backend, **options, **hyper
        )

    def __call__(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False,
                 **params: Any) -> Any:
        """GPyTorch's ``Kernel.__call__``; ``last_dim_is_batch`` with an ``input_shape`` is refused here, not later."""
        if last_dim_is_batch:
            self._check_last_dim_is_batch()
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def _check_last_dim_is_batch(self) -> None:
        if self.input_shape is not None:
            raise ValueError(
                f"{type(self).__name__} with input_shape={self.input_shape!r} cannot take last_dim_is_batch=True: "
                "each row is one structured input (an image, a sequence, a graph), whose features are not "
                "separate one-dimensional inputs; last_dim_is_batch works for vector inputs (input_shape=None)"
            )

    def _checked_arguments(
        self, x1: Tensor, x2: Tensor, diag: bool, last_dim_is_batch: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The inputs and the network's hyperparameters (in ``x1``'s dtype and device), after checking the call.

        With ``last_dim_is_batch`` the inputs ``(..., n, d)`` become ``d`` batches of one-feature
        inputs, ``(..., d, n, 1)``, and the hyperparameters get a batch dimension of size 1 for them.
        """
        if last_dim_is_batch:
            self._check_last_dim_is_batch()
            same = x2 is x1
            x1 = x1.mT.unsqueeze(-1)
            x2 = x1 if same else x2.mT.unsqueeze(-1)
        check_rows_of(self.input_shape, x1, x2, diag=diag)
        if self.input_shape is None:  # the features of vector inputs are known now (standard layers' in_width)
            check_network(self.net, in_features=x1.shape[-1])
        hyper = Hyperparameters.collect(self.net, like=x1)
        if last_dim_is_batch:  # (*batch_shape, 1, 1) -> (*batch_shape, 1, 1, 1): one set for every feature
            hyper = {name: value.unsqueeze(-3) for name, value in hyper.items()}
        self._check_batch_shapes(x1, x2, hyper)
        return x1, x2, hyper

    def _check_batch_shapes(self, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> None:
        try:
            torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        except RuntimeError:
            raise RuntimeError(f"Incompatible data shapes for x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}") from None
        try:
            batch_shape_of(x1, x2, hyper)
        except RuntimeError:
            raise RuntimeError(
                f"{type(self).__name__} with batch shape {tuple(self.batch_shape)} is incompatible with data shapes "
                f"{tuple(x1.shape)} and {tuple(x2.shape)}"
            ) from None

    # GPyTorch's Kernel only batches its own parameters; ours live in the layers of ``net``.
    def __getitem__(self, index: Any) -> "InfiniteWidthKernel":
        if len(self.batch_shape) == 0:
            return self
        new_kernel = deepcopy(self)
        index = index if isinstance(index, tuple) else (index,)
        layers = parameterized_layers(new_kernel.net)
        for layer in layers:
            layer.index_hyperparameters(index)
        if layers:
            some = next(iter(Hyperparameters.collect(new_kernel.net).values()))
            new_kernel._batch_shape = some.shape[:-2]
        else:
            new_kernel._batch_shape = torch.Size([])
        return new_kernel

    def expand_batch(self, *sizes: int | Sequence[int]) -> "InfiniteWidthKernel":
        new_batch_shape = expanded_batch_shape(sizes, self.batch_shape)
        if new_batch_shape == self.batch_shape:
            return self
        new_kernel = deepcopy(self)
        new_kernel._batch_shape = new_batch_shape
        for layer in parameterized_layers(new_kernel.net):
            layer.expand_hyperparameters(new_batch_shape)
        return new_kernel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.net!r})"

    # --- a + b on one network: one kernel, one recursion, the network's priors counted once ---------
    def _weights(self) -> tuple[float, float]:
        """``(a, b)`` with this kernel equal to a·Θ + b·Σ of its network."""
        return (1.0, 0.0) if self._output == "ntk" else (0.0, 1.0)

    def _same_evaluation(self, other: "InfiniteWidthKernel") -> bool:
        """Whether ``other`` evaluates the same network on the same inputs in the same way."""
        same_dims = (self.active_dims is None and other.active_dims is None) or (
            self.active_dims is not None and other.active_dims is not None
            and torch.equal(self.active_dims, other.active_dims)
        )
        return (
            other.net is self.net and same_dims and other.input_shape == self.input_shape
            and other.batch_shape == self.batch_shape and other.block_elements == self.block_elements
            and other.backend == self.backend
        )

    def __add__(self, other: Kernel) -> Kernel:
        """``k1 + k2``: one :class:`NeuralKernelSum` when both are gpntk kernels of the same network.

        GPyTorch's ``AdditiveKernel`` of two kernels on one network would register the network
        twice, and its marginal likelihood would count the network's priors twice; the sum
        kernel evaluates a·Θ + b·Σ in a single pass of the recursion instead.
        """
        if isinstance(other, InfiniteWidthKernel) and self._same_evaluation(other):
            (a, b), (c, d) = self._weights(), other._weights()
            return NeuralKernelSum(
                self.net, ntk_weight=a + c, nngp_weight=b + d, input_shape=self.input_shape,
                batch_shape=self.batch_shape, active_dims=self.active_dims, block_elements=self.block_elements,
                backend=self.backend,
            )
        return super().__add__(other)


class NTKKernel(InfiniteWidthKernel):
    r"""The neural tangent kernel :math:`\Theta(x, x')` of the infinitely wide network ``net``.

    :math:`\Theta(x, x') = \lim \nabla_\theta f(x) \cdot \nabla_\theta f(x')` at initialization
    (Jacot et al. 2018), per output channel, computed by the layer recursion of
    :mod:`gpntk.layers`. See :class:`InfiniteWidthKernel` for the arguments, the shapes, 1-D
    inputs and ``last_dim_is_batch`` (one kernel per feature, ``(..., d, n1, n2)``).

    Example::

        net = gpntk.layers.mlp(depth=3, activation="relu")
        covar = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net)) + gpytorch.kernels.RBFKernel()
    """

    _output = "ntk"


class NNGPKernel(InfiniteWidthKernel):
    r"""The NNGP kernel :math:`\Sigma(x, x')` of the infinitely wide network ``net``.

    The covariance of the network's outputs at random initialization (Neal 1996; Lee et al.
    2018), per output channel. See :class:`InfiniteWidthKernel` for the arguments, the shapes,
    1-D inputs and ``last_dim_is_batch`` (one kernel per feature, ``(..., d, n1, n2)``).
    """

    _output = "nngp"


#: the attributes a kernel forwards to its network's single owner of them
_SHARED_VARIANCES = ("weight_variance", "bias_variance")

#: GPyTorch ``Kernel`` arguments that gpntk kernels do not take, and why
_UNSUPPORTED_KWARGS = {
    "ard_num_dims": "the kernel has no length scales (scale inputs yourself, or use a first Dense layer)",
    "lengthscale_prior": "the kernel has no length scale; put priors on the layers (Dense(weight_variance_prior=...))",
    "lengthscale_constraint": "the kernel has no length scale; put constraints on the layers "
    "(Dense(weight_variance_constraint=...))",
    "eps": "the kernel has no length scale",
}


def _reject_unsupported_kwargs(kernel_name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` for keyword arguments a gpntk kernel would otherwise ignore silently."""
    if not kwargs:
        return
    name = next(iter(kwargs))
    reason = _UNSUPPORTED_KWARGS.get(name, "it is not an argument of this kernel")
    raise TypeError(f"{kernel_name} does not take {name}=: {reason}")


def _net_with_batch_shape(net: Layer, batch_shape: torch.Size) -> Layer:
    """``net`` itself when its hyperparameters already have ``batch_shape``, else a deep copy to batch.

    Batching a network's hyperparameters changes their shape in place, which would break every
    model already built on ``net``; so a batched kernel gets its own copy.
    """
    layers = parameterized_layers(net)
    shapes = {layer.hyperparameter(name).shape[:-2] for layer in layers for name in layer.hyperparameter_names}
    if not layers or shapes <= {batch_shape}:
        return net
    return deepcopy(net)


class NeuralKernelSum(InfiniteWidthKernel):
    r"""The kernel :math:`a\,\Theta(x, x') + b\,\Sigma(x, x')` of one network, in one recursion.

    What ``NTKKernel(net) + NNGPKernel(net)`` returns (``a = b = 1``; sums of several such
    kernels on the same ``net`` add their weights). Unlike GPyTorch's ``AdditiveKernel`` of the
    two, it holds the network once, so the marginal likelihood counts a prior on the network's
    hyperparameters once, and both kernels come from a single pass of the layer recursion
    (dense backend; matrix-free backends evaluate the two operators).

    :param net: the architecture; its layers own the hyperparameters, shared with every kernel on ``net``.
    :param ntk_weight: :math:`a \ge 0`, a fixed number (wrap in ``ScaleKernel`` for a learnt
        overall scale).
    :param nngp_weight: :math:`b \ge 0`, a fixed number.

    The other arguments are those of :class:`InfiniteWidthKernel`.
    """

    _output = "ntk"

    def __init__(self, net: Layer, ntk_weight: float = 1.0, nngp_weight: float = 1.0, **kwargs: Any):
        super().__init__(net, **kwargs)
        self.ntk_weight = real_argument("ntk_weight", ntk_weight, minimum=0)
        self.nngp_weight = real_argument("nngp_weight", nngp_weight, minimum=0)

    def _weights(self) -> tuple[float, float]:
        return self.ntk_weight, self.nngp_weight

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | LinearOperator:
        x1, x2, hyper = self._checked_arguments(x1, x2, diag, last_dim_is_batch)
        options: dict[str, Any] = dict(net=self.net, input_shape=self.input_shape, block_elements=self.block_elements)
        a, b = self.ntk_weight, self.nngp_weight
        if diag:
            return a * kernel_diagonal(x1, x2, hyper=hyper, output="ntk", **options) + b * kernel_diagonal(
                x1, x2, hyper=hyper, output="nngp", **options
            )
        self.fusion.training = self.training
        if choose_backend(self.net, x1, x2, hyper, self.input_shape, self.backend) == "dense":
            cov, ntk = evaluate(
                self.net, x1, x2, hyper, track_ntk=True, input_shape=self.input_shape,
                block_elements=self.block_elements, fusion=self.fusion,
            )
            out = a * cast(Tensor, ntk) + b * cov  # track_ntk=True: the NTK is computed
            return out.expand(*batch_shape_of(x1, x2, hyper), x1.shape[-2], x2.shape[-2])
        parts = [
            InfiniteWidthKernelOperator(
                x1, x2, covar_func=covariance_function, backend=self.backend, output=output, fusion=self.fusion,
                **options, **hyper,
            ) * weight
            for output, weight in (("ntk", a), ("nngp", b)) if weight != 0 or (output == "ntk" and b == 0)
        ]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.net!r}, ntk_weight={self.ntk_weight:g}, nngp_weight={self.nngp_weight:g})"
