r"""The files of ``gpntk fit``: reading a numeric CSV table, checking the paths, writing predictions.

Conventions (those of :func:`gpntk.cli.csv_fit.fit_csv`):

* cells are read as float64; the cells that are used must be finite numbers (the row, counted as
  the file's line number with the header on line 1, and the column of a bad cell are reported);
* the first row must be a header: a first row of numbers only (a file without a header) is refused,
  as are duplicate column names; a UTF-8 byte-order mark is ignored;
* the output file must not be one of the input files (compared by resolved path and by
  ``os.path.samefile``, so symbolic and hard links count): ``gpntk fit`` never overwrites its input;
* training times must be distinct as they are written in column names (:func:`format_time`): two
  equal times would give two columns of one name;
* numbers are written as ``repr(float(value))``, which reads back to the same float64.

Every problem is a :class:`CSVFitError` whose message names the file, line and column concerned.
This module imports numpy but not torch.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence, TextIO

import numpy as np

__all__ = [
    "CSVFitError", "Table", "read_table", "check_distinct_files", "check_times", "format_time", "format_value",
    "prediction_table", "write_predictions",
]


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
    columns = _read_header(path, rows[0], required)
    checked = set(columns if required is None else required)
    return Table(path, columns, _read_cells(path, columns, rows[1:], checked))


def _read_header(path: str, header: list[str], required: Sequence[str] | None) -> list[str]:
    """The column names of the first row ``header``: not all numbers, none empty or repeated, ``required`` present."""
    columns = [name.strip() for name in header]
    if all(_is_number(name) for name in columns):
        raise CSVFitError(
            f"{path}: the first row {header} holds only numbers; a header row naming the columns is needed "
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
    return columns


def _read_cells(path: str, columns: list[str], rows: list[list[str]], checked: set[str]) -> np.ndarray:
    """The data ``rows`` (file lines 2, 3, ...) as float64 ``(len(rows), len(columns))``, NaN where not a number.

    The cells of the ``checked`` columns must be finite numbers.
    """
    values = np.full((len(rows), len(columns)), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
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
    return values


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


def format_time(t: float) -> str:
    """``t`` as in column names: ``100.0 -> "100"``, ``0.5 -> "0.5"``, ``inf -> "inf"``."""
    if math.isinf(t):
        return "inf"
    if t == int(t):
        return str(int(t))
    return repr(float(t))


def format_value(value: float) -> str:
    """A cell of the predictions file: ``repr(float(value))``, the shortest text that reads back exactly."""
    return repr(float(value))


def prediction_table(
    features: Sequence[str],
    targets: Sequence[str],
    times: Sequence[float],
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """The header and rows of the predictions file.

    :param x: ``(m, d)`` the feature values, in the order of ``features``.
    :param mean: ``(T, m, k)`` and ``std`` ``(T, m, k)``: the predictions at the ``T`` ``times`` for the
        ``k`` ``targets``.
    :returns: the columns (the features, then ``mean_<target>_t<time>`` and ``std_<target>_t<time>``
        for each target and, within it, each time) and the values ``(m, d + 2 T k)``.
    """
    columns = list(features)
    for target in targets:
        for t in times:
            columns += [f"mean_{target}_t{format_time(t)}", f"std_{target}_t{format_time(t)}"]
    blocks = [x]
    for j in range(len(targets)):
        for i in range(len(times)):
            blocks += [mean[i, :, j : j + 1], std[i, :, j : j + 1]]
    return columns, np.concatenate(blocks, axis=1)


def write_predictions(output: str | TextIO, columns: Sequence[str], rows: np.ndarray) -> None:
    """Write the header ``columns`` and the ``rows`` to ``output``: a path, ``"-"`` for stdout, or a text stream."""

    def write(stream: TextIO) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([format_value(v) for v in row])

    if output == "-":
        write(sys.stdout)
        sys.stdout.flush()
    elif isinstance(output, str):
        try:
            with open(output, "w", newline="") as handle:
                write(handle)
        except OSError as error:
            raise CSVFitError(f"cannot write {output}: {error}") from None
    else:
        write(output)
