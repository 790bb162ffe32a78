r"""Message passing over graphs: ``Aggregate``, the layer of graph NTKs and GCN kernels."""

from __future__ import annotations

import torch
from torch import nn

from ..core.finite_graph import AggregateNodes
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.state import KernelState
from ..errors import ArchitectureError

__all__ = ["Aggregate"]


class Aggregate(Layer):
    r"""Graph message passing: node :math:`u` receives :math:`h'_u = \sum_v A_{uv} h_v` (no parameters).

    :math:`A` is each input graph's adjacency, any weighted or directed one (row :math:`u` is
    what node :math:`u` receives; use :func:`gpntk.normalized_adjacency` for :math:`A + I`,
    :math:`D^{-1}A`, :math:`D^{-1/2}AD^{-1/2}`, ...). As a linear map of the nodes, it maps the
    covariances between the nodes of two graphs and the NTK alike,

    .. math::
        \Sigma(G, G') \leftarrow A\, \Sigma(G, G')\, A'^{\top}, \qquad
        \Theta(G, G') \leftarrow A\, \Theta(G, G')\, A'^{\top},

    the neighbourhood aggregation of the graph NTK (Du et al. 2019) and of the GCN-NTK/NNGP
    (Sabanayagam et al. 2023; Niu et al. 2023). It needs graph inputs: pass
    ``input_shape=gpntk.GraphInputs(...)`` (graph-level kernels, with ``GlobalSumPool`` or
    ``GlobalAvgPool`` over the nodes) or ``input_shape=gpntk.NodeGraph(...)`` (node-level
    kernels on one graph) to the kernel, ``TrainedEnsemble`` or ``net.finite``. Neural Tangents'
    ``Aggregate`` with ``pattern`` :math:`A^\top`.

    Aggregation mixes nodes, so every layer before it keeps the full node-by-node covariance;
    with a ``Dense`` and an activation after each ``Aggregate`` the network is a GCN
    (Kipf & Welling 2017), and Du et al.'s GNTK block is ``Aggregate()`` followed by an MLP.
    """

    def check(self, signature: Signature) -> Signature:
        if signature.graph is False:
            raise ArchitectureError(
                "Aggregate passes messages along the edges of graphs, but the inputs are "
                + ("vectors" if signature.spatial == () else "not graphs")
                + " (after " + signature.last + "); pass input_shape=gpntk.GraphInputs(...) or GraphDataset(...) "
                "for graph-level kernels or input_shape=gpntk.NodeGraph(...) for node-level kernels"
            )
        if signature.spatial == ():
            raise ArchitectureError(
                f"Aggregate needs the node features of graphs, but the outputs of {signature.last} are vectors "
                "(pooled or flattened); put Aggregate before GlobalSumPool / GlobalAvgPool, on graph inputs "
                "(input_shape=gpntk.GraphInputs(...), GraphDataset(...) or NodeGraph(...))"
            )
        # a linear map of the nodes: Gaussian outputs stay Gaussian (other variances per node), a fresh
        # function stays fresh and independent of sibling branches
        return signature.after(self, features=signature.features)

    def needs_full(self, after: bool) -> bool:
        return True

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        if state.graph is None:
            raise RuntimeError("Aggregate was given a kernel state without graphs")
        return state.graph.aggregate(state)

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        return AggregateNodes(), in_shape

    def __repr__(self) -> str:
        return "Aggregate()"
