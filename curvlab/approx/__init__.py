"""Structured curvature approximations and :func:`approximate`, the one way to build them."""

import inspect
from collections.abc import Callable

from curvlab.approx.base import (Approximation, Block, DenseBlock, DiagonalBlock, EigenbasisBlock, Homogeneous,
                                 KroneckerBlock, Layout, LowRankBlock, Reshape)
from curvlab.approx.diagonal import diag, diag_sqgrad
from curvlab.approx.gnb import diag_gnb
from curvlab.approx.gram import gram
from curvlab.approx.hutchinson import diag_hutchinson
from curvlab.approx.kfac import ekfac, foof, kfac
from curvlab.approx.lowrank import lowrank
from curvlab.approx.psgd import psgd_kron
from curvlab.approx.shampoo import shampoo
from curvlab.errors import InvalidProblem
from curvlab.problem import Problem

# kind -> builder(problem, curvature, **options) -> Approximation
_BUILDERS: dict[str, Callable[..., Approximation]] = {
    "diag": diag,
    "diag_hutchinson": diag_hutchinson,
    "diag_gnb": diag_gnb,
    "diag_sqgrad": diag_sqgrad,
    "ekfac": ekfac,
    "foof": foof,
    "kfac": kfac,
    "lowrank": lowrank,
    "psgd_kron": psgd_kron,
    "gram": gram,
    "shampoo": shampoo,
}

APPROXIMATIONS = tuple(_BUILDERS)


def options_of(kind: str) -> tuple[str, ...]:
    """The options (keyword arguments besides ``problem``) that approximation ``kind`` accepts."""
    return tuple(name for name in inspect.signature(_BUILDERS[kind]).parameters if name != "problem")


def approximate(problem: Problem, kind: str, curvature: str | None = None, **options) -> Approximation:
    """The structured approximation ``kind`` of the curvature ``curvature`` of ``problem``, as a ``(P, P)`` operator.

    Args:
        problem: the model, data, loss and studied parameters.
        kind: one of :data:`APPROXIMATIONS`.
        curvature: the exact kind it approximates; ``None`` for the approximation's own default
            (``"ggn"`` for ``diag``, the KFAC family and ``lowrank``; ``"hessian"`` for
            ``diag_hutchinson`` and ``psgd_kron``; ``"empirical_fisher"`` for ``gram``;
            ``"gradient_second_moment"`` for ``shampoo`` and ``diag_sqgrad``). Which kinds each
            approximation supports is in its builder's documentation.
        options: the approximation's own options.
    """
    if kind not in _BUILDERS:
        raise InvalidProblem(f"unknown approximation {kind!r}; choose one of {', '.join(_BUILDERS)}")
    builder = _BUILDERS[kind]
    arguments = options if curvature is None else {"curvature": curvature, **options}
    try:
        inspect.signature(builder).bind(problem, **arguments)
    except TypeError as err:
        accepted = [name for name in inspect.signature(builder).parameters if name != "problem"]
        raise InvalidProblem(f"{kind}: {err}; its options are {', '.join(accepted)}") from None
    return builder(problem, **arguments)


__all__ = ["APPROXIMATIONS", "Approximation", "Block", "DenseBlock", "DiagonalBlock", "EigenbasisBlock",
           "Homogeneous", "KroneckerBlock", "Layout", "LowRankBlock", "Reshape", "approximate", "options_of"]
