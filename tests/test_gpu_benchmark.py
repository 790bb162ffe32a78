"""benchmarks/gpu.py: its CPU smoke run (agreement, ladders, failures recorded), the recommendation and ``--apply``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _benchmarks import ROOT, load_benchmark

from gpntk.kernels.measured_backends import MEASURED_BACKENDS, MeasuredBackend

gpu = load_benchmark("gpu.py", "gpu_benchmark")
TINY = ["--cpu-smoke", "--inline", "--product-sizes", "60", "120", "--mll-sizes", "150", "--posterior-sizes", "80",
        "--test", "20", "--repeats", "2"]


def _by(results: dict, **keys) -> list[dict]:
    return [m for m in results["measurements"] if all(m[k] == v for k, v in keys.items())]


def test_cpu_smoke_run_measures_every_phase_and_agrees(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main([*TINY, "--backends", "dense", "blockwise", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["finished"] and results["device_class"] == "cpu" and results["config"]["smoke"]
    assert results["device"] and results["torch"] == torch.__version__
    assert {(a["backend"], a["dtype"]) for a in results["agreement"]} == {
        (b, d) for b in ("dense", "blockwise") for d in ("float32", "float64")}
    assert all(a["ok"] and a["rel_err"] <= a["tolerance"] for a in results["agreement"])
    for phase, sizes in (("product", [60, 120]), ("mll", [150]), ("posterior", [80])):
        for backend in ("dense", "blockwise"):
            rows = _by(results, phase=phase, backend=backend)
            assert [m["n"] for m in rows if m["dtype"] == rows[0]["dtype"]] == sizes, (phase, backend)
            assert all(m["status"] == "ok" and 0 < m["median_s"] and 1 <= m["repeats"] <= 2 for m in rows)
    dense_products = _by(results, phase="product", backend="dense")
    assert all(m["matmul_s"] > 0 for m in dense_products)
    # the same seed and probe vectors: the MLL loss and the posterior agree across backends
    loss = {m["backend"]: m["values"]["loss"] for m in _by(results, phase="mll")}
    assert abs(loss["dense"] - loss["blockwise"]) <= 1e-3 * abs(loss["dense"])
    norm = {m["backend"]: m["values"]["mean_norm"] for m in _by(results, phase="posterior")}
    assert abs(norm["dense"] - norm["blockwise"]) <= 1e-3 * abs(norm["dense"])
    assert {s["family"] for s in results["stops"]} == gpu.families_started(results)
    assert results["recommended"]["matrix_free"] == "blockwise"
    assert "KeOps not measured" in results["recommended"]["summary"]


def test_ladders_stop_at_their_budget_and_failures_are_recorded(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "stored_matmul", out_of_memory)  # every dense product fails after its timing
    out = tmp_path / "gpu.json"
    argv = [*TINY, "--backends", "dense", "blockwise", "--dtypes", "float64", "--product-sizes", "100", "4000",
            "--product-budget", "0.05", "--out", str(out)]
    assert gpu.main(argv) == 0
    results = json.loads(out.read_text())
    stops = {s["family"]: s["reason"] for s in results["stops"]}
    # n = 4000 would take (4000 / 100)^2 = 1600 times n = 100: beyond a 0.05 s budget
    assert [m["n"] for m in _by(results, phase="product", backend="blockwise")] == [100]
    assert stops["product/blockwise/float64"].startswith("budget: n = 4000")
    failed = _by(results, phase="product", backend="dense")
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "OutOfMemoryError" in failed[0]["error"]
    assert stops["product/dense/float64"] == "failed"
    assert results["finished"] and all(m["status"] == "ok" for m in _by(results, phase="mll"))


def test_a_dead_worker_is_recorded_and_its_family_skipped(tmp_path):
    out = tmp_path / "gpu.json"
    current = {"phase": "mll", "backend": "keops", "dtype": "float32", "n": 20000}
    gpu.write_results({"agreement": [], "measurements": [], "stops": [], "current": current}, out)
    gpu.record_death(out, "worker exited with status -9")
    results = json.loads(out.read_text())
    died = {**current, "status": "failed", "ok": False, "error": "worker exited with status -9"}
    assert results["measurements"] == [died]
    assert "mll/keops/float32" in gpu.families_started(results) and results["current"] is None


def _measurement(phase, backend, dtype, n, median):
    return {"phase": phase, "backend": backend, "dtype": dtype, "n": n, "status": "ok", "median_s": median}


def _sample(keops_faster_at_50k=True, agreed=True):
    """A results file as a CUDA run writes it: KeOps slower at 1e4, faster from 2e4 on (products and MLL)."""
    rows = []
    for dtype in ("float32", "float64"):
        rows += [_measurement("product", "blockwise", dtype, n, t) for n, t in ((10**4, 0.01), (2 * 10**4, 0.04),
                                                                               (5 * 10**4, 0.25))]
        rows += [_measurement("product", "keops", dtype, n, t) for n, t in (
            (10**4, 0.02), (2 * 10**4, 0.03), (5 * 10**4, 0.2 if keops_faster_at_50k else 0.3), (10**6, 60.0))]
    rows += [_measurement("mll", "blockwise", "float32", 10**4, 1.0),
             _measurement("mll", "keops", "float32", 10**4, 2.0),
             _measurement("mll", "blockwise", "float32", 2 * 10**4, 4.0),
             _measurement("mll", "keops", "float32", 2 * 10**4, 3.0),
             _measurement("posterior", "keops", "float32", 10**4, 100.0)]  # the posterior does not decide
    rows.append({**_measurement("product", "keops", "float32", 10**5, 0.0), "status": "failed"})  # ignored
    agreement = [{"backend": "keops", "dtype": d, "ok": agreed} for d in ("float32", "float64")]
    return {"device_class": "cuda", "device": "NVIDIA H100 80GB HBM3", "agreement": agreement, "measurements": rows,
            "config": {"smoke": False}}


def test_recommend_keops_from_the_smallest_size_it_wins_everywhere_above():
    entry = gpu.recommend(_sample(), "benchmarks/results/gpu.json")
    assert (entry["matrix_free"], entry["keops_from_rows"]) == ("keops", 20000)
    assert entry["device_class"] == "cuda" and entry["evidence"] == "benchmarks/results/gpu.json"
    assert "product float32 0.80x at n = 50000" in entry["summary"]
    assert "mll float32 0.75x at n = 20000" in entry["summary"]
    assert gpu.recommend(_sample(keops_faster_at_50k=False))["matrix_free"] == "blockwise"  # loses at the largest n
    assert gpu.recommend(_sample(agreed=False))["matrix_free"] == "blockwise"
    assert gpu.recommend({**_sample(), "agreement": []})["matrix_free"] == "blockwise"


def _import_table(path: Path):
    spec = importlib.util.spec_from_file_location("measured_backends_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return {cls: dataclasses.asdict(entry) for cls, entry in module.MEASURED_BACKENDS.items()}


def test_apply_writes_the_recommended_entry_into_the_table(tmp_path):
    table = tmp_path / "measured_backends.py"
    table.write_text((ROOT / "gpntk" / "kernels" / "measured_backends.py").read_text())
    entry = gpu.recommend(_sample(), "benchmarks/results/gpu.json")
    for _ in range(2):  # idempotent: the markers stay
        gpu.apply_entry(entry, table)
        written = _import_table(table)
        assert written["cuda"] == dataclasses.asdict(MeasuredBackend(**entry))
        assert written["cpu"] == dataclasses.asdict(MEASURED_BACKENDS["cpu"])
    with pytest.raises(SystemExit, match="no '# begin cpu'"):
        gpu.apply_entry({**entry, "device_class": "cpu"}, table)


def test_apply_refuses_smoke_runs(tmp_path):
    path = ROOT / "benchmarks" / "results" / "smoke-test-refused.json"
    try:
        gpu.write_results({**_sample(), "config": {"smoke": True}}, path)
        with pytest.raises(SystemExit, match="cpu-smoke"):
            gpu.main(["--apply", str(path)])
    finally:
        path.unlink(missing_ok=True)
    with pytest.raises(SystemExit, match="outside the repository"):
        gpu.evidence_path(tmp_path / "gpu.json")


@pytest.mark.slow
def test_cli_smoke_run_with_keops(tmp_path):
    """The supervised command line, KeOps included (cold formula compiles on this CPU take minutes)."""
    pytest.importorskip("pykeops")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu-smoke", "--out", str(out), "--product-sizes",
         "100", "--mll-sizes", "120", "--posterior-sizes", "100", "--test", "20", "--mll-budget", "600",
         "--posterior-budget", "600", "--deadline", "1500"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    keops_checks = [a for a in results["agreement"] if a["backend"] == "keops"]
    assert len(keops_checks) == 2 and all(a["ok"] for a in keops_checks)
    for phase in ("product", "mll", "posterior"):
        assert [m["status"] for m in _by(results, phase=phase, backend="keops")][:1] == ["ok"], phase
    assert "recommended entry of MEASURED_BACKENDS" in proc.stdout
