"""Newton, saddle-free Newton and the exact natural gradient equal (C + λI)⁻¹ g with C from the dense references."""

import copy

import pytest
import torch

import curvlab
from curvlab.errors import InvalidProblem
from curvlab.optim.exact import DampedInverse, damped_solve
from models import make_case
import reference

DAMPING = 1e-2
# (builder, curvature) -> the dense reference of tests/reference.py
EXACT = [("newton", "hessian"), ("newton", "abs_hessian"), ("natural_gradient", "ggn"), ("natural_gradient", "fisher"),
         ("natural_gradient", "empirical_fisher")]


def _dense_curvature(case, kind, batches=None, op=None):
    batches = case.batches if batches is None else batches
    if kind == "fisher_mc":
        return reference.mc_fisher(case.model, batches, case.loss, "mean", op.sampled_targets()).detach()
    return reference.dense(kind, case.model, batches, case.loss, "mean")


def _expected_step(case, kind, damping, batches=None, op=None):
    """(C + λI)⁻¹ g by torch.linalg.solve (LU) on the dense reference matrix C."""
    batches = case.batches if batches is None else batches
    C = _dense_curvature(case, kind, batches, op)
    g = reference.gradient(case.model, batches, case.loss, "mean").detach()
    return torch.linalg.solve(C + damping * torch.eye(len(g), dtype=g.dtype), g)


def _flat(case, direction):
    return torch.cat([direction[name].reshape(-1) for name in case.param_names])


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
@pytest.mark.parametrize("name, kind", EXACT)
def test_one_shot_direction_matches_dense_formula_float64(case_name, name, kind, device):
    case = make_case(case_name, device=device)
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    direction, linear = curvlab.optim.one_shot(curvlab.optim.method(name, curvature=kind, damping=DAMPING), prob)
    expected = _expected_step(case, kind, DAMPING)
    torch.testing.assert_close(_flat(case, direction), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(case, linear(prob.unflatten(prob.gradient()))), expected, rtol=1e-10, atol=1e-12)


def test_mc_fisher_natural_gradient_matches_dense_formula_at_the_sampled_labels_float64():
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    method = curvlab.optim.method("natural_gradient", curvature="fisher_mc", mc_samples=3, damping=DAMPING)
    direction, _ = curvlab.optim.one_shot(method, prob, seed=2)
    # one_shot is step 0: the labels are drawn with seed (2 · 1000003 + 0) · 97 (Statistics.seed_for)
    op = curvlab.curvature(prob, "fisher_mc", mc_samples=3, seed=2 * 1_000_003 * 97)
    torch.testing.assert_close(_flat(case, direction), _expected_step(case, "fisher_mc", DAMPING, op=op),
                               rtol=1e-10, atol=1e-12)


def test_newton_with_indefinite_hessian_solves_by_lu_and_says_so():
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    H = _dense_curvature(case, "hessian")
    damping = 1e-4
    assert torch.linalg.eigvalsh(H)[0] + damping < 0  # the case is indefinite: the LU branch is exercised
    inverse = DampedInverse(curvlab.curvature(prob, "hessian"), damping)
    assert inverse.method == "lu" and not inverse.positive_definite()
    g = prob.gradient()
    torch.testing.assert_close(inverse.solve(g), torch.linalg.solve(H + damping * torch.eye(len(g), dtype=g.dtype), g),
                               rtol=1e-9, atol=1e-12)
    assert DampedInverse(curvlab.curvature(prob, "ggn"), damping).method == "cholesky"


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "hessian", "abs_hessian"])
def test_matrix_free_solve_beyond_the_budget_matches_dense_formula(kind, monkeypatch):
    case = make_case("mlp_mse")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    damping = 0.05 if kind != "hessian" else 0.08  # H + 0.08 I is indefinite, min |λ + 0.08| ≈ 0.018: κ ≈ 100
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1")
    op = curvlab.curvature(prob, kind, top_k=prob.num_params - 2)
    inverse = DampedInverse(op, damping, tol=1e-12, max_iterations=2000)
    g = prob.gradient()
    if kind == "abs_hessian":
        # beyond the budget |H| keeps the top-k eigenpairs by |λ|: the solve is exact for that rank-k matrix
        values, vectors = torch.linalg.eigh(_dense_curvature(case, "hessian"))
        keep = values.abs().argsort(descending=True)[: prob.num_params - 2]
        C = (vectors[:, keep] * values[keep].abs()) @ vectors[:, keep].T
    else:
        C = _dense_curvature(case, kind)
    expected = torch.linalg.solve(C + damping * torch.eye(len(g), dtype=g.dtype), g)
    torch.testing.assert_close(inverse.solve(g), expected, rtol=1e-8, atol=1e-10)
    if kind == "hessian":
        assert inverse.method == "minres" and not inverse.positive_definite()
    elif kind != "abs_hessian":
        assert inverse.method == "cg"


