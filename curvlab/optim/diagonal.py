"""AdaHessian, Sophia-G and Sophia-H: diagonal curvature estimates under Adam-like steps (OPTIMIZERS.md §11, §12).

Each method measures a diagonal ``d`` ``(P,)`` of the batch curvature by random probes and turns the
gradient EMA ``m ← β₁ m + (1 − β₁) g`` into its step:

- AdaHessian (Yao et al. 2021): ``D = |H z|`` with Rademacher ``z`` (Hutchinson; averaged over the
  kernel window of convolutions), ``v ← β₂ v + (1 − β₂) D²`` and the Adam step
  ``Δ = (m/(1 − β₁ᵗ)) / ((√v/√(1 − β₂ᵗ))ᵏ + ε)``; ``√v`` tracks ``√diag(H²)``, an ``|H|``-type quantity.
- Sophia-G (Liu et al. 2023): the Gauss-Newton-Bartlett estimate ``D = N · ĝ ⊙ ĝ`` of ``diag(G)``
  (``ĝ`` the batch-mean gradient at labels drawn from the model), ``h ← β₂ h + (1 − β₂) D`` and the
  clipped step ``Δ = clip(m / (ρ h + ε), −1, 1)``.
- Sophia-H: the same step with Hutchinson's signed ``z ⊙ H z`` and ``h`` clamped at 0.

Curvature is measured on curvature-update steps (``accumulate``) at the current ``θ`` on the current
batch, before the step; the random draws are seeded by the optimizer's seed and the step
(:meth:`~curvlab.optim.base.Statistics.seed_for`). All three take decoupled weight decay ``θ ← θ − η (Δ + λ θ)`` as their rule.
"""

import torch

from curvlab.approx.gnb import gnb_estimate
from curvlab.approx.hutchinson import diag_hutchinson
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.optim.adaptive import betas_pair, add_decayed_weights
from curvlab.optim.base import Params, Preconditioner, Statistics, tree_map
from curvlab.optim.optimizer import Method

SPATIAL_AVERAGES = ("conv", "rows", "none")


def _row_average(values: torch.Tensor) -> torch.Tensor:
    """The mean over all but the leading dimension for 2-D, over the last for 3-D, over (kh, kw) for 4-D."""
    if values.ndim <= 1:
        return values
    dims = {2: (1,), 3: (2,)}.get(values.ndim, (2, 3))
    return values.mean(dim=dims, keepdim=True).expand_as(values)


def hessian_magnitude(statistics: Statistics, spatial_average: str = "conv") -> Params:
    """AdaHessian's ``D = |H z|`` ``name -> tensor`` with one Rademacher ``z`` (``|H z| = |z ⊙ H z|``), spatially averaged.

    ``spatial_average``: ``"conv"`` (the image-classification version): 4-D convolution weights take the
    mean over the kernel window ``(kh, kw)``, every other parameter is left as it is; ``"rows"`` (the
    instruction version's default block sizes): 2-D weights take the mean of each row (over dim 1), 3-D
    the mean over the last dim, 4-D the mean over ``(kh, kw)``, 0/1-D none; ``"none"``: no averaging.
    The probe is Hutchinson's of :func:`curvlab.approx.hutchinson.diag_hutchinson` with seed
    :func:`step_seed` ``(statistics, 0)``.
    """
    problem = statistics.problem
    estimate = diag_hutchinson(problem, "hessian", samples=1, seed=statistics.seed_for(),
                               spatial_average=spatial_average == "conv", absolute=True)
    values = estimate @ {name: torch.ones_like(p) for name, p in problem.params.items()}
    if spatial_average == "rows":
        return tree_map(_row_average, values)
    return values


def hessian_diagonal(statistics: Statistics, samples: int = 1) -> Params:
    """Sophia-H's signed Hutchinson estimate ``(1/S) Σ_s z_s ⊙ H z_s`` of ``diag(H)``, seed :func:`step_seed` ``(statistics, 0)``."""
    problem = statistics.problem
    estimate = diag_hutchinson(problem, "hessian", samples=samples, seed=statistics.seed_for())
    return estimate @ {name: torch.ones_like(p) for name, p in problem.params.items()}


