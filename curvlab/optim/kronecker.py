"""KFAC (local and global), SKFAC, FOOF and EKFAC steps (OPTIMIZERS.md §1, §2, §3; George et al. 2018).

Every ``nn.Linear`` and ``nn.Conv2d`` layer that :class:`~curvlab.approx.kronecker_statistics.KroneckerLayers`
accepts gets a Kronecker-factored preconditioner on its weight ``W`` ``(d_out, d_in)`` (a Conv2d
kernel viewed as ``(c_out, c_in·kh·kw)``); the parameters of every other module (BatchNorm,
LayerNorm, embeddings, attention) keep their raw gradient, as ASDL's study ignores BN/LN layers.
The factors are those of :func:`curvlab.approx.kfac.kfac_factors` ("expand"), whose scales are
ASDL's (§0.3) for a mean cross-entropy loss:

    ``A = Σ_{n,t} a_nt a_ntᵀ / (N T)``  ``(d_in, d_in)``,   ``B = R Σ_{n,t} e_nt e_ntᵀ``  ``(d_out, d_out)``

(``T = 1`` for a Linear on ``(N, d_in)``, ``T = h_out·w_out`` for a Conv2d; ``R = 1/N`` for mean
cross-entropy; ``e`` the output gradients at labels sampled from the model for ``fisher_mc``, the
default, at the true labels for ``empirical_fisher``, or the output Hessian's square-root columns for
``ggn`` / ``fisher``). The KFAC step is

    ``ΔW = (B + λ_B I)⁻¹ G (A + λ_A I)⁻¹``,   ``Δb = (B + λ_B I)⁻¹ g_b``,

with π-damping ``π = √((tr A / d_in) / (tr B / d_out))``, ``λ_A = max(√λ π, 10⁻⁷)``,
``λ_B = max(√λ / π, 10⁻⁷)`` (``λ_A = λ_B = λ`` when ``π`` is 0, infinite or undefined) and Cholesky
inverses; a local ("expand", separate bias) factor of a batch with fewer rows ``n`` than features ``d``
is kept as its rows ``X`` (``F = XᵀX``) and inverted by Woodbury through ``n × n`` (:class:`FactorInverse`):
the same matrix at ``O(n d²)`` instead of ``O(d³)``. Between preconditioner updates the stale inverses
are applied to the current gradient.
"""

import math
from dataclasses import dataclass, field, replace

import torch

from curvlab.approx.kfac import CURVATURES, KFAC_APPROX, ekfac_eigenvalues, ekfac_one_pass, foof as foof_approximation
from curvlab.approx.kfac import kfac_factors, output_columns
from curvlab.approx.kronecker_statistics import KroneckerLayers
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.optim.adaptive import study_method
from curvlab.optim.base import Params, Preconditioner, Statistics, require_compat
from curvlab.optim.optimizer import Method
from curvlab.parallel import concat_over_ranks, gather_counts, spread, sum_over_ranks

#: ASDL's floor on the π-damped factor damping.
DAMPING_FLOOR = 1e-7
KFAC_CURVATURES = ("fisher_mc",) + tuple(c for c in CURVATURES if c != "fisher_mc")


@dataclass(frozen=True)
class Layer:
    """A Kronecker-factored module: its label, studied weight / bias names and weight matrix shape."""

    label: str
    weight: str | None
    bias: str | None
    shape: tuple[int, int]
    conv: bool


def kronecker_layers(statistics: Statistics) -> dict[str, Layer]:
    """The modules of the batch's problem that get Kronecker factors: label -> :class:`Layer`."""
    problem = statistics.problem
    modules = KroneckerLayers(problem).modules
    studied = dict(problem.module_blocks())
    layers = {}
    for label, module in modules.items():
        prefix = f"{label}." if label else ""
        names = studied[label]
        layers[label] = Layer(label, prefix + "weight" if prefix + "weight" in names else None,
                              prefix + "bias" if prefix + "bias" in names else None,
                              (module.weight.shape[0], module.weight[0].numel()),
                              isinstance(module, torch.nn.Conv2d))
    return layers


