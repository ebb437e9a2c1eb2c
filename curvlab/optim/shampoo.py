"""Shampoo as the study ran it (ASDL) and distributed Shampoo (facebookresearch), from online gradient statistics.

Both precondition a parameter's gradient ``G`` (a tensor of order ``k``) with one Kronecker factor per
dimension, the online empirical Fisher of mini-batch gradients in Kronecker form (OPTIMIZERS.md §4, §5):

    ``F_i ← F_i + G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ``  ``(d_i, d_i)``,   ``Δ = G ×_1 F_1^{-1/(2k)} ×_2 ⋯ ×_k F_k^{-1/(2k)}``,

with ``G⁽ⁱ⁾`` the mode-``i`` unfolding ``(d_i, ∏_{j≠i} d_j)``; for a matrix ``Δ = L^{-1/4} G R^{-1/4}``.
They read nothing but gradients, so their statistics are updated inside ``apply`` (``opt.step(closure)``
works) and the update schedule is kept in the state.

- :func:`shampoo` is ASDL's ``ShampooGradientMaker``: sums (or ASDL's EMA) from ``1e-12·I``, tensors keep
  their shape (a conv kernel has four factors, exponent ``-1/8``), 1-D parameters keep the raw gradient,
  inverse roots by the coupled Newton iteration with the relative ridge ``ε·λ_max`` (power iteration).
- :func:`distributed_shampoo` is facebookresearch's ``DistributedShampoo``: small dimensions merged,
  blocks of at most ``max_preconditioner_dim``, ``β₂``-weighted factors with bias correction, inverse
  roots by ``eigh`` with an absolute ``ε`` (or coupled Newton), grafting, a ``β₁`` filtered gradient.
"""

from collections.abc import Iterator
from functools import partial, reduce
from itertools import product
from typing import NamedTuple

import torch

from curvlab.approx.triangular import symmetric_product
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.optim.adaptive import add_decayed_weights, betas_pair, study_method
from curvlab.optim.base import Preconditioner, require_compat
from curvlab.optim.optimizer import Method

ROOT_INVERSES = ("eigh", "newton")
GRAFTINGS = (None, "adagrad", "rmsprop", "adam", "sgd")
#: grafting -> its default β₂ (facebookresearch's grafting configs); AdaGrad sums (β₂ = 1), SGD keeps no statistic.
GRAFTING_BETA2 = {"adagrad": 1.0, "rmsprop": 0.99, "adam": 0.999, "sgd": 1.0}


# ----------------------------------------------------------------------------------------------
# Matrix functions and Kronecker products shared by both variants


def mode_products(gradient: torch.Tensor) -> Iterator[torch.Tensor]:
    """``G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ`` ``(d_i, d_i)`` for each mode ``i`` of ``gradient`` (contraction over every other axis), one at a time.

    Examples:
        >>> import torch
        >>> G = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        >>> [m.tolist() for m in mode_products(G)]
        [[[5.0, 2.0], [2.0, 1.0]], [[1.0, 2.0], [2.0, 5.0]]]
    """
    for mode in range(gradient.ndim):
        others = [axis for axis in range(gradient.ndim) if axis != mode]
        yield torch.tensordot(gradient, gradient, dims=(others, others))


def precondition_modes(tensor: torch.Tensor, matrices) -> torch.Tensor:
    """``T ×_1 X_1 ⋯ ×_k X_k`` for symmetric ``X_i`` ``(d_i, d_i)``: each mode of ``tensor`` multiplied by its matrix.

    For a matrix ``T`` this is ``X_1 T X_2``. Contracting the leading axis and appending the result
    cycles the axes, so after ``k`` contractions they are back in order.
    """
    return reduce(lambda t, x: torch.tensordot(t, x, dims=([0], [0])), matrices, tensor)


