"""The trained-ensemble posterior by Lanczos (no n x n eigendecomposition) against the eigendecomposition."""

from __future__ import annotations

import math

import pytest
import torch

import gpntk.posterior.kernel_cache as kernel_cache
import gpntk.posterior.solver as solver_module
from gpntk import layers as L
from gpntk.kernels.blockwise import kernel_matmul
from gpntk.kernels.dense import evaluate, nngp_and_ntk
from gpntk.posterior import TrainedEnsemble
from gpntk.posterior.lanczos import lanczos, largest_eigenvalue

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: these tests run many small products and LAPACK calls, which on a shared 2-core
    machine run several times slower with two OpenMP threads (they spin while a core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TIMES = torch.tensor([0.0, 10.0, 100.0, 1000.0, math.inf])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, per leading (time) index, worst case."""
    return ((a - b).abs().flatten(1).amax(1) / b.abs().flatten(1).amax(1).clamp_min(1e-300)).max().item()


def _dense_product(net, x):
    """A ``train_product`` from stored matrices: the same products as the blockwise one, but cheap to repeat."""
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(net, x, detach_hyperparameters=True)
    kernels = {"nngp": nngp, "ntk": ntk}

    def product(rhs, kinds):
        return tuple(kernels[kind] @ rhs for kind in kinds)

    return product


@pytest.fixture(scope="module")
def problem_2000():
    """n = 2000 points in d = 8, a depth-3 ReLU network, two outputs, and the eigh ensemble (spectra cached)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.randn(2000, 2, generator=g)
    test_x = torch.cat([torch.randn(8, 8, generator=g), x[:2]])  # two training points: variances shrink there
    net = L.mlp(3, "relu", 2.0, 0.1)
    product = _dense_product(net, x)
    lanczos_ensemble = TrainedEnsemble(net, x, y, diag_reg=0.1, solver="lanczos", train_product=product)
    learning_rate = 0.5 * lanczos_ensemble.max_learning_rate()
    eigh = TrainedEnsemble(net, x, y, learning_rate, diag_reg=0.1, solver="eigh")
    assert 0.5 * eigh.max_learning_rate() == pytest.approx(learning_rate, rel=1e-8)
    torch.set_default_dtype(default)
    return net, x, y, test_x, eigh, learning_rate, product


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
def test_lanczos_agrees_with_eigh_at_n_2000(problem_2000, regime):
    net, x, y, test_x, eigh, learning_rate, product = problem_2000
    post = TrainedEnsemble(net, x, y, learning_rate, diag_reg=0.1, solver="lanczos", train_product=product)
    mean, variance = post.moments(test_x, TIMES, regime, diag=True)
    ref_mean, ref_variance = eigh.moments(test_x, TIMES, regime, diag=True)
    assert mean.shape == ref_mean.shape == (5, 10, 2) and variance.shape == (5, 10)
    assert mean[0].abs().max() == 0  # t = 0: the prior
    assert _relative(mean[1:], ref_mean[1:]) <= 1e-6
    assert _relative(variance, ref_variance) <= 1e-6
    mean, cov = post.moments(test_x, TIMES[2:], regime)
    ref_mean, ref_cov = eigh.moments(test_x, TIMES[2:], regime)
    assert _relative(mean, ref_mean) <= 1e-6
    assert _relative(cov, ref_cov) <= 1e-6
    assert torch.equal(cov, cov.mT)


def test_default_product_touches_the_training_kernel_only_through_products(monkeypatch):
    """The blockwise product, counted; no (train, train) kernel matrix and no eigendecomposition."""
    g = torch.Generator().manual_seed(1)
    n, m = 150, 6
    x, y, test_x = torch.randn(n, 5, generator=g), torch.randn(n, generator=g), torch.randn(m, 5, generator=g)
    net = L.mlp(2, "relu", 2.0, 0.1)
    reference = TrainedEnsemble(net, x, y, learning_rate=2.0, diag_reg=0.05, solver="eigh")
    expected = {regime: reference.moments(test_x, TIMES, regime, diag=True) for regime in ("ntk", "nngp")}
    expected_loss = reference.train_loss(TIMES, "ntk", include_variance=False)

    calls = []

    def counting_matmul(net_, x1, x2, hyper, rhs, **options):
        assert x1 is x2 and x1.shape[0] == n
        calls.append((tuple(rhs.shape), tuple(options["kinds"])))
        return kernel_matmul(net_, x1, x2, hyper, rhs, **options)

    def no_training_matrix(net_, x1, x2, hyper, **options):
        assert x1.shape[0] != n or x2.shape[0] != n, "the n x n training kernel was formed"
        return evaluate(net_, x1, x2, hyper, **options)

    small_eigh = torch.linalg.eigh

    def no_eigh(matrix, *args, **kwargs):  # only the small tridiagonals of Lanczos
        assert matrix.shape[-1] < n, "an n x n eigendecomposition was computed"
        return small_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(kernel_cache, "kernel_matmul", counting_matmul)
    monkeypatch.setattr(kernel_cache, "evaluate", no_training_matrix)
    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    post = TrainedEnsemble(net, x, y, learning_rate=2.0, diag_reg=0.05, solver="lanczos")
    for regime in ("ntk", "nngp"):
        before = len(calls)
        mean, variance = post.moments(test_x, TIMES, regime, diag=True)
        assert _relative(mean[1:], expected[regime][0][1:]) <= 1e-6
        assert _relative(variance, expected[regime][1]) <= 1e-6
        # one product per step for all times; "ntk" adds one Sigma product (P W, 5 times x m columns)
        used = calls[before:]
        assert len(used) == post.num_products - before
        if regime == "ntk":
            assert used[-1] == ((n, len(TIMES) * m), ("nngp",))
            used = used[:-1]
        # Lanczos steps: (n, c) blocks of the columns still running, at most the target and the m test columns
        assert all(shape[0] == n and shape[1] <= 1 + m for shape, _ in used)
        assert all(kinds == (solver_module.REGIME_KERNELS[regime][0],) for _, kinds in used)
    assert len(calls) == post.num_products
    loss = post.train_loss(TIMES, "ntk", include_variance=False)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-12)


