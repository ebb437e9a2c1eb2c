"""Preconditioners as small pure transformations, in the manner of optax's ``chain``.

A :class:`Preconditioner` turns the gradient ``g`` (a dict name -> tensor) into the direction
``Δ = P⁻¹ g`` through four pure functions of an explicit state:

- ``init(params) -> state``;
- ``accumulate(state, statistics) -> state``: fold the curvature statistics of the current batch at
  the current ``θ`` (:class:`Statistics`) into the state, on curvature-update steps;
- ``refresh(state) -> state``: recompute what the statistics imply (inverses, roots, eigenbases),
  on preconditioner-update steps;
- ``apply(grads, state, params) -> (direction, state)``: every step;
- ``release(state) -> state`` (optional): the state without what a step that accumulates (and
  refreshes, where there is a ``refresh``) rebuilds: inverses, eigenbases, cached products. An owner
  holding the only reference to the state (:class:`~curvlab.optim.PreconditionedOptimizer`) calls it
  before such a step's ``accumulate``, so that the old results are freed before the new ones are built;
- ``apply_owned(grads, state, params) -> (direction, state)`` (optional): ``apply`` for such an owner,
  which may update the state's tensors in place (momentum buffers and moments, as ``torch.optim``
  does) instead of building new ones;
- ``accumulate_owned(state, statistics) -> state`` (optional): ``accumulate`` for such an owner, updating
  the state's tensors in place (PSGD's factors), so that the old and the new state are never held at once;
  each tensor it updates stays a valid part of the state, so a step that fails part-way leaves a usable one;
- ``step_from_statistics(state, statistics) -> (direction, state)`` (optional): ``accumulate`` (owned,
  where there is ``accumulate_owned``), ``refresh`` and ``apply`` at once, for a method whose statistics'
  pass determines the batch's own gradient (the mean of the per-example gradients of SMW-NG's and SENG's
  Gram matrices; the value of the reverse-over-reverse Hessian-vector product PSGD-Newton fits on): the
  step of an owner that has not computed the gradient (``statistics.gradient`` is ``None``: one pass of
  the model instead of one for the gradient and one for the statistics, as ASDL takes both from its
  training pass).

``linear(state)`` gives, where the method has one, the linear map ``v ↦ P⁻¹ v`` that ``apply``
would use at this state with its moving averages of the gradient, clipping and other nonlinear
parts left out: the preconditioner whose sharpness ``λ_max(P⁻¹ H)`` and agreement with the exact
curvature :func:`curvlab.compare_steps` measures. Transformations never modify their inputs, except
``apply_owned``, ``accumulate_owned`` and ``step_from_statistics``, which may update the state they are given.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from curvlab.errors import InvalidProblem
from curvlab.operators.base import CurvatureOperator
from curvlab.problem import Problem

Params = dict[str, torch.Tensor]
State = object
LinearMap = Callable[[Params], Params]


@dataclass(frozen=True)
class Statistics:
    """What a preconditioner may measure at the current ``θ`` on the current batch.

    Attributes:
        source: the batch as a :class:`curvlab.Problem` whose studied parameters are the optimizer's, or a
            function that builds it; :attr:`problem` builds it on first use, so that methods reading only
            the gradient never pay for it.
        gradient: ``∇L`` of the batch, name -> tensor (the gradient the step preconditions), or ``None`` for
            ``Preconditioner.step_from_statistics``, which derives it from the statistics.
        loss: ``L`` of the batch.
        step: the number of steps taken before this one (0 on the first).
        seed: the optimizer's seed; with ``step`` it fixes every random draw (:meth:`generator`).
        spread_inversions: with a data-parallel problem, whether a preconditioner that inverts
            per-layer factors may invert each layer on one rank and share the results with all.
        curvatures: exact curvature operators of :attr:`problem` at this ``θ`` already at hand, kind ->
            operator (the dense matrices :func:`curvlab.compare` built); methods that need one take it
            instead of building it again.
    """

    source: Problem | Callable[[], Problem]
    gradient: Params | None
    loss: float
    step: int
    seed: int
    spread_inversions: bool = False
    curvatures: Mapping[str, CurvatureOperator] = field(default_factory=dict)

    @cached_property
    def problem(self) -> Problem:
        """The batch as a :class:`curvlab.Problem` (curvature products, KFAC factors, per-example gradients come from it)."""
        return self.source if isinstance(self.source, Problem) else self.source()

    def seed_for(self, stream: int = 0) -> int:
        """The seed of this step's random draws of kind ``stream`` (labels, probes, sketches): ``(seed · 1000003 + step) · 97 + stream``."""
        return (self.seed * 1_000_003 + self.step) * 97 + stream

    def generator(self, stream: int = 0) -> torch.Generator:
        """A generator on the parameters' device seeded by :meth:`seed_for`; the global RNG is untouched."""
        if isinstance(self.source, Problem) or not self.gradient:
            device = self.problem.device
        else:
            device = next(iter(self.gradient.values())).device
        return torch.Generator(device=device).manual_seed(self.seed_for(stream))

    @cached_property
    def params(self) -> Params:
        """``θ`` of the studied parameters, detached."""
        return self.problem.params


