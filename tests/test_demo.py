"""The README's main job: ``python -m gpntk demo`` runs and the NTK-GP it fits is sensible."""

import subprocess
import sys

from gpntk import demo


def test_demo_fits_and_predicts():
    lines = []
    results = demo.run(print_fn=lines.append, iterations=60)
    text = "\n".join(lines)
    assert "NTK  (ReLU, depth 3)" in text and "fitted NTK hyperparameters" in text
    # standardised targets: predicting the mean would give RMSE ≈ 1
    assert results["NTK  (ReLU, depth 3)"] < 0.6
    assert results["NNGP (ReLU, depth 3)"] < 0.6


def test_cli_rejects_unknown_commands():
    proc = subprocess.run([sys.executable, "-m", "gpntk", "nonsense"], capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr
