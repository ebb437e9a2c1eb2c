"""Curvature of the form ``C = R Σ_n J_nᵀ M_n J_n``, with ``J_n = ∂f(θ, x_n)/∂θ`` and an output-space ``M_n``.

The GGN, the exact, Monte-Carlo and empirical Fishers differ only in ``M_n``. One direction costs
one forward pass carrying the tangent ``J v`` and one backward pass of ``R · M J v``. K directions
share one forward pass: the K tangents ``J v_k`` are pushed forward together (vmap), and each
``R · M J v_k`` is pulled back through the one recorded graph.

Within :meth:`~curvlab.operators.base.SummedOverData.reusing_passes`, for models of at least
:data:`LINEARISE_FROM` studied parameters, the first batch's forward pass is recorded once, linearised
(:func:`torch.func.linearize`, whose traced tangent map skips the primal computation) and with its
pullback, and each product replays both: 1.5 instead of 2.0 gradients on the seed study's MLP, for a
recording of about 4, so Lanczos and SLQ on the GGN take about 18 % less time there. ``linearize``
traces the pass with ``make_fx`` at the fixed ``θ`` and inputs (Python branches on tensor values take
the branch of that point, which is the one every product there takes); a model it cannot trace keeps
the plain products.
"""

import warnings
from abc import abstractmethod

import torch
from torch.func import jvp, linearize, vjp, vmap

from curvlab.operators.base import SummedOverData

LINEARISE_FROM = 10**6
"""Studied parameters from which products within ``reusing_passes`` replay a linearised pass.

Tracing costs a fixed 60–120 ms besides the passes (measured on models of a few hundred parameters,
whose products take 1–3 ms); from about a million parameters a product takes tens of milliseconds and
the recording pays for itself within about ten products.
"""


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

        recorded = (self._recorded_pass(index, lambda: _linearised(forward, params))
                    if problem.num_params >= LINEARISE_FROM else None)
        count = next(iter(directions.values())).shape[0]
        if recorded is not None:
            output, tangent_map, pullback = recorded  # the traced tangent map takes one direction at a time
            tangents = torch.stack([tangent_map({name: direction[k] for name, direction in directions.items()})
                                    for k in range(count)])
        elif count == 1:
            v = {name: direction[0] for name, direction in directions.items()}
            output, pullback, tangent = vjp(lambda p: jvp(forward, (p,), (v,)), params, has_aux=True)
            return problem.flatten(pullback(R * self._output_product(index, output, y, tangent))[0]).unsqueeze(0)
        else:
            output, pullback = vjp(forward, params)
            # A tangent laid out unlike its primal (a view into the (K, P) rows) is copied by forward-mode AD
            # into a zero-filled buffer; contiguous per-parameter blocks are taken as they are.
            directions = {name: direction.contiguous() for name, direction in directions.items()}
            tangents = vmap(lambda v: jvp(forward, (params,), (v,))[1])(directions)
        cotangents = R * vmap(lambda u: self._output_product(index, output, y, u))(tangents)
        return problem.stack_columns((pullback(cotangent)[0] for cotangent in cotangents), count)


def _linearised(forward, params):
    """``(f(θ), v ↦ J v, u ↦ Jᵀ u)`` of one batch's forward pass, or ``None`` when it cannot be traced.

    ``linearize`` traces the forward pass with ``make_fx`` (its constant folding warns about a detail of
    the traced module; that warning is silenced).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
            output, tangent_map = linearize(forward, params)
    except Exception:  # an operation make_fx cannot trace: the batch keeps the plain products
        return None
    _, pullback = vjp(forward, params)
    return output, tangent_map, pullback

