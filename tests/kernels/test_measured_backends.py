"""``kernel_backend("auto")`` picks a matrix-free backend only where a measurement shows it wins on that device class.

A CUDA device class is simulated through ``choose_backend``'s ``device`` argument: no GPU needed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import MappingProxyType

import gpytorch
import pytest
import torch
from _benchmarks import load_benchmark

from gpntk import layers as L
from gpntk import settings
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels import backends, measured_backends
from gpntk.kernels.measured_backends import MEASURED_BACKENDS, MeasuredBackend, device_class, matrix_free_backend

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("cpu", "cuda", torch.device("cuda", 1), "mps", "meta")


def _problem(n: int = 1000):
    net = L.mlp(2, "relu")
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return net, x, Hyperparameters.collect(net, like=x)


def test_device_class():
    assert device_class("cuda:1") == "cuda"
    assert device_class(torch.device("cpu")) == "cpu"
    assert device_class("mps") == "mps"


def test_auto_uses_the_torch_backends_on_every_device_class_today(monkeypatch):
    net, x, hyper = _problem()
    with gpytorch.settings.max_cholesky_size(800):
        for device in DEVICES:
            assert backends.choose_backend(net, x, x, hyper, None, device=device) == "dense"  # 10**6 numbers fit
        monkeypatch.setattr(settings, "DENSE_MAX_ELEMENTS", 10_000)
        for device in DEVICES:
            assert backends.choose_backend(net, x, x, hyper, None, device=device) == "blockwise", device
            assert backends.choose_backend(net, x, x[:5], hyper, None, device=device) == "dense"  # 5000 numbers
        # the inputs' own device is the default
        assert backends.choose_backend(net, x, x, hyper, None) == "blockwise"
        # asking for KeOps still works anywhere (it is the measurement-free default that never picks it),
        # or says that pykeops is missing
        if importlib.util.find_spec("pykeops") is None:
            with pytest.raises(ValueError, match="pykeops is not installed"):
                backends.choose_backend(net, x, x, hyper, None, backend="keops", device="cuda")
        else:
            assert backends.choose_backend(net, x, x, hyper, None, backend="keops", device="cuda") == "keops"


def test_the_shipped_table_names_keops_only_with_evidence():
    assert set(MEASURED_BACKENDS) >= {"cpu", "cuda"}
    for cls, entry in MEASURED_BACKENDS.items():
        assert entry.device_class == cls
        if entry.matrix_free == "keops":
            path = ROOT / entry.evidence.split("#")[0]
            assert path.suffix == ".json" and path.is_file(), f"{cls}: KeOps without a committed benchmark result"


def test_table_entries_agree_with_their_benchmark_json():
    """Each entry citing a results file of benchmarks/gpu.py is what that file recommends."""
    gpu = load_benchmark("gpu.py", "gpu_benchmark_for_table")
    cited = [entry for entry in MEASURED_BACKENDS.values() if entry.evidence and entry.evidence.endswith(".json")]
    for entry in cited:
        with open(ROOT / entry.evidence) as f:
            expected = gpu.recommend(json.load(f), entry.evidence)
        assert (entry.matrix_free, entry.keops_from_rows) == (expected["matrix_free"], expected["keops_from_rows"])
    # today no CUDA measurement exists: CUDA must stay on the torch backends
    if not MEASURED_BACKENDS["cuda"].evidence:
        assert MEASURED_BACKENDS["cuda"].matrix_free == "blockwise"


def test_a_measured_keops_entry_is_followed_on_its_device_class_only(monkeypatch):
    table = {"cuda": MeasuredBackend("cuda", "keops", keops_from_rows=600, evidence="benchmarks/results/x.json")}
    monkeypatch.setattr(measured_backends, "MEASURED_BACKENDS", MappingProxyType(table))
    monkeypatch.setattr(settings, "DENSE_MAX_ELEMENTS", 10_000)
    net, x, hyper = _problem()
    keops = "keops" if backends.keops_available() else "blockwise"
    with gpytorch.settings.max_cholesky_size(100):
        assert backends.choose_backend(net, x, x, hyper, None, device="cuda") == keops
        assert backends.choose_backend(net, x, x, hyper, None, device="cpu") == "blockwise"
        assert backends.choose_backend(net, x[:500], x[:500], hyper, None, device="cuda") == "blockwise"  # < 600 rows
        cnn = L.serial(L.Conv(3), L.ReLU(), L.GlobalAvgPool(), L.Dense())
        images = torch.randn(1000, 10, dtype=torch.float64)
        cnn_hyper = Hyperparameters.collect(cnn, like=images)
        # no KeOps formula for a CNN: the torch backend, exact all the same
        assert backends.choose_backend(cnn, images, images, cnn_hyper, (2, 5), device="cuda") == "blockwise"


def test_matrix_free_backend_asks_keops_only_where_the_table_picks_it():
    def never() -> str | None:
        raise AssertionError("keops_reason asked although the table does not pick KeOps")

    assert matrix_free_backend("cuda", 10**6, never) == "blockwise"
    assert matrix_free_backend("xpu", 10**6, never) == "blockwise"  # no entry: the torch backends
    table = {"cuda": MeasuredBackend("cuda", "keops", keops_from_rows=10, evidence="benchmarks/results/x.json")}
    assert matrix_free_backend("cuda", 10**6, lambda: None, table) == "keops"
    assert matrix_free_backend("cuda", 10**6, lambda: "no formula", table) == "blockwise"
    assert matrix_free_backend("cuda", 9, never, table) == "blockwise"
    assert matrix_free_backend("cpu", 10**6, never, table) == "blockwise"


def test_measured_backend_refuses_keops_without_evidence():
    with pytest.raises(ValueError, match="needs evidence"):
        MeasuredBackend("cuda", "keops")
    with pytest.raises(ValueError, match="matrix_free must be"):
        MeasuredBackend("cuda", "dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keops_from_rows"):
        MeasuredBackend("cuda", "keops", keops_from_rows=-1, evidence="x.json")
