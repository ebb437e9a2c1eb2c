"""How far two eigenspaces agree: ``overlap(U, V) = ‖Uᵀ V‖_F² / min(k_U, k_V)``.

For orthonormal columns ``U`` ``(P, k_U)`` and ``V`` ``(P, k_V)``, ``‖Uᵀ V‖_F²`` is the sum of the
squared cosines of the principal angles between the two subspaces (Gur-Ari et al. 2018 use it to
compare top-k Hessian eigenspaces over training). The overlap is 1 when the smaller space lies in the
larger one, 0 when they are orthogonal, and ``k/P`` in expectation for two random ``k``-dimensional
spaces.
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
    if U.shape[0] != V.shape[0]:
        raise InvalidProblem(f"the eigenspaces live in different dimensions, {U.shape[0]} and {V.shape[0]}")
    V = V.to(device=U.device, dtype=U.dtype)
    return float((U.T @ V).square().sum() / min(U.shape[1], V.shape[1]))
