"""SOAP takes the steps of nikhilvyas/SOAP (OPTIMIZERS.md §14): Adam in the eigenbasis of Shampoo's factors.

The references write the rotation densely: for a tensor with bases ``Q_1, …, Q_k`` (row-major vec),
``U = Q_1 ⊗ ⋯ ⊗ Q_k`` and ``g' = Uᵀ g``; Adam runs on ``g'`` and the step is ``U (m'/(√v' + ε))``.
"""

import copy
from functools import reduce

import pytest
import torch

import curvlab
from models import make_case
from reference import loss as reference_loss


def _gradients(model, batch, loss, names):
    named = dict(model.named_parameters())
    value = reference_loss(model, [batch], loss, "mean")
    return dict(zip(names, torch.autograd.grad(value, [named[n] for n in names])))


def _unfoldings(g):
    return [g.movedim(i, 0).reshape(g.shape[i], -1) @ g.movedim(i, 0).reshape(g.shape[i], -1).T
            for i in range(g.ndim)]


def _rotation(bases, shape):
    """``U = ⊗_i Q_i`` with the identity for an unrotated mode (``None``)."""
    mats = [torch.eye(d, dtype=torch.float64) if q is None else q.contiguous() for q, d in zip(bases, shape)]
    return reduce(torch.kron, mats, torch.eye(1, dtype=torch.float64))


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_soap_first_step_initialises_and_second_is_adam_in_the_eigenbasis_float64(case_name):
    case = make_case(case_name)
    model = copy.deepcopy(case.model)
    # ε = 1e-4 bounds the Lipschitz constant of g' ↦ m'/(√v' + ε) by 1/ε, so rounding differences
    # of near-zero rotated entries (directions outside the first gradient's span) stay ~1e-13
    (beta1, beta2), eps, lr = (0.9, 0.95), 1e-4, 0.01
    opt = curvlab.optim.make("soap", model, case.loss, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = _gradients(model, case.batches[0], case.loss, opt.names)
    opt.step(case.batches[0])
    state = opt.preconditioner_state
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])  # nothing moves, weight decay included
        assert not opt.last_direction[name].any()
        if first[name].ndim < 2:
            assert state.bases[name] in ((None,), ())
            continue
        for q, f, u in zip(state.bases[name], state.factors[name], _unfoldings(first[name])):
            torch.testing.assert_close(f, (1 - beta2) * u, rtol=1e-12, atol=1e-18)
            eigenvalues = torch.linalg.eigvalsh(u).flip(0) * (1 - beta2)
            torch.testing.assert_close(q.T @ f @ q, torch.diag(eigenvalues), rtol=0, atol=1e-13)
    second = _gradients(model, case.batches[1], case.loss, opt.names)
    opt.step(case.batches[1])
    for name, g in second.items():
        U = _rotation(state.bases[name], g.shape) if g.ndim >= 2 else torch.eye(g.numel(), dtype=torch.float64)
        rotated = U.T @ g.reshape(-1)
        m, v = (1 - beta1) * rotated, (1 - beta2) * rotated ** 2
        expected = (U @ (m / (v.sqrt() + eps))) * (1 - beta2) ** 0.5 / (1 - beta1)
        torch.testing.assert_close(opt.last_direction[name].reshape(-1), expected, rtol=1e-10, atol=1e-11)
        after = before[name] - lr * (opt.last_direction[name] + 0.1 * before[name])
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), after, rtol=1e-14, atol=1e-15)


def _soap_reference(gradients, betas, eps, frequency, initial_bases):
    """SOAP on one matrix, written with explicit L, R, Q_L, Q_R and dense Kronecker rotations.

    The first gradient's factors are rank-deficient, so their eigenbasis is not unique on the null
    space: the reference starts from the optimizer's initial bases, which the test above checks are
    eigenbases in descending order. Later factors have full rank and the power/QR steps are unique.
    """
    beta1, beta2 = betas
    g = gradients[0]
    L, R = (1 - beta2) * g @ g.T, (1 - beta2) * g.T @ g
    QL, QR = initial_bases
    m = torch.zeros(g.numel(), dtype=torch.float64)
    v = torch.zeros(g.numel(), dtype=torch.float64)
    directions = [torch.zeros_like(g)]
    for t, g in enumerate(gradients[1:], start=1):
        U = torch.kron(QL, QR)
        rotated = U.T @ g.reshape(-1)
        m = beta1 * m + (1 - beta1) * rotated
        v = beta2 * v + (1 - beta2) * rotated ** 2
        step = (U @ (m / (v.sqrt() + eps))) * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
        directions.append(step.reshape(g.shape))
        L, R = beta2 * L + (1 - beta2) * g @ g.T, beta2 * R + (1 - beta2) * g.T @ g
        if t % frequency == 0:
            m_original = U @ m
            sort_l = torch.argsort(torch.diagonal(QL.T @ L @ QL), descending=True)
            sort_r = torch.argsort(torch.diagonal(QR.T @ R @ QR), descending=True)
            v = v.reshape(g.shape)[sort_l][:, sort_r].reshape(-1)
            QL, QR = torch.linalg.qr(L @ QL[:, sort_l]).Q, torch.linalg.qr(R @ QR[:, sort_r]).Q
            m = torch.kron(QL, QR).T @ m_original
    return directions


