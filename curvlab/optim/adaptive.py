"""SGD, Adam, AdamW and Adagrad, step for step as ``torch.optim`` takes them (OPTIMIZERS.md §13).

Adam and Adagrad precondition with the diagonal of the online empirical Fisher of mini-batch-mean
gradients, ``v ≈ E[ḡ ⊙ ḡ]``, under a square root: ``P = diag(√v̂ + ε)``, a "``|F|^{1/2}``"
preconditioner rather than ``F``. The transformations below are the building blocks; ``sgd``,
``adam``, ``adamw`` and ``adagrad`` assemble them into :class:`~curvlab.optim.optimizer.Method` s.
"""

from functools import partial

import torch

from curvlab.errors import InvalidProblem, require_number
from curvlab.optim.base import Preconditioner, chain, identity, tree_map
from curvlab.optim.optimizer import Method


def betas_pair(betas, sums: bool = False) -> tuple[float, float]:
    """``(β₁, β₂)`` checked: numbers in ``[0, 1)``; with ``sums``, ``β₂ = 1`` (a plain sum, as AdaGrad) is allowed too."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise InvalidProblem(f"betas must be a pair (β₁, β₂), got {betas!r}") from None
    if sums and beta2 == 1:
        return require_number("betas[0]", beta1, strict=False, maximum=1.0), 1.0
    return (require_number("betas[0]", beta1, strict=False, maximum=1.0),
            require_number("betas[1]", beta2, strict=False, maximum=1.0,
                           hint=" (or 1, which sums the factors as AdaGrad)" if sums else ""))


def add_decayed_weights(weight_decay: float) -> Preconditioner:
    """``g ↦ g + λ θ``: L2 weight decay before a preconditioner, decoupled weight decay after it."""
    weight_decay = require_number("weight_decay", weight_decay, strict=False)

    def apply(grads, state, params):
        if weight_decay == 0:
            return dict(grads), state
        return tree_map(lambda g, p: g + weight_decay * p, grads, params), state

    return Preconditioner(init=lambda params: (), apply=apply, linear=lambda state: dict)


def heavy_ball(momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
               nesterov: bool = False) -> Preconditioner:
    """torch SGD's rule on a direction ``Δ``: ``d = Δ + λθ``; ``b ← d`` at first, then ``b ← μ b + (1 − τ) d``; ``u = b`` (Nesterov: ``d + μ b``)."""
    momentum = require_number("momentum", momentum, strict=False, maximum=1.0)
    dampening = require_number("dampening", dampening, strict=False, maximum=1.0)
    if nesterov and (momentum == 0 or dampening != 0):
        raise InvalidProblem("nesterov momentum needs momentum > 0 and dampening = 0")
    decay = add_decayed_weights(weight_decay)

    def apply(direction, buffers, params, owned=False):
        d, _ = decay.apply(direction, (), params)
        if momentum == 0:
            return d, buffers
        if buffers is None:
            buffers = {name: value.clone() for name, value in d.items()}
        else:
            decayed = {name: b.mul_(momentum) if owned else b.mul(momentum) for name, b in buffers.items()}
            buffers = tree_map(lambda b, g: b.add_(g, alpha=1 - dampening), decayed, d)
        if nesterov:
            return tree_map(lambda g, b: g + momentum * b, d, buffers), buffers
        return dict(buffers), buffers

    return Preconditioner(init=lambda params: None, apply=apply, apply_owned=partial(apply, owned=True))


def study_method(preconditioner: Preconditioner, momentum: float = 0.9, weight_decay: float = 0.0,
                 curvature_update_interval: int = 1, preconditioner_update_interval: int = 1) -> Method:
    """``preconditioner`` under the study's outer rule: torch SGD with heavy-ball momentum and L2 weight decay on ``Δ``."""
    return Method(preconditioner, heavy_ball(momentum, weight_decay=weight_decay),
                  curvature_update_interval=curvature_update_interval,
                  preconditioner_update_interval=preconditioner_update_interval, momentum=momentum)


