"""PSGD-Kron (Li 2018): a Kronecker preconditioner fitted online by Lie-group steps on pairs ``(v, h)`` (OPTIMIZERS.md §6).

As ASDL's ``KronPsgdGradientMaker`` (§6a, the study's version), each ``nn.Linear`` and ``nn.Conv2d``
layer's gradient, with the bias as an extra column (``Ĝ = [G | g_b]`` ``(out, in + 1)``; a kernel
viewed as ``(out, c_in·kh·kw)``), is preconditioned by ``P = Q_lᵀQ_l ⊗ Q_rᵀQ_r``:

    ``Δ̂ = Q_lᵀ Q_l · Ĝ · Q_rᵀ Q_r``,

with upper-triangular ``Q_l`` ``(out, out)`` and ``Q_r`` ``(in + 1, in + 1)`` started at
``init_scale · I``. Every other parameter (normalisation layers, embeddings) keeps its raw
gradient, as ASDL's ignored and unsupported modules do.

On each preconditioner-update step the factors take one Lie-group step
(:func:`curvlab.approx.psgd.lie_group_step`: balance, ``A = Q_l H Q_rᵀ``, ``B = Q_l⁻ᵀ V Q_r⁻¹``,
``Q ← Q − μ/max|∇| · triu(AAᵀ − BBᵀ) Q``) on a pair drawn from the batch:

- ``form="newton"`` (ASDL, lixilinx ``KronNewton``): ``v ~ N(0, I)`` on the preconditioned parameters
  and ``h = H v`` with the exact Hessian of the batch loss; the fit's fixed point is
  ``P = (E[h hᵀ])^{-1/2} = |H|⁻¹`` within the Kronecker family (the saddle-free Newton preconditioner);
- ``form="whitening"`` (lixilinx ``KronWhiten`` with the triangular "EQ" geometry): ``h = ḡ`` the batch
  gradient and an independent ``v ~ N(0, I)``; the fixed point is ``P = (E[ḡ ḡᵀ])^{-1/2}`` over the
  steps, a Kronecker-factored square root of the online empirical Fisher.

The first gradient after a fit is preconditioned as ``Q_lᵀ(Q_l Ĝ Q_rᵀ)Q_r`` by triangular products
(:mod:`curvlab.approx.triangular`), without forming ``Q_iᵀQ_i``: with a fit every step, as the study
ran, that saves two products a group and their memory. The steps that reuse the factors (a fit every
``k > 1`` steps) form ``Q_iᵀQ_i`` once and apply them by two dense products, the cheaper way then.

There is no damping (ASDL's has none; lixilinx's ``1e-9`` noise is left out). ``compat="asdl"``
reproduces ASDL HEAD's ``B = Q_l⁻¹ V Q_r⁻ᵀ`` (§17.3), with which ``‖B‖² ≠ vᵀP⁻¹v``; it equals the
correct step while ``Q = I``, so only fits after the first differ.
"""

import dataclasses
from dataclasses import dataclass
from functools import cached_property, partial

import torch
from torch import nn

from curvlab.approx.base import Layout, mode_product
from curvlab.approx.psgd import along_modes, kron_groups, lie_group_step
from curvlab.approx.triangular import triangular_matmul
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.operators.hessian import gradient_and_hessian_product
from curvlab.optim.adaptive import study_method
from curvlab.optim.base import Preconditioner, require_compat
from curvlab.optim.optimizer import Method
from curvlab.problem import Problem

