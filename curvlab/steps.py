"""The step each optimizer takes, next to the steps the exact curvature asks for: :func:`compare_steps`, :func:`capture_step`.

At a point ``θ`` with gradient ``g = ∇L`` and Hessian ``H`` on all of the problem's data, the exact
reference steps are (damping ``λ``, :func:`curvlab.optim.exact.damped_solve`)

- ``natural_gradient``: ``(G + λI)⁻¹ g`` with ``G`` the GGN (= exact Fisher);
- ``newton_abs``: ``(|H| + λI)⁻¹ g`` (saddle-free Newton);
- ``newton``: ``(H + λI)⁻¹ g`` where ``H + λI`` is positive definite, else missing (nan).

An optimizer's step ``d`` (one-shot: its direction ``Δ = P⁻¹ g`` from a state built on the data;
trajectory or captured: the applied step ``θ_before − θ_after``) is measured on the whole model and
per module (:mod:`curvlab.metrics.step_agreement`): cosine to each reference, norm ratio to the chosen
one, the exact quadratic model's decrease at the best scalar step ``α* = gᵀd / dᵀHd`` and its ratio to
the reference step's, the actual loss change along ``θ − α d`` after a short line search, and the
preconditioned sharpness ``λ_max(P⁻¹H)`` of the method's linear map against the stability
thresholds ``2/η`` and :meth:`curvlab.optim.Method.stability_threshold`.
"""

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigs
from tqdm.auto import tqdm

from curvlab import optim
from curvlab.errors import DenseTooLarge, InvalidProblem, require_integer, require_number
from curvlab.memory import check_dense
from curvlab.metrics.step_agreement import agreement, scopes
from curvlab.operators import AbsHessian, CurvatureOperator, DenseMatrix, curvature
from curvlab.optim.exact import DampedInverse
from curvlab.problem import Problem, differentiable_kernels

REFERENCES = ("natural_gradient", "newton_abs", "newton")
MODES = ("one_shot", "trajectory")
#: The learning rates used when none is given: the reference implementation's default where it has one
#: (torch.optim, AdaHessian, Sophia, distributed Shampoo, SOAP), else 0.1, the scale of the study's SGD on
#: top of ``P⁻¹G`` (its momentum 0.9 makes the effective step about 1 for Newton-like directions).
DEFAULT_LEARNING_RATES = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "adagrad": 1e-2, "adahessian": 0.15,
                          "sophia_g": 1e-4, "sophia_h": 1e-4, "distributed_shampoo": 1e-2, "soap": 3e-3}
FALLBACK_LEARNING_RATE = 0.1
#: Up to this many parameters, ``P⁻¹H`` is built densely and all its eigenvalues computed.
DENSE_SHARPNESS_LIMIT = 512
#: The line search's trial step sizes: the start, then up to this many doublings (while the loss keeps
#: falling) or halvings (until it falls).
DOUBLINGS, HALVINGS = 3, 6


def default_optimizers() -> list[str]:
    """Every optimizer of :func:`curvlab.optim.names`: each runs in seconds on the built-in problem."""
    return optim.names()


