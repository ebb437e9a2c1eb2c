"""Structured approximations: block-diagonal operators whose blocks are cheap to invert and to power.

An approximation ``C̃ = diag(C̃_1, …, C̃_B)`` of a curvature matrix has one block per module (or per
parameter), each acting on its parameters' entries of the flat vector. A block's structure makes
``(C̃_b + δ I)⁻¹`` and ``C̃_b^p`` cheap and exact:

- :class:`DiagonalBlock` ``diag(d)``;
- :class:`DenseBlock` an explicit ``(p_b, p_b)`` matrix (an exact curvature block), through ``eigh``;
- :class:`KroneckerBlock` ``F_1 ⊗ … ⊗ F_m`` acting on the block reshaped to a ``(d_1, …, d_m)``
  tensor, row-major: ``(F_1 ⊗ F_2) vec(X) = vec(F_1 X F_2ᵀ)``; powers per factor,
  ``(⊗ F_i)^p = ⊗ F_i^p``; the damped inverse in the factors' joint eigenbasis;
- :class:`EigenbasisBlock` ``(⊗ Q_i) diag(vec S) (⊗ Q_i)ᵀ``: a Kronecker eigenbasis with free
  eigenvalues ``S`` ``(d_1, …, d_m)`` (EKFAC; the damped inverse of a Kronecker block);
- :class:`LowRankBlock` ``diag(d) + U M Uᵀ`` with ``U`` ``(p_b, r)`` and a symmetric core ``M``
  ``(r, r)``; inverted with the Sherman–Morrison–Woodbury formula.

A :class:`Layout` turns a block's ``(K, p_b)`` rows into the ``(K, d_1, …, d_m)`` tensor a
Kronecker block acts on: :class:`Reshape`, or :class:`Homogeneous` for a weight and its bias
joined as ``[W b]`` (the homogeneous coordinate).
"""

import math
from abc import ABC, abstractmethod

import torch

from curvlab.errors import InvalidProblem, require_number
from curvlab.memory import check_dense
from curvlab.operators.base import CurvatureOperator
from curvlab.problem import Problem


def eigen_power(values: torch.Tensor, p: float, what: str) -> torch.Tensor:
    """``λ^p`` for the eigenvalues of a positive semi-definite matrix; rounding's ``λ < 0`` count as 0.

    Refuses a negative eigenvalue beyond rounding (``< −10⁻⁶ max|λ|``) when ``p`` is not an integer,
    and a zero eigenvalue when ``p < 0``, since those powers do not exist.
    """
    scale = float(values.abs().max()) if values.numel() else 0.0
    if p != int(p) and bool((values < -1e-6 * scale).any()):
        raise InvalidProblem(f"the {what} has negative eigenvalues, so its power {p:g} does not exist")
    if p == int(p) and p >= 0:
        return values ** int(p)
    clipped = values.clamp(min=0)
    if p < 0 and bool((clipped <= 1e-12 * scale).any()):
        raise InvalidProblem(
            f"the {what} is singular, so its power {p:g} does not exist; use inverse(damping) or damp it first"
        )
    return clipped ** p


class Layout(ABC):
    """How a block's entries of the flat vector map to the tensor a structured block acts on."""

    shape: tuple[int, ...]

    @abstractmethod
    def to_tensor(self, rows: torch.Tensor) -> torch.Tensor:
        """``(K, p_b)`` → ``(K, *shape)``."""

    @abstractmethod
    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(K, *shape)`` → ``(K, p_b)``, the inverse of :meth:`to_tensor`."""


class Reshape(Layout):
    """The block's entries are one parameter's, read row-major as a ``shape`` tensor."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def to_tensor(self, rows):
        return rows.reshape(rows.shape[0], *self.shape)

    def to_rows(self, tensor):
        return tensor.reshape(tensor.shape[0], -1)


class Homogeneous(Layout):
    """A weight ``(out, in)`` then its bias ``(out,)`` in the flat vector, joined as ``[W b]`` ``(out, in + 1)``."""

    def __init__(self, out_features: int, in_features: int):
        self.shape = (out_features, in_features + 1)

    def to_tensor(self, rows):
        out, inp = self.shape[0], self.shape[1] - 1
        weight = rows[:, :out * inp].reshape(-1, out, inp)
        bias = rows[:, out * inp:].reshape(-1, out, 1)
        return torch.cat([weight, bias], dim=2)

    def to_rows(self, tensor):
        return torch.cat([tensor[:, :, :-1].flatten(1), tensor[:, :, -1]], dim=1)


