"""The gradient second moment ``M = (1/B) Σ_b ḡ_b ḡ_bᵀ`` over the ``B`` batches of the data.

``ḡ_b`` ``(P,)`` is the gradient of batch b's loss reduced as torch reduces it on that batch alone:
``(1/T_b) Σ_{n ∈ b} ℓ_n`` for ``reduction="mean"`` (``T_b`` the terms torch averages over in batch
b: its examples, or examples × positions / entries), ``Σ_{n ∈ b} ℓ_n`` for ``"sum"``. One mini-batch
gradient per step is what Adam, Adagrad and Shampoo accumulate (summed or averaged over steps), so
``M`` is the matrix they estimate; ``diag(M)`` is what Adam's ``v`` and Adagrad's accumulator hold
(before the square root). ``rank M ≤ B``. Unlike the other kinds, ``M`` depends on how the data is
split into batches: with mean reduction, ``E[ḡ_b ḡ_bᵀ] = ∇L ∇Lᵀ + Σ/N_b`` for batches drawn at random.

The ``B`` gradients are computed once, at the first product, and kept as the rows of ``Ḡ``
``(B, P)``; a product with ``K`` directions ``V`` ``(K, P)`` is ``V M = (1/B) (V Ḡᵀ) Ḡ``.
"""

import torch
from torch.func import grad

from curvlab.errors import InvalidProblem
from curvlab.memory import check_dense
from curvlab.operators.base import CurvatureOperator
from curvlab.parallel import concat_over_ranks
from curvlab.problem import Problem, differentiable_kernels


def batch_gradient(problem: Problem, X, y: torch.Tensor) -> torch.Tensor:
    """``ḡ_b`` ``(P,)``: the gradient of one batch's loss reduced as torch reduces it on that batch alone.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.operators.gradient_second_moment import batch_gradient
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> prob = curvlab.Problem(model, [(X[:1], y[:1]), (X[1:], y[1:])])
        >>> g = batch_gradient(prob, X[1:], y[1:])
        >>> loss = torch.nn.functional.cross_entropy(model(X[1:]), y[1:])  # mean over its 3 examples
        >>> bool(torch.allclose(g[:6], torch.autograd.grad(loss, model.weight)[0].flatten()))
        True
    """
    if problem.batch_part is not None:
        raise InvalidProblem("per-batch gradients need whole batches on each rank; this problem's one batch is "
                             "split over the ranks (an optimizer step's): build a Problem on the rank's batches")
    likelihood = problem.likelihood

    def loss(params):
        output = problem.forward(params, X)
        total = likelihood.loss(output, y)
        return total if problem.reduction == "sum" else total / likelihood.validate(output, y)

    with differentiable_kernels():
        return problem.flatten(grad(loss)(problem.params))


class GradientSecondMoment(CurvatureOperator):
    """``M = (1/B) Σ_b ḡ_b ḡ_bᵀ``, shape ``(P, P)``, positive semi-definite, rank at most ``B``.

    Keeping ``Ḡ`` ``(B, P)`` is refused with :class:`curvlab.DenseTooLarge` when ``B · P · itemsize``
    exceeds the memory budget of :mod:`curvlab.memory`.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> prob = curvlab.Problem(model, [(X[:2], y[:2]), (X[2:], y[2:])])
        >>> M = curvlab.curvature(prob, "gradient_second_moment")
        >>> int(torch.linalg.matrix_rank(M.to_dense()))
        2
    """

    kind = "gradient_second_moment"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        self._gradients: torch.Tensor | None = None

    def batch_gradients(self) -> torch.Tensor:
        """``Ḡ`` ``(B, P)``: row b is ``ḡ_b``, in the order of the batches (of all ranks, in rank order)."""
        if self._gradients is None:
            problem = self.problem
            check_dense(problem.num_batches, problem.num_params, self.dtype, self.device,
                        "(batches, P) matrix of batch gradients")
            local = torch.stack([batch_gradient(problem, X, y) for _, X, y in problem.batches()])
            self._gradients = concat_over_ranks(local, problem.process_group)
        return self._gradients

    def _matmat(self, rows):
        gradients = self.batch_gradients()
        return (rows @ gradients.T) @ gradients / gradients.shape[0]