@dataclass(frozen=True)
class FactorInverse:
    """``(F + λI)⁻¹`` of a factor ``F`` ``(d, d)``: a dense inverse, or by Woodbury for ``F = XᵀX``, ``X`` ``(n, d)``, ``n < d``.

    Woodbury: ``(XᵀX + λI)⁻¹ M = (M − Xᵀ (X Xᵀ + λI)⁻¹ X M) / λ`` with a Cholesky factor of the ``n × n`` kernel.
    """

    matrix: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    kernel: torch.Tensor | None = None
    damping: float = 0.0

    def solve(self, M: torch.Tensor) -> torch.Tensor:
        """``(F + λI)⁻¹ M`` for ``M`` ``(d, k)``."""
        if self.matrix is not None:
            return self.matrix @ M
        X = self.rows
        return torch.addmm(M, X.T, torch.cholesky_solve(X @ M, self.kernel), alpha=-1).div_(self.damping)


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise InvalidProblem(f"the damped {what} is not positive definite (Cholesky failed); raise the damping")
    return factor


def cholesky_inverse(factor: torch.Tensor, damping: float) -> FactorInverse:
    """``(F + λI)⁻¹`` by Cholesky (ASDL's ``cholesky_inv``)."""
    damped = factor.clone()
    damped.diagonal().add_(damping)
    lower = _cholesky(damped, "Kronecker factor")
    return FactorInverse(matrix=torch.cholesky_inverse(lower, out=damped))  # the damped copy's memory holds it


def woodbury_inverse(rows: torch.Tensor, damping: float) -> FactorInverse:
    """``(XᵀX + λI)⁻¹`` for ``X`` ``(n, d)`` through the ``n × n`` kernel ``X Xᵀ + λI`` (SKFAC's ``smw_inv``)."""
    eye = torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
    return FactorInverse(rows=rows, kernel=_cholesky(rows @ rows.T + damping * eye, "Woodbury kernel"),
                         damping=damping)


def pi_damping(mean_eigenvalue_A: float | None, mean_eigenvalue_B: float, damping: float) -> tuple[float, float]:
    """Factored Tikhonov damping: ``π = √(m_A / m_B)``, ``(λ_A, λ_B) = (max(√λ π, 10⁻⁷), max(√λ / π, 10⁻⁷))``.

    ``m`` are the factors' mean eigenvalues (``tr F / d``); ``(λ, λ)`` when ``π`` is 0, infinite or
    undefined, or when there is no ``A`` (a layer whose weight is not studied).

    Examples:
        >>> pi_damping(4.0, 1.0, 1e-2)
        (0.2, 0.05)
    """
    if mean_eigenvalue_A is None or mean_eigenvalue_B == 0:
        return damping, damping
    pi = math.sqrt(mean_eigenvalue_A / mean_eigenvalue_B) if mean_eigenvalue_A >= 0 else math.nan
    if pi == 0 or not math.isfinite(pi):
        return damping, damping
    root = math.sqrt(damping)
    return max(root * pi, DAMPING_FLOOR), max(root / pi, DAMPING_FLOOR)


def _mean_eigenvalue(factor: torch.Tensor | None) -> float | None:
    return None if factor is None else float(torch.diagonal(factor).sum()) / factor.shape[0]


def ema_decay_of(ema_decay) -> float:
    """``ema_decay`` checked: ``-1`` (local curvature) or the weight ``β ∈ (0, 1]`` of the new statistic."""
    if ema_decay == -1:
        return -1.0
    value = require_number("ema_decay", ema_decay, hint=" (-1 for local curvature)")
    if value > 1:
        raise InvalidProblem(f"ema_decay must be -1 (local curvature) or in (0, 1], got {ema_decay!r}")
    return value


def _curvature(curvature: str) -> str:
    if curvature not in KFAC_CURVATURES:
        raise InvalidProblem(f"unknown curvature {curvature!r}; choose one of {', '.join(KFAC_CURVATURES)}")
    return curvature


def _kfac_approx(kfac_approx: str) -> str:
    if kfac_approx not in KFAC_APPROX:
        raise InvalidProblem(f"kfac_approx must be one of {', '.join(KFAC_APPROX)}, got {kfac_approx!r}")
    return kfac_approx


