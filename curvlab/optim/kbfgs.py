"""K-BFGS (Goldfarb, Ren & Bahamou 2020; ASDL ``KronBfgsGradientMaker``; OPTIMIZERS.md §9).

Per ``nn.Linear`` / ``nn.Conv2d`` layer (see :mod:`curvlab.optim.kronecker`; other parameters keep
their gradient) the step is ``ΔW = H_g G H_a``, ``Δb = H_g g_b`` with two BFGS inverse matrices:

- ``H_a ≈ (A + λ_A I)⁻¹`` ``(d_in, d_in)``: ``A`` is the moving average of KFAC's input factor
  ``Σ_{n,t} a_nt a_ntᵀ / (N T)`` (the first batch's factor, then ``A ← (1 − β) A + β A_new``). On the
  first update ``H_a`` is the Cholesky inverse; on every update a Hessian-action BFGS step
  ``s = H_a ā``, ``y = (A + λ_A I) s`` (``ā`` the mean input) moves it towards the current ``A``.
- ``H_g`` ``(d_out, d_out)``, from ``I``: a BFGS inverse of the loss's Hessian with respect to the
  layer's pre-activations, from the secant pair of one mini-batch at two parameter values,
  ``s = s̄(θ_new) − s̄(θ_old)``, ``y = ē(θ_new) − ē(θ_old)`` (``s̄``, ``ē``: the pre-activations and
  the per-example output gradients at the true labels, averaged over examples and positions),
  Powell-damped with ``μ₁ = 0.2`` and then Levenberg–Marquardt-damped ``y ← y + λ_B s``.

Damping: ``λ_A = λ_B = √λ`` for a Linear, ``λ_A = √λ √T`` and ``λ_B = √λ / √T`` for a Conv2d with
``T`` output positions. The G-side pair needs the previous curvature batch at the current ``θ``:
the state keeps that batch and its means, and each curvature update evaluates it again at the
current parameters before measuring the new batch (with ``curvature_update_interval = k`` the pair
spans the ``k`` steps between two curvature updates, where ASDL evaluates it on the next step).
"""

import math
from dataclasses import dataclass, field, replace

import torch

from curvlab.approx.kfac import output_columns
from curvlab.approx.kronecker_statistics import KroneckerLayers
from curvlab.errors import require_number
from curvlab.optim.base import Preconditioner, Statistics, require_compat
from curvlab.optim.adaptive import study_method
from curvlab.optim.kronecker import (FactorInverse, ema_decay_of, cholesky_inverse,
                                     kronecker_direction, kronecker_layers)
from curvlab.problem import Problem


def bfgs_inverse_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The BFGS update of an inverse Hessian: ``H + (sᵀy + yᵀHy) ssᵀ/(sᵀy)² − (Hy sᵀ + s yᵀH)/sᵀy`` ``(d, d)``.

    The result ``H⁺`` satisfies the secant equation ``H⁺ y = s``; ``H`` is symmetrised first.

    Examples:
        >>> import torch
        >>> H = bfgs_inverse_update(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]))
        >>> H @ torch.tensor([2.0, 1.0])
        tensor([1., 0.])
    """
    H = (H + H.T) / 2
    sy = torch.dot(s, y)
    Hy = H @ y
    return H + (sy + torch.dot(y, Hy)) * torch.outer(s, s) / sy ** 2 - (torch.outer(Hy, s) + torch.outer(s, Hy)) / sy


def powell_lm_damping(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, mu1: float,
                      mu2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K-BFGS's double damping of a pair ``(s, y)`` for the inverse ``H``: Powell's on ``s``, then Levenberg–Marquardt on ``y``.

    If ``sᵀy < μ₁ yᵀHy``: ``θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy)`` and ``s ← θ s + (1 − θ) H y``; then
    ``y ← y + μ₂ s``. Afterwards ``sᵀy ≥ μ₁ yᵀHy + μ₂ sᵀs`` (up to rounding) for the damped pair.
    """
    Hy = H @ y
    yHy, sy = torch.dot(y, Hy), torch.dot(s, y)
    if sy < mu1 * yHy:
        theta = (1 - mu1) * yHy / (yHy - sy)
        s = theta * s + (1 - theta) * Hy
    return s, y + mu2 * s


