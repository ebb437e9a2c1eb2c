"""NLCG (OPTIMIZERS.md §15): preconditioned CG on quadratics, FR/PR⁺ conjugacy, diagonal BFGS, restarts, line search."""

import copy

import pytest
import torch

import curvlab
from curvlab.errors import InvalidProblem
from curvlab.optim.base import Statistics
from models import make_case
from reference import gradient as reference_gradient
from reference import hessian as reference_hessian
from reference import loss as reference_loss


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _quadratic_case():
    """A linear model with squared error summed over 30 examples: ``L = ½θᵀAθ − bᵀθ + c`` exactly, ``P = 7``."""
    generator = torch.Generator().manual_seed(5)
    model = torch.nn.Linear(6, 1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    X = torch.randn(30, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.3, 3.0, 6, dtype=torch.float64)
    y = torch.randn(30, 1, generator=generator, dtype=torch.float64)
    diagonal = {name: 0.2 + torch.rand(p.shape, generator=generator, dtype=torch.float64)
                for name, p in model.named_parameters()}
    return model, (X, y), diagonal


def _pcg(A, b, x, M, iterations):
    """Textbook preconditioned CG for ``A x = b`` with ``M ≈ A⁻¹`` diagonal: the iterates ``x_1 … x_k``."""
    r = b - A @ x
    z = M * r
    p = z.clone()
    iterates = []
    for _ in range(iterations):
        Ap = A @ p
        alpha = (r @ z) / (p @ Ap)
        x = x + alpha * p
        r_next = r - alpha * Ap
        z_next = M * r_next
        p = z_next + (r_next @ z_next) / (r @ z) * p
        r, z = r_next, z_next
        iterates.append(x)
    return iterates


@pytest.mark.parametrize("variant", ["pr", "fr"])
def test_exact_line_search_with_fixed_diagonal_is_preconditioned_cg_float64(variant):
    model, batch, diagonal = _quadratic_case()
    A = reference_hessian(model, [batch], "mse", "sum")
    x0 = _flat(model)
    b = A @ x0 - reference_gradient(model, [batch], "mse", "sum")
    M = torch.cat([d.reshape(-1) for d in diagonal.values()])
    expected = _pcg(A, b, x0, M, iterations=x0.numel())
    opt = curvlab.optim.make("nlcg", model, "mse", lr=1.0, reduction="sum", variant=variant, preconditioner="fixed",
                             initial_diagonal=diagonal, line_search="exact_quadratic")
    for iterate in expected:
        opt.step(batch)
        torch.testing.assert_close(_flat(model), iterate, rtol=0, atol=1e-9 * float(iterate.abs().max()))
    torch.testing.assert_close(_flat(model), torch.linalg.solve(A, b), rtol=0, atol=1e-8)  # P steps: the minimiser


def _dense_bfgs_diagonal(D, s, y):
    """``diag`` of the full BFGS inverse update ``(I − ρsyᵀ) diag(D) (I − ρysᵀ) + ρssᵀ``."""
    rho = 1 / (s @ y)
    eye = torch.eye(len(D), dtype=D.dtype)
    return ((eye - rho * torch.outer(s, y)) @ torch.diag(D) @ (eye - rho * torch.outer(y, s))
            + rho * torch.outer(s, s)).diagonal()


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_second_direction_matches_dense_fletcher_reeves_and_polak_ribiere_float64(case_name):
    case = make_case(case_name)
    first, second = case.batches[0], case.batches[2]
    lr, directions = 0.5, {}
    for variant in ("fr", "pr"):
        model = copy.deepcopy(case.model)
        opt = curvlab.optim.make("nlcg", model, case.loss, lr=lr, variant=variant, line_search="none")
        opt.step(first)
        opt.step(second)
        directions[variant] = torch.cat([d.reshape(-1) for d in opt.last_direction.values()])
        diagonal_after = torch.cat([d.reshape(-1) for d in opt.method.preconditioner.linear(
            opt.preconditioner_state)({n: torch.ones_like(p) for n, p in model.named_parameters()}).values()])
    theta0 = _flat(case.model)
    g0 = reference_gradient(case.model, [first], case.loss, "mean")
    d0 = -g0  # D_0 = I
    theta1 = theta0 + lr * d0
    model1 = copy.deepcopy(case.model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta1, model1.parameters())
    g1 = reference_gradient(model1, [second], case.loss, "mean")
    s, y = theta1 - theta0, g1 - g0
    assert float(s @ y) > 0  # the BFGS update is exercised
    D1 = _dense_bfgs_diagonal(torch.ones_like(theta0), s, y)
    torch.testing.assert_close(diagonal_after, D1, rtol=1e-10, atol=1e-14)
    z0, z1 = g0, D1 * g1
    betas = {"fr": (g1 @ z1) / (g0 @ z0), "pr": max(0.0, float(g1 @ (z1 - z0) / (g0 @ z0)))}
    for variant, beta in betas.items():
        d1 = -z1 + beta * d0
        assert float(g1 @ d1) < 0  # a descent direction: no restart
        torch.testing.assert_close(directions[variant], -d1, rtol=1e-10, atol=1e-13)
    assert float((directions["fr"] - directions["pr"]).norm()) > 1e-3 * float(directions["fr"].norm())


def _apply_sequence(preconditioner, gradients, params):
    state = preconditioner.init(params[0])
    out = []
    for g, theta in zip(gradients, params):
        direction, state = preconditioner.apply(g, state, theta)
        out.append(direction["w"])
    return out


def _vectors(*rows):
    return [{"w": torch.tensor(row, dtype=torch.float64)} for row in rows]


@pytest.mark.parametrize("variant, expected", [("pr", [0.5, 0.0]), ("fr", [0.75, 0.0])])
def test_polak_ribiere_plus_restarts_where_fletcher_reeves_keeps_the_direction(variant, expected):
    # β_PR = g₁ᵀ(g₁ − g₀)/g₀ᵀg₀ = −0.25 → 0, so Δ₁ = g₁; β_FR = 0.25, so Δ₁ = g₁ + 0.25 g₀.
    pre = curvlab.optim.method("nlcg", variant=variant, preconditioner="fixed", line_search="none").preconditioner
    out = _apply_sequence(pre, _vectors([1.0, 0.0], [0.5, 0.0]), _vectors([0.0, 0.0], [1.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_ascent_direction_and_restart_interval_restart_with_the_preconditioned_gradient():
    pre = curvlab.optim.method("nlcg", variant="fr", preconditioner="fixed", line_search="none",
                               initial_diagonal=2.0).preconditioner
    # D = 2I, β_FR = 4.01: −z₁ + β d₀ = (−4.02, −0.2), g₁ᵀ(−z₁ + β d₀) = 8.02 > 0, so d₁ = −z₁.
    out = _apply_sequence(pre, _vectors([1.0, 0.0], [-2.0, 0.1]), _vectors([0.0, 0.0], [1.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([-4.0, 0.2], dtype=torch.float64), rtol=1e-15, atol=0)
    pre = curvlab.optim.method("nlcg", variant="fr", preconditioner="fixed", line_search="none",
                               restart_interval=2).preconditioner
    gradients = _vectors([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    out = _apply_sequence(pre, gradients, _vectors([0.0, 0.0], [1.0, 0.0], [1.0, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(out[2], gradients[2]["w"], rtol=0, atol=0)  # step 2: β = 0


def test_online_line_search_scales_the_step_by_the_loss_rule():
    problem = curvlab.Problem(torch.nn.Linear(2, 1).double(), (torch.zeros(1, 2), torch.zeros(1, 1)), "mse")
    losses = [1.0, 1.03, 1.045, 1.0, 0.5, 0.52]
    factors = [1.0, 0.975, 0.975, 0.975 * 1.025, 1.0, 0.975]  # >2% rise shrinks, <1% rise grows (cap 1)
    generator = torch.Generator().manual_seed(0)
    gradients = [{"w": torch.randn(3, generator=generator, dtype=torch.float64)} for _ in losses]
    params = [{"w": torch.randn(3, generator=generator, dtype=torch.float64)} for _ in losses]
    online = curvlab.optim.method("nlcg").preconditioner
    plain = curvlab.optim.method("nlcg", line_search="none").preconditioner
    assert plain.accumulate is None
    expected = _apply_sequence(plain, gradients, params)
    state = online.init(params[0])
    for step, (loss, g, theta) in enumerate(zip(losses, gradients, params)):
        state = online.accumulate(state, Statistics(problem, g, loss, step, 0))
        assert state.step_factor == pytest.approx(factors[step], rel=1e-15)
        direction, state = online.apply(g, state, theta)
        torch.testing.assert_close(direction["w"], factors[step] * expected[step], rtol=1e-14, atol=0)


def test_one_shot_direction_and_linear_map_are_the_preconditioned_gradient():
    case = make_case("mlp_mse")
    problem = curvlab.Problem(case.model, case.data, case.loss)
    diagonal = {name: torch.linspace(0.5, 2.0, p.numel(), dtype=torch.float64).reshape(p.shape)
                for name, p in case.model.named_parameters()}
    direction, linear = curvlab.optim.one_shot(curvlab.optim.method("nlcg", initial_diagonal=diagonal), problem)
    g = reference_gradient(case.model, [case.data], case.loss, "mean")
    D = torch.cat([d.reshape(-1) for d in diagonal.values()])
    torch.testing.assert_close(problem.flatten(direction), D * g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(problem.flatten(linear(problem.unflatten(g))), D * g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant", ["pr", "fr"])
def test_training_decreases_the_loss(variant):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("nlcg", model, case.loss, lr=0.1, variant=variant)
    start = float(reference_loss(model, [case.data], case.loss, "mean").detach())
    for _ in range(12):  # longer runs at larger rates blow up as the diagonal BFGS estimate grows (§15)
        opt.step(case.data)
    assert float(reference_loss(model, [case.data], case.loss, "mean").detach()) < 0.7 * start


@pytest.mark.parametrize("hyper, message", [
    ({"variant": "hs"}, "variant"), ({"line_search": "armijo"}, "line_search"),
    ({"preconditioner": "lbfgs"}, "preconditioner"), ({"grow_threshold": 0.05}, "grow_threshold"),
    ({"initial_diagonal": -1.0}, "initial_diagonal"), ({"restart_interval": 0}, "restart_interval"),
])
def test_bad_hyperparameters_are_refused(hyper, message):
    with pytest.raises(InvalidProblem, match=message):
        curvlab.optim.method("nlcg", **hyper)


def test_negative_initial_diagonal_tensor_is_refused():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(InvalidProblem, match="positive"):
        curvlab.optim.make("nlcg", model, "mse", initial_diagonal={"weight": -torch.ones(1, 2), "bias": torch.ones(1)})
