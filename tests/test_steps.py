"""compare_steps and capture_step measure steps against dense references written in the tests."""

import copy

import pytest
import torch

import curvlab
import curvlab.steps
from curvlab.errors import InvalidProblem
from models import make_case
import reference

# torch.optim class, its arguments besides lr, the curvlab name and hyperparameters of the same step, and how
# the captured step adds weight decay to lr · Δ: "l2" inside Δ (curvlab's one-shot direction has it), "decoupled" after
TORCH_OPTIMIZERS = [
    (torch.optim.SGD, {}, "sgd", {}),
    (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1}, "sgd", {"momentum": 0.9, "weight_decay": 0.1}),
    (torch.optim.Adam, {"weight_decay": 0.1}, "adam", {"weight_decay": 0.1}),
    (torch.optim.AdamW, {"weight_decay": 0.3}, "adamw", {"weight_decay": 0.3}),
    (torch.optim.Adagrad, {"weight_decay": 0.05, "initial_accumulator_value": 0.2}, "adagrad",
     {"weight_decay": 0.05, "initial_accumulator_value": 0.2}),
]


def _problem(case_name="mlp_ce", batches=True):
    case = make_case(case_name)
    return case, curvlab.Problem(case.model, case.batches if batches else case.data, case.loss)


def _flat(prob, step):
    return prob.flatten(step)


@pytest.mark.parametrize("torch_class, arguments, name, hyper", TORCH_OPTIMIZERS)
def test_captured_torch_step_equals_learning_rate_times_builtin_direction_float64(torch_class, arguments, name, hyper):
    case, prob = _problem()
    lr = 0.05
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    captured = curvlab.capture_step(lambda params: torch_class(params, lr=lr, **arguments), prob)
    method = curvlab.optim.method(name, **hyper)
    direction, _ = curvlab.optim.one_shot(method, prob)
    update, _ = method.rule.apply(direction, method.rule.init(prob.params), prob.params)  # + weight decay
    torch.testing.assert_close(_flat(prob, captured.step), lr * _flat(prob, update), rtol=0, atol=1e-12)
    assert captured.lr == lr
    assert captured.loss == pytest.approx(reference.loss(case.model, case.batches, case.loss, "mean").item(), rel=1e-14)
    for n, p in case.model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None


def test_captured_step_is_measured_without_sharpness():
    _, prob = _problem()
    captured = curvlab.capture_step(lambda params: torch.optim.SGD(params, lr=0.1), prob)
    table = captured.measure(damping=0.1)
    row = table.iloc[0]
    assert row["optimizer"] == "captured" and row["threshold_2_over_lr"] == pytest.approx(20.0)
    assert row["sharpness"] != row["sharpness"] and "no linear map" in row["sharpness_method"]
    direct = curvlab.compare_steps(prob, ["sgd"], damping=0.1, progress=False).iloc[0]
    # the captured step is 0.1 g: the same direction as SGD's one-shot g, a tenth of its length
    assert row["cos_natural_gradient"] == pytest.approx(direct["cos_natural_gradient"], abs=1e-12)
    assert row["norm_ratio"] == pytest.approx(0.1 * direct["norm_ratio"], rel=1e-12)


def test_natural_gradient_optimizer_agrees_with_the_natural_gradient_reference():
    _, prob = _problem("cnn")
    table = curvlab.compare_steps(prob, ["natural_gradient", "sgd"], damping=1e-3, progress=False).set_index("optimizer")
    row = table.loc["natural_gradient"]
    assert row["cos_natural_gradient"] == pytest.approx(1.0, abs=1e-10)
    assert row["norm_ratio"] == pytest.approx(1.0, abs=1e-10)
    assert row["quadratic_decrease_ratio"] == pytest.approx(1.0, abs=1e-10)
    assert table.loc["sgd", "cos_natural_gradient"] < 0.99