def test_soap_refreshes_the_basis_by_power_qr_and_carries_the_moments_float64():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    betas, eps = (0.8, 0.9), 1e-6
    opt = curvlab.optim.make("soap", model, case.loss, lr=0.05, params=r"weight$", betas=betas, eps=eps,
                             precondition_frequency=2, weight_decay=0.0)
    history, directions = {n: [] for n in opt.names}, {n: [] for n in opt.names}
    for t, batch in enumerate(case.batches * 2):
        g = _gradients(model, batch, case.loss, opt.names)
        opt.step(batch)
        if t == 0:
            initial = dict(opt.preconditioner_state.bases)
        for name in opt.names:
            history[name].append(g[name])
            directions[name].append(opt.last_direction[name])
    for name in opt.names:
        for got, expected in zip(directions[name], _soap_reference(history[name], betas, eps, 2, initial[name])):
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_soap_leaves_large_dims_and_1d_unrotated_unless_asked_float64():
    """``max_precond_dim = 5``: the 8-row side of an (8, 5) weight is not rotated; ``precondition_1d`` rotates biases."""
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("soap", model, case.loss, lr=0.05, params=r"^0\.", max_precond_dim=5,
                             precondition_1d=True, betas=(0.0, 0.5), eps=0.0)
    opt.step(case.batches[0])
    bases = opt.preconditioner_state.bases
    assert bases["0.weight"][0] is None and bases["0.weight"][1].shape == (5, 5)
    assert bases["0.bias"][0] is None  # 8 > max_precond_dim
    second = _gradients(model, case.batches[1], case.loss, opt.names)
    opt.step(case.batches[1])
    U = _rotation(bases["0.weight"], (8, 5))
    rotated = U.T @ second["0.weight"].reshape(-1)
    expected = U @ torch.sign(rotated)  # β₁ = 0, ε = 0, one step: m'/√v' · √(1−β₂)/1 = sign(g')
    torch.testing.assert_close(opt.last_direction["0.weight"].reshape(-1), expected, rtol=1e-10, atol=1e-12)

    small = curvlab.optim.make("soap", copy.deepcopy(case.model), case.loss, params=r"^2\.bias$",
                               precondition_1d=True)
    small.step(case.batches[0])
    (q,) = small.preconditioner_state.bases["2.bias"]
    assert q.shape == (4, 4)


def test_soap_linear_map_is_the_dense_eigenbasis_diagonal():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    betas, eps = (0.9, 0.95), 1e-8
    opt = curvlab.optim.make("soap", model, case.loss, lr=0.01, params=r"weight$", betas=betas, eps=eps)
    assert not any(v.any() for v in opt.method.preconditioner.linear(opt.preconditioner_state)(
        {n: torch.ones_like(p) for n, p in model.named_parameters() if n.endswith("weight")}).values())
    for batch in case.batches:
        opt.step(batch)
    state = opt.preconditioner_state
    probe = {name: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
             for name, p in model.named_parameters() if name in opt.names}
    mapped = opt.method.preconditioner.linear(state)(probe)
    for name, v in probe.items():
        U = _rotation(state.bases[name], v.shape)
        scale = (1 - betas[1] ** state.step) ** 0.5
        expected = U @ (scale * (U.T @ v.reshape(-1)) / (state.exp_avg_sq[name].reshape(-1).sqrt() + eps))
        torch.testing.assert_close(mapped[name].reshape(-1), expected, rtol=1e-10, atol=1e-12)


def test_soap_closure_step_equals_batch_step_and_training_decreases_the_loss():
    case = make_case("mlp_ce")
    first, second = copy.deepcopy(case.model), copy.deepcopy(case.model)
    by_batch = curvlab.optim.make("soap", first, case.loss, lr=0.02)
    by_closure = curvlab.optim.make("soap", second, case.loss, lr=0.02)
    before = float(reference_loss(first, [case.data], case.loss, "mean").detach())
    for _ in range(20):
        def closure():  # the same arithmetic as step(batch): SOAP's first basis is not unique on the
            by_closure.zero_grad()  # null space of rank-deficient factors, so rounding changes the path
            value = by_closure.batch_loss(case.data)
            value.backward()
            return value

        by_batch.step(case.data)
        by_closure.step(closure)
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert float(reference_loss(first, [case.data], case.loss, "mean").detach()) < 0.8 * before


@pytest.mark.parametrize("hyper", [{"betas": (0.9, 1.0)}, {"precondition_frequency": 0}, {"shampoo_beta": 2.0},
                                   {"max_precond_dim": 0}])
def test_soap_refuses_bad_hyperparameters(hyper):
    with pytest.raises(curvlab.InvalidProblem):
        curvlab.optim.method("soap", **hyper)
