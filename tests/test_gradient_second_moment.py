"""The gradient second moment M = (1/B) Σ_b ḡ_b ḡ_bᵀ against a plain-autograd reference (float64).

The reference reduces each batch's loss as torch's nn.functional losses do on that batch alone and
takes its gradient with torch.autograd.grad. Both sides evaluate the same sums in different orders,
so they agree to rounding: rtol 1e-10 leaves four orders of magnitude of room, while a wrong
per-batch factor (e.g. the dataset's R instead of the batch's mean) is an O(1) error.
"""

import pytest
import torch
import torch.nn.functional as F

import curvlab
import models

TORCH_LOSSES = {"cross_entropy": lambda out, y, reduction: F.cross_entropy(out.flatten(0, -2), y.flatten(),
                                                                          reduction=reduction),
                "mse": F.mse_loss, "bce": F.binary_cross_entropy_with_logits}


def reference_second_moment(case: models.Case, reduction: str) -> torch.Tensor:
    params = list(case.model.parameters())
    gradients = []
    for x, y in case.batches:
        out = case.model(**x) if isinstance(x, dict) else case.model(x)
        loss = TORCH_LOSSES[case.loss](out, y, reduction=reduction)
        gradients.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(gradients)
    return G.T @ G / len(case.batches)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied", "dict_inputs"])
def test_second_moment_matches_autograd_batch_gradients(case_name, reduction, device):
    case = models.make_case(case_name, device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss, reduction=reduction)
    M = curvlab.curvature(prob, "gradient_second_moment")
    expected = reference_second_moment(case, reduction)
    torch.testing.assert_close(M.to_dense(), expected, rtol=1e-10, atol=1e-10 * float(expected.norm()))
    v = torch.randn(prob.num_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(M @ v.to(device), expected @ v.to(device), rtol=1e-10,
                               atol=1e-10 * float(expected.norm() * v.norm()))


def test_second_moment_has_rank_at_most_the_number_of_batches(device):
    case = models.make_case("mlp_ce", device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    dense = curvlab.curvature(prob, "gradient_second_moment").to_dense()
    assert int(torch.linalg.matrix_rank(dense)) == len(case.batches)


def test_second_moment_depends_on_the_batching_unlike_the_ggn(device):
    case = models.make_case("mlp_ce", device)
    split = curvlab.curvature(curvlab.Problem(case.model, case.batches, loss=case.loss), "gradient_second_moment")
    whole = curvlab.curvature(curvlab.Problem(case.model, case.data, loss=case.loss), "gradient_second_moment")
    g = curvlab.Problem(case.model, case.data, loss=case.loss).gradient()
    torch.testing.assert_close(whole.to_dense(), torch.outer(g, g), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(split.to_dense(), whole.to_dense())


def test_second_moment_block_diagonal_keeps_the_module_blocks(device):
    case = models.make_case("mlp_ce", device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    full = curvlab.curvature(prob, "gradient_second_moment").to_dense()
    blocks = curvlab.curvature(prob, "gradient_second_moment", block_diagonal=True).to_dense()
    first = sum(p.numel() for p in case.model[0].parameters())
    torch.testing.assert_close(blocks[:first, :first], full[:first, :first], rtol=1e-12, atol=1e-15)
    assert bool((blocks[:first, first:] == 0).all())


def test_keeping_batch_gradients_over_the_budget_is_refused(monkeypatch, device):
    case = models.make_case("mlp_ce", device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", str(len(case.batches) * prob.num_params * 8 - 1))
    with pytest.raises(curvlab.DenseTooLarge, match="batch gradients"):
        curvlab.curvature(prob, "gradient_second_moment") @ torch.zeros(prob.num_params, dtype=torch.float64)
