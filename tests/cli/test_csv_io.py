"""The pieces of ``gpntk fit``: the CSV helpers (``gpntk.cli.csv_io``), the option values and checks."""

import inspect
import io
import math
import subprocess
import sys

import numpy as np
import pytest

from gpntk._validation import check_nonnegative
from gpntk.cli import csv_fit
from gpntk.cli.csv_io import (
    CSVFitError,
    check_distinct_files,
    check_times,
    format_time,
    format_value,
    prediction_table,
    read_table,
    write_predictions,
)
from gpntk.cli.options import DEFAULT_DIAG_REG, DEFAULT_TIMES, parse_time


def test_times_are_parsed_checked_and_formatted():
    assert parse_time("10") == 10.0 and parse_time("inf") == math.inf and parse_time("0.5") == 0.5
    for bad in ("-1", "nan"):
        with pytest.raises(ValueError, match="must be >= 0"):
            parse_time(bad)
    with pytest.raises(ValueError):
        parse_time("soon")
    assert [format_time(t) for t in (100.0, 0.5, math.inf, 0)] == ["100", "0.5", "inf", "0"]
    assert check_times((1, 2.5, math.inf)) == [1.0, 2.5, math.inf]
    with pytest.raises(CSVFitError, match="no training times"):
        check_times([])
    with pytest.raises(CSVFitError, match="must be >= 0"):
        check_times([1.0, -2.0])
    with pytest.raises(CSVFitError, match="time\\(s\\) 100 given twice"):
        check_times([100, 100.0])


def test_read_table_keeps_unused_text_columns_as_nan(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x, note ,y\n1,a,2\n\n3,b,4\n")  # blank lines are skipped, names stripped
    table = read_table(str(path), required=["x", "y"])
    assert table.columns == ["x", "note", "y"]
    np.testing.assert_array_equal(table.select(["y", "x"]), [[2.0, 1.0], [4.0, 3.0]])
    assert np.isnan(table.select(["note"])).all()
    with pytest.raises(CSVFitError, match="line 2, column 'note': 'a' is not a number"):
        read_table(str(path))
    with pytest.raises(CSVFitError, match="no column\\(s\\) 'z'"):
        read_table(str(path), required=["x", "z"])
    (tmp_path / "e.csv").write_text(",y\n1,2\n")
    with pytest.raises(CSVFitError, match="empty column name"):
        read_table(str(tmp_path / "e.csv"))


def test_distinct_files(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("x,y\n1,2\n")
    check_distinct_files(str(tmp_path / "out.csv"), [str(train)])
    with pytest.raises(CSVFitError, match="refusing to overwrite"):
        check_distinct_files(str(tmp_path / "." / "train.csv"), [str(tmp_path / "other.csv"), str(train)])


def test_prediction_table_and_writing(tmp_path, capsys):
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    mean = np.arange(2 * 2 * 2, dtype=np.float64).reshape(2, 2, 2)  # (T, m, k)
    std = mean / 10
    columns, rows = prediction_table(["a", "b"], ["u", "v"], [1.0, math.inf], x, mean, std)
    assert columns == ["a", "b", "mean_u_t1", "std_u_t1", "mean_u_tinf", "std_u_tinf",
                       "mean_v_t1", "std_v_t1", "mean_v_tinf", "std_v_tinf"]
    np.testing.assert_array_equal(rows[:, 2:], np.stack([mean, std], -1).transpose(1, 2, 0, 3).reshape(2, 8))
    stream = io.StringIO()
    write_predictions(stream, columns, rows)
    assert stream.getvalue().splitlines()[1] == ",".join(format_value(v) for v in rows[0])
    write_predictions("-", columns, rows)
    assert capsys.readouterr().out == stream.getvalue()
    write_predictions(str(tmp_path / "p.csv"), columns, rows)
    assert (tmp_path / "p.csv").read_text() == stream.getvalue()
    with pytest.raises(CSVFitError, match="cannot write"):
        write_predictions(str(tmp_path / "missing" / "p.csv"), columns, rows)
    assert format_value(0.1) == "0.1" and float(format_value(1 / 3)) == 1 / 3


def test_check_nonnegative_messages():
    check_nonnegative("a", 0.0)
    check_nonnegative("a", 2)
    for value in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"^a must be a finite number >= 0, got {value}$"):
            check_nonnegative("a", value)
    with pytest.raises(CSVFitError, match="^learning rate must be positive and finite, got 0.0$"):
        check_nonnegative("learning rate", 0.0, strict=True, error=CSVFitError)


def test_score_is_rmse_and_gaussian_nll():
    truth, mean, std = np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]), np.array([0.5, 0.0, 2.0])
    rmse, nll = csv_fit.score(truth, mean, std, 1e-3)
    assert rmse == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3), rel=1e-15)
    s = np.array([0.5, 1e-3, 2.0])
    expected = np.mean(0.5 * np.log(2 * np.pi * s**2) + 0.5 * ((truth - mean) / s) ** 2)
    assert nll == pytest.approx(expected, rel=1e-14)
    big = csv_fit.score(truth * 1e300, mean * 1e300, np.ones(3) * 1e300, 1.0)[0]  # no overflow
    assert big == pytest.approx(rmse * 1e300, rel=1e-14)


def test_fit_csv_signature_and_the_moved_module_alias():
    """``gpntk.cli.csv_fit.fit_csv`` as the README documents it; ``gpntk.csv_fit`` still reaches it."""
    import gpntk

    parameters = inspect.signature(csv_fit.fit_csv).parameters
    assert list(parameters) == [
        "train_path", "targets", "features", "predict_path", "times", "output", "depth", "activation",
        "weight_variance", "bias_variance", "regime", "diag_reg", "learning_rate", "standardize_data", "print_fn",
    ]
    assert parameters["times"].default == DEFAULT_TIMES and parameters["diag_reg"].default == DEFAULT_DIAG_REG
    with pytest.warns(DeprecationWarning, match="gpntk.cli.csv_fit"):
        assert gpntk.csv_fit.fit_csv is csv_fit.fit_csv
    assert csv_fit.CSVFitError is CSVFitError and csv_fit.parse_time is parse_time


@pytest.mark.slow
def test_csv_io_and_options_import_no_torch():
    code = (
        "import sys, gpntk.cli.csv_io, gpntk.cli.options, gpntk.cli.main\n"
        "print(sorted(m for m in ('torch', 'gpytorch') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
