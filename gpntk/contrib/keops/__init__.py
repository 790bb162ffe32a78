r"""KeOps backend: the kernel of a fully-connected network as a pykeops formula, for very large n.

A KeOps reduction evaluates a formula :math:`F(x_i, y_j)` for every pair on the fly and sums
it against a vector, :math:`\sum_j F(x_i, y_j)\, v_j`, without ever storing a matrix (memory
:math:`O(n)`; fast on GPUs, slow but usable on CPUs). :func:`keops_covariance` returns the NTK
or NNGP kernel matrix of a network as such a symbolic ``LazyTensor``, whose ``K @ v`` is one
reduction and is differentiable in the inputs and every hyperparameter.

Supported architectures (:func:`keops_supported`): serial chains of ``Dense`` layers and
activations whose dual kernels have closed forms,

* the arc-cosine family (Cho & Saul 2009): ``ReLU``, ``LeakyReLU``, ``ABReLU``, ``Abs``,
  ``RectifiedMonomial`` of degree 1 (= ReLU) and 0 (the step function), and ``Sign``;
* ``Erf`` (Williams 1997), ``Exp``, ``Sin``, ``Cos`` and ``Rbf``;
* ``SigmoidLike`` (an ``Erf``) and ``Gabor``;
* ``Identity``.

**The recursion.** With :math:`\Sigma_0(x, x') = x \cdot x'/d` and :math:`\Theta_0 = 0`, a
``Dense`` layer maps :math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
:math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma` (the last term only for a trainable layer;
in standard parameterization it is :math:`n \Sigma_{\text{in}} + \beta`, ``in_width`` :math:`n`
an integer literal of the formula),
and an activation maps :math:`\Sigma \leftarrow k(\Sigma)`,
:math:`\Theta \leftarrow \dot k(\Sigma)\, \Theta` with the dual kernels :math:`k, \dot k` of
:mod:`gpntk.activations`. The per-point variances :math:`q_l(x) = \Sigma_l(x, x)` of every layer
do not depend on the other point: they are computed in torch by the exact per-point recursion
(``Activation.dual_diag``, never through a correlation of one) and enter the formula as KeOps
``Vi``/``Vj`` variables ("features": :math:`q` itself, or :math:`\sqrt{q}` and :math:`1/\sqrt{q}`
for the arc-cosine family); only the pair quantities :math:`\Sigma_l(x, x')`, :math:`\Theta_l(x, x')`
are symbolic. The hyperparameters :math:`\sigma_w^2, \sigma_b^2` are one ``Pm`` (parameter) vector
and the constants of the activations another, so that new values reuse the compiled formula.

**One source for each dual.** The pair duals :math:`k, \dot k` are not written here: each is one
function of :mod:`gpntk.activations` (``abrelu_pair``, ``sign_pair``, ``rectified_monomial_pair``,
``erf_pair``, ``sin_pair``, ``exp_pair``) stated against the small operations protocol
:class:`gpntk.activations.ops.DualOps`. ``Activation.dual`` evaluates it on tensors
(:data:`gpntk.activations.ops.TORCH`); this backend evaluates the same function on the dual
numbers of :class:`.calculus._Calculus`, which builds formula nodes, with the activation's
``formula_constants()`` as entries of the constants vector. Only the arc-cosine correlation
:math:`\rho` is computed differently (from per-point features here, with power-of-two scaling in
torch), see "Identical points".

**Linear size.** Each layer uses the previous :math:`\Sigma_{12}` several times (in the
correlation, in :math:`\sqrt{1-\rho^2}`, in :math:`\arccos\rho`, ...), so the formula written as a
plain expression tree (as pykeops' ``LazyTensor`` arithmetic writes it) grows exponentially with
depth. Here the recursion is built as an expression graph (:class:`.graph._Graph`, identical
sub-expressions merged) and written to KeOps with every repeated value computed once, by
keopscore's ``Factorize(f, g)`` (evaluate ``g`` once into a temporary, substitute it for every
occurrence in ``f``). The values are grouped by level into a chain of state vectors, each bound
once at the top level of the formula string by a Python assignment expression that keopscore's
parser (``eval``) evaluates in order,

``[(_s1 := Concat(a, b)), (_s2 := Factorize(Concat(Extract(_s1, 0, 1), f(Elem(_s1, 0), Elem(_s1, 1))), _s1)),``
``..., result][-1]``,

where each state holds the new values of its level and copies the earlier ones still needed
(the C++ compiler removes the copies: measured no slower than nested ``Factorize`` blocks). Each
state reads only the previous one, so the formula string, keopscore's expression tree, its
parsing and the generated code all grow linearly with depth (measured in
``tests/contrib/test_keops.py``). keopscore's ``AutoFactorize`` finds the same sharing automatically,
but only by searching the already exponential tree.

**Gradients.** KeOps' own autodiff differentiates a ``Factorize`` by substituting the bound
expression back, which is exponential in depth again, so ``K @ v`` has its own backward pass:
forward-mode derivatives (dual numbers) with respect to :math:`x \cdot x'`, the per-point
features and the hyperparameters are carried through the same graph, as vectors, and two
reductions (one over :math:`j`, one over :math:`i`; for ``K(X, X)`` the kernel is a symmetric
function and the first serves for both) contract them with :math:`(g_i \cdot v_j)`; torch's
autograd then takes the features back to the inputs and the hyperparameters. The formulas of
the derivatives also grow linearly with depth. The backward pass is not itself differentiable
(no second derivatives).

**Identical points.** Where :math:`x_i = x_j` (bitwise, tested as ``SqDist(x_i, x_j) == 0``) the
arc-cosine correlations are set to exactly one, so that :math:`\arccos` is not evaluated at
:math:`1 - \epsilon` (whose error :math:`\sqrt{2\epsilon}` would reach the NTK through
:math:`J_0`): the values then equal the exact per-point recursion, and their derivatives are
those of the dense backend (half the derivative of :math:`k(x, x)` to each argument).
Correlations are clamped to :math:`[-1, 1]` and :math:`1/\sqrt{1 - \rho^2}` to at most
:math:`1/\sqrt{\epsilon}`, as in :mod:`gpntk.activations.arccos`, so gradients stay finite.

**Compilation.** Every distinct formula is compiled once (10-35 s on a 2-core CPU) and cached
on disk in pykeops' build folder (``pykeops.set_build_folder``); a new process only regenerates
its code (under a second to a few seconds), and keeps it in memory. pykeops writes a compiled
library in place, without a lock, so processes sharing a build folder (pytest-xdist workers, ranks
of :mod:`gpntk.distributed` on one machine) take turns: the first call of each reduction in a
process holds a file lock in the build folder (:mod:`.build_lock`; other ``LazyTensor``
operations on the matrix, which pykeops compiles itself, are not covered). A
formula depends on the architecture's structure (not on hyperparameter or activation-constant
values), the input dimension ``d``, the number of right-hand sides (rounded up to a power of
two, padding with zero columns) and the dtype. Inputs always carry at least one batch dimension,
so batched and unbatched calls share one compiled module.

**Modules.** :mod:`.graph`: the expression graph and its emission as a chain of ``Factorize``
bindings; :mod:`.calculus`: dual numbers (forward-mode derivatives) on the graph, implementing
``DualOps``; :mod:`.forms`: which closed-form dual each activation type uses, with its per-point
features and constants; :mod:`.formula`: which architectures are supported and the network as a
formula (:func:`keops_formula`); :mod:`.operator`: evaluation (compiled reductions, memoised per
process by ``functools.lru_cache``, the backward pass) and the symbolic kernel matrix
(:func:`keops_covariance`); :mod:`.build_lock`: one compilation at a time per build folder.

**Third-party internals still used.** ``KeOpsKernelMatrix`` subclasses pykeops' ``LazyTensor``
and copies onto itself the attributes of a ``LazyTensor`` joined from its variables (``tools``,
``_dtype``, ``Genred``, ``KernelSolve``, ``ni``, ``nj``, ``ranges``, ``backend``, ``batchdims``,
``variables``, ``symbolic_variables``) and sets ``formula``, ``ndim`` and ``axis``: pykeops has no
public constructor for a ``LazyTensor`` from a formula string, and these are what its other
operations (``K.sum(1)``, ``K * 2``, GPyTorch's ``KernelLinearOperator``) read. The formula text
relies on keopscore's parser evaluating Python assignment expressions in order (the chain of
``Factorize`` bindings) and on ``Genred``'s documented arguments only. No GPyTorch internals are
used.

References: Y. Cho and L. K. Saul, *Kernel methods for deep learning*, NeurIPS 2009 (arc-cosine
kernels); C. K. I. Williams, *Computing with infinite networks*, NeurIPS 1997 (the erf kernel);
B. Charlier, J. Feydy, J. A. Glaunès, F.-D. Collin and G. Durif, *Kernel operations on the GPU,
with autodiff, without memory overflows*, JMLR 2021 (KeOps).
"""

from __future__ import annotations

from typing import Any

from .formula import keops_formula, keops_supported
from .operator import _kernel_matrix_class, keops_covariance

__all__ = ["keops_supported", "keops_covariance", "keops_formula"]


def __getattr__(name: str) -> Any:
    if name == "KeOpsKernelMatrix":
        return _kernel_matrix_class()
    raise AttributeError(name)