@dataclass(frozen=True)
class MovingAverage:
    """``m ← (1 − β) m + β x`` from ``m = 0``, counting the updates; ``β = -1`` keeps the latest ``x``.

    ``value(debias=True)`` is ``m / (1 − (1 − β)^k)`` after ``k`` updates: the weighted mean
    ``Σ_j β(1 − β)^{k−j} x_j / Σ_j β(1 − β)^{k−j}``; ``value(debias=False)`` is ASDL's zero-initialised ``m``.
    """

    decay: float
    total: dict = field(default_factory=dict)
    count: int = 0

    def update(self, new: dict) -> "MovingAverage":
        if self.decay == -1:
            return replace(self, total=dict(new), count=1)
        beta = self.decay
        total = {key: _scaled(value, beta) if key not in self.total else _mix(self.total[key], value, beta)
                 for key, value in new.items()}
        return replace(self, total=total, count=self.count + 1)

    def value(self, debias: bool = True) -> dict:
        if self.decay == -1 or not debias:
            return self.total
        scale = 1 / (1 - (1 - self.decay) ** self.count)
        return {key: _scaled(value, scale) for key, value in self.total.items()}


def _scaled(value, scale):
    if isinstance(value, tuple):
        return tuple(None if v is None else v * scale for v in value)
    return value * scale


def _mix(old, new, beta):
    if isinstance(old, tuple):
        return tuple(None if o is None else (1 - beta) * o + beta * n for o, n in zip(old, new))
    return (1 - beta) * old + beta * new


@dataclass(frozen=True)
class KroneckerState:
    """The state of a Kronecker-factored preconditioner.

    Attributes:
        layers: label -> :class:`Layer` (filled on the first curvature update).
        factors: the moving average of the per-layer statistics (``(A, B)``, or data matrices for SKFAC).
        inverses: label -> ``(A⁻¹, B⁻¹)`` as :class:`FactorInverse` (``None`` for a missing side).
        extra: method-specific entries (EKFAC's eigenbases and eigenvalues).
        spread_over: the process group over whose ranks the layers' inversions are spread, or ``None``.
    """

    layers: dict
    factors: MovingAverage
    inverses: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    spread_over: object = None


def _weight_matrix(layer: Layer, grads: Params, joint: bool) -> torch.Tensor:
    G = grads[layer.weight].reshape(layer.shape)
    return torch.cat([G, grads[layer.bias].unsqueeze(1)], dim=1) if joint else G


def _split(layer: Layer, direction: Params, grads: Params, matrix: torch.Tensor, joint: bool) -> None:
    if joint:
        direction[layer.weight] = matrix[:, :-1].reshape(grads[layer.weight].shape)
        direction[layer.bias] = matrix[:, -1].reshape(grads[layer.bias].shape)
    else:
        direction[layer.weight] = matrix.reshape(grads[layer.weight].shape)


def kronecker_direction(grads: Params, layers: dict, inverses: dict, *, joint_bias: bool = False,
                        precondition_bias: bool = True) -> Params:
    """``ΔW = B̃⁻¹ G Ã⁻¹``, ``Δb = B̃⁻¹ g_b`` per layer (``Δb = g_b`` unless ``precondition_bias``; no ``B̃``: ``I``).

    With ``joint_bias`` a layer with both parameters gets ``[ΔW Δb] = B̃⁻¹ [G g_b] Ã⁻¹``; every other
    parameter keeps its gradient.
    """
    direction = dict(grads)
    for label, (A_inv, B_inv) in inverses.items():
        layer = layers[label]
        joint = joint_bias and layer.weight is not None and layer.bias is not None
        left = B_inv.solve if B_inv is not None else (lambda M: M)
        if layer.weight is not None:
            matrix = _weight_matrix(layer, grads, joint)
            _split(layer, direction, grads, left(A_inv.solve(matrix.T).T), joint)
        if layer.bias is not None and not joint and precondition_bias:
            direction[layer.bias] = left(grads[layer.bias].reshape(-1, 1)).reshape(grads[layer.bias].shape)
    return direction