@dataclass(frozen=True)
class ExactPoint:
    """The exact quantities at one ``θ`` on all of a problem's data, computed once and shared by every step measured there.

    Attributes:
        problem: the problem at ``θ``.
        gradient: ``g`` ``(P,)``.
        hessian: ``H`` (a dense matrix within the memory budget, else the matrix-free operator).
        references: name -> exact step ``(P,)`` (:data:`REFERENCES`; ``newton`` all nan where
            ``H + λI`` is not positive definite).
        newton_positive_definite: whether ``H + λI`` is positive definite.
        exact: ``"dense"`` or ``"matrix-free"``: how the references were solved.
        scopes: ``("all", None)`` and, per module, its entries.
        reference: the reference the ratios divide by; reference_products: ``H_bb d_ref,b`` per scope.
        damping: ``λ``.
    """

    problem: Problem
    gradient: torch.Tensor
    hessian: CurvatureOperator
    references: dict[str, torch.Tensor]
    newton_positive_definite: bool
    exact: str
    scopes: list[tuple[str, torch.Tensor | None]]
    reference: str
    reference_products: list[torch.Tensor]
    damping: float

    @classmethod
    def build(cls, problem: Problem, damping: float, reference: str = "natural_gradient", per_block: bool = False,
              progress: bool = False, curvatures: Mapping[str, CurvatureOperator] | None = None) -> "ExactPoint":
        """Gradient, Hessian and the reference steps of ``problem`` at its ``θ`` (dense within the memory budget).

        ``curvatures``: dense Hessian and GGN (:class:`~curvlab.operators.DenseMatrix`) of ``problem`` at
        ``θ`` already at hand, taken instead of building them again.
        """
        gradient = problem.gradient()
        hessian = curvature(problem, "hessian")
        ggn = curvature(problem, "ggn")
        known = {kind: op for kind, op in (curvatures or {}).items() if isinstance(op, DenseMatrix)}
        P = problem.num_params
        try:
            check_dense(P, P, problem.dtype, problem.device, "Hessian")
        except DenseTooLarge:
            exact = "matrix-free"
            absolute = curvature(problem, "abs_hessian")
        else:
            exact = "dense"
            if "hessian" in known:
                hessian = known["hessian"]
            else:
                hessian = DenseMatrix(problem, "hessian", hessian.to_dense(progress=progress))
            absolute = AbsHessian.from_eigen(problem, *hessian.eigh(), "eigh of the dense Hessian")
            ggn = known["ggn"] if "ggn" in known else DenseMatrix(problem, "ggn", ggn.to_dense(progress=progress))
        newton = DampedInverse(hessian, damping)
        positive = newton.positive_definite()
        references = {
            "natural_gradient": DampedInverse(ggn, damping).solve(gradient),
            "newton_abs": DampedInverse(absolute, damping).solve(gradient),
            "newton": newton.solve(gradient) if positive else torch.full_like(gradient, math.nan),
        }
        where = scopes(problem) if per_block else scopes(problem)[:1]
        return cls(problem, gradient, hessian, references, positive, exact, where, reference,
                   scope_products(hessian, references[reference], where), damping)


def scope_products(hessian: CurvatureOperator, vector: torch.Tensor,
                   where: list[tuple[str, torch.Tensor | None]]) -> list[torch.Tensor]:
    """``H v`` for the whole model and ``H_bb v_b`` for each block, from one product with ``len(where)`` columns."""
    columns = torch.zeros(vector.numel(), len(where), dtype=hessian.dtype, device=hessian.device)
    vector = vector.to(columns)
    for k, (_, index) in enumerate(where):
        if index is None:
            columns[:, k] = vector
        else:
            columns[index, k] = vector[index]
    products = hessian @ columns
    return [products[:, k] if index is None else products[index, k] for k, (_, index) in enumerate(where)]


def loss_at(problem: Problem, theta: torch.Tensor) -> float:
    """``L(θ')`` on all of ``problem``'s data for the flat studied parameters ``θ'`` ``(P,)``."""
    params = problem.unflatten(theta.to(dtype=problem.dtype, device=problem.device))
    with torch.no_grad(), differentiable_kernels():
        local = sum(problem.batch_loss(params, X, y) for _, X, y in problem.batches())
        return float(problem.reduce(torch.as_tensor(local, dtype=problem.dtype, device=problem.device).reshape(1)))


def line_search(problem: Problem, direction: torch.Tensor, start: float) -> tuple[float, float]:
    """``(α, L(θ − α d) − L(θ))`` for the best of a few trial step sizes from ``start``.

    From ``α = start``: while the loss falls, up to :data:`DOUBLINGS` doublings as long as each one
    lowers it further; if it does not fall, up to :data:`HALVINGS` halvings until it does. The best
    trial is returned (a positive change if none lowered the loss).
    """
    theta = problem.flatten(problem.params)
    base = loss_at(problem, theta)

    def change(alpha):
        return loss_at(problem, theta - alpha * direction) - base

    best_alpha, best = start, change(start)
    if best < 0:
        for _ in range(DOUBLINGS):
            trial = change(2 * best_alpha)
            if not trial < best:
                break
            best_alpha, best = 2 * best_alpha, trial
    else:
        alpha = start
        for _ in range(HALVINGS):
            alpha /= 2
            trial = change(alpha)
            if trial < best:
                best_alpha, best = alpha, trial
            if trial < 0:
                break
    return best_alpha, best


