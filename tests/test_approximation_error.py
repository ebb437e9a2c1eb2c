"""Approximation errors against direct formulas on dense float64 references (tests/reference.py).

The approximations are a block-diagonal GGN (a plain operator: per-module blocks, inverse by a solve)
against the Hessian, and half the GGN's diagonal (an :class:`Approximation` with its own inverse)
against the GGN (and KFAC, when registered). Every expected value is computed in the test from the
reference matrices. The randomized mode runs on a smaller model against the dense mode with the same
probes: Hutchinson estimates within three of their standard errors, Lanczos and conjugate gradients
to their tolerance.

Tolerances. curvlab's operators and the autograd references agree to about 1e-14 relative (see
tests/test_curvature.py). Frobenius quantities are smooth in the entries: rtol 1e-10. Spectral norms
are Lipschitz in the entries: rtol 1e-10. Eigenspace overlaps move by about ε‖C‖/gap, and the damped
solves by the condition number of C + δI (≈ 1e4 at δ = 10⁻³ times the RMS eigenvalue) times the
entries' error, so both get 1e-8.
"""

import math

import pytest
import torch

import curvlab
import models
import reference
from curvlab.approx import Approximation, DiagonalBlock
from curvlab.errors import InvalidProblem
from curvlab.metrics import approximation_error

K = 3
INVERSE_PROBES = 10
SEED = 0
FROBENIUS = ("rel_fro", "rel_fro_scaled", "scale", "cos_fro")


def _problem(case):
    return curvlab.Problem(case.model, case.batches, loss=case.loss)


def _module_slices(prob):
    slices, start = [], 0
    for module, names in prob.module_blocks():
        size = sum(prob.params[name].numel() for name in names)
        slices.append((module, names, slice(start, start + size)))
        start += size
    return slices


def _diagonal_approximation(prob, C):
    """Half the diagonal of ``C``, one :class:`DiagonalBlock` per module (the best scale is then 2)."""
    return Approximation(prob, "half_diag", "ggn", [(module, names, DiagonalBlock(0.5 * C.diagonal()[part].clone()))
                                                    for module, names, part in _module_slices(prob)])


@pytest.fixture(scope="module")
def setting():
    """name -> ``(approx operator, exact operator, dense A, dense C, gradient, problem)``, references by autograd."""
    case = models.make_case("mlp_ce")
    prob = _problem(case)
    args = (case.model, case.batches, case.loss, "mean")
    G = reference.ggn(*args).detach()
    H = reference.hessian(*args).detach()
    block_ggn = torch.zeros_like(G)
    for _, names, part in _module_slices(prob):
        block_ggn[part, part] = reference.ggn(*args, names=names).detach()
    gradient = reference.gradient(*args).detach()
    return {
        "block_ggn_vs_hessian": (curvlab.curvature(prob, "ggn", block_diagonal=True),
                                 curvlab.curvature(prob, "hessian"), block_ggn, H, gradient, prob),
        "half_diagonal_vs_ggn": (_diagonal_approximation(prob, G), curvlab.curvature(prob, "ggn"),
                                 torch.diag(0.5 * G.diagonal()), G, gradient, prob),
    }


