"""``gpntk.testing.reference_kernels``: every reference case in ``tests/reference`` through the public API.

Each case file either runs and matches the Neural Tangents values at the README's tolerances, or
cannot run yet for a reason in ``EXPECTED_MISSING`` (none today: the graph kinds came with issue
17). Any other reason fails, so a case cannot silently drop out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from _reference import REFERENCE_DIR, case_names, layer_names, load_case

import gpntk
from gpntk import layers as L
from gpntk.testing import build_network, reference_kernels

#: what keeps a case from running today: nothing (the graph case kinds run since issue 17)
EXPECTED_MISSING: set[str] = set()
#: case kinds reference_kernels evaluates
KINDS = ("kernel", "posterior", "graph_kernel", "node_kernel")

CLOSED_FORM_TOL = 1e-10
DIAGONAL_TOL = 1e-7  # the oracle's own accuracy on the diagonal of a self-kernel (README)
QUADRATURE_TOL = 1e-5  # Tanh & co. (64-point Gauss–Hermite in both), GELU(approximate=True)
POSTERIOR_TOL = 1e-8
# a2_graph_mean_bias pads its graphs with isolated nodes and has biases, so every padding node of
# every graph has the same state (σb² after each Dense, bitwise): pairs of padding nodes of two
# different graphs have correlation exactly one, off the diagonal of K11 and in K12, where the
# oracle is only accurate to ~1e-8 (its arctan2 of a rounded leg, README). gpntk's values there
# are exact (ρ = σb²/√(σb²σb²) = 1 bitwise); measured difference 3.4e-10 (NTK), 3.8e-16 (NNGP).
CORRELATION_ONE_CASES = {"a2_graph_mean_bias": {"ntk_12", "ntk_11"}}
QUADRATURE_LAYERS = {"Tanh", "Sigmoid", "Softplus", "SiLU", "Elementwise"}
ORACLE_NAN_CASES = {"fc_rectmono2_d1", "fc_rectmono2_d3"}  # NaNs written by the oracle (test_reference.py)
INPUT_KEYS = {"x1", "x2", "x_train", "y_train", "x_test", "nodes", "adj", "nodes1", "nodes2", "adj1", "adj2"}

ALL_CASES = case_names()


def _layer_specs(layers: list):
    for name, kwargs in layers:
        if name == "serial":
            yield from _layer_specs(kwargs["layers"])
        elif name == "parallel":
            for branch in kwargs["branches"]:
                yield from _layer_specs(branch)
        else:
            yield name, kwargs


def _option_blocker(name: str, kwargs: dict) -> str | None:
    """What keeps ``getattr(L, name)(**kwargs)`` from being built, as an ``EXPECTED_MISSING`` entry."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(L, name)(**kwargs)
    except (TypeError, ValueError):
        if kwargs.get("parameterization") == "standard":
            return "parameterization='standard'"
        if name == "GELU" and kwargs.get("approximate"):
            return "GELU(approximate=True)"
        return f"{name}(**{kwargs})"  # an unexpected reason: not in EXPECTED_MISSING
    return None


def _blockers(name: str) -> set[str]:
    case = load_case(name)
    if case.kind not in KINDS:
        return {case.kind}
    blockers = set()
    for layer, kwargs in _layer_specs(case.layers):
        if not isinstance(getattr(L, layer, None), type):
            blockers.add(layer)
        else:
            blocker = _option_blocker(layer, kwargs)
            if blocker:
                blockers.add(blocker)
    return blockers


def _relative(actual: np.ndarray, expected: np.ndarray, scale: float | None = None) -> float:
    scale = np.abs(expected).max() if scale is None else scale
    return float(np.abs(actual - expected).max() / scale)


def _check_kernel_case(name: str, ours: dict[str, np.ndarray]) -> None:
    case = load_case(name)
    uses_quadrature = bool(layer_names(case.layers) & QUADRATURE_LAYERS) or any(
        layer == "GELU" and kwargs.get("approximate") for layer, kwargs in _layer_specs(case.layers)
    )
    diag_tol = QUADRATURE_TOL if uses_quadrature else DIAGONAL_TOL
    for key, value in ours.items():
        ref = case[key]
        assert value.shape == ref.shape, key
        tol = QUADRATURE_TOL if uses_quadrature else CLOSED_FORM_TOL
        if key in CORRELATION_ONE_CASES.get(name, ()):
            tol = DIAGONAL_TOL
        finite = np.isfinite(ref)
        assert np.isfinite(value).all(), f"{name} {key}: non-finite values"
        if not finite.all():
            assert name in ORACLE_NAN_CASES, f"{name} {key}: unexpected NaNs in the oracle"
        if key.endswith("_11") or case.kind == "node_kernel":  # node cases: the graph with itself
            on_diag = np.eye(len(ref), dtype=bool)
            mask = finite & ~on_diag
            if mask.any():
                assert _relative(value[mask], ref[mask]) <= tol, f"{name} {key} off-diagonal"
            if (finite & on_diag).any():
                assert _relative(value[finite & on_diag], ref[finite & on_diag]) <= diag_tol, f"{name} {key} diagonal"
        elif finite.any():
            assert _relative(value[finite], ref[finite]) <= tol, f"{name} {key}"


