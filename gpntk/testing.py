r"""Checking gpntk against reference kernels: :func:`reference_kernels`.

The reference cases (``.npz`` files, e.g. those computed with Neural Tangents that gpntk's tests
use) each hold a JSON ``spec`` (the architecture as ``[name, kwargs]`` pairs in gpntk's layer names,
the input shape, and for posteriors the learning rate, ridge and times) and the reference values.
:func:`reference_kernels` evaluates a case through gpntk's public API alone and returns gpntk's
values under the same keys, so a comparison is one loop::

    import numpy as np
    from gpntk.testing import reference_kernels

    ours = reference_kernels("fc_relu_d3.npz")
    with np.load("fc_relu_d3.npz") as ref:
        for key, value in ours.items():
            error = np.abs(value - ref[key]).max() / np.abs(ref[key]).max()

The case format (``kind`` ``"kernel"`` or ``"posterior"``; keys, conventions and the tolerances a
correct float64 implementation meets) is described in the reference set's README
(``tests/reference/README.md`` in gpntk's repository), with the graph cases (kinds
``"graph_kernel"``: ``nodes1``, ``adj1``, ... padded graphs, read through
:class:`~gpntk.GraphInputs`; ``"node_kernel"``: ``nodes``, ``adj`` of one graph, through
:class:`~gpntk.NodeGraph`). Cases using a layer or an option gpntk does not have raise
:class:`NotImplementedError` naming it.

This module imports the whole library (kernels, posteriors); ``import gpntk`` does not import it
until ``gpntk.testing`` is first used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator

import numpy as np
import torch

from . import layers as L
from .core.graph_inputs import GraphInputs, NodeGraph
from .kernels import NNGPKernel, NTKKernel
from .posterior import TrainedEnsemble

__all__ = ["reference_kernels", "build_network", "load_spec", "default_dtype"]

#: case kinds this module evaluates
SUPPORTED_KINDS = ("kernel", "posterior", "graph_kernel", "node_kernel")


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON ``spec`` of the case file ``path``."""
    with np.load(path, allow_pickle=False) as data:
        if "spec" not in data.files:
            raise ValueError(f"{os.fspath(path)} is not a reference case: it has no 'spec' entry")
        return dict(json.loads(str(data["spec"])))


def _layer_names(layers: list[Any]) -> list[str]:
    names: list[str] = []
    for name, kwargs in layers:
        if name == "serial":
            names += _layer_names(kwargs["layers"])
        elif name == "parallel":
            for branch in kwargs["branches"]:
                names += _layer_names(branch)
        else:
            names.append(name)
    return names


def _missing_layers(layers: list[Any]) -> list[str]:
    names = dict.fromkeys(_layer_names(layers))  # first-seen order, once each
    return [n for n in names if not isinstance(getattr(L, n, None), type) or not issubclass(getattr(L, n), L.Layer)]


def _build(layers: list[Any]) -> list[L.Layer]:
    built: list[L.Layer] = []
    for name, kwargs in layers:
        if name == "serial":
            built.append(L.serial(*_build(kwargs["layers"])))
        elif name == "parallel":
            built.append(L.parallel(*(L.serial(*_build(branch)) for branch in kwargs["branches"])))
        else:
            try:
                built.append(getattr(L, name)(**kwargs))
            except (TypeError, ValueError) as error:  # ArchitectureError is a ValueError
                arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
                raise NotImplementedError(f"gpntk cannot build {name}({arguments}): {error}") from error
    return built


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run a block with ``dtype`` as torch's default dtype, restoring the previous one after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_network(layers: list[Any]) -> L.Serial:
    """The gpntk network of a case's ``layers`` (``[name, kwargs]`` pairs; ``serial``, ``parallel`` nest).

    Every name other than ``serial`` / ``parallel`` is a class of :mod:`gpntk.layers` called with
    its kwargs. The layers are built with float64 as torch's default dtype, so that their
    hyperparameters hold the case's values exactly (a ``Dense`` stores them in the default dtype
    when it is built). Raises :class:`NotImplementedError` naming the layers gpntk does not have,
    or the layer whose options it does not support.
    """
    missing = _missing_layers(layers)
    if missing:
        raise NotImplementedError(f"gpntk has no layer {', '.join(missing)} (in gpntk.layers)")
    with default_dtype(torch.float64):
        return L.serial(*_build(layers))


def _input_shape(spec: dict[str, Any]) -> tuple[int, ...] | None:
    shape = spec.get("input_shape")
    return None if shape is None else tuple(int(s) for s in shape)


