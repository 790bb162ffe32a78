r"""Input centring for infinite-width kernels: BoTorch's unit cube mapped onto :math:`[-1, 1]^d`.

The NTK and NNGP are not translation invariant: they depend on the norms of the inputs and on
the angles between them. BoTorch normalises inputs to the unit cube (``Normalize``), where every
point lies in the positive orthant, the angles are small and the kernels' correlations are
compressed towards 1 (for 100 uniform random points in 6-D, the smallest NTK correlation of
``mlp(2, "relu")`` is about 0.43 on :math:`[0, 1]^d` against 0.14 on :math:`[-1, 1]^d`).
:class:`Center` maps :math:`x \mapsto 2x - 1`; chain it after ``Normalize``::

    ChainedInputTransform(normalize=Normalize(d, bounds=bounds), center=Center(d))
"""

from __future__ import annotations

from typing import Sequence

import torch
from botorch.models.transforms.input import AffineInputTransform
from torch import Tensor

__all__ = ["Center"]


class Center(AffineInputTransform):
    r"""The input transform :math:`x \mapsto 2x - 1`: the unit cube onto :math:`[-1, 1]^d` (reversible).

    A BoTorch ``AffineInputTransform`` with coefficient :math:`1/2` and offset :math:`1/2`
    (``(x - offset) / coefficient``), nothing learnt; ``untransform`` maps back,
    :math:`z \mapsto (z + 1)/2`. Use it after ``Normalize`` in a ``ChainedInputTransform``.

    :param d: the input dimension.
    :param indices: the input columns to centre (default: all ``d``).
    :param transform_on_train: apply in train mode (BoTorch's convention; default True).
    :param transform_on_eval: apply in eval mode (default True).
    :param transform_on_fantasize: apply within ``fantasize`` (default True).

    ``SingleTaskGP`` checks that its *transformed* training inputs lie in the unit cube and warns
    (``InputDataWarning``) otherwise; with ``SingleTaskGP`` centre inside the kernel with
    :class:`gpntk.kernels.Centered` instead. :class:`~gpntk.botorch.TrainedEnsembleModel` makes no
    such check.
    """

    def __init__(
        self,
        d: int,
        indices: Sequence[int] | Tensor | None = None,
        transform_on_train: bool = True,
        transform_on_eval: bool = True,
        transform_on_fantasize: bool = True,
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"Center needs the input dimension d, a positive integer, got {d!r}")
        width = d if indices is None else len(indices)
        half = torch.full((1, width), 0.5, dtype=torch.float64)
        super().__init__(
            d=d,
            coefficient=half,
            offset=half.clone(),
            indices=None if indices is None else list(indices),
            transform_on_train=transform_on_train,
            transform_on_eval=transform_on_eval,
            transform_on_fantasize=transform_on_fantasize,
        )
