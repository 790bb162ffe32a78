"""The network as a KeOps formula: which architectures have one, their structure, and the formula's text.

:func:`keops_supported` says whether a network has a formula; :func:`_plan` reduces it to a
:class:`_Structure` (what a formula depends on) plus the layer objects; :func:`_build` writes the
formula of one reduction (the kernel entry, ``K @ v`` or a reduction of the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, cast

from ...core.hyperparameters import hyperparameter_key, parameterized_layers
from ...core.layer import Layer
from ...layers.base import Identity, Serial
from ...layers.dense import Dense
from .calculus import _Calculus, _Dual
from .forms import _FORMS, _KINDS, _form_of
from .graph import _emit, _Graph, _Node

Output = Literal["ntk", "nngp"]


# ==================================================================================================
# Which architectures have a formula
# ==================================================================================================


def _flatten(net: Layer) -> list[Layer]:
    """The layers of nested ``Serial`` blocks, in order."""
    if type(net) is Serial:
        return [layer for sub in net.children_layers() for layer in _flatten(sub)]
    return [net]


def keops_supported(net: Layer, input_shape: object = None) -> str | None:
    """``None`` if the KeOps backend can evaluate ``net``, else a sentence saying why not (naming the layer).

    Supported: vector inputs (``input_shape`` ``None`` or ``(d,)``) and serial chains of ``Dense``
    layers (NTK or standard parameterization), ``Identity`` and the activations listed in
    :mod:`gpntk.contrib.keops`. Everything else (convolutions, pooling, branches, ``LayerNorm``,
    activations evaluated by quadrature or without a closed form here) has no KeOps formula; the
    dense and blockwise backends evaluate those.
    """
    if input_shape is not None and not isinstance(input_shape, Sequence):
        return (
            f"the KeOps backend evaluates fully-connected networks on vector inputs only, got graph inputs "
            f"{input_shape!r} (message passing mixes the nodes of each graph); use the dense or blockwise backend"
        )
    if input_shape is not None and len(input_shape) >= 2:
        return (
            f"the KeOps backend evaluates fully-connected networks on vector inputs only, got input_shape "
            f"{tuple(input_shape)} (spatial inputs)"
        )
    for layer in _flatten(net):
        if isinstance(layer, Dense) or type(layer) is Identity:
            continue
        form = _FORMS.get(type(layer))
        if form is None:
            return (
                f"the KeOps backend has no formula for {layer.name} ({layer!r}); it supports serial chains of "
                f"Dense layers and the activations {', '.join(sorted({c.__name__ for c in _FORMS}))}"
            )
        reason = form.unsupported(layer)
        if reason is not None:
            return f"the KeOps backend has no formula for {layer!r}: {reason}"
    return None


# ==================================================================================================
# The network as a formula
# ==================================================================================================

#: constants every formula may use, first in the constants vector
_GLOBAL_CONSTANTS = ("inv_d", "pi", "eps", "tiny")


@dataclass(frozen=True)
class _Structure:
    """What a formula depends on: the layer sequence (no values), the output, the sizes."""

    #: ("dense", w_index, b_index | None, trainable, in_width | None) | ("act", kind, first_feature, first_constant)
    #: (``in_width``: of a standard-parameterized Dense, an exact integer literal of the formula)
    layers: tuple[tuple[Any, ...], ...]
    output: str
    features: int  # m: per-point features
    params: int  # p: hyperparameters
    constants: tuple[str, ...]  # names of the constants vector's entries
    needs_same: bool


@dataclass
class _Plan:
    """A network's structure plus the layer objects needed to compute features and constants."""

    structure: _Structure
    steps: list[tuple[Any, ...]]  # ("dense", layer, w_key, b_key) | ("act", layer, form)


def _plan(net: Layer, hyper_keys: Sequence[str], output: str) -> _Plan:
    reason = keops_supported(net)
    if reason is not None:
        raise ValueError(reason)
    index = {id(layer): i for i, layer in enumerate(parameterized_layers(net))}
    position = {key: i for i, key in enumerate(hyper_keys)}
    layers: list[tuple[Any, ...]] = []
    steps: list[tuple[Any, ...]] = []
    constants = list(_GLOBAL_CONSTANTS)
    features = 0
    needs_same = False
    for layer in _flatten(net):
        if type(layer) is Identity:
            continue
        if isinstance(layer, Dense):
            i = index[id(layer)]
            w_key = hyperparameter_key(i, "weight_variance")
            b_key = hyperparameter_key(i, "bias_variance") if layer.has_bias else None
            if w_key not in position or (b_key is not None and b_key not in position):
                raise ValueError(f"the hyperparameters given do not include those of {layer!r} ({w_key}, {b_key})")
            b_at = None if b_key is None else position[b_key]
            layers.append(("dense", position[w_key], b_at, layer.trainable, layer.in_width))
            steps.append(("dense", layer, w_key, b_key))
            continue
        form = _form_of(layer)
        first_constant = len(constants)
        constants += [f"{len(steps)}_{k}" for k in range(form.constant_count)]
        layers.append(("act", form.kind, features, first_constant))
        steps.append(("act", layer, form))
        features += len(form.feature_names)
        needs_same = needs_same or form.needs_same
    structure = _Structure(tuple(layers), output, features, len(hyper_keys), tuple(constants), needs_same)
    return _Plan(structure, steps)


