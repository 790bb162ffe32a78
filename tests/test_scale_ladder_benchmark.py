"""benchmarks/scale_ladder.py at a tiny n: every method in fresh processes, the accuracy columns, the table."""

from __future__ import annotations

import json
import math

import pytest
from _benchmarks import load_benchmark

ladder = load_benchmark("scale_ladder.py", "scale_ladder_benchmark")


@pytest.mark.slow
def test_every_method_at_a_tiny_n(tmp_path):
    out, figure = tmp_path / "ladder.json", tmp_path / "ladder.png"
    # max_cholesky_size 100 < n: cg and distributed run GPyTorch's CG path, as at large n
    results = ladder.main(["--n", "240", "--fit-n", "120", "--test", "60", "--m", "40", "--batch", "64",
                           "--max-cholesky-size", "100", "--out", str(out), "--figure", str(figure)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert figure.stat().st_size > 10_000
    rows = {row["method"]: row for row in results["runs"]}
    assert list(rows) == list(ladder.METHODS)
    assert all("error" not in row for row in rows.values()), rows
    hyper = results["hyperparameters"]
    assert hyper["noise"] == pytest.approx(0.01, rel=1e-4)  # fixed at the truth
    for row in rows.values():
        assert row["train_s"] > 0 and row["predict_s"] > 0 and row["process_peak_mib"] > 50
        assert math.isfinite(row["rmse"]) and math.isfinite(row["nll"])
    # the exact methods agree with the dense Cholesky reference (CG, LOVE: to their tolerances)
    for method in ("cg", "distributed"):
        assert rows[method]["reference"] == "dense"
        assert rows[method]["mean_rmse_vs_ref"] < 0.05, method
    # one natural-gradient epoch with step sizes 1/(t+1) lands on Titsias's optimum (4 minibatches)
    assert rows["svgp"]["mean_rmse_vs_titsias"] < 1e-6
    table = ladder.markdown_table(results)
    assert table.count("\n") == 1 + len(rows) and "| svgp | 240 |" in table


def test_problem_test_points_do_not_depend_on_n():
    _, _, xt_small, yt_small = ladder.problem(10, 5, 0.1)
    x, y, xt, yt = ladder.problem(30, 5, 0.1)
    assert x.shape == (30, 16) and y.shape == (30,)
    assert (xt == xt_small).all() and (yt == yt_small).all()
