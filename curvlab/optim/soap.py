"""SOAP: Adam in the eigenbasis of Shampoo's factors (Vyas et al. 2024; nikhilvyas/SOAP, OPTIMIZERS.md §14).

For a matrix gradient ``G`` ``(m, n)`` SOAP keeps EMA Shampoo factors ``L ≈ E[GGᵀ]``, ``R ≈ E[GᵀG]`` and
their eigenbases ``Q_L`` ``(m, m)``, ``Q_R`` ``(n, n)``, and runs Adam on the rotated gradient
``G' = Q_Lᵀ G Q_R``: its second moment ``v' ≈ E[G'²]`` is the diagonal of the gradient second moment in
the Kronecker eigenbasis (eigenvalue-corrected Shampoo). A tensor of order ``k`` has one factor and
basis per dimension of size ≤ ``max_precond_dim``; other dimensions (and 1-D tensors unless
``precondition_1d``) are not rotated.
"""

from typing import NamedTuple

import torch

from curvlab.errors import require_integer, require_number
from curvlab.optim.adaptive import betas_pair
from curvlab.optim.base import Preconditioner, tree_map
from curvlab.optim.optimizer import Method
from curvlab.optim.shampoo import mode_products


class SoapState(NamedTuple):
    """Adam steps taken, the moments ``m'``, ``v'`` (rotated basis), factors and eigenbases (``None``: not rotated)."""

    step: int
    initialised: bool
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor | None, ...]]
    bases: dict[str, tuple[torch.Tensor | None, ...]]


def rotate(tensor: torch.Tensor, bases, back: bool = False) -> torch.Tensor:
    """``T ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ`` (into the eigenbasis; ``back``: ``×_i Q_i``); ``None`` leaves a mode as it is.

    For a matrix: ``Q_Lᵀ T Q_R``, and ``Q_L T Q_Rᵀ`` back.
    """
    for basis in bases:
        if basis is None:
            tensor = tensor.movedim(0, -1)
        else:
            tensor = torch.tensordot(tensor, basis, dims=([0], [1 if back else 0]))
    return tensor


