r"""The trained ensemble as a BoTorch model: :class:`TrainedEnsembleModel`.

The outputs of an ensemble of infinitely wide networks trained by gradient flow on the mean
squared loss for time :math:`t` form a Gaussian process (Lee et al. 2019): mean :math:`\mu_t` and
covariance :math:`\Sigma_t` of :class:`gpntk.TrainedEnsemble`. :class:`TrainedEnsembleModel` is a
:class:`botorch.models.model.Model` whose posterior at ``X`` ``(*b, q, d)`` is the joint normal
distribution of the ensemble's outputs at each batch of ``q`` points, so that BoTorch's analytic
and Monte Carlo acquisition functions and ``optimize_acqf`` use "what a trained network ensemble
would predict at time t".

Conditioning (:meth:`TrainedEnsembleModel.condition_on_observations`) is exact only where the
ensemble *is* a Bayesian posterior: at :math:`t = \infty` in the regimes ``"nngp"`` and
``"ntkgp"`` the ensemble's outputs are the GP posterior with prior covariance :math:`K` (the NNGP
or the NTK) and observation noise variance ``diag_reg``, and conditioning that posterior on more
observations (with the same noise) is the posterior given all the data: the ensemble refitted
to the concatenated data. Elsewhere (regime ``"ntk"``, whose mean is NTK regression while its
covariance comes from the NNGP prior, or finite :math:`t`, where more data changes the training
dynamics themselves) there is no Bayesian update to compute, and the method raises.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.exceptions.errors import UnsupportedError
from botorch.models.model import Model
from botorch.models.transforms.input import InputTransform
from botorch.models.transforms.outcome import OutcomeTransform
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.posteriors.posterior import Posterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from .._validation import positive_integer, training_times
from ..core.layer import Layer
from ..posterior import Regime, TrainedEnsemble
from ..posterior.arguments import check_regime

__all__ = ["TrainedEnsembleModel", "DEFAULT_CHUNK_POINTS"]

#: the most test points whose joint covariance one call of the ensemble computes (see ``chunk_points``)
DEFAULT_CHUNK_POINTS = 512


def _check_training_data(train_X: object, train_Y: object) -> tuple[Tensor, Tensor]:
    """``train_X`` ``(n, d)`` and ``train_Y`` ``(n, m)``, floating point, same dtype and device."""
    if not torch.is_tensor(train_X) or not torch.is_tensor(train_Y):
        raise TypeError(
            f"train_X and train_Y must be tensors, got {type(train_X).__name__} and {type(train_Y).__name__}"
        )
    if train_X.dim() != 2:
        raise UnsupportedError(
            f"TrainedEnsembleModel needs train_X of shape (n, d), got {tuple(train_X.shape)}: batched training "
            "data (a batch of models) is not supported; build one model per batch element"
        )
    if train_Y.dim() != 2:
        raise ValueError(
            f"train_Y must have shape (n, m) as in BoTorch (m outputs), got {tuple(train_Y.shape)}; "
            "for one output use train_Y.unsqueeze(-1)"
        )
    if train_Y.shape[0] != train_X.shape[0]:
        raise ValueError(f"train_X has {train_X.shape[0]} points but train_Y has {train_Y.shape[0]} rows")
    if not train_X.is_floating_point() or train_Y.dtype != train_X.dtype:
        raise TypeError(
            f"train_X and train_Y must share one floating dtype (float64 recommended), got {train_X.dtype} "
            f"and {train_Y.dtype}"
        )
    return train_X, train_Y


class TrainedEnsembleModel(Model):
    r"""A BoTorch model: the posterior of infinitely wide networks trained for time ``t``.

    :param train_X: training inputs ``(n, d)`` (before ``input_transform``).
    :param train_Y: training targets ``(n, m)``: ``m`` outputs, fitted by one network with ``m``
        outputs (independent outputs that share the kernel, as in
        :class:`~gpntk.TrainedEnsemble` with ``(n, m)`` targets).
    :param net: the architecture (:mod:`gpntk.layers`); the model keeps a snapshot of it and of
        its hyperparameters (see :func:`~gpntk.botorch.fit_network` to fit them).
    :param t: the training time in gradient-descent steps, :math:`\ge 0` or ``math.inf``;
        :math:`\tau = \eta t/(n m)` as in :class:`~gpntk.TrainedEnsemble`.
    :param regime: ``"ntk"`` (every layer trained), ``"nngp"`` (the readout only) or ``"ntkgp"``
        (the NTK-GP ensembles of He et al. 2020); see :class:`~gpntk.TrainedEnsemble`.
    :param learning_rate: :math:`\eta`.
    :param diag_reg: the absolute ridge added to the training kernel; in the regimes ``"nngp"`` and
        ``"ntkgp"`` at :math:`t = \infty` it is the observation noise variance of the equivalent GP
        (in the outcome-transformed space), and ``posterior(X, observation_noise=True)`` adds it.
    :param input_transform: a BoTorch ``InputTransform`` (e.g. ``Normalize`` chained with
        :class:`~gpntk.botorch.Center`), fitted on ``train_X`` at construction in train mode and
        applied to every ``X`` given to :meth:`posterior` in eval mode.
    :param outcome_transform: a BoTorch ``OutcomeTransform`` (e.g. ``Standardize(m)``), fitted on
        ``train_Y`` at construction; posteriors are untransformed to the original scale.
    :param chunk_points: the most test points whose joint covariance one ensemble call computes:
        for ``X`` of shape ``(*b, q, d)`` with ``q > 1``, groups of batches of about this many
        points are evaluated together and the ``(q, q)`` blocks kept.

    ``posterior(X)`` for ``X`` ``(*b, q, d)`` is a :class:`~botorch.posteriors.GPyTorchPosterior`
    over ``(*b, q, m)``: the ensemble's joint mean and covariance at each batch of ``q`` points
    (no covariance between batches), outputs independent with the shared covariance
    :math:`\Sigma_t`. Gradients flow to ``X`` (for ``optimize_acqf``), not to the hyperparameters.
    The model has no parameters to train and ``batch_shape`` is ``torch.Size([])``; the
    eigendecomposition of the training kernel is computed once (``solver="eigh"``), so every
    posterior costs only kernels between the test and training points.

    The ensemble's own noise is nil: at :math:`t = \infty` and ``diag_reg = 0`` the posterior
    variance vanishes at the training inputs. Sampling there (e.g. ``qLogNoisyExpectedImprovement``
    at its baseline points) goes through GPyTorch's Cholesky, which adds jitter to a singular
    covariance and says so with a ``NumericalWarning``; a small ``diag_reg`` avoids it.
    """

    ensemble: TrainedEnsemble

    def __init__(
        self,
        train_X: Tensor,
        train_Y: Tensor,
        net: Layer,
        t: float = math.inf,
        regime: Regime = "ntk",
        learning_rate: float = 1.0,
        diag_reg: float = 0.0,
        input_transform: InputTransform | None = None,
        outcome_transform: OutcomeTransform | None = None,
        chunk_points: int = DEFAULT_CHUNK_POINTS,
    ) -> None:
        train_X, train_Y = _check_training_data(train_X, train_Y)
        super().__init__()
        with torch.no_grad():
            transformed_X = train_X
            if input_transform is not None:
                input_transform.to(train_X)
                input_transform.train()  # learnt transforms (e.g. Normalize without bounds) fit here
                transformed_X = input_transform(train_X)
            transformed_Y = train_Y
            if outcome_transform is not None:
                outcome_transform.train()
                transformed_Y, _ = outcome_transform(train_Y, X=transformed_X)
        ensemble = TrainedEnsemble(
            net, transformed_X.detach(), transformed_Y.detach(), learning_rate=learning_rate, diag_reg=diag_reg,
            solver="eigh",
        )
        self._configure(ensemble, t, regime, chunk_points, input_transform, outcome_transform)

    def _configure(
        self,
        ensemble: TrainedEnsemble,
        t: float,
        regime: str,
        chunk_points: int,
        input_transform: InputTransform | None,
        outcome_transform: OutcomeTransform | None,
    ) -> None:
        """Set the ensemble, the time, the regime and the transforms (eval mode)."""
        times, batched = training_times(t)
        if batched:
            raise ValueError("TrainedEnsembleModel takes one training time t (a number or math.inf), not a tensor")
        self._regime: Regime = check_regime(regime, ensemble.net)
        self.ensemble = ensemble
        self._t = times[0]
        self._chunk_points = positive_integer("chunk_points", chunk_points)
        if input_transform is not None:
            self.input_transform = input_transform
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform
        self.eval()

    @classmethod
    def _assemble(
        cls, ensemble: TrainedEnsemble, like: TrainedEnsembleModel, input_transform: InputTransform | None = None,
        outcome_transform: OutcomeTransform | None = None,
    ) -> TrainedEnsembleModel:
        """A model around ``ensemble`` with the settings of ``like`` and the given (fitted) transforms."""
        model = cls.__new__(cls)
        Model.__init__(model)
        model._configure(ensemble, like.t, like.regime, like.chunk_points, input_transform, outcome_transform)
        return model

    # --- settings -----------------------------------------------------------------------------------
    @property
    def t(self) -> float:
        """The training time (steps of gradient descent)."""
        return self._t

    @property
    def regime(self) -> Regime:
        return self._regime

    @property
    def learning_rate(self) -> float:
        return self.ensemble.learning_rate

    @property
    def diag_reg(self) -> float:
        return self.ensemble.diag_reg

    @property
    def chunk_points(self) -> int:
        return self._chunk_points

    @property
    def net(self) -> Layer:
        """A copy of the architecture with the hyperparameters the model uses."""
        return self.ensemble.net

    @property
    def train_inputs_transformed(self) -> Tensor:
        """The training inputs after the input transform, ``(n, d')`` (what the ensemble was trained on)."""
        return self.ensemble.train_x

    @property
    def train_targets_transformed(self) -> Tensor:
        """The training targets after the outcome transform, ``(n, m)``."""
        return self.ensemble.train_y

    @property
    def num_outputs(self) -> int:
        return self.ensemble.num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        """``torch.Size([])``: one model (batched training data is refused at construction)."""
        return torch.Size([])

    @property
    def is_gp_posterior(self) -> bool:
        r"""Whether the ensemble is a Bayesian GP posterior: :math:`t = \infty` and regime ``"nngp"`` or ``"ntkgp"``."""
        return math.isinf(self._t) and self._regime in ("nngp", "ntkgp")

    def _set_transformed_inputs(self) -> None:
        """Nothing to do: the ensemble holds the training inputs transformed at construction."""

    def _revert_to_original_inputs(self) -> None:
        """Nothing to do (see :meth:`_set_transformed_inputs`)."""

    # --- the posterior --------------------------------------------------------------------------------
    def joint_moments(self, X: Tensor) -> tuple[Tensor, Tensor]:
        r"""The ensemble's mean ``(*b, q, m)`` and covariance ``(*b, q, q)`` at transformed inputs ``X`` ``(*b, q, d)``.

        The covariance :math:`\Sigma_t` is shared by the outputs. ``q = 1`` uses the variances
        alone (no test-by-test kernel); ``q > 1`` evaluates groups of batches of at most
        ``chunk_points`` points jointly and keeps the diagonal ``(q, q)`` blocks.
        """
        if X.dim() < 2:
            raise ValueError(f"X must have shape (*batch, q, d), got {tuple(X.shape)}")
        *batch, q, d = X.shape
        m = self.num_outputs
        flat = X.reshape(-1, d)
        count = flat.shape[0] // q if q else 0
        if count == 0:
            return X.new_zeros(*batch, q, m), X.new_zeros(*batch, q, q)
        if q == 1:
            mean, variance = self.ensemble.moments(flat, self._t, self._regime, diag=True)
            return mean.reshape(*batch, 1, m), variance.reshape(*batch, 1, 1)
        per_chunk = max(1, self._chunk_points // q)
        means, covariances = [], []
        for start in range(0, count, per_chunk):
            chunk = flat[start * q : (start + per_chunk) * q]
            c = chunk.shape[0] // q
            mean, cov = self.ensemble.moments(chunk, self._t, self._regime)
            means.append(mean.reshape(c, q, m))
            covariances.append(cov.reshape(c, q, c, q).diagonal(dim1=0, dim2=2).permute(2, 0, 1))
        return torch.cat(means).reshape(*batch, q, m), torch.cat(covariances).reshape(*batch, q, q)

    def _observation_noise(self, observation_noise: bool | Tensor, shape: torch.Size) -> Tensor | None:
        """The noise variances to add, ``(*b, q, m)`` (outcome-transformed space), or None."""
        if isinstance(observation_noise, Tensor):
            if (observation_noise < 0).any():
                raise ValueError("observation_noise must hold variances >= 0")
            try:
                return observation_noise.to(dtype=self.ensemble.train_x.dtype).expand(shape)
            except RuntimeError as error:
                raise ValueError(
                    f"observation_noise of shape {tuple(observation_noise.shape)} does not broadcast to the "
                    f"posterior's (*b, q, m) = {tuple(shape)}"
                ) from error
        if observation_noise is True:
            reference = self.ensemble.train_x
            return torch.full(shape, self.diag_reg, dtype=reference.dtype, device=reference.device)
        if observation_noise is False:
            return None
        raise TypeError(f"observation_noise must be a bool or a tensor, got {type(observation_noise).__name__}")

    def posterior(  # long: checks, moments, noise, distribution, transforms: BoTorch's sequence in one place
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: PosteriorTransform | None = None,
        **kwargs: Any,
    ) -> Posterior:
        r"""The posterior of the trained ensemble's outputs at ``X`` ``(*b, q, d)``.

        :param X: test inputs before the input transform.
        :param output_indices: the outputs to return (default all).
        :param observation_noise: ``False``; ``True`` adds ``diag_reg`` (the noise variance of the
            equivalent GP at :math:`t = \infty`, ``"nngp"``/``"ntkgp"``) to the variances; or a
            tensor of noise variances broadcastable to ``(*b, q, m)``, in the outcome-transformed
            space (BoTorch's convention).
        :param posterior_transform: applied last, as in BoTorch.
        :returns: a :class:`~botorch.posteriors.GPyTorchPosterior` (a ``MultivariateNormal`` for one
            output, a ``MultitaskMultivariateNormal`` of independent outputs otherwise), untransformed
            by the outcome transform.
        """
        if kwargs:
            raise TypeError(f"TrainedEnsembleModel.posterior got unexpected arguments {sorted(kwargs)}")
        self.eval()
        if not torch.is_tensor(X) or X.dim() < 2:
            raise ValueError(f"X must be a tensor of shape (*batch, q, d), got {getattr(X, 'shape', X)!r}")
        X = self.transform_inputs(X)
        mean, cov = self.joint_moments(X)
        noise = self._observation_noise(observation_noise, mean.shape)
        outputs = self._output_indices(output_indices)
        mean = mean[..., outputs]
        if noise is not None:
            noise = noise[..., outputs]
        if len(outputs) == 1:
            covariance = cov if noise is None else cov + torch.diag_embed(noise[..., 0])
            distribution: MultivariateNormal = MultivariateNormal(mean[..., 0], DenseLinearOperator(covariance))
        else:
            covariances = cov.unsqueeze(-3).expand(*cov.shape[:-2], len(outputs), *cov.shape[-2:])
            if noise is not None:
                covariances = covariances + torch.diag_embed(noise.transpose(-1, -2))
            batch = MultivariateNormal(mean.transpose(-1, -2), DenseLinearOperator(covariances))
            distribution = MultitaskMultivariateNormal.from_batch_mvn(batch, task_dim=-1)
        posterior: Posterior = GPyTorchPosterior(distribution)
        if hasattr(self, "outcome_transform"):
            transform = self.outcome_transform
            if output_indices is not None:
                transform = transform.subset_output(outputs)
            posterior = transform.untransform_posterior(posterior, X=X)
        if posterior_transform is not None:
            return posterior_transform(posterior=posterior, X=X)
        return posterior

    def _output_indices(self, output_indices: Sequence[int] | None) -> list[int]:
        m = self.num_outputs
        if output_indices is None:
            return list(range(m))
        indices = list(output_indices)
        if not indices or any(isinstance(i, bool) or not isinstance(i, int) or not -m <= i < m for i in indices):
            raise ValueError(
                f"output_indices must be a non-empty list of indices of the {m} outputs, got {output_indices}"
            )
        return [i % m for i in indices]

    # --- outputs and conditioning ------------------------------------------------------------------
    def subset_output(self, idcs: list[int]) -> TrainedEnsembleModel:
        r"""The model of the outputs ``idcs`` alone, with the same dynamics.

        The time scale is :math:`\tau = \eta t / (n m)`, so a model of :math:`m'` outputs keeps
        every output's :math:`\tau` with the learning rate :math:`\eta m'/m` (the returned model's
        ``learning_rate``); the outputs evolve independently, so the result is exact.
        """
        outputs = self._output_indices(idcs)
        ensemble = self.ensemble
        learning_rate = ensemble.learning_rate * len(outputs) / self.num_outputs
        subset = TrainedEnsemble(
            ensemble.net, ensemble.train_x, ensemble.train_y[:, outputs], learning_rate=learning_rate,
            diag_reg=ensemble.diag_reg, solver="eigh",
        )
        outcome = getattr(self, "outcome_transform", None)
        return type(self)._assemble(
            subset, self, copy.deepcopy(getattr(self, "input_transform", None)),
            None if outcome is None else outcome.subset_output(outputs),
        )

    def condition_on_observations(self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any) -> Model:
        r"""The model conditioned on observations ``Y`` ``(n', m)`` at ``X`` ``(n', d)``: exact where it is defined.

        Defined where the ensemble is a GP posterior (:attr:`is_gp_posterior`: :math:`t = \infty`,
        regime ``"nngp"`` or ``"ntkgp"``): the GP posterior with prior covariance :math:`K` and
        noise variance ``diag_reg``, conditioned on more observations with that noise, is the
        posterior given all the data, i.e. the ensemble trained on the concatenated data, which is
        what is returned (the transforms kept as fitted: ``X`` and ``Y`` are transformed with them in
        eval mode, as BoTorch's GP models do). ``noise`` (outcome-transformed space), if given, must
        equal ``diag_reg``.

        Raises ``UnsupportedError`` elsewhere: in regime ``"ntk"`` the ensemble is not a Bayesian
        posterior (mean from the NTK, covariance from the NNGP prior), and at finite ``t`` more data
        changes the gradient-descent dynamics (the kernel's spectrum and the time scale
        :math:`\eta/(n m)`), so "conditioning" has no meaning beyond training a new ensemble, which
        is ``TrainedEnsembleModel(all_X, all_Y, net, t, ...)``. Batched observations (fantasies,
        ``Y`` of shape ``(s, *b, n', m)``) are refused too: they would need one ensemble per batch.
        """
        if kwargs:
            raise TypeError(f"condition_on_observations got unexpected arguments {sorted(kwargs)}")
        if not self.is_gp_posterior:
            raise UnsupportedError(
                f"condition_on_observations is exact only where the trained ensemble is a GP posterior (t = inf and "
                f"regime 'nngp' or 'ntkgp'); this model has t = {self._t} and regime {self._regime!r}, where more "
                "data changes the training itself (regime 'ntk': mean from the NTK, covariance from the NNGP prior; "
                "finite t: the dynamics depend on all the data). Build TrainedEnsembleModel(all_X, all_Y, net, ...) "
                "for the ensemble trained on more data"
            )
        if X.dim() != 2 or Y.dim() != 2:
            raise UnsupportedError(
                f"TrainedEnsembleModel conditions on unbatched observations X (n', d), Y (n', m) only, got "
                f"{tuple(X.shape)} and {tuple(Y.shape)}; batched observations (fantasies, as in fantasize or "
                "qKnowledgeGradient) would need one ensemble per batch element"
            )
        if Y.shape != (X.shape[0], self.num_outputs):
            raise ValueError(f"Y must have shape (n', m) = ({X.shape[0]}, {self.num_outputs}), got {tuple(Y.shape)}")
        if noise is not None and not torch.allclose(noise, torch.full_like(noise, self.diag_reg), rtol=1e-6, atol=0):
            raise UnsupportedError(
                f"the trained ensemble's observation noise variance is diag_reg = {self.diag_reg}; conditioning on "
                "observations with another noise is not an ensemble trained on them"
            )
        self.eval()
        with torch.no_grad():
            X_new = self.transform_inputs(X)
            Y_new = Y
            if hasattr(self, "outcome_transform"):
                Y_new, _ = self.outcome_transform(Y, X=X_new)
        ensemble = self.ensemble
        data_x = torch.cat([ensemble.train_x, X_new.to(ensemble.train_x)])
        data_y = torch.cat([ensemble.train_y, Y_new.to(ensemble.train_y)])
        refitted = TrainedEnsemble(
            ensemble.net, data_x, data_y, learning_rate=ensemble.learning_rate, diag_reg=ensemble.diag_reg,
            solver="eigh",
        )
        return type(self)._assemble(
            refitted, self, copy.deepcopy(getattr(self, "input_transform", None)),
            copy.deepcopy(getattr(self, "outcome_transform", None)),
        )

    def fantasize(self, X: Tensor, sampler: Any, observation_noise: Tensor | None = None, **kwargs: Any) -> Model:
        """Refused: fantasy models condition on a batch of sampled observations, which needs one ensemble per sample.

        Acquisition functions built on fantasies (``qKnowledgeGradient``,
        ``qNegIntegratedPosteriorVariance``, ...) therefore do not accept this model; those that
        only sample the posterior (``qLogNoisyExpectedImprovement``, ``qLogExpectedImprovement``,
        ``qUpperConfidenceBound``, ...) and the analytic ones do.
        """
        raise UnsupportedError(
            "TrainedEnsembleModel does not support fantasize: fantasies are batched observations (one per "
            "sample), which would need one trained ensemble per sample. Use acquisition functions that sample "
            "the posterior (qLogNoisyExpectedImprovement, qLogExpectedImprovement, analytic ones); at t = inf in "
            "regime 'nngp'/'ntkgp', condition_on_observations on unbatched data is exact"
        )

    def __repr__(self) -> str:
        return (
            f"TrainedEnsembleModel(n={self.ensemble.num_train}, m={self.num_outputs}, t={self._t}, "
            f"regime={self._regime!r}, learning_rate={self.learning_rate}, diag_reg={self.diag_reg})"
        )