def power_iteration(matrix: torch.Tensor, tolerance: float = 1e-6, max_iterations: int = 100) -> torch.Tensor:
    """``λ_max`` of a symmetric PSD ``matrix`` ``(n, n)`` by power iteration (0-d tensor).

    The Rayleigh quotient ``vᵀ M v`` of ``v ← M v / ‖M v‖`` from a fixed start drawn in ``(−1, 1)`` (as
    ASDL, but seeded: the global RNG is untouched), until it changes by at most ``tolerance`` relative.
    """
    generator = torch.Generator().manual_seed(0)
    v = (2 * torch.rand(matrix.shape[0], generator=generator, dtype=matrix.dtype) - 1).to(matrix.device)
    estimate = torch.zeros((), dtype=matrix.dtype, device=matrix.device)
    for _ in range(max_iterations):
        v = v / torch.linalg.vector_norm(v)
        product_ = matrix @ v
        previous, estimate = estimate, v @ product_
        v = product_
        if torch.abs(estimate - previous) <= tolerance * torch.abs(estimate):
            break
    return estimate


def coupled_newton_inverse_root(matrix: torch.Tensor, p: int, tolerance: float = 1e-6, max_iterations: int = 100,
                                growth_guard: bool = False, rounding_floor: float = 0.0) -> torch.Tensor:
    """``X ≈ A^{-1/p}`` for a symmetric positive definite ``A`` ``(n, n)`` by the coupled Newton iteration.

    Guo & Higham (2006) as Anil et al. use it: ``z = (1+p)/(2‖A‖_F)``, ``X = z^{1/p} I``, ``M = z A``;
    then ``T = (1 + 1/p) I − M/p``, ``X ← X T``, ``M ← T^p M`` while ``max|M − I| > tolerance``. On exit
    ``M = X^p A``, so ``X`` is within a relative ``≈ max|M − I|·n/p`` of the root. ``growth_guard`` stops,
    keeping the previous ``X``, when the error grows by more than 1.2× (ASDL's ``ComputePower``): the
    entrywise error often grows on the first iteration of a convergent run, and the guard then returns
    the scaled identity ``z^{1/p} I`` instead of the root. Below ``rounding_floor`` an error that stops
    falling ends the iteration: in float32 the tolerance can lie below what rounding allows. Every iterate
    is a polynomial in ``A``, so each product is of commuting symmetric matrices and is formed from its
    upper blocks (:func:`~curvlab.approx.triangular.symmetric_product`, 0.62–0.67 of a dense product's time).

    Examples:
        >>> import torch
        >>> A = torch.tensor([[4.0, 0.0], [0.0, 16.0]], dtype=torch.float64)
        >>> coupled_newton_inverse_root(A, 2).diagonal()
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    z = (1 + p) / (2 * torch.linalg.matrix_norm(matrix))
    root = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device).mul_(z ** (1.0 / p))
    coupled = matrix * z
    error = _distance_to_identity(coupled)
    for _ in range(max_iterations):
        if error <= tolerance:
            break
        step = coupled / -p
        step.diagonal().add_(1 + 1.0 / p)
        candidate = symmetric_product(root, step)
        coupled = symmetric_product(_symmetric_power(step, p), coupled)
        del step  # before the error's temporary
        new_error = _distance_to_identity(coupled)
        if (growth_guard and new_error > 1.2 * error) or (error < rounding_floor and new_error >= error):
            break
        root, error = candidate, new_error
    return root


def _symmetric_power(matrix: torch.Tensor, p: int) -> torch.Tensor:
    """``S^p`` for a symmetric ``S`` ``(n, n)`` and ``p ≥ 1``, by repeated squaring with symmetric products."""
    if p == 1:
        return matrix
    half = _symmetric_power(matrix, p // 2)
    square = symmetric_product(half, half)
    return symmetric_product(square, matrix) if p % 2 else square


def _distance_to_identity(matrix: torch.Tensor) -> torch.Tensor:
    """``max |M − I|`` (0-d tensor), through one temporary."""
    difference = matrix.clone()
    difference.diagonal().sub_(1)
    return difference.abs_().max()


def eigh_inverse_root(matrix: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """``Q diag(λ^{-1/p}) Qᵀ`` from ``eigh(A + εI)``, all eigenvalues raised by ``ε − λ_min`` when ``λ_min < ε``.

    The default of distributed Shampoo (``perturb_before_computation``): an absolute ``ε``.
    """
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix + eps * identity)
    shift = max(eps - float(eigenvalues.min()), 0.0)
    return (eigenvectors * (eigenvalues + shift).pow(-1.0 / p)) @ eigenvectors.T


# ----------------------------------------------------------------------------------------------
# Shampoo as in the study (ASDL ShampooGradientMaker)


class ShampooState(NamedTuple):
    """ASDL Shampoo's state: steps taken, the statistics ``F_i`` and inverse roots of each preconditioned tensor."""

    step: int
    statistics: dict[str, tuple[torch.Tensor, ...]]
    roots: dict[str, tuple[torch.Tensor, ...]]