def test_matrix_free_solve_that_does_not_converge_warns(monkeypatch):
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        damped_solve(curvlab.curvature(prob, "ggn"), prob.gradient(), 1e-3, max_iterations=2)


@pytest.mark.parametrize("budget", [None, "1"])
def test_training_steps_use_the_stale_inverse_between_curvature_updates(budget, monkeypatch):
    case = make_case("mlp_ce")
    if budget:
        monkeypatch.setenv("CURVLAB_DENSE_BUDGET", budget)
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("natural_gradient", model, case.loss, lr=0.5, momentum=0.0, damping=DAMPING,
                             curvature_update_interval=2, preconditioner_update_interval=2)
    batches = case.batches[:2] + case.batches[:1]
    curvature_at = None
    for step, batch in enumerate(batches):
        at_step = copy.deepcopy(model)
        at_case = copy.copy(case)
        at_case.model = at_step
        if step % 2 == 0:
            curvature_at = _dense_curvature(at_case, "ggn", [batch])
        g = reference.gradient(at_step, [batch], case.loss, "mean").detach()
        expected = torch.linalg.solve(curvature_at + DAMPING * torch.eye(len(g), dtype=g.dtype), g)
        opt.step(batch)
        # κ(G + λI) reaches 1e4 on the one-example batch: 1e-8 dense; CG stops at a √ε relative residual
        tolerance = 1e-8 if budget is None else 1e-5
        torch.testing.assert_close(_flat(case, opt.last_direction), expected, rtol=tolerance, atol=tolerance * 1e-2)
        theta = torch.cat([p.detach().reshape(-1) for p in at_step.parameters()])
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                                   theta - 0.5 * _flat(case, opt.last_direction), rtol=0, atol=1e-14)


def test_saddle_free_newton_decreases_the_loss():
    case = make_case("mlp_mse")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("newton", model, case.loss, lr=0.5, curvature="abs_hessian", momentum=0.0, damping=0.05)
    losses = [opt.step(case.data) for _ in range(8)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("name, hyper, match", [
    ("newton", {"curvature": "ggn"}, "hessian, abs_hessian"),
    ("natural_gradient", {"curvature": "hessian"}, "ggn, fisher, fisher_mc, empirical_fisher"),
    ("newton", {"damping": 0.0}, "damping"),
    ("natural_gradient", {"mc_samples": 0}, "mc_samples"),
    ("natural_gradient", {"curvature_update_interval": 0}, "curvature_update_interval"),
    ("newton", {"mc_samples": 2}, "has no hyperparameter mc_samples"),
])
def test_bad_hyperparameters_are_refused(name, hyper, match):
    with pytest.raises(InvalidProblem, match=match):
        curvlab.optim.method(name, **hyper)


def test_apply_before_any_curvature_is_refused():
    method = curvlab.optim.method("newton")
    params = {"w": torch.zeros(2)}
    with pytest.raises(InvalidProblem, match="curvature of a batch"):
        method.preconditioner.apply(params, method.preconditioner.init(params), params)
