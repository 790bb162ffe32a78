"""benchmarks/mll_step.py at a tiny n: every kind on both paths, ratios, the evaluation counter, the JSON."""

from __future__ import annotations

import json
import math

import pytest
from _benchmarks import load_benchmark

import gpntk.kernels.backends as backends
import gpntk.kernels.dense as dense
from gpntk.kernels.blockwise import BlockwiseKernelOperator

mll_step = load_benchmark("mll_step.py", "mll_step_benchmark")


def test_smoke_every_kind_on_both_paths(tmp_path):
    pytest.importorskip("botorch")  # the "ibnn" kind is BoTorch's kernel (an optional extra)
    out = tmp_path / "mll_step.json"
    evaluate, products = (dense.evaluate, dense.evaluate_output), vars(BlockwiseKernelOperator)["_products"]
    report = mll_step.main(["--n", "120", "--repeats", "1", "--mcs-cg", "50", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [(row["n"], row["path"], row["max_cholesky_size"]) for row in report["results"]] == [
        (120, "cholesky", 100_000), (120, "cg", 50)]
    for row in report["results"]:
        # importing BoTorch (the ibnn kind) turned GPyTorch's fast computations off; every step ran with them on
        assert row["gpytorch_settings"]["fast_log_prob"] and row["gpytorch_settings"]["fast_solves"]
        assert row["gpytorch_settings"]["max_cholesky_size"] == row["max_cholesky_size"]
        kinds = row["kinds"]
        assert list(kinds) == ["rbf", "nngp", "ntk", "ibnn"]
        assert kinds["rbf"]["ratio_to_rbf"] == 1.0
        for kind, summary in kinds.items():
            assert summary["steps"] == 2 and len(summary["steps_s"]) == 1
            assert summary["fit_s"] == pytest.approx(summary["first_s"] + sum(summary["steps_s"]))
            assert summary["ratio_to_rbf"] == pytest.approx(summary["median_s"] / kinds["rbf"]["median_s"])
            assert all(math.isfinite(loss) for loss in summary["losses"])
            assert summary["per_step_counts"]["forward_calls"] >= 1, kind
        for kind in ("nngp", "ntk"):  # the counter sees gpntk's evaluations, and only gpntk's
            counts = kinds[kind]["per_step_counts"]
            assert counts["evaluate"] + counts["blockwise_products"] >= 1, kind
        assert kinds["rbf"]["per_step_counts"]["evaluate"] == 0
    # the wrappers are gone after the run
    assert (dense.evaluate, dense.evaluate_output) == evaluate and backends.evaluate_output is evaluate[1]
    assert vars(BlockwiseKernelOperator)["_products"] is products


def test_counter_counts_blockwise_products():
    import torch

    import gpntk
    from gpntk import layers as L

    x = torch.rand(50, 3, dtype=torch.float64)
    kernel = gpntk.NTKKernel(L.mlp(2, "relu"), backend="blockwise")
    with mll_step.EvaluationCounter() as counter:
        kernel(x) @ torch.ones(50, 2, dtype=torch.float64)
        kernel(x, x[:5]).to_dense()
        counts = counter.take()
    assert counts == {"blockwise_products": 1, "evaluate": 1}  # the product, and the 5-column dense matrix


@pytest.mark.slow
def test_fresh_process_option(tmp_path):
    out = tmp_path / "mll_step.json"
    report = mll_step.main(["--n", "100", "--paths", "cg", "--kinds", "rbf", "ntk", "--repeats", "1", "--mcs-cg",
                            "50", "--fresh-process", "--out", str(out)])
    kinds = report["results"][0]["kinds"]
    assert set(kinds) == {"rbf", "ntk"} and report["results"][0]["fresh_process"]
    assert all(summary["process_peak_mib"] > 50 for summary in kinds.values())  # torch alone takes more
    assert kinds["ntk"]["per_step_counts"]["evaluate"] >= 1