def preconditioned_sharpness(linear: Callable | None, point: ExactPoint) -> tuple[float, str]:
    """``(λ_max(P⁻¹H), how)``: the largest real part of an eigenvalue of ``P⁻¹H`` ``(P, P)``, or ``(nan, why not)``.

    ``P⁻¹H`` is built densely (``P`` products of the linear map with the columns of ``H``) up to
    :data:`DENSE_SHARPNESS_LIMIT` parameters; beyond, ARPACK's Arnoldi iteration on the non-symmetric
    operator ``v ↦ P⁻¹(Hv)`` finds the eigenvalue of largest real part.
    """
    if linear is None:
        return math.nan, "no linear map: the method's step is not linear in the gradient"
    problem = point.problem

    def apply(v: torch.Tensor) -> torch.Tensor:
        mapped = linear(problem.unflatten(v))
        return problem.flatten({name: torch.as_tensor(mapped[name]).to(v) for name in problem.param_names})

    P = problem.num_params
    if P <= DENSE_SHARPNESS_LIMIT:
        H = point.hessian.to_dense(progress=False) if isinstance(point.hessian, DenseMatrix) else \
            point.hessian @ torch.eye(P, dtype=problem.dtype, device=problem.device)
        matrix = torch.stack([apply(H[:, j]) for j in range(P)], dim=1)
        if not torch.isfinite(matrix).all():
            return math.nan, "P⁻¹H has non-finite entries"
        return float(torch.linalg.eigvals(matrix.double()).real.max()), "dense eigenvalues of P⁻¹H"

    def matvec(x):
        v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=problem.dtype, device=problem.device)
        return apply(point.hessian @ v).detach().to("cpu", torch.float64).numpy()

    start = np.random.default_rng(0).standard_normal(P)
    first = matvec(start)
    if not np.isfinite(first).all():
        return math.nan, "P⁻¹H has non-finite entries"
    if not first.any():
        return 0.0, "P⁻¹ is zero at this state (the method takes no step yet)"
    operator = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    try:
        values = eigs(operator, k=1, which="LR", tol=1e-6, v0=start, return_eigenvectors=False)
    except (ArpackNoConvergence, ArpackError) as err:
        return math.nan, f"Arnoldi (ARPACK) on P⁻¹H failed: {err}"
    return float(values.real.max()), "Arnoldi (ARPACK) on P⁻¹H, largest real part"


def measure_step(point: ExactPoint, step, *, optimizer: str = "step", lr: float | None = None,
                 linear: Callable | None = None, method: "optim.Method | None" = None, start: float | None = None,
                 step_index: int = 0, mode: str = "captured") -> list[dict]:
    """The rows of :func:`compare_steps` for one step ``d`` (a dict name -> tensor or a flat ``(P,)`` tensor) at ``point``.

    Args:
        point: the exact quantities at the ``θ`` the step starts from (:meth:`ExactPoint.build`).
        step: ``d``; the step is ``θ − α d``.
        optimizer: the label of the rows.
        lr: ``η`` for the thresholds ``2/η`` and the method's (nan without it).
        linear: ``v ↦ P⁻¹v`` of the method at this step (``Preconditioner.linear``), for the sharpness.
        method: the :class:`~curvlab.optim.Method`, for its stability threshold.
        start: the line search's first ``α`` when ``α*`` is not a positive number (default 1).
        step_index, mode: recorded in the rows.
    """
    problem = point.problem
    d = problem.flatten(step) if isinstance(step, Mapping) else torch.as_tensor(step)
    d = d.to(device=problem.device, dtype=problem.dtype).reshape(-1)
    if d.numel() != problem.num_params:
        raise InvalidProblem(f"the step has {d.numel()} entries but the problem studies {problem.num_params} parameters")
    products = scope_products(point.hessian, d, point.scopes)
    sharpness, how = preconditioned_sharpness(linear, point)
    threshold = 2 / lr if lr else math.nan
    stability = method.stability_threshold(lr) if method is not None and lr else math.nan
    rows = []
    for (label, index), product, reference_product in zip(point.scopes, products, point.reference_products):
        def part(v):
            return v if index is None else v[index]

        metrics = agreement(part(d), part(point.gradient), product, {name: part(v) for name, v in point.references.items()},
                            point.reference, reference_product)
        alpha = metrics["alpha_star"]
        restricted = d if index is None else torch.zeros_like(d).index_copy_(0, index, d[index])
        chosen, change = line_search(problem, restricted, alpha if alpha > 0 else (start or 1.0))
        whole = index is None
        rows.append({"optimizer": optimizer, "block": label, "mode": mode, "step": step_index, "lr": lr,
                     **metrics, "newton_positive_definite": point.newton_positive_definite,
                     "line_search_alpha": chosen, "loss_change": change,
                     "sharpness": sharpness if whole else math.nan,
                     "sharpness_method": how if whole else "whole model only",
                     "threshold_2_over_lr": threshold, "stability_threshold": stability,
                     "reference": point.reference, "damping": point.damping, "exact": point.exact})
    return rows