def _eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of ``factor + 1e-30 I`` by ``eigh``, in descending order of eigenvalue."""
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return torch.flip(torch.linalg.eigh(factor + 1e-30 * identity)[1], [1])


def _power_qr(factors, bases, exp_avg_sq: torch.Tensor):
    """One power step and QR per basis, the old basis first sorted by ``diag(Qᵀ F Q)`` descending and ``v'`` with it."""
    new_bases = []
    for mode, (factor, basis) in enumerate(zip(factors, bases)):
        if basis is None:
            new_bases.append(None)
            continue
        order = torch.argsort(torch.diagonal(basis.T @ factor @ basis), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(mode, order)
        new_bases.append(torch.linalg.qr(factor @ basis[:, order]).Q)
    return tuple(new_bases), exp_avg_sq


def scale_by_soap(betas=(0.95, 0.95), shampoo_beta: float = -1.0, eps: float = 1e-8, precondition_frequency: int = 10,
                  max_precond_dim: int = 10000, precondition_1d: bool = False, normalize_grads: bool = False,
                  correct_bias: bool = True) -> Preconditioner:
    """SOAP's direction as the reference computes it (OPTIMIZERS.md §14).

    Step 0 only initialises: ``F_i = (1 − β_s) G⁽ⁱ⁾G⁽ⁱ⁾ᵀ``, ``Q_i`` its eigenvectors (descending), ``Δ = 0``.
    Step ``t = 1, 2, …``: ``G' = rotate(G)``; ``m' ← β₁m' + (1−β₁)G'``; ``v' ← β₂v' + (1−β₂)G'²``;
    ``Δ = rotate_back(m'/(√v' + ε)) · √(1−β₂ᵗ)/(1−β₁ᵗ)`` (with ``normalize_grads`` the rotated-back
    direction is first divided by its RMS). Then ``F_i ← β_s F_i + (1−β_s) G⁽ⁱ⁾G⁽ⁱ⁾ᵀ``; when ``t`` is a
    multiple of ``precondition_frequency``, one power step and QR per basis (:func:`_power_qr`) and ``m'``
    is carried into the new basis. ``β_s = shampoo_beta``, or ``β₂`` when it is −1.
    """
    beta1, beta2 = betas_pair(betas)
    beta_s = beta2 if shampoo_beta == -1 else require_number("shampoo_beta", shampoo_beta, strict=False,
                                                             maximum=1.0, hint=" or -1")
    eps = require_number("eps", eps, strict=False)
    frequency = require_integer("precondition_frequency", precondition_frequency)
    max_dim = require_integer("max_precond_dim", max_precond_dim)

    def rotated(value: torch.Tensor) -> tuple[bool, ...]:
        if value.ndim == 1 and not precondition_1d:
            return (False,)
        return tuple(d <= max_dim for d in value.shape)

    def update_factors(factors, g):
        products = mode_products(g)
        return tuple(None if f is None else beta_s * f + (1 - beta_s) * m for f, m in zip(factors, products))

    def init(params):
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        factors = {name: tuple(torch.zeros(d, d, dtype=p.dtype, device=p.device) if keep else None
                               for d, keep in zip(p.shape, rotated(p)))
                   for name, p in params.items()}
        return SoapState(0, False, zeros, dict(zeros), factors, {name: () for name in params})

    def apply(grads, state, params):
        if not state.initialised:
            factors = {name: update_factors(state.factors[name], g) for name, g in grads.items()}
            bases = {name: tuple(None if f is None else _eigenbasis(f) for f in fs) for name, fs in factors.items()}
            zeros = {name: torch.zeros_like(g) for name, g in grads.items()}
            return zeros, state._replace(initialised=True, factors=factors, bases=bases)
        t = state.step + 1
        scale = (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t) if correct_bias else 1.0
        direction, exp_avg, exp_avg_sq, factors, bases = {}, {}, {}, {}, {}
        for name, g in grads.items():
            basis = state.bases[name]
            projected = rotate(g, basis)
            m = beta1 * state.exp_avg[name] + (1 - beta1) * projected
            v = beta2 * state.exp_avg_sq[name] + (1 - beta2) * projected * projected
            step = rotate(m / (v.sqrt() + eps), basis, back=True)
            if normalize_grads:
                step = step / (1e-30 + step.square().mean().sqrt())
            direction[name] = scale * step
            factors[name] = update_factors(state.factors[name], g)
            if t % frequency == 0:
                bases[name], v = _power_qr(factors[name], basis, v)
                m = rotate(rotate(m, basis, back=True), bases[name])
            else:
                bases[name] = basis
            exp_avg[name], exp_avg_sq[name] = m, v
        return direction, SoapState(t, True, exp_avg, exp_avg_sq, factors, bases)

    def linear(state):
        if state.step == 0:
            return lambda v: tree_map(torch.zeros_like, v)
        scale = (1 - beta2 ** state.step) ** 0.5 if correct_bias else 1.0

        def inverse(v):
            return {name: scale * rotate(rotate(g, state.bases[name]) / (state.exp_avg_sq[name].sqrt() + eps),
                                         state.bases[name], back=True)
                    for name, g in v.items()}

        return inverse

    return Preconditioner(init=init, apply=apply, linear=linear)


def decoupled_weight_decay_after_first_step(weight_decay: float) -> Preconditioner:
    """``u = Δ + λθ`` from the second step on; ``u = Δ`` on the first, which SOAP skips entirely."""
    weight_decay = require_number("weight_decay", weight_decay, strict=False)

    def apply(direction, steps, params):
        if steps == 0 or weight_decay == 0:
            return dict(direction), steps + 1
        return tree_map(lambda d, p: d + weight_decay * p, direction, params), steps + 1

    return Preconditioner(init=lambda params: 0, apply=apply)


def soap(betas=(0.95, 0.95), shampoo_beta: float = -1.0, eps: float = 1e-8, weight_decay: float = 0.01,
         precondition_frequency: int = 10, max_precond_dim: int = 10000, precondition_1d: bool = False,
         normalize_grads: bool = False, correct_bias: bool = True) -> Method:
    """SOAP (nikhilvyas/SOAP): :func:`scale_by_soap`, then decoupled weight decay ``θ ← θ − η(Δ + λθ)``.

    Defaults are the reference's: ``betas = (0.95, 0.95)``, ``shampoo_beta = -1`` (``β₂``), ``eps = 1e-8``,
    ``weight_decay = 0.01``, ``precondition_frequency = 10``, ``max_precond_dim = 10000``, no rotation of
    1-D parameters, no gradient normalisation, bias correction on (its default learning rate is 3e-3).
    The reference's first step changes nothing, weight decay included; later it decays the weights after
    the step, ``θ ← (θ − ηΔ)(1 − ηλ)``, which differs from the rule here by ``η²λΔ``.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("soap", model, lr=3e-3)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> float(opt.last_direction["weight"].abs().sum()), [tuple(q.shape) for q in opt.preconditioner_state.bases["weight"]]
        (0.0, [(2, 2), (3, 3)])
    """
    pre = scale_by_soap(betas, shampoo_beta, eps, precondition_frequency, max_precond_dim, bool(precondition_1d),
                        bool(normalize_grads), bool(correct_bias))
    return Method(pre, decoupled_weight_decay_after_first_step(weight_decay),
                  preconditioner_update_interval=precondition_frequency, momentum=betas_pair(betas)[0],
                  momentum_style="ema")


__all__ = ["decoupled_weight_decay_after_first_step", "rotate", "scale_by_soap", "soap"]
