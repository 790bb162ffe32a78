"""The README's main job: ``python -m gpntk demo`` runs, saves its figure, and shows what it claims."""

import subprocess
import sys

import pytest

from gpntk.cli import demo

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"


def test_demo_posterior_part_pinches_at_training_points_and_saves_a_figure(tmp_path):
    lines = []
    figure = tmp_path / "demo.png"
    results = demo.run_posterior(print_fn=lines.append, figure=str(figure))
    text = "\n".join(lines)
    assert "t  train loss  test RMSE" in text and f"figure: {figure}" in text
    assert figure.stat().st_size > 10_000
    for regime in ("ntk", "nngp"):
        prior_sd = results[f"{regime}_t0_train_sd"]
        assert results[f"{regime}_tinf_train_sd"] <= 1e-6 * prior_sd  # the band pinches at the data
        assert results[f"{regime}_t10_train_sd"] > 1e-2 * prior_sd  # but not early in training
        assert results[f"{regime}_tinf_rmse"] < 0.2 < results[f"{regime}_t0_rmse"]


def test_demo_kernel_fit_part():
    lines = []
    results = demo.run_kernel_fit(print_fn=lines.append, iterations=60)
    text = "\n".join(lines)
    assert "NTK  (ReLU, depth 3)" in text and "fitted NTK hyperparameters" in text
    # standardised targets: predicting the mean would give RMSE ≈ 1
    assert results["NTK  (ReLU, depth 3)"] < 0.6
    assert results["NNGP (ReLU, depth 3)"] < 0.6


def test_cli_rejects_unknown_commands():
    proc = subprocess.run([sys.executable, "-m", "gpntk", "nonsense"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
