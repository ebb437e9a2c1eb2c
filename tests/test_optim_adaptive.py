"""SGD, Adam, AdamW and Adagrad take torch.optim's steps, and the optimizer machinery around them works."""

import copy

import pytest
import torch

import curvlab
from curvlab.errors import InvalidProblem
from models import make_case
from reference import loss as reference_loss

# (curvlab name, hyperparameters, the torch.optim class and its arguments besides lr)
TORCH_EQUIVALENTS = [
    ("sgd", {}, torch.optim.SGD, {}),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.8, "dampening": 0.3}, torch.optim.SGD, {"momentum": 0.8, "dampening": 0.3}),
    ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adam", {}, torch.optim.Adam, {}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}, torch.optim.Adam,
     {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("adamw", {}, torch.optim.AdamW, {}),
    ("adamw", {"weight_decay": 0.3, "eps": 1e-3}, torch.optim.AdamW, {"weight_decay": 0.3, "eps": 1e-3}),
    ("adagrad", {}, torch.optim.Adagrad, {}),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.05, "initial_accumulator_value": 0.2}, torch.optim.Adagrad,
     {"lr_decay": 0.1, "weight_decay": 0.05, "initial_accumulator_value": 0.2}),
]


def _torch_steps(case, torch_class, arguments, lr, batches):
    """torch.optim's parameters after each step, on gradients of the same batch loss as curvlab's.

    Adam's ``g / (|g| + ε)`` amplifies a rounding difference ``δ`` of a near-zero gradient entry to
    ``δ / ε``, so both sides differentiate the same expression; that it is the batch loss is checked
    against the reference below.
    """
    model = copy.deepcopy(case.model)
    opt = torch_class(model.parameters(), lr=lr, **arguments)
    batch_loss = curvlab.optim.make("sgd", model, case.loss).batch_loss
    trajectory = []
    for batch in batches:
        opt.zero_grad()
        batch_loss(batch).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


# Not the transformer: the gradient of its attention's key bias is zero in exact arithmetic and
# rounding noise in floating point, which Adam and Adagrad turn into steps of ±η in random directions.
@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn", "embedding"])
@pytest.mark.parametrize("name, hyper, torch_class, arguments", TORCH_EQUIVALENTS)
def test_first_order_steps_equal_torch_optim_float64(case_name, name, hyper, torch_class, arguments, device):
    case = make_case(case_name, device=device)
    batches = case.batches * 2  # six steps on unequal batches
    lr = 0.05
    expected = _torch_steps(case, torch_class, arguments, lr, batches)
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make(name, model, case.loss, lr=lr, **hyper)
    for step, batch in enumerate(batches):
        opt.step(batch)
        for p, q in zip(model.parameters(), expected[step]):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case_name", ["mlp_mse", "transformer", "dict_inputs"])
