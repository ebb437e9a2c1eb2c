"""PSGD-Kron fits Q_l, Q_r by lixilinx's Lie-group step (ASDL's transposed B with compat="asdl") and approaches |H|⁻¹."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import curvlab
from curvlab.errors import InvalidProblem
from curvlab.optim import Statistics
from curvlab.optim.base import chain, identity
from models import make_case
from reference import gradient, hessian


def _fit(Ql, Qr, dX, dG, lr, asdl):
    """One step of ASDL's ``_update_precond_dense_dense`` (``asdl``: its ``Bt``; else lixilinx's), written out."""
    rho = torch.sqrt(Ql.diagonal().max() / Qr.diagonal().max())
    Ql, Qr = Ql / rho, Qr * rho
    A = Ql @ dG @ Qr.T
    if asdl:
        Bt = torch.linalg.inv(Ql) @ dX @ torch.linalg.inv(Qr).T
    else:
        Bt = torch.linalg.inv(Ql).T @ dX @ torch.linalg.inv(Qr)
    grad1 = torch.triu(A @ A.T - Bt @ Bt.T)
    grad2 = torch.triu(A.T @ A - Bt.T @ Bt)
    tiny = torch.finfo(A.dtype).tiny
    return (Ql - lr / (grad1.abs().max() + tiny) * grad1 @ Ql,
            Qr - lr / (grad2.abs().max() + tiny) * grad2 @ Qr)


def _layers(model):
    """``(weight name, bias name or None)`` of each Linear and Conv2d layer."""
    return [(f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
            for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def _as_matrix(parts, weight, bias):
    matrix = parts[weight].flatten(1)
    return torch.cat([matrix, parts[bias][:, None]], dim=1) if bias else matrix


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
@pytest.mark.parametrize("form", ["newton", "whitening"])
@pytest.mark.parametrize("asdl", [False, True])
def test_fits_and_steps_equal_the_dense_formulas_float64(case_name, form, asdl):
    case = make_case(case_name)
    names = [name for name, _ in case.model.named_parameters()]
    problem = curvlab.Problem(case.model, case.batches, case.loss)
    H = hessian(case.model, case.batches, case.loss, "mean")
    g = gradient(case.model, case.batches, case.loss, "mean")
    grads = problem.unflatten(g)
    pre = curvlab.optim.method("psgd_kron", form=form, precond_lr=0.1, init_scale=0.7,
                               compat="asdl" if asdl else None).preconditioner
    layers = _layers(case.model)
    preconditioned = {name for pair in layers for name in pair if name}
    factors = {pair: [0.7 * torch.eye(d, dtype=torch.float64) for d in _as_matrix(grads, *pair).shape]
               for pair in layers}
    state = pre.init(problem.params)
    for step in range(3):
        statistics = Statistics(problem, grads, problem.loss_value(), step, 5)
        v = torch.randn(problem.num_params, generator=statistics.generator(0), dtype=torch.float64)
        v = torch.cat([v_ if name in preconditioned else torch.zeros_like(v_)
                       for name, v_ in zip(names, v.split([p.numel() for p in case.model.parameters()]))])
        h = H @ v if form == "newton" else g
        for pair in layers:
            factors[pair] = _fit(*factors[pair], _as_matrix(problem.unflatten(v), *pair),
                                 _as_matrix(problem.unflatten(h), *pair), 0.1, asdl)
        state = pre.accumulate(state, statistics)
        direction, state = pre.apply(grads, state, problem.params)
        for weight, bias in layers:
            Ql, Qr = factors[(weight, bias)]
            step_matrix = Ql.T @ Ql @ _as_matrix(grads, weight, bias) @ Qr.T @ Qr
            torch.testing.assert_close(_as_matrix(direction, weight, bias), step_matrix, rtol=1e-10, atol=1e-13)
        for name in set(names) - preconditioned:  # the CNN's batch norm keeps its raw gradient
            torch.testing.assert_close(direction[name], grads[name], rtol=0, atol=0)
        # the first application after a fit goes through Qᵀ(Q G); later ones (and linear) through the cached QᵀQ
        assert state.applied
        linear, (again, _) = pre.linear(state)(grads), pre.apply(grads, state, problem.params)
        for name in names:
            torch.testing.assert_close(linear[name], again[name], rtol=0, atol=0)
            torch.testing.assert_close(linear[name], direction[name], rtol=1e-12, atol=1e-15)


def _directions(compat, fits):
    case = make_case("mlp_ce")
    problem = curvlab.Problem(case.model, case.batches, case.loss)
    grads = problem.unflatten(problem.gradient())
    pre = curvlab.optim.method("psgd_kron", precond_lr=0.1, compat=compat).preconditioner
    state = pre.init(problem.params)
    for step in range(fits):
        state = pre.accumulate(state, Statistics(problem, grads, problem.loss_value(), step, 0))
    return problem.flatten(pre.apply(grads, state, problem.params)[0])


def test_asdl_compat_agrees_on_the_first_fit_and_differs_once_q_is_not_identity():
    torch.testing.assert_close(_directions("asdl", 1), _directions(None, 1), rtol=0, atol=0)
    for fits in (2, 5):
        correct, asdl = _directions(None, fits), _directions("asdl", fits)
        assert float(torch.linalg.norm(asdl - correct) / torch.linalg.norm(correct)) > 1e-3


def _kronecker_quadratic():
    """``s = M (W x + b)`` with a fixed ``M`` and MSE: ``H = 2R (MᵀM) ⊗ Σ_n [x_n; 1][x_n; 1]ᵀ`` in ``[W | b]``."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5, bias=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    X = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    Y = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    return model, (X, Y)


