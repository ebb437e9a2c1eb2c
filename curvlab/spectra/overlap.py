"""How far two eigenspaces agree: ``overlap(U, V) = ‖Uᵀ V‖_F² / min(k_U, k_V)``.

For orthonormal columns ``U`` ``(P, k_U)`` and ``V`` ``(P, k_V)``, ``‖Uᵀ V‖_F²`` is the sum of the
squared cosines of the principal angles between the two subspaces (Gur-Ari et al. 2018 use it to
compare top-k Hessian eigenspaces over training). The overlap is 1 when the smaller space lies in the
larger one, 0 when they are orthogonal, and ``k/P`` in expectation for two random ``k``-dimensional
spaces.

At a tie the top-k eigenspace is not unique: where eigenvalues equal the k-th one (FOOF's ``A ⊗ I``
repeats each eigenvalue ``d_out`` times), which vectors of the tied eigenspace an eigensolver returns
is arbitrary. :func:`leading_eigenspace` and :func:`projector_cosine` make the comparison canonical:
the top-k projector becomes ``P = Σ_i w_i u_i u_iᵀ`` with ``w_i = 1`` above the tie and ``w_i = m/c``
on the ``c`` tied eigenvectors of which ``m`` are among the top ``k`` (the mean of the projectors of
all ``m``-dimensional subspaces of the tied eigenspace), and two such projectors are compared by
their Frobenius cosine ``⟨P_A, P_C⟩_F / (‖P_A‖_F ‖P_C‖_F)``, which does not depend on the bases and
is ``‖U_Aᵀ U_C‖_F² / k`` when neither side has a tie.
"""

import torch

from curvlab.errors import InvalidProblem


def _basis(space) -> torch.Tensor:
    vectors = getattr(space, "eigenvectors", space)
    if vectors is None:
        raise InvalidProblem("the spectrum has no eigenvectors; compute it with vectors=True")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2:
        raise InvalidProblem("give a Spectrum with eigenvectors or a (P, k) tensor of orthonormal columns")
    return vectors


def _alongside(V: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``V`` on ``U``'s device and dtype, after checking that both bases live in the same dimension."""
    if U.shape[0] != V.shape[0]:
        raise InvalidProblem(f"the eigenspaces live in different dimensions, {U.shape[0]} and {V.shape[0]}")
    return V.to(device=U.device, dtype=U.dtype)


def eigenspace_overlap(first, second) -> float:
    """``‖Uᵀ V‖_F² / min(k_U, k_V)`` for two eigenspaces, each a :class:`Spectrum` or a ``(P, k)`` tensor.

    Examples:
        >>> import torch
        >>> from curvlab.spectra import eigenspace_overlap
        >>> eye = torch.eye(4, dtype=torch.float64)
        >>> eigenspace_overlap(eye[:, :2], eye[:, :3]), eigenspace_overlap(eye[:, :2], eye[:, 2:])
        (1.0, 0.0)
    """
    U, V = _basis(first), _basis(second)
    V = _alongside(V, U)
    return float((U.T @ V).square().sum() / min(U.shape[1], V.shape[1]))


def leading_eigenspace(values: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` eigenvalues largest in magnitude of ``(values (n,), vectors (P, n))``, ties weighted: ``(U, w)``.

    ``U`` ``(P, j)`` holds the eigenvectors above the ``k``-th magnitude and every one tied with it,
    ``w`` ``(j,)`` their weights (1 above the tie, ``m/c`` on a tie of ``c`` of which ``m`` are among
    the top ``k``; ``Σ w = k``). Magnitudes within ``√ε · max|λ|`` (``ε`` of the dtype) of the ``k``-th
    count as tied: ``eigh``'s eigenvalues carry errors ``O(ε ‖M‖₂)``, so eigenvectors whose eigenvalues
    are closer than ``√ε ‖M‖₂`` are determined to no better than ``√ε`` and are treated as one eigenspace.
    """
    magnitudes, order = values.abs().sort(descending=True, stable=True)
    rtol = torch.finfo(values.dtype).eps ** 0.5
    tied = (magnitudes - magnitudes[k - 1]).abs() <= rtol * magnitudes[0]
    inside = torch.arange(len(values), device=values.device) < k
    weights = torch.ones(len(values), dtype=values.dtype, device=values.device)
    weights[tied] = float((tied & inside).sum()) / float(tied.sum())
    chosen = inside | tied
    return vectors[:, order[chosen]], weights[chosen]


def projector_cosine(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``⟨P_A, P_C⟩_F / (‖P_A‖_F ‖P_C‖_F)`` for ``P = U diag(w) Uᵀ``, each side ``(U, w)`` from :func:`leading_eigenspace`.

    Examples:
        >>> import torch
        >>> from curvlab.spectra.overlap import leading_eigenspace, projector_cosine
        >>> values, eye = torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        >>> top = leading_eigenspace(values, eye, 2)  # the second place is a tie of two
        >>> top[1].tolist(), projector_cosine(top, top)
        ([1.0, 0.5, 0.5], 1.0)
    """
    (U, u), (V, v) = first, second
    V, v = _alongside(V, U), v.to(device=U.device, dtype=U.dtype)
    inner = u @ (U.T @ V).square() @ v
    return float(inner / (u.square().sum() * v.square().sum()).sqrt())
