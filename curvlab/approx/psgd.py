"""PSGD's Kronecker preconditioner (Li 2018), fitted on pairs ``(v, C v)``; its implied curvature is ``P⁻¹``.

**Structure** (ASDL ``KronPsgdGradientMaker``, OPTIMIZERS.md §6a). Each module's weight ``W``
``(out, …)`` viewed as ``(out, in)`` (a convolution kernel as ``W.view(out, -1)``) joins its bias
``b`` ``(out,)`` as the extra column of ``Ŵ = [W b]`` ``(out, in + 1)``, and gets
``Q = Q_L ⊗ Q_R`` with upper-triangular ``Q_L`` ``(out, out)`` and ``Q_R`` ``(in + 1, in + 1)``.
In curvlab's row-major flattening the preconditioner ``P = QᵀQ = P_L ⊗ P_R``,
``P_L = Q_Lᵀ Q_L``, ``P_R = Q_Rᵀ Q_R``, acts as ``P vec(Ĝ) = vec(P_L Ĝ P_R)``: this is §6a's
``Δ̂ = Q_lᵀQ_l · Ĝ · Q_rᵀQ_r``. Parameters outside such a pair (a weight without a studied bias, an
embedding, ``in_proj_weight``) get the same two factors on ``(d_1, numel / d_1)``; a vector or
scalar (a normalisation layer's scale, a lone bias) gets one upper-triangular factor ``(d, d)``,
PSGD's dense preconditioner for that tensor. A factor takes ``d_i²`` numbers, so a very large
dimension (a big vocabulary's embedding) makes a large factor.

**Fit.** Every factor starts at ``init_scale · I``. Each of ``iterations`` steps takes one Gaussian
``v ~ N(0, I_P)`` from a local generator seeded by ``seed`` (the caller's random state is
untouched) and its product ``h = C v`` with the exact curvature; since the pairs do not depend on
the fit, they are drawn as the rows of ``(b, P)`` blocks, ``b ≤`` :data:`PROBE_BLOCK`, and
multiplied in one pass over the data per block. Each step updates every group, with ``V``, ``Hh``
the group's entries of ``v``, ``h`` laid out as ``(d_1, …, d_m)`` tensors, by one Lie-group
gradient step on the criterion ``E[hᵀ P h + vᵀ P⁻¹ v]``:

    ``ρ = sqrt(max diag Q_1 / max diag Q_2);  Q_1 ← Q_1 / ρ;  Q_2 ← Q_2 ρ``   (two factors: balance)
    ``A = Hh ×_1 Q_1 ×_2 Q_2 …``               (``Q_1 Hh Q_2ᵀ``, so ``‖A‖² = hᵀ P h``)
    ``B = V ×_1 Q_1⁻ᵀ ×_2 Q_2⁻ᵀ …``            (``Q_1⁻ᵀ V Q_2⁻¹``, so ``‖B‖² = vᵀ P⁻¹ v``)
    ``∇_i = triu(A_(i) A_(i)ᵀ − B_(i) B_(i)ᵀ)``  (``A_(i)`` ``(d_i, ·)``: mode ``i`` unfolded)
    ``Q_i ← Q_i − μ / (max|∇_i| + tiny) · ∇_i Q_i``

with ``μ = lr_precond`` and ``tiny`` the dtype's smallest normal number. ``B`` is lixilinx's
``Q_l⁻ᵀ dX Q_r⁻¹``, the one with ``‖B‖² = vᵀ P⁻¹ v`` that the criterion needs; ASDL HEAD's
``Q_l⁻¹ dX Q_r⁻ᵀ`` is a bug (OPTIMIZERS.md §17.3) and is not offered. The normalised step keeps
``Q_i`` upper-triangular with a positive diagonal for ``0 < μ < 1``. For ``C`` symmetric the
criterion's minimiser over all ``P`` is ``P = (E[h hᵀ])^{-1/2} = |C|⁻¹``; when ``|C|`` is block
diagonal over the groups, each block of its group's Kronecker form, the fitted ``P⁻¹`` tends to
``|C|`` up to the fluctuation of the constant-size stochastic steps (about ``μ`` relative).

**Implied curvature.** ``C̃ = P⁻¹ = ⊗_i (Q_iᵀ Q_i)⁻¹``: one
:class:`~curvlab.approx.base.KroneckerBlock` per group with factors ``(Q_iᵀ Q_i)⁻¹``, so ``C̃``'s damped
inverse and powers come from the blocks; the fitted ``Q_i`` stay on the result (:class:`PsgdKron`).
"""

import math
import numbers

import torch
from tqdm.auto import tqdm

from curvlab.approx.base import Approximation, Homogeneous, KroneckerBlock, Layout, Reshape
from curvlab.approx.target import curvature_operator
from curvlab.approx.triangular import triangular_matmul, upper_gram_difference, upper_triangular_product
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.operators.base import CurvatureOperator
from curvlab.problem import Problem

