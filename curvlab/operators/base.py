"""The linear-operator core shared by every curvature matrix.

An operator ``C`` of shape ``(P, P)`` acts on flat vectors ``(P,)``, on matrices ``(P, K)`` (all K
columns in one pass over the data) and on parameter dicts. Internally directions are the K rows of
a ``(K, P)`` tensor, so that each direction is contiguous; since ``C`` is symmetric, ``(C V)ᵀ = Vᵀ C``.
A concrete operator defines only the product of one batch's share with K directions; this base owns
the loop over the data, the conversions, dense materialisation within the memory budget and the
scipy view.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from tqdm.auto import tqdm

from curvlab.errors import InvalidProblem
from curvlab.memory import check_dense
from curvlab.problem import Problem, differentiable_kernels

DENSE_CHUNK = 128
DIRECTIONS_PER_PASS = 16
"""The most directions a product sends through the model at once.

A pass carries a tangent (or cotangent) of every activation per direction, so its working memory
grows with the directions; more than these go through in several passes. Measured peaks
(``benchmarks/memory.py``) stay within about 16 times one gradient's, besides the directions and the
result themselves.
"""


class CurvatureOperator(ABC):
    """A symmetric ``(P, P)`` matrix over the studied parameters, applied matrix-free."""

    kind: str

    def __init__(self, problem: Problem):
        self.problem = problem

    @property
    def shape(self) -> tuple[int, int]:
        return (self.problem.num_params, self.problem.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, shape={self.shape}, dtype={self.dtype})"

    def __matmul__(self, v):
        """``C @ v`` for ``v`` of shape ``(P,)`` or ``(P, K)``, or a dict name -> tensor; same form back."""
        if isinstance(v, Mapping):
            missing = set(self.problem.param_names) - set(v)
            if missing:
                raise InvalidProblem(f"the direction lacks parameter(s) {', '.join(sorted(missing))}")
            flat = self.problem.flatten({name: torch.as_tensor(v[name]) for name in self.problem.param_names})
            return self.problem.unflatten(self._apply(flat.unsqueeze(0)).squeeze(0))
        v = torch.as_tensor(v)
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[1]:
            raise InvalidProblem(
                f"cannot multiply a {self.shape} operator with a tensor of shape {tuple(v.shape)}; "
                f"give (P,), (P, K) or a dict of parameter-shaped tensors"
            )
        if v.ndim == 1:
            return self._apply(v.unsqueeze(0)).squeeze(0)
        return self._apply(v.T).T

    def _apply(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(device=self.device, dtype=self.dtype).contiguous()
        if rows.shape[0] == 0:
            return rows.clone()
        with torch.no_grad(), differentiable_kernels():
            return self._matmat(rows)

    @abstractmethod
    def _matmat(self, rows: torch.Tensor) -> torch.Tensor:
        """``(C Vᵀ)ᵀ = V C`` for K directions as the rows of ``V``, shape ``(K, P)``, contiguous."""

    @contextmanager
    def reusing_passes(self) -> Iterator[None]:
        """Within the block, products may reuse what earlier ones recorded of a pass over the data.

        For the many products of an iterative method (Lanczos, SLQ, Hutchinson). This base records
        nothing; :class:`SummedOverData` keeps one batch's recorded pass, where its operator has one.
        """
        yield

    def to_dense(self, budget: int | None = None, progress: bool = True) -> torch.Tensor:
        """The ``(P, P)`` matrix, built from products with chunks of identity rows.

        Raises :class:`curvlab.DenseTooLarge` when ``P² · itemsize`` exceeds the memory budget
        (``budget`` bytes if given, see :mod:`curvlab.memory`). ``progress`` shows a bar on stderr
        when more than a few chunks are needed.
        """
        P = self.shape[0]
        check_dense(P, P, self.dtype, self.device, f"{self.kind} matrix", budget)
        dense = torch.empty(P, P, dtype=self.dtype, device=self.device)
        with self.reusing_passes():
            for start, stop, eye in identity_rows(self, DENSE_CHUNK, f"dense {self.kind}", progress):
                dense[start:stop] = self._apply(eye)
        return dense

    def block(self, names: list[str]) -> "CurvatureOperator":
        """The diagonal block ``C_bb`` over the parameters ``names``: ``(P_b, P_b)``, from products of ``C``."""
        return Restriction(self, names)

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` taking and returning float64 numpy arrays."""

        def matmat(x: np.ndarray) -> np.ndarray:
            result = self @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            return result.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat, rmatmat=matmat,
                              dtype=np.float64)


