"""The k eigenpairs of a symmetric operator that ``which`` selects, by thick-restart Lanczos.

``which``: ``"LA"`` the ``k`` largest (algebraically), ``"SA"`` the ``k`` smallest, ``"LM"`` the
``k`` largest in magnitude, ``"BE"`` both ends (``⌈k/2⌉`` largest and ``⌊k/2⌋`` smallest). A pair
``(θ, v)``, ``‖v‖ = 1``, has the relative residual ``ρ = ‖C v − θ v‖ / max(|θ|, 10⁻³ ‖T‖₂)``, with
``‖T‖₂ = max |θ|`` over the projected matrix (a lower bound of ``‖C‖₂``); by Weyl some eigenvalue of
``C`` lies within ``‖C v − θ v‖`` of ``θ``.

Thick-restart Lanczos (Wu & Simon 2000, the symmetric case of Stewart's Krylov–Schur): an
orthonormal basis ``V`` ``(m+1, P)`` (rows) and a projected matrix ``H`` ``(m+1, m)`` with ``C V_mᵀ
= V_{m+1}ᵀ H``. Each step applies ``C`` to one basis vector, removes the three-term recurrence's
components (``α_j v_j + β_{j−1} v_{j−1}``) and then orthogonalises the result against the whole
basis by classical Gram–Schmidt, repeated when it cancels much (see :func:`_orthogonalise`), so the
basis stays orthonormal to rounding. The Ritz pairs ``(θ_i, V_mᵀ s_i)`` of ``T = H_{:m}`` have
residual norms ``|h_{m+1}ᵀ s_i|`` (``β_m |s_{m,i}|`` before the first restart), known without
products. Once the ``k`` wanted pairs all have ``ρ ≤ tol``, or the products are spent, the wanted
Ritz vectors are applied to ``C`` in one block and their residuals recomputed explicitly: those are
the reported residuals, and ``converged`` is ``ρ ≤ tol`` from them. Otherwise the basis is restarted
from the ``(m + k)/2`` Ritz vectors that ``which`` prefers and the residual vector, where ``H``
becomes ``diag(θ)`` bordered by the row ``h_{m+1}ᵀ S``, and expanded again. When ``m = P`` the basis
spans the whole space and the result is exact to rounding. Lanczos from one start vector sees one
direction per eigenspace: of an eigenvalue repeated exactly (the zero eigenvalues of a low-rank GGN)
it finds a second copy only after the Krylov space has become invariant and a fresh random direction
continues it (as it does when ``m = P``). When exactly repeated eigenvalues are among the wanted
ones, use a dense eigendecomposition.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

FLOOR = 1e-3  # eigenvalues below FLOOR ‖C‖₂ are measured in units of FLOOR ‖C‖₂
MIN_KRYLOV = 20
BREAKDOWN = 100  # β ≤ BREAKDOWN ε ‖C‖ counts as an invariant subspace
WHICH = ("LA", "SA", "LM", "BE")


@dataclass(frozen=True)
class RitzPairs:
    """``k`` Ritz pairs of a ``(P, P)`` operator from :func:`lanczos`.

    Attributes:
        values: ``(k,)`` ascending.
        vectors: ``(P, k)`` unit columns, the transpose of a contiguous ``(k, P)`` tensor.
        residuals: ``(k,)`` relative residuals, recomputed with ``k`` explicit products.
        converged: ``(k,)`` bool, ``residuals ≤ tol``.
        products: the operator products used, the final check included.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    products: int


