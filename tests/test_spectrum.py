"""Eigenpairs (curvlab.spectra.spectrum) against ``torch.linalg.eigh`` of dense float64 matrices.

Lanczos is checked on the indefinite Hessians and the low-rank GGNs of tiny models, and on a
synthetic operator whose spectrum has tight clusters at both ends (members 10⁻⁶ apart, relative),
where single eigenvectors are ill-determined and the cluster's subspace is compared instead.
"""

from __future__ import annotations

import functools

import pytest
import torch

import curvlab
import models
from curvlab.operators.base import CurvatureOperator
from curvlab.spectra.spectrum import spectrum

TOL = 1e-10


class SymmetricMatrix(CurvatureOperator):
    """A given symmetric ``(P, P)`` matrix as a curvature operator."""

    kind = "synthetic"

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    @property
    def shape(self):
        return tuple(self.matrix.shape)

    @property
    def dtype(self):
        return self.matrix.dtype

    @property
    def device(self):
        return self.matrix.device

    def _matmat(self, rows):
        return rows @ self.matrix


class CountingOperator:
    """Wraps an operator and records how many directions each product had."""

    def __init__(self, op):
        self.op, self.shape, self.dtype, self.device, self.kind = op, op.shape, op.dtype, op.device, op.kind
        self.blocks: list[int] = []

    def reusing_passes(self):
        return self.op.reusing_passes()

    def _apply(self, rows):
        self.blocks.append(rows.shape[0])
        return self.op._apply(rows)

    def to_dense(self, progress=True):
        return self.op.to_dense(progress=progress)


@functools.lru_cache(maxsize=None)
def operator(case_name: str, kind: str, device: str):
    """The float64 curvature operator of a case on all its parameters, and its dense matrix."""
    case = models.make_case(case_name, device, torch.float64)
    op = curvlab.curvature(curvlab.Problem(case.model, case.data, loss=case.loss), kind)
    return op, op.to_dense(progress=False)