def asdl_inverse_root(statistic: torch.Tensor, p: int, damping: float, compat: str | None = None,
                      in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ASDL's ``ComputePower``: ``(F + ε λ_max(F) I)^{-1/p}``, and the statistic to keep.

    ``λ_max`` comes from :func:`power_iteration`. By default the root is exact up to rounding: it comes from
    ``eigh`` in float64 (:func:`eigh_inverse_root`, which also lifts eigenvalues that rounding pushed below
    the ridge: a low-rank statistic accumulated in float32 can be indefinite, where Newton diverges and ASDL
    returns non-finite numbers), and the statistic is kept as it was. With ``compat="asdl"`` the root comes
    from ASDL's coupled Newton iteration in the statistic's dtype (in float32 until its error stops falling
    below 1e-3, where rounding limits it) with its 1.2× growth guard, the ridge is added to the stored
    statistic (so it accumulates over refreshes, OPTIMIZERS.md §17.4; ``in_place``: added to ``statistic``
    itself, as ASDL does), and a ``(1, 1)`` factor's root is 1. The iteration's products are formed from
    their upper blocks, so they round differently from ASDL's dense ones: where the growth guard stops the
    iteration before it converges (statistics of rank below their size with ASDL's ridge of 1e-12 ``λ_max``,
    whose small eigenvalues need more iterations than rounding allows), the two may stop an iteration or two
    apart, and their roots differ in those eigendirections by the factor ``(1 + 1/p)`` per iteration.
    """
    if compat == "asdl":
        if statistic.shape[0] == 1:
            return torch.ones_like(statistic), statistic
        ridge = damping * power_iteration(statistic)
        ridged = statistic if in_place else statistic.clone()
        ridged.diagonal().add_(ridge)
        floor = 1e-3 if statistic.dtype != torch.float64 else 0.0
        return coupled_newton_inverse_root(ridged, p, growth_guard=True, rounding_floor=floor), ridged
    wide = statistic.double()
    root = eigh_inverse_root(wide, p, float(damping * power_iteration(wide)))
    return root.to(statistic.dtype), statistic


def scale_by_shampoo(damping: float = 1e-12, ema_decay: float = -1.0, curvature_update_interval: int = 1,
                     preconditioner_update_interval: int = 1, precondition_1d: bool = False,
                     compat: str | None = None) -> Preconditioner:
    """ASDL's Shampoo ``Δ = G ×_1 F̂_1^{-1/(2k)} ⋯ ×_k F̂_k^{-1/(2k)}``, ``F̂_i = F_i + ε λ_max(F_i) I``.

    At step ``t`` (from 0): if ``t`` is a multiple of ``curvature_update_interval``, ``F_i ← F_i + G⁽ⁱ⁾G⁽ⁱ⁾ᵀ``
    (``ema_decay = β > 0``: ``F_i ← (1−β) F_i + β G⁽ⁱ⁾G⁽ⁱ⁾ᵀ``) from ``F_i = 1e-12·I``; if ``t`` is a multiple of
    ``preconditioner_update_interval``, the inverse roots are recomputed (:func:`asdl_inverse_root`); then
    the current roots precondition ``G`` (identity before the first refresh). Tensors of order ``k ≥ 2``
    (and 1-D ones with ``precondition_1d``) are preconditioned; the others keep the raw gradient.
    ``apply_owned`` (the optimizer's) updates the statistics in place and replaces the roots one at a time,
    as ASDL does, so that old and new statistics and roots are never held together.
    """

    def preconditioned(value: torch.Tensor) -> bool:
        return value.ndim >= 2 or (precondition_1d and value.ndim == 1)

    def init(params):
        statistics = {name: tuple(1e-12 * torch.eye(d, dtype=p.dtype, device=p.device) for d in p.shape)
                      for name, p in params.items() if preconditioned(p)}
        roots = {name: tuple(torch.eye(d, dtype=p.dtype, device=p.device) for d in p.shape)
                 for name, p in params.items() if preconditioned(p)}
        return ShampooState(0, statistics, roots)

    def accumulate(statistics, grads, owned):
        if owned:
            for name, stats in statistics.items():
                for f, g in zip(stats, mode_products(grads[name])):
                    if ema_decay > 0:
                        f.mul_(1 - ema_decay).add_(g.mul_(ema_decay))
                    else:
                        f.add_(g)
            return statistics
        if ema_decay > 0:
            return {name: tuple((1 - ema_decay) * f + ema_decay * g for f, g in zip(stats, mode_products(grads[name])))
                    for name, stats in statistics.items()}
        return {name: tuple(f + g for f, g in zip(stats, mode_products(grads[name])))
                for name, stats in statistics.items()}

    def refresh(statistics, roots, owned):
        """New roots and the statistics to keep; ``owned``: in the state's own dicts, each old root dropped as
        soon as its successor exists."""
        new_roots, kept = (roots, statistics) if owned else ({}, {})
        for name, stats in statistics.items():
            fresh, ridged = list(roots[name]), []
            for index, f in enumerate(stats):
                fresh[index], stat = asdl_inverse_root(f, 2 * len(stats), damping, compat, in_place=owned)
                ridged.append(stat)
                if owned:
                    new_roots[name] = tuple(fresh)
            new_roots[name], kept[name] = tuple(fresh), tuple(ridged)
        return new_roots, kept

    def apply(grads, state, params, owned=False):
        statistics, roots = state.statistics, state.roots
        if state.step % curvature_update_interval == 0:
            statistics = accumulate(statistics, grads, owned)
        if state.step % preconditioner_update_interval == 0:
            roots, statistics = refresh(statistics, roots, owned)
        state = ShampooState(state.step + 1, statistics, roots)
        return linear(state)(grads), state

    def linear(state):
        return lambda v: {name: precondition_modes(g, state.roots[name]) if name in state.roots else g
                          for name, g in v.items()}

    return Preconditioner(init=init, apply=apply, linear=linear, apply_owned=partial(apply, owned=True))


def shampoo(damping: float = 1e-12, ema_decay: float = -1.0, curvature_update_interval: int | None = None,
            preconditioner_update_interval: int = 1, momentum: float = 0.9, weight_decay: float = 0.0,
            precondition_1d: bool = False, compat: str | None = None) -> Method:
    """Shampoo as the study ran it (ASDL ``ShampooGradientMaker``, OPTIMIZERS.md §4), under SGD with momentum.

    ``Δ = L̂^{-1/4} G R̂^{-1/4}`` for a matrix (:func:`scale_by_shampoo`), then torch SGD's heavy ball with
    L2 weight decay on ``Δ``. Defaults: ASDL's ``ε = damping = 1e-12`` (the study's value), ``ema_decay = -1``
    (AdaGrad-like sums), intervals 1 (the study used 10 or 100; a ``None`` curvature interval follows the
    preconditioner interval, as in ASDL), 1-D parameters raw.

    Args:
        damping: the relative ridge ``ε``: ``F̂ = F + ε λ_max(F) I``.
        ema_decay: ``-1`` sums the statistics; ``β ∈ (0, 1]`` takes ASDL's EMA ``(1−β) F + β G⁽ⁱ⁾G⁽ⁱ⁾ᵀ``.
        curvature_update_interval: statistics are updated on steps ``t ≡ 0`` modulo it.
        preconditioner_update_interval: inverse roots are recomputed on steps ``t ≡ 0`` modulo it.
        momentum, weight_decay: torch SGD's, applied to ``Δ``.
        precondition_1d: give 1-D parameters their factor with exponent ``-1/2`` (ASDL leaves them raw).
        compat: ``None`` (the method: the stored statistic is never changed, roots converged) or ``"asdl"``
            (the ridge is added to the stored statistic at every refresh and accumulates, §17.4; Newton
            stops when its entrywise error grows by 1.2×, which can leave ``z^{1/p} I``; ``(1, 1)``
            factors give root 1).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("shampoo", model, lr=0.1, momentum=0.0)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> [tuple(r.shape) for r in opt.preconditioner_state.roots["weight"]]
        [(2, 2), (3, 3)]
    """
    damping = require_number("damping", damping, strict=False)
    if not (ema_decay == -1 or 0 < require_number("ema_decay", ema_decay, minimum=-1, strict=False) <= 1):
        raise InvalidProblem(f"ema_decay must be -1 (sums) or in (0, 1], got {ema_decay!r}")
    preconditioner_update_interval = require_integer("preconditioner_update_interval",
                                                     preconditioner_update_interval)
    if curvature_update_interval is None:
        curvature_update_interval = preconditioner_update_interval
    curvature_update_interval = require_integer("curvature_update_interval", curvature_update_interval,
                                                hint=" or None")
    require_compat(compat)
    pre = scale_by_shampoo(damping, ema_decay, curvature_update_interval, preconditioner_update_interval,
                           bool(precondition_1d), compat)
    return study_method(pre, momentum, weight_decay, curvature_update_interval, preconditioner_update_interval)


# ----------------------------------------------------------------------------------------------
# Distributed Shampoo (facebookresearch/optimizers)


def merge_small_dims(shape, max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dimensions and merge adjacent ones from the end while their product is ≤ ``max_dim``.

    facebookresearch's ``merge_small_dims`` with a target dimensionality of 1; a 0-d or all-ones shape
    becomes ``(1,)``.

    Examples:
        >>> merge_small_dims((1, 2, 5, 1), 10), merge_small_dims((32, 3, 64, 64), 8192), merge_small_dims((8, 5), 1024)
        ((10,), (96, 4096), (40,))
    """
    dims = [d for d in reversed(tuple(shape)) if d != 1] or [1]
    merged = [dims[0]]
    for d in dims[1:]:
        if merged[-1] * d <= max_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


def block_slices(shape, max_dim: int) -> list[tuple[slice, ...]]:
    """The blocks of a tensor of ``shape`` cut into pieces of at most ``max_dim`` along every dimension.

    Row-major order of the blocks, as facebookresearch's ``multi_dim_split``.

    Examples:
        >>> block_slices((5, 2), 3)
        [(slice(0, 3, None), slice(0, 2, None)), (slice(3, 5, None), slice(0, 2, None))]
    """
    ranges = [[slice(start, min(start + max_dim, d)) for start in range(0, d, max_dim)] for d in shape]
    return list(product(*ranges))


class Block(NamedTuple):
    """One block of distributed Shampoo: its factors ``F_i``, inverse roots, and the last grafting scale."""

    factors: tuple[torch.Tensor, ...]
    roots: tuple[torch.Tensor, ...]
    scale: torch.Tensor


class DistributedShampooState(NamedTuple):
    """Steps taken, each parameter's merged shape and blocks, filtered gradients, grafting statistics."""

    step: int
    layout: dict[str, tuple[tuple[int, ...], list[tuple[slice, ...]]]]
    blocks: dict[str, tuple[Block, ...]]
    filtered: dict[str, torch.Tensor]
    grafting: dict[str, torch.Tensor]
    grafting_only: bool


def scale_by_distributed_shampoo(betas=(0.9, 1.0), beta3: float = -1.0, eps: float = 1e-12,
                                 max_preconditioner_dim: int = 1024, precondition_frequency: int = 1,
                                 start_preconditioning_step: int = -1, use_bias_correction: bool = True,
                                 grafting: str | None = None, grafting_eps: float = 1e-10,
                                 grafting_beta2: float | None = None, root_inverse: str = "eigh") -> Preconditioner:
    """facebookresearch's distributed Shampoo direction, block by block (OPTIMIZERS.md §5).

    At step ``t = 1, 2, …``, each parameter viewed in :func:`merge_small_dims`'s shape and cut into
    :func:`block_slices`, each block ``G_b`` of order ``k``:

    - ``F_i ← β₂ F_i + w G_b⁽ⁱ⁾G_b⁽ⁱ⁾ᵀ`` from 0 (``w = 1`` if ``β₂ = 1`` else ``1 − β₂``);
    - on steps ``t ≡ 0 (mod precondition_frequency)`` past ``start_preconditioning_step`` (and on it), the
      roots ``(F_i/(1 − β₂ᵗ))^{-1/(2k)}`` (:func:`eigh_inverse_root` with ``ε``, or coupled Newton of
      ``F_i/bc + εI``); they are zero before;
    - ``Ḡ = G̃/(1 − β₃β₁^{t−1})`` with ``G̃ ← β₁G̃ + (1−β₁)G`` (``β₃ = β₁`` by default: Adam's ``m̂``);
    - ``P_b = Ḡ_b ×_1 R_1 ⋯ ×_k R_k``; with grafting ``P_b ← (‖P_graft,b‖/(‖P_b‖ + 1e-16)) P_b``, where
      ``P_graft = Ḡ/(√(V/bc_g) + ε_g)`` (AdaGrad: ``V ← V + G²``; RMSprop: ``V ← β V + (1−β)G²``, no bias
      correction; Adam: the same with ``bc_g = 1 − βᵗ``; SGD: ``P_graft = Ḡ``). Before
      ``start_preconditioning_step`` with grafting the step is ``P_graft``.
    """
    beta1, beta2 = betas_pair(betas, sums=True)
    beta3 = beta1 if beta3 == -1 else require_number("beta3", beta3, strict=False, maximum=1.0, hint=" or -1")
    eps = require_number("eps", eps, strict=False)
    max_dim = require_integer("max_preconditioner_dim", max_preconditioner_dim)
    frequency = require_integer("precondition_frequency", precondition_frequency)
    if start_preconditioning_step == -1:
        start = frequency
    else:
        start = require_integer("start_preconditioning_step", start_preconditioning_step, hint=" or -1")
        if start < frequency:
            raise InvalidProblem(f"start_preconditioning_step must be -1 or at least precondition_frequency "
                                 f"({frequency}), got {start}")
    if grafting not in GRAFTINGS:
        raise InvalidProblem(f"unknown grafting {grafting!r}; choose one of None, 'adagrad', 'rmsprop', 'adam', 'sgd'")
    if root_inverse not in ROOT_INVERSES:
        raise InvalidProblem(f"unknown root_inverse {root_inverse!r}; choose one of {', '.join(ROOT_INVERSES)}")
    grafting_eps = require_number("grafting_eps", grafting_eps, strict=False)
    if grafting == "adagrad" and grafting_beta2 not in (None, 1.0):
        raise InvalidProblem(f"adagrad grafting sums its statistic (β₂ = 1), got grafting_beta2={grafting_beta2!r}")
    if grafting_beta2 is None:
        graft_beta = GRAFTING_BETA2.get(grafting, 1.0)
    else:
        graft_beta = require_number("grafting_beta2", grafting_beta2, maximum=1.0)

    def inverse_root(factor, order, t):
        bias = 1 - beta2 ** t if use_bias_correction and beta2 < 1 else 1.0
        wide = factor.double() / bias
        if root_inverse == "eigh":
            return eigh_inverse_root(wide, 2 * order, eps).to(factor.dtype)
        identity = torch.eye(wide.shape[0], dtype=wide.dtype, device=wide.device)
        return coupled_newton_inverse_root(wide + eps * identity, 2 * order).to(factor.dtype)

    def init(params):
        layout, blocks = {}, {}
        for name, p in params.items():
            merged = merge_small_dims(p.shape, max_dim)
            slices = block_slices(merged, max_dim)
            layout[name] = (merged, slices)
            blocks[name] = tuple(
                Block(*(tuple(torch.zeros(s.stop - s.start, s.stop - s.start, dtype=p.dtype, device=p.device)
                              for s in where) for _ in range(2)), torch.ones((), dtype=p.dtype, device=p.device))
                for where in slices)
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return DistributedShampooState(0, layout, blocks, zeros, dict(zeros), False)

    def grafting_direction(filtered, statistic, t):
        if grafting == "sgd":
            return filtered
        bias = 1 - graft_beta ** t if grafting == "adam" else 1.0
        return filtered / ((statistic / bias).sqrt() + grafting_eps)

    def apply(grads, state, params):
        t = state.step + 1
        refresh = (t % frequency == 0 and t > start) or t == start
        grafting_only = grafting is not None and t < start
        weight = 1.0 if beta2 == 1 else 1 - beta2
        blocks, filtered, statistics, direction = {}, {}, {}, {}
        for name, g in grads.items():
            merged, slices = state.layout[name]
            if grafting in ("adagrad", "rmsprop", "adam"):
                statistics[name] = (state.grafting[name] + g * g if graft_beta == 1
                                    else graft_beta * state.grafting[name] + (1 - graft_beta) * g * g)
            else:
                statistics[name] = state.grafting[name]
            if beta1 > 0:
                filtered[name] = beta1 * state.filtered[name] + (1 - beta1) * g
                bar = beta3 * state.filtered[name] + (1 - beta3) * g
                if use_bias_correction:
                    bar = bar / (1 - beta3 * beta1 ** (t - 1))
            else:
                filtered[name] = state.filtered[name]
                bar = g
            graft = grafting_direction(bar, statistics[name], t) if grafting is not None else None
            g_merged, bar_merged = g.reshape(merged), bar.reshape(merged)
            graft_merged = graft.reshape(merged) if graft is not None else None
            out = torch.empty(merged, dtype=g.dtype, device=g.device)
            new_blocks = []
            for block, where in zip(state.blocks[name], slices):
                factors = tuple(beta2 * f + weight * m for f, m in zip(block.factors, mode_products(g_merged[where])))
                roots = (tuple(inverse_root(f, len(factors), t) for f in factors) if refresh else block.roots)
                scale = block.scale
                if grafting_only:
                    out[where] = graft_merged[where]
                else:
                    shampoo_block = precondition_modes(bar_merged[where], roots)
                    if graft_merged is not None:
                        scale = (torch.linalg.vector_norm(graft_merged[where])
                                 / (torch.linalg.vector_norm(shampoo_block) + 1e-16))
                    out[where] = scale * shampoo_block
                new_blocks.append(Block(factors, roots, scale))
            blocks[name] = tuple(new_blocks)
            direction[name] = out.reshape(g.shape)
        return direction, DistributedShampooState(t, state.layout, blocks, filtered, statistics, grafting_only)

    def linear(state):
        def inverse(v):
            result = {}
            for name, g in v.items():
                if state.grafting_only:
                    result[name] = grafting_direction(g, state.grafting[name], state.step)
                    continue
                merged, slices = state.layout[name]
                g_merged = g.reshape(merged)
                out = torch.empty(merged, dtype=g.dtype, device=g.device)
                for block, where in zip(state.blocks[name], slices):
                    out[where] = block.scale * precondition_modes(g_merged[where], block.roots)
                result[name] = out.reshape(g.shape)
            return result

        return inverse

    return Preconditioner(init=init, apply=apply, linear=linear)


def distributed_shampoo(betas=(0.9, 1.0), beta3: float = -1.0, eps: float = 1e-12, weight_decay: float = 0.0,
                        max_preconditioner_dim: int = 1024, precondition_frequency: int = 1,
                        start_preconditioning_step: int = -1, use_bias_correction: bool = True,
                        grafting: str | None = None, grafting_eps: float = 1e-10, grafting_beta2: float | None = None,
                        root_inverse: str = "eigh") -> Method:
    """facebookresearch's ``DistributedShampoo`` (OPTIMIZERS.md §5) on one process, with decoupled weight decay.

    The direction of :func:`scale_by_distributed_shampoo`, then ``θ ← θ − η(Δ + λθ)``. Defaults are the
    reference's: ``betas = (0.9, 1.0)`` (AdaGrad-sum factors, filtered gradient with ``β₁ = 0.9``),
    ``β₃ = β₁``, ``ε = 1e-12``, ``max_preconditioner_dim = 1024``, ``precondition_frequency = 1`` (its
    README recommends about 100), ``start_preconditioning_step = precondition_frequency``, bias
    correction on, no grafting (the README recommends AdaGrad grafting with ``ε = 1e-10``), ``eigh`` roots.

    Args:
        betas: ``(β₁, β₂)``: ``β₁`` filters the gradient (0: none); ``β₂ = 1`` sums the factors.
        beta3: ``-1`` (``β₁``) or the weight of the current gradient in the filtered gradient (as Lion).
        eps: the absolute ``ε`` of the inverse roots.
        weight_decay: decoupled weight decay ``λ``.
        max_preconditioner_dim: the largest merged dimension and block size.
        precondition_frequency, start_preconditioning_step: when roots are recomputed (see above).
        use_bias_correction: divide factors by ``1 − β₂ᵗ`` and the filtered gradient by ``1 − β₃β₁^{t−1}``.
        grafting: ``None``, ``"adagrad"``, ``"rmsprop"``, ``"adam"`` or ``"sgd"``: the per-block norm of the step.
        grafting_eps, grafting_beta2: the grafting's ``ε`` and ``β₂`` (``None``: 1 for AdaGrad, 0.99 for
            RMSprop, 0.999 for Adam).
        root_inverse: ``"eigh"`` or ``"newton"`` (coupled Newton, tolerance 1e-6, at most 100 iterations).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("distributed_shampoo", model, lr=0.01)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> opt.preconditioner_state.layout["weight"][0], opt.preconditioner_state.blocks["weight"][0].roots[0].shape
        ((6,), torch.Size([6, 6]))
    """
    pre = scale_by_distributed_shampoo(betas, beta3, eps, max_preconditioner_dim, precondition_frequency,
                                       start_preconditioning_step, use_bias_correction, grafting, grafting_eps,
                                       grafting_beta2, root_inverse)
    return Method(pre, add_decayed_weights(weight_decay), preconditioner_update_interval=precondition_frequency,
                  momentum=betas_pair(betas, sums=True)[0], momentum_style="ema")


__all__ = ["asdl_inverse_root", "block_slices", "coupled_newton_inverse_root", "distributed_shampoo",
           "eigh_inverse_root", "merge_small_dims", "mode_products", "power_iteration", "precondition_modes",
           "scale_by_distributed_shampoo", "scale_by_shampoo", "shampoo"]
