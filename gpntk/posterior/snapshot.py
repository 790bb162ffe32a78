"""The ensemble's snapshot: a frozen copy of the network, its hyperparameter values and the training data.

Taken once, at construction of a :class:`~gpntk.posterior.TrainedEnsemble`: nothing that later
happens to the network or the tensors passed in (fitting a GP whose kernel shares the network,
an optimiser step, an in-place edit) reaches the ensemble. The hyperparameter values are read
with :meth:`gpntk.core.hyperparameters.Hyperparameters.collect`, keyed as there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import Tensor

from ..core.graph_inputs import GraphFormat
from ..core.hyperparameters import Hyperparameters, parameterized_layers
from ..core.layer import Layer
from ..kernels.fusion import FusionPolicy

__all__ = ["EnsembleSnapshot", "freeze_network"]


def freeze_network(net: Layer, like: Tensor) -> tuple[Layer, dict[str, Tensor]]:
    """A frozen deep copy of ``net`` and its hyperparameter values (detached copies in the dtype of ``like``).

    Networks with batched hyperparameters (a batch shape before the trailing ``(1, 1)``) are
    refused.
    """
    for layer in parameterized_layers(net):
        for name in layer.hyperparameter_names:
            value = layer.hyperparameter(name)
            if value.dim() > 2 or value.numel() != 1:
                raise ValueError(
                    f"TrainedEnsemble needs one value per hyperparameter, but {layer.name}.{name} has shape "
                    f"{tuple(value.shape)} (a batch of hyperparameters, e.g. after NTKKernel(net, batch_shape=...)); "
                    "build one ensemble per batch element from a network with unbatched hyperparameters"
                )
    try:
        frozen = copy.deepcopy(net)
    except Exception as error:  # pragma: no cover - every gpntk layer can be copied
        raise TypeError(f"TrainedEnsemble keeps a copy of the network, but it cannot be copied: {error}") from error
    frozen.requires_grad_(False)
    hyper = {name: value.detach().clone() for name, value in Hyperparameters.collect(frozen, like=like).items()}
    return frozen, hyper


@dataclass(frozen=True)
class EnsembleSnapshot:
    """What a trained ensemble is built from, copied: the network, its hyperparameters, the data.

    ``train_y`` is ``(n, k)`` (1-D targets get a trailing dimension; ``multi_output`` says which
    they were), in the dtype and on the device of ``train_x``.
    """

    net: Layer  # a frozen deep copy, requires_grad off
    hyper: dict[str, Tensor]  # its hyperparameter values, keyed as in Hyperparameters
    train_x: Tensor  # (n, d)
    train_y: Tensor  # (n, k)
    multi_output: bool  # whether the targets were (n, k) rather than (n,)
    input_shape: tuple[int, ...] | GraphFormat | None
    #: the ensemble's compile policy: its repeated large evaluations compile (gpntk.settings.fusion)
    fusion: FusionPolicy = field(default_factory=FusionPolicy, compare=False)

    @classmethod
    def take(
        cls, net: Layer, train_x: Tensor, train_y: Tensor, input_shape: tuple[int, ...] | GraphFormat | None
    ) -> EnsembleSnapshot:
        """Copy ``net`` (frozen), its hyperparameter values and the data (checked beforehand)."""
        frozen, hyper = freeze_network(net, like=train_x)
        x = train_x.detach().clone()
        multi_output = train_y.dim() == 2
        y = train_y.detach().to(x, copy=True)
        return cls(frozen, hyper, x, y if multi_output else y.unsqueeze(-1), multi_output, input_shape)

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.train_y.shape[1]