FORMS = ("newton", "whitening")
PRECONDITIONED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class KronFactors:
    """PSGD-Kron's state: the preconditioned groups and their fitted upper-triangular factors.

    Attributes:
        groups: ``(module name, parameter names, layout)`` per preconditioned layer, the layout
            giving the ``(out, in + 1)`` matrix ``[W | b]`` (``(out, in)`` without a studied bias).
        factors: per group, ``[Q_l, Q_r]``; the group's preconditioner is ``Q_lᵀQ_l ⊗ Q_rᵀQ_r``.
        fits: the Lie-group steps taken.
        applied: whether these factors have preconditioned a gradient since their fit.
    """

    groups: list[tuple[str, list[str], Layout]]
    factors: list[list[torch.Tensor]]
    fits: int = 0
    applied: bool = False

    @cached_property
    def products(self) -> list[list[torch.Tensor]]:
        """Per group, ``[Q_lᵀQ_l, Q_rᵀQ_r]``: formed once for the steps between fits (module docstring)."""
        return [[q.T @ q for q in qs] for qs in self.factors]


def preconditioned_groups(problem: Problem) -> list[tuple[str, list[str], Layout]]:
    """The :func:`~curvlab.approx.psgd.kron_groups` of the studied Linear and Conv2d layers' parameters."""
    modules = dict(problem.model.named_modules())
    owner = {name: module for module, names in problem.module_blocks() for name in names}
    return [(label, names, layout) for label, names, layout in kron_groups(problem)
            if isinstance(modules[owner[names[0]]], PRECONDITIONED_LAYERS)]


def _matrix(parts: dict[str, torch.Tensor], names: list[str], layout: Layout) -> torch.Tensor:
    """The group's entries of the per-parameter tensors ``parts``, as the ``(d_1, d_2)`` matrix of ``layout``."""
    return layout.to_tensor(torch.cat([parts[name].reshape(1, -1) for name in names], dim=1))[0]


