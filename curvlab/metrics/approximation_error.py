"""How far an approximation ``A`` is from the exact curvature ``C``, for the whole model and per block.

``A`` and ``C`` are symmetric ``(P, P)`` operators over the same studied parameters. Every quantity is
computed for the whole model (``A`` against the full ``C``, off-diagonal blocks included) and for each
diagonal block ``A_bb``, ``C_bb`` ``(p_b, p_b)``: the approximation's own blocks when it is a
:class:`curvlab.approx.Approximation`, else one block per module (``problem.module_blocks()``);
``C_bb`` is ``exact.block(names)``, the exact restriction. With ``⟨A, C⟩_F = tr(Aᵀ C)``:

- ``rel_fro = ‖A − C‖_F / ‖C‖_F``;
- ``rel_fro_scaled = min_α ‖α A − C‖_F / ‖C‖_F``, at ``scale`` ``α = ⟨A, C⟩_F / ‖A‖_F²``, which equals
  ``sqrt(1 − cos_fro²)``: the error left once a preconditioner's scale is absorbed by the learning rate;
  never above ``rel_fro`` (``α = 1`` is one of the candidates);
- ``cos_fro = ⟨A, C⟩_F / (‖A‖_F ‖C‖_F)``;
- ``rel_spectral = ‖A − C‖₂ / ‖C‖₂``, ``‖M‖₂ = max |λ(M)|``;
- ``overlap_at_k = ‖U_Aᵀ U_C‖_F² / k`` (:func:`curvlab.spectra.eigenspace_overlap`), ``U_A``, ``U_C``
  ``(p, k)`` the eigenvectors of the ``k`` eigenvalues largest in **magnitude** (for positive
  semi-definite matrices the largest; for a Hessian the strongest curvature of either sign, the
  directions that also set ``‖·‖₂``); ``k`` is capped at the size ``P`` or ``p_b``. Where eigenvalues
  tie across the ``k``-th place (FOOF's ``A ⊗ I`` repeats each eigenvalue ``d_out`` times) the top-k
  eigenspace is not unique; dense mode then weights the tied eigenvectors and compares the two
  projectors by their Frobenius cosine (:func:`curvlab.spectra.overlap.projector_cosine`), the same
  number without ties and independent of the basis ``eigh`` returns within a tie;
- ``inverse_action = ‖(A + δI)⁻¹ v − (C + δI)⁻¹ v‖ / ‖(C + δI)⁻¹ v‖``, the mean over ``inverse_probes``
  Rademacher probes ``v`` ``(p,)`` with its standard error over them (in both modes: the probes are
  random, the solves are not), and ``inverse_action_gradient``, the same for ``v = ∇L`` (its block's
  entries for a block). ``(A + δI)⁻¹`` is ``approx.inverse(δ)`` when the approximation has one (per
  block, the block's own inverse), else a solve; ``(C + δI)⁻¹`` always a solve.

**Damping.** ``δ`` defaults to ``10⁻³ ‖C‖_F / √P``, a thousandth of the root-mean-square eigenvalue of
``C`` (positive for any nonzero ``C``, indefinite Hessians included), with ``‖C‖_F`` exact in dense
mode and the Hutchinson estimate below in randomized mode. The whole model's ``δ`` serves every
block, as an optimizer uses one damping.

**Dense mode** (when six ``(P, P)`` matrices fit the memory budget of :mod:`curvlab.memory`: ``A``,
``C`` and the working copies of the blocks, the difference and the eigenvectors): ``A`` and ``C``
are materialised (``P`` products of ``C``), blocks are their sub-matrices, the norms are exact,
eigenpairs come from ``eigh`` and solves from ``torch.linalg.solve``; standard errors are 0.

**Randomized mode** (beyond the budget, or ``method="randomized"``): for ``m = probes`` Rademacher
probes ``z`` ``(p,)`` each scope gets the per-probe terms ``x = (Az)ᵀ(Cz)``, ``y = ‖Az‖²``, ``w = ‖Cz‖²``,
``d = ‖(A − C)z‖²``, whose means estimate ``⟨A, C⟩_F``, ``‖A‖_F²``, ``‖C‖_F²`` and ``‖A − C‖_F²``
without bias, since ``E[z zᵀ] = I``. Each reported quantity is a smooth function ``f`` of the four
means ``μ̂``; its standard error is the delta method's ``sqrt(∇f(μ̂)ᵀ Σ̂ ∇f(μ̂) / m)``, ``Σ̂`` the
``(4, 4)`` sample covariance of the terms. The two relative errors are square roots of
``q = d̄ / w̄`` and ``q = 1 − x̄² / (ȳ w̄)``; their standard error is ``min(se_q / (2 √q), √se_q)``, the
delta method capped by ``|√(q + e) − √q| ≤ √e``, which keeps it finite at ``q = 0``. Ratios of means
are biased by ``O(1/m)``, an order below their standard error ``O(1/√m)``. The spectral norms and
eigenvectors come from Lanczos (:func:`curvlab.spectra.spectrum`, ``which="LM"``) on ``A − C``
(``k = 1``), ``C`` and ``A``, and ``spectral_converged`` says whether all their Ritz pairs reached
``tol`` (an exactly zero ``A_s − C_s`` counts as converged). Lanczos from one start vector sees one
copy of an exactly repeated eigenvalue (e.g. the ``⊗ I`` of an MSE output layer's GGN), so when such
a cluster is among the top ``k`` the randomized overlap is not that of the eigenspaces; use the dense
mode there. The damped solves ``(M + δI)⁻¹ v``, ``M`` being ``C`` (and ``A`` when it has no inverse
of its own), are conjugate gradients, one recurrence per vector, run in lockstep for all vectors of
all scopes (one batched product per step); a recurrence stops at the residual ``tol / 2`` (room for
the drift of recurrence from true residuals in floating point), and ``inverse_converged`` says
whether every true residual ``‖(M + δI)x − v‖ ≤ tol ‖v‖``, checked with one more product per vector.
When it is not, the inverse errors of that scope are nan rather than a wrong number. The solution's
relative error is at most the condition number of ``M + δI`` times ``tol``. Conjugate gradients need
``M + δI`` positive definite; for an indefinite ``C`` (a Hessian) they may stop without converging,
which the flag reports. Memory stays at a few ``(32, P)`` directions for the products plus the
``(inverse_probes + 1, P)`` conjugate-gradient state per scope, about ``8 (inverse_probes + 1) P``
numbers in all.

Random numbers come from a local CPU generator seeded with ``seed``: the ``inverse_probes`` rows of
``±1`` are drawn first (:func:`curvlab.operators.base.rademacher`), then, in randomized
mode, the ``probes`` Frobenius probes the same way; a block uses its entries of the whole model's
probes. The caller's random state is untouched.
"""

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import pandas as pd
import torch
from torch.func import grad
from tqdm.auto import tqdm

