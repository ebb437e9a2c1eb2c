"""A :class:`Method` (preconditioner, update rule, schedule) as a ``torch.optim.Optimizer`` that trains a model.

One step at ``θ_t`` on a batch: the batch loss ``L_t`` and gradient ``g_t`` by autograd in the model's
current mode; on curvature-update steps (``t % curvature_update_interval == 0``) the preconditioner
folds in the batch's :class:`~curvlab.optim.base.Statistics`, measured in eval mode as curvlab measures
every curvature (dropout off, batch-norm statistics fixed; the mode is restored after); on preconditioner-update steps
(``t % preconditioner_update_interval == 0``) it refreshes its inverse; between updates the stale
preconditioner is applied to the current gradient, as in ASDL. Then

    ``Δ_t = P⁻¹ g_t`` (``last_direction``),  ``u_t = rule(Δ_t)``,  ``θ_{t+1} = θ_t − η u_t``,

where the rule adds momentum and weight decay (torch SGD's heavy ball for the curvature methods of
the study, decoupled weight decay for AdamW-like ones).
"""

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.operators.base import CurvatureOperator
from curvlab.optim.base import Params, Preconditioner, Statistics, identity
from curvlab.parallel import check_group, sum_over_ranks
from curvlab.problem import (Problem, batch_size, example_slice, is_batch, likelihood_of, prepare_input,
                             select_parameters)

MOMENTUM_STYLES = ("heavy_ball", "ema")
#: The parts of a step that ``PreconditionedOptimizer.phase_seconds`` times.
PHASES = ("gradient", "statistics", "inversion", "application")


@dataclass(frozen=True)
class Method:
    """An optimizer: its preconditioner ``P``, the update rule applied to ``Δ = P⁻¹ g``, and its schedule.

    Attributes:
        preconditioner: ``g ↦ Δ``.
        rule: ``Δ ↦ u`` (momentum, weight decay); the step is ``θ ← θ − η u``.
        curvature_update_interval: curvature statistics are gathered on steps ``t ≡ 0`` modulo this.
        preconditioner_update_interval: the preconditioner is refreshed on steps ``t ≡ 0`` modulo this.
        momentum, momentum_style: the momentum that sets the edge of stability (see
            :meth:`stability_threshold`): ``"heavy_ball"`` (torch SGD's ``b ← μ b + Δ``) or ``"ema"``
            (Adam's ``m ← β m + (1 − β) g``).
    """

    preconditioner: Preconditioner
    rule: Preconditioner = field(default_factory=identity)
    curvature_update_interval: int = 1
    preconditioner_update_interval: int = 1
    momentum: float = 0.0
    momentum_style: str = "heavy_ball"

    def __post_init__(self):
        require_integer("curvature_update_interval", self.curvature_update_interval)
        require_integer("preconditioner_update_interval", self.preconditioner_update_interval)
        require_number("momentum", self.momentum, strict=False, maximum=1.0)
        if self.momentum_style not in MOMENTUM_STYLES:
            raise InvalidProblem(f"unknown momentum_style {self.momentum_style!r}; choose one of "
                                 f"{', '.join(MOMENTUM_STYLES)}")

    def stability_threshold(self, lr: float) -> float:
        """The largest ``λ_max(P⁻¹H)`` for which the step is stable on a quadratic.

        ``2/η`` without momentum; ``(2 + 2μ)/η`` with heavy-ball momentum ``μ``; ``(2 + 2β)/((1 − β) η)``
        with an EMA of the gradient (``38/η`` for Adam's ``β₁ = 0.9``; Cohen et al. 2022).
        """
        if self.momentum_style == "ema":
            return (2 + 2 * self.momentum) / ((1 - self.momentum) * lr)
        return (2 + 2 * self.momentum) / lr