def test_newton_reference_exists_only_where_the_damped_hessian_is_positive_definite():
    case, prob = _problem()
    lowest = torch.linalg.eigvalsh(reference.hessian(case.model, case.batches, case.loss, "mean"))[0].item()
    assert lowest < -1e-3
    indefinite = curvlab.compare_steps(prob, ["newton"], damping=1e-3, progress=False).iloc[0]
    assert not indefinite["newton_positive_definite"] and indefinite["cos_newton"] != indefinite["cos_newton"]
    damping = 2 * abs(lowest)
    definite = curvlab.compare_steps(prob, ["newton"], damping=damping, reference="newton",
                                     hyperparameters={"newton": {"damping": damping}}, progress=False).iloc[0]
    assert definite["newton_positive_definite"]
    assert definite["cos_newton"] == pytest.approx(1.0, abs=1e-10)
    assert definite["norm_ratio"] == pytest.approx(1.0, abs=1e-10)


def test_saddle_free_newton_optimizer_agrees_with_the_abs_hessian_reference():
    _, prob = _problem("mlp_mse")
    row = curvlab.compare_steps(prob, ["newton"], reference="newton_abs", damping=1e-2, progress=False,
                                hyperparameters={"newton": {"curvature": "abs_hessian", "damping": 1e-2}}).iloc[0]
    assert row["cos_newton_abs"] == pytest.approx(1.0, abs=1e-10)
    assert row["norm_ratio"] == pytest.approx(1.0, abs=1e-10)