from curvlab.approx.base import Approximation
from curvlab.errors import DenseTooLarge, InvalidProblem, require_integer, require_number
from curvlab.memory import check_dense
from curvlab.operators.base import CurvatureOperator, rademacher
from curvlab.spectra.overlap import eigenspace_overlap, leading_eigenspace, projector_cosine
from curvlab.spectra.spectrum import spectrum

METHODS = ("auto", "dense", "randomized")
BATCH = 32  # the most directions in one product
DEFAULT_DAMPING = 1e-3  # δ = DEFAULT_DAMPING · ‖C‖_F / √P
DENSE_MATRICES = 6  # (P, P) matrices the dense mode holds at once: A, C, a block pair, A − C, eigenvectors
COLUMNS = ("rel_fro", "rel_fro_se", "rel_fro_scaled", "rel_fro_scaled_se", "scale", "scale_se", "cos_fro",
           "cos_fro_se", "rel_spectral", "overlap_at_k", "k", "spectral_converged", "inverse_action",
           "inverse_action_se", "inverse_action_gradient", "inverse_converged")


class _Scope(NamedTuple):
    """The whole model or one block: its label, flat indices ``(p,)`` in problem order and operators."""

    label: str
    index: torch.Tensor
    approx: CurvatureOperator  # A_s
    exact: CurvatureOperator  # C_s
    inverse: Callable[[float], CurvatureOperator] | None  # δ ↦ (A_s + δI)⁻¹, when A has its own


