"""The low-rank approximation equals the dense rank-k truncation from ``eigh`` (float64), with its diagonal."""

import pytest
import torch

import reference
from curvlab import Problem, curvature
from curvlab.approx import approximate
from curvlab.errors import InvalidProblem
from models import make_case

# mlp_ce (P = 84): the GGN's 5th and 6th largest eigenvalues are 0.259 and 0.207, the Hessian's 2nd
# and 3rd largest magnitudes 0.675 and 0.628, so both truncations are well defined.
CASES = {"ggn": 5, "hessian": 2}
TOL = 1e-10  # Lanczos' relative residual: eigenvectors to about TOL |θ| / gap ≈ 1e-9


def _problem_and_dense(kind):
    case = make_case("mlp_ce")
    problem = Problem(case.model, case.batches, case.loss)
    return problem, reference.dense(kind, case.model, case.batches, case.loss, "mean")


def _truncation(dense, k, p=1.0):
    """``V_k Λ_k^p V_kᵀ`` over the ``k`` eigenvalues of largest magnitude, from ``eigh``."""
    values, vectors = torch.linalg.eigh(dense)
    top = values.abs().argsort(descending=True)[:k]
    return (vectors[:, top] * values[top] ** p) @ vectors[:, top].T


def _relative(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.fixture(scope="module", params=list(CASES))
def built(request):
    kind = request.param
    problem, dense = _problem_and_dense(kind)
    k = CASES[kind]
    plain = approximate(problem, "lowrank", kind, k=k, tol=TOL, progress=False)
    with_diagonal = approximate(problem, "lowrank", kind, k=k, tol=TOL, diagonal="exact", progress=False)
    return kind, dense, _truncation(dense, k), plain, with_diagonal


def test_lowrank_equals_the_dense_rank_k_truncation(built):
    _, dense, truncation, plain, _ = built
    assert plain.blocks[0][0] == "all" and bool(plain.converged.all())
    assert _relative(plain.to_dense(), truncation) < 1e-8
    assert torch.allclose(plain.eigenvalues.abs().sort().values,
                          torch.linalg.eigvalsh(dense).abs().sort().values[-plain.eigenvalues.numel():], rtol=1e-9)


def test_exact_diagonal_is_the_residual_diagonal_so_the_diagonal_is_exact(built):
    _, dense, truncation, plain, with_diagonal = built
    expected = truncation + torch.diag(torch.diagonal(dense - truncation))
    assert _relative(with_diagonal.to_dense(), expected) < 1e-8
    # diag C̃ = diag(V Λ Vᵀ) + diag(C) − diag(V Λ Vᵀ): exact up to rounding of O(1) entries.
    assert torch.allclose(torch.diagonal(with_diagonal.to_dense()), torch.diagonal(dense), rtol=0, atol=1e-12)
    assert with_diagonal.products == plain.products + dense.shape[0]


@pytest.mark.parametrize("damping", [1e-2, 0.5])
def test_woodbury_inverse_is_the_inverse_of_the_damped_truncation(built, damping):
    _, dense, truncation, plain, with_diagonal = built
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    assert _relative(plain.inverse(damping).to_dense(), torch.linalg.inv(truncation + damping * eye)) < 1e-8
    # The residual diagonal of the Hessian has entries of both signs; shift it clear of zero.
    shift = float(with_diagonal.diagonal.abs().max()) + damping
    expected = torch.linalg.inv(truncation + torch.diag(torch.diagonal(dense - truncation)) + shift * eye)
    assert _relative(with_diagonal.inverse(shift).to_dense(), expected) < 1e-8


def test_power_is_the_power_of_the_truncation(built):
    kind, dense, _, plain, with_diagonal = built
    k = plain.eigenvalues.numel()
    for p in ([0.5, 2.0] if kind == "ggn" else [2.0, 3.0]):  # the Hessian's top pairs have both signs
        assert _relative(plain.power(p).to_dense(), _truncation(dense, k, p)) < 1e-8
    with pytest.raises(InvalidProblem, match="no cheap power"):
        with_diagonal.power(0.5)


def test_wraps_a_given_operator_as_the_curvature_it_stands_for():
    case = make_case("mlp_ce")
    problem = Problem(case.model, case.batches, case.loss)
    blocks = curvature(problem, "ggn", block_diagonal=True)
    dense = torch.block_diag(*[reference.dense("ggn", case.model, case.batches, case.loss, "mean", names)
                               for _, names in problem.module_blocks()])
    ap = approximate(problem, "lowrank", "ggn", k=3, tol=TOL, operator=blocks, progress=False)
    assert ap.curvature == "ggn"
    assert _relative(ap.to_dense(), _truncation(dense, 3)) < 1e-8
    with pytest.raises(InvalidProblem, match="do not apply to a given operator"):
        approximate(problem, "lowrank", "ggn", k=3, operator=blocks, block_diagonal=True, progress=False)


def test_unconverged_ritz_pairs_are_refused_or_kept_with_a_warning():
    problem, _ = _problem_and_dense("ggn")
    # 2k products: k Lanczos steps cannot resolve 5 eigenpairs of an 84-dimensional operator to 1e-10.
    options = dict(k=5, tol=TOL, max_products=10, progress=False)
    with pytest.raises(InvalidProblem, match="did not converge"):
        approximate(problem, "lowrank", "ggn", **options)
    with pytest.warns(UserWarning, match="did not converge"):
        kept = approximate(problem, "lowrank", "ggn", unconverged="warn", **options)
    assert not bool(kept.converged.all())
    assert bool((kept.residuals[~kept.converged] > TOL).all())


def test_seeded_and_caller_rng_untouched():
    problem, _ = _problem_and_dense("ggn")
    state = torch.get_rng_state()
    first = approximate(problem, "lowrank", "fisher_mc", k=3, tol=1e-8, seed=3, progress=False)
    second = approximate(problem, "lowrank", "fisher_mc", k=3, tol=1e-8, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.to_dense(), second.to_dense())


@pytest.mark.parametrize("options, message", [
    (dict(k=0), "k must be"),
    (dict(k=85), "k must be"),
    (dict(which="XX"), "unknown which"),
    (dict(diagonal="hutchinson"), "unknown diagonal"),
    (dict(tol=0.0), "tol must be"),
    (dict(unconverged="ignore"), "unknown unconverged"),
    (dict(max_products=3), "max_products must be"),
    (dict(samples=4), "unknown option"),
    (dict(seed=-1), "seed must be"),
    (dict(operator=torch.eye(84)), "CurvatureOperator"),
])
def test_bad_input_is_refused(options, message):
    problem, _ = _problem_and_dense("ggn")
    with pytest.raises(InvalidProblem, match=message):
        approximate(problem, "lowrank", "ggn", **{"k": 2, "progress": False, **options})
    with pytest.raises(InvalidProblem, match="unknown curvature kind"):
        approximate(problem, "lowrank", "gauss_newton")
