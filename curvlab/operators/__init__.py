"""Exact curvature operators and :func:`curvature`, the one way to build them."""

from curvlab.errors import InvalidProblem
from curvlab.operators.abs_hessian import AbsHessian
from curvlab.operators.base import BlockDiagonal, CurvatureOperator, DenseMatrix
from curvlab.operators.empirical_fisher import EmpiricalFisher
from curvlab.operators.fisher_mc import FisherMC
from curvlab.operators.ggn import GGN, Fisher
from curvlab.operators.gradient_second_moment import GradientSecondMoment
from curvlab.operators.hessian import Hessian
from curvlab.problem import Problem

KINDS = ("hessian", "abs_hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher", "gradient_second_moment")


def _operator(problem: Problem, kind: str, mc_samples: int, seed: int, top_k: int) -> CurvatureOperator:
    if kind == "fisher_mc":
        return FisherMC(problem, mc_samples=mc_samples, seed=seed)
    if kind == "abs_hessian":
        return AbsHessian(problem, top_k=top_k, seed=seed)
    return {"hessian": Hessian, "ggn": GGN, "fisher": Fisher, "empirical_fisher": EmpiricalFisher,
            "gradient_second_moment": GradientSecondMoment}[kind](problem)


def curvature(problem: Problem, kind: str, mc_samples: int = 1, seed: int = 0, block_diagonal: bool = False,
              top_k: int = 20) -> CurvatureOperator:
    """The exact curvature matrix ``kind`` of ``problem``'s loss on all its data, as a ``(P, P)`` operator.

    Args:
        problem: the model, data, loss and studied parameters.
        kind: ``"hessian"``, ``"abs_hessian"``, ``"ggn"``, ``"fisher"`` (equals the GGN for curvlab's
            losses), ``"fisher_mc"``, ``"empirical_fisher"`` or ``"gradient_second_moment"`` (the average
            of ``ḡ_b ḡ_bᵀ`` over the data's batches, ``ḡ_b`` the gradient of batch b's loss reduced as
            torch reduces it on that batch alone: the matrix Adam, Adagrad and Shampoo accumulate).
        mc_samples: labels drawn per example (and position) for ``fisher_mc``.
        seed: fixes the labels of ``fisher_mc`` and the Lanczos start of ``abs_hessian``.
        block_diagonal: keep only the diagonal blocks, one per module that owns studied parameters
            (for ``abs_hessian``: the |λ| of each Hessian block).
        top_k: eigenpairs ``abs_hessian`` keeps when the dense Hessian exceeds the memory budget.

    Examples:
        >>> import torch, curvlab
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> G = curvlab.curvature(prob, "ggn")
        >>> G.shape
        (8, 8)
        >>> bool(torch.allclose(G @ torch.eye(8), G.to_dense()))
        True
    """
    if kind not in KINDS:
        raise InvalidProblem(f"unknown curvature kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not block_diagonal:
        return _operator(problem, kind, mc_samples, seed, top_k)
    blocks = [(module, _operator(problem.restrict(names), kind, mc_samples, seed, top_k))
              for module, names in problem.module_blocks()]
    return BlockDiagonal(problem, blocks)


__all__ = ["KINDS", "AbsHessian", "BlockDiagonal", "CurvatureOperator", "DenseMatrix", "EmpiricalFisher", "Fisher", "FisherMC",
           "GGN", "GradientSecondMoment", "Hessian", "curvature"]