def _kronecker_preconditioner(statistics_of, inverses_of, *, decay: float, debias: bool, joint_bias: bool = False,
                              precondition_bias: bool = True) -> Preconditioner:
    """The shared skeleton: ``statistics_of(statistics, layers) -> dict`` folded into a moving average.

    ``inverses_of(factors, layers)`` turns the (debiased) average into per-layer :class:`FactorInverse` pairs,
    layer by layer (so that :func:`curvlab.parallel.spread` can share the layers out over ranks).
    """

    def init(params):
        return KroneckerState(layers={}, factors=MovingAverage(decay))

    def accumulate(state, statistics):
        layers = state.layers or kronecker_layers(statistics)
        spread_over = statistics.problem.process_group if statistics.spread_inversions else None
        return replace(state, layers=layers, factors=state.factors.update(statistics_of(statistics, layers)),
                       spread_over=spread_over)

    def refresh(state):
        if not state.factors.total:
            return state
        inverses = spread(lambda factors: inverses_of(factors, state.layers), state.factors.value(debias),
                          state.spread_over)
        if decay == -1:  # local curvature: the factors are spent once inverted (a refresh without new ones keeps these inverses)
            return replace(state, factors=replace(state.factors, total={}), inverses=inverses)
        return replace(state, inverses=inverses)

    def release(state):
        return replace(state, inverses={})

    def linear(state):
        if state.layers and not state.inverses:
            raise InvalidProblem("the Kronecker factors have no inverses: their last inversion failed; take a step "
                                 "that refreshes the preconditioner (or raise the damping) before applying it")
        return lambda v: kronecker_direction(v, state.layers, state.inverses, joint_bias=joint_bias,
                                             precondition_bias=precondition_bias)

    def apply(grads, state, params):
        return linear(state)(grads), state

    return Preconditioner(init=init, apply=apply, accumulate=accumulate, refresh=refresh, linear=linear,
                          release=release)


def kfac_preconditioner(damping: float = 1e-3, ema_decay: float = -1, curvature: str = "fisher_mc",
                        mc_samples: int = 1, kfac_approx: str = "expand", joint_bias: bool = False,
                        compat: str | None = None) -> Preconditioner:
    """KFAC's ``g ↦ Δ`` (see :func:`kfac` for the arguments)."""
    damping = require_number("damping", damping)
    decay, curvature, compat = ema_decay_of(ema_decay), _curvature(curvature), require_compat(compat)
    mc_samples, kfac_approx = require_integer("mc_samples", mc_samples), _kfac_approx(kfac_approx)

    # Local factors of a batch with fewer rows than features are kept as their rows (SKFAC's representation,
    # KFAC's factor exactly) and inverted by Woodbury: O(n d²) instead of the square factor's O(n d²) + O(d³).
    rows = decay == -1 and kfac_approx == "expand" and not joint_bias
    mean_eigenvalue, inverse = (_swift_mean_eigenvalue, _swift_inverse) if rows else (_mean_eigenvalue, cholesky_inverse)

    def statistics_of(statistics, layers):
        if rows:
            return swift_rows(statistics, layers, curvature, mc_samples, sum_conv_positions=False)
        return kfac_factors(statistics.problem, curvature, kfac_approx=kfac_approx, joint_bias=joint_bias,
                            mc_samples=mc_samples, seed=statistics.seed_for())

    def inverses_of(factors, layers):
        inverses = {}
        for label, (A, B) in factors.items():
            lambda_A, lambda_B = pi_damping(mean_eigenvalue(A), mean_eigenvalue(B), damping)
            inverses[label] = (None if A is None else inverse(A, lambda_A), inverse(B, lambda_B))
        return inverses

    return _kronecker_preconditioner(statistics_of, inverses_of, decay=decay, debias=compat is None,
                                     joint_bias=joint_bias)


