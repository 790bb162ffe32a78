r"""``gpntk fit``: fit a CSV file with a trained ensemble of infinitely wide MLPs and write predictions.

``gpntk fit train.csv --target y --predict test.csv --times 10 100 inf --output predictions.csv``
reads a CSV file with a header row, trains (in closed form) an infinite ensemble of infinitely
wide networks ``mlp(depth, activation, weight_variance, bias_variance)`` by gradient descent on
the target column(s) and writes, for every requested training time :math:`t` (in gradient-descent
steps), the ensemble's mean and standard deviation at the prediction points
(:meth:`gpntk.TrainedEnsemble.moments` with ``diag=True``).

Conventions:

* float64 throughout; cells must be finite numbers (the row, counted as the file's line number with
  the header on line 1, and the column of a bad cell are reported);
* the first row must be a header: a first row of numbers only (a file without a header) is refused,
  as are duplicate column names; a UTF-8 byte-order mark is ignored;
* the output file must not be one of the input files (compared by resolved path and by
  ``os.path.samefile``, so symbolic and hard links count): ``gpntk fit`` never overwrites its input;
* training times must be distinct (two equal times would give two columns of one name);
* a prediction that is not finite (data too large for float64 arithmetic, e.g. values near
  1e200 without standardization) is an error (:class:`CSVFitError`, exit status 2), never written;
* features and targets are standardized with the training set's mean and standard deviation
  (a constant column is only centred) unless ``standardize=False``; predictions are mapped back to
  the original units: ``mean * y_std + y_mean`` and ``std * y_std``;
* ``std`` is the spread of the ensemble's outputs over random initialisations, the epistemic
  uncertainty only: there is no observation-noise term, and as :math:`t \to \infty` it vanishes at
  the training points (up to ``diag_reg``);
* ``diag_reg`` is absolute, in the units of the (standardized) kernel, as for
  :class:`~gpntk.TrainedEnsemble`; default :data:`DEFAULT_DIAG_REG`;
* the learning rate defaults to ``0.5 * post.max_learning_rate(regime)`` =
  :math:`nk/\lambda_{\max}(G)`, half the largest stable one, so that one step of time shrinks the
  residual along the top eigenvector of the training kernel by the factor :math:`e^{-1}` and the
  times mean the same for any number of targets ``k`` or points ``n``.

:func:`fit_csv` runs these steps, in this order (so a problem is reported before any work):
:func:`choose_columns` (read the training file), :func:`check_options`, :func:`prepare_data`
(read the prediction file, standardize), :func:`predict` (build the network and the ensemble,
predict, back to the original units), then :func:`gpntk.cli.csv_io.write_predictions`,
:func:`summary` and :func:`print_metrics`. Reading and writing the files is :mod:`gpntk.cli.csv_io`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO, cast

import numpy as np
import torch
from torch import Tensor

from .. import layers as L
from .._progress import progress_bar
from .._quiet_import import stdout_to_stderr
from .._validation import check_nonnegative
from ..activations import ACTIVATION_NAMES
from ..errors import NumericalWarning
from ..posterior import REGIMES, Regime, TrainedEnsemble
from .csv_io import (
    CSVFitError,
    Table,
    check_distinct_files,
    check_times,
    format_time,
    prediction_table,
    read_table,
    write_predictions,
)
from .options import DEFAULT_DIAG_REG, DEFAULT_TIMES, parse_time

__all__ = [
    # CSVFitError ... check_times and parse_time live in csv_io and options; csv_fit had them before
    "CSVFitError", "Table", "read_table", "format_time", "parse_time", "standardize", "fit_csv",
    "check_distinct_files", "check_times", "choose_columns", "check_options", "prepare_data", "predict",
    "summary", "print_metrics", "score", "EnsembleOptions", "FitData",
    "DEFAULT_TIMES", "DEFAULT_DIAG_REG", "DEFAULT_LEARNING_RATE_FRACTION", "NLL_STD_FLOOR", "MIN_TRAIN_ROWS",
]

#: the default learning rate is this fraction of ``TrainedEnsemble.max_learning_rate(regime)``
DEFAULT_LEARNING_RATE_FRACTION = 0.5
#: in the printed negative log likelihood the std is floored at this fraction of the target's scale
NLL_STD_FLOOR = 1e-12
#: the fewest training rows accepted
MIN_TRAIN_ROWS = 2


@dataclass(frozen=True)
class EnsembleOptions:
    """The network and training options of one fit, checked (see :func:`fit_csv` and :func:`check_options`).

    The network is ``mlp(depth, activation, weight_variance=..., bias_variance=...)``; the ensemble
    is trained in ``regime`` with the ridge ``diag_reg`` at ``learning_rate`` (None: the default,
    :data:`DEFAULT_LEARNING_RATE_FRACTION` of the largest stable one); ``standardize`` says whether
    the data are standardized (the messages of data too large for float64 arithmetic say so).
    """

    depth: int
    activation: str
    weight_variance: float
    bias_variance: float
    regime: Regime
    diag_reg: float
    learning_rate: float | None
    standardize: bool


@dataclass(frozen=True)
class FitData:
    """The tables and columns of one fit, and the standardized float64 tensors it trains and predicts on.

    ``test`` is the prediction table (the training table without a prediction file) and
    ``test_targets`` the targets it holds numbers for (the errors are reported for these).
    ``x_test`` ``(m, d)`` holds the prediction features in the file's units. ``train_x`` ``(n, d)``,
    ``train_y`` (``(n,)`` for one target, ``(n, k)`` for ``k``) and ``test_x`` ``(m, d)`` are
    standardized; ``y_mean``, ``y_scale`` ``(k,)`` map predictions back: ``mean * y_scale + y_mean``.
    """

    train: Table
    test: Table
    features: list[str]
    targets: list[str]
    test_targets: list[str]
    x_test: np.ndarray
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    y_mean: np.ndarray
    y_scale: np.ndarray


def standardize(train: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    r"""Column means and scales ``(d,)``, ``(d,)`` of ``train`` ``(n, d)``; zeros and ones if not ``enabled``.

    The scale is the (population) standard deviation, 1 for a constant column. Both are computed
    after dividing each column by its largest magnitude :math:`m`, as
    :math:`\mu = m\,\mathrm{mean}(x/m)` and :math:`s = m\,\mathrm{std}(x/m)`, so that no
    intermediate overflows for any finite data (the plain sum of squares overflows near 1e154).
    """
    if not enabled:
        return np.zeros(train.shape[1]), np.ones(train.shape[1])
    peak = np.abs(train).max(axis=0)
    peak = np.where(peak > 0, peak, 1.0)
    unit = train / peak
    mean = unit.mean(axis=0) * peak
    scale = unit.std(axis=0) * peak
    return mean, np.where(scale > 0, scale, 1.0)


def fit_csv(
    train_path: str,
    targets: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    predict_path: str | None = None,
    times: Sequence[float] = DEFAULT_TIMES,
    output: str | TextIO = "predictions.csv",
    depth: int = 3,
    activation: str = "relu",
    weight_variance: float = 2.0,
    bias_variance: float = 0.1,
    regime: str = "ntk",
    diag_reg: float = DEFAULT_DIAG_REG,
    learning_rate: float | None = None,
    standardize_data: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    r"""Fit ``train_path`` and write predictions at ``predict_path`` (or the training points).

    Raises :class:`CSVFitError` for bad files, columns or options, an ``output`` that is one of the
    input files, and predictions that are not finite; warns (:class:`~gpntk.NumericalWarning`) when
    ``learning_rate`` is at or above the largest stable one, ``max_learning_rate(regime)``.

    :param targets: target column names (default: the last column).
    :param features: input column names (default: every column not a target).
    :param times: training times in gradient-descent steps, ``>= 0`` or ``math.inf``.
    :param output: a path, ``"-"`` for stdout, or an open text stream. Columns: the features, then
        ``mean_<target>_t<time>`` and ``std_<target>_t<time>`` for each target and time
        (:func:`format_time`), in original units.
    :param learning_rate: :math:`\eta`; None for ``0.5 * max_learning_rate(regime)``.
    :param standardize_data: standardize features and targets with the training statistics.
    :param print_fn: where the summary goes and, if the prediction file has the targets (or for the
        training points without one), the RMSE and mean Gaussian negative log likelihood per target
        and time (std floored at :data:`NLL_STD_FLOOR` times the target's scale).
    :returns: ``{"mean": (T, m, k), "std": (T, m, k), "learning_rate", "columns", "metrics"}``,
        the arrays in original units.
    """
    train, targets, features = choose_columns(train_path, targets, features)
    times = check_times(times)
    if isinstance(output, str) and output != "-":
        check_distinct_files(output, [train_path] + ([predict_path] if predict_path is not None else []))
    options = check_options(
        depth, activation, weight_variance, bias_variance, regime, diag_reg, learning_rate, standardize_data
    )
    data = prepare_data(train, predict_path, features, targets, standardize_data)
    # the warning of a too large learning rate points at the caller of fit_csv (predict's stacklevel)
    post, mean, std = predict(data, times, options, quiet=output == "-")
    columns, rows = prediction_table(features, targets, times, data.x_test, mean, std)
    write_predictions(output, columns, rows)
    print_fn(summary(data, options, post.learning_rate, train_path, predict_path, output))
    metrics = print_metrics(data, times, mean, std, predict_path is not None, print_fn)
    return {"mean": mean, "std": std, "learning_rate": post.learning_rate, "columns": columns, "metrics": metrics}


def choose_columns(
    train_path: str, targets: Sequence[str] | None, features: Sequence[str] | None
) -> tuple[Table, list[str], list[str]]:
    """Read the training file and choose its ``targets`` and ``features`` columns.

    The defaults: the last column is the target, every other column a feature. Raises
    :class:`CSVFitError` for a column named twice or both a feature and a target, a missing or
    non-numeric used column and fewer than :data:`MIN_TRAIN_ROWS` rows.

    :returns: the training table (its used columns checked), the targets and the features.
    """
    train = read_table(train_path, required=None if targets is None and features is None else
                       list(targets or []) + list(features or []))
    if targets is None:
        targets = [train.columns[-1]]
    targets = list(targets)
    if not targets:
        raise CSVFitError("no target column given")
    if len(set(targets)) != len(targets):
        raise CSVFitError(f"a target column is named twice: {targets}")
    if features is None:
        features = [name for name in train.columns if name not in targets]
    features = list(features)
    if not features:
        raise CSVFitError(f"{train_path}: no feature columns left besides the target(s) {targets}")
    if len(set(features)) != len(features):
        raise CSVFitError(f"a feature column is named twice: {features}")
    overlap = [name for name in features if name in targets]
    if overlap:
        raise CSVFitError(f"column(s) {overlap} are both features and targets")
    # check the used columns of the training file (read_table checked all of them without names given)
    train = read_table(train_path, required=features + targets)
    if train.values.shape[0] < MIN_TRAIN_ROWS:
        raise CSVFitError(f"{train_path}: {train.values.shape[0]} data row(s); at least {MIN_TRAIN_ROWS} are needed")
    return train, targets, features


def check_options(
    depth: int,
    activation: str,
    weight_variance: float,
    bias_variance: float,
    regime: str,
    diag_reg: float,
    learning_rate: float | None,
    standardize_data: bool,
) -> EnsembleOptions:
    """The network and training options of :func:`fit_csv`, checked.

    Raises :class:`CSVFitError` for an unknown ``regime`` or ``activation``, a ``diag_reg`` that is
    not a finite number ``>= 0`` or a ``learning_rate`` that is not positive and finite. ``depth``
    and the variances are checked when the network is built (:func:`predict`).
    """
    if regime not in REGIMES:
        raise CSVFitError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    if activation.lower() not in ACTIVATION_NAMES:
        raise CSVFitError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATION_NAMES)}")
    check_nonnegative("diag_reg", diag_reg, error=CSVFitError)
    if learning_rate is not None:
        check_nonnegative("learning rate", learning_rate, strict=True, error=CSVFitError)
    return EnsembleOptions(
        depth, activation, weight_variance, bias_variance, cast(Regime, regime), diag_reg, learning_rate,
        standardize_data,
    )


def prepare_data(
    train: Table, predict_path: str | None, features: list[str], targets: list[str], standardize_data: bool
) -> FitData:
    """Read the prediction file (the training rows without one) and standardize features and targets.

    Raises :class:`CSVFitError` for a prediction file without rows or a feature column, and for data
    that are not finite once standardized (values too large for float64 arithmetic).
    """
    if predict_path is not None:
        test = read_table(predict_path, required=features)
        if test.values.shape[0] < 1:
            raise CSVFitError(f"{predict_path}: no data rows to predict at")
        test_targets = [name for name in targets if name in test.columns]
        if test_targets and np.isnan(test.select(test_targets)).any():
            test_targets = []  # non-numeric targets in the prediction file: no error report
    else:
        test, test_targets = train, list(targets)
    x_train, y_train, x_test = train.select(features), train.select(targets), test.select(features)
    x_mean, x_scale = standardize(x_train, standardize_data)
    y_mean, y_scale = standardize(y_train, standardize_data)
    with np.errstate(over="ignore", invalid="ignore"):
        train_x = torch.as_tensor((x_train - x_mean) / x_scale, dtype=torch.float64)
        train_y = torch.as_tensor((y_train - y_mean) / y_scale, dtype=torch.float64)
        test_x = torch.as_tensor((x_test - x_mean) / x_scale, dtype=torch.float64)
    for name, array in (("training features", train_x), ("training targets", train_y), ("prediction features", test_x)):
        if not bool(torch.isfinite(array).all()):
            raise CSVFitError(
                f"the {name} are not finite after standardization (values too large for float64 arithmetic); "
                "rescale the data"
            )
    if len(targets) == 1:
        train_y = train_y.squeeze(-1)
    return FitData(train, test, features, targets, test_targets, x_test, train_x, train_y, test_x, y_mean, y_scale)


def predict(
    data: FitData, times: list[float], options: EnsembleOptions, quiet: bool
) -> tuple[TrainedEnsemble, np.ndarray, np.ndarray]:
    """Train the ensemble of ``mlp`` networks on ``data`` and predict at its prediction points.

    Warns (:class:`~gpntk.NumericalWarning`, attributed to the caller of :func:`fit_csv`) of a
    learning rate at or above the largest stable one. With ``quiet`` whatever a dependency prints
    (e.g. a KeOps compilation notice) goes to stderr: stdout carries the CSV.

    :returns: the ensemble and the mean and std ``(T, m, k)`` in the targets' units (the std is
        shared by the targets); :class:`CSVFitError` if the library refuses the data or options, or
        if a prediction is not finite.
    """
    try:
        # three steps: the ensemble, its training kernel's spectrum (the largest stable rate), the predictions
        with stdout_to_stderr() if quiet else contextlib.nullcontext(), progress_bar(3, "gpntk fit", "step") as bar:
            net = L.mlp(
                options.depth, options.activation, weight_variance=options.weight_variance,
                bias_variance=options.bias_variance,
            )
            post = TrainedEnsemble(
                net, data.train_x, data.train_y, learning_rate=options.learning_rate or 1.0, diag_reg=options.diag_reg
            )
            bar.update(1)
            limit = post.max_learning_rate(options.regime)
            bar.update(1)
            if options.learning_rate is None:
                # only the time scale depends on the learning rate; nothing cached needs recomputing
                post.learning_rate = DEFAULT_LEARNING_RATE_FRACTION * limit
            elif options.learning_rate >= limit:
                warnings.warn(
                    f"learning rate {options.learning_rate:.6g} is at or above the largest stable one for regime "
                    f"{options.regime}, {limit:.6g} (= 2nk / largest eigenvalue of the training kernel): discrete "
                    "gradient descent diverges at this rate; the predictions are those of the continuous-time "
                    "flow with times counted in steps of this size",
                    NumericalWarning,
                    stacklevel=3,  # predict <- fit_csv <- its caller
                )
            moments = post.moments(
                data.test_x, t=torch.tensor(times, dtype=torch.float64), regime=options.regime, diag=True
            )
            bar.update(1)
    except (ValueError, TypeError) as error:
        raise CSVFitError(str(error)) from None
    except torch.linalg.LinAlgError as error:  # type: ignore[attr-defined]  # exported at runtime, not in the stub
        raise CSVFitError(
            f"the training kernel could not be decomposed ({error}); the data may be too large for float64 "
            "arithmetic" + _nothing_written(options.standardize)
        ) from None
    except FloatingPointError as error:
        raise CSVFitError(
            f"{error} The data are too large for float64 arithmetic" + _nothing_written(options.standardize)
        ) from None
    mean, std = _original_units(moments, data, len(times), options.standardize)
    return post, mean, std


def _original_units(
    moments: tuple[Tensor, Tensor], data: FitData, num_times: int, standardize_data: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The moments as mean and std ``(T, m, k)`` in the targets' units; :class:`CSVFitError` if one is not finite.

    ``moments`` are those of ``TrainedEnsemble.moments(..., diag=True)`` at ``num_times`` times: the
    means ``(T, m)`` (one target) or ``(T, m k)``, the variances ``(T, m)``, shared by the targets.
    """
    mean_t, var = moments
    mean = mean_t.detach().numpy().reshape(num_times, -1, len(data.targets))  # (T, m, k)
    std = var.detach().clamp_min(0).sqrt().numpy()[..., None]  # (T, m, 1): shared by the targets
    with np.errstate(over="ignore", invalid="ignore"):
        mean = mean * data.y_scale + data.y_mean
        std = std * data.y_scale  # (T, m, k)
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    if bad.any():
        raise CSVFitError(
            f"{int(bad.sum())} of {bad.size} predictions are not finite (NaN or infinite); the data may be too "
            "large for float64 arithmetic" + _nothing_written(standardize_data)
        )
    return mean, std