def scale_by_adam(betas=(0.9, 0.999), eps: float = 1e-8) -> Preconditioner:
    """``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``Δ = (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)``."""
    beta1, beta2 = betas_pair(betas)
    eps = require_number("eps", eps, strict=False)

    def init(params):
        return 0, *({name: torch.zeros_like(p) for name, p in params.items()} for _ in range(2))

    def denominator(v, t):
        return (v / (1 - beta2 ** max(t, 1))).sqrt() + eps

    def apply(grads, state, params, owned=False):
        t, m, v = state
        t += 1
        if owned:
            m = tree_map(lambda m_, g: m_.mul_(beta1).add_(g, alpha=1 - beta1), m, grads)
            v = tree_map(lambda v_, g: v_.mul_(beta2).addcmul_(g, g, value=1 - beta2), v, grads)
        else:
            m = tree_map(lambda m_, g: beta1 * m_ + (1 - beta1) * g, m, grads)
            v = tree_map(lambda v_, g: beta2 * v_ + (1 - beta2) * g * g, v, grads)
        direction = tree_map(lambda m_, v_: (m_ / (1 - beta1 ** t)) / denominator(v_, t), m, v)
        return direction, (t, m, v)

    def linear(state):
        t, _, v = state
        return lambda g: tree_map(lambda g_, v_: g_ / denominator(v_, t), g, v)

    return Preconditioner(init=init, apply=apply, linear=linear, apply_owned=partial(apply, owned=True))


def scale_by_adagrad(eps: float = 1e-10, initial_accumulator_value: float = 0.0) -> Preconditioner:
    """``v ← v + g²``, ``Δ = g / (√v + ε)``."""
    eps = require_number("eps", eps, strict=False)
    initial = require_number("initial_accumulator_value", initial_accumulator_value, strict=False)

    def apply(grads, v, params, owned=False):
        v = tree_map(lambda v_, g: v_.addcmul_(g, g) if owned else v_ + g * g, v, grads)
        return tree_map(lambda g, v_: g / (v_.sqrt() + eps), grads, v), v

    return Preconditioner(
        init=lambda params: {name: torch.full_like(p, initial) for name, p in params.items()},
        apply=apply, linear=lambda v: lambda g: tree_map(lambda g_, v_: g_ / (v_.sqrt() + eps), g, v),
        apply_owned=partial(apply, owned=True),
    )


def scale_by_schedule(decay: float) -> Preconditioner:
    """``u = Δ / (1 + (t − 1) · decay)`` at step ``t = 1, 2, …`` (Adagrad's ``lr_decay``)."""
    decay = require_number("lr_decay", decay, strict=False)

    def apply(direction, t, params):
        return tree_map(lambda d: d / (1 + t * decay), direction), t + 1

    return Preconditioner(init=lambda params: 0, apply=apply)


def sgd(momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> Method:
    """``torch.optim.SGD``: ``P = I``; momentum and weight decay as torch applies them."""
    return Method(identity(), heavy_ball(momentum, dampening, weight_decay, nesterov), momentum=momentum)


def adam(betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> Method:
    """``torch.optim.Adam``: L2 weight decay is added to the gradient before :func:`scale_by_adam`."""
    return Method(chain(add_decayed_weights(weight_decay), scale_by_adam(betas, eps)),
                  momentum=betas_pair(betas)[0], momentum_style="ema")


def adamw(betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> Method:
    """``torch.optim.AdamW``: :func:`scale_by_adam`, then decoupled weight decay ``θ ← θ − η(Δ + λθ)``."""
    return Method(scale_by_adam(betas, eps), add_decayed_weights(weight_decay),
                  momentum=betas_pair(betas)[0], momentum_style="ema")


def adagrad(lr_decay: float = 0.0, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
            eps: float = 1e-10) -> Method:
    """``torch.optim.Adagrad``: L2 weight decay, :func:`scale_by_adagrad`, the ``lr_decay`` schedule."""
    return Method(chain(add_decayed_weights(weight_decay), scale_by_adagrad(eps, initial_accumulator_value)),
                  scale_by_schedule(lr_decay))