PROBE_BLOCK = 32  # probes v drawn, and multiplied by the curvature, per pass over the data


class PsgdKron(Approximation):
    """``C̃ = P⁻¹ = ⊗_i (Q_iᵀ Q_i)⁻¹`` per block, from PSGD's fitted triangular factors (see the module).

    Attributes:
        factors: per block (in the order of :attr:`blocks`), the fitted upper-triangular ``Q_i``
            ``(d_i, d_i)``; the preconditioner of the block is ``⊗_i Q_iᵀ Q_i``.
        iterations: the fitting steps taken (one curvature product each).
        lr_precond: the normalised step size ``μ``.
    """

    def __init__(self, problem: Problem, curvature: str, groups: list[tuple[str, list[str], Layout]],
                 factors: list[list[torch.Tensor]], iterations: int, lr_precond: float):
        blocks = [(label, names, KroneckerBlock([_inverse_gram(q) for q in qs], layout))
                  for (label, names, layout), qs in zip(groups, factors)]
        super().__init__(problem, "psgd_kron", curvature, blocks)
        self.factors = factors
        self.iterations = iterations
        self.lr_precond = lr_precond


def psgd_kron(problem: Problem, curvature: str = "hessian", iterations: int = 1000, lr_precond: float = 0.01,
              seed: int = 0, init_scale: float = 1.0, *, operator: CurvatureOperator | None = None,
              progress: bool = True, **curvature_options) -> PsgdKron:
    """PSGD's Kronecker preconditioner ``P`` fitted on ``iterations`` pairs ``(v, C v)``; returns ``C̃ = P⁻¹``.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: the exact kind whose products fit ``P`` (any of :data:`curvlab.KINDS`; PSGD-Newton
            uses ``"hessian"``, and then ``P⁻¹`` targets ``|H|``); with ``operator``, the kind it
            stands for.
        iterations: fitting steps, each one product of the curvature over all data.
        lr_precond: the normalised step size ``μ``, ``0 < μ < 1`` (ASDL's default 0.01).
        seed: seeds the probes ``v`` (a local generator: the caller's random state is untouched) and
            the curvature's own sampling (``fisher_mc`` labels).
        init_scale: every factor starts at ``init_scale · I``.
        operator: a :class:`~curvlab.operators.CurvatureOperator` of shape ``(P, P)`` to take the
            products from instead of ``curvlab.curvature(problem, curvature)``.
        progress: show a progress bar over the iterations on stderr.
        curvature_options: ``mc_samples``, ``block_diagonal``, ``top_k`` of :func:`curvlab.curvature`.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx import approximate
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()                       # Ŵ = [W b]: (2, 4)
        >>> prob = curvlab.Problem(model, (torch.randn(8, 3), torch.randn(8, 2)), loss="mse")
        >>> ap = approximate(prob, "psgd_kron", "hessian", iterations=2000, progress=False)
        >>> [tuple(q.shape) for q in ap.factors[0]]
        [(2, 2), (4, 4)]
        >>> H = curvlab.curvature(prob, "hessian").to_dense()          # I ⊗ A: of the Kronecker form
        >>> float(torch.linalg.norm(ap.to_dense() - H) / torch.linalg.norm(H)) < 0.05
        True
    """
    op = curvature_operator(problem, curvature, operator, seed, curvature_options)
    iterations = require_integer("iterations", iterations)
    lr_precond = require_number("lr_precond", lr_precond, maximum=1)
    if (isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real)
            or not 0 < init_scale < math.inf):
        raise InvalidProblem(f"init_scale must be a finite number > 0, got {init_scale!r}")
    groups = kron_groups(problem)
    like = dict(dtype=problem.dtype, device=problem.device)
    factors = [[init_scale * torch.eye(d, **like) for d in layout.shape] for _, _, layout in groups]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), tqdm(total=iterations, desc="psgd_kron fit", disable=not progress, leave=False) as bar:
        for start in range(0, iterations, PROBE_BLOCK):
            count = min(PROBE_BLOCK, iterations - start)
            v = torch.randn(count, problem.num_params, generator=generator, dtype=torch.float64).to(**like)
            h = (op @ v.T).T
            v_parts, h_parts = problem.unflatten(v), problem.unflatten(h)
            for step in range(count):
                for index, (_, names, layout) in enumerate(groups):
                    factors[index] = lie_group_step(factors[index], _block_tensor(v_parts, names, layout, step),
                                                    _block_tensor(h_parts, names, layout, step), lr_precond)
                bar.update()
    return PsgdKron(problem, curvature, groups, factors, iterations, lr_precond)