def _linear_regression():
    """A quadratic loss: a linear model under mean squared error."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).double()
        X, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    return model, (X, y)


def test_sgd_on_a_quadratic_has_the_closed_form_decrease_and_loss_change():
    model, data = _linear_regression()
    prob = curvlab.Problem(model, data, "mse")
    row = curvlab.compare_steps(prob, ["sgd"], progress=False).iloc[0]
    H = reference.hessian(model, [data], "mse", "mean").detach()
    g = reference.gradient(model, [data], "mse", "mean").detach()
    alpha = (g @ g) / (g @ H @ g)
    decrease = (g @ g) ** 2 / (2 * (g @ H @ g))
    assert row["alpha_star"] == pytest.approx(alpha.item(), rel=1e-12)
    assert row["quadratic_decrease"] == pytest.approx(decrease.item(), rel=1e-12)
    # on a quadratic α* is the exact minimiser along g: the line search keeps it, and the loss falls by the decrease
    assert row["line_search_alpha"] == pytest.approx(alpha.item(), rel=1e-12)
    assert row["loss_change"] == pytest.approx(-decrease.item(), rel=1e-9)


@pytest.mark.parametrize("dense_limit", [512, 0])
def test_sharpness_of_sgd_is_the_largest_hessian_eigenvalue(dense_limit, monkeypatch):
    monkeypatch.setattr(curvlab.steps, "DENSE_SHARPNESS_LIMIT", dense_limit)
    case, prob = _problem()
    row = curvlab.compare_steps(prob, ["sgd"], lr=0.1, progress=False).iloc[0]
    H = reference.hessian(case.model, case.batches, case.loss, "mean").detach()
    # dense: eigenvalues of the non-symmetric P⁻¹H path; ARPACK: tol 1e-6
    assert row["sharpness"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-10 if dense_limit else 1e-6)
    assert row["threshold_2_over_lr"] == pytest.approx(20.0)
    assert row["stability_threshold"] == pytest.approx(20.0)


def test_sharpness_of_the_natural_gradient_is_that_of_the_damped_inverse_ggn_times_hessian():
    case, prob = _problem()
    row = curvlab.compare_steps(prob, ["natural_gradient"], lr=0.1, damping=1e-2,
                                hyperparameters={"natural_gradient": {"damping": 1e-2}}, progress=False).iloc[0]
    H = reference.hessian(case.model, case.batches, case.loss, "mean").detach()
    G = reference.ggn(case.model, case.batches, case.loss, "mean").detach()
    expected = torch.linalg.eigvals(torch.linalg.solve(G + 1e-2 * torch.eye(len(G), dtype=G.dtype), H)).real.max()
    assert row["sharpness"] == pytest.approx(expected.item(), rel=1e-8)
    assert row["stability_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1)  # heavy-ball momentum 0.9


def test_per_block_rows_measure_each_module_with_its_hessian_block():
    case, prob = _problem()
    table = curvlab.compare_steps(prob, ["sgd", "natural_gradient"], per_block=True, progress=False)
    assert list(table["block"]) == ["all", "0", "2"] * 2
    sgd = table[(table.optimizer == "sgd") & (table.block == "2")].iloc[0]
    H = reference.hessian(case.model, case.batches, case.loss, "mean").detach()
    g = reference.gradient(case.model, case.batches, case.loss, "mean").detach()
    index = prob.entries(["2.weight", "2.bias"])
    g_b, H_b = g[index], H[index][:, index]
    assert sgd["quadratic_decrease"] == pytest.approx(((g_b @ g_b) ** 2 / (2 * g_b @ H_b @ g_b)).item(), rel=1e-10)
    G = reference.ggn(case.model, case.batches, case.loss, "mean").detach()
    natural = torch.linalg.solve(G + 1e-3 * torch.eye(len(g), dtype=g.dtype), g)[index]
    cosine = (g_b @ natural) / (g_b.norm() * natural.norm())
    assert sgd["cos_natural_gradient"] == pytest.approx(cosine.item(), rel=1e-10)
    assert table[table.optimizer == "natural_gradient"]["cos_natural_gradient"].tolist() == pytest.approx([1.0] * 3,
                                                                                                         abs=1e-10)
    assert table[table.block != "all"]["sharpness"].isna().all()


def test_trajectory_leaves_the_model_untouched_and_measures_each_requested_step():
    case, prob = _problem("cnn")
    before = copy.deepcopy(case.model.state_dict())
    table = curvlab.compare_steps(prob, ["sgd", "adam"], mode="trajectory", steps=6, at=[0, 3, 5], progress=False)
    assert list(zip(table.optimizer, table.step)) == [("sgd", 0), ("sgd", 3), ("sgd", 5), ("adam", 0), ("adam", 3),
                                                     ("adam", 5)]
    assert (table["mode"] == "trajectory").all() and table["sharpness"].notna().all()
    for name, value in case.model.state_dict().items():
        assert torch.equal(value, before[name])
    default = curvlab.compare_steps(prob, ["sgd"], mode="trajectory", steps=10, progress=False)
    assert list(default.step) == [0, 3, 6, 9]


def test_trajectory_step_of_the_full_batch_natural_gradient_is_the_reference_at_each_point():
    # one batch and no momentum: the applied step is lr · (G + λI)⁻¹ g at θ_before, the reference there
    case, prob = _problem(batches=False)
    table = curvlab.compare_steps(prob, ["natural_gradient", "sgd"], mode="trajectory", steps=3, at=[0, 2],
                                  lr={"natural_gradient": 0.5}, progress=False,
                                  hyperparameters={"natural_gradient": {"momentum": 0.0}})
    natural = table[table.optimizer == "natural_gradient"]
    assert natural["cos_natural_gradient"].tolist() == pytest.approx([1.0, 1.0], abs=1e-10)
    assert natural["norm_ratio"].tolist() == pytest.approx([0.5, 0.5], rel=1e-10)
    sgd = table[table.optimizer == "sgd"].iloc[0]
    g = reference.gradient(case.model, case.batches, case.loss, "mean").detach()
    G = reference.ggn(case.model, case.batches, case.loss, "mean").detach()
    ng = torch.linalg.solve(G + 1e-3 * torch.eye(len(g), dtype=g.dtype), g)
    assert sgd["norm_ratio"] == pytest.approx((0.1 * g.norm() / ng.norm()).item(), rel=1e-10)


@pytest.mark.parametrize("arguments, match", [
    ({"mode": "online"}, "one_shot, trajectory"),
    ({"reference": "fisher"}, "natural_gradient, newton_abs, newton"),
    ({"optimizers": ["sgd", "lbfgs"]}, "unknown optimizer"),
    ({"optimizers": ["sgd", "sgd"]}, "twice"),
    ({"damping": 0.0}, "damping"),
    ({"mode": "trajectory", "steps": 3, "at": [3]}, "below steps=3"),
    ({"mode": "trajectory", "steps": 0}, "steps"),
    ({"lr": -1.0}, "lr"),
    ({"lr": {"adam": 0.1}}, "not compared"),
    ({"hyperparameters": {"adam": {}}}, "not compared"),
    ({"hyperparameters": {"sgd": {"betas": (0.9, 0.9)}}}, "has no hyperparameter betas"),
])
def test_bad_arguments_are_refused(arguments, match):
    _, prob = _problem()
    arguments = {"optimizers": ["sgd"], **arguments}
    with pytest.raises(InvalidProblem, match=match):
        curvlab.compare_steps(prob, progress=False, **arguments)


def test_bad_capture_arguments_are_refused():
    case, prob = _problem()
    with pytest.raises(InvalidProblem, match="curvlab.Problem"):
        curvlab.compare_steps(case.model)
    with pytest.raises(InvalidProblem, match="torch.optim.Optimizer"):
        curvlab.capture_step(lambda params: None, prob)
    with pytest.raises(InvalidProblem, match="curvlab.Problem"):
        curvlab.capture_step(lambda params: torch.optim.SGD(params, lr=0.1), case.model)


def test_matrix_free_references_beyond_the_budget_agree_with_the_dense_ones(monkeypatch):
    _, prob = _problem()
    names = ["sgd", "kfac", "natural_gradient"]
    dense = curvlab.compare_steps(prob, names, damping=1e-2, progress=False,
                                  hyperparameters={"natural_gradient": {"damping": 1e-2}})
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1")
    free = curvlab.compare_steps(prob, names, damping=1e-2, progress=False,
                                 hyperparameters={"natural_gradient": {"damping": 1e-2}})
    assert (dense["exact"] == "dense").all() and (free["exact"] == "matrix-free").all()
    assert list(free["newton_positive_definite"]) == list(dense["newton_positive_definite"]) == [False] * 3
    # CG (references and the natural-gradient optimizer) stops at a √ε ≈ 1.5e-8 relative residual
    for column in ("cos_natural_gradient", "norm_ratio", "quadratic_decrease", "sharpness", "loss_change"):
        assert free[column].tolist() == pytest.approx(dense[column].tolist(), rel=1e-6), column
    # SGD's and KFAC's steps do not depend on the budget, and Hessian products are exact either way
    assert free["quadratic_decrease"][:2].tolist() == pytest.approx(dense["quadratic_decrease"][:2].tolist(), rel=1e-12)


@pytest.mark.parametrize("dense_limit", [0, 10 ** 6])
def test_soap_takes_no_one_shot_step_and_its_sharpness_is_zero(monkeypatch, dense_limit):
    """SOAP's first step only initialises its eigenbases: a zero step, no cosine, P⁻¹ = 0."""
    monkeypatch.setattr(curvlab.steps, "DENSE_SHARPNESS_LIMIT", dense_limit)
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    row = curvlab.compare_steps(prob, ["soap"], progress=False).iloc[0]
    assert row["norm_ratio"] == 0 and row["cos_natural_gradient"] != row["cos_natural_gradient"]
    assert row["sharpness"] == 0


