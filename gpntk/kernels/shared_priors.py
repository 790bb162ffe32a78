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
child). Modules that contain a gpntk network with priors carry, in their own ``__dict__``, the
number of paths to each prior-carrying layer (:data:`PATHS`) and their children that do
(:data:`TRACKED_CHILDREN`); a parent is updated from its tracked children only, and a layer
remembers that it was warned about (:data:`WARNED`). Nothing is kept at module level: the state
lives and dies with the modules, and copies (``copy.deepcopy``, pickling) carry their own. For
modules without that state the hook returns after two dictionary lookups; it never walks module
trees (networks are walked once, when a kernel is built on them). Limitation: modules changed
after being assigned to a parent (``del``, appending to a ``ModuleList`` already inside a model)
do not update that parent's ancestors.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import cast

import gpytorch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..errors import CompositionWarning

__all__ = ["track_network_priors"]

#: attribute (in a module's ``__dict__``): Counter of paths from the module to each prior-carrying layer
PATHS = "_gpntk_prior_paths"
#: attribute: {child name: child} for the children of a module that carry PATHS
TRACKED_CHILDREN = "_gpntk_tracked_children"
#: attribute of a prior-carrying layer: it has been warned about
WARNED = "_gpntk_prior_warned"


def _paths(module: nn.Module | None) -> "Counter[nn.Module] | None":
    return None if module is None else module.__dict__.get(PATHS)


def _has_priors(module: nn.Module) -> bool:
    return isinstance(module, gpytorch.Module) and any(prior is not None for prior, _, _ in module._priors.values())


def _count_paths(module: nn.Module, memo: dict[int, "Counter[nn.Module]"]) -> "Counter[nn.Module]":
    """Paths from ``module`` to each prior-carrying module, as GPyTorch's ``named_priors`` walks them."""
    key = id(module)
    if key not in memo:
        counts: Counter[nn.Module] = Counter()
        if _has_priors(module):
            counts[module] += 1
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
    net.__dict__[PATHS] = counts
    _warn_if_repeated(counts, where)


def _warn_if_repeated(counts: "Counter[nn.Module]", where: str) -> None:
    """One warning for every prior-carrying layer newly reached by more than one path."""
    repeated = []
    for layer, paths in counts.items():
        if paths > 1 and not layer.__dict__.get(WARNED, False):
            layer.__dict__[WARNED] = True
            priors = ", ".join(cast(gpytorch.Module, layer)._priors)
            repeated.append(f"{type(layer).__name__} ({priors}): {paths} paths")
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
    child_counts = _paths(child)
    tracked: dict[str, nn.Module] | None = parent.__dict__.get(TRACKED_CHILDREN)
    if child_counts is None and (tracked is None or name not in tracked):
        return None  # neither the child nor the replaced one reaches a gpntk prior: nothing to do
    if tracked is None:
        tracked = parent.__dict__[TRACKED_CHILDREN] = {}
    if child_counts is None:
        del tracked[name]
    else:
        tracked[name] = cast(nn.Module, child)  # child_counts is only found for a child
    total: Counter[nn.Module] = Counter()
    seen: set[int] = set()
    for module in tracked.values():
        if id(module) not in seen:  # torch's named_children lists a repeated child once
            seen.add(id(module))
            total.update(_paths(module) or Counter())
    if total:
        parent.__dict__[PATHS] = total
        _warn_if_repeated(total, f"this {type(parent).__name__}")
    else:
        parent.__dict__.pop(PATHS, None)
    return None


_HANDLE = register_module_module_registration_hook(_registration_hook)
