"""The Hessian ``H = ∇²L(θ)``, applied matrix-free as reverse-over-reverse products.

One forward and backward pass builds ``∇L`` with its graph; since ``H`` is symmetric, pulling a
direction ``v`` back through ``∇L`` gives ``H v``, and K directions are K passes back through the
one recorded graph, which :meth:`~curvlab.operators.base.SummedOverData.reusing_passes` keeps for
the next products. (Reverse-over-forward, ``∇(∇Lᵀv)``, would skip the weight-gradient products of
``∇L``, but torch 2.13 differentiates layer norm's forward-mode rule wrongly: 10% error.)
"""

from collections.abc import Mapping

import torch
from torch.func import grad, vjp

from curvlab.operators.base import SummedOverData
from curvlab.problem import Problem, differentiable_kernels


class Hessian(SummedOverData):
    """``H = ∇²_θ L``, shape ``(P, P)``."""

    kind = "hessian"

    def _batch_matmat(self, index, X, y, directions):
        problem = self.problem

        def record():
            return vjp(grad(lambda p: problem.batch_loss(p, X, y)), problem.params)[1]

        pullback = self._recorded_pass(index, record) or record()
        count = next(iter(directions.values())).shape[0]
        columns = (pullback({name: direction[k] for name, direction in directions.items()})[0]
                   for k in range(count))
        return problem.stack_columns(columns, count)


def gradient_and_hessian_product(problem: Problem, direction: Mapping[str, torch.Tensor]
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(∇L, H v)`` for ``v`` given as name -> tensor, from one pass per batch (summed over ranks).

    The gradient is the value of the reverse-over-reverse product, which :class:`Hessian` discards: one
    forward pass, one backward pass recording its graph and one pass back through it give both, as the
    Hessian-vector products of training loops (PSGD's) do. A problem whose loss is not known yet records it
    (:meth:`~curvlab.Problem.record_loss`).
    """
    gradient, product, total = None, None, 0.0

    def loss_and_value(params, X, y):
        loss = problem.batch_loss(params, X, y)
        return loss, loss.detach()

    with torch.no_grad(), differentiable_kernels():
        for _, X, y in problem.batches():
            share, pullback, loss = vjp(grad(lambda p: loss_and_value(p, X, y), has_aux=True), problem.params,
                                        has_aux=True)
            total = total + loss
            (share_product,) = pullback(dict(direction))
            del pullback  # the recorded graph, before the next batch records its own
            if gradient is None:
                gradient, product = share, share_product
            else:
                for name in gradient:
                    gradient[name].add_(share[name])
                    product[name].add_(share_product[name])
    for tensors in (gradient, product):
        for tensor in tensors.values():
            problem.reduce(tensor)
    problem.record_loss(total)
    return gradient, product
