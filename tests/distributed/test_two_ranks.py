"""Two gloo processes on CPU against one process: products, an ExactGP on the CG path, TrainedEnsemble, misuse."""

from __future__ import annotations

import _distributed_case as case
import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses


def _ranks(scenario, tmp_path, *extra):
    procs = case.run_ranks(scenario, tmp_path, 2, *extra)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _assert_same_on_both_ranks(results):
    assert "error" not in results[0], results[0]
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_products_equal_the_dense_kernel(tmp_path):
    results = _ranks("products", tmp_path)
    _assert_same_on_both_ranks(results)
    reference = case.product_results(sharded=False)  # the plain kernel, dense, one process
    for key, value in reference.items():
        torch.testing.assert_close(results[0][key], value, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("reference", ["one sharded process", "plain kernel"])
def test_exact_gp_equals_one_process(tmp_path, reference):
    """The MLL, its hyperparameter gradients and the predictive mean and variance (CG path, fixed probe seeds).

    The reference runs in this process: the same script with one process (``ShardedKernel`` without
    torch.distributed), and the plain kernel (GPyTorch's own path, no gpntk.distributed code).
    """
    results = _ranks("gp", tmp_path)
    _assert_same_on_both_ranks(results)
    expected = case.gp_results(sharded=reference == "one sharded process")
    assert results[0].keys() == expected.keys()
    assert any(key.startswith("grad:covar_module.base_kernel.net") for key in expected)
    for key in ("mll", "mean", "variance", *(key for key in expected if key.startswith("grad:"))):
        torch.testing.assert_close(
            results[0][key], expected[key], rtol=1e-10, atol=1e-15, msg=lambda message, key=key: f"{key}: {message}"
        )


def test_trained_ensemble_equals_one_process(tmp_path):
    results = _ranks("ensemble", tmp_path)
    _assert_same_on_both_ranks(results)
    reference = case.ensemble_results(sharded=False)
    for key in ("mean", "variance", "loss", "products"):
        torch.testing.assert_close(results[0][key], reference[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant, error, words", [
    ("sizes", "ValueError", "on rank 1"),
    ("rhs", "ReplicationError", "differ between ranks"),
])
def test_misuse_raises_on_every_rank(tmp_path, variant, error, words):
    results = _ranks("bad", tmp_path, variant)
    for result in results:
        assert result.get("error") == error, result
        assert words in result["message"]