def test_products_grow_with_time_and_are_shared_by_all_times():
    g = torch.Generator().manual_seed(2)
    x, y, test_x = torch.randn(300, 4, generator=g), torch.randn(300, generator=g), torch.randn(5, 4, generator=g)
    net = L.mlp(2, "relu", 2.0, 0.1)
    product = _dense_product(net, x)
    probe = TrainedEnsemble(net, x, y, diag_reg=0.1, solver="lanczos", train_product=product)
    learning_rate = 0.5 * probe.max_learning_rate()
    post = TrainedEnsemble(net, x, y, learning_rate, diag_reg=0.1, solver="lanczos", train_product=product)
    counts = []
    for t in TIMES[1:].tolist():
        before = post.num_products
        post.moments(test_x, t, "nngp", diag=True)
        counts.append(post.num_products - before)
    assert counts == sorted(counts) and counts[0] < counts[-1]
    before = post.num_products
    together = post.moments(test_x, TIMES[1:], "nngp", diag=True)
    assert post.num_products - before == counts[-1]  # all times from the run the slowest one needs
    for i, t in enumerate(TIMES[1:].tolist()):
        alone = post.moments(test_x, t, "nngp", diag=True)
        torch.testing.assert_close(together[1][i], alone[1], rtol=1e-7, atol=1e-10)


def test_auto_uses_lanczos_above_the_threshold(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, generator=g)
    net = L.mlp(1, "relu")
    assert TrainedEnsemble(net, x, y).solver == "eigh"
    monkeypatch.setattr(solver_module, "EIGH_MAX_TRAIN", 12)
    assert TrainedEnsemble(net, x, y).solver == "eigh"
    monkeypatch.setattr(solver_module, "EIGH_MAX_TRAIN", 11)
    post = TrainedEnsemble(net, x, y, diag_reg=0.01)
    assert post.solver == "lanczos"
    reference = TrainedEnsemble(net, x, y, diag_reg=0.01, solver="eigh")
    test_x = torch.randn(4, 3, generator=g)
    for ours, theirs in zip(post.moments(test_x, 3.0), reference.moments(test_x, 3.0)):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    assert post.num_products > 0 and reference.num_products == 0


def test_distributions_samples_and_losses_by_lanczos():
    g = torch.Generator().manual_seed(4)
    x, y, test_x = torch.randn(60, 3, generator=g), torch.randn(60, 2, generator=g), torch.randn(7, 3, generator=g)
    net = L.mlp(2, "erf", 1.5, 0.1)
    post = TrainedEnsemble(net, x, y, learning_rate=0.7, diag_reg=0.1, solver="lanczos")
    reference = TrainedEnsemble(net, x, y, learning_rate=0.7, diag_reg=0.1, solver="eigh")
    assert post.max_learning_rate("nngp") == pytest.approx(reference.max_learning_rate("nngp"), rel=1e-8)
    dist, ref = post(test_x, TIMES, "ntkgp"), reference(test_x, TIMES, "ntkgp")
    torch.testing.assert_close(dist.mean, ref.mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dist.covariance_matrix, ref.covariance_matrix, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(post.mean(test_x, 5.0), reference.mean(test_x, 5.0), rtol=1e-7, atol=1e-9)
    assert post.sample(test_x, 5.0, 3).shape == (3, 7, 2)
    for regime in ("ntk", "nngp", "ntkgp"):
        mean_loss = post.train_loss(TIMES, regime, include_variance=False)
        ref_mean_loss = reference.train_loss(TIMES, regime, include_variance=False)
        torch.testing.assert_close(mean_loss, ref_mean_loss, rtol=1e-6, atol=1e-12)
        # the trace is a Hutchinson estimate with the prior as control variate: exact at t = 0
        loss, ref_loss = post.train_loss(TIMES, regime), reference.train_loss(TIMES, regime)
        torch.testing.assert_close(loss[0], ref_loss[0], rtol=1e-10, atol=0)
        assert ((loss - ref_loss).abs() <= 0.05 * ref_loss + 1e-8).all()


def test_max_iterations_warns_with_the_remedy():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 4, generator=g), torch.randn(200, generator=g)
    post = TrainedEnsemble(L.mlp(3, "relu", 2.0, 0.1), x, y, solver="lanczos", max_iterations=10)
    with pytest.warns(RuntimeWarning, match=r"did not converge in 10 iterations.*max_iterations.*diag_reg > 0"):
        mean, variance = post.moments(x[:3], math.inf, "nngp", diag=True)
    assert torch.isfinite(mean).all() and torch.isfinite(variance).all()


