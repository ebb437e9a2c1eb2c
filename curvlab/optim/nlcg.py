"""Nonlinear conjugate gradients with a diagonal quasi-Newton preconditioner (Adya et al. 2018; OPTIMIZERS.md §15).

At step k with gradient ``g_k`` and the diagonal ``D_k ≈ diag(H⁻¹)``:

    z_k = D_k g_k;   β_k = g_kᵀz_k / g_{k−1}ᵀz_{k−1}                    (Fletcher–Reeves)
                     β_k = max(0, g_kᵀ(z_k − z_{k−1}) / g_{k−1}ᵀz_{k−1})  (Polak–Ribière⁺)
    d_k = −z_k + β_k d_{k−1};   θ_{k+1} = θ_k + η α_k d_k

with restarts ``β_k = 0`` at the first step, every ``restart_interval`` steps, when PR⁺ clamps, and
``d_k = −z_k`` when ``d_k`` is not a descent direction (``g_kᵀd_k ≥ 0``). ``D`` is the diagonal of the
BFGS update of the inverse Hessian ``diag(D)`` with ``s = θ_k − θ_{k−1}``, ``y = g_k − g_{k−1}``,
``ρ = 1/sᵀy`` (skipped when ``sᵀy ≤ 0``):

    D_ii ← D_ii − 2ρ s_i y_i D_ii + ρ² s_i² (yᵀDy) + ρ s_i²,

positive whenever ``sᵀy > 0`` (a diagonal entry of the positive definite BFGS matrix). ``α_k`` is the
line-search factor: the paper's online stochastic search (``α`` starts at 1, shrinks when the batch
loss rises by more than a threshold over the previous step's, grows up to 1 when it rises by less than
another), the exact minimiser ``−g_kᵀd_k / d_kᵀH d_k`` on a quadratic (an analysis mode), or 1.

The paper's Algorithm 1 could not be read (OPTIMIZERS.md marks §15 unverified): this is the standard
preconditioned NLCG that its summary describes.
"""

from collections.abc import Mapping
from typing import NamedTuple

import torch

from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.operators import curvature
from curvlab.optim.adaptive import add_decayed_weights
from curvlab.optim.base import Params, Preconditioner, tree_dot, tree_map
from curvlab.optim.optimizer import Method

VARIANTS = ("pr", "fr")
LINE_SEARCHES = ("online", "exact_quadratic", "none")
PRECONDITIONERS = ("bfgs_diagonal", "fixed")


class NLCGState(NamedTuple):
    """What NLCG carries from step to step (the previous step's quantities are ``None`` before the first).

    Attributes:
        diagonal: ``D_k``, the diagonal inverse-Hessian estimate, name -> tensor.
        gradient, preconditioned, direction, params: ``g_{k−1}``, ``z_{k−1}``, ``d_{k−1}`` (descent
            sign, before any step size) and ``θ_{k−1}`` of the previous step.
        steps: the number of directions computed.
        step_factor: the line-search factor ``α`` of the online search.
        loss: the previous batch loss the online search compares with.
        hessian: the batch Hessian operator of this step (exact line search only; consumed by ``apply``).
    """

    diagonal: Params
    gradient: Params | None = None
    preconditioned: Params | None = None
    direction: Params | None = None
    params: Params | None = None
    steps: int = 0
    step_factor: float = 1.0
    loss: float | None = None
    hessian: object = None


def bfgs_diagonal_update(diagonal: Params, s: Params, y: Params) -> Params:
    """``diag`` of the BFGS inverse update of ``diag(D)``: ``D − 2ρ s⊙y⊙D + ρ²(yᵀDy) s⊙s + ρ s⊙s``, ``ρ = 1/sᵀy``.

    Returns ``D`` unchanged when ``sᵀy ≤ 0`` (the curvature condition fails).

    Examples:
        >>> import torch
        >>> from curvlab.optim.nlcg import bfgs_diagonal_update
        >>> D, s, y = {"w": torch.ones(2)}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}
        >>> bfgs_diagonal_update(D, s, y)["w"]  # the secant equation D y = s holds in this direction
        tensor([0.5000, 1.0000])
    """
    sy = float(tree_dot(s, y))
    if sy <= 0:
        return dict(diagonal)
    rho = 1.0 / sy
    yDy = float(sum(torch.sum(y[name] * diagonal[name] * y[name]) for name in y))
    return tree_map(lambda d, s_, y_: d - 2 * rho * s_ * y_ * d + (rho * rho * yDy + rho) * s_ * s_, diagonal, s, y)


