"""Shampoo's factors and matrix against hand-written float64 references from per-batch gradients.

The references take each batch's gradient with plain ``torch.autograd`` on the loss reduced as torch
reduces it on that batch alone, unfold it with ``movedim`` + ``reshape`` (not ``tensordot``) and form
the Kronecker products with ``torch.kron``. Both sides sum a handful of O(1) products in different
orders, so rounding stays near 1e-15 relative; rtol 1e-10 leaves ample room while any wrong
normalisation, mode or exponent is an O(1) error.
"""

import pytest
import torch
from torch import nn

import curvlab
import models
import reference
from curvlab.approx import approximate
from curvlab.approx.shampoo import shampoo_factors

RTOL = 1e-10


def batch_gradients(model, batches, loss, reduction):
    """``Ḡ_b`` of every batch by autograd: the batch's summed loss, divided by its terms for ``mean``."""
    names, params = zip(*model.named_parameters())
    result = []
    for x, y in batches:
        total = reference.example_losses(reference.forward(model, x), y, loss).sum()
        if reduction == "mean":
            total = total / y.numel()
        result.append(dict(zip(names, torch.autograd.grad(total, params))))
    return result


def reference_factors(gradients, name):
    shape = gradients[0][name].shape
    factors = []
    for mode in range(len(shape)):
        unfoldings = [g[name].movedim(mode, 0).reshape(shape[mode], -1) for g in gradients]
        factors.append(sum(u @ u.T for u in unfoldings) / len(gradients))
    return factors


def matrix_power(m, p):
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0) ** p) @ vectors.T


def assert_root_of(block, target, m):
    """``block`` is the positive semi-definite ``m``-th root of ``target``: ``block^m == target``, ``block ⪰ 0``.

    The PSD root is unique, and this comparison is well conditioned, unlike comparing with a reference
    root: the factors' zero eigenvalues come out as ±eps·‖F‖, and their m-th roots, (eps·‖F‖)^{1/m},
    differ between two computations by up to 1e-8 (m = 2) or 1e-4 (m = 4) relative.
    """
    scale = float(target.norm())
    torch.testing.assert_close(torch.linalg.matrix_power(block, m), target, rtol=RTOL, atol=RTOL * scale)
    assert float(torch.linalg.eigvalsh(block).min()) >= -RTOL * float(block.norm())


def kron_all(matrices):
    result = matrices[0]
    for m in matrices[1:]:
        result = torch.kron(result, m)
    return result


def diagonal_block(dense, problem, name):
    start, stop = problem.spans()[name]
    return dense[start:stop, start:stop]


def build(case_name, reduction="mean"):
    case = models.make_case(case_name)
    problem = curvlab.Problem(case.model, case.batches, loss=case.loss, reduction=reduction)
    return case, problem


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_factors_match_per_batch_unfolding_products_over_unequal_batches(case_name, reduction):
    case, problem = build(case_name, reduction)
    gradients = batch_gradients(case.model, case.batches, case.loss, reduction)
    factors = shampoo_factors(problem)
    for name in problem.param_names:
        expected = reference_factors(gradients, name)
        assert len(factors[name]) == len(expected)
        for actual, wanted in zip(factors[name], expected):
            torch.testing.assert_close(actual, wanted, rtol=RTOL, atol=RTOL * float(wanted.norm()))


def test_conv_kernel_keeps_all_four_modes():
    _, problem = build("cnn")
    factors = shampoo_factors(problem)
    assert [tuple(f.shape) for f in factors["0.weight"]] == [(3, 3), (2, 2), (3, 3), (3, 3)]
    assert [tuple(f.shape) for f in factors["4.weight"]] == [(4, 4), (3, 3), (2, 2), (2, 2)]


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_matrix_is_kronecker_product_of_factor_roots(case_name):
    case, problem = build(case_name)
    gradients = batch_gradients(case.model, case.batches, case.loss, "mean")
    dense = approximate(problem, "shampoo", curvature="gradient_second_moment").to_dense()
    for name in problem.param_names:
        expected_factors = reference_factors(gradients, name)
        block = diagonal_block(dense, problem, name)
        assert_root_of(block, kron_all(expected_factors), len(expected_factors))
    assert torch.count_nonzero(dense) == sum(shape.numel() ** 2 for shape in problem.param_shapes)


