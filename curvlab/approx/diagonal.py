"""Exact diagonals of curvature matrices, ``diag(C)`` ``(P,)``, without forming ``C``.

With ``L = R Σ_n ℓ_n`` (DESIGN.md) and ``J_n`` ``(D, P)`` the Jacobian of example n's output:

- GGN / Fisher: ``diag G = R Σ_n Σ_c (J_nᵀ s_nc)²``, ``s_nc`` the ``D`` columns of the square root of
  the block-diagonal output Hessian ``∇²_f ℓ_n`` (one block per position, ``likelihood.hessian_sqrt``):
  one forward pass and ``D`` backward passes (``D = C`` classes for a classifier), squared per example
  (:mod:`curvlab.approx.per_example`);
- empirical Fisher: ``R Σ_n (J_nᵀ r_n)²`` with the residual ``r_n = ∂ℓ_n/∂f_n``, i.e. the squared
  per-example gradients of ``ℓ_n``;
- MC Fisher: ``R Σ_n (1/S) Σ_s (J_nᵀ r_ns)²`` at the labels ``ŷ_ns`` of
  ``curvlab.curvature(problem, "fisher_mc", mc_samples, seed)``;
- gradient second moment: ``(1/B) Σ_b ḡ_b ⊙ ḡ_b`` with ``ḡ_b`` the torch-reduced gradient of batch b
  (:mod:`curvlab.operators.gradient_second_moment`): what Adam's ``v`` and Adagrad's accumulator hold,
  before the square root; :func:`diag_sqgrad` builds it under its optimizer name;
- Hessian and |λ|-Hessian: the diagonals of products with all ``P`` columns of the identity, in blocks
  (:func:`curvlab.operators.base.exact_diagonal`) — ``P`` Hessian-vector products, affordable only for
  small models.

Every result is an :class:`~curvlab.approx.base.Approximation` of :class:`DiagonalBlock` blocks, one per
module that owns studied parameters, labelled by the module's name.
"""

import torch

from curvlab.approx.base import Approximation, DiagonalBlock, flat_entries
from curvlab.approx.per_example import squared_pullbacks
from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators import KINDS
from curvlab.operators import curvature as curvature_operator
from curvlab.operators.base import exact_diagonal as operator_exact_diagonal
from curvlab.operators.gradient_second_moment import batch_gradient
from curvlab.problem import Problem


def require_kind(kind: str, curvature_kind: str, allowed: tuple[str, ...]) -> str:
    """``curvature_kind`` if it is one of ``allowed``, else :class:`InvalidProblem` naming the choices."""
    if curvature_kind not in allowed:
        raise InvalidProblem(
            f"{kind} does not support curvature={curvature_kind!r}; choose one of {', '.join(allowed)}"
        )
    return curvature_kind


def diagonal_approximation(problem: Problem, kind: str, curvature_kind: str, values: torch.Tensor) -> Approximation:
    """The :class:`Approximation` ``diag(values)``, one :class:`DiagonalBlock` per module (labels = module names).

    A module whose parameters are adjacent in the flat order gets a view of ``values``, not a copy.
    """
    blocks = [(module, names, DiagonalBlock(values[flat_entries(problem, names)]))
              for module, names in problem.module_blocks()]
    return Approximation(problem, kind, curvature_kind, blocks)


def hessian_sqrt_columns(problem: Problem, output: torch.Tensor) -> torch.Tensor:
    """The ``D`` columns of the square root of every example's output Hessian: ``(D, N, *O)``, ``D = prod(O)``.

    ``likelihood.hessian_sqrt`` gives ``S`` ``(N, *O, K)`` per independent group of outputs (a position's
    ``K = C`` logits, or single entries with ``K = 1``); column ``(g, k)`` holds ``S[:, g, :, k]`` at
    group ``g`` and zeros elsewhere.
    """
    roots = problem.likelihood.hessian_sqrt(output)
    size, width = output.shape[0], roots.shape[-1]
    if width == 1:
        flat = roots.reshape(size, -1)
        return torch.diag_embed(flat).permute(2, 0, 1).reshape(flat.shape[1], *output.shape)
    groups = roots.reshape(size, -1, output.shape[-1], width)
    eye = torch.eye(groups.shape[1], dtype=output.dtype, device=output.device)
    columns = torch.einsum("gh,nhck->gknhc", eye, groups)
    return columns.reshape(-1, *output.shape)


