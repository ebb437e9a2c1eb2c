"""The empirical Fisher ``E = R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with the true targets."""

from curvlab.operators.output_space import OutputSpaceCurvature


class EmpiricalFisher(OutputSpaceCurvature):
    """``E = R Σ_n g_n g_nᵀ``, ``g_n = J_nᵀ r_n``, ``r_n = ∂ℓ(f_n, y_n)/∂f_n``: ``M_n = r_n r_nᵀ``."""

    kind = "empirical_fisher"

    def _output_product(self, index, output, y, u):
        residual = self.problem.likelihood.output_grad(output, y)
        weight = (residual * u).flatten(1).sum(1)
        return weight.view(-1, *[1] * (u.ndim - 1)) * residual
