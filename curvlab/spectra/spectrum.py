"""Eigenpairs of a curvature operator (all from the dense matrix, a few from Lanczos) or its density (SLQ).

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
- **lanczos**: thick-restart Lanczos with full reorthogonalisation, see
  :mod:`curvlab.operators.lanczos`.
- **slq**: the spectral density by stochastic Lanczos quadrature, see :mod:`curvlab.spectra.density`.
  Its eigenvalues are the smallest and the largest Ritz value over all probes, with the residual
  ``β_m |s_{mj}|`` the Lanczos recurrence gives without further products.
"""

from dataclasses import dataclass

import torch

from curvlab.errors import DenseTooLarge, InvalidProblem, require_integer, require_number
from curvlab.memory import check_dense
from curvlab.operators.lanczos import WHICH, lanczos, relative_scale, select
from curvlab.spectra.density import lanczos_quadrature, smoothed_density

METHODS = ("auto", "dense", "lanczos", "slq")


@dataclass(frozen=True)
class Spectrum:
    """Eigenpairs, or the spectral density, of a ``(P, P)`` operator.

    Attributes:
        eigenvalues: ``(k,)`` ascending (for ``"slq"`` the extreme Ritz values, ``(2,)``).
        eigenvectors: ``(P, k)`` unit columns, one per eigenvalue; ``None`` when not asked for (and for
            ``"slq"``). Each column's sign is arbitrary.
        residuals: ``(k,)`` relative residuals ``‖C v − θ v‖ / max(|θ|, 10⁻³ ‖C‖₂)`` (see the module).
        converged: ``(k,)`` bool, ``residuals ≤ tol`` (all true for ``"dense"``).
        products: the operator-vector products used (``P`` for ``"dense"``).
        method: ``"dense"``, ``"lanczos"`` or ``"slq"`` (what ``"auto"`` chose).
        size: ``P``.
        which: the ``which`` the eigenvalues were selected by (``None`` when all of them, and for ``"slq"``).
        density: ``"slq"`` only: ``(grid, values)``, two ``(G,)`` float64 tensors, the smoothed density
            of the eigenvalues (integrating to 1), Gaussian width ``width``.
        log_density: ``"slq"`` only: ``(grid, values)`` of ``log₁₀(|λ| + log_eps)``, width ``log_width``.
        nodes, weights: ``"slq"`` only: the raw Ritz nodes and Gauss weights, ``(probes, steps)``; each
            probe's weights sum to 1.
        reorthogonalized: ``"slq"`` only: whether the Lanczos bases were fully reorthogonalised.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    products: int
    method: str
    size: int
    which: str | None = None
    density: tuple[torch.Tensor, torch.Tensor] | None = None
    width: float | None = None
    log_density: tuple[torch.Tensor, torch.Tensor] | None = None
    log_width: float | None = None
    log_eps: float | None = None
    nodes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    reorthogonalized: bool | None = None


def spectrum(op, method: str = "auto", k: int | None = 10, which: str = "LA", tol: float = 1e-6,
             probes: int = 10, steps: int = 80, seed: int = 0, *, vectors: bool = True,
             max_products: int | None = None, dtype: torch.dtype | None = None, width: float | None = None,
             log_eps: float | None = None, reorthogonalize: bool | None = None,
             progress: bool = True) -> Spectrum:
    """``k`` eigenpairs of a ``(P, P)`` curvature operator, chosen by ``which``, or its spectral density.

    Args:
        op: a :class:`curvlab.operators.CurvatureOperator`.
        method: ``"dense"``, ``"lanczos"``, ``"slq"`` or ``"auto"``: dense when the ``(P, P)`` matrix
            fits the memory budget (:mod:`curvlab.memory`), else Lanczos for ``k`` eigenpairs and SLQ
            for the whole spectrum (``k=None``).
        k: how many eigenpairs, ``1 ≤ k ≤ P``; ``None`` for all of them (dense) or the density (SLQ).
            Ignored by ``"slq"``.
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest magnitude, ``"BE"`` both ends
            (``⌈k/2⌉`` largest and ``⌊k/2⌋`` smallest).
        tol: the relative residual at which Lanczos stops (see the module docstring).
        probes, steps: the Rademacher probes and Lanczos steps (at most ``P``) of ``"slq"``.
        seed: seeds a local CPU generator for Lanczos' start vector: the same seed gives the same
            numbers, and the caller's random state is untouched.
        vectors: return the eigenvectors.
        max_products: the most products Lanczos may use, the final check of the ``k`` Ritz pairs
            included, at least ``2k``; default ``20 k + 200``. Pairs not converged by then have
            ``converged`` false.
        dtype: the precision of the eigendecomposition and of the Lanczos basis (default the
            operator's); the operator's products keep its own.
        width: ``"slq"``: the Gaussian smoothing width σ; default 1/200 of the Ritz nodes' spread.
        log_eps: ``"slq"``: the ε of ``log₁₀(|λ| + ε)``; default ``10⁻⁶ max|θ|``.
        reorthogonalize: ``"slq"``: fully reorthogonalise the Lanczos bases; default when they take
            at most 256 MiB (see :mod:`curvlab.spectra.density`).
        progress: show progress bars on stderr (materialisation; Lanczos restarts; SLQ steps).

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
    _check_slq_arguments(probes, steps, width, log_eps)
    if method == "auto":
        try:
            check_dense(P, P, op.dtype, op.device, f"{op.kind} matrix")
            method = "dense"
        except DenseTooLarge:
            method = "lanczos" if k is not None else "slq"
    if method == "lanczos" and k is None:
        raise InvalidProblem("Lanczos finds a few eigenpairs: give k, or all of them with method='dense'")
    dtype = dtype or op.dtype
    if method == "dense":
        return _dense(op, k, which, vectors, dtype, progress)
    if method == "slq":
        return _slq(op, probes, steps, seed, tol, width, log_eps, reorthogonalize, dtype, progress)
    pairs = lanczos(op, k, which, tol, seed, max_products, dtype, progress)
    return Spectrum(pairs.values, pairs.vectors if vectors else None, pairs.residuals, pairs.converged,
                    pairs.products, "lanczos", P, which)


def _dense(op, k: int | None, which: str, vectors: bool, dtype: torch.dtype, progress: bool) -> Spectrum:
    """All eigenpairs from ``eigh`` of the symmetrised dense matrix, then the ``k`` that ``which`` selects."""
    A = op.to_dense(progress=progress).to(dtype)
    A = (A + A.T) / 2
    values, vecs = torch.linalg.eigh(A)
    norm = values.abs().max()
    if k is not None:
        chosen = select(values, which, k).sort().values  # eigh's order is ascending already
        values, vecs = values[chosen], vecs[:, chosen]
    residuals = torch.linalg.vector_norm(A @ vecs - vecs * values, dim=0) / relative_scale(values, norm)
    return Spectrum(values, vecs if vectors else None, residuals,
                    torch.ones_like(values, dtype=torch.bool), op.shape[0], "dense", op.shape[0],
                    None if k is None else which)


def _slq(op, probes: int, steps: int, seed: int, tol: float, width, log_eps, reorthogonalize,
         dtype: torch.dtype, progress: bool) -> Spectrum:
    """The SLQ density and its log-scale version, with the extreme Ritz values as eigenvalues."""
    quadrature = lanczos_quadrature(op, probes, steps, seed, reorthogonalize, dtype, progress)
    nodes, weights = quadrature.nodes, quadrature.weights
    real = weights > 0
    scale = nodes[real].abs().max()
    low = torch.where(real, nodes, torch.inf).argmin()
    high = torch.where(real, nodes, -torch.inf).argmax()
    extremes = torch.stack([low, high])
    values = nodes.flatten()[extremes]
    residuals = quadrature.residuals.flatten()[extremes] / relative_scale(values, scale)
    mixture = weights / weights.shape[0]  # the probes' average: sums to 1
    grid, density, width = smoothed_density(nodes, mixture, width)
    log_eps = float(1e-6 * scale) if log_eps is None else log_eps
    log_grid, log_values, log_width = smoothed_density(torch.log10(nodes.abs() + log_eps), mixture)
    device = op.device
    return Spectrum(values.to(device=device, dtype=dtype), None, residuals.to(device=device, dtype=dtype),
                    (residuals <= tol).to(device), quadrature.products, "slq", op.shape[0],
                    density=(grid, density), width=width, log_density=(log_grid, log_values),
                    log_width=log_width, log_eps=log_eps, nodes=nodes, weights=weights,
                    reorthogonalized=quadrature.reorthogonalized)


def _check_arguments(method: str, k, which: str, tol: float, max_products, P: int) -> int:
    """Raise :class:`InvalidProblem` on a bad argument; return ``max_products`` with its default."""
    if method not in METHODS:
        raise InvalidProblem(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if which not in WHICH:
        raise InvalidProblem(f"unknown which {which!r}; choose one of {', '.join(map(repr, WHICH))}")
    if k is not None and method != "slq":
        require_integer("k", k, maximum=P, hint=" (P), or None for all")
    require_number("tol", tol)
    if max_products is None:
        return 20 * (k or P) + 200
    return require_integer("max_products", max_products, minimum=2 * (k or P),
                           hint=" (2k: k Lanczos steps and k products to check them)")


def _check_slq_arguments(probes, steps, width, log_eps) -> None:
    require_integer("probes", probes)
    require_integer("steps", steps, minimum=2)
    for name, value in (("width", width), ("log_eps", log_eps)):
        if value is not None:
            require_number(name, value, hint=" or None for the default")
