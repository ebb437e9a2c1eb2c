"""The Monte-Carlo Fisher ``F_mc = R Σ_n (1/S) Σ_s ∇ℓ(f_n, ŷ_ns) ∇ℓ(f_n, ŷ_ns)ᵀ``, ``ŷ_ns ~ p(y | f_n)``.

The labels of batch b are drawn once from a generator seeded by ``(seed, b)``, so the operator is a
fixed matrix (products agree, Lanczos and CG on it are well defined) and the caller's RNG is untouched.
In output space ``M_n = (1/S) Σ_s r_ns r_nsᵀ`` with ``r_ns = ∂ℓ(f_n, ŷ_ns)/∂f_n``; it is kept as the
``S`` residuals when ``S`` is below the output size ``D`` of an example, else as the dense ``(D, D)``
matrix, so a product costs ``min(S, D) · D`` per example and column.
"""

import torch

from curvlab.errors import require_integer
from curvlab.operators.output_space import OutputSpaceCurvature


class FisherMC(OutputSpaceCurvature):
    """``F_mc``, shape ``(P, P)``; ``E[F_mc] = G``, and its rank is at most ``N · S``."""

    kind = "fisher_mc"

    def __init__(self, problem, mc_samples: int = 1, seed: int = 0):
        super().__init__(problem)
        self.mc_samples = require_integer("mc_samples", mc_samples)
        self.seed = seed
        self._targets: dict[int, torch.Tensor] = {}
        self._output_curvature: dict[int, tuple[bool, torch.Tensor]] = {}

    def _draw(self, index: int, X) -> None:
        """Sample batch ``index``'s labels and keep its output-space ``M_n`` in the cheaper form."""
        output = self.problem.forward(self.problem.params, X)
        targets = self.problem.sample_targets(index, output, self.mc_samples, self.seed)
        residuals = self.problem.likelihood.output_grad(output, targets).flatten(2) / self.mc_samples ** 0.5
        dense = self.mc_samples >= residuals.shape[-1]
        self._targets[index] = targets
        self._output_curvature[index] = (
            (True, torch.einsum("snd,sne->nde", residuals, residuals)) if dense else (False, residuals)
        )

    def sampled_targets(self) -> list[torch.Tensor]:
        """The drawn labels, one ``(S, *target_shape)`` tensor per batch (of this rank's shard)."""
        with torch.no_grad():
            for index, X, _ in self.problem.batches():
                if index not in self._targets:
                    self._draw(index, X)
        return [self._targets[index] for index in sorted(self._targets)]

    def _batch_matmat(self, index, X, y, directions):
        if index not in self._targets:
            self._draw(index, X)
        return super()._batch_matmat(index, X, y, directions)

    def _output_product(self, index, output, y, u):
        dense, curvature = self._output_curvature[index]
        flat = u.flatten(1)
        if dense:
            return torch.einsum("nde,ne->nd", curvature, flat).view_as(u)
        weights = torch.einsum("snd,nd->sn", curvature, flat)
        return torch.einsum("sn,snd->nd", weights, curvature).view_as(u)