def kron_groups(problem: Problem) -> list[tuple[str, list[str], Layout]]:
    """PSGD's blocks: ``(label, parameter names, layout)``, a weight and its bias joined as ``[W b]``.

    A module's studied ``weight`` (two or more dimensions, ``out`` first) and ``bias`` ``(out,)``
    form one block labelled with the module's name, laid out :class:`Homogeneous`; every other
    parameter is its own block, labelled with its name, laid out ``(d_1, numel / d_1)`` if it has
    two or more dimensions and ``(numel,)`` otherwise.
    """
    shapes = dict(zip(problem.param_names, problem.param_shapes))
    groups = []
    for module, names in problem.module_blocks():
        prefix = f"{module}." if module else ""
        weight, bias = prefix + "weight", prefix + "bias"
        rest = list(names)
        if weight in shapes and bias in shapes and len(shapes[weight]) >= 2 and len(shapes[bias]) == 1 \
                and shapes[bias][0] == shapes[weight][0]:
            out = shapes[weight][0]
            groups.append((module, [weight, bias], Homogeneous(out, shapes[weight].numel() // out)))
            rest = [name for name in names if name not in (weight, bias)]
        for name in rest:
            shape = shapes[name]
            layout = (shape[0], shape.numel() // shape[0]) if len(shape) >= 2 else (shape.numel(),)
            groups.append((name, [name], Reshape(layout)))
    return groups


def lie_group_step(factors: list[torch.Tensor], v: torch.Tensor, h: torch.Tensor, lr: float,
                   asdl_b: bool = False, in_place: bool = False) -> list[torch.Tensor]:
    """One PSGD step of the upper-triangular ``Q_i`` ``(d_i, d_i)`` on one pair ``v``, ``h`` ``(d_1, …, d_m)``.

    The balance (two factors), ``A``, ``B``, ``∇_i`` and the normalised update of the module
    docstring; returns the new factors (``in_place``: the given ones, updated). ``asdl_b`` takes ASDL's
    transposed ``B = V ×_i Q_i⁻¹`` instead of ``V ×_i Q_i⁻ᵀ`` (OPTIMIZERS.md §17; the balance leaves either
    unchanged). ``v``, ``h``, ``A``, ``B`` and each ``∇_i`` are dropped once used: with a caller that keeps no
    reference to ``v`` and ``h``, the step holds about four tensors of their size at once, not six.
    """
    # The balance Q_1/ρ, Q_2 ρ leaves A, B and ∇_i unchanged and scales each new factor: it is applied last.
    scales = [1.0] * len(factors)
    if len(factors) == 2:
        rho = torch.sqrt(factors[0].diagonal().max() / factors[1].diagonal().max())
        scales = [1 / rho, rho]
    tiny = torch.finfo(h.dtype).tiny
    A = along_modes(h, factors, triangular_matmul)
    del h
    if asdl_b:
        B = along_modes(v, factors, lambda q, x: torch.linalg.solve_triangular(q, x, upper=True))
    else:  # by triangular solves: no inverse is formed
        B = along_modes(v, factors, lambda q, x: torch.linalg.solve_triangular(q.T, x, upper=False))
    del v
    gradients = [upper_gram_difference(_unfold(A, mode), _unfold(B, mode)) for mode in range(len(factors))]
    del A, B
    stepped = []
    for q, scale in zip(factors, scales):
        gradient = gradients.pop(0)
        step = upper_triangular_product(gradient, q).mul_(lr / (torch.linalg.vector_norm(gradient, math.inf) + tiny))
        stepped.append((q.sub_(step) if in_place else torch.sub(q, step, out=step)).mul_(scale))
    return stepped


def along_modes(tensor: torch.Tensor, factors: list[torch.Tensor], product) -> torch.Tensor:
    """``tensor`` ``(d_1, …, d_m)`` with ``product(F_i, X_(i))`` (``(d_i, ·) -> (d_i, ·)``) applied to each mode's unfolding in turn."""
    for mode, factor in enumerate(factors):
        moved = tensor.movedim(mode, 0)
        tensor = product(factor, moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, mode)
    return tensor


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode ``mode`` of ``tensor`` unfolded: ``(d_mode, numel / d_mode)`` (a view where the layout allows)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _block_tensor(parts: dict[str, torch.Tensor], names: list[str], layout: Layout, row: int) -> torch.Tensor:
    """Row ``row`` of ``parts`` (``(K, *shape)`` per parameter), the group's entries, as a ``(d_1, …, d_m)``."""
    return layout.to_tensor(torch.cat([parts[name][row].reshape(1, -1) for name in names], dim=1))[0]


def _inverse_gram(q: torch.Tensor) -> torch.Tensor:
    """``(Qᵀ Q)⁻¹ = Q⁻¹ Q⁻ᵀ`` for an upper-triangular ``Q`` ``(d, d)``, symmetrised."""
    inverse = torch.linalg.solve_triangular(q, torch.eye(q.shape[0], dtype=q.dtype, device=q.device), upper=True)
    gram = inverse @ inverse.T
    return (gram + gram.T) / 2
