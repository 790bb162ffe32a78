"""Exact GPs across processes and GPUs: kernel matrices divided among the ranks of a torch.distributed group.

* :class:`ShardedKernel` wraps any GPyTorch kernel for an ``ExactGP`` (training with
  ``ExactMarginalLogLikelihood`` and prediction, on GPyTorch's CG / Lanczos path);
* :class:`ShardedTrainProduct` is the sharded ``train_product`` of a
  :class:`~gpntk.TrainedEnsemble` with ``solver="lanczos"``;
* :func:`initialize` joins the group ``torchrun`` describes (gloo on CPU, NCCL on GPUs) and is a
  no-op in a plain ``python script.py`` run.

Each rank computes and holds only its rows of a kernel matrix; products are its rows of the result,
concatenated over ranks, so every rank runs the same solver iterations on the same vectors (Wang
et al. 2019, "Exact Gaussian Processes on a Million Data Points", NeurIPS), bitwise the
iterations of one process, and gradients are gathered over ranks.
"""

from .group import ReplicationError, initialize
from .kernel import ShardedKernel
from .train_product import ShardedTrainProduct

__all__ = ["ShardedKernel", "ShardedTrainProduct", "initialize", "ReplicationError"]
