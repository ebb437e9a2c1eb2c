"""Newton, saddle-free Newton and the exact natural gradient: ``Δ = (C + λI)⁻¹ ḡ`` with ``C`` exact (OPTIMIZERS.md §10, §16).

``C`` ``(P, P)`` is the exact curvature of the batch (:func:`curvlab.curvature`): the Hessian
``H`` (Newton), ``|H| = V|Λ|Vᵀ`` (saddle-free Newton, damping added after the absolute value), the
GGN = exact Fisher, the Monte-Carlo Fisher or the empirical Fisher (natural gradient). The damped
system is solved by :class:`DampedInverse`:

- ``|H|``: from the eigenpairs of ``H``, ``(|H| + λI)⁻¹ v = V (|Λ| + λ)⁻¹ Vᵀ v`` (with the top-k
  eigenpairs beyond the memory budget: ``v/λ + V_k((|Λ_k| + λ)⁻¹ − λ⁻¹)V_kᵀ v``, exact for the
  rank-k ``|H|`` that :class:`curvlab.operators.AbsHessian` then represents);
- within the memory budget: the dense ``C + λI``, factorised by Cholesky, or by LU where it is not
  positive definite (Newton with an indefinite ``H + λI``: the step is still ``(H + λI)⁻¹ ḡ``, as
  ASDL's ``torch.linalg.solve`` computes it, and may point uphill);
- beyond it: matrix-free conjugate gradients on ``(C + λI)``; when CG meets a direction of
  non-positive curvature (``H + λI`` indefinite) it switches to MINRES (scipy), which solves
  symmetric indefinite systems. A solve that does not reach its tolerance warns (``RuntimeWarning``)
  and says by how much it missed.

Between curvature updates the stale ``(C + λI)⁻¹`` of the last update is applied to the current
gradient (ASDL's schedule): ``C`` is fixed at the ``θ`` and batch of its update (a dense matrix,
eigenpairs, or products on a copy of the model at that ``θ``).
"""

import copy
import math
import warnings

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh, minres

from curvlab.errors import DenseTooLarge, InvalidProblem, require_integer, require_number
from curvlab.memory import check_dense
from curvlab.operators import AbsHessian, CurvatureOperator, DenseMatrix, curvature
from curvlab.optim.adaptive import study_method
from curvlab.optim.base import Preconditioner
from curvlab.optim.optimizer import Method
from curvlab.problem import Problem