@dataclass(frozen=True)
class LayerMeans:
    """One batch's statistics of a layer: ``A`` ``(d_in, d_in)``, ``ā``, ``s̄`` ``(d_out,)``, ``ē`` ``(d_out,)`` and ``T``."""

    A: torch.Tensor | None
    mean_input: torch.Tensor | None
    mean_output: torch.Tensor
    mean_output_gradient: torch.Tensor
    positions: int


def layer_means(problem: Problem, layers: dict) -> dict[str, LayerMeans]:
    """Per layer, the inputs' second moment and mean, and the means of pre-activations and true-label output gradients.

    One forward pass and one backward pass (true labels) over ``problem``'s data:
    ``A = Σ_{n,t} a aᵀ / (N T)``, ``ā = Σ a / (N T)``, ``s̄ = W ā + b``, ``ē = Σ_{n,t} ∂ℓ_n/∂s_nt / (N T)``.
    """
    taps = KroneckerLayers(problem)
    columns = output_columns(problem, "empirical_fisher", 1, 0)
    inputs_of = set(layers)
    sums = {label: [0, None, None, None, 0] for label in layers}
    for inputs, gradients in taps.statistics(inputs_of, columns):
        for label, a in inputs.items():
            rows = a.reshape(-1, a.shape[-1])
            entry = sums[label]
            entry[0] += rows.shape[0]
            entry[1] = rows.T @ rows if entry[1] is None else entry[1] + rows.T @ rows
            entry[2] = rows.sum(0) if entry[2] is None else entry[2] + rows.sum(0)
            entry[4] = a.shape[1]
        for e, _ in gradients:
            for label, g in e.items():
                total = g.reshape(-1, g.shape[-1]).sum(0)
                sums[label][3] = total if sums[label][3] is None else sums[label][3] + total
    for label in sorted(sums):  # the sums of all ranks' data
        entry = sums[label]
        entry[0] = int(problem.reduce(torch.tensor(float(entry[0]), dtype=torch.float64, device=problem.device)))
        for tensor in entry[1:4]:
            problem.reduce(tensor)
    means = {}
    for label, (count, gram, total, gradient_total, positions) in sums.items():
        module = problem.model.get_submodule(label)
        W = module.weight.detach().reshape(module.weight.shape[0], -1)
        mean_input = total / count
        mean_output = W @ mean_input + (module.bias.detach() if module.bias is not None else 0)
        means[label] = LayerMeans(gram / count, mean_input, mean_output, gradient_total / count, positions)
    return means


def _dampings(damping: float, layer, positions: int) -> tuple[float, float]:
    root = math.sqrt(damping)
    if layer.conv:
        return root * math.sqrt(positions), root / math.sqrt(positions)
    return root, root


@dataclass(frozen=True)
class KbfgsState:
    """K-BFGS's state: the layers, ``A``'s moving average, ``H_a``, ``H_g``, the previous curvature batch and its means."""

    layers: dict = field(default_factory=dict)
    A: dict = field(default_factory=dict)
    H_a: dict = field(default_factory=dict)
    H_g: dict = field(default_factory=dict)
    previous: tuple | None = None
    applied: int = 0


def _rebuild(problem: Problem, batch) -> Problem:
    """``problem``'s model, loss and studied parameters on another batch, at the current ``θ`` (the model's mode is kept)."""
    training = problem.model.training
    try:
        return Problem(problem.model, batch, problem.loss, params=problem.param_names, reduction=problem.reduction,
                       process_group=problem.process_group)
    finally:
        problem.model.train(training)