def _probes(P, count=INVERSE_PROBES, seed=SEED):
    """The ``inverse_action`` probes as the module documents them: the generator's first ±1 rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (count, P), generator=generator, dtype=torch.float64) * 2 - 1


def _top_projector(M, k):
    """The top-k (magnitude) projector of ``M`` as a ``(p, p)`` matrix, a tie across the k-th place averaged.

    Eigenvalues within √ε‖M‖₂ of the k-th magnitude form the tie; its ``c`` eigenvectors enter with
    weight ``m/c``, ``m`` of them being among the top k.
    """
    values, vectors = torch.linalg.eigh(M)
    magnitudes = values.abs()
    kth = magnitudes.sort(descending=True).values[k - 1]
    tied = (magnitudes - kth).abs() <= 1.5e-8 * magnitudes.max()
    above = magnitudes > kth + 1.5e-8 * magnitudes.max()
    weights = above.double() + tied.double() * (k - int(above.sum())) / int(tied.sum())
    return vectors @ torch.diag(weights) @ vectors.T


def _direct(A, C, V, g, damping, k):
    """Every quantity from its definition on dense ``A``, ``C`` ``(p, p)``, probes ``V`` ``(m, p)``, gradient ``g``."""
    fro = torch.linalg.matrix_norm
    alpha = (A * C).sum() / (A * A).sum()
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    k = min(k, A.shape[0])
    P_A, P_C = _top_projector(A, k), _top_projector(C, k)

    def inverse_error(v):
        exact = torch.linalg.solve(C + damping * eye, v)
        return float((torch.linalg.solve(A + damping * eye, v) - exact).norm() / exact.norm())

    errors = torch.tensor([inverse_error(v) for v in V], dtype=torch.float64)
    return {
        "rel_fro": float(fro(A - C) / fro(C)),
        "rel_fro_scaled": float(fro(alpha * A - C) / fro(C)),
        "scale": float(alpha),
        "cos_fro": float((A * C).sum() / (fro(A) * fro(C))),
        "rel_spectral": float(fro(A - C, ord=2) / fro(C, ord=2)),
        "overlap_at_k": float((P_A * P_C).sum() / (fro(P_A) * fro(P_C))),
        "inverse_action": float(errors.mean()),
        "inverse_action_se": float(errors.std() / math.sqrt(len(errors))),
        "inverse_action_gradient": inverse_error(g),
    }


def _assert_matches(actual, expected):
    for key, value in expected.items():
        rtol = 1e-8 if key.startswith(("overlap", "inverse")) else 1e-10
        assert actual[key] == pytest.approx(value, rel=rtol, abs=rtol), key


@pytest.mark.parametrize("name", ["block_ggn_vs_hessian", "half_diagonal_vs_ggn"])
def test_dense_errors_match_direct_formulas(setting, name):
    approx, exact, A, C, gradient, prob = setting[name]
    P = prob.num_params
    err = approximation_error(approx, exact, k=K, progress=False)
    damping = 1e-3 * float(torch.linalg.matrix_norm(C)) / math.sqrt(P)
    assert err["mode"] == "dense" and err["products"] == P
    assert err["damping"] == pytest.approx(damping, rel=1e-10)
    assert err["spectral_converged"] and err["inverse_converged"]
    assert all(err[f"{key}_se"] == 0.0 for key in FROBENIUS)
    _assert_matches(err, _direct(A, C, _probes(P), gradient, damping, K))


@pytest.mark.parametrize("name", ["block_ggn_vs_hessian", "half_diagonal_vs_ggn"])
def test_per_block_table_matches_dense_sub_blocks(setting, name):
    approx, exact, A, C, gradient, prob = setting[name]
    err = approximation_error(approx, exact, k=K, damping=0.01, progress=False)
    table = err["per_block"]
    slices = _module_slices(prob)
    assert list(table["block"]) == [module for module, _, _ in slices]
    V = _probes(prob.num_params)
    for (_, _, part), (_, row) in zip(slices, table.iterrows()):
        assert row["parameters"] == part.stop - part.start
        _assert_matches(row, _direct(A[part, part], C[part, part], V[:, part], gradient[part], 0.01, K))


@pytest.fixture(scope="module")
def small():
    """A smaller model (P = 43, three modules) for the randomized runs, its GGN and two approximations.

    Its top eigenvalues are simple: Lanczos from one start vector sees one copy of an exactly repeated
    eigenvalue (the ``⊗ I`` of an MSE output layer's GGN), so overlaps there would not be comparable.
    """
    case = models.make_case("dict_inputs")
    prob = _problem(case)
    G = curvlab.curvature(prob, "ggn")
    return {"half_diagonal": _diagonal_approximation(prob, G.to_dense()),
            "block_ggn": curvlab.curvature(prob, "ggn", block_diagonal=True), "exact": G}


@pytest.fixture(scope="module", params=["half_diagonal", "block_ggn"])
def dense_and_randomized(request, small):
    """Both modes on the same probes and damping: the approximation's own inverse, or conjugate gradients."""
    approx, exact = small[request.param], small["exact"]
    options = {"k": K, "damping": 0.01, "tol": 1e-10, "progress": False}
    dense = approximation_error(approx, exact, **options)
    state = torch.random.get_rng_state()
    # auto falls back to the randomized mode when the two dense matrices exceed the budget
    randomized = approximation_error(approx, exact, probes=200, budget=1000, **options)
    assert torch.equal(torch.random.get_rng_state(), state)
    return dense, randomized


def _scopes(err):
    return [err] + [row for _, row in err["per_block"].iterrows()]


def test_randomized_estimates_agree_with_dense_within_three_standard_errors(dense_and_randomized):
    dense, randomized = dense_and_randomized
    assert randomized["mode"] == "randomized"
    assert randomized["products"] > dense["products"] == 43
    for exact, estimate in zip(_scopes(dense), _scopes(randomized), strict=True):
        for key in FROBENIUS:
            assert abs(estimate[key] - exact[key]) <= 3 * estimate[f"{key}_se"], key


def test_lanczos_and_conjugate_gradients_match_the_dense_values(dense_and_randomized):
    dense, randomized = dense_and_randomized
    for exact, estimate in zip(_scopes(dense), _scopes(randomized), strict=True):
        assert estimate["spectral_converged"] and estimate["inverse_converged"]
        # Lanczos to residual 1e-10 gives eigenvalues to 1e-10 relative and, with gaps of order 1e-2 of
        # ‖C‖, eigenvectors to about 1e-8; the solves' error is the condition number (< 1e3) times 1e-10.
        assert estimate["rel_spectral"] == pytest.approx(exact["rel_spectral"], rel=1e-8, abs=1e-12)
        assert estimate["overlap_at_k"] == pytest.approx(exact["overlap_at_k"], rel=1e-6)
        for key in ("inverse_action", "inverse_action_se", "inverse_action_gradient"):
            assert estimate[key] == pytest.approx(exact[key], rel=1e-6, abs=1e-12), key


def test_scaled_error_never_exceeds_unscaled(dense_and_randomized):
    for err in dense_and_randomized:
        for scope in _scopes(err):
            assert scope["rel_fro_scaled"] <= scope["rel_fro"] * (1 + 1e-12)


@pytest.mark.parametrize("method", ["dense", "randomized"])
def test_identical_operators_have_zero_error_unit_cosine_and_full_overlap(small, method):
    G = small["exact"]
    k = 50 if method == "dense" else K  # beyond P = 43: capped at each scope's size
    err = approximation_error(G, G, k=k, method=method, probes=4, progress=False)
    for scope in _scopes(err):
        assert scope["k"] == min(k, scope.get("parameters", 43))
        assert scope["rel_fro"] == scope["rel_fro_scaled"] == scope["rel_spectral"] == 0.0
        assert scope["rel_fro_se"] == scope["rel_fro_scaled_se"] == 0.0
        # cos_fro's gradient sums to zero against equal terms, which cancels to rounding only
        assert scope["cos_fro_se"] <= 1e-14
        assert scope["scale"] == pytest.approx(1.0, rel=1e-14) and scope["cos_fro"] == pytest.approx(1.0, rel=1e-14)
        assert scope["overlap_at_k"] == pytest.approx(1.0, rel=1e-10)
        assert scope["inverse_action"] == scope["inverse_action_gradient"] == 0.0
        assert scope["spectral_converged"] and scope["inverse_converged"]


def test_unconverged_conjugate_gradients_give_nan_and_say_so(small):
    err = approximation_error(small["half_diagonal"], small["exact"], k=1, method="randomized", probes=2,
                              max_iterations=1, progress=False)
    for scope in _scopes(err):
        assert not scope["inverse_converged"]
        assert math.isnan(scope["inverse_action"]) and math.isnan(scope["inverse_action_gradient"])


def test_standard_errors_shrink_as_probes_grow(small):
    approx, exact = small["half_diagonal"], small["exact"]
    few, many = (approximation_error(approx, exact, k=1, method="randomized", probes=probes, progress=False)
                 for probes in (16, 144))
    # the standard error falls as 1/√m: by 3 from 16 to 144 probes, up to the noise of its own estimate
    for key in FROBENIUS:
        assert many[f"{key}_se"] < 0.6 * few[f"{key}_se"], key


def test_default_damping_is_a_thousandth_of_the_rms_eigenvalue_in_both_modes(small):
    approx, exact = small["half_diagonal"], small["exact"]
    C = exact.to_dense()
    expected = 1e-3 * float(torch.linalg.matrix_norm(C)) / math.sqrt(C.shape[0])
    dense = approximation_error(approx, exact, k=1, progress=False)
    randomized = approximation_error(approx, exact, k=1, method="randomized", probes=144, progress=False)
    assert dense["damping"] == pytest.approx(expected, rel=1e-12)
    # ‖C‖_F from 144 Hutchinson probes: a few percent off
    assert randomized["damping"] == pytest.approx(expected, rel=0.1)


def _other_problem():
    case = models.make_case("dict_inputs")
    return curvlab.Problem(case.model, case.batches, loss=case.loss, params=r"^head")


@pytest.mark.parametrize("arguments, message", [
    ({"approx": torch.eye(43)}, "must be a curvature operator"),
    ({"approx": "other problem"}, "build both from the same Problem"),
    ({"damping": 0}, "damping must be a finite number > 0"),
    ({"damping": -1.0}, "damping must be a finite number > 0"),
    ({"damping": math.nan}, "damping must be a finite number > 0"),
    ({"damping": True}, "damping must be a finite number > 0"),
    ({"k": 0}, "k must be a positive integer"),
    ({"k": 2.5}, "k must be a positive integer"),
    ({"k": True}, "k must be a positive integer"),
    ({"method": "exact"}, "unknown method 'exact'"),
    ({"probes": 1}, "probes must be an integer of at least 2"),
    ({"inverse_probes": 1}, "inverse_probes must be an integer of at least 2"),
    ({"tol": 0.0}, "tol must be a positive number"),
])
def test_bad_input_is_refused_with_the_fix(small, arguments, message):
    arguments = {"approx": small["half_diagonal"], "exact": small["exact"], "progress": False, **arguments}
    if arguments["approx"] == "other problem":
        arguments["approx"] = curvlab.curvature(_other_problem(), "ggn")
    with pytest.raises(InvalidProblem, match=message):
        approximation_error(**arguments)


@pytest.mark.parametrize("kind", ["kfac", "foof"])
def test_kronecker_approximations_are_measured_block_by_block(setting, kind):
    """KFAC and FOOF, whose blocks are per parameter, against direct formulas on the dense matrix.

    FOOF's ``A ⊗ I`` repeats every eigenvalue ``d_out`` times, so its top 3 eigenvalues are a tie: the
    overlap is that of the tie-averaged projector.
    """
    _, exact, _, C, gradient, prob = setting["half_diagonal_vs_ggn"]
    kfac = curvlab.approx.approximate(prob, kind)
    A = kfac.to_dense()
    err = approximation_error(kfac, exact, k=K, damping=0.01, progress=False)
    V = _probes(prob.num_params)
    _assert_matches(err, _direct(A, C, V, gradient, 0.01, K))
    assert list(err["per_block"]["block"]) == [label for label, _, _ in kfac.blocks]
    for (_, names, _), (_, row) in zip(kfac.blocks, err["per_block"].iterrows()):
        part = prob.entries([name for name in prob.param_names if name in names])
        sub = (part[:, None], part[None, :])
        _assert_matches(row, _direct(A[sub], C[sub], V[:, part], gradient[part], 0.01, K))
