"""The exact operator an approximation is fitted to: the problem's curvature of a kind, or one the caller gives."""

from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators import KINDS
from curvlab.operators import curvature as exact_curvature
from curvlab.operators.base import CurvatureOperator
from curvlab.problem import Problem

CURVATURE_OPTIONS = ("mc_samples", "block_diagonal", "top_k")


def curvature_operator(problem: Problem, curvature: str, operator: CurvatureOperator | None, seed: int,
                       options: dict) -> CurvatureOperator:
    """The operator an approximation is fitted to: ``operator`` if given, else ``curvature(problem, curvature)``.

    ``options`` are :func:`curvlab.curvature`'s ``mc_samples``, ``block_diagonal`` and ``top_k``;
    ``seed`` (an integer ``≥ 0``) is passed on as its ``seed``. With ``operator``, ``curvature`` only
    names the exact kind it stands for, and ``options`` must be empty.
    """
    require_integer("seed", seed, minimum=0)
    if curvature not in KINDS:
        raise InvalidProblem(f"unknown curvature kind {curvature!r}; choose one of {', '.join(KINDS)}")
    unknown = sorted(set(options) - set(CURVATURE_OPTIONS))
    if unknown:
        raise InvalidProblem(
            f"unknown option(s) {', '.join(unknown)}; the curvature options are {', '.join(CURVATURE_OPTIONS)}"
        )
    if operator is None:
        return exact_curvature(problem, curvature, seed=seed, **options)
    if options:
        raise InvalidProblem(
            f"the curvature option(s) {', '.join(sorted(options))} do not apply to a given operator; "
            f"set them when building the operator"
        )
    if not isinstance(operator, CurvatureOperator) or operator.shape != (problem.num_params,) * 2:
        raise InvalidProblem(
            f"operator must be a curvlab CurvatureOperator of shape {(problem.num_params,) * 2} over the "
            f"problem's studied parameters, got {operator!r}"
        )
    return operator