def test_bad_options_raise_clear_errors():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, generator=g)
    net = L.mlp(1, "relu")
    with pytest.raises(ValueError, match="unknown solver 'qr'"):
        TrainedEnsemble(net, x, y, solver="qr")
    for tolerance in (0.0, -1e-3, 1.0, float("nan"), "tight", True):
        with pytest.raises(ValueError, match="tolerance must be a number in"):
            TrainedEnsemble(net, x, y, tolerance=tolerance)
    for max_iterations in (0, 2.5, True, None):
        with pytest.raises(ValueError, match="max_iterations must be a positive integer"):
            TrainedEnsemble(net, x, y, max_iterations=max_iterations)
    with pytest.raises(TypeError, match="train_product must be callable"):
        TrainedEnsemble(net, x, y, train_product="blockwise")
    wrong = TrainedEnsemble(net, x, y, solver="lanczos", train_product=lambda rhs, kinds: (rhs[:-1],))
    with pytest.raises(ValueError, match="train_product returned shapes"):
        wrong.mean(x[:2], 1.0)
    post = TrainedEnsemble(net, x, y, solver="lanczos")
    with pytest.raises(NotImplementedError, match="solver='eigh'"):
        post.moments(x[:2].clone().requires_grad_(True), 1.0)


# --- the Lanczos module on its own ---------------------------------------------------------------


def _spd(n: int, seed: int, condition: float = 1e2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return basis * values @ basis.mT, values, basis


def test_matrix_functions_quadrature_projections_and_both_passes():
    a, values, basis = _spd(300, 7)
    g = torch.Generator().manual_seed(8)
    start = torch.randn(300, 4, generator=g, dtype=torch.float64)
    start[:, 3] = 0  # a zero column: f(A) 0 = 0
    left = torch.randn(300, 2, generator=g, dtype=torch.float64)

    def functions(theta):  # (1 - e^{-theta/100}) / theta and 1 / theta
        return torch.stack([-torch.expm1(-theta / 100) / theta, 1 / theta])

    exact = torch.stack([basis @ (f[:, None] * (basis.mT @ start)) for f in functions(values)])
    run = lanczos(lambda v: a @ v, start, functions, left=left, tolerance=1e-10)
    assert run.converged and run.lengths[3] == 0 and max(run.lengths) < 150
    full = run.apply(lambda v: a @ v)
    torch.testing.assert_close(full, exact, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(run.projections(), left.mT @ exact, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(run.quadratic_forms(), (start * exact).sum(-2), rtol=1e-9, atol=1e-9)
    # pass 2 regenerating every vector, or only those after a few stored ones, or none: the same numbers
    regenerated = lanczos(lambda v: a @ v, start, functions, tolerance=1e-10).apply(lambda v: a @ v)
    partial = lanczos(lambda v: a @ v, start, functions, tolerance=1e-10, keep_bytes=3 * start.numel() * 8)
    assert len(partial.basis) == 3
    assert torch.equal(partial.apply(lambda v: a @ v), regenerated)
    assert partial.replay_products == max(partial.lengths) - 3
    stored = lanczos(lambda v: a @ v, start, functions, tolerance=1e-10, keep_bytes=2**30)
    torch.testing.assert_close(stored.apply(lambda v: a @ v), regenerated, rtol=1e-13, atol=1e-13)
    assert stored.replay_products == 0
    # a product that differs between the passes is detected
    noisy = lanczos(lambda v: a @ v, start, functions, tolerance=1e-10)
    with pytest.warns(RuntimeWarning, match="did not reproduce the Lanczos vectors"):
        noisy.apply(lambda v: a @ v * (1 + 1e-6))


def test_invariant_krylov_space_ends_exactly_and_largest_eigenvalue():
    g = torch.Generator().manual_seed(9)
    factor = torch.randn(50, 3, generator=g, dtype=torch.float64)
    a = factor @ factor.mT + 0.5 * torch.eye(50, dtype=torch.float64)  # 4 distinct eigenvalues
    start = torch.randn(50, 2, generator=g, dtype=torch.float64)
    run = lanczos(lambda v: a @ v, start, lambda theta: (1 / theta).unsqueeze(0))
    assert run.converged and max(run.lengths) <= 5
    torch.testing.assert_close(run.apply(lambda v: a @ v)[0], torch.linalg.solve(a, start), rtol=1e-10, atol=1e-10)
    largest = largest_eigenvalue(lambda v: a @ v, 50)
    assert largest == pytest.approx(torch.linalg.eigvalsh(a)[-1].item(), rel=1e-10)