def _kernel_case(net: L.Serial, spec: dict[str, Any], data: Any) -> dict[str, np.ndarray]:
    x1 = torch.as_tensor(data["x1"], dtype=torch.float64)
    x2 = torch.as_tensor(data["x2"], dtype=torch.float64)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for kind, kernel_class in (("nngp", NNGPKernel), ("ntk", NTKKernel)):
            kernel = kernel_class(net, input_shape=_input_shape(spec))
            out[f"{kind}_12"] = kernel(x1, x2).to_dense().numpy()
            out[f"{kind}_11"] = kernel(x1).to_dense().numpy()
    return out


def _graph_case(net: L.Serial, spec: dict[str, Any], data: Any) -> dict[str, np.ndarray]:
    """A graph-level case: each graph padded to N nodes, every one of them real (the README's convention)."""
    nodes1 = torch.as_tensor(data["nodes1"], dtype=torch.float64)
    fmt = GraphInputs(nodes=nodes1.shape[-2], channels=nodes1.shape[-1])
    x1 = fmt.pack(nodes1, data["adj1"])
    x2 = fmt.pack(data["nodes2"], data["adj2"])
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for kind, kernel_class in (("nngp", NNGPKernel), ("ntk", NTKKernel)):
            kernel = kernel_class(net, input_shape=fmt)
            out[f"{kind}_12"] = kernel(x1, x2).to_dense().numpy()
            out[f"{kind}_11"] = kernel(x1).to_dense().numpy()
    return out


def _node_case(net: L.Serial, spec: dict[str, Any], data: Any) -> dict[str, np.ndarray]:
    """A node-level case: the kernel between all nodes of one graph."""
    graph = NodeGraph(torch.as_tensor(data["nodes"], dtype=torch.float64), data["adj"])
    nodes = torch.arange(graph.nodes, dtype=torch.float64).unsqueeze(-1)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for kind, kernel_class in (("nngp", NNGPKernel), ("ntk", NTKKernel)):
            out[kind] = kernel_class(net, input_shape=graph)(nodes).to_dense().numpy()
    return out


def _posterior_case(net: L.Serial, spec: dict[str, Any], data: Any) -> dict[str, np.ndarray]:
    x_train, y_train, x_test = (torch.as_tensor(data[k], dtype=torch.float64) for k in ("x_train", "y_train", "x_test"))
    targets = y_train if y_train.shape[1] > 1 else y_train[:, 0]
    ensemble = TrainedEnsemble(
        net, x_train, targets, spec["learning_rate"], spec["diag_reg"], input_shape=_input_shape(spec)
    )
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for regime in ("ntk", "nngp"):
            for i, t in enumerate(spec["times"]):
                time = math.inf if t == "inf" else float(t)
                for points, key in ((x_test, ""), (x_train, "train")):
                    mean, cov = ensemble.moments(points, time, regime)
                    out[f"{regime}_{key}mean_{i}"] = mean.reshape(len(points), -1).numpy()
                    out[f"{regime}_{key}cov_{i}"] = cov.numpy()
    return out


def reference_kernels(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """gpntk's values for the reference case in ``path``, under the keys the file holds.

    Kernel cases: ``nngp_12``, ``ntk_12`` (between ``x1`` and ``x2``) and ``nngp_11``, ``ntk_11``
    (``x1`` with itself), from :class:`~gpntk.NNGPKernel` / :class:`~gpntk.NTKKernel` in float64.
    Posterior cases: for each regime (``"ntk"``, ``"nngp"``) and time index ``i``,
    ``{regime}_mean_{i}`` (``n_test x k``), ``{regime}_cov_{i}`` and the same at the training inputs,
    ``{regime}_trainmean_{i}``, ``{regime}_traincov_{i}``, from :class:`~gpntk.TrainedEnsemble`
    with the case's learning rate, ``diag_reg`` and times (``"inf"`` for t = ∞).

    Graph cases: ``nngp_12``, ``ntk_12``, ``nngp_11``, ``ntk_11`` between the padded graphs
    (every padding node counted as a real, isolated node, as the reference defines them); node
    cases: ``nngp``, ``ntk`` between all nodes of the graph.

    Raises :class:`NotImplementedError` for case kinds gpntk does not know and for cases using a
    layer gpntk does not have, or options of a layer it does not support (the message names
    them), and :class:`ValueError` for a file that is not a case.
    """
    spec = load_spec(path)
    kind = spec.get("kind")
    if kind not in SUPPORTED_KINDS:
        raise NotImplementedError(
            f"{os.fspath(path)}: case kind {kind!r} is not supported by gpntk yet (supported: "
            f"{', '.join(SUPPORTED_KINDS)})"
        )
    try:
        net = build_network(spec["layers"])
    except NotImplementedError as error:
        raise NotImplementedError(f"{os.fspath(path)}: {error}") from error
    with np.load(path, allow_pickle=False) as data:
        evaluate = {
            "kernel": _kernel_case, "posterior": _posterior_case, "graph_kernel": _graph_case, "node_kernel": _node_case
        }[kind]
        return evaluate(net, spec, data)