#: ``compat`` values of the methods whose reference implementation departs from the paper (OPTIMIZERS.md §17).
COMPATS = (None, "asdl")


def require_compat(compat):
    """``compat`` if it is ``None`` (the method as its paper defines it) or ``"asdl"``, else :class:`InvalidProblem`."""
    if compat not in COMPATS:
        raise InvalidProblem(f"unknown compat {compat!r}; choose None (the method as its paper defines it) or "
                             f"'asdl' (the reference implementation's behaviour, OPTIMIZERS.md §17)")
    return compat


@dataclass(frozen=True)
class Preconditioner:
    """``g ↦ P⁻¹ g`` with an explicit state (see the module docstring for each function's role)."""

    init: Callable[[Params], State]
    apply: Callable[[Params, State, Params], tuple[Params, State]]
    accumulate: Callable[[State, Statistics], State] | None = None
    refresh: Callable[[State], State] | None = None
    linear: Callable[[State], LinearMap] | None = None
    release: Callable[[State], State] | None = None
    apply_owned: Callable[[Params, State, Params], tuple[Params, State]] | None = None
    accumulate_owned: Callable[[State, Statistics], State] | None = None
    step_from_statistics: Callable[[State, Statistics], tuple[Params, State]] | None = None

    @property
    def needs_statistics(self) -> bool:
        """Whether the preconditioner reads curvature statistics (else it only sees gradients)."""
        return self.accumulate is not None


def identity() -> Preconditioner:
    """``P = I``: the direction is the gradient (SGD's)."""
    return Preconditioner(init=lambda params: (), apply=lambda grads, state, params: (dict(grads), state),
                          linear=lambda state: dict)


def chain(*parts: Preconditioner) -> Preconditioner:
    """The composition ``Δ = P_k⁻¹ ⋯ P_1⁻¹ g``: each part's output is the next one's input.

    Examples:
        >>> import torch
        >>> from curvlab.optim.base import chain, identity
        >>> from curvlab.optim.adaptive import add_decayed_weights
        >>> p = chain(add_decayed_weights(0.5), identity())
        >>> theta = {"w": torch.tensor([2.0])}
        >>> p.apply({"w": torch.tensor([1.0])}, p.init(theta), theta)[0]
        {'w': tensor([2.])}
    """

    def init(params):
        return tuple(part.init(params) for part in parts)

    def apply(grads, state, params, owned=False):
        states = []
        for part, part_state in zip(parts, state):
            step = part.apply_owned if owned and part.apply_owned else part.apply
            grads, part_state = step(grads, part_state, params)
            states.append(part_state)
        return grads, tuple(states)

    def accumulate(state, statistics, owned=False):
        return tuple((part.accumulate_owned if owned and part.accumulate_owned else part.accumulate)(s, statistics)
                     if part.accumulate else s for part, s in zip(parts, state))

    def refresh(state):
        return tuple(part.refresh(s) if part.refresh else s for part, s in zip(parts, state))

    def release(state):
        return tuple(part.release(s) if part.release else s for part, s in zip(parts, state))

    def linear(state):
        maps = [part.linear(s) for part, s in zip(parts, state)]

        def composed(v):
            for one in maps:
                v = one(v)
            return v

        return composed

    return Preconditioner(
        init=init, apply=apply,
        accumulate=accumulate if any(part.accumulate for part in parts) else None,
        refresh=refresh if any(part.refresh for part in parts) else None,
        release=release if any(part.release for part in parts) else None,
        apply_owned=partial(apply, owned=True) if any(part.apply_owned for part in parts) else None,
        accumulate_owned=partial(accumulate, owned=True) if any(part.accumulate_owned for part in parts) else None,
        linear=linear if all(part.linear for part in parts) else None,
    )


def tree_map(function, *trees: Mapping[str, torch.Tensor]) -> Params:
    """``{name: function(tree_1[name], …, tree_k[name])}`` over the names of the first tree."""
    return {name: function(*(tree[name] for tree in trees)) for name in trees[0]}


def tree_dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``⟨a, b⟩ = Σ_name Σ a[name] b[name]`` (0-d tensor)."""
    return sum((torch.sum(a[name] * b[name]) for name in a), start=torch.zeros(()))