def _gram_times(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``QᵀQ X`` as ``Qᵀ(Q X)`` for upper-triangular ``Q`` ``(d, d)``: two triangular products, no ``QᵀQ`` formed or kept."""
    return triangular_matmul(q.T, triangular_matmul(q, x), upper=False)


def kron_preconditioner(form: str = "newton", precond_lr: float = 0.01, init_scale: float = 1.0,
                        compat: str | None = None) -> Preconditioner:
    """PSGD-Kron's ``g ↦ P g`` (module docstring); ``accumulate`` takes one Lie-group step per call.

    The optimizer's ``accumulate_owned`` updates the factors in place (the old and the new factors are
    never held together); with ``form="newton"``, ``step_from_statistics`` (``one_pass=True``) takes the
    gradient it preconditions from the Hessian product's own pass
    (:func:`~curvlab.operators.hessian.gradient_and_hessian_product`).

    On the first call the groups of the batch's problem get factors ``init_scale · I``. Each call
    draws ``v`` as one standard normal ``(P,)`` vector from ``statistics.generator(0)`` in the
    parameters' dtype, zeroed outside the preconditioned groups, and fits every group on its
    entries of ``(v, H v)`` (Newton) or ``(v, ḡ)`` (whitening).
    """

    def probe(state, statistics):
        """The state (started at ``init_scale · I``) and ``v``, name -> tensor, zero outside the groups."""
        problem = statistics.problem
        if state is None:
            groups = preconditioned_groups(problem)
            like = dict(dtype=problem.dtype, device=problem.device)
            state = KronFactors(groups, [[init_scale * torch.eye(d, **like) for d in layout.shape]
                                         for _, _, layout in groups])
        v = torch.randn(problem.num_params, generator=statistics.generator(0), dtype=problem.dtype,
                        device=problem.device)
        grouped = {name for _, names, _ in state.groups for name in names}
        outside = [name for name in problem.param_names if name not in grouped]
        if outside:
            v[problem.entries(outside)] = 0
        return state, problem.unflatten(v)

    def fit(state, v, h, owned):
        factors = [lie_group_step(qs, _matrix(v, names, layout), _matrix(h, names, layout), precond_lr,
                                  asdl_b=compat == "asdl", in_place=owned)
                   for (_, names, layout), qs in zip(state.groups, state.factors)]
        return KronFactors(state.groups, factors, state.fits + 1)

    def accumulate(state, statistics, owned=False):
        state, v = probe(state, statistics)
        if form == "newton":
            h = gradient_and_hessian_product(statistics.problem, v)[1]
        else:
            h = statistics.gradient
        return fit(state, v, h, owned)

    def step_from_statistics(state, statistics):  # Newton: the gradient is the value of the Hessian product's pass
        state, v = probe(state, statistics)
        gradient, h = gradient_and_hessian_product(statistics.problem, v)
        state = fit(state, v, h, owned=True)
        del v, h  # before the application's temporaries
        return apply(gradient, state, statistics.params)

    def precondition(state):
        if state is None:
            raise InvalidProblem("PSGD-Kron fits its preconditioner on a batch before its first step; "
                                 "accumulate statistics first")

        def apply_to(grads):
            direction = dict(grads)
            for index, (_, names, layout) in enumerate(state.groups):
                matrix = _matrix(grads, names, layout)
                if state.applied:
                    rows = layout.to_rows(mode_product(matrix[None], state.products[index]))
                else:
                    rows = layout.to_rows(along_modes(matrix, state.factors[index], _gram_times)[None])
                sizes = [grads[name].numel() for name in names]
                for name, piece in zip(names, rows[0].split(sizes)):
                    direction[name] = piece.reshape(grads[name].shape)
            return direction

        return apply_to

    def apply(grads, state, params):
        direction = precondition(state)(grads)
        return direction, state if state.applied else dataclasses.replace(state, applied=True)

    def release(state):  # the products Q_iᵀQ_i of the old factors, before the fit updates them
        return state if state is None else KronFactors(state.groups, state.factors, state.fits)

    return Preconditioner(init=lambda params: None, apply=apply, accumulate=accumulate, linear=precondition,
                          accumulate_owned=partial(accumulate, owned=True), release=release,
                          step_from_statistics=step_from_statistics if form == "newton" else None)


def psgd_kron(form: str = "newton", precond_lr: float = 0.01, init_scale: float = 1.0,
              preconditioner_update_interval: int = 1, momentum: float = 0.9, weight_decay: float = 0.0,
              compat: str | None = None) -> Method:
    """PSGD-Kron: ``Δ̂ = Q_lᵀQ_l Ĝ Q_rᵀQ_r`` per Linear/Conv2d layer, ``Q`` fitted by Lie-group steps (module docstring).

    Defaults are ASDL's (``precond_lr=0.01``, ``init_scale=1``) with the study's SGD rule
    (momentum 0.9) on top; the study refit every 1, 10 or 100 steps.

    Args:
        form: ``"newton"`` (pairs ``(v, Hv)``, ``P → |H|⁻¹``) or ``"whitening"`` (pairs ``(v, ḡ)``,
            ``P → E[ḡḡᵀ]^{-1/2}``).
        precond_lr: the normalised Lie-group step size ``μ``, ``0 < μ < 1``.
        init_scale: the factors start at ``init_scale · I``.
        preconditioner_update_interval: one fit every this many steps (the stale ``P`` in between).
        momentum, weight_decay: torch SGD's heavy-ball momentum and L2 weight decay on ``Δ``.
        compat: ``None`` (lixilinx's correct fit) or ``"asdl"`` (ASDL HEAD's transposed ``B``, §17.3).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("psgd_kron", model, lr=0.1)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> [tuple(q.shape) for q in opt.preconditioner_state.factors[0]]
        [(2, 2), (4, 4)]
    """
    if form not in FORMS:
        raise InvalidProblem(f"unknown PSGD form {form!r}; choose one of {', '.join(FORMS)}")
    require_compat(compat)
    precond_lr = require_number("precond_lr", precond_lr, maximum=1.0)
    init_scale = require_number("init_scale", init_scale)
    interval = require_integer("preconditioner_update_interval", preconditioner_update_interval)
    return study_method(kron_preconditioner(form, precond_lr, init_scale, compat), momentum, weight_decay, interval,
                        interval)


__all__ = ["FORMS", "KronFactors", "kron_preconditioner", "preconditioned_groups",
           "psgd_kron"]
