"""The |λ|-Hessian ``|H| = V |Λ| Vᵀ``, from ``H = V Λ Vᵀ``.

Within the dense budget, ``eigh`` of the dense Hessian gives every eigenpair. Beyond it, the top-k
eigenpairs by magnitude come from implicitly restarted Lanczos (ARPACK) on the Hessian product, and
``|H|`` is the rank-k matrix ``V_k |Λ_k| V_kᵀ``; :attr:`method` says which was used.
"""

import numpy as np
import torch
from scipy.sparse.linalg import eigsh

from curvlab.errors import DenseTooLarge, require_integer
from curvlab.memory import check_dense
from curvlab.operators.base import CurvatureOperator
from curvlab.operators.hessian import Hessian


class AbsHessian(CurvatureOperator):
    """``|H| = V |Λ| Vᵀ``, shape ``(P, P)``, positive semi-definite, with the eigenvectors of ``H``."""

    kind = "abs_hessian"

    def __init__(self, problem, top_k: int = 20, seed: int = 0):
        super().__init__(problem)
        self.top_k = require_integer("top_k", top_k)
        self.seed = seed
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None
        self.method: str | None = None

    @classmethod
    def from_eigen(cls, problem, values: torch.Tensor, vectors: torch.Tensor, method: str) -> "AbsHessian":
        """``V |Λ| Vᵀ`` from an eigendecomposition ``H = V Λ Vᵀ`` already at hand, obtained by ``method``."""
        op = cls(problem)
        op._eigen = (values.to(device=op.device, dtype=op.dtype), vectors.to(device=op.device, dtype=op.dtype))
        op.method = method
        return op

    def eigen(self, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``Λ`` (ascending, signed) and eigenvectors ``V`` (columns) of ``H`` that ``|H|`` uses."""
        if self._eigen is None:
            hessian = Hessian(self.problem)
            P = self.shape[0]
            try:
                check_dense(P, P, self.dtype, self.device, "Hessian")
            except DenseTooLarge:
                self._eigen = self._top_k(hessian)
                self.method = f"top-{self._eigen[0].numel()} eigenpairs by |λ| (ARPACK Lanczos)"
            else:
                self._eigen = torch.linalg.eigh(hessian.to_dense(progress=progress))
                self.method = "eigh of the dense Hessian"
        return self._eigen

    def _top_k(self, hessian: Hessian) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.shape[0]
        k = min(self.top_k, P - 1)
        start = np.random.default_rng(self.seed).standard_normal(P)
        with hessian.reusing_passes():
            values, vectors = eigsh(hessian.to_scipy(), k=k, which="LM", v0=start)
        order = np.argsort(values)
        as_tensor = dict(dtype=self.dtype, device=self.device)
        return torch.as_tensor(values[order], **as_tensor), torch.as_tensor(vectors[:, order], **as_tensor)

    def to_dense(self, budget: int | None = None, progress: bool = True) -> torch.Tensor:
        """``V |Λ| Vᵀ`` directly from the eigenpairs (within the memory budget, as for every operator)."""
        P = self.shape[0]
        check_dense(P, P, self.dtype, self.device, f"{self.kind} matrix", budget)
        values, vectors = self.eigen(progress)
        return (vectors * values.abs()) @ vectors.T

    def _matmat(self, rows):
        values, vectors = self.eigen(progress=False)
        return (rows @ vectors * values.abs()) @ vectors.T