def gauss_newton_bartlett(statistics: Statistics, samples: int = 1) -> Params:
    """Sophia-G's ``D = N · ĝ ⊙ ĝ`` (mean loss over N terms), ``ĝ`` the gradient at labels drawn from the model.

    ``E[D] = diag(G)``; the labels are those of :func:`curvlab.approx.gnb.gnb_estimate` with seed
    :func:`step_seed` ``(statistics, 1)``; ``samples`` independent draws are averaged.
    """
    problem = statistics.problem
    return problem.unflatten(gnb_estimate(problem, samples=samples, seed=statistics.seed_for(1)))


def scale_by_adahessian(betas=(0.9, 0.999), eps: float = 1e-4, hessian_power: float = 1.0,
                        spatial_average: str = "conv") -> Preconditioner:
    """``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)D²``, ``Δ = (m/(1−β₁ᵗ)) / ((√v/√(1−β₂ᵗ))ᵏ + ε)``.

    ``D`` (:func:`hessian_magnitude`) is measured on curvature-update steps; between them the last
    ``D`` enters ``v`` again at every step. ``linear`` is ``g ↦ g / ((√v/√(1−β₂ᵗ))ᵏ + ε)``.
    """
    beta1, beta2 = betas_pair(betas)
    eps = require_number("eps", eps, strict=False)
    power = require_number("hessian_power", hessian_power, strict=False)
    if power > 1:
        raise InvalidProblem(f"hessian_power must be a number in [0, 1], got {hessian_power!r}")
    if spatial_average not in SPATIAL_AVERAGES:
        raise InvalidProblem(f"unknown spatial_average {spatial_average!r}; choose one of {', '.join(SPATIAL_AVERAGES)}")

    def init(params):
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return 0, zeros, dict(zeros), dict(zeros)

    def accumulate(state, statistics):
        t, m, v, _ = state
        return t, m, v, hessian_magnitude(statistics, spatial_average)

    def denominator(v, t):
        return (v.sqrt() / (1 - beta2 ** max(t, 1)) ** 0.5) ** power + eps

    def apply(grads, state, params):
        t, m, v, magnitude = state
        t += 1
        m = tree_map(lambda m_, g: beta1 * m_ + (1 - beta1) * g, m, grads)
        v = tree_map(lambda v_, d: beta2 * v_ + (1 - beta2) * d * d, v, magnitude)
        direction = tree_map(lambda m_, v_: (m_ / (1 - beta1 ** t)) / denominator(v_, t), m, v)
        return direction, (t, m, v, magnitude)

    def linear(state):
        t, _, v, _ = state
        return lambda g: tree_map(lambda g_, v_: g_ / denominator(v_, t), g, v)

    return Preconditioner(init=init, apply=apply, accumulate=accumulate, linear=linear)


def scale_by_sophia(estimate, betas=(0.965, 0.99), rho: float = 0.04, eps: float = 1e-15) -> Preconditioner:
    """``h ← β₂h + (1−β₂)ĥ`` on curvature-update steps; ``m ← β₁m + (1−β₁)g``, ``Δ = clip(m / (ρ max(h, 0) + ε), −1, 1)``.

    ``estimate(statistics) -> ĥ`` is the diagonal estimator; ``h`` starts at 0 with no bias correction
    (while ``h = 0`` the step is ``sign(m)``). ``linear`` is ``g ↦ g / (ρ max(h, 0) + ε)``: the step
    with the clip and the gradient EMA left out.
    """
    beta1, beta2 = betas_pair(betas)
    rho = require_number("rho", rho)
    eps = require_number("eps", eps, hint=" (it keeps ρh + ε above 0 where h = 0)")

    def init(params):
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return zeros, dict(zeros)

    def accumulate(state, statistics):
        m, h = state
        return m, tree_map(lambda h_, e: beta2 * h_ + (1 - beta2) * e, h, estimate(statistics))

    def denominator(h):
        return rho * h.clamp(min=0) + eps

    def apply(grads, state, params):
        m, h = state
        m = tree_map(lambda m_, g: beta1 * m_ + (1 - beta1) * g, m, grads)
        return tree_map(lambda m_, h_: (m_ / denominator(h_)).clamp(-1, 1), m, h), (m, h)

    def linear(state):
        _, h = state
        return lambda g: tree_map(lambda g_, h_: g_ / denominator(h_), g, h)

    return Preconditioner(init=init, apply=apply, accumulate=accumulate, linear=linear)