def rademacher(generator: torch.Generator, rows: int, size: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``(rows, size)`` independent ±1 entries drawn from the CPU ``generator``, then moved to ``device``."""
    signs = torch.randint(0, 2, (rows, size), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(device=device, dtype=dtype)


def identity_rows(op, batch: int, description: str, progress: bool):
    """``(start, stop, I[start:stop])`` for the identity's rows ``(b, P)`` on ``op``'s device and dtype, ``batch`` at a time."""
    P = op.shape[0]
    starts = range(0, P, batch)
    for start in tqdm(starts, desc=description, disable=not progress or len(starts) < 4, leave=False):
        stop = min(start + batch, P)
        eye = torch.zeros(stop - start, P, dtype=op.dtype, device=op.device)
        eye[:, start:stop].fill_diagonal_(1)
        yield start, stop, eye


def exact_diagonal(op, batch: int = DENSE_CHUNK, progress: bool = True) -> torch.Tensor:
    """``diag C`` ``(P,)`` from the ``P`` products with the identity's rows, ``batch`` at a time."""
    diagonal = torch.empty(op.shape[0], dtype=op.dtype, device=op.device)
    with op.reusing_passes():
        for start, stop, eye in identity_rows(op, batch, "exact diagonal", progress):
            diagonal[start:stop] = op._apply(eye)[:, start:stop].diagonal()
    return diagonal


class BlockDiagonal(CurvatureOperator):
    """``diag(C_1, …, C_B)``: one exact curvature block per module that owns studied parameters."""

    def __init__(self, problem: Problem, blocks: list[tuple[str, CurvatureOperator]]):
        super().__init__(problem)
        self.blocks = blocks
        self.kind = blocks[0][1].kind
        self._index = [problem.entries(block.problem.param_names) for _, block in blocks]

    def _matmat(self, rows):
        result = torch.empty_like(rows)
        for index, (_, block) in zip(self._index, self.blocks):
            result[:, index] = block._matmat(rows[:, index].contiguous())
        return result


class Restriction(CurvatureOperator):
    """``C_bb = Eᵀ C E`` for the parameters ``names``, ``E`` ``(P, P_b)`` the columns of the identity at their entries.

    A product pads the ``(K, P_b)`` directions with zeros to ``(K, P)``, applies ``C`` and keeps the
    block's entries, so it costs one product of ``C``.
    """

    def __init__(self, operator: CurvatureOperator, names: list[str]):
        unknown = [name for name in names if name not in operator.problem.param_names]
        if unknown or not names:
            raise InvalidProblem(
                f"a block needs some of the studied parameters {', '.join(operator.problem.param_names)}; "
                f"got {', '.join(map(repr, names)) or 'none'}"
            )
        super().__init__(operator.problem.restrict(names))
        self.operator = operator
        self.kind = operator.kind
        self._index = operator.problem.entries(self.problem.param_names)

    def reusing_passes(self):
        return self.operator.reusing_passes()

    def _matmat(self, rows):
        padded = torch.zeros(rows.shape[0], self.operator.shape[0], dtype=rows.dtype, device=rows.device)
        padded[:, self._index] = rows
        return self.operator._matmat(padded)[:, self._index].contiguous()


class DenseMatrix(CurvatureOperator):
    """An explicit symmetric ``(P, P)`` matrix over the studied parameters, e.g. a curvature already materialised.

    Products are matrix products, ``to_dense`` returns the matrix itself and ``eigh`` its cached
    eigendecomposition (``eigen``, when already at hand), so analyses that need the dense matrix of an
    operator more than once share one.
    """

    def __init__(self, problem: Problem, kind: str, matrix: torch.Tensor,
                 eigen: tuple[torch.Tensor, torch.Tensor] | None = None):
        if tuple(matrix.shape) != (problem.num_params, problem.num_params):
            raise InvalidProblem(f"a dense {kind} matrix must be {(problem.num_params,) * 2}, got {tuple(matrix.shape)}")
        super().__init__(problem)
        self.kind = kind
        self.matrix = matrix.to(device=problem.device, dtype=problem.dtype)
        self._eigen = eigen

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors (columns) of ``(M + Mᵀ)/2``, computed once."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh((self.matrix + self.matrix.T) / 2)
        return self._eigen

    def _matmat(self, rows):
        return rows @ self.matrix

    def to_dense(self, budget: int | None = None, progress: bool = True) -> torch.Tensor:
        return self.matrix


class SummedOverData(CurvatureOperator):
    """A curvature matrix that is a sum of per-batch shares, ``C = Σ_b C_b``."""

    _recorded: dict | None = None

    @contextmanager
    def reusing_passes(self) -> Iterator[None]:
        """Within the block, the pass an operator records of the first batch it meets is kept and reused.

        An operator whose product replays a recorded pass (the Hessian's ``∇L`` with its graph, the
        output-space kinds' linearised forward pass and pullback) then records it once instead of once
        per product; the other batches' products are the plain ones. Only one batch's pass is kept, so
        the memory stays within about two products' whatever the number of batches; with one batch
        every product reuses it.
        """
        if self._recorded is not None:
            yield
            return
        self._recorded = {}
        try:
            yield
        finally:
            self._recorded = None

    def _recorded_pass(self, index: int, record: Callable[[], object]) -> object | None:
        """Within :meth:`reusing_passes`, ``record()`` for the first batch met, kept for its later products.

        ``None`` outside the block and for every other batch (and kept when ``record()`` returns it): their
        products take the plain path.
        """
        if self._recorded is None or (self._recorded and index not in self._recorded):
            return None
        if index not in self._recorded:
            self._recorded[index] = record()
        return self._recorded[index]

    def _matmat(self, rows: torch.Tensor) -> torch.Tensor:
        """``V C`` for K directions as rows, ``(K, P)``: the sum of every batch's share (over all ranks).

        At most :data:`DIRECTIONS_PER_PASS` directions go through the model at once.
        """
        if rows.shape[0] > DIRECTIONS_PER_PASS:
            return torch.cat([self._matmat(part) for part in rows.split(DIRECTIONS_PER_PASS)])
        directions = self.problem.unflatten(rows)
        total = None
        for index, X, y in self.problem.batches():
            share = self._batch_matmat(index, X, y, directions)
            total = share if total is None else total.add_(share)
        return self.problem.reduce(total)

    @abstractmethod
    def _batch_matmat(self, index: int, X, y: torch.Tensor,
                      directions: dict[str, torch.Tensor]) -> torch.Tensor:
        """One batch's share of ``C`` applied to K directions given as ``(K, *shape)`` tensors: ``(K, P)``."""
