"""PSGD's Kronecker preconditioner: §6's update rule, its fixed point on Kronecker curvature, determinism."""

import pytest
import torch
from torch import nn

import reference
from curvlab import Problem
from curvlab.approx import Approximation, Homogeneous, KroneckerBlock, Reshape, approximate
from curvlab.approx.psgd import kron_groups, lie_group_step
from curvlab.errors import InvalidProblem

DOUBLE = torch.float64


def _linear_mse(examples=8):
    """Linear(3, 2) with MSE: ``H = (2/(N·2)) I_2 ⊗ Σ_n [x_n; 1][x_n; 1]ᵀ``, SPD in ``[W b]`` for ``N ≥ 4``."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).to(DOUBLE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DOUBLE))
    x = 3 * torch.randn(examples, 3, generator=g, dtype=DOUBLE)  # eigenvalues of H from 0.8 to 11: far from P = I
    y = torch.randn(examples, 2, generator=g, dtype=DOUBLE)
    return model, [(x, y)]


def _spd(n, g):
    a = torch.randn(n, n, generator=g, dtype=DOUBLE)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=DOUBLE)


def _relative(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _upper(n, g):
    """A random upper-triangular matrix with a positive diagonal, far from the identity."""
    q = torch.triu(torch.randn(n, n, generator=g, dtype=DOUBLE))
    return q + torch.diag(q.diagonal().abs() + 0.5 - q.diagonal())


def _reference_two_factor_step(Ql, Qr, dX, dG, mu):
    """§6a with lixilinx's ``Bt``, written out with explicit inverses (no triangular solves)."""
    rho = torch.sqrt(Ql.diagonal().max() / Qr.diagonal().max())
    Ql, Qr = Ql / rho, Qr * rho
    A = Ql @ dG @ Qr.T
    Bt = torch.linalg.inv(Ql).T @ dX @ torch.linalg.inv(Qr)
    grad1 = torch.triu(A @ A.T - Bt @ Bt.T)
    grad2 = torch.triu(A.T @ A - Bt.T @ Bt)
    return (Ql - mu / grad1.abs().max() * grad1 @ Ql,
            Qr - mu / grad2.abs().max() * grad2 @ Qr)


def _reference_one_factor_step(Q, v, h, mu):
    A = (Q @ h)[:, None]
    B = (torch.linalg.inv(Q).T @ v)[:, None]
    grad = torch.triu(A @ A.T - B @ B.T)
    return Q - mu / grad.abs().max() * grad @ Q


def test_lie_group_step_equals_the_hand_written_update():
    g = torch.Generator().manual_seed(1)
    Ql, Qr = _upper(3, g), _upper(5, g)
    dX, dG = torch.randn(3, 5, generator=g, dtype=DOUBLE), torch.randn(3, 5, generator=g, dtype=DOUBLE)
    stepped = lie_group_step([Ql, Qr], dX, dG, 0.1)
    expected = _reference_two_factor_step(Ql, Qr, dX, dG, 0.1)
    # Triangular solves against explicit inverses of O(1), well-conditioned matrices: rounding ~1e-14.
    for got, want in zip(stepped, expected):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
        assert torch.equal(got, torch.triu(got)) and bool((got.diagonal() > 0).all())
    Q, v, h = _upper(4, g), torch.randn(4, generator=g, dtype=DOUBLE), torch.randn(4, generator=g, dtype=DOUBLE)
    (single,) = lie_group_step([Q], v, h, 0.1)
    assert torch.allclose(single, _reference_one_factor_step(Q, v, h, 0.1), rtol=1e-12, atol=1e-13)


def test_fit_follows_the_update_rule_on_seeded_hessian_pairs():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.LayerNorm(2)).to(DOUBLE)
    _, batches = _linear_mse()
    problem = Problem(model, batches, "mse")
    iterations, seed, mu = 3, 5, 0.05
    ap = approximate(problem, "psgd_kron", "hessian", iterations=iterations, lr_precond=mu, seed=seed,
                     init_scale=0.7, progress=False)
    H = reference.hessian(model, batches, "mse", "mean")  # P = 8 + 2 + 2
    # The documented draws: the probes of up to 32 steps are the rows of one (b, P) float64 draw.
    v = torch.randn(iterations, 12, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)
    h = v @ H
    Ql, Qr, Qw, Qb = 0.7 * torch.eye(2, dtype=DOUBLE), 0.7 * torch.eye(4, dtype=DOUBLE), *(
        0.7 * torch.eye(2, dtype=DOUBLE) for _ in range(2))
    for t in range(iterations):
        # [W b] of the Linear layer: the weight (2, 3) row-major, then the bias as the last column.
        dX = torch.cat([v[t, :6].reshape(2, 3), v[t, 6:8, None]], dim=1)
        dG = torch.cat([h[t, :6].reshape(2, 3), h[t, 6:8, None]], dim=1)
        Ql, Qr = _reference_two_factor_step(Ql, Qr, dX, dG, mu)
        Qw = _reference_one_factor_step(Qw, v[t, 8:10], h[t, 8:10], mu)
        Qb = _reference_one_factor_step(Qb, v[t, 10:], h[t, 10:], mu)
    assert [label for label, _, _ in ap.blocks] == ["0", "2.weight", "2.bias"]
    for got, want in zip([*ap.factors[0], *ap.factors[1], *ap.factors[2]], [Ql, Qr, Qw, Qb]):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # The implied curvature is P⁻¹ with P = (Q_lᵀQ_l ⊗ Q_rᵀQ_r) on [W b] (row-major), and (QᵀQ) on vectors.
    order = torch.tensor([0, 1, 2, 6, 3, 4, 5, 7])  # flat index of each [W b] entry, row-major
    implied = torch.zeros(12, 12, dtype=DOUBLE)
    implied[order[:, None], order[None, :]] = torch.linalg.inv(torch.kron(Ql.T @ Ql, Qr.T @ Qr))
    implied[8:10, 8:10] = torch.linalg.inv(Qw.T @ Qw)
    implied[10:, 10:] = torch.linalg.inv(Qb.T @ Qb)
    assert torch.allclose(ap.to_dense(), implied, rtol=1e-10, atol=1e-12)