def _check_posterior_case(name: str, ours: dict[str, np.ndarray]) -> None:
    case = load_case(name)
    for regime in ("ntk", "nngp"):
        # covariances that vanish (training inputs at long times) are compared to the prior's scale
        prior = max(np.abs(case[f"{regime}_traincov_0"]).max(), np.abs(case[f"{regime}_cov_0"]).max())
        for key in (k for k in ours if k.startswith(f"{regime}_")):
            value, ref = ours[key], case[key]
            assert value.shape == ref.shape, key
            if "mean" in key and np.abs(ref).max() == 0:  # t = 0: the ensemble's mean is 0
                assert np.abs(value).max() == 0, key
            elif "mean" in key:
                assert _relative(value, ref) <= POSTERIOR_TOL, f"{name} {key}"
            else:
                assert _relative(value, ref, max(np.abs(ref).max(), prior)) <= POSTERIOR_TOL, f"{name} {key}"


@pytest.mark.parametrize("name", ALL_CASES)
def test_every_reference_case_runs_or_is_expected_missing(name, float64_default):
    path = REFERENCE_DIR / f"{name}.npz"
    blockers = _blockers(name)
    if blockers:
        unexpected = blockers - EXPECTED_MISSING
        assert not unexpected, f"{name} cannot run for an unexpected reason: {unexpected}"
        with pytest.raises(NotImplementedError) as info:
            reference_kernels(path)
        assert any(b in str(info.value) for b in blockers), f"{name}: {info.value} names none of {blockers}"
        return
    ours = reference_kernels(path)
    case = load_case(name)
    assert set(ours) == set(case.arrays) - INPUT_KEYS, "reference_kernels must return exactly the file's keys"
    assert all(v.dtype == np.float64 for v in ours.values())
    if case.kind != "posterior":
        _check_kernel_case(name, ours)
    else:
        _check_posterior_case(name, ours)


def test_the_case_set():
    """All shared cases are here: 43 kernel and 2 posterior cases of the first set, 25 a2 cases."""
    assert len(ALL_CASES) == 70
    assert sum(name.startswith("a2_") for name in ALL_CASES) == 25
    assert sum(load_case(name).kind == "posterior" for name in ALL_CASES) == 2


def _write_case(path, spec: dict, **arrays) -> None:
    np.savez(path, spec=np.array(json.dumps(spec)), **arrays)


def test_errors_name_what_is_missing(tmp_path):
    x = np.ones((2, 3))
    path = tmp_path / "missing.npz"
    _write_case(path, {"kind": "kernel", "layers": [["Dense", {}], ["NoSuchLayer", {}], ["ReLU", {}],
                                                    ["Dense", {}]], "input_shape": None}, x1=x, x2=x)
    with pytest.raises(NotImplementedError, match=r"missing.npz: gpntk has no layer NoSuchLayer"):
        reference_kernels(path)
    path = tmp_path / "option.npz"
    _write_case(path, {"kind": "kernel", "layers": [["Dense", {"no_such_option": 1}]], "input_shape": None},
                x1=x, x2=x)
    with pytest.raises(NotImplementedError, match=r"gpntk cannot build Dense\(no_such_option=1\)"):
        reference_kernels(path)
    path = tmp_path / "hypergraph.npz"
    _write_case(path, {"kind": "hypergraph_kernel", "layers": [["Dense", {}]]})
    with pytest.raises(NotImplementedError, match=r"case kind 'hypergraph_kernel' is not supported by gpntk yet"):
        reference_kernels(path)
    path = tmp_path / "plain.npz"
    np.savez(path, x=x)
    with pytest.raises(ValueError, match=r"plain.npz is not a reference case: it has no 'spec' entry"):
        reference_kernels(path)


def test_build_network_holds_the_values_exactly():
    default = torch.get_default_dtype()
    net = build_network([["Dense", {"weight_variance": 0.1, "bias_variance": 0.3}], ["FanOut", {"num": 2}],
                         ["parallel", {"branches": [[["ReLU", {}]], [["Erf", {}]]]}], ["FanInConcat", {}]])
    assert torch.get_default_dtype() == default  # restored
    dense = net.layers[0]
    assert dense.weight_variance.dtype == torch.float64
    assert abs(dense.weight_variance.item() - 0.1) <= 1e-16  # float32 would be 1e-9 off


@pytest.mark.slow  # a subprocess
def test_import_gpntk_stays_light_and_testing_is_lazy():
    code = (
        "import sys, gpntk; assert 'gpntk.testing' not in sys.modules and 'torch' not in sys.modules; "
        "t = gpntk.testing; assert t.reference_kernels is sys.modules['gpntk.testing'].reference_kernels"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert gpntk.testing.reference_kernels is reference_kernels
