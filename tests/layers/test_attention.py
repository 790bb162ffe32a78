"""GlobalSelfAttention: its kernel's paths agree, its derivatives are exact, bad placements are refused.

The values themselves are checked against Neural Tangents in ``tests/test_reference.py`` (the
``a2_attn_*`` cases) and against finite networks in
``tests/empirical/test_monte_carlo_attention.py``. Here:

* ``K(x, diag=True)`` equals the diagonal of ``K(x)`` (the per-point recursion on each input's
  ``L x L`` covariance), and the blockwise backend equals the dense one;
* a direct transcription of the formulas (per pair of inputs, explicit loops) gives the same kernel;
* gradcheck of the kernels in the five hyperparameters (raw values) and in the inputs;
* batch shapes: a batched layer equals the unbatched layers of each batch entry;
* float32 kernels are finite and close to float64;
* bad arguments and placements raise errors naming them; KeOps refuses with a reason; the finite
  module has the right shapes and keeps the structured empirical NTK away.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from torch.autograd import gradcheck

import gpntk
from gpntk import ArchitectureError
from gpntk import layers as L
from gpntk.core.attention import NTKSelfAttention, attention_weights
from gpntk.empirical.structured import structured_applicable

pytestmark = pytest.mark.usefixtures("float64_default")

KERNELS = {"ntk": gpntk.NTKKernel, "nngp": gpntk.NNGPKernel}
SHAPE = (3, 5)  # channels, positions
MECHANISMS = ["softmax", "identity", "abs", "relu"]


def attention(mechanism: str = "softmax", linear_scaling: bool = True, bias: float = 0.15) -> L.GlobalSelfAttention:
    return L.GlobalSelfAttention(
        2, mechanism, linear_scaling, key_variance=0.7, query_variance=1.3, value_variance=1.1, out_variance=0.9,
        bias_variance=bias,
    )


def network(mechanism: str = "softmax", linear_scaling: bool = True, pool: bool = True) -> L.Serial:
    """Dense, attention, ReLU, Dense, attention, readout through pooling (full layout) or Flatten."""
    readout = [L.GlobalAvgPool()] if pool else [L.Flatten()]
    return L.serial(
        L.Dense(1.5, 0.1), attention(mechanism, linear_scaling), L.ReLU(), L.Dense(1.2, 0.05),
        attention(mechanism, linear_scaling, bias=0.0), *readout, L.Dense(2.0, 0.1),
    )


def inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, SHAPE[0] * SHAPE[1], generator=torch.Generator().manual_seed(seed)) * 0.8


CONFIGS = [(m, True) for m in MECHANISMS] + [("identity", False)]
CONFIG_IDS = [f"{m}-{'linear' if s else 'sqrt'}" for m, s in CONFIGS]


# --- the paths of one kernel agree ---------------------------------------------------------------
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "flatten"])
@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_diag_is_the_diagonal_and_backends_agree(kind, mechanism, linear_scaling, pool):
    net = network(mechanism, linear_scaling, pool)
    x = inputs(5)
    with torch.no_grad():
        full = KERNELS[kind](net, input_shape=SHAPE)(x).to_dense()
        diag = KERNELS[kind](net, input_shape=SHAPE)(x, diag=True)
        blockwise = KERNELS[kind](net, input_shape=SHAPE, backend="blockwise", block_elements=6)(x).to_dense()
    assert torch.isfinite(full).all()
    torch.testing.assert_close(diag, full.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(blockwise, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(full, full.transpose(-1, -2), rtol=1e-12, atol=0)


def _transcribed(x1: torch.Tensor, x2: torch.Tensor, mechanism: str, linear_scaling: bool) -> tuple:
    """``Dense(1.5, 0.1)``, one attention layer, ``GlobalAvgPool``, ``Dense(2, 0.1)``, pair by pair.

    The formulas as the reference data's README states them for the ``a2_attn_*`` cases (Hron et
    al. 2020 in Neural Tangents' conventions), with explicit loops.
    """
    qk, ov, bias = 0.7 * 1.3, 1.1 * 0.9, 0.15

    def cov(a, b):
        return 1.5 * a.reshape(SHAPE).T @ b.reshape(SHAPE) / SHAPE[0] + 0.1

    nngp, ntk = torch.zeros(len(x1), len(x2)), torch.zeros(len(x1), len(x2))
    for i, a in enumerate(x1):
        for j, b in enumerate(x2):
            s12, theta = cov(a, b), cov(a, b)  # the first Dense's NTK is its Σ
            if linear_scaling:
                g1 = attention_weights(qk**0.5 * cov(a, a), mechanism)
                g2 = attention_weights(qk**0.5 * cov(b, b), mechanism)
                new = ov * g1 @ s12 @ g2.T + bias
                new_theta = ov * g1 @ theta @ g2.T + 2 * ov * g1 @ s12 @ g2.T + bias
            else:
                s, t = (s12**2).sum(), (s12 * theta).sum()
                new = qk * ov * s * s12 + bias
                new_theta = qk * ov * (2 * t * s12 + s * (theta + 4 * s12)) + bias
            nngp[i, j] = 2.0 * new.mean() + 0.1
            ntk[i, j] = 2.0 * new_theta.mean() + nngp[i, j]
    return nngp, ntk


@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
def test_kernel_is_the_transcribed_formula(mechanism, linear_scaling):
    net = L.serial(L.Dense(1.5, 0.1), attention(mechanism, linear_scaling), L.GlobalAvgPool(), L.Dense(2.0, 0.1))
    x1, x2 = inputs(3), inputs(2, seed=1)
    nngp, ntk = _transcribed(x1, x2, mechanism, linear_scaling)
    with torch.no_grad():
        for kernel, expected in ((gpntk.NNGPKernel, nngp), (gpntk.NTKKernel, ntk)):
            actual = kernel(net, input_shape=SHAPE)(x1, x2).to_dense()
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


# --- derivatives ---------------------------------------------------------------------------------
def _with_raw(kernel, names, raws, *args, **kwargs):
    with gpytorch.settings.lazily_evaluate_kernels(False):
        out = torch.func.functional_call(kernel, dict(zip(names, raws)), args, kwargs)
    return out if torch.is_tensor(out) else out.to_dense()


@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_gradcheck_hyperparameters(kind, mechanism, linear_scaling):
    kernel = KERNELS[kind](network(mechanism, linear_scaling), input_shape=SHAPE)
    names, raws = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in kernel.named_parameters()])
    assert sum(n.endswith("raw_key_variance") for n in names) == 2  # both attention layers are learnable
    assert sum(n.endswith("raw_bias_variance") for n in names) == 4  # three Dense layers, the first attention
    x1, x2 = inputs(3), inputs(2, seed=1)
    assert gradcheck(lambda *r: _with_raw(kernel, names, r, x1, x2), raws)
    assert gradcheck(lambda *r: _with_raw(kernel, names, r, x1, diag=True), raws)


@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["ntk"])  # the NTK recursion runs the NNGP's maps too
def test_gradcheck_inputs(kind, mechanism, linear_scaling):
    net = L.serial(L.Dense(1.5, 0.1), attention(mechanism, linear_scaling), L.ReLU(), L.GlobalAvgPool(), L.Dense())
    kernel = KERNELS[kind](net, input_shape=SHAPE)
    x1 = inputs(2).requires_grad_(True)
    x2 = inputs(1, seed=1).requires_grad_(True)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        assert gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
        assert gradcheck(lambda a: kernel(a, diag=True), (x1,))


# --- batch shapes, float32 -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_batch_shape_matches_each_entry(kind):
    x = inputs(4)
    values = {"key_variance": [0.5, 1.4], "query_variance": [1.0, 0.8], "value_variance": [1.1, 0.6],
              "out_variance": [0.9, 1.7], "bias_variance": [0.15, 0.3]}
    batched = KERNELS[kind](network(), input_shape=SHAPE, batch_shape=torch.Size([2]))
    layer = batched.net.layers[1]
    for name, pair in values.items():
        setattr(layer, name, torch.tensor(pair).reshape(2, 1, 1))
    assert layer.raw_key_variance.shape == (2, 1, 1)
    with torch.no_grad():
        out = batched(x).to_dense()
        out_diag = batched(x, diag=True)
        for b in range(2):
            net = network()
            for name, pair in values.items():
                setattr(net.layers[1], name, pair[b])
            single = KERNELS[kind](net, input_shape=SHAPE)(x).to_dense()
            torch.testing.assert_close(out[b], single, rtol=1e-12, atol=0)
            torch.testing.assert_close(out_diag[b], single.diagonal(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_float32_is_finite_and_close(kind, mechanism, linear_scaling):
    net = network(mechanism, linear_scaling)
    x = inputs(4)
    with torch.no_grad():
        k64 = KERNELS[kind](net, input_shape=SHAPE)(x).to_dense()
        k32 = KERNELS[kind](net, input_shape=SHAPE).float()(x.float()).to_dense()
    assert k32.dtype == torch.float32 and torch.isfinite(k32).all()
    assert ((k32.double() - k64).abs().max() / k64.abs().max()).item() < 1e-4


# --- arguments and placements --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_heads": 0}, "n_heads"),
        ({"n_heads": 2.0}, "n_heads"),
        ({"n_heads": 2, "attention_mechanism": "sigmoid"}, "attention_mechanism"),
        ({"n_heads": 2, "linear_scaling": "yes"}, "linear_scaling"),
        ({"n_heads": 2, "attention_mechanism": "softmax", "linear_scaling": False}, "linear_scaling=True"),
        ({"n_heads": 2, "attention_mechanism": "relu", "linear_scaling": False}, "linear_scaling=True"),
        ({"n_heads": 2, "key_variance": 0.0}, "key_variance"),
        ({"n_heads": 2, "query_variance": -1.0}, "query_variance"),
        ({"n_heads": 2, "value_variance": float("nan")}, "value_variance"),
        ({"n_heads": 2, "out_variance": "1"}, "out_variance"),
        ({"n_heads": 2, "bias_variance": -0.1}, "bias_variance"),
        ({"n_heads": 2, "priors": {"weight_variance": gpytorch.priors.GammaPrior(2.0, 1.0)}}, "weight_variance"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ArchitectureError, match=match):
        L.GlobalSelfAttention(**kwargs)


def test_priors_constraints_and_setters():
    layer = L.GlobalSelfAttention(
        1, priors={"key_variance": gpytorch.priors.GammaPrior(2.0, 1.0)},
        constraints={"out_variance": gpytorch.constraints.GreaterThan(0.5)},
    )
    assert [name for name, *_ in layer.named_priors()] == ["key_variance_prior"]
    layer.out_variance = 0.75
    assert layer.out_variance.item() == pytest.approx(0.75)
    assert layer.bias_variance.item() == 0
    with pytest.raises(ValueError, match="without bias"):
        layer.bias_variance = 0.1
    with pytest.raises(ValueError, match="key_variance"):
        layer.key_variance = -1.0
    with pytest.raises(AttributeError, match="weight_variance"):
        layer.weight_variance  # noqa: B018


def test_placements():
    with pytest.raises(ArchitectureError, match="GlobalSelfAttention needs spatial inputs"):
        gpntk.NTKKernel(L.serial(L.Dense(), L.GlobalSelfAttention(1), L.Dense()))
    with pytest.raises(ArchitectureError, match=r"GlobalSelfAttention attends over the positions of sequences.*\(4, 4"):
        gpntk.NTKKernel(L.serial(L.Conv(3, padding="same"), L.GlobalSelfAttention(1), L.Flatten(), L.Dense()),
                        input_shape=(1, 4, 4))
    with pytest.raises(ArchitectureError, match="spatial shape"):
        gpntk.NTKKernel(L.serial(L.Dense(), L.GlobalSelfAttention(1)), input_shape=SHAPE)
    # its outputs are Gaussian pre-activations: a nonlinearity may follow, and it may start a network
    gpntk.NTKKernel(L.serial(L.GlobalSelfAttention(1), L.Erf(), L.GlobalAvgPool(), L.Dense()), input_shape=SHAPE)


def test_keops_refuses_with_a_reason():
    keops = pytest.importorskip("gpntk.contrib.keops")
    reason = keops.keops_supported(network())
    assert reason is not None and "GlobalSelfAttention" in reason
    with pytest.raises(ValueError, match="keops"):
        gpntk.NTKKernel(network(), input_shape=SHAPE, backend="keops")(inputs(3)).to_dense()


# --- the finite network --------------------------------------------------------------------------
@pytest.mark.parametrize(("mechanism", "linear_scaling"), CONFIGS, ids=CONFIG_IDS)
def test_finite_network(mechanism, linear_scaling):
    model = network(mechanism, linear_scaling).finite(6, input_shape=SHAPE, out_features=2,
                                                      generator=torch.Generator().manual_seed(0))
    x = inputs(3)
    assert model(x).shape == (3, 2)
    modules = [m for m in model.modules() if isinstance(m, NTKSelfAttention)]
    assert len(modules) == 2 and modules[0].n_heads == 2 and modules[0].head_width == 6
    assert (modules[0].query_weight is None) == linear_scaling  # queries tied to keys
    assert modules[0].bias is not None and modules[1].bias is None
    assert not structured_applicable(model)  # it mixes positions with weights of its own: full Jacobians
    ntk = gpntk.empirical_ntk(model, x)
    assert ntk.shape == (3, 3) and torch.isfinite(ntk).all()
    # rows do not interact: one row alone gives the same outputs
    torch.testing.assert_close(model(x[1:2]), model(x)[1:2])


def test_finite_refuses_batched_hyperparameters():
    kernel = gpntk.NTKKernel(network(), input_shape=SHAPE, batch_shape=torch.Size([2]))
    with pytest.raises(ValueError, match="scalar hyperparameters"):
        kernel.net.finite(4, input_shape=SHAPE)


def test_finite_module_arguments():
    with pytest.raises(ValueError, match="mechanism"):
        NTKSelfAttention(2, 2, 1, 2, "tanh", True, (1.0, 1.0, 1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="key_std"):
        NTKSelfAttention(2, 2, 1, 2, "softmax", True, (0.0, 1.0, 1.0, 1.0, 0.0))


def test_residual_block_and_posterior():
    """A transformer-like residual block ``h + Attention(h)`` is exact (the branch ends with its own
    output projection) and a trained-ensemble posterior runs on it; the snapshot copies the layer."""
    block = L.serial(L.FanOut(2), L.parallel(attention(), L.Identity()), L.FanInSum())
    net = L.serial(L.Dense(1.5, 0.1), block, L.LayerNorm(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1))
    x, y = inputs(6), torch.randn(6, 1, generator=torch.Generator().manual_seed(3))
    post = gpntk.TrainedEnsemble(net, x, y, diag_reg=1e-6, input_shape=SHAPE)
    mean = post.mean(x, float("inf"))
    torch.testing.assert_close(mean, y, rtol=0, atol=1e-3)
    net.layers[1].layers[1].branches[0].key_variance = 3.0  # later changes do not reach the ensemble
    torch.testing.assert_close(post.mean(x, float("inf")), mean, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_after_a_convolution(kind):
    """Conv keeps the full covariance the attention layer needs; diag and blockwise paths agree."""
    net = L.serial(L.Conv(2, padding="circular", weight_variance=1.5, bias_variance=0.1), attention("relu"),
                   L.Erf(), L.Flatten(), L.Dense(2.0, 0.1))
    x = inputs(4)
    with torch.no_grad():
        full = KERNELS[kind](net, input_shape=SHAPE)(x).to_dense()
        diag = KERNELS[kind](net, input_shape=SHAPE)(x, diag=True)
        blockwise = KERNELS[kind](net, input_shape=SHAPE, backend="blockwise", block_elements=6)(x).to_dense()
    torch.testing.assert_close(diag, full.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(blockwise, full, rtol=1e-12, atol=0)
    assert net.finite(4, input_shape=SHAPE)(x).shape == (4, 1)


def test_nngp_regime_posterior_and_parameterization_of_an_attention_network():
    """Checks that read every Affine layer's parameterization (the regime check) accept attention layers."""
    net = L.serial(L.Dense(1.5, 0.1), attention(), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1))
    layer = net.layers[1]
    assert layer.parameterization == "ntk" and layer.in_width is None
    x, y = inputs(6), torch.randn(6, 1, generator=torch.Generator().manual_seed(4))
    post = gpntk.TrainedEnsemble(net, x, y, diag_reg=1e-6, input_shape=SHAPE)
    mean, _ = post.moments(x, t=float("inf"), regime="nngp")
    torch.testing.assert_close(mean, y, rtol=0, atol=1e-3)
