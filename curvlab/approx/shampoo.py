"""Shampoo: one Kronecker factor per dimension of each parameter tensor, from mini-batch gradients.

Shampoo (Gupta et al. 2018) preconditions a parameter ``W`` of shape ``(d_1, …, d_m)`` with
statistics of its mini-batch gradients. With ``Ḡ_b`` ``(d_1, …, d_m)`` the gradient of batch ``b``'s
loss reduced as torch reduces it on that batch alone (mean over the batch's terms, or sum), and
``Ḡ_b^{(i)}`` ``(d_i, ∏_{j≠i} d_j)`` its mode-``i`` unfolding, the factors are the averages over
the ``B`` batches of the data

    ``L_i = (1/B) Σ_b Ḡ_b^{(i)} Ḡ_b^{(i)ᵀ}``   ``(d_i, d_i)``

(for a matrix ``L_1 = (1/B) Σ Ḡ Ḡᵀ``, ``L_2 = (1/B) Σ Ḡᵀ Ḡ``). They approximate the gradient second
moment ``S = (1/B) Σ_b ḡ_b ḡ_bᵀ`` (``ḡ_b = vec Ḡ_b``, row-major), the matrix Adam, Adagrad and Shampoo
accumulate, by the block

    ``S̃_W = L_1^{1/m} ⊗ … ⊗ L_m^{1/m}``   ``(∏ d_i, ∏ d_i)``

whose inverse square root ``⊗ L_i^{-1/(2m)}`` is Shampoo's preconditioner (``L^{-1/4} ⊗ R^{-1/4}``
for matrices). The ``1/B`` and the ``1/m`` make ``S̃_W = S_WW`` whenever ``S_WW`` is the outer product
of one rank-one tensor gradient ``u_1 ∘ … ∘ u_m`` (one batch, e.g. one example through a Linear
layer without bias), since then ``L_i = (∏_j ‖u_j‖²) u_i u_iᵀ / ‖u_i‖²``.

Conventions of the study (ASDL ``ShampooGradientMaker``): tensors keep their shape (a Conv2d
kernel has four factors ``(c_out, c_in, k_h, k_w)`` with exponent ``1/4``), no blocking, no
merging of small dimensions. ASDL leaves 1-D parameters (biases) unpreconditioned, which
approximates no curvature; curvlab gives them the order-1 factor of Gupta et al. and of
distributed Shampoo, ``L_1 = (1/B) Σ ḡ_b ḡ_bᵀ``, which is the exact block ``S_bb``. A tensor with
a dimension larger than ``max_dim`` gets the diagonal of ``S`` instead (diagonal AdaGrad, the
large-dimension fallback of distributed Shampoo), so that no huge factor is formed. Blocks are
per parameter tensor; a 0-d parameter is a 1-vector.
"""

import torch

from curvlab.approx.base import Approximation, DiagonalBlock, KroneckerBlock, Reshape
from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators.gradient_second_moment import batch_gradient
from curvlab.problem import Problem

CURVATURES = ("gradient_second_moment",)


def batch_gradients(problem: Problem):
    """Yield ``Ḡ_b`` for every batch ``b``: name -> tensor of the parameter's shape.

    ``Ḡ_b`` is the gradient of batch ``b``'s loss reduced as torch reduces it on that batch alone:
    ``(1/T_b) Σ_{n∈b} ℓ_n`` for ``reduction="mean"`` (``T_b`` the batch's number of terms),
    ``Σ_{n∈b} ℓ_n`` for ``"sum"``.
    """
    for _, X, y in problem.batches():
        yield problem.unflatten(batch_gradient(problem, X, y))


def _unfolding_products(gradient: torch.Tensor) -> list[torch.Tensor]:
    """``Ḡ^{(i)} Ḡ^{(i)ᵀ}`` for every mode ``i`` of ``gradient`` (a 0-d tensor counts as a 1-vector)."""
    tensor = gradient.reshape(1) if gradient.ndim == 0 else gradient
    products = []
    for mode in range(tensor.ndim):
        others = [axis for axis in range(tensor.ndim) if axis != mode]
        products.append(torch.tensordot(tensor, tensor, dims=(others, others)))
    return products