def sqgrad_diagonal(problem: Problem) -> torch.Tensor:
    """``(1/B) Σ_b ḡ_b ⊙ ḡ_b`` ``(P,)``, the diagonal of the gradient second moment, one batch at a time."""
    total = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)
    for _, X, y in problem.batches():
        total += batch_gradient(problem, X, y).square()
    return problem.reduce(total) / problem.num_batches


def exact_diagonal(problem: Problem, curvature_kind: str, mc_samples: int = 1, seed: int = 0) -> torch.Tensor:
    """``diag(C)`` ``(P,)`` of the exact curvature ``curvature_kind`` (any of ``curvlab.operators.KINDS``)."""
    require_kind("diag", curvature_kind, KINDS)
    likelihood, R = problem.likelihood, problem.reduction_factor
    if curvature_kind in ("ggn", "fisher"):
        return R * squared_pullbacks(problem, lambda index, output, y: hessian_sqrt_columns(problem, output))
    if curvature_kind == "empirical_fisher":
        return R * squared_pullbacks(problem, lambda index, output, y: likelihood.output_grad(output, y)[None])
    if curvature_kind == "fisher_mc":  # fisher_mc's labels, drawn from the outputs of the pass that uses them
        return R * squared_pullbacks(problem, lambda index, output, y: likelihood.output_grad(
            output, problem.sample_targets(index, output, mc_samples, seed)) / mc_samples ** 0.5)
    if curvature_kind == "gradient_second_moment":
        return sqgrad_diagonal(problem)
    return operator_exact_diagonal(curvature_operator(problem, curvature_kind, seed=seed), progress=False)


def diag(problem: Problem, curvature: str = "ggn", mc_samples: int = 1, seed: int = 0) -> Approximation:
    """The exact diagonal ``diag(C)`` of the curvature ``curvature``, as block-diagonal :class:`DiagonalBlock` s.

    Cost: ``ggn``/``fisher`` one forward and ``D`` backward passes per batch (``D`` outputs per example);
    ``empirical_fisher`` one backward, ``fisher_mc`` ``mc_samples``; ``gradient_second_moment`` one
    gradient per batch; ``hessian`` and ``abs_hessian`` ``P`` products (small models only).

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: any kind of :func:`curvlab.curvature`.
        mc_samples: labels per example for ``fisher_mc``.
        seed: the labels of ``fisher_mc`` (the same as ``curvlab.curvature(problem, "fisher_mc", mc_samples,
            seed)``'s) and the Lanczos start of ``abs_hessian``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.diagonal import diag
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])))
        >>> D = diag(prob, "ggn")
        >>> [label for label, _, _ in D.blocks]
        ['0', '2']
        >>> bool(torch.allclose(D.to_dense().diagonal(), curvlab.curvature(prob, "ggn").to_dense().diagonal()))
        True
    """
    mc_samples = require_integer("mc_samples", mc_samples)
    seed = require_integer("seed", seed, minimum=0)
    return diagonal_approximation(problem, "diag", curvature, exact_diagonal(problem, curvature, mc_samples, seed))


def diag_sqgrad(problem: Problem, curvature: str = "gradient_second_moment") -> Approximation:
    """Adam's / Adagrad's diagonal: ``(1/B) Σ_b ḡ_b ⊙ ḡ_b``, the diagonal of the gradient second moment.

    ``ḡ_b`` is the gradient of batch b's loss reduced as torch reduces it on that batch alone, so this is
    Adagrad's accumulator after one step per batch (``initial_accumulator_value=0``) divided by ``B``, and
    Adam's ``v`` (bias-corrected) in the limit ``β₂ → 1``; the optimizers precondition with its square root.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: the exact kind the approximation stands for when it is compared with one (recorded in
            :attr:`Approximation.curvature`; the values never depend on it): by default its own exact
            counterpart ``"gradient_second_moment"``; e.g. ``"ggn"`` to compare Adam's diagonal with the GGN.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.diagonal import diag_sqgrad
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> prob = curvlab.Problem(model, [(X[:2], y[:2]), (X[2:], y[2:])])
        >>> v = diag_sqgrad(prob).to_dense().diagonal()
        >>> M = curvlab.curvature(prob, "gradient_second_moment").to_dense()
        >>> bool(torch.allclose(v, M.diagonal()))
        True
    """
    require_kind("diag_sqgrad", curvature, KINDS)
    return diagonal_approximation(problem, "diag_sqgrad", curvature, sqgrad_diagonal(problem))
