"""The Hessian ``H = ∇²L(θ)``, applied matrix-free as reverse-over-reverse products.

One forward and backward pass builds ``∇L`` with its graph; since ``H`` is symmetric, pulling a
direction ``v`` back through ``∇L`` gives ``H v``, and K directions are K passes back through the
one recorded graph, which :meth:`~curvlab.operators.base.SummedOverData.reusing_passes` keeps for
the next products. (Reverse-over-forward, ``∇(∇Lᵀv)``, would skip the weight-gradient products of
``∇L``, but torch 2.13 differentiates layer norm's forward-mode rule wrongly: 10% error.)
"""

from torch.func import grad, vjp

from curvlab.operators.base import SummedOverData


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
