r"""gpntk for BoTorch users: the trained ensemble as a BoTorch model, and input centring.

* :class:`TrainedEnsembleModel`: a :class:`botorch.models.model.Model` whose posterior is that of
  an ensemble of infinitely wide networks trained by gradient descent for time ``t``
  (:class:`gpntk.TrainedEnsemble`), usable with ``optimize_acqf`` and BoTorch's analytic and
  Monte Carlo acquisition functions, with input and outcome transforms;
* :func:`fit_network`: the network's hyperparameters fitted by the marginal likelihood of the
  matching NTK or NNGP Gaussian process;
* :class:`Center`: the input transform :math:`x \mapsto 2x - 1` from BoTorch's unit cube (after
  ``Normalize``) onto :math:`[-1, 1]^d`, where the NTK and NNGP, which are not translation
  invariant, distinguish points much better (for ``SingleTaskGP``, which warns about inputs
  outside the unit cube, use the kernel wrapper :class:`gpntk.kernels.Centered` instead).

BoTorch is an optional dependency: ``pip install "gpntk[botorch]"``. ``import gpntk`` never
imports it; this package does.
"""

from __future__ import annotations

try:
    import botorch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'gpntk.botorch needs BoTorch, which is an optional extra of gpntk: pip install "gpntk[botorch]" '
        f"(importing botorch failed: {error})"
    ) from error

from .fitting import FittedNetwork, fit_network
from .model import TrainedEnsembleModel
from .transforms import Center

__all__ = ["TrainedEnsembleModel", "Center", "fit_network", "FittedNetwork"]
