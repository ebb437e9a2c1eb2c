"""The low-rank approximation: the top-k eigenpairs of a curvature operator, plus an optional diagonal.

For a symmetric ``(P, P)`` operator ``C`` with Ritz pairs ``(Λ, V)`` from thick-restart Lanczos
(:mod:`curvlab.operators.lanczos`), ``Λ`` ``(k,)`` and unit columns ``V`` ``(P, k)`` selected by
``which`` (``"LM"`` the largest in magnitude by default), the approximation is

    ``C̃ = D + V Λ Vᵀ``,

one :class:`~curvlab.approx.base.LowRankBlock` over all parameters (label ``"all"``), whose damped
inverse ``(C̃ + δ I)⁻¹`` is Sherman–Morrison–Woodbury and whose powers, without ``D``, are
``V Λ^p Vᵀ``. With the ``k`` eigenpairs of largest magnitude and no diagonal, ``V Λ Vᵀ`` is the best
rank-k approximation of ``C`` in every unitarily invariant norm (Eckart–Young–Mirsky).

The diagonal ``D`` (``diagonal="exact"``) is the diagonal of the residual ``C − V Λ Vᵀ``:
``d_i = C_ii − Σ_j Λ_j V_ij²``, so that ``C̃`` has exactly the diagonal of ``C`` and the rank-k part
carries the top of the spectrum. ``diag C`` comes from the ``P`` products with the identity's rows
(:func:`curvlab.operators.base.exact_diagonal`): affordable for small models, and far dearer than Lanczos'
few times ``k`` products when ``P ≫ k``.

**Unconverged pairs.** Every Ritz pair has the relative residual
``ρ = ‖C v − θ v‖ / max(|θ|, 10⁻³ ‖T‖₂)`` (see :mod:`curvlab.operators.lanczos`); pairs with
``ρ > tol`` are not eigenpairs to the requested accuracy. By default they are refused
(``unconverged="raise"``); with ``unconverged="warn"`` they are kept with a ``UserWarning``. Either
way the residuals and convergence flags stay on the result (:class:`LowRank`).
"""

import warnings

import torch

from curvlab.approx.base import Approximation, LowRankBlock
from curvlab.approx.target import curvature_operator
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.operators.base import CurvatureOperator, exact_diagonal
from curvlab.operators.lanczos import WHICH, RitzPairs, lanczos
from curvlab.problem import Problem

DIAGONALS = (None, "exact")
UNCONVERGED = ("raise", "warn")


class LowRank(Approximation):
    """``C̃ = D + V Λ Vᵀ`` from ``k`` Ritz pairs of a curvature operator (see the module).

    Attributes:
        eigenvalues: ``Λ`` ``(k,)`` ascending.
        eigenvectors: ``V`` ``(P, k)`` unit columns.
        residuals: ``(k,)`` relative residuals of the Ritz pairs.
        converged: ``(k,)`` bool, ``residuals ≤ tol``.
        products: the operator products used, Lanczos' and the diagonal's.
        diagonal: ``D`` as a ``(P,)`` tensor, or ``None``.
    """

    def __init__(self, problem: Problem, curvature: str, pairs: RitzPairs, diagonal: torch.Tensor | None,
                 products: int):
        block = LowRankBlock(pairs.vectors, torch.diag(pairs.values), diagonal)
        super().__init__(problem, "lowrank", curvature, [("all", list(problem.param_names), block)])
        self.eigenvalues = pairs.values
        self.eigenvectors = pairs.vectors
        self.residuals = pairs.residuals
        self.converged = pairs.converged
        self.products = products
        self.diagonal = diagonal