def test_fit_converges_to_an_exactly_kronecker_hessian():
    model, batches = _linear_mse()
    problem = Problem(model, batches, "mse")
    H = reference.hessian(model, batches, "mse", "mean")
    distances = [_relative(approximate(problem, "psgd_kron", "hessian", iterations=t, progress=False).to_dense(), H)
                 for t in (1, 100, 1000)]
    assert distances[0] > distances[1] > distances[2]
    # The normalised steps keep a fluctuation of about μ = 0.01 relative around the optimum P = H⁻¹
    # (measured: 0.02 from 300 steps on).
    assert distances[0] > 0.5 and distances[2] < 0.05


def test_fit_converges_to_a_kronecker_operator_with_both_factors_non_trivial():
    model, batches = _linear_mse()
    problem = Problem(model, batches, "mse")
    g = torch.Generator().manual_seed(2)
    B, A = _spd(2, g), _spd(4, g)  # out side, in + 1 side
    target = Approximation(problem, "constructed", "hessian",
                           [("", ["weight", "bias"], KroneckerBlock([B, A], Homogeneous(2, 3)))])
    ap = approximate(problem, "psgd_kron", "hessian", iterations=2000, operator=target, progress=False)
    assert _relative(ap.to_dense(), target.to_dense()) < 0.05
    (Ql, Qr), = ap.factors
    # Up to the scale shared between the factors, Q_lᵀQ_l ≈ B⁻¹ on the out side and Q_rᵀQ_r ≈ A⁻¹.
    left, right = torch.linalg.inv(Ql.T @ Ql), torch.linalg.inv(Qr.T @ Qr)
    assert _relative(left / left.trace(), B / B.trace()) < 0.05
    assert _relative(right / right.trace(), A / A.trace()) < 0.05


def test_groups_join_weight_and_bias_and_keep_other_tensors_apart():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4),
                          nn.Linear(4, 2, bias=False)).to(DOUBLE)
    problem = Problem(model, (torch.randn(2, 2, 3, 3, dtype=DOUBLE), torch.randn(2, 2, dtype=DOUBLE)), "mse")
    groups = kron_groups(problem)
    assert [(label, names) for label, names, _ in groups] == [
        ("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]), ("3.weight", ["3.weight"]),
        ("3.bias", ["3.bias"]), ("4.weight", ["4.weight"])]
    layouts = [layout for _, _, layout in groups]
    assert [type(layout) for layout in layouts] == [Homogeneous, Homogeneous, Reshape, Reshape, Reshape]
    assert [layout.shape for layout in layouts] == [(3, 9), (4, 13), (4,), (4,), (2, 4)]
    weights_only = Problem(model, (torch.randn(2, 2, 3, 3, dtype=DOUBLE), torch.randn(2, 2, dtype=DOUBLE)), "mse",
                           params=r"^0\.weight")
    assert [layout.shape for _, _, layout in kron_groups(weights_only)] == [(3, 8)]


def test_fit_is_seeded_and_leaves_the_callers_rng_untouched():
    model, batches = _linear_mse()
    problem = Problem(model, batches, "mse")
    state = torch.get_rng_state()
    first, second, other = (approximate(problem, "psgd_kron", "ggn", iterations=40, seed=seed, progress=False)
                            for seed in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.factors[0], second.factors[0]))
    assert not torch.equal(first.factors[0][1], other.factors[0][1])


@pytest.mark.parametrize("options, message", [
    (dict(iterations=0), "iterations must be"),
    (dict(lr_precond=0.0), "lr_precond must be"),
    (dict(lr_precond=1.0), "lr_precond must be"),
    (dict(init_scale=0.0), "init_scale must be"),
    (dict(init_scale=float("inf")), "init_scale must be"),
    (dict(seed=-1), "seed must be"),
    (dict(damping=1e-3), "unknown option"),
    (dict(operator=torch.eye(8, dtype=DOUBLE)), "CurvatureOperator"),
])
def test_bad_input_is_refused(options, message):
    model, batches = _linear_mse()
    problem = Problem(model, batches, "mse")
    with pytest.raises(InvalidProblem, match=message):
        approximate(problem, "psgd_kron", "hessian", **{"iterations": 1, "progress": False, **options})
    with pytest.raises(InvalidProblem, match="unknown curvature kind"):
        approximate(problem, "psgd_kron", "newton")
