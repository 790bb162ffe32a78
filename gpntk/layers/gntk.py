r"""The graph neural tangent kernel's architecture (Du et al. 2019): ``gntk(blocks, mlp_layers)``."""

from __future__ import annotations

import copy

from gpytorch.constraints import Interval
from gpytorch.priors import Prior

from .._validation import integer_argument
from ..activations import ReLU
from ..errors import ArchitectureError
from .base import Serial, serial
from .branching import FanInSum, FanOut, parallel
from .dense import Dense
from .graph import Aggregate
from .pooling import GlobalAvgPool, GlobalSumPool

__all__ = ["gntk"]


def gntk(
    blocks: int,
    mlp_layers: int = 2,
    *,
    jumping_knowledge: bool = True,
    readout: str = "sum",
    weight_variance: float = 2.0,
    readout_variance: float = 1.0,
    weight_variance_prior: Prior | None = None,
    weight_variance_constraint: Interval | None = None,
    readout_variance_prior: Prior | None = None,
    readout_variance_constraint: Interval | None = None,
) -> Serial:
    r"""The graph NTK's network of Du et al. (2019): ``blocks`` BLOCK operations and a pooled readout.

    One BLOCK is ``Aggregate()`` followed by ``mlp_layers`` fully connected ReLU layers
    (``Dense(weight_variance, 0)`` + ``ReLU()``, :math:`c_\sigma = 2` for the default
    ``weight_variance=2``, no biases). The readout pools the node features over each graph's
    nodes (``readout="sum"``: ``GlobalSumPool``, ``"mean"``: ``GlobalAvgPool``) and applies a
    ``Dense(readout_variance, 0)``. With ``jumping_knowledge`` every depth is read out, from the
    input features (depth 0) to the last BLOCK, each by its own readout, and the readouts are
    summed: the kernel is :math:`\sum_{\ell=0}^{L} K^{(\ell)}`, the sum over depths of the pooled
    kernels, as in Du et al.'s GNTK with jumping knowledge (Xu et al. 2018). Without it, only the
    last BLOCK is read out.

    The aggregation's normalisation is the data's: pass each graph's adjacency as
    :math:`A + I` for their "sum" aggregation, or :math:`D^{-1}(A + I)` (``normalized_adjacency(a,
    "row", self_loops=True)``) for their degree scaling :math:`c_u = 1/(|\mathcal N(u)| + 1)`.
    Use with ``input_shape=gpntk.GraphInputs(...)``; :func:`gpntk.graph_kernel_matrices` computes
    the Gram matrix of a dataset of graphs.

    Every ``Dense`` has its own :math:`\sigma_w^2` (a kernel on the network lists them in
    ``kernel.layer_variances``). ``weight_variance_prior`` / ``weight_variance_constraint`` (a
    GPyTorch prior on, and constraint of, the raw value) go to each hidden ``Dense``,
    ``readout_variance_prior`` / ``readout_variance_constraint`` to each readout, each layer with
    its own copy.
    """
    blocks = integer_argument("blocks", blocks, minimum=1, error=ArchitectureError)
    mlp_layers = integer_argument("mlp_layers", mlp_layers, minimum=1, error=ArchitectureError)
    if readout not in ("sum", "mean"):
        raise ArchitectureError(f"readout must be 'sum' or 'mean', got {readout!r}")
    pool = GlobalSumPool if readout == "sum" else GlobalAvgPool

    def block() -> Serial:
        layers = [Aggregate()]
        for _ in range(mlp_layers):
            layers += [_bias_free(weight_variance, weight_variance_prior, weight_variance_constraint), ReLU()]
        return serial(*layers)

    def read_out() -> Serial:
        return serial(pool(), _bias_free(readout_variance, readout_variance_prior, readout_variance_constraint))

    if not jumping_knowledge:
        return serial(*(block() for _ in range(blocks)), read_out())
    # depth L: its own readout; each shallower depth: a readout beside the rest of the network,
    # summed (independent readouts: the kernels of the depths add up)
    net: Serial = serial(block(), read_out())
    for _ in range(blocks - 1):
        net = serial(block(), FanOut(2), parallel(read_out(), net), FanInSum())
    return serial(FanOut(2), parallel(read_out(), net), FanInSum())


def _bias_free(weight_variance: float, prior: Prior | None, constraint: Interval | None) -> Dense:
    """``Dense(weight_variance, 0)`` with its own copies of ``prior`` and ``constraint``."""
    prior, constraint = copy.deepcopy(prior), copy.deepcopy(constraint)
    return Dense(weight_variance, 0.0, weight_variance_prior=prior, weight_variance_constraint=constraint)
