"""K-BFGS (OPTIMIZERS.md §9): the BFGS algebra, the G-side secant pair, ASDL's compat step, training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.optim.kbfgs import bfgs_inverse_update, powell_lm_damping
from models import make_case

TOL = dict(rtol=1e-9, atol=1e-11)


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return M @ M.T + 0.5 * torch.eye(d, dtype=torch.float64), g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfgs_inverse_update_satisfies_the_secant_equation_float64(seed):
    H, g = _spd(6, seed)
    s = torch.randn(6, generator=g, dtype=torch.float64)
    y = s + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    assert torch.dot(s, y) > 0
    updated = bfgs_inverse_update(H, s, y)
    torch.testing.assert_close(updated @ y, s, **TOL)
    torch.testing.assert_close(updated, updated.T, **TOL)
    assert torch.linalg.eigvalsh(updated).min() > 0
    # the product form of the same update: (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, ρ = 1/sᵀy
    rho = 1 / torch.dot(s, y)
    I = torch.eye(6, dtype=torch.float64)
    product = (I - rho * torch.outer(s, y)) @ H @ (I - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    torch.testing.assert_close(updated, product, **TOL)


def test_powell_and_levenberg_marquardt_damping_make_the_pair_curved_float64():
    H, g = _spd(5, 3)
    s = torch.randn(5, generator=g, dtype=torch.float64)
    y = -s  # negative curvature: sᵀy < 0
    mu1, mu2 = 0.2, 0.1
    s_d, y_d = powell_lm_damping(H, s, y, mu1, mu2)
    yHy = torch.dot(y, H @ y)
    torch.testing.assert_close(torch.dot(s_d, y), mu1 * yHy, **TOL)  # Powell: sᵀy raised to μ₁ yᵀHy exactly
    torch.testing.assert_close(y_d, y + mu2 * s_d, **TOL)
    undamped_s, _ = powell_lm_damping(H, H @ s, s, mu1, mu2)  # sᵀy = sᵀHs ≥ μ₁ yᵀHy: s is kept
    torch.testing.assert_close(undamped_s, H @ s, **TOL)


def _means(model, X, y):
    """Per Linear layer: mean pre-activation s̄ and mean per-example output gradient ē (true labels), by hooks."""
    record = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: record.update({name: o}))
               for name, m in layers.items()]
    out = model(X)
    for h in handles:
        h.remove()
    for output in record.values():
        output.retain_grad()
    F.cross_entropy(out, y, reduction="sum").backward()
    model.zero_grad()
    return {name: (record[name].detach().mean(0), record[name].grad.mean(0)) for name in layers}


def _input_factor(model, X, name):
    record = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: record.update(a=a[0]))
    model(X)
    handle.remove()
    a = record["a"].detach()
    return a.T @ a / a.shape[0], a.mean(0)


def _gradient(model, X, y):
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_kbfgs_first_steps_match_the_algorithm_float64():
    """Step 0: ΔW = G (A_0 + √λ)⁻¹ (H_g = I); the next curvature update applies Powell/LM-damped BFGS to H_g
    with the first batch evaluated again at θ_1, and a Hessian-action BFGS step to H_a."""
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    (X0, y0), (X1, y1) = case.batches[2], case.batches[0]
    damping, beta, mu1 = 1e-2, 0.1, 0.2
    root = math.sqrt(damping)
    opt = curvlab.optim.make("kbfgs", model, lr=0.1, damping=damping, ema_decay=beta, momentum=0.0)
    before0 = _means(model, X0, y0)
    A0 = {name: _input_factor(model, X0, name) for name in ("0", "2")}
    grads0 = _gradient(model, X0, y0)
    opt.step((X0, y0))
    for name in ("0", "2"):
        H_a = torch.linalg.inv(A0[name][0] + root * torch.eye(A0[name][0].shape[0], dtype=torch.float64))
        torch.testing.assert_close(opt.last_direction[f"{name}.weight"], grads0[f"{name}.weight"] @ H_a, **TOL)
        torch.testing.assert_close(opt.last_direction[f"{name}.bias"], grads0[f"{name}.bias"], **TOL)
    after0 = _means(model, X0, y0)
    A1 = {name: _input_factor(model, X1, name) for name in ("0", "2")}
    opt.step((X1, y1))
    state = opt.preconditioner_state
    for name in ("0", "2"):
        s = after0[name][0] - before0[name][0]
        y = after0[name][1] - before0[name][1]
        H = torch.eye(s.shape[0], dtype=torch.float64)
        sy, yHy = torch.dot(s, y), torch.dot(y, y)
        if sy < mu1 * yHy:
            theta = (1 - mu1) * yHy / (yHy - sy)
            s = theta * s + (1 - theta) * y
        y = y + root * s
        sy = torch.dot(s, y)
        expected_H_g = H + (sy + torch.dot(y, y)) * torch.outer(s, s) / sy ** 2 - (torch.outer(y, s) + torch.outer(s, y)) / sy
        torch.testing.assert_close(state.H_g[name], expected_H_g, **TOL)
        torch.testing.assert_close(state.H_g[name] @ y, s, **TOL)
        A = (1 - beta) * A0[name][0] + beta * A1[name][0]
        H_a0 = torch.linalg.inv(A0[name][0] + root * torch.eye(A.shape[0], dtype=torch.float64))
        s_a = H_a0 @ A1[name][1]
        y_a = A @ s_a + root * s_a
        torch.testing.assert_close(state.H_a[name] @ y_a, s_a, **TOL)


def test_kbfgs_asdl_compat_is_foof_with_the_first_batch_frozen_float64():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    damping = 1e-2
    batches = case.batches + case.batches[:2]
    opt = curvlab.optim.make("kbfgs", model, lr=0.1, damping=damping, compat="asdl")
    _, foof_map = curvlab.optim.one_shot(curvlab.optim.method("foof", damping=math.sqrt(damping)),
                                         curvlab.Problem(copy.deepcopy(model), batches[0]))
    for step, batch in enumerate(batches):
        grads = _gradient(model, *batch)
        opt.step(batch)
        expected = grads if step == 0 else foof_map(grads)
        for name in expected:
            torch.testing.assert_close(opt.last_direction[name], expected[name], **TOL)
    assert not torch.allclose(foof_map(grads)["0.weight"], grads["0.weight"])


@pytest.mark.parametrize("case_name, hp", [("mlp_ce", {}), ("mlp_ce", {"compat": "asdl"}),
                                           ("cnn", {"curvature_update_interval": 2})])
def test_kbfgs_training_decreases_the_loss(case_name, hp):
    case = make_case(case_name)
    model = copy.deepcopy(case.model)
    X, y = case.data
    opt = curvlab.optim.make("kbfgs", model, lr=0.05, damping=1e-2, **hp)
    losses = [opt.step((X, y)) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0]
    for H in opt.preconditioner_state.H_g.values():
        torch.testing.assert_close(H, H.T, **TOL)
        assert torch.linalg.eigvalsh(H).min() > 0