def approximation_error(approx: CurvatureOperator, exact: CurvatureOperator, damping: float | None = None,
                        k: int = 10, *, method: str = "auto", probes: int = 100, inverse_probes: int = 10,
                        seed: int = 0, tol: float = 1e-6, max_iterations: int = 1000, budget: int | None = None,
                        progress: bool = True) -> dict:
    """The errors of ``approx`` against ``exact``, for the whole model and per block (see the module).

    Args:
        approx: the approximation ``A``, any :class:`curvlab.operators.CurvatureOperator` (usually a
            :class:`curvlab.approx.Approximation`).
        exact: the exact curvature ``C`` of the same problem.
        damping: ``δ > 0`` of the inverse errors; ``None`` for ``10⁻³ ‖C‖_F / √P``.
        k: the eigenspace dimension of ``overlap_at_k``, at least 1 (capped at the model's and each block's size).
        method: ``"dense"``, ``"randomized"`` or ``"auto"`` (dense when six ``(P, P)`` matrices fit the budget).
        probes: Rademacher probes of the randomized Frobenius estimates, at least 2.
        inverse_probes: Rademacher probes of ``inverse_action``, at least 2.
        seed: seeds the local generator of every random number (probes, Lanczos starts).
        tol: the relative residual at which Lanczos and conjugate gradients stop (randomized mode). In
            float32 the solves' attainable residual is about the unit roundoff times the condition number
            of ``M + δI``, often above ``10⁻⁶``: they then report ``inverse_converged`` false; give a
            larger ``tol`` or analyse in float64.
        max_iterations: the most conjugate-gradient steps.
        budget: the memory budget in bytes for dense matrices (default: :mod:`curvlab.memory`'s).
        progress: show progress bars on stderr.

    Returns:
        A dict with ``mode`` (``"dense"`` or ``"randomized"``), ``damping`` (the δ used), ``products``
        (products of ``exact`` with one direction, each a pass over the data, the per-block ones
        included), the whole model's ``rel_fro``, ``rel_fro_scaled``, ``scale``, ``cos_fro`` (each with a
        ``_se`` standard error), ``rel_spectral``, ``overlap_at_k``, ``k``, ``spectral_converged``,
        ``inverse_action``, ``inverse_action_se``, ``inverse_action_gradient``, ``inverse_converged``,
        and ``per_block``: a :class:`pandas.DataFrame` with one row per block, the columns ``block``
        (its label), ``parameters`` (``p_b``) and the same quantities.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx import Approximation, DiagonalBlock
        >>> from curvlab.metrics import approximation_error
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()                       # P = 8
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> G = curvlab.curvature(prob, "ggn")
        >>> diagonal = DiagonalBlock(G.to_dense().diagonal())
        >>> diag = Approximation(prob, "diag", "ggn", [("", prob.param_names, diagonal)])
        >>> err = approximation_error(diag, G, k=2, progress=False)
        >>> err["mode"], 0 < err["rel_fro"] < 1, err["rel_fro_scaled"] <= err["rel_fro"]
        ('dense', True, True)
        >>> same = approximation_error(G, G, k=2, progress=False)
        >>> same["rel_fro"], same["rel_spectral"], round(same["cos_fro"], 12), round(same["overlap_at_k"], 12)
        (0.0, 0.0, 1.0, 1.0)
    """
    P = _check_arguments(approx, exact, damping, k, method, probes, inverse_probes, tol, max_iterations, seed)
    if method == "auto":
        try:
            check_dense(P, DENSE_MATRICES * P, exact.dtype, exact.device,
                        f"approximation, exact matrix and their {DENSE_MATRICES - 2} working copies", budget)
            method = "dense"
        except DenseTooLarge:
            method = "randomized"
    counted = _Counted(exact)
    scopes = _scopes(approx, counted)
    generator = torch.Generator().manual_seed(seed)
    probes_and_gradient = torch.cat([rademacher(generator, inverse_probes, P, exact.dtype, exact.device),
                                     exact.problem.gradient().to(exact.dtype)[None]])
    if method == "dense":
        rows, delta = _dense(approx, counted, scopes, probes_and_gradient, damping, k, budget, progress)
    else:
        rows, delta = _randomized(scopes, generator, probes, probes_and_gradient, damping, k, seed, tol,
                                  max_iterations, progress)
    table = pd.DataFrame([{"block": scope.label, "parameters": len(scope.index), **row}
                          for scope, row in zip(scopes[1:], rows[1:])], columns=["block", "parameters", *COLUMNS])
    return {"mode": method, "damping": delta, "products": counted.products, **rows[0], "per_block": table}