def kfac(damping: float = 1e-3, ema_decay: float = -1, curvature: str = "fisher_mc", mc_samples: int = 1,
         kfac_approx: str = "expand", joint_bias: bool = False, compat: str | None = None,
         curvature_update_interval: int = 1, preconditioner_update_interval: int = 1, momentum: float = 0.9,
         weight_decay: float = 0.0) -> Method:
    """KFAC (ASDL ``KfacGradientMaker``): ``ΔW = (B + λ_B I)⁻¹ G (A + λ_A I)⁻¹``, ``Δb = (B + λ_B I)⁻¹ g_b``.

    The factors and π-damping are the module docstring's; the step is then fed to torch SGD's rule
    (momentum 0.9, L2 weight decay), as in the study.

    Args:
        damping: ``λ`` (the study's kfac.json; ASDL's own default is 1e-7).
        ema_decay: ``-1`` (ASDL's default, "local" KFAC): the factors of the latest curvature batch;
            ``β ∈ (0, 1]`` ("global" KFAC): ``A ← (1 − β) A + β A_new`` (and ``B``) from zero, and the
            inverses use the bias-corrected ``A / (1 − (1 − β)^k)`` after ``k`` updates, the weighted
            mean of the batches' factors; ``compat="asdl"`` uses the zero-initialised average
            uncorrected (ASDL: the first factors are ``β A_0``, ``β B_0``; OPTIMIZERS.md §17.5).
        curvature: ``"fisher_mc"`` (ASDL's default), ``"ggn"`` / ``"fisher"`` (exact Fisher) or ``"empirical_fisher"``.
        mc_samples: labels drawn per example for ``"fisher_mc"``, fixed by the optimizer's seed and the step.
        kfac_approx: ``"expand"`` (ASDL's convention) or ``"reduce"`` for convolutions and sequences.
        joint_bias: precondition ``[W b]`` by ``B̃⁻¹ [G g_b] Ã⁻¹`` with the homogeneous input ``[a; 1]``
            instead of ASDL's ``Δb = B̃⁻¹ g_b``.
        compat: ``None`` or ``"asdl"`` (only the EMA initialisation differs).
        curvature_update_interval, preconditioner_update_interval: the study uses one value, 1 to 100.
        momentum, weight_decay: torch SGD's, applied to ``Δ``.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> opt = curvlab.optim.make("kfac", model, lr=0.1, damping=1e-2)
        >>> loss = opt.step((torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> sorted(opt.last_direction)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    return study_method(kfac_preconditioner(damping, ema_decay, curvature, mc_samples, kfac_approx, joint_bias,
                                             compat),
                         momentum, weight_decay, curvature_update_interval, preconditioner_update_interval)


def swift_rows(statistics: Statistics, layers: dict, curvature: str, mc_samples: int,
               sum_conv_positions: bool = True) -> dict:
    """SKFAC's factor representations: label -> ``(A, B)``, each ``("rows", X)`` with ``F = XᵀX`` or ``("square", F)``.

    A factor keeps its data matrix ``X`` ``(n, d)`` when it has fewer rows than columns: for a
    Linear ``X_A`` are the inputs ``a_nt / √(N T)`` and ``X_B`` the output gradients ``e_nkt · √w``
    (``w`` = ``R`` or ``R/S``), so that ``XᵀX`` is KFAC's factor; for a Conv2d the rows are summed
    over positions, ``X_A[n] = Σ_t a_nt / √N`` and ``X_B[n, k] = √w Σ_t e_nkt`` (SKFAC's dimension
    reduction, as ASDL), or with ``sum_conv_positions=False`` kept per position as for a Linear (KFAC's
    factor exactly). Otherwise the factor is KFAC's square ``XᵀX`` from all ``(n, t)`` rows.
    """
    problem = statistics.problem
    taps = KroneckerLayers(problem)
    columns = output_columns(problem, curvature, mc_samples, statistics.seed_for())
    inputs_of = {label for label, layer in layers.items() if layer.weight is not None}
    factors = {label: (_RowsOrSquare(), _RowsOrSquare()) for label in layers}
    N = problem.num_examples
    summing = {label: layer.conv and sum_conv_positions for label, layer in layers.items()}
    for inputs, gradients in taps.statistics(inputs_of, columns):
        for label, a in inputs.items():
            summed = a.sum(1) / math.sqrt(N) if summing[label] else None
            factors[label][0].add(a.reshape(-1, a.shape[-1]) / math.sqrt(N * a.shape[1]), summed)
        for e, weight in gradients:
            for label, g in e.items():
                summed = g.sum(2).reshape(-1, g.shape[-1]) * math.sqrt(weight) if summing[label] else None
                factors[label][1].add(g.reshape(-1, g.shape[-1]) * math.sqrt(weight), summed)
    return {label: (A.represent(problem.process_group), B.represent(problem.process_group))
            for label, (A, B) in factors.items()}


class _RowsOrSquare:
    """One factor of :func:`swift_rows`, fed a chunk of rows at a time.

    Its representation rows (the rows themselves, or a Conv2d's position sums) are kept while they are
    fewer than the ``d`` columns; from then on the chunks are folded into the square ``XᵀX`` at once,
    so that a factor holds at most ``O(d²)`` whatever the batch.
    """

    def __init__(self):
        self.full, self.rows, self.count, self.square = [], [], 0, None

    def add(self, full: torch.Tensor, rows: torch.Tensor | None = None):
        """Add rows ``full`` ``(m, d)`` whose representation rows are ``rows`` (``full`` itself when ``None``)."""
        self.full.append(full)
        if rows is not None:
            self.rows.append(rows)
        self.count += full.shape[0] if rows is None else rows.shape[0]
        if self.count >= full.shape[1]:
            self._fold()

    def _fold(self):
        if self.full:
            X = torch.cat(self.full)
            self.square = X.T @ X if self.square is None else self.square.addmm_(X.T, X)
        self.full, self.rows = [], []

    def represent(self, group):
        """``("rows", X)`` when all ranks' representation rows are fewer than ``d``, else ``("square", XᵀX)``."""
        if self.square is None and not self.full:
            return None
        d = (self.full or [self.square])[0].shape[-1]
        if sum(gather_counts(self.count, group)) < d:
            return "rows", concat_over_ranks(torch.cat(self.rows or self.full), group)
        self._fold()
        return "square", sum_over_ranks(self.square, group)


def _swift_inverse(factor, damping):
    kind, value = factor
    return woodbury_inverse(value, damping) if kind == "rows" else cholesky_inverse(value, damping)


def _swift_mean_eigenvalue(factor):
    if factor is None:
        return None
    kind, value = factor
    return float(value.square().sum()) / value.shape[1] if kind == "rows" else _mean_eigenvalue(value)


def skfac(damping: float = 1e-3, ema_decay: float = -1, curvature: str = "fisher_mc", mc_samples: int = 1,
          curvature_update_interval: int = 1, preconditioner_update_interval: int = 1, momentum: float = 0.9,
          weight_decay: float = 0.0) -> Method:
    """SKFAC (ASDL ``KfacGradientMaker(swift=True)``): KFAC's step with a factor kept as its data matrix when ``n < d``.

    A factor with ``n`` rows and ``d < n`` columns is KFAC's square factor, inverted by Cholesky; one
    with ``n < d`` is ``XᵀX`` (:func:`swift_rows`) and ``(XᵀX + λI)⁻¹ = (I − Xᵀ(XXᵀ + λI)⁻¹X)/λ``
    costs an ``n × n`` solve. π-damping uses ``‖X‖_F² / d`` as the mean eigenvalue. For a Linear
    layer this is KFAC exactly (with the factors of every loss, sequence inputs included; ASDL's
    ``B`` differs from it by ``T`` there); for a Conv2d the spatially summed rows make it differ
    from KFAC (OPTIMIZERS.md §2, §17.6).

    Args:
        damping: ``λ``, π-damped as in :func:`kfac`.
        ema_decay: only ``-1`` (local curvature): ASDL's moving average of data matrices is ill-defined.
        curvature, mc_samples: as in :func:`kfac`.
        curvature_update_interval, preconditioner_update_interval, momentum, weight_decay: as in :func:`kfac`.
    """
    damping = require_number("damping", damping)
    if ema_decay != -1:
        raise InvalidProblem("skfac keeps rectangular data matrices that have no moving average: it supports only "
                             "ema_decay=-1 (local curvature); use kfac for global curvature")
    curvature, mc_samples = _curvature(curvature), require_integer("mc_samples", mc_samples)
    def statistics_of(statistics, layers):
        return swift_rows(statistics, layers, curvature, mc_samples)

    def inverses_of(factors, layers):
        inverses = {}
        for label, (A, B) in factors.items():
            lambda_A, lambda_B = pi_damping(_swift_mean_eigenvalue(A), _swift_mean_eigenvalue(B), damping)
            inverses[label] = (None if A is None else _swift_inverse(A, lambda_A), _swift_inverse(B, lambda_B))
        return inverses

    return study_method(_kronecker_preconditioner(statistics_of, inverses_of, decay=-1.0, debias=True),
                         momentum, weight_decay, curvature_update_interval, preconditioner_update_interval)


def input_factors(statistics: Statistics, layers: dict, kfac_approx: str = "expand") -> dict:
    """FOOF's factors from one forward pass: label -> ``(A, None)`` for the layers with a studied weight.

    ``A`` is KFAC's (:func:`curvlab.approx.kfac.foof` on the Kronecker layers' weights).
    """
    names = [layer.weight for layer in layers.values() if layer.weight is not None]
    if not names:
        return {}
    approximation = foof_approximation(statistics.problem.restrict(names), kfac_approx=kfac_approx)
    by_weight = {layer.weight: label for label, layer in layers.items()}
    return {by_weight[name]: (block.factors[1], None) for name, _, block in approximation.blocks}


def foof(damping: float = 1e-3, ema_decay: float = -1, kfac_approx: str = "expand", compat: str | None = None,
         curvature_update_interval: int = 1, preconditioner_update_interval: int = 1, momentum: float = 0.9,
         weight_decay: float = 0.0) -> Method:
    """FOOF (Benzing 2022; Ishikawa's ASDL fork): ``ΔW = G (A + λI)⁻¹``, ``Δb = g_b``.

    Only KFAC's input factor ``A`` (forward passes only), plain damping ``λ`` (no π-damping),
    Cholesky inverse; the bias keeps its gradient. Local and global modes as in :func:`kfac`.

    Args:
        damping: ``λ`` added to ``A``'s diagonal.
        ema_decay, compat: as in :func:`kfac` (``compat="asdl"``: zero-initialised, uncorrected moving average).
        kfac_approx: as in :func:`kfac`.
        curvature_update_interval, preconditioner_update_interval, momentum, weight_decay: as in :func:`kfac`.
    """
    damping = require_number("damping", damping)
    decay, compat, kfac_approx = ema_decay_of(ema_decay), require_compat(compat), _kfac_approx(kfac_approx)
    def statistics_of(statistics, layers):
        return input_factors(statistics, layers, kfac_approx)

    def inverses_of(factors, layers):
        return {label: (cholesky_inverse(A, damping), None) for label, (A, _) in factors.items()}

    return study_method(_kronecker_preconditioner(statistics_of, inverses_of, decay=decay, debias=compat is None,
                                                   precondition_bias=False),
                         momentum, weight_decay, curvature_update_interval, preconditioner_update_interval)


def _eigenbases(factors: dict) -> dict:
    return {label: (torch.linalg.eigh(B)[1], None if A is None else torch.linalg.eigh(A)[1])
            for label, (A, B) in factors.items()}


#: Rows of ``Q_Bᵀ G Q_A`` divided by their damped eigenvalues at once in :func:`eigenbasis_direction`.
_ROW_BLOCK = 256


def eigenbasis_direction(grads: Params, layers: dict, bases: dict, eigenvalues: dict, damping: float) -> Params:
    """``Δ = (Q_B ⊗ Q_A) (S + λ)⁻¹ (Q_B ⊗ Q_A)ᵀ g`` per layer.

    ``ΔW = Q_B [(Q_Bᵀ G Q_A) / (S + λ)] Q_Aᵀ`` and ``Δb = Q_B [(Q_Bᵀ g_b) / (s + λ)]``; other parameters keep ``g``.
    Thin bases (``Q`` ``(d, r)``, ``r < d``: ``S`` is 0 off their span) give
    ``ΔW = G/λ − Q_B [(Q_Bᵀ G Q_A) ⊙ S / (λ (S + λ))] Q_Aᵀ``, ``O(d² r)``. Square bases use two
    ``(d_out, d_in)`` temporaries a layer: the products alternate between them and the division runs in
    blocks of rows, so that ``S + λ`` is never formed whole.
    """
    direction = dict(grads)
    for label, (Q_B, Q_A) in bases.items():
        layer = layers[label]
        if layer.weight is not None:
            G = grads[layer.weight].reshape(layer.shape)
            S = eigenvalues[label, "weight"]
            if Q_B.shape[1] < Q_B.shape[0] or Q_A.shape[1] < Q_A.shape[0]:
                core = (Q_B.T @ G @ Q_A).mul_(S).div_(S.add(damping).mul_(-damping))
                step = torch.addmm(G, Q_B @ core, Q_A.T, beta=1 / damping)
            else:
                step = Q_B.T @ G
                rotated = step @ Q_A
                for rows, scale in zip(rotated.split(_ROW_BLOCK), S.split(_ROW_BLOCK)):
                    rows.div_(scale + damping)
                torch.mm(Q_B, rotated, out=step)
                step = torch.mm(step, Q_A.T, out=rotated)
            direction[layer.weight] = step.reshape(grads[layer.weight].shape)
        if layer.bias is not None:
            g, s = grads[layer.bias], eigenvalues[label, "bias"]
            if Q_B.shape[1] < Q_B.shape[0]:
                direction[layer.bias] = g / damping - Q_B @ ((Q_B.T @ g) * s / (damping * (s + damping)))
            else:
                direction[layer.bias] = (Q_B @ ((Q_B.T @ g) / (s + damping))).reshape(g.shape)
    return direction


def ekfac(damping: float = 1e-3, ema_decay: float = -1, curvature: str = "fisher_mc", mc_samples: int = 1,
          curvature_update_interval: int = 1, preconditioner_update_interval: int = 1, momentum: float = 0.9,
          weight_decay: float = 0.0) -> Method:
    """EKFAC (George et al. 2018): ``Δ = (Q_B ⊗ Q_A)(S + λ)⁻¹(Q_B ⊗ Q_A)ᵀ g`` per Linear / Conv2d layer.

    ``Q_A``, ``Q_B`` are the eigenvectors of KFAC's factors and ``S = R Σ_n (Q_Bᵀ G_n Q_A)²`` the
    curvature's diagonal in that basis (:func:`curvlab.approx.kfac.ekfac_eigenvalues`); the bias
    gets ``Q_B`` and its own ``s``; plain damping ``λ`` is added to the eigenvalues. Local mode
    (``ema_decay=-1``): the basis and ``S`` of the latest curvature batch, i.e.
    :func:`curvlab.approx.kfac.ekfac` on it, in one pass (:func:`~curvlab.approx.kfac.ekfac_one_pass`:
    when a batch has fewer rows than features, thin bases from SVDs of the layers' rows, ``S`` being 0
    off their span: :func:`eigenbasis_direction`). Global mode (``β``): bias-corrected moving averages of
    the factors (the basis is recomputed from them on preconditioner updates) and of ``S``, each
    batch's ``S`` measured in the current basis (as the paper's algorithm).

    Args:
        damping: ``λ`` added to ``S``.
        ema_decay, curvature, mc_samples: as in :func:`kfac`.
        curvature_update_interval, preconditioner_update_interval, momentum, weight_decay: as in :func:`kfac`.
    """
    damping = require_number("damping", damping)
    decay, curvature = ema_decay_of(ema_decay), _curvature(curvature)
    mc_samples = require_integer("mc_samples", mc_samples)

    def init(params):
        return KroneckerState(layers={}, factors=MovingAverage(decay), extra={"S": MovingAverage(decay)})

    def accumulate(state, statistics):
        layers = state.layers or kronecker_layers(statistics)
        seed = statistics.seed_for()
        if decay == -1:
            bases, S = ekfac_one_pass(statistics.problem, curvature, mc_samples=mc_samples, seed=seed, thin=True)
            return replace(state, layers=layers, extra={"S": state.extra["S"].update(S), "bases": bases})
        batch = kfac_factors(statistics.problem, curvature, mc_samples=mc_samples, seed=seed)
        factors = state.factors.update(batch)
        bases = state.extra.get("bases") or _eigenbases(factors.value())
        S = ekfac_eigenvalues(statistics.problem, bases, curvature, mc_samples=mc_samples, seed=seed)
        return replace(state, layers=layers, factors=factors,
                       extra={"S": state.extra["S"].update(S), "bases": bases})

    def refresh(state):
        if state.factors.count == 0 or decay == -1:
            return state
        return replace(state, extra={**state.extra, "bases": _eigenbases(state.factors.value())})

    def release(state):  # local mode: the statistics bring new bases (global mode measures S in the old ones)
        return replace(state, extra={"S": state.extra["S"]}) if decay == -1 else state

    def linear(state):
        if "bases" not in state.extra:
            if state.layers:
                raise InvalidProblem("EKFAC has no eigenbases: its last curvature step failed; take one before "
                                     "applying it")
            return dict
        return lambda v: eigenbasis_direction(v, state.layers, state.extra["bases"], state.extra["S"].value(),
                                              damping)

    def apply(grads, state, params):
        return linear(state)(grads), state

    return study_method(Preconditioner(init=init, apply=apply, accumulate=accumulate, refresh=refresh, linear=linear,
                                       release=release),
                         momentum, weight_decay, curvature_update_interval, preconditioner_update_interval)