NEWTON_CURVATURES = ("hessian", "abs_hessian")
NATURAL_GRADIENT_CURVATURES = ("ggn", "fisher", "fisher_mc", "empirical_fisher")
#: MINRES runs, each from the last solution with a 100× smaller tolerance, before a solve is reported unconverged.
MINRES_RESTARTS = 3
#: Kinds that are positive semi-definite by construction, so that ``C + λI`` is positive definite for ``λ > 0``.
SEMIDEFINITE = ("abs_hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher", "gradient_second_moment")


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative residual an iterative damped solve aims at: ``√ε`` of ``dtype`` (1.5e-8 in float64)."""
    return math.sqrt(torch.finfo(dtype).eps)


class DampedInverse:
    """``(C + λI)⁻¹`` of a curvature operator ``C`` ``(P, P)``, prepared once and applied to any right-hand side.

    Args:
        op: the curvature operator (``curvlab.curvature(...)`` or a :class:`~curvlab.operators.DenseMatrix`).
        damping: ``λ > 0``.
        budget: bytes a dense ``(P, P)`` matrix may take (default: :mod:`curvlab.memory`'s budget).
        tol: relative residual ``‖(C + λI)x − b‖ ≤ tol ‖b‖`` of the matrix-free solves (default
            :func:`default_tolerance`).
        max_iterations: iterations of CG / MINRES per solve (default ``min(2P, 2000)``).
        progress: show a bar while a dense matrix is built.

    Attributes:
        method: ``"eigh"`` / the top-k eigenpairs (``|H|``), ``"cholesky"``, ``"lu"`` (dense, not positive
            definite) or ``"cg"`` (matrix-free; ``"minres"`` after CG met negative curvature).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.optim.exact import DampedInverse
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> G = curvlab.curvature(prob, "ggn")
        >>> g = prob.gradient()
        >>> x = DampedInverse(G, 1e-2).solve(g)
        >>> bool(torch.allclose(G @ x + 1e-2 * x, g))
        True
    """

    def __init__(self, op: CurvatureOperator, damping: float, *, budget: int | None = None, tol: float | None = None,
                 max_iterations: int | None = None, progress: bool = False):
        if not isinstance(op, CurvatureOperator):
            raise InvalidProblem(f"a damped solve needs a curvature operator (curvlab.curvature), got {type(op).__name__}")
        self.op = op
        self.problem = op.problem
        self.damping = require_number("damping", damping)
        P = op.shape[0]
        self.tol = default_tolerance(op.dtype) if tol is None else require_number("tol", tol)
        self.max_iterations = (min(2 * P, 2000) if max_iterations is None
                               else require_integer("max_iterations", max_iterations))
        self._eigen = self._factor = None
        self._positive_definite = True if op.kind in SEMIDEFINITE else None
        if isinstance(op, AbsHessian):
            values, vectors = op.eigen(progress)
            self._eigen = (values.abs(), vectors)
            self.method = op.method
            return
        try:
            check_dense(P, P, op.dtype, op.device, f"{op.kind} matrix", budget)
        except DenseTooLarge:
            self.method = "cg"
            return
        matrix = op.to_dense(budget, progress)
        damped = (matrix + matrix.T) / 2 + self.damping * torch.eye(P, dtype=op.dtype, device=op.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            self.method, self._factor, self._positive_definite = "cholesky", factor, True
        else:
            self.method, self._factor, self._positive_definite = "lu", torch.linalg.lu_factor(damped), False

    def positive_definite(self) -> bool:
        """Whether ``C + λI`` is positive definite (matrix-free Hessian: from ``λ_min(H)`` by Lanczos, once)."""
        if self._positive_definite is None:
            smallest = eigsh(self.op.to_scipy(), k=1, which="SA", tol=self.tol,
                             v0=np.random.default_rng(0).standard_normal(self.op.shape[0]),
                             return_eigenvectors=False)[0]
            self._positive_definite = bool(smallest + self.damping > 0)
        return self._positive_definite

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(C + λI)⁻¹ b`` for ``b`` of shape ``(P,)`` or ``(P, K)``; same shape back."""
        rhs = torch.as_tensor(rhs).to(device=self.op.device, dtype=self.op.dtype)
        if rhs.ndim not in (1, 2) or rhs.shape[0] != self.op.shape[0]:
            raise InvalidProblem(f"cannot solve a {self.op.shape} system for a right-hand side of shape {tuple(rhs.shape)}")
        columns = rhs if rhs.ndim == 2 else rhs[:, None]
        if self._eigen is not None:
            values, vectors = self._eigen
            projected = vectors.T @ columns
            solution = columns / self.damping + vectors @ (projected * (1 / (values + self.damping)
                                                                       - 1 / self.damping)[:, None])
        elif self.method == "cholesky":
            solution = torch.cholesky_solve(columns, self._factor)
        elif self.method == "lu":
            solution = torch.linalg.lu_solve(*self._factor, columns)
        else:
            solution = self._iterative(columns)
        return solution if rhs.ndim == 2 else solution[:, 0]

    def _damped_product(self, columns: torch.Tensor) -> torch.Tensor:
        return self.op @ columns + self.damping * columns

    def _iterative(self, B: torch.Tensor) -> torch.Tensor:
        """Conjugate gradients on each column of ``B`` ``(P, K)`` together; MINRES once negative curvature appears."""
        if self.method == "cg":
            X, negative = self._conjugate_gradients(B)
            if not negative:
                self._check(B, X, "conjugate gradients")
                return X
            self.method, self._positive_definite = "minres", False
        return self._minres(B)

    def _conjugate_gradients(self, B: torch.Tensor) -> tuple[torch.Tensor, bool]:
        X = torch.zeros_like(B)
        R, D = B.clone(), B.clone()
        rr = R.square().sum(0)
        norms = rr.sqrt()
        for _ in range(self.max_iterations):
            if bool((rr.sqrt() <= self.tol / 2 * norms).all()):
                break
            Q = self._damped_product(D)
            curvature_ = (D * Q).sum(0)
            active = rr.sqrt() > self.tol / 2 * norms
            if bool((curvature_[active] <= 0).any()):
                return X, True
            alpha = torch.where(active, rr / torch.where(active, curvature_, 1.0), 0.0)
            X = X + alpha * D
            R = R - alpha * Q
            updated = R.square().sum(0)
            D = R + torch.where(active, updated / torch.where(rr > 0, rr, 1.0), 0.0) * D
            rr = updated
        return X, False

    def _minres(self, B: torch.Tensor) -> torch.Tensor:
        P = self.op.shape[0]
        scipy_op = self.op.to_scipy()
        damped = LinearOperator((P, P), matvec=lambda v: scipy_op @ v + self.damping * v, dtype=np.float64)
        columns = []
        for b in B.T.detach().to("cpu", torch.float64).numpy():
            # scipy's MINRES stops at ‖r‖ ≤ rtol (‖A‖‖x‖ + ‖b‖), looser than ‖r‖ ≤ tol ‖b‖: restart tighter
            x, rtol = None, self.tol
            for _ in range(MINRES_RESTARTS):
                x, _ = minres(damped, b, x0=x, rtol=rtol, maxiter=self.max_iterations)
                if np.linalg.norm(damped @ x - b) <= self.tol * np.linalg.norm(b):
                    break
                rtol /= 100
            columns.append(torch.as_tensor(x, dtype=B.dtype, device=B.device))
        X = torch.stack(columns, dim=1)
        self._check(B, X, "MINRES (H + λI is indefinite)")
        return X

    def _check(self, B: torch.Tensor, X: torch.Tensor, how: str) -> None:
        residual = torch.linalg.vector_norm(self._damped_product(X) - B, dim=0)
        relative = float((residual / torch.linalg.vector_norm(B, dim=0).clamp_min(torch.finfo(B.dtype).tiny)).max())
        if not relative <= self.tol:
            warnings.warn(
                f"the damped {self.op.kind} solve by {how} did not converge: relative residual {relative:.3g} > "
                f"tol {self.tol:.3g} after at most {self.max_iterations} iterations; raise damping, max_iterations "
                f"or the dense memory budget (CURVLAB_DENSE_BUDGET)", RuntimeWarning, stacklevel=3)


def damped_solve(op: CurvatureOperator, g: torch.Tensor, damping: float, **options) -> torch.Tensor:
    """``Δ = (C + λI)⁻¹ g`` for the operator ``C`` ``(P, P)`` and ``g`` ``(P,)`` or ``(P, K)`` (see :class:`DampedInverse`).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.optim.exact import damped_solve
        >>> model = torch.nn.Linear(2, 1).double()
        >>> prob = curvlab.Problem(model, (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1)), loss="mse")
        >>> H = curvlab.curvature(prob, "hessian").to_dense()
        >>> g = prob.gradient()
        >>> bool(torch.allclose(damped_solve(curvlab.curvature(prob, "hessian"), g, 0.5),
        ...                     torch.linalg.solve(H + 0.5 * torch.eye(3, dtype=torch.float64), g)))
        True
    """
    return DampedInverse(op, damping, **options).solve(g)



def frozen_curvature(problem: Problem, kind: str, mc_samples: int = 1, seed: int = 0,
                     known: CurvatureOperator | None = None) -> CurvatureOperator:
    """``C`` of ``problem`` fixed at its current ``θ``: dense within the budget, else products on a copy of the model.

    The optimizer changes the parameters in place after the step, and a matrix-free operator takes its
    products at the parameters' current values; the copy keeps those of the curvature update. A dense
    or eigendecomposed operator ``known`` to be ``C`` at this ``θ`` is taken as it is.
    """
    if isinstance(known, (DenseMatrix, AbsHessian)):
        return known
    op = curvature(problem, kind, mc_samples=mc_samples, seed=seed)
    P = problem.num_params
    try:
        check_dense(P, P, problem.dtype, problem.device, f"{kind} matrix")
    except DenseTooLarge:
        if isinstance(op, AbsHessian):
            op.eigen(progress=False)
            return op
        snapshot = Problem(copy.deepcopy(problem.model), problem.data, problem.loss, params=problem.param_names,
                           reduction=problem.reduction)
        return curvature(snapshot, kind, mc_samples=mc_samples, seed=seed)
    if isinstance(op, AbsHessian):
        op.eigen(progress=False)
        return op
    return DenseMatrix(problem, kind, op.to_dense(progress=False))


def damped_exact(kind: str, damping: float = 1e-3, mc_samples: int = 1) -> Preconditioner:
    """``g ↦ (C + λI)⁻¹ g`` with ``C`` the exact curvature ``kind`` of the latest curvature-update batch.

    ``accumulate`` fixes ``C`` at the batch's ``θ`` (:func:`frozen_curvature`), ``refresh`` factorises
    ``C + λI`` (:class:`DampedInverse`), ``apply`` and ``linear`` solve with the factorisation.
    """
    damping = require_number("damping", damping)
    mc_samples = require_integer("mc_samples", mc_samples)

    def accumulate(state, statistics):
        known = statistics.curvatures.get(kind) if kind != "fisher_mc" else None  # MC labels: the step's own seed
        return frozen_curvature(statistics.problem, kind, mc_samples, statistics.seed_for(), known), state[1]

    def refresh(state):
        op, _ = state
        if op is None:
            raise InvalidProblem(f"the damped {kind} solve needs the curvature of a batch first; accumulate statistics")
        return op, DampedInverse(op, damping)

    def solver(state):
        inverse = state[1]
        if inverse is None:
            raise InvalidProblem(f"the damped {kind} step needs the curvature of a batch before its first step; "
                                 f"accumulate statistics and refresh first")
        problem = inverse.problem
        return lambda v: problem.unflatten(inverse.solve(problem.flatten(v)))

    def apply(grads, state, params):
        return solver(state)(grads), state

    return Preconditioner(init=lambda params: (None, None), apply=apply, accumulate=accumulate, refresh=refresh,
                          linear=solver)


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidProblem(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def newton(curvature: str = "hessian", damping: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
           curvature_update_interval: int = 1, preconditioner_update_interval: int = 1) -> Method:
    """Newton ``Δ = (H + λI)⁻¹ ḡ`` or saddle-free Newton ``Δ = (|H| + λI)⁻¹ ḡ`` on the batch (ASDL ``NewtonGradientMaker``).

    ``H`` ``(P, P)`` is the Hessian of the batch loss over all studied parameters and ``|H| = Q|Λ|Qᵀ``
    from ``eigh(H)``, damped after the absolute value. Where ``H + λI`` is not positive definite the
    Newton step is still ``(H + λI)⁻¹ ḡ`` (LU dense, MINRES matrix-free) and may point uphill. The
    step is fed to torch SGD's rule (momentum, L2 weight decay), as in the study.

    Args:
        curvature: ``"hessian"`` (Newton) or ``"abs_hessian"`` (saddle-free Newton, Dauphin et al. 2014).
        damping: ``λ > 0`` (the study's 1e-3; ASDL's own default is 1e-8).
        momentum, weight_decay: torch SGD's heavy-ball momentum and L2 weight decay on ``Δ``.
        curvature_update_interval, preconditioner_update_interval: ``H`` is measured and ``H + λI``
            factorised every so many steps; in between the stale inverse is applied.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("newton", model, lr=0.1, curvature="abs_hessian", momentum=0.0)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> sorted(opt.last_direction)
        ['bias', 'weight']
    """
    kind = _choice("curvature", curvature, NEWTON_CURVATURES)
    return study_method(damped_exact(kind, damping), momentum, weight_decay, curvature_update_interval,
                        preconditioner_update_interval)


def natural_gradient(curvature: str = "ggn", damping: float = 1e-3, mc_samples: int = 1, momentum: float = 0.9,
                     weight_decay: float = 0.0, curvature_update_interval: int = 1,
                     preconditioner_update_interval: int = 1) -> Method:
    """The exact damped natural gradient ``Δ = (F + λI)⁻¹ ḡ`` of the batch (OPTIMIZERS.md §16).

    ``F`` ``(P, P)`` over all studied parameters: the GGN (= exact Fisher ``(1/N) Σ_n J_nᵀ Λ_n J_n``
    for a mean loss), the Monte-Carlo Fisher with labels drawn from the model (seeded by the
    optimizer's seed and the step) or the empirical Fisher ``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ``. The step is fed to
    torch SGD's rule (momentum, L2 weight decay), as the study does for its natural-gradient methods.

    Args:
        curvature: ``"ggn"``, ``"fisher"`` (the same matrix), ``"fisher_mc"`` or ``"empirical_fisher"``.
        damping: ``λ > 0`` (the study's 1e-3).
        mc_samples: labels drawn per example for ``"fisher_mc"``.
        momentum, weight_decay: torch SGD's heavy-ball momentum and L2 weight decay on ``Δ``.
        curvature_update_interval, preconditioner_update_interval: ``F`` is measured and ``F + λI``
            factorised every so many steps; in between the stale inverse is applied.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("natural_gradient", model, lr=0.1, curvature="empirical_fisher")
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> sorted(opt.last_direction)
        ['bias', 'weight']
    """
    kind = _choice("curvature", curvature, NATURAL_GRADIENT_CURVATURES)
    return study_method(damped_exact(kind, damping, mc_samples), momentum, weight_decay, curvature_update_interval,
                        preconditioner_update_interval)