def test_batch_loss_is_the_reference_loss(case_name):
    case = make_case(case_name)
    opt = curvlab.optim.make("sgd", case.model, case.loss)
    for batch in case.batches:
        expected = reference_loss(case.model, [batch], case.loss, "mean")
        torch.testing.assert_close(opt.batch_loss(batch), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name, hyper, torch_class, arguments", TORCH_EQUIVALENTS[::3])
def test_closure_step_equals_batch_step(name, hyper, torch_class, arguments):
    case = make_case("mlp_ce")
    by_batch, by_closure = copy.deepcopy(case.model), copy.deepcopy(case.model)
    first = curvlab.optim.make(name, by_batch, case.loss, lr=0.1, **hyper)
    second = curvlab.optim.make(name, by_closure, case.loss, lr=0.1, **hyper)
    for batch in case.batches:
        def closure():
            second.zero_grad()
            value = reference_loss(by_closure, [batch], case.loss, "mean")
            value.backward()
            return value

        assert first.step(batch) == pytest.approx(second.step(closure), rel=1e-14)
    for p, q in zip(by_batch.parameters(), by_closure.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_last_direction_is_adam_direction_before_learning_rate_and_weight_decay():
    case = make_case("mlp_mse")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("adamw", model, case.loss, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(case.batches[0])
    model.zero_grad()
    reference_loss(case.model, [case.batches[0]], case.loss, "mean").backward()
    for name, p in case.model.named_parameters():
        g = p.grad
        direction = (0.1 * g / 0.1) / ((0.01 * g * g / 0.01).sqrt() + 1e-8)
        torch.testing.assert_close(opt.last_direction[name], direction, rtol=1e-12, atol=1e-12)
        after = before[name] * (1 - 0.01 * 0.1) - 0.01 * direction
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), after, rtol=0, atol=1e-14)


def test_learning_rate_schedulers_change_the_step():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("sgd", model, case.loss, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(case.batches[0])
    scheduler.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(case.batches[1])
    for p, q, d in zip(model.parameters(), before, opt.last_direction.values()):
        torch.testing.assert_close(p.detach(), q - 0.05 * d, rtol=0, atol=1e-15)


def test_only_selected_parameters_move():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("adam", model, case.loss, lr=0.1, params=r"weight$")
    before = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    opt.step(case.batches[0])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.endswith("bias")


def test_one_shot_adam_direction_is_the_sign_of_the_gradient():
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    method = curvlab.optim.method("adam", eps=0.0)
    direction, inverse = curvlab.optim.one_shot(method, prob)
    gradient = prob.unflatten(prob.gradient())
    for name in prob.param_names:
        torch.testing.assert_close(direction[name], torch.sign(gradient[name]), rtol=0, atol=1e-12)
        torch.testing.assert_close(inverse(gradient)[name], torch.sign(gradient[name]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum, style, lr, threshold", [
    (0.0, "heavy_ball", 0.1, 20.0), (0.9, "heavy_ball", 0.1, 38.0), (0.9, "ema", 0.1, 380.0)])
def test_stability_threshold_is_the_edge_of_stability_of_a_quadratic(momentum, style, lr, threshold):
    method = curvlab.optim.Method(curvlab.optim.identity(), momentum=momentum, momentum_style=style)
    assert method.stability_threshold(lr) == pytest.approx(threshold)


def test_heavy_ball_diverges_just_above_its_threshold_and_converges_just_below():
    """On L = ½ h θ², SGD with momentum μ is stable iff h < (2 + 2μ)/η."""
    for factor, stable in ((0.99, True), (1.01, False)):
        model = torch.nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(1.0)
        x = torch.ones(1, 1, dtype=torch.float64)
        method = curvlab.optim.method("sgd", momentum=0.9)
        h = factor * method.stability_threshold(0.1)
        opt = curvlab.optim.make("sgd", model, "mse", lr=0.1, momentum=0.9, reduction="sum")
        scale = (h / 2) ** 0.5  # L = (w·s − 0)² = s² w², so ∇²L = 2 s² = h
        for _ in range(3000):
            opt.step((x * scale, torch.zeros(1, 1, dtype=torch.float64)))
        assert (abs(model.weight.item()) < 1e-3) == stable


def test_bad_requests_name_the_valid_choices():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InvalidProblem, match="unknown optimizer 'adamx'; choose one of sgd, adam"):
        curvlab.optim.make("adamx", model)
    with pytest.raises(InvalidProblem, match="adam has no hyperparameter beta1; its hyperparameters are: betas"):
        curvlab.optim.make("adam", model, beta1=0.9)
    with pytest.raises(InvalidProblem, match="lr must be a positive number"):
        curvlab.optim.make("sgd", model, lr=-1.0)
    with pytest.raises(InvalidProblem, match="betas must be a pair"):
        curvlab.optim.make("adam", model, betas=0.9)
    with pytest.raises(InvalidProblem, match="nesterov momentum needs momentum > 0"):
        curvlab.optim.make("sgd", model, nesterov=True)
    opt = curvlab.optim.make("sgd", model)
    with pytest.raises(InvalidProblem, match=r"step takes one batch \(X, y\) or a closure"):
        opt.step(torch.randn(3, 2))


COMPAT_METHODS = [name for name in curvlab.optim.names() if "compat" in curvlab.optim.hyperparameters(name)]


@pytest.mark.parametrize("name", COMPAT_METHODS)
def test_unknown_compat_is_refused_naming_the_choices(name):
    with pytest.raises(InvalidProblem, match=r"unknown compat 'ASDL'; choose None .* or 'asdl'"):
        curvlab.optim.method(name, compat="ASDL")


def test_every_method_with_a_known_reference_bug_offers_asdl_compat():
    assert {"kfac", "kbfgs", "shampoo", "psgd_kron", "seng"} <= set(COMPAT_METHODS)


def test_seeds_of_random_draws_differ_by_step_and_stream_and_leave_the_global_rng_alone():
    prob = curvlab.Problem(torch.nn.Linear(2, 2), (torch.randn(3, 2), torch.tensor([0, 1, 0])))
    state = torch.random.get_rng_state()
    seeds = {curvlab.optim.Statistics(prob, {}, 0.0, step, seed).seed_for(stream)
             for step in range(3) for seed in range(3) for stream in range(3)}
    draws = [torch.rand(2, generator=curvlab.optim.Statistics(prob, {}, 0.0, 4, 1).generator(2)) for _ in range(2)]
    assert len(seeds) == 27 and torch.equal(*draws)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name, hp", [("sgd", {"momentum": 0.9, "weight_decay": 0.1}),
                                      ("sgd", {"momentum": 0.9, "nesterov": True}),
                                      ("adam", {"weight_decay": 0.1}), ("adamw", {}),
                                      ("adagrad", {"weight_decay": 0.1, "initial_accumulator_value": 0.5}),
                                      ("kfac", {})])
def test_owned_application_updates_the_state_in_place_and_equals_the_pure_one(name, hp):
    """``apply_owned`` (what the optimizer calls on the state it owns) gives ``apply``'s numbers, reusing the tensors."""
    method = curvlab.optim.method(name, **hp)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    for part in (method.preconditioner, method.rule):
        if part.apply_owned is None:
            continue
        pure, owned = part.init(params), part.init(params)
        for _ in range(3):
            grads = {name: torch.randn(p.shape, generator=g, dtype=torch.float64) for name, p in params.items()}
            tensors = _tensors(owned)
            before = [t.clone() for t in _tensors(pure)]
            expected, pure_next = part.apply(grads, pure, params)
            assert all(torch.equal(t, b) for t, b in zip(_tensors(pure), before))  # apply leaves its input alone
            direction, owned = part.apply_owned(grads, owned, params)
            for key in expected:
                torch.testing.assert_close(direction[key], expected[key], rtol=1e-14, atol=1e-15)
            assert all(any(t is u for u in _tensors(owned)) for t in tensors)  # the same tensors, updated
            pure = pure_next


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in _tensors(value)]
    if isinstance(state, (tuple, list)):
        return [t for value in state for t in _tensors(value)]
    return []
