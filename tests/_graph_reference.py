r"""An independent dense reference for graph kernels (NNGP and NTK), written from the formulas in NumPy.

The reference never calls gpntk. It treats a list of graphs as one disjoint union: the node features
stacked into :math:`H` ``(T, C)`` (``T`` the total number of nodes), the adjacencies placed on the
diagonal blocks of :math:`A` ``(T, T)``. The recursion then runs on the covariance between every pair
of nodes of the union, :math:`\Sigma^0 = H H^\top / C` and :math:`\Theta^0 = 0`, whose block
:math:`(G, G')` is the node-by-node covariance of the pair of graphs. Each layer maps the whole
matrix:

* ``Dense(σw², σb²)``: :math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
  :math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma_{new}` (NTK parameterization, Jacot et al. 2018);
* an activation :math:`\phi`: with :math:`q_{11} = \Sigma_{uu}`, :math:`q_{22} = \Sigma_{vv}`,
  :math:`q_{12} = \Sigma_{uv}`, :math:`\Sigma_{uv} \leftarrow E[\phi(a)\phi(b)]` and
  :math:`\Theta_{uv} \leftarrow \Theta_{uv} E[\phi'(a)\phi'(b)]` for
  :math:`(a, b) \sim N(0, [[q_{11}, q_{12}], [q_{12}, q_{22}]])`. ReLU: the arc-cosine kernel of
  order one (Cho & Saul 2009), :math:`E[\phi\phi] = \frac{\sqrt{q_{11}q_{22}}}{2\pi}(\sin\theta +
  (\pi - \theta)\cos\theta)`, :math:`E[\phi'\phi'] = \frac{\pi - \theta}{2\pi}`,
  :math:`\cos\theta = q_{12}/\sqrt{q_{11}q_{22}}`. Erf (Williams 1997):
  :math:`E[\phi\phi] = \frac{2}{\pi}\arcsin\frac{2q_{12}}{\sqrt{(1+2q_{11})(1+2q_{22})}}`,
  :math:`E[\phi'\phi'] = \frac{4}{\pi}[(1+2q_{11})(1+2q_{22}) - 4q_{12}^2]^{-1/2}`;
* ``Aggregate`` (:math:`h'_u = \sum_v A_{uv} h_v`): :math:`\Sigma \leftarrow A \Sigma A^\top`,
  :math:`\Theta \leftarrow A \Theta A^\top` (block :math:`(G, G')`: :math:`A_G \Sigma_{GG'} A_{G'}^\top`);
* ``GlobalSumPool`` / ``GlobalAvgPool``: :math:`\Sigma \leftarrow P^\top \Sigma P` with the membership
  matrix :math:`P` ``(T, number of graphs)``, :math:`P_{ug} = 1` (or :math:`1/n_g`) for the nodes of
  graph ``g``: the sum (mean) over the nodes of both graphs. After it the units are graphs and the same
  Dense / activation maps apply to the graph-by-graph matrices.

The diagonal of the matrix is a unit with itself: its correlation is set to exactly one there (the
per-point value), so the reference has no rounding in :math:`\arccos(1)`. Any two different units
(two nodes, or the same node of a graph listed twice) go through the general formula, so inputs
should not repeat a graph or contain two nodes of identical state where the ReLU NTK's
:math:`\arccos` near correlation one is ill-conditioned.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: one layer of the reference network: ("aggregate",), ("dense", σw², σb²), ("relu",), ("erf",),
#: ("sum_pool",), ("avg_pool",)
Op = tuple

Graph = tuple[np.ndarray, np.ndarray]


def _relu(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arc-cosine kernel of order one and its derivative kernel (Cho & Saul 2009), entrywise."""
    d = np.sqrt(np.diag(sigma))
    norms = np.outer(d, d)
    # a unit of zero variance (a node that receives no message) is exactly 0 after the ReLU; its
    # angle is then arbitrary (π/2 here): the value is 0 and the derivative factor only multiplies its Θ, 0 too
    cos = np.divide(sigma, norms, out=np.zeros_like(sigma), where=norms > 0).clip(-1.0, 1.0)
    np.fill_diagonal(cos, np.where(d > 0, 1.0, 0.0))
    theta = np.arccos(cos)
    value = norms / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * cos)
    return value, (np.pi - theta) / (2 * np.pi)


def _erf(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[erf(a) erf(b)] and E[erf'(a) erf'(b)] (Williams 1997), entrywise."""
    s = 1 + 2 * np.diag(sigma)
    prod = np.outer(s, s)
    value = 2 / np.pi * np.arcsin(np.clip(2 * sigma / np.sqrt(prod), -1.0, 1.0))
    return value, 4 / np.pi / np.sqrt(prod - 4 * sigma**2)


def union(graphs: Sequence[Graph]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The disjoint union: stacked features ``(T, C)``, block-diagonal adjacency ``(T, T)``, membership ``(T, G)``."""
    sizes = [np.asarray(f).shape[0] for f, _ in graphs]
    total = sum(sizes)
    h = np.concatenate([np.asarray(f, dtype=np.float64) for f, _ in graphs])
    a = np.zeros((total, total))
    member = np.zeros((total, len(graphs)))
    start = 0
    for g, ((_, adj), n) in enumerate(zip(graphs, sizes)):
        a[start : start + n, start : start + n] = np.asarray(adj, dtype=np.float64)
        member[start : start + n, g] = 1.0
        start += n
    return h, a, member


def reference_kernels(graphs: Sequence[Graph], ops: Sequence[Op]) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ, Θ)`` of the network ``ops`` on ``graphs``: node-by-node ``(T, T)`` or, after pooling, ``(G, G)``.

    With one graph and no pooling, the node kernel of that graph (node-level kernels).
    """
    h, a, member = union(graphs)
    sigma = h @ h.T / h.shape[1]
    theta = np.zeros_like(sigma)
    pooled = False
    for op in ops:
        name = op[0]
        if name == "dense":
            sigma = op[1] * sigma + op[2]
            theta = op[1] * theta + sigma
        elif name in ("relu", "erf"):
            sigma, derivative = (_relu if name == "relu" else _erf)(sigma)
            theta = theta * derivative
        elif name == "aggregate":
            assert not pooled, "aggregation after pooling"
            sigma, theta = a @ sigma @ a.T, a @ theta @ a.T
        elif name in ("sum_pool", "avg_pool"):
            assert not pooled, "pooling twice"
            p = member if name == "sum_pool" else member / member.sum(0)
            sigma, theta = p.T @ sigma @ p, p.T @ theta @ p
            pooled = True
        else:
            raise ValueError(f"unknown reference op {op!r}")
    return sigma, theta