Mode = Literal["matrix", "matmul", "grad_i", "grad_j"]


@dataclass(frozen=True)
class _Formula:
    """One KeOps formula: its text, aliases (name, category, dim) in argument order and output layout."""

    text: str
    aliases: tuple[tuple[str, int, int], ...]
    axis: int
    dim_out: int

    def alias_strings(self) -> list[str]:
        return [f"{name}={('Vi', 'Vj', 'Pm')[cat]}({pos},{dim})" for pos, (name, cat, dim) in enumerate(self.aliases)]


def _aliases(structure: _Structure, mode: Mode, d: int, c: int) -> list[tuple[str, int, int]]:
    """The variables of one reduction, ``(name, category, dim)`` in argument order (category 0: ``Vi``,
    1: ``Vj``, 2: ``Pm``)."""
    m, p = structure.features, structure.params
    aliases: list[tuple[str, int, int]] = [("X", 0, d), ("Y", 1, d)]
    if m:
        aliases += [("PI", 0, m), ("PJ", 1, m)]
    if p:
        aliases.append(("TH", 2, p))
    aliases.append(("C", 2, len(structure.constants)))
    if mode in ("matmul", "grad_i", "grad_j"):
        aliases.append(("V", 1, c))
    if mode in ("grad_i", "grad_j"):
        aliases.append(("G", 0, c))
    return aliases


@dataclass(frozen=True)
class _Directions:
    r"""The derivative directions of one reduction: :math:`s = x \cdot y`, then the features of one side
    (``feature_side``), then (``with_params``) the hyperparameters; ``count == 0``: values only."""

    count: int
    feature_side: str | None
    with_params: bool

    @staticmethod
    def of(structure: _Structure, mode: Mode) -> _Directions:
        m, p = structure.features, structure.params
        if mode == "grad_i":
            return _Directions(1 + m + p, "PI", True)
        if mode == "grad_j":
            return _Directions(1 + m, "PJ", False)
        return _Directions(0, None, False)


def _network(structure: _Structure, c_: _Calculus, var: dict[str, _Node], directions: _Directions) -> _Dual:
    r"""The kernel entry of the network as a dual number: the recursion of :mod:`gpntk.contrib.keops` on the graph.

    ``Dense``: :math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
    :math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma` (trainable; in standard parameterization
    :math:`+\, n \Sigma_{\text{in}} + \beta` instead of the new :math:`\Sigma`); activation:
    :math:`(\Sigma, \Theta) \leftarrow (k, \dot k\, \Theta)` from its form (:mod:`.forms`).
    """
    g, m = c_.g, structure.features
    differentiate = directions.count > 0
    dot = _Dual(g.node("scalprod", var["X"], var["Y"], dim=1), c_.seed(0 if differentiate else None))
    same = g.neg(g.node("sqdist", var["X"], var["Y"], dim=1)) if structure.needs_same else None

    def feature(side: str, k: int) -> _Dual:
        seed = 1 + k if (differentiate and side == directions.feature_side) else None
        return _Dual(g.elem(var[side], k), c_.seed(seed))

    def param(k: int) -> _Dual:
        return _Dual(g.elem(var["TH"], k), c_.seed(1 + m + k if directions.with_params else None))

    track_ntk = structure.output == "ntk"
    sigma: _Dual = c_.mul(dot, c_.const("inv_d"))
    tau: _Dual | None = None
    for layer in structure.layers:
        if layer[0] == "dense":
            _, w_at, b_at, trainable, in_width = layer
            w = param(w_at)
            sigma_in, sigma = sigma, c_.mul(w, sigma)
            if b_at is not None:
                sigma = c_.add(sigma, param(b_at))
            if track_ntk:
                if tau is not None:
                    tau = c_.mul(w, tau)
                if trainable:
                    own = sigma if in_width is None else c_.mul(in_width, sigma_in)
                    if in_width is not None and b_at is not None:
                        own = c_.add(own, 1)
                    tau = own if tau is None else c_.add(tau, own)
            continue
        _, kind, first_feature, first_constant = layer
        form = _KINDS[kind]
        nf = len(form.feature_names)
        fi = [feature("PI", first_feature + k) for k in range(nf)]
        fj = [feature("PJ", first_feature + k) for k in range(nf)]
        consts = [_Dual(g.elem(var["C"], first_constant + k)) for k in range(form.constant_count)]
        k, kdot = form.pair(c_, consts, sigma, fi, fj, same, track_ntk)
        tau = None if (tau is None or kdot is None or not track_ntk) else c_.mul(kdot, tau)
        sigma, tau = c_.settle(k), c_.settle(tau)
    kernel = tau if track_ntk else sigma
    return _Dual(g.int(0)) if kernel is None else kernel  # an NTK without any trainable layer: zero