def adahessian(betas=(0.9, 0.999), eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0,
               spatial_average: str = "conv", curvature_update_interval: int = 1) -> Method:
    """AdaHessian (amirgholami/adahessian): :func:`scale_by_adahessian`, then decoupled weight decay.

    ``θ ← θ − η (Δ + λθ)`` with ``Δ = (m/(1−β₁ᵗ)) / ((√v/√(1−β₂ᵗ))ᵏ + ε)``, ``v`` the EMA of ``|Hz|²``.
    Defaults of the reference: ``betas=(0.9, 0.999)``, ``eps=1e-4``, ``weight_decay=0``,
    ``hessian_power=1`` (``lr=0.15`` there; curvlab's ``lr`` is separate). ``spatial_average="conv"``
    is the image-classification version (the one of the study's CV experiments), ``"rows"`` the
    instruction version (row means of 2-D weights; OPTIMIZERS.md §17.8), ``"none"`` no averaging
    (:func:`hessian_magnitude`). The reference measures ``|Hz|`` at every step
    (``curvature_update_interval=1``); with a longer interval the last ``|Hz|`` is reused.
    """
    beta1 = betas_pair(betas)[0]
    return Method(scale_by_adahessian(betas, eps, hessian_power, spatial_average), add_decayed_weights(weight_decay),
                  curvature_update_interval=require_integer("curvature_update_interval", curvature_update_interval),
                  momentum=beta1, momentum_style="ema")


def sophia_g(betas=(0.965, 0.99), rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1,
             curvature_update_interval: int = 10, samples: int = 1) -> Method:
    """Sophia-G (Liuhong99/Sophia): the clipped step on the EMA of the GNB estimate, then decoupled weight decay.

    ``θ ← θ − η (clip(m / (ρ h + ε), −1, 1) + λθ)``, ``h`` the EMA of ``N · ĝ ⊙ ĝ``
    (:func:`gauss_newton_bartlett`; the reference keeps ``ĝ ⊙ ĝ`` in ``h`` and multiplies ``ρ`` by the
    number of tokens per step ``bs``: the same step). Defaults of the reference class:
    ``betas=(0.965, 0.99)``, ``rho=0.04``, ``weight_decay=0.1``, ``ε = 1e-15`` (hard-coded there),
    ``h`` refreshed every 10 steps (``lr=1e-4`` there; curvlab's ``lr`` is separate). The reference
    refreshes ``h`` after the step of iterations ``t ≡ 9 (mod 10)``, so its first 10 steps are
    ``sign(m)``; curvlab refreshes before the step of ``t ≡ 0``, at the ``θ`` the step starts from.
    ``samples`` label draws per example are averaged (the reference: 1).
    """
    samples = require_integer("samples", samples)
    return Method(scale_by_sophia(lambda statistics: gauss_newton_bartlett(statistics, samples), betas, rho, eps),
                  add_decayed_weights(weight_decay),
                  curvature_update_interval=require_integer("curvature_update_interval", curvature_update_interval),
                  momentum=betas_pair(betas)[0], momentum_style="ema")


def sophia_h(betas=(0.965, 0.99), rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1,
             curvature_update_interval: int = 10, samples: int = 1) -> Method:
    """Sophia-H (the paper; PyTorch port in LOG-postech/Sassha): Sophia's clipped step on the EMA of Hutchinson's ``diag(H)``.

    ``θ ← θ − η (clip(m / (ρ max(h, 0) + ε), −1, 1) + λθ)``, ``h`` the EMA of the signed
    ``z ⊙ H z`` with Rademacher ``z`` (:func:`hessian_diagonal`, ``samples`` probes averaged).
    Defaults of the port: ``betas=(0.965, 0.99)``, ``eps=1e-15``, ``weight_decay=0.1``,
    ``rho=0.04`` (its ``clip_threshold``), ``h`` refreshed every 10 steps (``lazy_hessian``),
    ``samples=1`` (``lr=0.15`` there; curvlab's ``lr`` is separate).
    """
    samples = require_integer("samples", samples)
    return Method(scale_by_sophia(lambda statistics: hessian_diagonal(statistics, samples), betas, rho, eps),
                  add_decayed_weights(weight_decay),
                  curvature_update_interval=require_integer("curvature_update_interval", curvature_update_interval),
                  momentum=betas_pair(betas)[0], momentum_style="ema")