class _Counted(CurvatureOperator):
    """``C`` itself, counting the directions it is applied to."""

    def __init__(self, operator: CurvatureOperator):
        super().__init__(operator.problem)
        self.operator = operator
        self.kind = operator.kind
        self.products = 0

    def _matmat(self, rows):
        self.products += rows.shape[0]
        return self.operator._matmat(rows)

    def to_dense(self, budget: int | None = None, progress: bool = True) -> torch.Tensor:
        """``C``'s own ``to_dense`` (a dense matrix at hand is returned as it is), counted as ``P`` products."""
        self.products += self.shape[0]
        return self.operator.to_dense(budget, progress)


class _Difference(CurvatureOperator):
    """``A − C`` for two operators over the same parameters."""

    def __init__(self, first: CurvatureOperator, second: CurvatureOperator):
        super().__init__(second.problem)
        self.first, self.second = first, second
        self.kind = f"{first.kind} − {second.kind}"

    def _matmat(self, rows):
        return self.first._apply(rows) - self.second._apply(rows)


def _scopes(approx: CurvatureOperator, exact: CurvatureOperator) -> list[_Scope]:
    """The whole model, then one scope per block of the approximation (or per module)."""
    problem = approx.problem
    def index(names):
        return problem.entries([name for name in problem.param_names if name in set(names)])

    whole_inverse = approx.inverse if callable(getattr(approx, "inverse", None)) else None
    scopes = [_Scope("model", index(problem.param_names), approx, exact, whole_inverse)]
    if isinstance(approx, Approximation):
        for label, names, block in approx.blocks:
            own = Approximation(problem.restrict(names), approx.kind, approx.curvature, [(label, names, block)])
            scopes.append(_Scope(label, index(names), own, exact.block(names), own.inverse))
    else:
        for module, names in problem.module_blocks():
            scopes.append(_Scope(module, index(names), approx.block(names), exact.block(names), None))
    return scopes