@dataclass(frozen=True)
class CapturedStep:
    """One real ``step()`` of a ``torch.optim`` optimizer on a problem's whole data.

    Attributes:
        step: name -> ``θ_before − θ_after``.
        loss: ``L(θ_before)`` as the closure returned it.
        lr: ``param_groups[0]["lr"]`` (None when the optimizer has none).
        problem: the problem, back at ``θ_before``.
    """

    step: dict[str, torch.Tensor]
    loss: float
    lr: float | None
    problem: Problem

    def measure(self, damping: float = 1e-3, reference: str = "natural_gradient", per_block: bool = False,
                progress: bool = False) -> pd.DataFrame:
        """The :func:`compare_steps` numbers of this step (no sharpness: a captured step has no linear map)."""
        damping, reference = _check_damping_and_reference(damping, reference)
        point = ExactPoint.build(self.problem, damping, reference, per_block, progress)
        return pd.DataFrame(measure_step(point, self.step, optimizer="captured", lr=self.lr))


def capture_step(make_optimizer: Callable, prob: Problem) -> CapturedStep:
    """Take one real ``step()`` of ``make_optimizer(params)`` on all of ``prob``'s data as one closure, then undo it.

    ``params`` is the list of the studied ``nn.Parameter`` s in order; the closure zeroes their
    gradients, computes ``L`` on every batch and calls ``backward``. Afterwards the parameters and
    their ``.grad`` are restored, so the model is as it was.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> cap = curvlab.capture_step(lambda p: torch.optim.SGD(p, lr=0.5), prob)
        >>> bool(torch.allclose(cap.step["weight"], 0.5 * prob.unflatten(prob.gradient())["weight"]))
        True
    """
    if not isinstance(prob, Problem):
        raise InvalidProblem(f"prob must be a curvlab.Problem, got {type(prob).__name__}")
    if not callable(make_optimizer):
        raise InvalidProblem("make_optimizer must be a function params -> torch.optim.Optimizer")
    named = dict(prob.model.named_parameters())
    params = [named[name] for name in prob.param_names]
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        optimizer = make_optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidProblem(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")

        def closure():
            optimizer.zero_grad()
            live = dict(zip(prob.param_names, params))
            with differentiable_kernels():
                loss = sum(prob.batch_loss(live, X, y) for _, X, y in prob.batches())
            loss.backward()
            if prob.process_group is None:
                return loss
            for p in params:  # the loss and gradient of all ranks' data
                if p.grad is not None:
                    prob.reduce(p.grad)
            return prob.reduce(loss.detach().reshape(1)).reshape(())

        with torch.enable_grad():
            loss = optimizer.step(closure)
        step = {name: b - p.detach() for name, b, p in zip(prob.param_names, before, params)}
    finally:
        with torch.no_grad():
            for p, b, g in zip(params, before, grads):
                p.copy_(b)
                p.grad = g
    lr = optimizer.param_groups[0].get("lr")
    return CapturedStep(step, prob.loss_value() if loss is None else float(torch.as_tensor(loss).detach()),
                        None if lr is None else float(lr), prob)


def _check_damping_and_reference(damping, reference) -> tuple[float, str]:
    if reference not in REFERENCES:
        raise InvalidProblem(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    return require_number("damping", damping), reference


def _learning_rates(names: list[str], lr) -> dict[str, float]:
    if lr is None:
        return {name: DEFAULT_LEARNING_RATES.get(name, FALLBACK_LEARNING_RATE) for name in names}
    if isinstance(lr, Mapping):
        unknown = sorted(set(lr) - set(names))
        if unknown:
            raise InvalidProblem(f"lr names optimizer(s) {', '.join(unknown)} that are not compared; "
                                 f"the optimizers are: {', '.join(names)}")
        return {name: require_number(f"lr[{name!r}]", lr[name]) if name in lr
                else DEFAULT_LEARNING_RATES.get(name, FALLBACK_LEARNING_RATE) for name in names}
    value = require_number("lr", lr, hint=" (or a mapping optimizer -> learning rate)")
    return dict.fromkeys(names, value)


def _optimizer_names(optimizers) -> list[str]:
    if optimizers is None:
        return default_optimizers()
    names = [optimizers] if isinstance(optimizers, str) else list(optimizers)
    unknown = [name for name in names if name not in optim.names()]
    if unknown or not names or not all(isinstance(name, str) for name in names):
        raise InvalidProblem(f"unknown optimizer(s) {', '.join(map(repr, unknown)) or 'none given'}; "
                             f"choose from {', '.join(optim.names())}")
    if len(set(names)) != len(names):
        raise InvalidProblem(f"optimizers lists a name twice: {', '.join(names)}")
    return names


def _steps_to_measure(steps, at) -> list[int]:
    steps = require_integer("steps", steps)
    if at is None:
        return sorted({round(x) for x in np.linspace(0, steps - 1, min(steps, 4))})
    at = [at] if isinstance(at, int) else list(at)
    if not at:
        raise InvalidProblem("at must name at least one step")
    return sorted({require_integer("at", t, minimum=0, maximum=steps - 1, hint=f" (a step index below steps={steps})")
                   for t in at})


def _snapshot(prob: Problem, model: torch.nn.Module) -> Problem:
    """A problem on a copy of ``model`` (at its current ``θ``) with ``prob``'s data, loss and parameters."""
    return Problem(copy.deepcopy(model), prob.data, prob.loss, params=prob.param_names, reduction=prob.reduction)


def _trajectory_rows(prob, name, method, lr, hyper, when, seed, damping, reference, per_block) -> list[dict]:
    model = copy.deepcopy(prob.model)
    opt = optim.make(name, model, prob.loss, lr, params=prob.param_names, reduction=prob.reduction, seed=seed, **hyper)
    batches = list(prob.data)
    rows = []
    for t in range(when[-1] + 1):
        measured = t in when
        if measured:
            start = _snapshot(prob, model)
        opt.step(batches[t % len(batches)])
        if measured:
            after = {n: p.detach() for n, p in model.named_parameters() if n in start.param_names}
            step = {n: start.params[n] - after[n] for n in start.param_names}
            pre = method.preconditioner
            linear = pre.linear(opt.preconditioner_state) if pre.linear is not None else None
            point = ExactPoint.build(start, damping, reference, per_block)
            rows += measure_step(point, step, optimizer=name, lr=lr, linear=linear, method=method, start=1.0,
                                 step_index=t, mode="trajectory")
    return rows


def compare_steps(prob: Problem, optimizers: Sequence[str] | None = None, reference: str = "natural_gradient",
                  damping: float = 1e-3, mode: str = "one_shot", steps: int = 10, at: Sequence[int] | None = None,
                  per_block: bool = False, lr: float | Mapping[str, float] | None = None, seed: int = 0,
                  hyperparameters: Mapping[str, Mapping] | None = None, progress: bool = True,
                  curvatures: Mapping[str, CurvatureOperator] | None = None) -> pd.DataFrame:
    """Each optimizer's step against the exact natural-gradient and Newton steps, on the whole model and per module.

    Args:
        prob: the model, data and loss; the model is never modified.
        optimizers: names from :func:`curvlab.optim.names` (default: :func:`default_optimizers`).
        reference: ``"natural_gradient"``, ``"newton_abs"`` or ``"newton"``: the step ``norm_ratio`` and
            ``quadratic_decrease_ratio`` divide by.
        damping: ``λ`` of the reference steps ``(C + λI)⁻¹ g``.
        mode: ``"one_shot"``: each method's direction ``Δ = P⁻¹ g`` from a state built on all of the data
            (:func:`curvlab.optim.one_shot`) at ``θ``; ``"trajectory"``: each method trains a copy of the
            model from ``θ`` for ``steps`` steps on the data's batches (cycled, in the model's current
            mode), and at the steps ``at`` its applied step ``θ_before − θ_after`` (learning rate,
            momentum and weight decay included) is compared with the exact steps at ``θ_before`` on all
            of the data.
        steps: ``T`` (trajectory).
        at: the step indices (from 0) measured in trajectory mode; default: up to four spread over ``T``.
        per_block: add a row per module (its entries of every vector, its diagonal Hessian block).
        lr: one learning rate for all, a mapping name -> lr, or None (:data:`DEFAULT_LEARNING_RATES`).
        seed: the optimizers' seed (sampled labels, probes).
        hyperparameters: name -> the method's hyperparameters (:func:`curvlab.optim.hyperparameters`).
        progress: show a progress bar over the optimizers.
        curvatures: one-shot mode: exact curvature operators of ``prob`` at its ``θ`` already at hand,
            kind -> :class:`~curvlab.operators.DenseMatrix` (or the |λ|-Hessian from its eigenpairs), taken by
            the reference steps and the exact methods instead of building them again (:func:`curvlab.compare`
            passes the dense matrices of its spectra).

    Returns:
        One row per optimizer (per measured step in trajectory mode, and per module with ``per_block``;
        ``block = "all"`` for the whole model) with ``cos_natural_gradient``, ``cos_newton_abs``,
        ``cos_newton`` (nan where ``H + λI`` is not positive definite, see ``newton_positive_definite``),
        ``norm_ratio``, ``alpha_star``, ``quadratic_decrease`` (exact ``H``) and
        ``quadratic_decrease_ratio``, ``line_search_alpha`` and ``loss_change`` (``L(θ − α d) − L(θ)``
        at the chosen ``α``), ``sharpness`` ``λ_max(P⁻¹H)`` with ``sharpness_method``,
        ``threshold_2_over_lr`` and ``stability_threshold``.

    Examples:
        >>> import torch, curvlab
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(8, 3), torch.randint(0, 2, (8,))))
        >>> table = curvlab.compare_steps(prob, ["sgd", "natural_gradient"], progress=False)
        >>> round(float(table.set_index("optimizer").loc["natural_gradient", "cos_natural_gradient"]), 10)
        1.0
    """
    if not isinstance(prob, Problem):
        raise InvalidProblem(f"prob must be a curvlab.Problem, got {type(prob).__name__}")
    damping, reference = _check_damping_and_reference(damping, reference)
    if mode not in MODES:
        raise InvalidProblem(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "trajectory" and prob.process_group is not None:
        raise InvalidProblem("mode='trajectory' trains on the problem's batches one at a time in one process; with a "
                             "process group use mode='one_shot'")
    names = _optimizer_names(optimizers)
    rates = _learning_rates(names, lr)
    hyperparameters = dict(hyperparameters or {})
    stray = sorted(set(hyperparameters) - set(names))
    if stray:
        raise InvalidProblem(f"hyperparameters names optimizer(s) {', '.join(stray)} that are not compared; "
                             f"the optimizers are: {', '.join(names)}")
    seed = require_integer("seed", seed, minimum=0)
    when = _steps_to_measure(steps, at) if mode == "trajectory" else None
    methods = {name: optim.method(name, **hyperparameters.get(name, {})) for name in names}
    point = ExactPoint.build(prob, damping, reference, per_block, progress, curvatures) if mode == "one_shot" else None
    rows = []
    for name in tqdm(names, desc="compare steps", disable=not progress, leave=False):
        method = methods[name]
        if mode == "one_shot":
            direction, linear = optim.one_shot(method, prob, seed=seed, curvatures=curvatures)
            rows += measure_step(point, direction, optimizer=name, lr=rates[name], linear=linear, method=method,
                                 start=rates[name], mode=mode)
        else:
            rows += _trajectory_rows(prob, name, method, rates[name], hyperparameters.get(name, {}), when, seed,
                                     damping, reference, per_block)
    return pd.DataFrame(rows)
