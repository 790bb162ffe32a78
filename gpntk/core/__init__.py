"""The vocabulary every other package shares, with no dependency on any of them.

* :mod:`~gpntk.core.state`: :class:`KernelState`, the kernels a layer maps (Σ, the point
  variances, Θ);
* :mod:`~gpntk.core.spatial`: layouts of spatial covariances and the window sums on them;
* :mod:`~gpntk.core.coincident`: identical input rows, whose kernel values are the exact
  per-point ones;
* :mod:`~gpntk.core.layer`: the layer protocol (:class:`Layer`, :class:`Signature`,
  :func:`check_network`);
* :mod:`~gpntk.core.hyperparameters`: the read-only :class:`Hyperparameters` snapshot a kernel
  evaluation reads;
* :mod:`~gpntk.core.finite`: the torch modules of finite networks in NTK parameterization;
* :mod:`~gpntk.core.standard`: the finite affine modules in standard parameterization.
"""