def test_bias_block_is_the_exact_gradient_second_moment_block():
    case, problem = build("mlp_ce")
    gradients = batch_gradients(case.model, case.batches, case.loss, "mean")
    dense = approximate(problem, "shampoo", curvature="gradient_second_moment").to_dense()
    for name in ("0.bias", "2.bias"):
        expected = sum(torch.outer(g[name], g[name]) for g in gradients) / len(gradients)
        torch.testing.assert_close(diagonal_block(dense, problem, name), expected, rtol=RTOL,
                                   atol=RTOL * float(expected.norm()))


def test_matrix_is_exact_for_one_rank_one_gradient():
    # One example through a bias-free Linear layer: Ḡ = e aᵀ is rank one, and ⊗ L_i^{1/m} = ḡ ḡᵀ.
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Linear(4, 3, bias=False).double()
        x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    problem = curvlab.Problem(model, (x, y))
    (gradient,) = batch_gradients(model, [(x, y)], "cross_entropy", "mean")
    g = gradient["weight"].flatten()
    dense = approximate(problem, "shampoo", curvature="gradient_second_moment").to_dense()
    # The factors' zero eigenvalues come out as ±eps·‖L‖; their square roots, √eps ≈ 1.5e-8 relative,
    # bound the agreement.
    torch.testing.assert_close(dense, torch.outer(g, g), rtol=0, atol=1e-7 * float(g.norm()) ** 2)


def test_exponent_order_overrides_every_factors_exponent():
    case, problem = build("cnn")
    gradients = batch_gradients(case.model, case.batches, case.loss, "mean")
    dense = approximate(problem, "shampoo", curvature="gradient_second_moment", exponent_order=2).to_dense()
    # every one of the four factors gets the exponent 1/2: the block is the square root of their product
    assert_root_of(diagonal_block(dense, problem, "4.weight"), kron_all(reference_factors(gradients, "4.weight")), 2)


def test_tensors_past_max_dim_get_the_diagonal_second_moment():
    case, problem = build("mlp_ce")  # weights (8, 5) and (4, 8), biases (8,) and (4,)
    gradients = batch_gradients(case.model, case.batches, case.loss, "mean")
    approximation = approximate(problem, "shampoo", curvature="gradient_second_moment", max_dim=5)
    kinds = {label: type(block).__name__ for label, _, block in approximation.blocks}
    assert kinds == {"0.weight": "DiagonalBlock", "0.bias": "DiagonalBlock", "2.weight": "DiagonalBlock",
                     "2.bias": "KroneckerBlock"}
    dense = approximation.to_dense()
    for name in ("0.weight", "0.bias", "2.weight"):
        expected = sum(g[name].flatten() ** 2 for g in gradients) / len(gradients)
        torch.testing.assert_close(diagonal_block(dense, problem, name), torch.diag(expected), rtol=RTOL, atol=0)


def test_power_acts_per_factor_and_equals_the_dense_power():
    _, problem = build("cnn")
    approximation = approximate(problem, "shampoo", curvature="gradient_second_moment")
    dense = approximation.to_dense()
    powered = approximation.power(0.5)
    assert all(type(block).__name__ == "KroneckerBlock" for _, _, block in powered.blocks)
    # Factor eigenvalues near zero make the root of the dense matrix sensitive at ~sqrt(eps)·‖·‖.
    expected = matrix_power(dense, 0.5)
    torch.testing.assert_close(powered.to_dense(), expected, rtol=0, atol=1e-7 * float(expected.norm()))


def test_damped_inverse_undoes_the_damped_matrix():
    _, problem = build("mlp_ce")
    approximation = approximate(problem, "shampoo", curvature="gradient_second_moment")
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    damping = 1e-2
    shifted = approximation @ v + damping * v
    # (S̃ + δI) has condition number ≈ (‖S̃‖ + δ)/δ ≈ 60 here: the round trip loses ~1e-14.
    torch.testing.assert_close(approximation.inverse(damping) @ shifted, v, rtol=0, atol=1e-11)


@pytest.mark.parametrize("options, message", [
    ({"curvature": "ggn"}, "gradient_second_moment"),
    ({"curvature": "empirical_fisher"}, "gradient_second_moment"),
    ({"exponent_order": 0}, "exponent_order"),
    ({"exponent_order": 1.5}, "exponent_order"),
    ({"max_dim": 0}, "max_dim"),
])
def test_bad_options_are_refused(options, message):
    _, problem = build("mlp_ce")
    options = {"curvature": "gradient_second_moment", **options}
    with pytest.raises(curvlab.InvalidProblem, match=message):
        approximate(problem, "shampoo", **options)