def kbfgs_preconditioner(damping: float = 1e-6, ema_decay: float = 0.1, mu1: float = 0.2,
                         compat: str | None = None) -> Preconditioner:
    """K-BFGS's ``g ↦ Δ`` (see :func:`kbfgs`)."""
    damping = require_number("damping", damping)
    beta = ema_decay_of(ema_decay)
    beta = 1.0 if beta == -1 else beta
    mu1 = require_number("mu1", mu1, maximum=1.0)
    require_compat(compat)

    def update_A(state, layers, means):
        A, H_a = dict(state.A), dict(state.H_a)
        for label, m in means.items():
            if layers[label].weight is None:
                continue
            lambda_A, _ = _dampings(damping, layers[label], m.positions)
            A[label] = m.A if label not in A else (1 - beta) * A[label] + beta * m.A
            if label not in H_a:
                H_a[label] = cholesky_inverse(A[label], lambda_A).matrix
            elif compat is None:
                s = H_a[label] @ m.mean_input
                H_a[label] = bfgs_inverse_update(H_a[label], s, A[label] @ s + lambda_A * s)
        return A, H_a

    def update_G(state, layers, now):
        H_g = dict(state.H_g)
        _, before = state.previous
        for label, m in now.items():
            _, lambda_B = _dampings(damping, layers[label], m.positions)
            H = H_g.get(label, torch.eye(m.mean_output.shape[0], dtype=m.mean_output.dtype,
                                         device=m.mean_output.device))
            s, y = powell_lm_damping(H, m.mean_output - before[label].mean_output,
                                     m.mean_output_gradient - before[label].mean_output_gradient, mu1, lambda_B)
            sy = float(torch.dot(s, y))
            if sy > 0 and math.isfinite(sy):
                H_g[label] = bfgs_inverse_update(H, s, y)
        return H_g

    def accumulate(state, statistics: Statistics):
        layers = state.layers or kronecker_layers(statistics)
        H_g = state.H_g
        if state.previous is not None and compat is None:
            batch, _ = state.previous
            H_g = update_G(state, layers, layer_means(_rebuild(statistics.problem, batch), layers))
        means = layer_means(statistics.problem, layers)
        A, H_a = update_A(state, layers, means)
        return replace(state, layers=layers, A=A, H_a=H_a, H_g=H_g,
                       previous=(list(statistics.problem.data), means))

    def linear(state):
        if compat == "asdl" and state.applied == 0:
            return dict
        inverses = {label: (FactorInverse(matrix=state.H_a[label]) if label in state.H_a else None,
                            FactorInverse(matrix=state.H_g[label]) if label in state.H_g else None)
                    for label in state.layers if label in state.H_a or label in state.H_g}
        return lambda v: kronecker_direction(v, state.layers, inverses)

    def apply(grads, state, params):
        return linear(state)(grads), replace(state, applied=state.applied + 1)

    return Preconditioner(init=lambda params: KbfgsState(), apply=apply, accumulate=accumulate, linear=linear)


def kbfgs(damping: float = 1e-6, ema_decay: float = 0.1, mu1: float = 0.2, compat: str | None = None,
          curvature_update_interval: int = 1, preconditioner_update_interval: int = 1, momentum: float = 0.9,
          weight_decay: float = 0.0):
    """K-BFGS: ``ΔW = H_g G H_a``, ``Δb = H_g g_b`` (module docstring), then torch SGD's rule as in the study.

    Args:
        damping: ``λ`` (the study's; ASDL's default 1e-7; the study uses 1 for the MLP).
        ema_decay: ``β`` of ``A``'s moving average (the study's 0.1; ``-1``: the latest batch's ``A``).
        mu1: Powell's damping constant ``μ₁ ∈ (0, 1)``.
        compat: ``None`` (the algorithm of the paper, preconditioning from the first step with
            ``H_g = I``) or ``"asdl"``: ASDL HEAD, whose in-place BFGS updates are lost
            (OPTIMIZERS.md §17.2), so the step is plain SGD on the first step and then
            ``ΔW = G (A_0 + λ_A I)⁻¹``, ``Δb = g_b``: FOOF with the first curvature batch's ``A`` frozen.
        curvature_update_interval, preconditioner_update_interval: curvature (and BFGS) updates
            happen on curvature steps; K-BFGS has no separate refresh.
        momentum, weight_decay: torch SGD's, applied to ``Δ``.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> opt = curvlab.optim.make("kbfgs", model, lr=0.1)
        >>> X, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> losses = [opt.step((X, y)) for _ in range(3)]
        >>> sorted(opt.preconditioner_state.H_g)
        ['0', '2']
    """
    return study_method(kbfgs_preconditioner(damping, ema_decay, mu1, compat), momentum, weight_decay,
                         curvature_update_interval, preconditioner_update_interval)
