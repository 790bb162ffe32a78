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
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO, cast

import numpy as np
import torch

from .. import layers as L
from .._quiet_import import stdout_to_stderr
from ..activations import ACTIVATION_NAMES
from ..errors import NumericalWarning
from ..posterior import REGIMES, Regime, TrainedEnsemble
from .options import DEFAULT_DIAG_REG, DEFAULT_TIMES

__all__ = [
    "CSVFitError", "Table", "read_table", "format_time", "parse_time", "standardize", "fit_csv",
    "check_distinct_files", "check_times",
    "DEFAULT_TIMES", "DEFAULT_DIAG_REG", "DEFAULT_LEARNING_RATE_FRACTION", "NLL_STD_FLOOR",
]

#: the default learning rate is this fraction of ``TrainedEnsemble.max_learning_rate(regime)``
DEFAULT_LEARNING_RATE_FRACTION = 0.5
#: in the printed negative log likelihood the std is floored at this fraction of the target's scale
NLL_STD_FLOOR = 1e-12
#: the fewest training rows accepted
MIN_TRAIN_ROWS = 2


class CSVFitError(ValueError):
    """A problem with the user's files, columns or options; the message names it."""


@dataclass
class Table:
    """A numeric CSV table: ``columns`` (the header) and ``values`` ``(rows, len(columns))`` float64."""

    path: str
    columns: list[str]
    values: np.ndarray

    def select(self, names: Sequence[str]) -> np.ndarray:
        """The named columns, ``(rows, len(names))``."""
        return self.values[:, [self.columns.index(name) for name in names]]


