"""Hutchinson's diagonal estimator, as AdaHessian uses it: ``d̂ = (1/S) Σ_s z_s ⊙ (C z_s)`` ``(P,)``.

``z_s`` ``(P,)`` has independent Rademacher entries (±1), so ``E[z_i z_j] = δ_ij`` and
``E[z ⊙ C z] = diag(C)``: the estimate is unbiased and converges to the exact diagonal as the number
of samples ``S → ∞``, with ``Var d̂_i = (1/S) Σ_{j ≠ i} C_ij²``; it is exact for any ``S`` when ``C`` is
diagonal. ``C`` is any exact curvature (AdaHessian and Sophia-H use the Hessian); each sample costs one
product ``C z``.

AdaHessian (amirgholami/adahessian) differs in two options:

- ``absolute``: it keeps ``|C z| = |z ⊙ C z|`` per sample (``|z_i| = 1``), whose mean estimates
  ``E|z ⊙ C z|``, not ``diag(C)``; its second moment ``E[(z ⊙ C z)_i²] = Σ_j C_ij²`` is what its
  running average of squares tracks.
- ``spatial_average``: for 4-D parameters (Conv2d weights ``(out, in, kh, kw)``) the estimate is
  replaced by its mean over the kernel window ``(kh, kw)``, broadcast back (the image-classification
  version of AdaHessian; 0- to 2-D parameters are left as they are). The average of an unbiased
  estimate converges to the window mean of ``diag(C)``, no longer to ``diag(C)`` itself.

The ``z`` come from a CPU generator seeded with ``seed``, drawn in chunks of at most 128 samples and
:data:`CHUNK_ENTRIES` entries; the caller's random state is untouched.
"""

import torch

from curvlab.approx.base import Approximation
from curvlab.approx.diagonal import diagonal_approximation, require_kind
from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators import KINDS
from curvlab.operators import curvature as curvature_operator
from curvlab.operators.base import DENSE_CHUNK, rademacher
from curvlab.problem import Problem

CHUNK_ENTRIES = 2 ** 24
"""The most entries of ``z`` (samples × P) drawn and multiplied at once."""


def _kernel_window_average(problem: Problem, values: torch.Tensor) -> torch.Tensor:
    pieces = problem.unflatten(values)
    averaged = {name: piece.mean(dim=(2, 3), keepdim=True).expand_as(piece) if piece.ndim == 4 else piece
                for name, piece in pieces.items()}
    return problem.flatten(averaged)


def diag_hutchinson(problem: Problem, curvature: str = "hessian", samples: int = 1, seed: int = 0,
                    spatial_average: bool = False, absolute: bool = False, mc_samples: int = 1) -> Approximation:
    """Hutchinson's estimate ``(1/S) Σ_s z_s ⊙ (C z_s)`` of ``diag(C)``, as block-diagonal ``DiagonalBlock`` s.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: any kind of :func:`curvlab.curvature` (AdaHessian: ``"hessian"``).
        samples: the number ``S`` of Rademacher vectors (AdaHessian and Sophia-H draw one per step).
        seed: seeds the Rademacher vectors (and the labels of ``fisher_mc``).
        spatial_average: average 4-D (convolution) weights over the kernel window, as AdaHessian does.
        absolute: take ``|z ⊙ C z|`` per sample, as AdaHessian does (then not an estimate of ``diag(C)``).
        mc_samples: labels per example when ``curvature="fisher_mc"``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.hutchinson import diag_hutchinson
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(50, 3), torch.randint(0, 2, (50,))))
        >>> exact = curvlab.curvature(prob, "ggn").to_dense().diagonal()
        >>> estimate = diag_hutchinson(prob, "ggn", samples=500).to_dense().diagonal()
        >>> bool((estimate - exact).abs().max() < 0.5 * exact.abs().max())  # error ~ 1/sqrt(samples)
        True
    """
    require_kind("diag_hutchinson", curvature, KINDS)
    samples = require_integer("samples", samples)
    seed = require_integer("seed", seed, minimum=0)
    mc_samples = require_integer("mc_samples", mc_samples)
    for name, flag in (("spatial_average", spatial_average), ("absolute", absolute)):
        if not isinstance(flag, bool):
            raise InvalidProblem(f"{name} must be True or False, got {flag!r}")
    operator = curvature_operator(problem, curvature, mc_samples=mc_samples, seed=seed)
    P = problem.num_params
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, min(DENSE_CHUNK, CHUNK_ENTRIES // P))
    total = torch.zeros(P, dtype=problem.dtype, device=problem.device)
    for start in range(0, samples, chunk):
        z = rademacher(generator, min(chunk, samples - start), P, problem.dtype, problem.device)
        estimates = z * (operator @ z.T).T
        total += (estimates.abs() if absolute else estimates).sum(0)
    values = total / samples
    if spatial_average:
        values = _kernel_window_average(problem, values)
    return diagonal_approximation(problem, "diag_hutchinson", curvature, values)