def _initial_diagonal(initial_diagonal, params: Params) -> Params:
    if isinstance(initial_diagonal, Mapping):
        if set(initial_diagonal) != set(params):
            raise InvalidProblem(f"initial_diagonal must name exactly the parameters {', '.join(params)}, "
                                 f"got {', '.join(initial_diagonal)}")
        diagonal = {name: torch.as_tensor(initial_diagonal[name]).to(dtype=p.dtype, device=p.device).expand_as(p).clone()
                    for name, p in params.items()}
        if not all(bool((d > 0).all()) for d in diagonal.values()):
            raise InvalidProblem("initial_diagonal must be positive everywhere (it approximates diag(H⁻¹))")
        return diagonal
    value = require_number("initial_diagonal", initial_diagonal, hint=" or a dict name -> positive tensor")
    return {name: torch.full_like(p, value) for name, p in params.items()}


def conjugate_direction(variant: str = "pr", preconditioner: str = "bfgs_diagonal", initial_diagonal=1.0,
                        line_search: str = "online", shrink_threshold: float = 0.02, grow_threshold: float = 0.01,
                        step_factor_change: float = 0.025, restart_interval: int | None = None) -> Preconditioner:
    """``g_k ↦ Δ_k = −α_k d_k``, ``d_k = −D_k g_k + β_k d_{k−1}`` (the module's recursion; ``θ ← θ − η Δ``).

    ``linear(state)`` is ``v ↦ D_k v``, the preconditioner part ``z = D g`` of the last direction.
    ``accumulate`` reads the batch loss (online search) or the batch Hessian (exact search).
    """
    for name, value, choices in (("variant", variant, VARIANTS), ("line_search", line_search, LINE_SEARCHES),
                                 ("preconditioner", preconditioner, PRECONDITIONERS)):
        if value not in choices:
            raise InvalidProblem(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    shrink_threshold = require_number("shrink_threshold", shrink_threshold, strict=False)
    grow_threshold = require_number("grow_threshold", grow_threshold, strict=False)
    if grow_threshold > shrink_threshold:
        raise InvalidProblem(f"grow_threshold ({grow_threshold:g}) must not exceed shrink_threshold ({shrink_threshold:g})")
    step_factor_change = require_number("step_factor_change", step_factor_change, maximum=1.0)
    if restart_interval is not None:
        restart_interval = require_integer("restart_interval", restart_interval)
    if not isinstance(initial_diagonal, Mapping):
        require_number("initial_diagonal", initial_diagonal, hint=" or a dict name -> positive tensor")

    def init(params):
        return NLCGState(diagonal=_initial_diagonal(initial_diagonal, params))

    def accumulate(state, statistics):
        if line_search == "exact_quadratic":
            return state._replace(hessian=curvature(statistics.problem, "hessian"))
        factor, previous = state.step_factor, state.loss
        if previous is not None:
            rise = statistics.loss - previous
            if rise > shrink_threshold * abs(previous):
                factor *= 1 - step_factor_change
            elif rise < grow_threshold * abs(previous):
                factor = min(1.0, factor * (1 + step_factor_change))
        return state._replace(step_factor=factor, loss=statistics.loss)

    def beta(grads, z, state):
        if state.gradient is None or (restart_interval is not None and state.steps % restart_interval == 0):
            return 0.0
        previous = float(tree_dot(state.gradient, state.preconditioned))
        if variant == "fr":
            return float(tree_dot(grads, z)) / previous
        return max(0.0, float(tree_dot(grads, tree_map(torch.sub, z, state.preconditioned))) / previous)

    def step_size(grads, d, state):
        if line_search == "none":
            return 1.0
        if line_search == "online":
            return state.step_factor
        if state.hessian is None:
            raise InvalidProblem("line_search='exact_quadratic' needs the batch Hessian: call accumulate before apply")
        curvature_along = float(tree_dot(d, state.hessian @ d))
        slope = float(tree_dot(grads, d))
        if curvature_along <= 0:
            if slope == 0:
                return 0.0
            raise InvalidProblem(f"line_search='exact_quadratic' needs dᵀHd > 0 along the direction, got "
                                 f"{curvature_along:g}: it is meant for convex quadratics")
        return -slope / curvature_along

    def apply(grads, state, params):
        diagonal = state.diagonal
        if preconditioner == "bfgs_diagonal" and state.gradient is not None:
            diagonal = bfgs_diagonal_update(diagonal, tree_map(torch.sub, params, state.params),
                                            tree_map(torch.sub, grads, state.gradient))
        z = tree_map(torch.mul, diagonal, grads)
        b = beta(grads, z, state)
        d = tree_map(lambda z_, d_: b * d_ - z_, z, state.direction) if b != 0 else tree_map(torch.neg, z)
        if float(tree_dot(grads, d)) >= 0:
            d = tree_map(torch.neg, z)
        alpha = step_size(grads, d, state)
        new_state = state._replace(diagonal=diagonal, gradient=dict(grads), preconditioned=z, direction=d,
                                   params={name: p.clone() for name, p in params.items()}, steps=state.steps + 1,
                                   hessian=None)
        return tree_map(lambda d_: -alpha * d_, d), new_state

    def linear(state):
        return lambda v: tree_map(torch.mul, state.diagonal, v)

    return Preconditioner(init=init, apply=apply, accumulate=None if line_search == "none" else accumulate,
                          linear=linear)


def nlcg(variant: str = "pr", preconditioner: str = "bfgs_diagonal", initial_diagonal=1.0, line_search: str = "online",
         shrink_threshold: float = 0.02, grow_threshold: float = 0.01, step_factor_change: float = 0.025,
         restart_interval: int | None = None, weight_decay: float = 0.0) -> Method:
    """NLCG (Adya, Palakkode, Tuzel 2018): preconditioned conjugate directions, ``θ ← θ − η (Δ + λθ)``.

    ``Δ = −α d`` (:func:`conjugate_direction`): ``last_direction`` is the conjugate direction ``−d``
    times the line-search factor ``α`` (the step size is ``η α``, as the paper's ``lr_t · α_l``).

    Args:
        variant: ``"pr"`` (Polak–Ribière⁺) or ``"fr"`` (Fletcher–Reeves).
        preconditioner: ``"bfgs_diagonal"`` (the paper's diagonal BFGS estimate, from ``D_0``) or
            ``"fixed"`` (``D = D_0`` at every step: preconditioned CG).
        initial_diagonal: ``D_0``: a positive number, or a dict name -> positive tensor.
        line_search: ``"online"`` (the paper's: ``α ← α(1 − step_factor_change)`` when the batch loss rises
            by more than ``shrink_threshold`` relative to the previous step's, ``α ← min(1, α(1 +
            step_factor_change))`` when it rises by less than ``grow_threshold`` (or falls); defaults 2%,
            1%, 2.5%), ``"exact_quadratic"`` (``α = −gᵀd / dᵀHd`` with the batch Hessian: exact on a
            quadratic loss, for tests and analysis; with ``lr=1``, ``"fixed"`` and a full batch it is
            preconditioned CG) or ``"none"`` (``α = 1``: the learning-rate schedule alone).
        shrink_threshold, grow_threshold, step_factor_change: the online search's thresholds.
        restart_interval: also restart (``β = 0``) every this many steps; ``None``: only the automatic restarts.
        weight_decay: decoupled weight decay ``λ`` (the paper uses none).
    """
    return Method(conjugate_direction(variant, preconditioner, initial_diagonal, line_search, shrink_threshold,
                                      grow_threshold, step_factor_change, restart_interval),
                  add_decayed_weights(weight_decay))
