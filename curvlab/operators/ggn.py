"""The generalized Gauss-Newton ``G = R Σ_n J_nᵀ ∇²_f ℓ_n J_n``; the exact Fisher equals it for curvlab's losses."""

from curvlab.operators.output_space import OutputSpaceCurvature


class GGN(OutputSpaceCurvature):
    """``G = R Σ_n J_nᵀ ∇²_f ℓ(f_n, y_n) J_n``, shape ``(P, P)``, positive semi-definite."""

    kind = "ggn"

    def _output_product(self, index, output, y, u):
        return self.problem.likelihood.hessian_product(output, u)


class Fisher(GGN):
    """The exact Fisher ``E_ŷ[∇ℓ(f, ŷ)∇ℓ(f, ŷ)ᵀ]`` summed over examples: equal to the GGN here."""

    kind = "fisher"