class PreconditionedOptimizer(torch.optim.Optimizer):
    """A :class:`Method` training ``model``: ``opt.step((X, y))`` takes one step and returns the batch loss.

    ``opt.step(closure)`` with a torch-style closure (it zeroes the gradients, computes the loss,
    calls ``backward`` and returns the loss) works for the methods that read nothing but gradients.

    Data-parallel training: with ``process_group`` each rank calls ``step`` with its share of the
    step's batch (shares may differ in size). The loss and the gradient become those of the union
    (one all-reduce; the ``.grad`` tensors are overwritten with it), and the curvature statistics are
    those of the union (:class:`curvlab.Problem` with the group), so every rank takes the same step
    as one process on the whole batch. ``spread_inversions=True`` lets the K-FAC family (``kfac``,
    ``foof``, ``skfac``) invert each layer's factors on one rank, round-robin, and share the
    inverses with one all-gather (KAISA's split). A ``DistributedDataParallel`` model is trained through its ``module``
    (its own gradient all-reduce would average shares of unequal sizes wrongly).

    ``one_pass=True``, for a method whose curvature statistics' pass determines the batch gradient
    (``Preconditioner.step_from_statistics``: SMW-NG, SENG and PSGD-Newton), takes each
    curvature-update step from one pass of the model instead of two: the direction and the loss from the
    statistics' forward and backward pass (in eval mode, as all curvature), as ASDL takes both from its
    training pass; the targets are checked before it against the model's output on the batch's first
    example (a model that fails on one example, or whose output does not lead with it, is run on the whole
    batch first). It needs a model that computes the same in training and eval mode (no active dropout, no
    batch norm in training mode; checked on the first such step, the random state and buffers left as they
    were), and on those steps the ``.grad`` tensors are not set (``None`` after the step's ``zero_grad``).

    Attributes:
        last_direction: name -> tensor, ``Δ = P⁻¹ g`` of the last step (before learning rate,
            momentum and weight decay; ``None`` after a step that failed); a parameter the method leaves
            unpreconditioned shares its ``.grad`` tensor (the step does not copy gradients: zero them with
            ``set_to_none=True``, torch's default, to keep it).
        preconditioner_state: the preconditioner's state after the last step (a step takes it over while it
            runs, so that what the step rebuilds can be freed first: see ``Preconditioner.release``).
        steps: the number of steps taken.
        time_phases: when set, each step records :attr:`phase_seconds` (synchronising the device
            between phases, which costs a little time on a GPU).
        phase_seconds: seconds of the last timed step in each of :data:`PHASES`: the loss and
            gradient, the curvature statistics (``accumulate``), the inversion (``refresh``), and
            the application of ``P⁻¹`` with the update rule and the parameter update.
    """

    def __init__(self, model: nn.Module, method: Method, loss="cross_entropy", lr: float = 0.1, *,
                 params=None, reduction: str = "mean", seed: int = 0, name: str | None = None,
                 process_group=None, spread_inversions: bool = False, one_pass: bool = False):
        if process_group is not None:
            check_group(process_group)
        if not isinstance(one_pass, bool):
            raise InvalidProblem(f"one_pass must be True or False, got {one_pass!r}")
        if one_pass and method.preconditioner.step_from_statistics is None:
            raise InvalidProblem(f"{name or 'this method'} cannot take its step from the statistics' pass alone: "
                                 f"one_pass=True is for methods whose statistics' pass gives the gradient (smw_ng, seng, "
                                 f"psgd_kron with form='newton')")
        if one_pass and process_group is not None:
            raise InvalidProblem("one_pass=True is for one process; with a process group leave it False")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise InvalidProblem(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(spread_inversions, bool):
            raise InvalidProblem(f"spread_inversions must be True or False, got {spread_inversions!r}")
        self.process_group, self.spread_inversions, self.one_pass = process_group, spread_inversions, one_pass
        self._modes_checked = False
        self.model, self.loss, self.reduction = model, loss, reduction
        self.likelihood = likelihood_of(loss, reduction)
        self.names = select_parameters(model, params)
        self.method, self.name = method, name or "optimizer"
        self.seed = require_integer("seed", seed, minimum=0)
        named = dict(model.named_parameters())
        super().__init__([named[n] for n in self.names], {"lr": require_number("lr", lr)})
        self._parameters = {n: named[n] for n in self.names}
        self.preconditioner_state = method.preconditioner.init(self._values())
        self._rule_state = method.rule.init(self._values())
        self.steps = 0
        self.last_direction: Params | None = None
        self.time_phases = False
        self.phase_seconds: dict[str, float] = {}
        self._problem: Problem | None = None
        self._terms = 0

    def _values(self) -> Params:
        return {name: p.detach() for name, p in self._parameters.items()}

    def batch_loss(self, batch) -> torch.Tensor:
        """``L`` of one batch ``(X, y)`` at the current ``θ``, differentiable, in the model's current mode."""
        output, y = self._output(batch)
        self._terms = self.likelihood.validate(output.detach(), y)
        scale = 1.0 if self.reduction == "sum" else 1.0 / self._terms
        return scale * self.likelihood.loss(output, y)

    def _output(self, batch, examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's output on ``X`` (its first ``examples`` only, if given) and the target prepared for the loss,
        for ``batch = (X, y)``."""
        X, y = batch
        first = next(iter(self._parameters.values()))
        X = prepare_input(X, first.dtype, first.device)
        if examples is not None:
            X = example_slice(X, 0, examples)
        y = self.likelihood.prepare_target(y.to(first.device), first.dtype)
        return (self.model(**X) if isinstance(X, Mapping) else self.model(X)), y

    def _probed_loss(self, batch) -> torch.Tensor | None:
        """A one-pass step's check of the batch: the targets against the model's output on the first example, taken
        as the batch's output shape (``None``: the statistics' pass gives the loss); a model whose output does not
        lead with that one example, or fails on it, is run on the whole batch, and the batch loss returned."""
        size = batch_size(batch[0])
        training = self.model.training
        self.model.eval()
        try:
            output, y = self._output(batch, examples=1)
        except Exception:  # a model that needs the whole batch: checked on it below
            output = None
        finally:
            self.model.train(training)
        if output is None or output.ndim == 0 or output.shape[0] != 1:
            return self.batch_loss(batch)
        self._terms = self.likelihood.validate(output.expand(size, *output.shape[1:]), y)
        return None

    def _check_modes(self, batch) -> None:
        """Refuse a model in training mode whose output on ``batch`` differs from its eval-mode output beyond rounding.

        The random state and the buffers (batch-norm running statistics) are left as they were.
        """
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        device = next(iter(self._parameters.values())).device
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                trained = self._output(batch)[0]
                self.model.eval()
                evaluated = self._output(batch)[0]
        except Exception as err:
            raise InvalidProblem(f"one_pass=True: the model fails on this batch in training or eval mode "
                                 f"({type(err).__name__}: {err}); leave one_pass False") from err
        finally:
            self.model.train()
            for buffer, saved in buffers:
                buffer.copy_(saved)
        tolerance = math.sqrt(torch.finfo(evaluated.dtype).eps) * float(evaluated.abs().max())
        if trained.shape != evaluated.shape or float((trained - evaluated).abs().max()) > tolerance:
            raise InvalidProblem("one_pass=True needs a model that computes the same in training and eval mode, but this "
                                 "one does not (dropout, batch norm): leave one_pass False, or put the model in eval "
                                 "mode to train it so")
        self._modes_checked = True

    def statistics_problem(self, batch, loss: float | None) -> Problem:
        """The batch as a :class:`curvlab.Problem` at the current ``θ`` (it puts the model in eval mode).

        The first one is built with every check of :class:`~curvlab.Problem`; later ones reuse it on the
        new batch (:meth:`~curvlab.Problem.with_batch`) with the loss and term count of this step's own
        forward pass, which has validated the batch (with a process group always: the ranks' shares form
        one batch), or, for a one-pass step, ``loss=None``: its statistics' pass records the loss. A
        non-finite ``loss`` means diverged parameters.
        """
        if loss is not None:
            self._require_finite(loss)
        if self._problem is None:
            self._problem = Problem(self.model, batch, self.loss, params=self.names, reduction=self.reduction,
                                    process_group=self.process_group)
            if self.process_group is None:
                return self._problem
        return self._problem.with_batch(batch, self._terms, loss)

    @staticmethod
    def _require_finite(loss: float) -> None:
        if not math.isfinite(loss):
            raise InvalidProblem(f"the batch loss is {loss} (non-finite): the parameters diverged; lower the "
                                 f"learning rate or raise the damping")

    def _sum_over_ranks(self, gradient: Params, loss: float) -> float:
        """The union's loss, returned, and gradient, written into ``gradient``, from every rank's share (one all-reduce).

        With ``mean`` reduction the shares are weighted by their loss terms ``T_r``: ``g = Σ_r T_r g_r / Σ_r T_r``.
        """
        weight = 1.0 if self.reduction == "sum" else float(self._terms)
        tensors = list(gradient.values())
        flat = torch.cat([t.flatten() * weight for t in tensors] + [tensors[0].new_tensor([loss * weight, self._terms])])
        sum_over_ranks(flat, self.process_group)
        scale = 1.0 if self.reduction == "sum" else 1.0 / float(flat[-1])
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t)).mul_(scale)
            offset += t.numel()
        return float(flat[-2]) * scale

    def step(self, batch=None):
        """One step on ``batch = (X, y)`` (or a closure); returns the batch loss as a float."""
        self.last_direction = None  # not kept through the step: its memory is free for the step's own
        method = self.method
        clock = _PhaseClock(next(iter(self._parameters.values())).device if self.time_phases else None)
        pre = method.preconditioner
        accumulating = pre.accumulate is not None and self.steps % method.curvature_update_interval == 0
        refreshing = pre.refresh is not None and self.steps % method.preconditioner_update_interval == 0
        one_pass = self.one_pass and accumulating and (refreshing or pre.refresh is None) and is_batch(batch)
        if callable(batch):
            if self.process_group is not None:
                raise InvalidProblem("with a process group, call step((X, y)) with this rank's share of the batch: "
                                     "a closure's loss does not say how many terms it averages")
            if method.preconditioner.needs_statistics:
                raise InvalidProblem(
                    f"{self.name} measures curvature on the batch: call step((X, y)) instead of step(closure)"
                )
            with torch.enable_grad():
                loss = batch()
        elif one_pass:
            self.zero_grad()
            if self.model.training and not self._modes_checked:
                self._check_modes(batch)
            with torch.no_grad():
                loss = self._probed_loss(batch)
        elif is_batch(batch):
            self.zero_grad()
            with torch.enable_grad():
                loss = self.batch_loss(batch)
                loss.backward()
        else:
            raise InvalidProblem(
                f"step takes one batch (X, y) or a closure, got {type(batch).__name__}"
            )
        # After our own zero_grad the step owns the fresh .grad tensors; a closure's may be reused by its caller.
        gradient = None if one_pass else {name: torch.zeros_like(p) if p.grad is None else p.grad.detach()
                                          for name, p in self._parameters.items()}
        if callable(batch):
            gradient = {name: g.clone() for name, g in gradient.items()}
        if loss is not None:  # None: a one-pass step's loss comes from its statistics' pass
            loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        local_loss = loss
        if self.process_group is not None:
            loss = self._sum_over_ranks(gradient, loss)
        values = self._values()
        # The step holds the only reference to the state, so that what this step's statistics and refresh
        # rebuild can be freed first (Preconditioner.release). A step that fails leaves the state it started
        # from (released, where it was: a retry of the step rebuilds what was dropped), but for the tensors an
        # owned accumulation or application (accumulate_owned, apply_owned) has already updated in place.
        state = self.preconditioner_state
        self.preconditioner_state = None
        if accumulating and (refreshing or pre.refresh is None) and pre.release is not None:
            state = pre.release(state)
        before = state
        clock.lap("gradient")
        try:
            if accumulating:
                training = self.model.training
                self.model.eval()  # curvature is measured as curvlab analyses models: dropout off, batch-norm fixed
                try:
                    statistics = Statistics(lambda: self.statistics_problem(batch, local_loss), gradient, loss,
                                            self.steps, self.seed, self.spread_inversions)
                    if one_pass:
                        direction, state = pre.step_from_statistics(state, statistics)
                        loss = statistics.problem.loss_value()
                        self._require_finite(loss)
                    else:
                        state = (pre.accumulate_owned or pre.accumulate)(state, statistics)
                finally:
                    self.model.train(training)
            clock.lap("statistics")
            if refreshing and not one_pass:
                state = pre.refresh(state)
            clock.lap("inversion")
            if not one_pass:
                direction, state = (pre.apply_owned or pre.apply)(gradient, state, values)
        except BaseException:
            self.preconditioner_state = before
            raise
        self.preconditioner_state = state
        update, self._rule_state = (method.rule.apply_owned or method.rule.apply)(direction, self._rule_state, values)
        lr = self.param_groups[0]["lr"]
        with torch.no_grad():
            for name, p in self._parameters.items():
                p.sub_(update[name], alpha=lr)
        clock.lap("application")
        if self.time_phases:
            self.phase_seconds = clock.seconds
        self.last_direction = direction
        self.steps += 1
        return loss


class _PhaseClock:
    """Wall-clock seconds between successive :meth:`lap` calls, the device synchronised at each (off for ``None``)."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._synchronize()
        self._last = time.perf_counter()

    def _synchronize(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, phase: str) -> None:
        if self.device is None:
            return
        self._synchronize()
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


def one_shot(method: Method, problem: Problem, seed: int = 0, curvatures: Mapping[str, CurvatureOperator] | None = None
             ) -> tuple[Params, Callable[[Params], Params] | None]:
    """The direction ``Δ = P⁻¹ ∇L`` of a preconditioner built from ``problem``'s data alone, and its ``P⁻¹``.

    The state is initialised at ``θ``, fed the statistics of all the data as one batch (step 0: every
    update happens) and applied to the full gradient; the second value is the linear map
    ``v ↦ P⁻¹ v`` at that state, or ``None`` when the method has none. ``curvatures``: exact curvature
    operators of ``problem`` at ``θ`` already at hand (see :class:`~curvlab.optim.base.Statistics`).
    """
    pre = method.preconditioner
    values = problem.params
    gradient = problem.unflatten(problem.gradient())
    state = pre.init(values)
    if pre.accumulate is not None:
        state = pre.accumulate(state, Statistics(problem, gradient, problem.loss_value(), 0, seed,
                                                 curvatures=dict(curvatures or {})))
    if pre.refresh is not None:
        state = pre.refresh(state)
    direction, state = pre.apply(gradient, state, values)
    return direction, pre.linear(state) if pre.linear is not None else None