def _dense(approx, exact, scopes, rhs, damping, k, budget, progress):
    """Every scope's errors from the dense ``A`` and ``C`` (``P`` products of ``C``)."""
    A = approx.to_dense(budget=budget, progress=progress).to(exact.dtype)
    C = exact.to_dense(budget=budget, progress=progress)
    delta = _default_damping(float(torch.linalg.matrix_norm(C)), C.shape[0]) if damping is None else damping
    rows, eigen_a = [None] * len(scopes), [None] * len(scopes)
    block_diagonal = isinstance(approx, Approximation)  # zero outside its blocks, which are scopes[1:]
    order = [*range(1, len(scopes)), 0] if block_diagonal else range(len(scopes))
    for position in tqdm(order, desc="approximation error", disable=not progress, leave=False):
        scope = scopes[position]
        index = scope.index
        A_s, C_s = A[index[:, None], index[None, :]], C[index[:, None], index[None, :]]
        A_s, C_s = (A_s + A_s.T) / 2, (C_s + C_s.T) / 2
        inner, norm_a, norm_c = (A_s * C_s).sum(), A_s.square().sum(), C_s.square().sum()
        scale = inner / norm_a
        k_s = min(k, len(index))
        if position == 0 and block_diagonal and sum(len(s.index) for s in scopes[1:]) == len(index):
            values_a, vectors_a = _block_diagonal_eigh(scopes[1:], eigen_a[1:], A_s)
        else:
            values_a, vectors_a = torch.linalg.eigh(A_s)
        eigen_a[position] = values_a, vectors_a
        whole = len(index) == C.shape[0] and hasattr(exact.operator, "eigh")  # a DenseMatrix's cached one
        values_c, vectors_c = exact.operator.eigh() if whole else torch.linalg.eigh(C_s)
        eye = torch.eye(len(index), dtype=C.dtype, device=C.device)
        V = rhs[:, index]
        if scope.inverse is not None:
            solved_a = (scope.inverse(delta) @ V.T).T
        else:
            solved_a = torch.linalg.solve(A_s + delta * eye, V.T).T
        solved_c = torch.linalg.solve(C_s + delta * eye, V.T).T
        rows[position] = {
            "rel_fro": float(torch.linalg.matrix_norm(A_s - C_s) / norm_c.sqrt()), "rel_fro_se": 0.0,
            "rel_fro_scaled": float(torch.linalg.matrix_norm(scale * A_s - C_s) / norm_c.sqrt()),
            "rel_fro_scaled_se": 0.0, "scale": float(scale), "scale_se": 0.0,
            "cos_fro": float(inner / (norm_a * norm_c).sqrt()), "cos_fro_se": 0.0,
            "rel_spectral": float(torch.linalg.eigvalsh(A_s - C_s).abs().max() / values_c.abs().max()),
            "overlap_at_k": projector_cosine(leading_eigenspace(values_a, vectors_a, k_s),
                                             leading_eigenspace(values_c, vectors_c, k_s)),
            "k": k_s, "spectral_converged": True,
            **_inverse_errors(solved_a, solved_c, True),
        }
    return rows, delta