def shampoo_factors(problem: Problem, max_dim: int | None = 4096) -> dict[str, list[torch.Tensor]]:
    """Shampoo's factors ``L_i = (1/B) Σ_b Ḡ_b^{(i)} Ḡ_b^{(i)ᵀ}`` of every studied parameter.

    Args:
        problem: the model, data (``B`` batches), loss and studied parameters.
        max_dim: a parameter with a dimension above it gets one factor: the diagonal
            ``(1/B) Σ_b Ḡ_b²`` of the gradient second moment, shape ``(numel,)``. ``None``: no limit.

    Returns:
        name -> the list of factors ``(d_i, d_i)``, one per dimension (one ``(1, 1)`` factor for a
        0-d parameter), or ``[diagonal]`` for a parameter over ``max_dim``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.shampoo import shampoo_factors
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> [tuple(f.shape) for f in shampoo_factors(prob)["weight"]]
        [(2, 2), (3, 3)]
    """
    if max_dim is not None:
        max_dim = require_integer("max_dim", max_dim, hint=" or None")
    shapes = dict(zip(problem.param_names, problem.param_shapes))
    diagonal = {name for name, shape in shapes.items() if max_dim is not None and any(d > max_dim for d in shape)}
    totals: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for gradients in batch_gradients(problem):
            for name, gradient in gradients.items():
                terms = [gradient.square().flatten()] if name in diagonal else _unfolding_products(gradient)
                if name in totals:
                    for total, term in zip(totals[name], terms):
                        total.add_(term)
                else:
                    totals[name] = terms
    return {name: [problem.reduce(total) / problem.num_batches for total in totals[name]] for name in problem.param_names}


def shampoo(problem: Problem, curvature: str = "gradient_second_moment", exponent_order: int | None = None,
            max_dim: int | None = 4096) -> Approximation:
    """Shampoo's approximation ``diag_W(L_1^{1/m} ⊗ … ⊗ L_m^{1/m})`` of the gradient second moment.

    Args:
        problem: the model, data (``B`` batches), loss and studied parameters.
        curvature: ``"gradient_second_moment"`` (``(1/B) Σ_b ḡ_b ḡ_bᵀ``), the only matrix whose
            factors Shampoo accumulates.
        exponent_order: ``None`` takes each tensor's order ``m`` in the exponent ``1/m`` (Gupta et
            al., ASDL); an integer ``k`` gives every factor the exponent ``1/k`` (as distributed
            Shampoo's exponent override; the preconditioner is then ``⊗ L_i^{-1/(2k)}``).
        max_dim: tensors with a dimension above it get a diagonal block (``None``: no limit).

    Returns:
        An :class:`Approximation` with one :class:`KroneckerBlock` per parameter (factors
        ``L_i^{1/m}``, so ``power(p)`` acts per factor), or a :class:`DiagonalBlock` past ``max_dim``.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> from curvlab.approx import approximate
        >>> S = approximate(prob, "shampoo", curvature="gradient_second_moment")
        >>> S.shape, [label for label, _, _ in S.blocks]
        ((8, 8), ['weight', 'bias'])
    """
    if curvature not in CURVATURES:
        raise InvalidProblem(
            f"shampoo approximates only curvature='gradient_second_moment' (the average of ḡ_b ḡ_bᵀ over the "
            f"batches, which Shampoo accumulates), got curvature={curvature!r}"
        )
    if exponent_order is not None:
        exponent_order = require_integer("exponent_order", exponent_order, hint=" or None")
    factors = shampoo_factors(problem, max_dim)
    blocks = []
    for name, shape in zip(problem.param_names, problem.param_shapes):
        stats = factors[name]
        if stats[0].ndim == 1:
            blocks.append((name, [name], DiagonalBlock(stats[0])))
            continue
        order = exponent_order or len(stats)
        layout = Reshape([stat.shape[0] for stat in stats])
        blocks.append((name, [name], KroneckerBlock(stats, layout).power(1 / order)))
    return Approximation(problem, "shampoo", curvature, blocks)
