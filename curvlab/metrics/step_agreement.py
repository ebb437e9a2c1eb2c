"""How an optimizer's step ``d`` agrees with exact steps and with the exact quadratic model of the loss.

Along ``θ − α d`` the quadratic model is ``m(α) = L − α gᵀd + ½ α² dᵀHd``. Its best scalar step is
``α* = gᵀd / dᵀHd`` and its decrease there ``(gᵀd)² / (2 dᵀHd)`` when ``dᵀHd > 0``; the model is
unbounded below along ``d`` (decrease ``+∞``) when ``dᵀHd < 0``, or when ``dᵀHd = 0`` and ``gᵀd ≠ 0``.
Every function takes flat vectors ``(P,)`` or dicts name -> tensor (flattened in the dict's order) and
returns Python floats; :func:`scopes` gives the whole model and each module's entries, so that the same
functions measure one block (a module's ``d_b``, ``g_b`` and ``H_bb d_b``) at a time.
"""

import math
from collections.abc import Mapping

import torch

from curvlab.problem import Problem

Vector = torch.Tensor | Mapping[str, torch.Tensor]


def flat(vector: Vector) -> torch.Tensor:
    """``vector`` as one flat float64 tensor ``(P,)`` (a dict's values concatenated in its order)."""
    if isinstance(vector, Mapping):
        return torch.cat([torch.as_tensor(value).reshape(-1) for value in vector.values()]).double()
    return torch.as_tensor(vector).reshape(-1).double()


def cosine(a: Vector, b: Vector) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)``; nan when either is zero.

    Examples:
        >>> import torch
        >>> cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        0.7071067811865475
    """
    a, b = flat(a), flat(b)
    norms = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(a @ b) / norms if norms > 0 else math.nan


def norm_ratio(a: Vector, b: Vector) -> float:
    """``‖a‖ / ‖b‖``; nan when ``b`` is zero.

    Examples:
        >>> import torch
        >>> norm_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]))
        2.5
    """
    denominator = float(torch.linalg.vector_norm(flat(b)))
    return float(torch.linalg.vector_norm(flat(a))) / denominator if denominator > 0 else math.nan


def best_scalar_step(gradient: Vector, direction: Vector, hessian_direction: Vector) -> tuple[float, float]:
    """``(α*, decrease)`` of the quadratic model along ``θ − α d``: ``α* = gᵀd / dᵀHd``, decrease ``(gᵀd)² / (2 dᵀHd)``.

    ``hessian_direction`` is ``H d``. When ``dᵀHd ≤ 0`` the decrease is ``+∞`` (unbounded along ``d``)
    unless ``gᵀd = dᵀHd = 0`` (then 0); ``α*`` is nan whenever it is not a finite minimiser, and both are
    nan when an input is (a reference step that does not exist).

    Examples:
        >>> import torch
        >>> g, H = torch.tensor([1.0, 2.0]), torch.diag(torch.tensor([1.0, 4.0]))
        >>> best_scalar_step(g, g, H @ g)
        (0.29411764705882354, 0.7352941176470589)
    """
    g, d, Hd = flat(gradient), flat(direction), flat(hessian_direction)
    slope, curvature = float(g @ d), float(d @ Hd)
    if math.isnan(slope) or math.isnan(curvature):
        return math.nan, math.nan
    if curvature > 0:
        return slope / curvature, slope * slope / (2 * curvature)
    if curvature == 0 and slope == 0:
        return math.nan, 0.0
    return math.nan, math.inf


def quadratic_decrease(gradient: Vector, direction: Vector, hessian_direction: Vector) -> float:
    """The decrease ``(gᵀd)² / (2 dᵀHd)`` of the quadratic model at the best scalar step (see :func:`best_scalar_step`)."""
    return best_scalar_step(gradient, direction, hessian_direction)[1]


def decrease_ratio(decrease: float, reference_decrease: float) -> float:
    """``decrease / reference_decrease``; nan when either is infinite or the reference's is zero."""
    if not (math.isfinite(decrease) and math.isfinite(reference_decrease)) or reference_decrease == 0:
        return math.nan
    return decrease / reference_decrease


def scopes(problem: Problem) -> list[tuple[str, torch.Tensor | None]]:
    """``("all", None)`` for the whole model, then ``(module name, its flat-vector indices)`` per module.

    The root module's own parameters are labelled ``"(root)"``.
    """
    return [("all", None)] + [(module or "(root)", problem.entries(names)) for module, names in problem.module_blocks()]


def agreement(direction: Vector, gradient: Vector, hessian_direction: Vector, references: Mapping[str, Vector],
              reference: str, reference_hessian_direction: Vector) -> dict[str, float]:
    """Every agreement number of one step ``d`` on one scope (flat vectors of the scope's entries).

    Args:
        direction: ``d``.
        gradient: ``g`` (the step is ``θ − α d``).
        hessian_direction: ``H d`` (for a block: ``H_bb d_b``).
        references: name -> exact step ``d_ref``; gives ``cos_<name>``.
        reference: the name of the step that ``norm_ratio`` and ``quadratic_decrease_ratio`` divide by.
        reference_hessian_direction: ``H d_ref`` of that step.

    Returns:
        ``cos_<name>`` per reference, ``norm_ratio = ‖d‖/‖d_ref‖``, ``alpha_star``, ``quadratic_decrease``,
        ``reference_quadratic_decrease`` and ``quadratic_decrease_ratio``.
    """
    result = {f"cos_{name}": cosine(direction, step) for name, step in references.items()}
    alpha, decrease = best_scalar_step(gradient, direction, hessian_direction)
    reference_decrease = quadratic_decrease(gradient, references[reference], reference_hessian_direction)
    result.update(norm_ratio=norm_ratio(direction, references[reference]), alpha_star=alpha,
                  quadratic_decrease=decrease, reference_quadratic_decrease=reference_decrease,
                  quadratic_decrease_ratio=decrease_ratio(decrease, reference_decrease))
    return result