def test_curvatures_at_hand_are_taken_instead_of_built_and_change_no_number(monkeypatch):
    from curvlab.operators import DenseMatrix
    from curvlab.operators.base import CurvatureOperator

    _, prob = _problem("cnn")
    names = ["natural_gradient", "newton", "kfac", "sgd"]
    expected = curvlab.compare_steps(prob, names, per_block=True, progress=False)
    hessian = curvlab.curvature(prob, "hessian").to_dense(progress=False)
    curvatures = {"hessian": DenseMatrix(prob, "hessian", hessian, torch.linalg.eigh((hessian + hessian.T) / 2)),
                  "ggn": DenseMatrix(prob, "ggn", curvlab.curvature(prob, "ggn").to_dense(progress=False))}
    built = []
    original = CurvatureOperator.to_dense
    monkeypatch.setattr(CurvatureOperator, "to_dense",
                        lambda self, *args, **kwargs: built.append(self.kind) or original(self, *args, **kwargs))
    table = curvlab.compare_steps(prob, names, per_block=True, progress=False, curvatures=curvatures)
    assert "hessian" not in built and "ggn" not in built  # the references and the exact methods took them
    numbers = expected.select_dtypes("number").columns
    torch.testing.assert_close(torch.tensor(table[numbers].to_numpy(dtype=float)),
                               torch.tensor(expected[numbers].to_numpy(dtype=float)), rtol=1e-10, atol=1e-12,
                               equal_nan=True)