def read_table(path: str, required: Sequence[str] | None = None) -> Table:
    """Read a CSV file with a header row into a float64 :class:`Table`.

    Only the ``required`` columns (all columns if None) must hold finite numbers; others are kept
    as NaN-filled columns if they are not numeric. Raises :class:`CSVFitError` for a missing or
    empty file, a duplicated or missing column, a ragged row or a non-numeric / NaN / infinite cell
    (naming its line number and column).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: drop a byte-order mark
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise CSVFitError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CSVFitError(f"cannot read {path}: {error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise CSVFitError(f"{path} is empty (a header row naming the columns is needed)")
    columns = [name.strip() for name in rows[0]]
    if all(_is_number(name) for name in columns):
        raise CSVFitError(
            f"{path}: the first row {rows[0]} holds only numbers; a header row naming the columns is needed "
            "(add one, e.g. x1,x2,y)"
        )
    seen = set()
    for name in columns:
        if not name:
            raise CSVFitError(f"{path}: the header has an empty column name")
        if name in seen:
            raise CSVFitError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
    if required is not None:
        missing = [name for name in required if name not in columns]
        if missing:
            raise CSVFitError(f"{path}: no column(s) {', '.join(map(repr, missing))}; columns are {columns}")
    checked = set(columns if required is None else required)
    values = np.full((len(rows) - 1, len(columns)), np.nan, dtype=np.float64)
    for i, row in enumerate(rows[1:]):
        line = i + 2
        if len(row) != len(columns):
            raise CSVFitError(f"{path}, line {line}: {len(row)} cells but the header has {len(columns)} columns")
        for j, (name, cell) in enumerate(zip(columns, row)):
            try:
                value = float(cell)
            except ValueError:
                if name in checked:
                    raise CSVFitError(f"{path}, line {line}, column {name!r}: {cell!r} is not a number") from None
                continue
            if name in checked and not math.isfinite(value):
                raise CSVFitError(f"{path}, line {line}, column {name!r}: {cell!r} is not a finite number")
            values[i, j] = value
    return Table(path, columns, values)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_distinct_files(output: str, inputs: Sequence[str]) -> None:
    """Raise :class:`CSVFitError` if the ``output`` path names one of the ``inputs`` files.

    Compared by resolved path (``os.path.realpath``: ``./train.csv``, symbolic links) and, where
    both exist, by ``os.path.samefile`` (hard links).
    """
    target = os.path.realpath(output)
    for path in inputs:
        same = os.path.realpath(path) == target
        if not same and os.path.exists(output) and os.path.exists(path):
            try:
                same = os.path.samefile(output, path)
            except OSError:
                same = False
        if same:
            raise CSVFitError(
                f"the output {output!r} is the input file {path!r}; refusing to overwrite it (choose another --output)"
            )


def check_times(times: Sequence[float]) -> list[float]:
    """The training times as floats: non-empty, each ``>= 0`` or inf, no two equal."""
    times = [float(t) for t in times]
    if not times:
        raise CSVFitError("no training times given")
    for t in times:
        if math.isnan(t) or t < 0:
            raise CSVFitError(f"training times must be >= 0 (or inf), got {t}")
    names = [format_time(t) for t in times]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CSVFitError(f"training time(s) {', '.join(repeated)} given twice; each time gives its own columns")
    return times


def parse_time(text: str) -> float:
    """A training time from the command line: a non-negative float or ``inf``; ValueError otherwise."""
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(f"training times must be >= 0 (or inf), got {text!r}")
    return value


def format_time(t: float) -> str:
    """``t`` as in column names: ``100.0 -> "100"``, ``0.5 -> "0.5"``, ``inf -> "inf"``."""
    if math.isinf(t):
        return "inf"
    if t == int(t):
        return str(int(t))
    return repr(float(t))


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


def _format_value(value: float) -> str:
    return repr(float(value))


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
    times = check_times(times)
    if isinstance(output, str) and output != "-":
        check_distinct_files(output, [train_path] + ([predict_path] if predict_path is not None else []))
    if regime not in REGIMES:
        raise CSVFitError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    if activation.lower() not in ACTIVATION_NAMES:
        raise CSVFitError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATION_NAMES)}")
    if not (math.isfinite(diag_reg) and diag_reg >= 0):
        raise CSVFitError(f"diag_reg must be a finite number >= 0, got {diag_reg}")
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise CSVFitError(f"learning rate must be positive and finite, got {learning_rate}")

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
    to_tensor: Callable[[Any], torch.Tensor] = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):
        train_x = to_tensor((x_train - x_mean) / x_scale)
        train_y = to_tensor((y_train - y_mean) / y_scale)
        test_x = to_tensor((x_test - x_mean) / x_scale)
    for name, array in (("training features", train_x), ("training targets", train_y), ("prediction features", test_x)):
        if not bool(torch.isfinite(array).all()):
            raise CSVFitError(
                f"the {name} are not finite after standardization (values too large for float64 arithmetic); "
                "rescale the data"
            )
    if len(targets) == 1:
        train_y = train_y.squeeze(-1)

    # whatever a dependency prints while computing (e.g. a KeOps compilation notice) goes to
    # stderr when stdout carries the CSV
    quiet = stdout_to_stderr() if output == "-" else contextlib.nullcontext()
    stdout = sys.stdout
    try:
        with quiet:
            net = L.mlp(depth, activation, weight_variance=weight_variance, bias_variance=bias_variance)
            post = TrainedEnsemble(net, train_x, train_y, learning_rate=learning_rate or 1.0, diag_reg=diag_reg)
            limit = post.max_learning_rate(cast(Regime, regime))  # checked above
            if learning_rate is None:
                # only the time scale depends on the learning rate; nothing cached needs recomputing
                post.learning_rate = DEFAULT_LEARNING_RATE_FRACTION * limit
            elif learning_rate >= limit:
                warnings.warn(
                    f"learning rate {learning_rate:.6g} is at or above the largest stable one for regime {regime}, "
                    f"{limit:.6g} (= 2nk / largest eigenvalue of the training kernel): discrete gradient descent "
                    "diverges at this rate; the predictions are those of the continuous-time flow with times "
                    "counted in steps of this size",
                    NumericalWarning,
                    stacklevel=2,
                )
            moments = post.moments(
                test_x, t=torch.tensor(times, dtype=torch.float64), regime=cast(Regime, regime), diag=True
            )
    except (ValueError, TypeError) as error:
        raise CSVFitError(str(error)) from None
    except torch.linalg.LinAlgError as error:  # type: ignore[attr-defined]  # exported at runtime, not in the stub
        raise CSVFitError(
            f"the training kernel could not be decomposed ({error}); the data may be too large for float64 "
            "arithmetic" + ("" if standardize_data else " without standardization") + "; nothing was written"
        ) from None
    except FloatingPointError as error:
        raise CSVFitError(
            f"{error} The data are too large for float64 arithmetic"
            + ("" if standardize_data else " without standardization") + "; nothing was written"
        ) from None
    mean_t, var = moments
    mean = mean_t.detach().numpy().reshape(len(times), -1, len(targets))  # (T, m, k)
    std = var.detach().clamp_min(0).sqrt().numpy()[..., None]  # (T, m, 1): shared by the targets
    with np.errstate(over="ignore", invalid="ignore"):
        mean = mean * y_scale + y_mean
        std = std * y_scale  # (T, m, k)
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    if bad.any():
        raise CSVFitError(
            f"{int(bad.sum())} of {bad.size} predictions are not finite (NaN or infinite); the data may be too "
            "large for float64 arithmetic" + ("" if standardize_data else " without standardization")
            + "; nothing was written"
        )

    columns = list(features)
    for j, target in enumerate(targets):
        for t in times:
            columns += [f"mean_{target}_t{format_time(t)}", f"std_{target}_t{format_time(t)}"]
    blocks = [x_test]
    for j in range(len(targets)):
        for i in range(len(times)):
            blocks += [mean[i, :, j : j + 1], std[i, :, j : j + 1]]
    table = np.concatenate(blocks, axis=1)

    def write(stream: TextIO) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for row in table:
            writer.writerow([_format_value(v) for v in row])

    if output == "-":
        write(stdout)
        stdout.flush()
    elif isinstance(output, str):
        try:
            with open(output, "w", newline="") as handle:
                write(handle)
        except OSError as error:
            raise CSVFitError(f"cannot write {output}: {error}") from None
    else:
        write(output)

    where = predict_path or f"the {len(x_test)} training points"
    print_fn(
        f"fitted {len(x_train)} rows of {train_path} ({len(features)} feature(s) -> {', '.join(targets)}) with an "
        f"infinite ensemble of depth-{depth} {activation} MLPs, regime {regime}, learning rate "
        f"{post.learning_rate:.6g}, diag_reg {diag_reg:g}; predictions at {where} written to "
        f"{'stdout' if output == '-' else output if isinstance(output, str) else 'the stream'}"
    )
    metrics: dict[tuple[str, str], tuple[float, float]] = {}
    if test_targets:
        truth = test.select(test_targets)
        kind = "test" if predict_path is not None else "train"
        print_fn(
            f"{'target':>12s} {'t':>8s} {kind + ' RMSE':>11s} {'mean NLL':>11s}   (std: ensemble spread only, no noise)"
        )
        for jj, target in enumerate(test_targets):
            j = targets.index(target)
            for i, t in enumerate(times):
                err = truth[:, jj] - mean[i, :, j]
                peak = float(np.abs(err).max()) or 1.0  # sqrt(mean(err²)) without overflow
                rmse = peak * float(np.sqrt(np.mean((err / peak) ** 2)))
                s = np.maximum(std[i, :, j], NLL_STD_FLOOR * y_scale[j])
                nll = float(np.mean(0.5 * math.log(2 * math.pi) + np.log(s) + 0.5 * (err / s) ** 2))
                metrics[(target, format_time(t))] = (rmse, nll)
                print_fn(f"{target:>12s} {format_time(t):>8s} {rmse:11.4g} {nll:11.4g}")
    return {"mean": mean, "std": std, "learning_rate": post.learning_rate, "columns": columns, "metrics": metrics}