def lanczos(op, k: int, which: str, tol: float, seed: int, max_products: int, dtype: torch.dtype,
            progress: bool = True) -> RitzPairs:
    """``k`` Ritz pairs of ``op`` chosen by ``which``, to relative residual ``tol`` within ``max_products`` products.

    ``op`` is a :class:`curvlab.operators.CurvatureOperator`; ``seed`` seeds a local CPU generator for
    the start vector (the caller's random state is untouched); ``dtype`` is the precision of the basis.
    ``max_products`` must be at least ``2k`` (``k`` more check the result). Memory: the ``(m + 1, P)``
    basis, ``m = max(2k + 1, 20)``, restarted in place. Products reuse the recorded pass of a batch
    (:meth:`~curvlab.operators.base.CurvatureOperator.reusing_passes`).
    """
    P = op.shape[0]
    m = min(max(2 * k + 1, MIN_KRYLOV), P)  # Krylov dimension per restart
    keep = min((m + k) // 2, m - 1)  # Ritz vectors kept at a restart
    budget = max_products - k  # products for the Lanczos steps; k more check the result
    generator = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    V = torch.empty(m + 1, P, dtype=dtype, device=op.device)  # rows: the orthonormal basis, written as it grows
    H = torch.zeros(m + 1, m, dtype=torch.float64)  # C V[:m]ᵀ = V[:m+1]ᵀ H
    V[0] = _random_direction(generator, V[:0], P, dtype, op.device)
    start, products, norm = 0, 0, 0.0  # norm: the largest ‖C v‖ seen, an estimate of ‖C‖₂
    with op.reusing_passes(), tqdm(desc="lanczos", unit="restart", disable=not progress, leave=False) as bar:
        while True:
            for j in range(start, min(m, start + budget - products)):
                w = op._apply(V[j:j + 1])[0].to(dtype)
                products += 1
                norm = max(norm, float(torch.linalg.vector_norm(w)))
                local = torch.zeros(j + 1, dtype=torch.float64)
                local[j] = float(torch.dot(V[j], w))
                w.sub_(V[j], alpha=local[j].item())
                if j > start:  # the three-term recurrence: w ⟂ V[j − 1] up to β_{j−1}
                    local[j - 1] = H[j, j - 1]
                    w.sub_(V[j - 1], alpha=local[j - 1].item())
                w, coefficients, beta = _orthogonalise(w, V[:j + 1])
                H[:j + 1, j] = local + coefficients.double().cpu()
                broke = False
                if j + 1 < P:  # at j + 1 = P the basis spans the whole space: C V_Pᵀ = V_Pᵀ H exactly
                    beta = float(beta)
                    broke = beta <= BREAKDOWN * eps * norm
                    if broke:  # an invariant subspace: continue with a fresh direction
                        V[j + 1] = _random_direction(generator, V[:j + 1], P, dtype, op.device)
                    else:
                        H[j + 1, j] = beta
                        torch.div(w, beta, out=V[j + 1])
                stop = j + 1
                theta, S, estimated, wanted = _ritz(H, stop, which, k)
                converged = stop >= k and not broke and bool((estimated[wanted] <= tol).all())
                if converged or stop == P:
                    break
            bar.update()
            bar.set_postfix(converged=f"{int((estimated[wanted] <= tol).sum())}/{k}", products=products)
            if converged or stop == P or products >= budget:
                break
            kept = select(theta, which, keep)
            _rotate(V, S[:, kept].to(V), stop)
            V[keep] = V[stop]
            border = H[stop, :stop] @ S[:, kept]
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[kept])
            H[keep, :keep] = border
            start = keep
        wanted = wanted[theta[wanted].argsort()]  # ascending
        values = theta[wanted].to(device=op.device, dtype=dtype)
        X = S[:, wanted].T.to(V) @ V[:stop]  # (k, P) Ritz vectors as rows
        X.div_(torch.linalg.vector_norm(X, dim=1, keepdim=True))
        R = op._apply(X).to(dtype)
        products += k
    for x, r, value in zip(X, R, values.tolist()):
        r.sub_(x, alpha=value)  # C x − θ x, in place: (k, P) temporaries cost a first touch each
    norm_T = theta.abs().max().to(device=op.device, dtype=dtype)
    residuals = torch.linalg.vector_norm(R, dim=1) / relative_scale(values, norm_T)
    return RitzPairs(values, X.T, residuals, residuals <= tol, products)


def _rotate(V: torch.Tensor, Q: torch.Tensor, rows: int, columns: int = 1 << 16) -> None:
    """``V[:q] ← Qᵀ V[:rows]`` in place for ``Q`` ``(rows, q)``, ``columns`` of ``V`` at a time.

    The restarted basis overwrites the old one: no second ``(m + 1, P)`` buffer to allocate and touch.
    """
    for chunk in V.split(columns, dim=1):
        chunk[:Q.shape[1]] = Q.T @ chunk[:rows]


def _ritz(H: torch.Tensor, stop: int, which: str, k: int):
    """Ritz values ``θ``, vectors ``S`` of ``T = H[:stop, :stop]``, their estimated relative residuals, the wanted ones."""
    T = H[:stop, :stop]
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    estimated = (H[stop, :stop] @ S).abs() / relative_scale(theta, theta.abs().max())
    return theta, S, estimated, select(theta, which, min(k, stop))


def _orthogonalise(w: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w − Vᵀ h, h, ‖w − Vᵀ h‖)`` with ``w − Vᵀ h`` orthogonal to the rows of ``V`` ``(j, P)``, written in place.

    Classical Gram–Schmidt, repeated once when the first pass cancelled more than ``1 − 1/√2`` of
    ``w``'s norm (the criterion of Daniel, Gragg, Kaufman & Stewart 1976), which keeps the basis
    orthonormal to working precision and skips the second pass when it is not needed.
    """
    coefficients = torch.zeros(V.shape[0], dtype=w.dtype, device=w.device)
    before = torch.linalg.vector_norm(w)
    for _ in range(2):
        h = V @ w
        w.addmv_(V.T, h, alpha=-1)
        coefficients += h
        after = torch.linalg.vector_norm(w)
        if after >= before / 2 ** 0.5:
            break
        before = after
    return w, coefficients, after


def _random_direction(generator: torch.Generator, V: torch.Tensor, P: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A unit ``(P,)`` direction, Gaussian from ``generator`` on the CPU, orthogonal to the rows of ``V``."""
    z = torch.randn(P, generator=generator, dtype=dtype).to(device)
    z, _, norm = _orthogonalise(z, V)
    return z.div_(norm)


def select(values: torch.Tensor, which: str, count: int) -> torch.Tensor:
    """Indices of the ``count`` entries of ``values`` ``(n,)`` that ``which`` prefers, most preferred first."""
    if which == "LA":
        return values.argsort(descending=True, stable=True)[:count]
    if which == "SA":
        return values.argsort(stable=True)[:count]
    if which == "LM":
        return values.abs().argsort(descending=True, stable=True)[:count]
    ascending = values.argsort(stable=True)
    top, bottom = math.ceil(count / 2), count // 2
    return torch.cat([ascending.flip(0)[:top], ascending[:bottom]])


def relative_scale(values: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``max(|θ|, FLOOR ‖C‖₂)``, the denominator of the relative residuals."""
    return torch.clamp(values.abs(), min=float(FLOOR * norm))
