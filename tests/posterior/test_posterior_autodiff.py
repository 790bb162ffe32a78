"""Gradients of the trained ensemble's moments with respect to test_x: every call gets its own graph.

References are central finite differences (float64) of the same quantities evaluated without
gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpntk import layers as L
from gpntk.posterior import TrainedEnsemble

pytestmark = pytest.mark.usefixtures("float64_default")

STEP = 1e-6


def _ensemble(train_y_requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    y = torch.randn(12, generator=g).requires_grad_(train_y_requires_grad)
    test_x = torch.randn(4, 3, generator=g)
    return TrainedEnsemble(L.mlp(2, "erf", 2.0, 0.1), x, y), test_x


def _objective(post, points, t=5.0, regime="ntk"):
    """A scalar using the mean, the variances and the full covariance."""
    mean, variances = post.moments(points, t, regime, diag=True)
    _, cov = post.moments(points, t, regime)
    return mean.sum() + (mean.square() * variances).sum() + cov.sum()


def _finite_differences(post, points, **kwargs):
    grad = torch.zeros_like(points)
    with torch.no_grad():
        for index in range(points.numel()):
            step = torch.zeros_like(points).reshape(-1)
            step[index] = STEP
            step = step.reshape(points.shape)
            grad.reshape(-1)[index] = (
                _objective(post, points + step, **kwargs) - _objective(post, points - step, **kwargs)
            ) / (2 * STEP)
    return grad


def _gradient(post, leaf, **kwargs):
    (grad,) = torch.autograd.grad(_objective(post, leaf, **kwargs), leaf)
    return grad


@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
def test_repeated_calls_on_the_same_inputs_each_differentiate(regime):
    post, test_x = _ensemble()
    reference = _finite_differences(post, test_x, regime=regime)
    leaf = test_x.clone().requires_grad_(True)
    for _ in range(3):  # the same leaf, and equal values, again and again
        torch.testing.assert_close(_gradient(post, leaf, regime=regime), reference, rtol=1e-6, atol=1e-6)
    for t in (0.5, math.inf):
        torch.testing.assert_close(
            _gradient(post, leaf, t=t, regime=regime),
            _finite_differences(post, test_x, t=t, regime=regime),
            rtol=1e-6,
            atol=1e-6,
        )


def test_a_call_without_gradients_first_does_not_disable_them():
    post, test_x = _ensemble()
    leaf = test_x.clone().requires_grad_(True)
    with torch.no_grad():
        _objective(post, leaf)
    _objective(post, test_x.clone())  # a call on a tensor that does not require grad
    mean = post.mean(leaf, 5.0)
    assert mean.requires_grad
    torch.testing.assert_close(_gradient(post, leaf), _finite_differences(post, test_x), rtol=1e-6, atol=1e-6)


def test_equal_valued_leaves_each_get_their_gradient():
    post, test_x = _ensemble()
    a = test_x.clone().requires_grad_(True)
    b = test_x.clone().requires_grad_(True)
    (_objective(post, a) + 2 * _objective(post, b)).backward()
    reference = _finite_differences(post, test_x)
    torch.testing.assert_close(a.grad, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, 2 * reference, rtol=1e-6, atol=1e-6)


def test_training_targets_that_require_grad_are_constants():
    """The ensemble copies train_y without its graph: its spectrum is not part of any test_x graph."""
    post, test_x = _ensemble(train_y_requires_grad=True)
    leaf = test_x.clone().requires_grad_(True)
    first = _gradient(post, leaf)
    torch.testing.assert_close(_gradient(post, leaf), first, rtol=0, atol=0)
    torch.testing.assert_close(first, _finite_differences(post, test_x), rtol=1e-6, atol=1e-6)