def lowrank(problem: Problem, curvature: str = "ggn", k: int = 20, which: str = "LM", diagonal: str | None = None,
            tol: float = 1e-6, seed: int = 0, *, max_products: int | None = None, dtype: torch.dtype | None = None,
            unconverged: str = "raise", operator: CurvatureOperator | None = None, progress: bool = True,
            **curvature_options) -> LowRank:
    """``C̃ = D + V Λ Vᵀ`` from the ``k`` Lanczos eigenpairs of ``curvature`` that ``which`` selects.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: the exact kind (any of :data:`curvlab.KINDS`); with ``operator``, the kind it stands for.
        k: the rank, ``1 ≤ k ≤ P``.
        which: ``"LM"`` largest magnitude, ``"LA"`` largest, ``"SA"`` smallest, ``"BE"`` both ends.
        diagonal: ``None`` (``D = 0``) or ``"exact"``: ``D = diag(C − V Λ Vᵀ)`` from ``P`` more products.
        tol: the relative residual every Ritz pair must reach.
        seed: seeds Lanczos' start vector (a local generator: the caller's random state is untouched)
            and the curvature's own sampling (``fisher_mc`` labels).
        max_products: Lanczos' product budget, at least ``2k``; default ``20 k + 200``.
        dtype: the precision of the Lanczos basis (default the problem's).
        unconverged: ``"raise"`` refuses Ritz pairs with residual above ``tol``; ``"warn"`` keeps them
            and warns.
        operator: a :class:`~curvlab.operators.CurvatureOperator` of shape ``(P, P)`` to approximate
            instead of ``curvlab.curvature(problem, curvature)`` (e.g. a block-diagonal one, or
            another approximation).
        progress: show Lanczos' and the diagonal's progress bars on stderr.
        curvature_options: ``mc_samples``, ``block_diagonal``, ``top_k`` of :func:`curvlab.curvature`.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx import approximate
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(10, 3).double()                      # P = 33
        >>> prob = curvlab.Problem(model, (torch.randn(6, 10), torch.tensor([0, 1, 2, 0, 1, 2])))
        >>> ap = approximate(prob, "lowrank", "ggn", k=4, tol=1e-10, progress=False)
        >>> G = curvlab.curvature(prob, "ggn").to_dense()
        >>> bool(torch.allclose(ap.eigenvalues, torch.linalg.eigvalsh(G)[-4:], rtol=1e-8))
        True
        >>> ap.inverse(1e-3).shape, bool(ap.converged.all())
        ((33, 33), True)
    """
    op = curvature_operator(problem, curvature, operator, seed, curvature_options)
    P = problem.num_params
    k = require_integer("k", k, maximum=P, hint=" (P, the number of studied parameters)")
    if which not in WHICH:
        raise InvalidProblem(f"unknown which {which!r}; choose one of {', '.join(map(repr, WHICH))}")
    if diagonal not in DIAGONALS:
        raise InvalidProblem(f"unknown diagonal {diagonal!r}; choose None or 'exact'")
    tol = require_number("tol", tol)
    if unconverged not in UNCONVERGED:
        raise InvalidProblem(f"unknown unconverged {unconverged!r}; choose 'raise' or 'warn'")
    if max_products is None:
        max_products = 20 * k + 200
    max_products = require_integer("max_products", max_products, minimum=2 * k,
                                   hint=" (2k: k Lanczos steps and k products to check them)")
    pairs = lanczos(op, k, which, tol, seed, max_products, dtype or problem.dtype, progress)
    _check_converged(pairs, tol, unconverged)
    values, vectors = pairs.values.to(problem.dtype), pairs.vectors.to(problem.dtype)
    pairs = RitzPairs(values, vectors, pairs.residuals, pairs.converged, pairs.products)
    if diagonal is None:
        return LowRank(problem, curvature, pairs, None, pairs.products)
    residual_diagonal = exact_diagonal(op, progress=progress) - (vectors.square() * values).sum(1)
    return LowRank(problem, curvature, pairs, residual_diagonal, pairs.products + P)


def _check_converged(pairs: RitzPairs, tol: float, unconverged: str) -> None:
    """Refuse (or warn about) Ritz pairs whose relative residual exceeds ``tol``."""
    missing = int((~pairs.converged).sum())
    if not missing:
        return
    message = (f"{missing} of {pairs.converged.numel()} Ritz pairs did not converge within {pairs.products} "
               f"products (largest relative residual {float(pairs.residuals.max()):.3g} > tol {tol:g})")
    if unconverged == "raise":
        raise InvalidProblem(f"{message}; raise max_products, loosen tol, lower k, or pass unconverged='warn'")
    warnings.warn(f"{message}; keeping them (unconverged='warn')", stacklevel=3)
