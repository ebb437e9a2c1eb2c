"""AdaHessian, Sophia-G and Sophia-H take the steps of OPTIMIZERS.md §11–12, against dense autograd references.

Each reference recomputes, at every step's ``θ`` on its batch, the dense Hessian (plain autograd loops of
tests/reference.py) or the gradient at the sampled labels, draws the same Rademacher probe from the step's
seed (a CPU generator seeded with it, ±1 from ``randint(0, 2)``, as curvlab.approx.hutchinson documents),
and applies the moment updates and the step written from the specification.
"""

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


def _split(model, flat):
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def _seed(model, case, batch, step, stream):
    """The seed the optimizer (seed 0) draws from at ``step`` in ``stream``."""
    problem = curvlab.Problem(model, batch, case.loss)
    return Statistics(problem, {}, 0.0, step, 0).seed_for(stream)


def _probe(seed, size):
    signs = torch.randint(0, 2, (1, size), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return (2 * signs - 1).to(torch.float64)[0]


def _average(name_to_tensor, mode):
    """AdaHessian's spatial averaging, written from §12 (``conv``: image-classification; ``rows``: instruction)."""
    out = {}
    for name, t in name_to_tensor.items():
        if mode == "conv" and t.ndim == 4 or mode == "rows" and t.ndim == 4:
            out[name] = t.mean(dim=(2, 3), keepdim=True).expand_as(t)
        elif mode == "rows" and t.ndim == 2:
            out[name] = t.mean(dim=1, keepdim=True).expand_as(t)
        elif mode == "rows" and t.ndim == 3:
            out[name] = t.mean(dim=2, keepdim=True).expand_as(t)
        else:
            out[name] = t
    return out


def _run(name, case, steps, lr, **hyper):
    """curvlab's optimizer on a copy of the case: (parameters before each step, directions, final model)."""
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make(name, model, case.loss, lr=lr, **hyper)
    thetas, directions = [], []
    for batch in steps:
        thetas.append(_flat(model).clone())
        opt.step(batch)
        directions.append(torch.cat([d.reshape(-1) for d in opt.last_direction.values()]))
    return thetas, directions, model, opt


def _dense_at(case, theta, batch):
    """A copy of the case's model at ``theta``, and its dense batch Hessian ``(P, P)``."""
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for p, value in zip(model.parameters(), _split(model, theta).values()):
            p.copy_(value)
    return model, reference_hessian(model, [batch], case.loss, "mean")


@pytest.mark.parametrize("case_name, spatial_average, power, interval", [
    ("mlp_ce", "conv", 1.0, 1), ("cnn", "conv", 1.0, 1), ("cnn", "rows", 0.5, 1), ("mlp_mse", "rows", 1.0, 2),
    ("mlp_ce", "none", 1.0, 1),
])
def test_adahessian_steps_match_dense_formula_float64(case_name, spatial_average, power, interval):
    case = make_case(case_name)
    batches = case.batches + case.batches[:1]
    beta1, beta2, eps, lr, wd = 0.8, 0.9, 1e-4, 0.05, 0.1
    thetas, directions, model, _ = _run("adahessian", case, batches, lr, betas=(beta1, beta2), eps=eps,
                                        weight_decay=wd, hessian_power=power, spatial_average=spatial_average,
                                        curvature_update_interval=interval)
    P = thetas[0].numel()
    m, v = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    for t, (theta, batch) in enumerate(zip(thetas, batches)):
        copy_, H = _dense_at(case, theta, batch)
        if t % interval == 0:
            z = _probe(_seed(copy_, case, batch, t, 0), P)
            D = torch.cat([x.reshape(-1) for x in _average(_split(copy_, (H @ z).abs()), spatial_average).values()])
        g = reference_gradient(copy_, [batch], case.loss, "mean")
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * D * D
        k = t + 1
        expected = (m / (1 - beta1 ** k)) / ((v.sqrt() / (1 - beta2 ** k) ** 0.5) ** power + eps)
        torch.testing.assert_close(directions[t], expected, rtol=1e-10, atol=1e-12)
    final = thetas[-1] - lr * (directions[-1] + wd * thetas[-1])
    torch.testing.assert_close(_flat(model), final, rtol=0, atol=1e-13)


def _sophia_reference(case, thetas, batches, estimator, betas, rho, eps, interval):
    """Sophia's directions from §11: ``h`` EMA of ``estimator(model, H, batch, t)`` every ``interval`` steps."""
    beta1, beta2 = betas
    P = thetas[0].numel()
    m, h = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    out, ratios = [], []
    for t, (theta, batch) in enumerate(zip(thetas, batches)):
        copy_, H = _dense_at(case, theta, batch)
        if t % interval == 0:
            h = beta2 * h + (1 - beta2) * estimator(copy_, H, batch, t)
        g = reference_gradient(copy_, [batch], case.loss, "mean")
        m = beta1 * m + (1 - beta1) * g
        ratio = m.abs() / (rho * h.clamp(min=0) + eps)
        ratios.append(ratio)
        out.append(torch.sign(m) * ratio.clamp(max=1))
    return out, torch.cat(ratios)


def _gnb(case):
    def estimator(model, H, batch, t):
        problem = curvlab.Problem(model, batch, case.loss)
        seed = Statistics(problem, {}, 0.0, t, 0).seed_for(1)
        labels = curvlab.curvature(problem, "fisher_mc", mc_samples=1, seed=seed).sampled_targets()[0][0]
        g_hat = reference_gradient(model, [(batch[0], labels)], case.loss, "mean")
        return len(labels) * g_hat * g_hat  # D = N ĝ ⊙ ĝ, §11a
    return estimator


def _hutchinson(case):
    def estimator(model, H, batch, t):
        z = _probe(_seed(model, case, batch, t, 0), H.shape[0])
        return z * (H @ z)
    return estimator


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
@pytest.mark.parametrize("name", ["sophia_g", "sophia_h"])
def test_sophia_steps_match_dense_formula_float64(name, case_name):
    case = make_case(case_name)
    batches = case.batches * 2
    betas, rho, eps, lr, wd, interval = (0.9, 0.95), 0.5, 1e-12, 0.01, 0.2, 2
    thetas, directions, model, _ = _run(name, case, batches, lr, betas=betas, rho=rho, eps=eps, weight_decay=wd,
                                        curvature_update_interval=interval)
    estimator = _gnb(case) if name == "sophia_g" else _hutchinson(case)
    expected, ratios = _sophia_reference(case, thetas, batches, estimator, betas, rho, eps, interval)
    assert bool((ratios < 0.9).any()) and bool((ratios > 1.1).any())  # both branches of the clip are exercised
    for t, direction in enumerate(directions):
        torch.testing.assert_close(direction, expected[t], rtol=1e-9, atol=1e-12)
    final = thetas[-1] - lr * (directions[-1] + wd * thetas[-1])
    torch.testing.assert_close(_flat(model), final, rtol=0, atol=1e-13)


def test_sophia_h_clamps_negative_curvature_to_zero():
    case = make_case("mlp_ce")
    problem = curvlab.Problem(case.model, case.data, case.loss)
    method = curvlab.optim.method("sophia_h", rho=1.0, eps=1e-3)
    direction, linear = curvlab.optim.one_shot(method, problem)
    H = reference_hessian(case.model, [case.data], case.loss, "mean")
    z = _probe(Statistics(problem, {}, 0.0, 0, 0).seed_for(0), H.shape[0])
    h = (1 - 0.99) * z * (H @ z)
    assert bool((h < 0).any())
    g = reference_gradient(case.model, [case.data], case.loss, "mean")
    expected_linear = g / (h.clamp(min=0) + 1e-3)
    torch.testing.assert_close(problem.flatten(linear(problem.unflatten(g))), expected_linear, rtol=1e-10, atol=0)
    expected = ((1 - 0.965) * expected_linear).clamp(-1, 1)
    torch.testing.assert_close(problem.flatten(direction), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_adahessian_one_shot_direction_is_its_linear_map_of_the_gradient(case_name):
    case = make_case(case_name)
    problem = curvlab.Problem(case.model, case.data, case.loss)
    direction, linear = curvlab.optim.one_shot(curvlab.optim.method("adahessian", eps=1e-4), problem)
    g = problem.unflatten(problem.gradient())
    for name, value in linear(g).items():
        torch.testing.assert_close(direction[name], value, rtol=1e-12, atol=0)
    H = reference_hessian(case.model, [case.data], case.loss, "mean")
    z = _probe(Statistics(problem, {}, 0.0, 0, 0).seed_for(0), H.shape[0])
    D = torch.cat([x.reshape(-1) for x in _average(_split(case.model, (H @ z).abs()), "conv").values()])
    torch.testing.assert_close(problem.flatten(direction), problem.flatten(g) / (D + 1e-4), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, lr", [("adahessian", 0.05), ("sophia_g", 0.02), ("sophia_h", 0.02)])
def test_training_decreases_the_loss(name, lr):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make(name, model, case.loss, lr=lr, seed=3)
    start = float(reference_loss(model, [case.data], case.loss, "mean").detach())
    rng = torch.random.get_rng_state()
    for _ in range(25):
        opt.step(case.data)
    assert torch.equal(rng, torch.random.get_rng_state())  # the probes and labels leave the global RNG alone
    assert float(reference_loss(model, [case.data], case.loss, "mean").detach()) < 0.8 * start


def test_defaults_are_the_reference_implementations():
    assert curvlab.optim.hyperparameters("adahessian") == {
        "betas": (0.9, 0.999), "eps": 1e-4, "weight_decay": 0.0, "hessian_power": 1.0, "spatial_average": "conv",
        "curvature_update_interval": 1}
    for name in ("sophia_g", "sophia_h"):
        hyper = curvlab.optim.hyperparameters(name)
        assert (hyper["betas"], hyper["rho"], hyper["eps"], hyper["weight_decay"]) == ((0.965, 0.99), 0.04, 1e-15, 0.1)
        method = curvlab.optim.method(name)
        assert (method.curvature_update_interval, method.momentum, method.momentum_style) == (10, 0.965, "ema")


@pytest.mark.parametrize("name, hyper, message", [
    ("adahessian", {"spatial_average": "blocks"}, "spatial_average"),
    ("adahessian", {"hessian_power": 1.5}, "hessian_power"),
    ("sophia_g", {"rho": 0.0}, "rho"),
    ("sophia_h", {"eps": 0.0}, "eps"),
    ("sophia_h", {"curvature_update_interval": 0}, "curvature_update_interval"),
])
def test_bad_hyperparameters_are_refused(name, hyper, message):
    with pytest.raises(InvalidProblem, match=message):
        curvlab.optim.method(name, **hyper)
