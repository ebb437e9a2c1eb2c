"""Eigenpairs of a curvature operator: all of them from the dense matrix, or a few from Lanczos.

``C`` is a symmetric ``(P, P)`` operator. Eigenvalues are returned in ascending order with their
unit eigenvectors as the columns of a ``(P, k)`` matrix; which ``k`` is set by ``which``:

- ``"LA"``: the ``k`` largest (algebraically), ``"SA"``: the ``k`` smallest,
- ``"LM"``: the ``k`` largest in magnitude, ``"BE"``: both ends, ``⌈k/2⌉`` largest and ``⌊k/2⌋``
  smallest.

**Accuracy.** A pair ``(θ, v)``, ``‖v‖ = 1``, has the relative residual
``ρ = ‖C v − θ v‖ / max(|θ|, 10⁻³ ‖C‖₂)``. Since ``C`` is symmetric, some eigenvalue lies within
``‖C v − θ v‖`` of ``θ`` (Weyl), so ``ρ ≤ tol`` means ``θ`` is accurate to ``tol`` relative, or to
``10⁻³ tol ‖C‖₂`` absolute for eigenvalues below a thousandth of the spectral norm, whose relative
accuracy rounding in the products (about ``ε ‖C‖₂``) would otherwise bound. An eigenvector is
accurate to about ``ρ |θ| / gap`` in angle; inside a cluster narrower than that only the cluster's
subspace is determined. ``‖C‖₂`` is ``max |λ|`` for ``"dense"`` and ``‖T‖₂ = max |θ|`` over the
projected matrix (a lower bound of ``‖C‖₂``) for ``"lanczos"``.

- **dense**: ``torch.linalg.eigh`` of ``(A + Aᵀ)/2``, ``A = C`` materialised with ``P`` products;
  refused with :class:`curvlab.DenseTooLarge` beyond the memory budget.
- **lanczos** (thick-restart Lanczos; Wu & Simon 2000, the symmetric case of Stewart's
  Krylov–Schur): an orthonormal basis ``V`` ``(m+1, P)`` (rows) and a projected matrix ``H``
  ``(m+1, m)`` with ``C V_mᵀ = V_{m+1}ᵀ H``. Each step applies ``C`` to one basis vector and
  orthogonalises the result against the whole basis twice (classical Gram–Schmidt), so the basis
  stays orthonormal to rounding. The Ritz pairs ``(θ_i, V_mᵀ s_i)`` of ``T = H_{:m}`` have residual
  norms ``|h_{m+1}ᵀ s_i|`` (``β_m |s_{m,i}|`` before the first restart), known without products.
  Once the ``k`` wanted pairs all have ``ρ ≤ tol``, or the products are spent, the wanted Ritz
  vectors are applied to ``C`` in one block and their residuals recomputed explicitly: those are
  the reported residuals, and ``converged`` is ``ρ ≤ tol`` from them. Otherwise the basis is
  restarted from the ``(m + k)/2`` Ritz vectors that ``which`` prefers and the residual vector,
  where ``H`` becomes ``diag(θ)`` bordered by the row ``h_{m+1}ᵀ S``, and expanded again.
  When ``m = P`` the basis spans the whole space and the result is exact to rounding. Lanczos from
  one start vector sees one direction per eigenspace: of an eigenvalue repeated exactly (the zero
  eigenvalues of a low-rank GGN) it finds a second copy only after the Krylov space has become
  invariant and a fresh random direction continues it (as it does when ``m = P``). When exactly
  repeated eigenvalues are among the wanted ones, use ``"dense"``.
"""

import math
import numbers
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from curvlab.errors import DenseTooLarge, InvalidProblem, require_integer
from curvlab.memory import check_dense

METHODS = ("auto", "dense", "lanczos", "slq")
WHICH = ("LA", "SA", "LM", "BE")
FLOOR = 1e-3  # eigenvalues below FLOOR ‖C‖₂ are measured in units of FLOOR ‖C‖₂
MIN_KRYLOV = 20
BREAKDOWN = 100  # β ≤ BREAKDOWN ε ‖C‖ counts as an invariant subspace