def _block_diagonal_eigh(blocks: list[_Scope], eigen: list[tuple[torch.Tensor, torch.Tensor]],
                         A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of ``A`` ``(P, P)``, zero outside the diagonal blocks of ``blocks`` (which partition ``P``), from theirs.

    Each block's eigenvectors ``(p_b, p_b)`` fill its rows and a range of columns of a ``(P, P)`` matrix:
    ``O(Σ p_b³)`` work instead of ``O(P³)``.
    """
    values = torch.empty(A.shape[0], dtype=A.dtype, device=A.device)
    vectors = torch.zeros_like(A)
    start = 0
    for scope, (block_values, block_vectors) in zip(blocks, eigen):
        stop = start + len(scope.index)
        values[start:stop] = block_values
        vectors[scope.index, start:stop] = block_vectors
        start = stop
    order = values.argsort()
    return values[order], vectors[:, order]


def _randomized(scopes, generator, probes, rhs, damping, k, seed, tol, max_iterations, progress):
    """Every scope's errors from Hutchinson estimates, Lanczos and conjugate gradients."""
    P = rhs.shape[1]
    terms = _frobenius_terms(scopes, generator, probes, P, progress)
    if damping is None:
        damping = _default_damping(math.sqrt(max(float(terms[0][:, 2].mean()), 0.0)), P)
    solved_c, converged_c = _damped_solve(scopes[0].exact, scopes, rhs, damping, tol, max_iterations, progress)
    solved_a, converged_a = _approximate_solve(scopes, rhs, damping, tol, max_iterations, progress)
    options = {"method": "lanczos", "which": "LM", "tol": tol, "seed": seed, "progress": progress}
    rows = []
    for s, scope in enumerate(tqdm(scopes, desc="approximation error (lanczos)", disable=not progress, leave=False)):
        k_s = min(k, len(scope.index))
        difference = spectrum(_Difference(scope.approx, scope.exact), k=1, vectors=False, **options)
        top_c, top_a = spectrum(scope.exact, k=k_s, **options), spectrum(scope.approx, k=k_s, **options)
        rows.append({
            **_frobenius(terms[s]),
            "rel_spectral": float(difference.eigenvalues.abs().max() / top_c.eigenvalues.abs().max()),
            "overlap_at_k": eigenspace_overlap(top_a, top_c), "k": k_s,
            "spectral_converged": all(_converged(spec) for spec in (difference, top_c, top_a)),
            **_inverse_errors(solved_a[s], solved_c[s], converged_a[s] and converged_c[s]),
        })
    return rows, damping


def _converged(spec) -> bool:
    """Whether all Ritz pairs converged; an operator that vanished on the whole Krylov space (``A_s = C_s``) counts.

    Its exact eigenvalue 0 then has the residual ``0 / max(0, 10⁻³ · 0)``, which is nan.
    """
    vanished = (spec.eigenvalues == 0) & spec.residuals.isnan()
    return bool((spec.converged | vanished).all())


def _approximate_solve(scopes: list[_Scope], rhs: torch.Tensor, damping: float, tol: float, max_iterations: int,
                       progress: bool) -> tuple[list[torch.Tensor], list[bool]]:
    """``V_s (A_ss + δI)⁻¹`` per scope: the approximation's own inverse where it has one, else conjugate gradients."""
    solved = [None if scope.inverse is None else (scope.inverse(damping) @ rhs[:, scope.index].T).T
              for scope in scopes]
    converged = [True] * len(scopes)
    missing = [position for position, scope in enumerate(scopes) if scope.inverse is None]
    if missing:
        results, flags = _damped_solve(scopes[0].approx, [scopes[position] for position in missing], rhs, damping,
                                       tol, max_iterations, progress)
        for position, result, flag in zip(missing, results, flags):
            solved[position], converged[position] = result, flag
    return solved, converged


def _restricted_products(op: CurvatureOperator, scopes: list[_Scope], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``V_s M_ss`` for every scope's rows ``V_s`` ``(K_s, p_s)``, ``M`` the whole model's ``op``.

    All rows of all scopes go through ``op`` in blocks of at most :data:`BATCH` zero-padded ``(P,)``
    directions, read at the scope's indices, so the scopes share passes over the data. Each block
    scope's operators are the restrictions of the whole model's (an approximation's own blocks are its
    restrictions, since it is block-diagonal in them).
    """
    P = op.shape[0]
    owners = [(s, r) for s, block in enumerate(rows) for r in range(block.shape[0])]
    results = [torch.empty_like(block) for block in rows]
    for start in range(0, len(owners), BATCH):
        chunk = owners[start:start + BATCH]
        padded = torch.zeros(len(chunk), P, dtype=op.dtype, device=op.device)
        for i, (s, r) in enumerate(chunk):
            padded[i, scopes[s].index] = rows[s][r]
        applied = op._apply(padded)
        for i, (s, r) in enumerate(chunk):
            results[s][r] = applied[i, scopes[s].index].to(results[s].dtype)
    return results


def _frobenius_terms(scopes: list[_Scope], generator: torch.Generator, probes: int, P: int,
                     progress: bool) -> list[torch.Tensor]:
    """Per scope, ``(probes, 4)`` float64 terms ``x = (Az)ᵀ(Cz)``, ``y = ‖Az‖²``, ``w = ‖Cz‖²``, ``d = ‖(A − C)z‖²``.

    The probes are drawn :data:`BATCH` at a time, so memory stays at a few ``(BATCH, P)`` tensors.
    """
    terms = [[] for _ in scopes]
    whole = scopes[0]
    for start in tqdm(range(0, probes, BATCH), desc="approximation error (probes)", disable=not progress,
                      leave=False):
        Z = rademacher(generator, min(BATCH, probes - start), P, whole.exact.dtype, whole.exact.device)
        rows = [Z[:, scope.index] for scope in scopes]
        applied_a = _restricted_products(whole.approx, scopes, rows)
        applied_c = _restricted_products(whole.exact, scopes, rows)
        for collected, a, c in zip(terms, applied_a, applied_c):
            a, c = a.double(), c.double()
            collected.append(torch.stack([(a * c).sum(1), a.square().sum(1), c.square().sum(1),
                                          (a - c).square().sum(1)], dim=1))
    return [torch.cat(collected) for collected in terms]


def _frobenius(terms: torch.Tensor) -> dict:
    """The Frobenius quantities and their delta-method standard errors from the ``(m, 4)`` terms ``x, y, w, d``."""
    mean, covariance = terms.mean(0), torch.cov(terms.T)

    def std_error(f) -> float:
        gradient = grad(f)(mean)
        return float((gradient @ covariance @ gradient / terms.shape[0]).clamp(min=0).sqrt())

    def rel_fro_squared(t):
        return t[3] / t[2]

    def rel_fro_scaled_squared(t):
        return 1 - t[0] ** 2 / (t[1] * t[2])

    def scale(t):
        return t[0] / t[1]

    def cos_fro(t):
        return t[0] / torch.sqrt(t[1] * t[2])

    result = {}
    for name, squared in (("rel_fro", rel_fro_squared), ("rel_fro_scaled", rel_fro_scaled_squared)):
        q, se_q = float(squared(mean)), std_error(squared)
        result[name] = math.sqrt(max(q, 0.0))
        result[f"{name}_se"] = min(se_q / (2 * math.sqrt(q)) if q > 0 else math.inf, math.sqrt(se_q))
    for name, f in (("scale", scale), ("cos_fro", cos_fro)):
        result[name], result[f"{name}_se"] = float(f(mean)), std_error(f)
    return result


def _damped_solve(op: CurvatureOperator, scopes: list[_Scope], rhs: torch.Tensor, damping: float, tol: float,
                  max_iterations: int, progress: bool) -> tuple[list[torch.Tensor], list[bool]]:
    """``V_s (M_ss + δI)⁻¹`` for every scope, ``V_s`` the scope's entries of ``rhs`` ``(K, P)``, by conjugate gradients.

    One independent conjugate-gradient recurrence per row (its own step sizes), all advanced together
    with one batched product per step (:func:`_restricted_products`). A row stops when its recurrence
    residual is below ``tol / 2`` relative to its right-hand side, which leaves room for the drift
    between recurrence and true residuals in floating point, or when ``dᵀ(M + δI)d`` vanishes or is
    not finite (a breakdown). Afterwards the true residuals are computed with one more product per
    row: a scope has converged when all of its rows have ``‖(M_ss + δI)x − v‖ ≤ tol ‖v‖``.
    """
    B = [rhs[:, scope.index] for scope in scopes]
    X = [torch.zeros_like(b) for b in B]
    R = [b.clone() for b in B]
    D = [b.clone() for b in B]
    rr = [b.double().square().sum(1) for b in B]
    norms = [value.sqrt() for value in rr]
    active = [rr_s.sqrt() > tol / 2 * norm for rr_s, norm in zip(rr, norms)]
    with tqdm(desc="approximation error (cg)", disable=not progress, leave=False) as bar:
        for _ in range(max_iterations):
            live = [mask.nonzero().squeeze(1) for mask in active]
            if not any(len(rows) for rows in live):
                break
            Q = _restricted_products(op, scopes, [D_s[rows] for D_s, rows in zip(D, live)])
            for s, rows in enumerate(live):
                d = D[s][rows]
                q = Q[s] + damping * d
                curvature = (d * q).sum(1, dtype=torch.float64)
                healthy = torch.isfinite(curvature) & (curvature != 0)
                alpha = torch.where(healthy, rr[s][rows] / curvature, torch.zeros_like(curvature))
                X[s][rows] += alpha[:, None].to(d.dtype) * d
                R[s][rows] -= alpha[:, None].to(d.dtype) * q
                updated = R[s][rows].double().square().sum(1)
                D[s][rows] = R[s][rows] + (updated / rr[s][rows])[:, None].to(d.dtype) * d
                rr[s][rows] = updated
                active[s][rows] = healthy & (updated.sqrt() > tol / 2 * norms[s][rows])
            bar.update()
    checked = _restricted_products(op, scopes, X)
    converged = [bool((torch.linalg.vector_norm((c + damping * x - b).double(), dim=1) <= tol * norm).all())
                 for c, x, b, norm in zip(checked, X, B, norms)]
    return X, converged


def _inverse_errors(solved_a: torch.Tensor, solved_c: torch.Tensor, converged: bool) -> dict:
    """``inverse_action`` (mean and standard error over the probe rows) and ``inverse_action_gradient`` (last row)."""
    if not converged:
        return {"inverse_action": math.nan, "inverse_action_se": math.nan, "inverse_action_gradient": math.nan,
                "inverse_converged": False}
    errors = (torch.linalg.vector_norm((solved_a - solved_c).double(), dim=1)
              / torch.linalg.vector_norm(solved_c.double(), dim=1))
    on_probes = errors[:-1]
    return {"inverse_action": float(on_probes.mean()),
            "inverse_action_se": float(on_probes.std() / math.sqrt(on_probes.numel())),
            "inverse_action_gradient": float(errors[-1]), "inverse_converged": True}


def _default_damping(norm_fro: float, P: int) -> float:
    """``10⁻³ ‖C‖_F / √P``, refused when ``C`` is zero and so sets no scale."""
    if not norm_fro > 0:
        raise InvalidProblem(
            "the exact matrix is zero (or its estimate is), so it sets no scale for the default damping; "
            "pass damping=δ > 0"
        )
    return DEFAULT_DAMPING * norm_fro / math.sqrt(P)


def _check_arguments(approx, exact, damping, k, method, probes, inverse_probes, tol, max_iterations, seed) -> int:
    """Raise :class:`InvalidProblem` on a bad argument; return ``P``."""
    for name, op in (("approx", approx), ("exact", exact)):
        if not isinstance(op, CurvatureOperator):
            raise InvalidProblem(
                f"{name} must be a curvature operator (curvlab.curvature or curvlab.approximate), "
                f"got {type(op).__name__}"
            )
    if approx.shape != exact.shape or approx.problem.param_names != exact.problem.param_names:
        raise InvalidProblem(
            f"the approximation is {approx.shape} over {len(approx.problem.param_names)} parameter tensors but "
            f"the exact matrix is {exact.shape} over {len(exact.problem.param_names)}; build both from the same "
            f"Problem"
        )
    if damping is not None and (isinstance(damping, bool) or not isinstance(damping, numbers.Real)
                                or not 0 < damping < math.inf):
        raise InvalidProblem(f"damping must be a finite number > 0, or None for the default, got {damping!r}")
    P = exact.shape[0]
    require_integer("k", k)
    if method not in METHODS:
        raise InvalidProblem(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    require_integer("probes", probes, minimum=2, hint=" (a standard error needs two)")
    require_integer("inverse_probes", inverse_probes, minimum=2, hint=" (a standard error needs two)")
    require_integer("max_iterations", max_iterations)
    require_integer("seed", seed, minimum=0)
    require_number("tol", tol)
    return P