def mode_product(tensor: torch.Tensor, matrices: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """``X ×_1 F_1 ×_2 F_2 …`` for ``X`` ``(K, d_1, …, d_m)``: ``(⊗ F_i) vec(X)`` row-major (``F_iᵀ`` if ``transpose``)."""
    for mode, matrix in enumerate(matrices, start=1):
        tensor = torch.movedim(torch.tensordot(tensor, matrix, dims=([mode], [0 if transpose else 1])), -1, mode)
    return tensor


class Block(ABC):
    """One diagonal block ``C̃_b`` ``(p_b, p_b)`` of a structured approximation."""

    size: int

    @abstractmethod
    def matmat(self, rows: torch.Tensor) -> torch.Tensor:
        """``V C̃_b`` for K directions as the rows of ``V`` ``(K, p_b)``."""

    @abstractmethod
    def inverse(self, damping: float) -> "Block":
        """``(C̃_b + δ I)⁻¹``."""

    @abstractmethod
    def power(self, p: float) -> "Block":
        """``C̃_b^p`` (the block must be positive semi-definite unless ``p`` is a non-negative integer)."""

    def to_dense(self) -> torch.Tensor:
        eye = self._identity()
        return self.matmat(eye)

    @abstractmethod
    def _identity(self) -> torch.Tensor:
        """``I_{p_b}`` on the block's device and dtype."""


class DiagonalBlock(Block):
    """``diag(d)``, ``d`` ``(p_b,)``."""

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.size = values.numel()

    def matmat(self, rows):
        return rows * self.values

    def inverse(self, damping):
        shifted = self.values + damping
        if bool((shifted == 0).any()):
            raise InvalidProblem("the damped diagonal has zero entries, so it has no inverse; raise the damping")
        return DiagonalBlock(1 / shifted)

    def power(self, p):
        return DiagonalBlock(eigen_power(self.values, p, "diagonal"))

    def to_dense(self):
        return torch.diag(self.values)

    def _identity(self):
        return torch.eye(self.size, dtype=self.values.dtype, device=self.values.device)


class DenseBlock(Block):
    """An explicit symmetric ``(p_b, p_b)`` matrix; inverse and powers from its eigendecomposition."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.size = matrix.shape[0]
        self._eigen = None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eigen is None:
            self._eigen = torch.linalg.eigh((self.matrix + self.matrix.T) / 2)
        return self._eigen

    def matmat(self, rows):
        return rows @ self.matrix

    def inverse(self, damping):
        values, vectors = self.eigh()
        return DenseBlock((vectors / (values + damping)) @ vectors.T)

    def power(self, p):
        values, vectors = self.eigh()
        return DenseBlock((vectors * eigen_power(values, p, "block")) @ vectors.T)

    def to_dense(self):
        return self.matrix

    def _identity(self):
        return torch.eye(self.size, dtype=self.matrix.dtype, device=self.matrix.device)


class KroneckerBlock(Block):
    """``F_1 ⊗ … ⊗ F_m`` with symmetric factors ``F_i`` ``(d_i, d_i)``, on the block laid out by ``layout``."""

    def __init__(self, factors: list[torch.Tensor], layout: Layout):
        if tuple(f.shape[0] for f in factors) != layout.shape:
            raise ValueError(f"factor sizes {[f.shape[0] for f in factors]} do not match the layout {layout.shape}")
        self.factors = factors
        self.layout = layout
        self.size = math.prod(layout.shape)

    def matmat(self, rows):
        return self.layout.to_rows(mode_product(self.layout.to_tensor(rows), self.factors))

    def eigenbasis(self) -> "EigenbasisBlock":
        """The same matrix as ``(⊗ Q_i) diag(λ_1 ⊗ … ⊗ λ_m) (⊗ Q_i)ᵀ``."""
        pairs = [torch.linalg.eigh((f + f.T) / 2) for f in self.factors]
        values = pairs[0][0]
        for next_values, _ in pairs[1:]:
            values = torch.outer(values.flatten(), next_values).reshape(*values.shape, -1)
        return EigenbasisBlock([vectors for _, vectors in pairs], values.reshape(self.layout.shape), self.layout)

    def inverse(self, damping):
        return self.eigenbasis().inverse(damping)

    def power(self, p):
        powered = []
        for factor in self.factors:
            values, vectors = torch.linalg.eigh((factor + factor.T) / 2)
            powered.append((vectors * eigen_power(values, p, "Kronecker factor")) @ vectors.T)
        return KroneckerBlock(powered, self.layout)

    def _identity(self):
        f = self.factors[0]
        return torch.eye(self.size, dtype=f.dtype, device=f.device)


class EigenbasisBlock(Block):
    """``(⊗ Q_i) diag(vec S) (⊗ Q_i)ᵀ``: orthogonal ``Q_i`` ``(d_i, d_i)``, eigenvalues ``S`` ``(d_1, …, d_m)``."""

    def __init__(self, bases: list[torch.Tensor], eigenvalues: torch.Tensor, layout: Layout):
        self.bases = bases
        self.eigenvalues = eigenvalues
        self.layout = layout
        self.size = math.prod(layout.shape)

    def matmat(self, rows):
        rotated = mode_product(self.layout.to_tensor(rows), self.bases, transpose=True)
        return self.layout.to_rows(mode_product(rotated * self.eigenvalues, self.bases))

    def inverse(self, damping):
        shifted = self.eigenvalues + damping
        if bool((shifted == 0).any()):
            raise InvalidProblem("the damped block is singular, so it has no inverse; raise the damping")
        return EigenbasisBlock(self.bases, 1 / shifted, self.layout)

    def power(self, p):
        return EigenbasisBlock(self.bases, eigen_power(self.eigenvalues, p, "block"), self.layout)

    def _identity(self):
        return torch.eye(self.size, dtype=self.eigenvalues.dtype, device=self.eigenvalues.device)


class LowRankBlock(Block):
    """``diag(d) + U M Uᵀ`` with ``d`` ``(p_b,)`` (or none), ``U`` ``(p_b, r)`` and a symmetric core ``M`` ``(r, r)``.

    The damped inverse is again of this form (Sherman–Morrison–Woodbury), with ``D = diag(d) + δ I``:
    ``(D + U M Uᵀ)⁻¹ = D⁻¹ − D⁻¹ U (I + M Uᵀ D⁻¹ U)⁻¹ M Uᵀ D⁻¹``, an ``(r, r)`` solve that needs
    ``M`` to be neither invertible nor positive. Powers exist without the diagonal, from the ``r``
    nonzero eigenpairs: ``U = Q R`` (thin QR), ``R M Rᵀ = W Λ Wᵀ``, ``U M Uᵀ = (Q W) Λ (Q W)ᵀ``.
    """

    def __init__(self, factor: torch.Tensor, core: torch.Tensor, diagonal: torch.Tensor | None = None):
        self.factor = factor
        self.core = core
        self.diagonal = diagonal
        self.size = factor.shape[0]

    def matmat(self, rows):
        result = (rows @ self.factor) @ self.core @ self.factor.T
        return result if self.diagonal is None else result + rows * self.diagonal

    def inverse(self, damping):
        diagonal = damping if self.diagonal is None else self.diagonal + damping
        if bool((torch.as_tensor(diagonal) == 0).any()):
            raise InvalidProblem(
                "a low-rank matrix without damping has no inverse; give a damping > 0"
            )
        inv_diagonal = torch.ones(self.size, dtype=self.factor.dtype, device=self.factor.device) / diagonal
        scaled = self.factor * inv_diagonal[:, None]  # D⁻¹ U
        eye = torch.eye(self.core.shape[0], dtype=self.core.dtype, device=self.core.device)
        core = -torch.linalg.solve(eye + self.core @ (self.factor.T @ scaled), self.core)
        return LowRankBlock(scaled, (core + core.T) / 2, inv_diagonal)

    def eigenpairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``r`` eigenpairs of ``U M Uᵀ`` (without the diagonal): values ``(r,)``, vectors ``(p_b, r)``."""
        q, r = torch.linalg.qr(self.factor)
        small = r @ self.core @ r.T
        values, vectors = torch.linalg.eigh((small + small.T) / 2)
        return values, q @ vectors

    def power(self, p):
        if self.diagonal is not None:
            raise InvalidProblem(
                "a diagonal-plus-low-rank matrix has no cheap power; use inverse(damping) or to_dense()"
            )
        values, vectors = self.eigenpairs()
        if p < 0:
            raise InvalidProblem(
                f"a low-rank matrix is singular, so its power {p:g} does not exist; use inverse(damping)"
            )
        powered = eigen_power(values, p, "low-rank block")
        return LowRankBlock(vectors, torch.diag(powered))

    def _identity(self):
        return torch.eye(self.size, dtype=self.factor.dtype, device=self.factor.device)


def flat_entries(problem: Problem, names: list[str]) -> slice | torch.Tensor:
    """The flat-vector entries of the parameters ``names``: a slice when they are adjacent, in order."""
    spans = [problem.spans()[name] for name in names]
    if all(stop == start for (_, stop), (start, _) in zip(spans, spans[1:])):
        return slice(spans[0][0], spans[-1][1])
    return problem.entries(names)


class Approximation(CurvatureOperator):
    """``C̃ = diag(C̃_1, …, C̃_B)``, a structured ``(P, P)`` approximation of the curvature ``curvature``.

    Attributes:
        kind: the approximation (``"kfac"``, ``"diag"``, …), with ``" inverse"`` / ``" power"`` appended
            for derived operators.
        curvature: the exact kind it stands for (``"ggn"``, ``"empirical_fisher"``, …).
        blocks: ``(label, parameter names, Block)`` triples; labels are module names (or
            ``"all"`` for a block over every parameter).
        exact_parameters: the parameters whose block is the exact curvature block, not the
            structured approximation (e.g. biases of normalisation layers under KFAC).
    """

    def __init__(self, problem: Problem, kind: str, curvature: str,
                 blocks: list[tuple[str, list[str], Block]], exact_parameters: tuple[str, ...] = ()):
        super().__init__(problem)
        self.kind = kind
        self.curvature = curvature
        self.blocks = blocks
        self.exact_parameters = tuple(exact_parameters)
        covered = [name for _, names, _ in blocks for name in names]
        if sorted(covered) != sorted(problem.param_names):
            raise ValueError(f"blocks cover {covered}, not every studied parameter once: {problem.param_names}")
        self._index = [flat_entries(problem, names) for _, names, _ in blocks]
        for index, (label, _, block) in zip(self._index, blocks):
            size = index.stop - index.start if isinstance(index, slice) else index.numel()
            if block.size != size:
                raise ValueError(f"block {label!r} has size {block.size}, its parameters {size}")

    def _matmat(self, rows):
        if len(self.blocks) == 1 and isinstance(self._index[0], slice):  # one block in flat order: no gather, no scatter
            result = self.blocks[0][2].matmat(rows).to(rows.dtype)
            return result.clone() if result.data_ptr() == rows.data_ptr() else result
        result = torch.empty_like(rows)
        for index, (_, _, block) in zip(self._index, self.blocks):
            result[:, index] = block.matmat(rows[:, index].contiguous()).to(rows.dtype)
        return result

    def _derived(self, suffix: str, blocks: list[tuple[str, list[str], Block]]) -> "Approximation":
        return Approximation(self.problem, f"{self.kind} {suffix}", self.curvature, blocks, self.exact_parameters)

    def inverse(self, damping: float = 0.0) -> "Approximation":
        """``(C̃ + δ I)⁻¹``, block by block, with the same structure."""
        damping = require_number("damping", damping, strict=False)
        with torch.no_grad():
            return self._derived("inverse", [(label, names, block.inverse(damping))
                                             for label, names, block in self.blocks])

    def power(self, p: float) -> "Approximation":
        """``C̃^p``, block by block (per factor for Kronecker blocks)."""
        p = require_number("the power p", p, minimum=-math.inf)
        with torch.no_grad():
            return self._derived("power", [(label, names, block.power(p)) for label, names, block in self.blocks])

    def to_dense(self, budget: int | None = None, progress: bool = True) -> torch.Tensor:
        """The ``(P, P)`` matrix assembled from its dense blocks (within the memory budget)."""
        P = self.shape[0]
        check_dense(P, P, self.dtype, self.device, f"{self.kind} matrix", budget)
        dense = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for index, (_, _, block) in zip(self._index, self.blocks):
                if isinstance(index, slice):
                    dense[index, index] = block.to_dense().to(self.dtype)
                else:
                    dense[index[:, None], index[None, :]] = block.to_dense().to(self.dtype)
        return dense
