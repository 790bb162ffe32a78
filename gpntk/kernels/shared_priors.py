r"""Warn when GPyTorch would count the prior of a shared hyperparameter more than once.

A network's layers own its hyperparameters and their priors, and every kernel built on one
network shares them. GPyTorch's marginal likelihoods add ``prior.log_prob`` once per *path*
from the model to the module carrying the prior (``gpytorch.Module.named_priors`` walks
``named_children`` without remembering modules already seen, de-duplicating only identical
children of one parent). So a model holding two kernels on one network, e.g.
``ScaleKernel(NTKKernel(net)) + NNGPKernel(net)``, counts each prior on ``net`` twice: the
posterior over hyperparameters is then that of a prior squared.

``NTKKernel(net) + NNGPKernel(net)`` avoids it by building one
:class:`~gpntk.kernels.infinite_width.NeuralKernelSum`; every other composition that reaches a
prior-carrying layer of a gpntk network by two paths warns once per layer with
:class:`~gpntk.CompositionWarning`.

Mechanism: a torch module-registration hook (called whenever a module is assigned as another's
child). It keeps, for modules that contain a gpntk network with priors, the number of paths to
each prior-carrying layer, and updates a parent from its tracked children only. While no gpntk
network with priors exists (:data:`_PATHS` empty) the hook returns at once, so it costs other
code nothing; it never walks module trees (networks are walked once, when a kernel is built on
them). Limitations: modules changed after being assigned to a parent (``del``, appending to a
``ModuleList`` already inside a model) do not update that parent's ancestors, and copies made
by ``copy.deepcopy`` or pickling are not tracked.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from typing import cast

import gpytorch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..errors import CompositionWarning

__all__ = ["track_network_priors"]

#: module -> number of paths from it to each prior-carrying layer (keyed by id), for modules that reach one
_PATHS: "weakref.WeakKeyDictionary[nn.Module, Counter[int]]" = weakref.WeakKeyDictionary()
#: parent -> {child name: child} for the children of a parent that are in _PATHS
_TRACKED_CHILDREN: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()
#: id of a prior-carrying layer -> the layer (while it lives), for messages and warn-once
_LAYERS: "weakref.WeakValueDictionary[int, gpytorch.Module]" = weakref.WeakValueDictionary()
#: layers already warned about
_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _has_priors(module: nn.Module) -> bool:
    return isinstance(module, gpytorch.Module) and any(prior is not None for prior, _, _ in module._priors.values())


def _count_paths(module: nn.Module, memo: dict[int, Counter[int]]) -> Counter[int]:
    """Paths from ``module`` to each prior-carrying module, as GPyTorch's ``named_priors`` walks them."""
    key = id(module)
    if key not in memo:
        counts: Counter[int] = Counter()
        if _has_priors(module):
            counts[id(module)] += 1
            _LAYERS[id(module)] = module
        for _, child in module.named_children():
            counts.update(_count_paths(child, memo))
        memo[key] = counts
    return memo[key]


def track_network_priors(net: nn.Module, where: str) -> None:
    """Start tracking ``net`` if it carries priors; warn if it already reaches one twice itself.

    ``where`` names the kernel being built, for the message.
    """
    counts = _count_paths(net, {})
    if not counts:
        return
    _PATHS[net] = counts
    _warn_if_repeated(counts, where)


def _warn_if_repeated(counts: Counter[int], where: str) -> None:
    """One warning for every prior-carrying layer newly reached by more than one path."""
    repeated = []
    for key, paths in counts.items():
        layer = _LAYERS.get(key)
        if paths > 1 and layer is not None and layer not in _WARNED:
            _WARNED.add(layer)
            repeated.append(f"{type(layer).__name__} ({', '.join(layer._priors)}): {paths} paths")
    if repeated:
        times = max(counts.values())
        warnings.warn(
            f"priors of a gpntk network are reachable by several paths in {where}, and GPyTorch's marginal "
            f"likelihood counts each prior once per path (the most repeated: counts it {times} times): "
            f"{'; '.join(repeated)}. Add two gpntk kernels on one network with `+` (one gpntk.NeuralKernelSum) "
            "instead of wrapping them separately, or give only one of the networks a prior.",
            CompositionWarning,
            stacklevel=4,
        )


def _registration_hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    if not _PATHS:  # no gpntk network with priors in this process: nothing to do
        return None
    child_counts = _PATHS.get(child) if child is not None else None
    tracked = _TRACKED_CHILDREN.get(parent)
    if child_counts is None and (tracked is None or name not in tracked):
        return None
    if tracked is None:
        tracked = _TRACKED_CHILDREN[parent] = {}
    if child_counts is None:
        del tracked[name]
    else:
        tracked[name] = cast(nn.Module, child)  # child_counts is only found for a child
    total: Counter[int] = Counter()
    seen: set[int] = set()
    for module in tracked.values():
        if id(module) not in seen:  # torch's named_children lists a repeated child once
            seen.add(id(module))
            total.update(_PATHS.get(module, Counter()))
    if total:
        _PATHS[parent] = total
        _warn_if_repeated(total, f"this {type(parent).__name__}")
    else:
        _PATHS.pop(parent, None)
    return None


_HANDLE = register_module_module_registration_hook(_registration_hook)