def test_fitted_preconditioner_approaches_the_inverse_absolute_hessian_on_a_kronecker_quadratic():
    model, batch = _kronecker_quadratic()
    names = ["0.weight", "0.bias"]
    H = hessian(model, [batch], "mse", "mean", names)
    M, x_one = model[1].weight.detach(), torch.cat([batch[0], torch.ones(64, 1, dtype=torch.float64)], dim=1)
    kron = 2 / (64 * 5) * torch.kron(M.T @ M, x_one.T @ x_one)  # row-major [W | b]: W then b
    order = torch.tensor([r * 5 + c for r in range(3) for c in range(4)] + [r * 5 + 4 for r in range(3)])
    torch.testing.assert_close(H, kron[order[:, None], order[None, :]], rtol=1e-12, atol=1e-14)
    target = torch.linalg.inv(H)  # H is positive definite here, so |H|⁻¹ = H⁻¹
    problem = curvlab.Problem(model, batch, "mse", params=names)
    grads = problem.unflatten(problem.gradient())
    pre = curvlab.optim.method("psgd_kron").preconditioner  # ASDL's precond_lr = 0.01
    state = pre.init(problem.params)
    errors = []
    for step in range(800):
        state = pre.accumulate(state, Statistics(problem, grads, problem.loss_value(), step, 0))
        if step + 1 in (10, 200, 800):
            linear = pre.linear(state)
            P = torch.stack([problem.flatten(linear(problem.unflatten(row)))
                             for row in torch.eye(problem.num_params, dtype=torch.float64)])
            errors.append(float(torch.linalg.norm(P - target) / torch.linalg.norm(target)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 0.5 and errors[2] < 0.05, errors


def test_preconditioner_update_interval_fits_every_kth_step_and_training_decreases_the_loss():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("psgd_kron", model, case.loss, lr=0.1, preconditioner_update_interval=3)
    first = opt.step(case.data)
    for _ in range(19):
        last = opt.step(case.data)
    assert opt.preconditioner_state.fits == 7
    assert last < 0.7 * first, (first, last)


def test_whitening_form_trains():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("psgd_kron", model, case.loss, lr=0.05, form="whitening")
    first = opt.step(case.data)
    for _ in range(19):
        last = opt.step(case.data)
    assert last < 0.7 * first, (first, last)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(InvalidProblem, match="form"):
        curvlab.optim.method("psgd_kron", form="gauss_newton")
    with pytest.raises(InvalidProblem, match="compat"):
        curvlab.optim.method("psgd_kron", compat="heavyball")
    with pytest.raises(InvalidProblem, match="precond_lr"):
        curvlab.optim.method("psgd_kron", precond_lr=1.5)


@pytest.mark.parametrize("case_name, hyper", [
    ("mlp_ce", {}),
    ("mlp_ce", {"compat": "asdl", "preconditioner_update_interval": 2}),  # plain gradient steps in between
    ("cnn", {}),  # eval mode: batch norm fixed, as in the statistics' pass
    ("layernorm", {}),  # the layer norm's raw gradient from the Hessian product's pass
])
def test_one_pass_takes_the_two_pass_step_float64(case_name, hyper):
    """The same probes ``v`` and the same ``Hv`` in one pass and in two; only the gradient comes from another
    computation (the Hessian product's value instead of ``loss.backward()``'s). Both evaluate the same float64
    sums (on this CPU to the bit); rtol 1e-12 leaves room for a backend that orders them differently, a few
    hundred ulps, while a wrong gradient or probe is an O(1) error."""
    case = make_case(case_name)
    models_ = [copy.deepcopy(case.model) for _ in range(2)]
    opts = [curvlab.optim.make("psgd_kron", model, case.loss, lr=0.05, precond_lr=0.1, one_pass=one_pass, **hyper)
            for model, one_pass in zip(models_, (False, True))]
    for step, batch in enumerate(case.batches * 2):
        losses = [opt.step(batch) for opt in opts]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
        for name in opts[0].last_direction:
            torch.testing.assert_close(opts[1].last_direction[name], opts[0].last_direction[name], rtol=1e-12,
                                       atol=1e-15)
        fitted = step % hyper.get("preconditioner_update_interval", 1) == 0
        assert all((p.grad is None) == fitted for p in models_[1].parameters()), step
    assert opts[1].preconditioner_state.fits == opts[0].preconditioner_state.fits


def test_the_optimizer_fits_the_factors_in_place_and_steps_as_the_pure_fit():
    """``accumulate_owned`` updates the state's factors in place (the old and new factors never held together)."""
    case = make_case("mlp_ce")
    method = curvlab.optim.method("psgd_kron", precond_lr=0.1)
    pure = dataclasses.replace(method, preconditioner=dataclasses.replace(method.preconditioner, accumulate_owned=None))
    owned_opt, pure_opt = (curvlab.optim.PreconditionedOptimizer(copy.deepcopy(case.model), m, case.loss, lr=0.1)
                           for m in (method, pure))
    owned_opt.step(case.data), pure_opt.step(case.data)
    storage = [q.data_ptr() for qs in owned_opt.preconditioner_state.factors for q in qs]
    fitted = [q.clone() for qs in owned_opt.preconditioner_state.factors for q in qs]
    for _ in range(2):
        owned_opt.step(case.data), pure_opt.step(case.data)
        for name, direction in pure_opt.last_direction.items():
            torch.testing.assert_close(owned_opt.last_direction[name], direction, rtol=0, atol=0)
    factors = [q for qs in owned_opt.preconditioner_state.factors for q in qs]
    assert [q.data_ptr() for q in factors] == storage
    assert all(not torch.equal(q, old) for q, old in zip(factors, fitted))
    assert chain(method.preconditioner, identity()).accumulate_owned is not None