def with_spectrum(values: torch.Tensor, device, seed: int = 0) -> SymmetricMatrix:
    """``Q diag(values) Qᵀ`` with a random orthogonal ``Q`` from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64)).Q
    return SymmetricMatrix(((Q * values) @ Q.T).to(device))


def clustered(device) -> SymmetricMatrix:
    """P = 120: 20 and a cluster 10 (1 + i 10⁻⁶), i < 4, on top; −19 and a cluster −9 (1 + i 10⁻⁶) below;
    110 more evenly in [−8, 8]."""
    steps = torch.arange(4, dtype=torch.float64) * 1e-6
    values = torch.cat([torch.tensor([20.0, -19.0], dtype=torch.float64), 10 * (1 + steps), -9 * (1 + steps),
                        torch.linspace(-8, 8, 110, dtype=torch.float64)])
    return with_spectrum(values, device)


def reference(dense: torch.Tensor, which: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` eigenpairs of ``dense`` that ``which`` selects, ascending, from ``eigh``."""
    values, vectors = torch.linalg.eigh(dense)
    order = {"LA": torch.arange(len(values) - k, len(values)), "SA": torch.arange(k),
             "LM": values.abs().argsort()[-k:].sort().values,
             "BE": torch.cat([torch.arange(k // 2), torch.arange(len(values) - (k + 1) // 2, len(values))])}[which]
    return values[order], vectors[:, order]


def assert_matches_eigh(spec, dense, which, k, *, per_vector: bool):
    values, vectors = reference(dense, which, k)
    torch.testing.assert_close(spec.eigenvalues, values, rtol=1e-8, atol=0)
    if per_vector:  # well-separated eigenvalues: each eigenvector up to sign
        cosines = (spec.eigenvectors * vectors).sum(0).abs()
        torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=0, atol=1e-10)
    projector = spec.eigenvectors @ spec.eigenvectors.T
    torch.testing.assert_close(projector, vectors @ vectors.T, rtol=0, atol=1e-8)
    assert bool(spec.converged.all()) and bool((spec.residuals <= TOL).all())


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_lanczos_matches_eigh_on_indefinite_hessians(case_name, which, device):
    op, dense = operator(case_name, "hessian", str(device))
    spec = spectrum(op, method="lanczos", k=5, which=which, tol=TOL, progress=False)
    assert spec.method == "lanczos" and spec.products <= 20 * 5 + 200
    assert_matches_eigh(spec, dense, which, 5, per_vector=True)


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_lanczos_matches_eigh_on_the_top_of_low_rank_ggns(case_name, device):
    op, dense = operator(case_name, "ggn", str(device))
    spec = spectrum(op, method="lanczos", k=5, which="LA", tol=TOL, progress=False)
    assert_matches_eigh(spec, dense, "LA", 5, per_vector=True)


@pytest.mark.parametrize("which, k", [("LA", 5), ("SA", 5), ("LM", 6), ("BE", 10)])
def test_lanczos_resolves_clusters_and_their_subspaces(which, k, device):
    # The wanted set always holds whole clusters, separated by at least 1 from the rest: its
    # projector is well determined though the single eigenvectors inside a cluster are not.
    op = clustered(device)
    spec = spectrum(op, method="lanczos", k=k, which=which, tol=TOL, progress=False)  # default budget
    assert_matches_eigh(spec, op.matrix, which, k, per_vector=False)


def test_lanczos_is_exact_when_the_krylov_space_is_the_whole_space(device):
    # P = 15 ≤ the Krylov dimension 20: one pass spans the space, with a repeated eigenvalue, where
    # the Krylov space becomes invariant and a fresh direction continues it.
    values = torch.tensor([3.0, 3.0, 3.0, -2.0, -2.0, 1.0, 0.0, 0.0, 0.5, 0.25, -1.0, 4.0, 5.0, 6.0, 7.0],
                          dtype=torch.float64)
    op = with_spectrum(values, device)
    spec = spectrum(op, method="lanczos", k=15, which="SA", tol=TOL, progress=False)
    assert spec.products == 15 + 15
    torch.testing.assert_close(spec.eigenvalues, values.sort().values.to(device), rtol=0, atol=1e-13)
    torch.testing.assert_close(spec.eigenvectors.T @ spec.eigenvectors, torch.eye(15, dtype=torch.float64,
                                                                                   device=device), rtol=0, atol=1e-13)
    assert bool(spec.converged.all())


def test_a_starved_lanczos_run_reports_unconverged_pairs_not_wrong_ones(device):
    op, dense = operator("mlp_ce", "hessian", str(device))
    counting = CountingOperator(op)
    spec = spectrum(counting, method="lanczos", k=5, which="LA", tol=TOL, max_products=15, progress=False)
    assert spec.products == sum(counting.blocks) == 15
    assert not bool(spec.converged.all())
    assert torch.equal(spec.converged, spec.residuals <= TOL)
    # Whatever it claims holds: a converged pair's value is within its residual of an eigenvalue.
    eigenvalues = torch.linalg.eigvalsh(dense)
    distance = (spec.eigenvalues[:, None] - eigenvalues).abs().min(1).values
    bound = spec.residuals * torch.clamp(spec.eigenvalues.abs(), min=1e-3 * float(eigenvalues.abs().max()))
    assert bool((distance[spec.converged] <= 1.01 * bound[spec.converged]).all())


def test_products_are_counted_and_stay_within_max_products(device):
    op, _ = operator("mlp_ce", "hessian", str(device))
    counting = CountingOperator(op)
    spec = spectrum(counting, method="lanczos", k=5, tol=TOL, max_products=60, progress=False)
    assert spec.products == sum(counting.blocks) <= 60
    assert counting.blocks[-1] == 5  # the final check applies the k Ritz vectors in one block


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_dense_method_equals_eigh_of_the_symmetrised_matrix(which, device):
    # The Hessian has repeated eigenvalues, where eigh's vectors are one basis among many: compare
    # with eigh of the very matrix the method decomposes.
    op, dense = operator("mlp_ce", "hessian", str(device))
    values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
    full = spectrum(op, method="dense", k=None, progress=False)
    assert torch.equal(full.eigenvalues, values) and torch.equal(full.eigenvectors, vectors)
    assert (full.products, full.method) == (op.shape[0], "dense") and bool(full.converged.all())
    assert bool((full.residuals <= 1e-12).all())
    spec = spectrum(op, method="dense", k=7, which=which, progress=False)
    chosen, _ = reference((dense + dense.T) / 2, which, 7)
    assert torch.equal(spec.eigenvalues, chosen)
    assert torch.equal(spec.eigenvectors, vectors[:, torch.isin(values, chosen)])


def test_auto_is_dense_within_the_memory_budget_and_lanczos_beyond(monkeypatch, device):
    op, dense = operator("mlp_ce", "hessian", str(device))
    assert spectrum(op, k=3, progress=False).method == "dense"
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1000")
    spec = spectrum(op, k=3, tol=TOL, progress=False)
    assert spec.method == "lanczos"
    torch.testing.assert_close(spec.eigenvalues, reference(dense, "LA", 3)[0], rtol=1e-8, atol=0)


def test_same_seed_gives_identical_numbers_and_other_seeds_the_same_eigenvalues(device):
    op, _ = operator("cnn", "hessian", str(device))
    first, again, other = (spectrum(op, method="lanczos", k=4, which="BE", tol=TOL, seed=seed, progress=False)
                           for seed in (0, 0, 1))
    for name in ("eigenvalues", "eigenvectors", "residuals", "converged"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert first.products == again.products
    torch.testing.assert_close(other.eigenvalues, first.eigenvalues, rtol=1e-8, atol=0)


def test_caller_random_state_is_untouched(device):
    op, _ = operator("mlp_ce", "hessian", str(device))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    spectrum(op, method="lanczos", k=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_eigenvectors_are_left_out_on_request(device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    for method in ("dense", "lanczos"):
        spec = spectrum(op, method=method, k=2, vectors=False, progress=False)
        assert spec.eigenvectors is None and spec.eigenvalues.shape == (2,)


@pytest.mark.parametrize("arguments, message", [
    (dict(method="arnoldi"), "unknown method"),
    (dict(method="slq", probes=0), "probes must be"),
    (dict(method="slq", steps=1), "steps must be"),
    (dict(method="slq", width=-1.0), "width must be"),
    (dict(method="slq", log_eps=0.0), "log_eps must be"),
    (dict(which="LR"), "unknown which"),
    (dict(k=0), "k must be"),
    (dict(k=85), "k must be"),
    (dict(k=2.5), "k must be"),
    (dict(tol=0.0), "tol must be"),
    (dict(method="lanczos", k=None), "give k"),
    (dict(method="lanczos", k=5, max_products=9), "max_products"),
])
def test_bad_arguments_raise_invalid_problem(arguments, message, device):
    op, _ = operator("mlp_ce", "hessian", str(device))
    with pytest.raises(curvlab.InvalidProblem, match=message):
        spectrum(op, progress=False, **arguments)