def _reduced(
    c_: _Calculus, kernel: _Dual, mode: Mode, var: dict[str, _Node], directions: int, c: int
) -> tuple[_Node, int, int]:
    """The reduced expression of ``mode`` (see :func:`_build`), its reduction axis and its dimension."""
    g = c_.g
    if mode == "matrix":
        return kernel.value, 1, 1
    if mode == "matmul":
        return cast(_Node, g.mul(kernel.value, var["V"])), 1, c
    tangent = c_.t_vector(kernel.tangent)
    if tangent is None:
        tangent = g.elem_t(g.int(0), directions, 0)
    weight = g.mul(var["G"], var["V"]) if c == 1 else g.node("scalprod", var["G"], var["V"], dim=1)
    other = var["Y"] if mode == "grad_i" else var["X"]
    # products of variables and non-zero values: never the zero constant
    pieces = [cast(_Node, g.mul(g.elem(tangent, 0), other))]
    if directions > 1:
        pieces.append(g.extract(tangent, 1, directions - 1))
    weighted = cast(_Node, g.mul(weight, g.concat(pieces)))
    if mode == "grad_i":
        return weighted, 1, weighted.dim
    root = g.concat([cast(_Node, g.mul(kernel.value, var["G"])), weighted])
    return root, 0, root.dim


def _build(
    structure: _Structure, mode: Mode, d: int, c: int = 1, names: dict[str, str] | None = None
) -> tuple[_Node, _Formula]:
    r"""The formula of one reduction, as a graph root and as text.

    ``mode``:

    * ``"matrix"``: the kernel entry :math:`K(x_i, y_j)` alone (the ``LazyTensor``'s formula);
    * ``"matmul"``: :math:`\sum_j K_{ij} v_j` (``V``: ``Vj(c)``), reduced over :math:`j`;
    * ``"grad_i"``: with ``G`` = ``Vi(c)`` the gradient of the output and
      :math:`w_{ij} = g_i \cdot v_j`, reduced over :math:`j`:
      :math:`\sum_j w_{ij} [\partial_s K\, y_j,\ \partial_{f_i} K,\ \partial_\theta K]`
      (``d + m + p`` numbers per :math:`i`; :math:`s = x\cdot y` unscaled, :math:`f_i` the
      features of :math:`x_i`, :math:`\theta` the hyperparameters);
    * ``"grad_j"``: reduced over :math:`i`:
      :math:`\sum_i [K_{ij} g_i,\ w_{ij}\,\partial_s K\, x_i,\ w_{ij}\,\partial_{f_j} K]`
      (``c + d + m`` numbers per :math:`j`).

    ``names``: the text of each variable (default: its alias name).
    """
    aliases = _aliases(structure, mode, d, c)
    g = _Graph()
    var = {name: g.var(name, dim) for name, _, dim in aliases}
    directions = _Directions.of(structure, mode)
    constants = {name: i for i, name in enumerate(structure.constants)}
    c_ = _Calculus(g, directions.count, constants, var["C"])
    kernel = _network(structure, c_, var, directions)
    root, axis, dim_out = _reduced(c_, kernel, mode, var, directions.count, c)
    text = _emit(root, names if names is not None else {name: name for name in var}, g.pinned)
    return root, _Formula(text, tuple(aliases), axis, dim_out)


def keops_formula(
    net: Layer, hyper_keys: Sequence[str], *, output: Output, d: int, mode: Mode = "matmul", c: int = 1
) -> str:
    """The KeOps formula string of ``net``'s kernel (for inspection and tests of its size).

    ``hyper_keys``: the keys of ``Hyperparameters.collect(net)``; ``mode``: ``"matrix"`` (the kernel
    entry), ``"matmul"`` (``K @ v``), ``"grad_i"`` / ``"grad_j"`` (the reductions of the backward
    pass, see :func:`_build`).
    """
    return _build(_plan(net, hyper_keys, output).structure, mode, d, c)[1].text