def _nothing_written(standardize_data: bool) -> str:
    """The end of the messages of data too large for float64 arithmetic."""
    return ("" if standardize_data else " without standardization") + "; nothing was written"


def summary(
    data: FitData,
    options: EnsembleOptions,
    learning_rate: float,
    train_path: str,
    predict_path: str | None,
    output: str | TextIO,
) -> str:
    """The line :func:`fit_csv` prints: what was fitted, how, and where the predictions went."""
    where = predict_path or f"the {len(data.x_test)} training points"
    written_to = "stdout" if output == "-" else output if isinstance(output, str) else "the stream"
    return (
        f"fitted {len(data.train.values)} rows of {train_path} ({len(data.features)} feature(s) -> "
        f"{', '.join(data.targets)}) with an infinite ensemble of depth-{options.depth} {options.activation} MLPs, "
        f"regime {options.regime}, learning rate {learning_rate:.6g}, diag_reg {options.diag_reg:g}; predictions "
        f"at {where} written to {written_to}"
    )


def print_metrics(
    data: FitData,
    times: Sequence[float],
    mean: np.ndarray,
    std: np.ndarray,
    held_out: bool,
    print_fn: Callable[[str], None],
) -> dict[tuple[str, str], tuple[float, float]]:
    """Print the RMSE and mean NLL (:func:`score`) per target of ``data.test_targets`` and time.

    ``mean``, ``std`` ``(T, m, k)`` are the predictions in the targets' units; ``held_out`` says the
    truth is a prediction file's ("test RMSE"), not the training rows ("train RMSE").

    :returns: ``{(target, format_time(t)): (rmse, nll)}``, empty without test targets.
    """
    metrics: dict[tuple[str, str], tuple[float, float]] = {}
    if not data.test_targets:
        return metrics
    truth = data.test.select(data.test_targets)
    kind = "test" if held_out else "train"
    print_fn(
        f"{'target':>12s} {'t':>8s} {kind + ' RMSE':>11s} {'mean NLL':>11s}   (std: ensemble spread only, no noise)"
    )
    for jj, target in enumerate(data.test_targets):
        j = data.targets.index(target)
        for i, t in enumerate(times):
            rmse, nll = score(truth[:, jj], mean[i, :, j], std[i, :, j], NLL_STD_FLOOR * data.y_scale[j])
            metrics[(target, format_time(t))] = (rmse, nll)
            print_fn(f"{target:>12s} {format_time(t):>8s} {rmse:11.4g} {nll:11.4g}")
    return metrics


def score(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, std_floor: float) -> tuple[float, float]:
    r"""The RMSE and the mean Gaussian negative log likelihood of predictions of ``truth``, all ``(m,)``.

    With :math:`e = y - \mu`: :math:`\sqrt{\mathrm{mean}(e^2)}`, computed as
    :math:`p\sqrt{\mathrm{mean}((e/p)^2)}` with :math:`p = \max|e|` so that it does not overflow, and
    :math:`\mathrm{mean}(\tfrac12\log 2\pi + \log s + \tfrac12 (e/s)^2)` with :math:`s = \max(\sigma,
    \text{std\_floor})`.
    """
    err = truth - mean
    peak = float(np.abs(err).max()) or 1.0  # sqrt(mean(err²)) without overflow
    rmse = peak * float(np.sqrt(np.mean((err / peak) ** 2)))
    s = np.maximum(std, std_floor)
    nll = float(np.mean(0.5 * math.log(2 * math.pi) + np.log(s) + 0.5 * (err / s) ** 2))
    return rmse, nll