@dataclass(frozen=True)
class Spectrum:
    """Eigenpairs of a ``(P, P)`` operator.

    Attributes:
        eigenvalues: ``(k,)`` ascending.
        eigenvectors: ``(P, k)`` unit columns, one per eigenvalue; ``None`` when not asked for. Each
            column's sign is arbitrary.
        residuals: ``(k,)`` relative residuals ``‖C v − θ v‖ / max(|θ|, 10⁻³ ‖C‖₂)`` (see the module).
        converged: ``(k,)`` bool, ``residuals ≤ tol`` (all true for ``"dense"``).
        products: the operator-vector products used (``P`` for ``"dense"``).
        method: ``"dense"`` or ``"lanczos"`` (what ``"auto"`` chose).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    products: int
    method: str


def spectrum(op, method: str = "auto", k: int | None = 10, which: str = "LA", tol: float = 1e-6,
             probes: int = 10, steps: int = 80, seed: int = 0, *, vectors: bool = True,
             max_products: int | None = None, dtype: torch.dtype | None = None,
             progress: bool = True) -> Spectrum:
    """``k`` eigenpairs of a ``(P, P)`` curvature operator, chosen by ``which``.

    Args:
        op: a :class:`curvlab.operators.CurvatureOperator`.
        method: ``"dense"``, ``"lanczos"`` or ``"auto"``: dense when the ``(P, P)`` matrix fits the
            memory budget (:mod:`curvlab.memory`), else Lanczos. ``"slq"`` (spectral densities) is
            not implemented yet.
        k: how many eigenpairs, ``1 ≤ k ≤ P``; ``None`` for all of them (dense only).
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest magnitude, ``"BE"`` both ends
            (``⌈k/2⌉`` largest and ``⌊k/2⌋`` smallest).
        tol: the relative residual at which Lanczos stops (see the module docstring).
        probes, steps: the random probes and Lanczos steps of ``"slq"``.
        seed: seeds a local CPU generator for Lanczos' start vector: the same seed gives the same
            numbers, and the caller's random state is untouched.
        vectors: return the eigenvectors.
        max_products: the most products Lanczos may use, the final check of the ``k`` Ritz pairs
            included, at least ``2k``; default ``20 k + 200``. Pairs not converged by then have
            ``converged`` false.
        dtype: the precision of the eigendecomposition and of the Lanczos basis (default the
            operator's); the operator's products keep its own.
        progress: show progress bars on stderr (materialisation; Lanczos restarts).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.spectra.spectrum import spectrum
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(10, 3).double()                      # P = 33
        >>> prob = curvlab.Problem(model, (torch.randn(4, 10), torch.tensor([0, 1, 2, 0])))
        >>> H = curvlab.curvature(prob, "hessian")
        >>> spec = spectrum(H, method="lanczos", k=3, tol=1e-10, progress=False)
        >>> spec.eigenvectors.shape, bool(spec.converged.all())
        (torch.Size([33, 3]), True)
        >>> exact = torch.linalg.eigvalsh(H.to_dense())[-3:]
        >>> bool(torch.allclose(spec.eigenvalues, exact, rtol=1e-8))
        True
        >>> spectrum(H, k=2, which="SA").method                          # dense fits the budget
        'dense'
    """
    P = op.shape[0]
    max_products = _check_arguments(method, k, which, tol, max_products, P)
    if method == "auto":
        try:
            check_dense(P, P, op.dtype, op.device, f"{op.kind} matrix")
            method = "dense"
        except DenseTooLarge:
            method = "lanczos"
    if method == "lanczos" and k is None:
        raise InvalidProblem("Lanczos finds a few eigenpairs: give k, or all of them with method='dense'")
    dtype = dtype or op.dtype
    if method == "dense":
        return _dense(op, k, which, vectors, dtype, progress)
    return _lanczos(op, k, which, tol, seed, vectors, max_products, dtype, progress)


def _dense(op, k: int | None, which: str, vectors: bool, dtype: torch.dtype, progress: bool) -> Spectrum:
    """All eigenpairs from ``eigh`` of the symmetrised dense matrix, then the ``k`` that ``which`` selects."""
    A = op.to_dense(progress=progress).to(dtype)
    A = (A + A.T) / 2
    values, vecs = torch.linalg.eigh(A)
    norm = values.abs().max()
    if k is not None:
        chosen = _select(values, which, k).sort().values  # eigh's order is ascending already
        values, vecs = values[chosen], vecs[:, chosen]
    residuals = torch.linalg.vector_norm(A @ vecs - vecs * values, dim=0) / _scale(values, norm)
    return Spectrum(values, vecs if vectors else None, residuals,
                    torch.ones_like(values, dtype=torch.bool), op.shape[0], "dense")


def _lanczos(op, k: int, which: str, tol: float, seed: int, vectors: bool, max_products: int,
             dtype: torch.dtype, progress: bool) -> Spectrum:
    """Thick-restart Lanczos with full reorthogonalisation; see the module docstring."""
    P = op.shape[0]
    m = min(max(2 * k + 1, MIN_KRYLOV), P)  # Krylov dimension per restart
    keep = min((m + k) // 2, m - 1)  # Ritz vectors kept at a restart
    budget = max_products - k  # products for the Lanczos steps; k more check the result
    generator = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    V = torch.zeros(m + 1, P, dtype=dtype, device=op.device)  # rows: the orthonormal basis
    H = torch.zeros(m + 1, m, dtype=torch.float64)  # C V[:m]ᵀ = V[:m+1]ᵀ H
    V[0] = _random_direction(generator, V[:0], P, dtype, op.device)
    start, products, norm = 0, 0, 0.0  # norm: the largest ‖C v‖ seen, an estimate of ‖C‖₂
    with tqdm(desc="lanczos", unit="restart", disable=not progress, leave=False) as bar:
        while True:
            stop = min(m, start + budget - products)
            for j in range(start, stop):
                w = op._apply(V[j:j + 1])[0].to(dtype)
                products += 1
                norm = max(norm, float(torch.linalg.vector_norm(w)))
                w, coefficients = _orthogonalise(w, V[:j + 1])
                H[:j + 1, j] = coefficients.double().cpu()
                if j + 1 == P:  # the basis spans the whole space: C V_Pᵀ = V_Pᵀ H exactly
                    break
                beta = float(torch.linalg.vector_norm(w))
                if beta <= BREAKDOWN * eps * norm:  # an invariant subspace: continue with a fresh direction
                    V[j + 1] = _random_direction(generator, V[:j + 1], P, dtype, op.device)
                else:
                    H[j + 1, j] = beta
                    V[j + 1] = w / beta
            T = H[:stop, :stop]
            theta, S = torch.linalg.eigh((T + T.T) / 2)
            estimated = (H[stop, :stop] @ S).abs() / _scale(theta, theta.abs().max())
            wanted = _select(theta, which, k)
            bar.update()
            bar.set_postfix(converged=f"{int((estimated[wanted] <= tol).sum())}/{k}", products=products)
            if bool((estimated[wanted] <= tol).all()) or products >= budget:
                break
            kept = _select(theta, which, keep)
            V[:keep] = S[:, kept].T.to(V) @ V[:stop]
            V[keep] = V[stop]
            border = H[stop, :stop] @ S[:, kept]
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[kept])
            H[keep, :keep] = border
            start = keep
    wanted = wanted[theta[wanted].argsort()]  # ascending
    values = theta[wanted].to(device=op.device, dtype=dtype)
    X = S[:, wanted].T.to(V) @ V[:stop]  # (k, P) Ritz vectors as rows
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True)
    CX = op._apply(X).to(dtype)
    products += k
    norm_T = theta.abs().max().to(device=op.device, dtype=dtype)
    residuals = torch.linalg.vector_norm(CX - values[:, None] * X, dim=1) / _scale(values, norm_T)
    return Spectrum(values, X.T.contiguous() if vectors else None, residuals, residuals <= tol, products,
                    "lanczos")


def _orthogonalise(w: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w − Vᵀ h`` orthogonal to the rows of ``V`` ``(j, P)``, by classical Gram–Schmidt twice, and ``h``."""
    coefficients = torch.zeros(V.shape[0], dtype=w.dtype, device=w.device)
    for _ in range(2):
        h = V @ w
        w = w - h @ V
        coefficients += h
    return w, coefficients


def _random_direction(generator: torch.Generator, V: torch.Tensor, P: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A unit ``(P,)`` direction, Gaussian from ``generator`` on the CPU, orthogonal to the rows of ``V``."""
    z = torch.randn(P, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    z, _ = _orthogonalise(z, V)
    return z / torch.linalg.vector_norm(z)


def _select(values: torch.Tensor, which: str, count: int) -> torch.Tensor:
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


def _scale(values: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``max(|θ|, FLOOR ‖C‖₂)``, the denominator of the relative residuals."""
    return torch.clamp(values.abs(), min=float(FLOOR * norm))


def _check_arguments(method: str, k, which: str, tol: float, max_products, P: int) -> int:
    """Raise :class:`InvalidProblem` on a bad argument; return ``max_products`` with its default."""
    if method not in METHODS:
        raise InvalidProblem(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if method == "slq":
        raise InvalidProblem("spectral densities (method='slq') are not implemented yet; "
                             "use method='dense' or 'lanczos' for eigenpairs")
    if which not in WHICH:
        raise InvalidProblem(f"unknown which {which!r}; choose one of {', '.join(map(repr, WHICH))}")
    if k is not None:
        require_integer("k", k, maximum=P, hint=" (P), or None for all")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise InvalidProblem(f"tol must be a positive number, got {tol!r}")
    if max_products is None:
        return 20 * (k or P) + 200
    return require_integer("max_products", max_products, minimum=2 * (k or P),
                           hint=" (2k: k Lanczos steps and k products to check them)")
