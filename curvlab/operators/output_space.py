"""Curvature of the form ``C = R Σ_n J_nᵀ M_n J_n``, with ``J_n = ∂f(θ, x_n)/∂θ`` and an output-space ``M_n``.

The GGN, the exact, Monte-Carlo and empirical Fishers differ only in ``M_n``. One direction costs
one forward pass carrying the tangent ``J v`` and one backward pass of ``R · M J v``. K directions
share one forward pass: the K tangents ``J v_k`` are pushed forward together (vmap), and each
``R · M J v_k`` is pulled back through the one recorded graph.
"""

from abc import abstractmethod

import torch
from torch.func import jvp, vjp, vmap

from curvlab.operators.base import SummedOverData


class OutputSpaceCurvature(SummedOverData):
    """``R Σ_n J_nᵀ M_n J_n``; a subclass defines ``M_n u_n`` for a batch of outputs."""

    @abstractmethod
    def _output_product(self, index: int, output: torch.Tensor, y: torch.Tensor,
                        u: torch.Tensor) -> torch.Tensor:
        """``M_n u_n`` for every example ``n`` of batch ``index``: ``u`` has the outputs' shape."""

    def _batch_matmat(self, index, X, y, directions):
        problem = self.problem
        params = problem.params
        R = problem.reduction_factor

        def forward(p):
            return problem.forward(p, X)

        count = next(iter(directions.values())).shape[0]
        if count == 1:
            v = {name: direction[0] for name, direction in directions.items()}
            output, pullback, tangent = vjp(lambda p: jvp(forward, (p,), (v,)), params, has_aux=True)
            return problem.flatten(pullback(R * self._output_product(index, output, y, tangent))[0]).unsqueeze(0)
        output, pullback = vjp(forward, params)
        # A tangent laid out unlike its primal (a view into the (K, P) rows) is copied by forward-mode AD
        # into a zero-filled buffer; contiguous per-parameter blocks are taken as they are.
        directions = {name: direction.contiguous() for name, direction in directions.items()}
        tangents = vmap(lambda v: jvp(forward, (params,), (v,))[1])(directions)
        cotangents = R * vmap(lambda u: self._output_product(index, output, y, u))(tangents)
        return problem.stack_columns((pullback(cotangent)[0] for cotangent in cotangents), count)
