"""The diagonal approximations diag, diag_hutchinson, diag_gnb and diag_sqgrad against dense references.

Exact diagonals are compared with the diagonals of tests/reference.py's plain-autograd float64
matrices at rtol 1e-10 (atol 1e-10·max|d|): the two sides sum the same terms in different orders, so
they differ by rounding (~1e-15 relative), while a wrong factor or a missing per-example square is
O(1). The stochastic estimators are checked (a) exactly where the estimate has no randomness left (a
diagonal matrix for Hutchinson, fixed labels for GNB) and (b) for convergence with a tolerance of
5 standard errors per entry, the standard error derived from the estimator's variance; the seeds are
fixed, so the tests are deterministic.
"""

import re

import pytest
import torch
from torch import nn

import curvlab
import models
import reference
from curvlab.approx import approximate
from curvlab.approx.gnb import gnb_diagonal
from curvlab.approx.hutchinson import diag_hutchinson
from curvlab.errors import InvalidProblem

RTOL = 1e-10


def assert_diagonal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def diagonal_of(approximation) -> torch.Tensor:
    return approximation.to_dense().diagonal()


def problem(case, reduction="mean", data=None, params=None):
    return curvlab.Problem(case.model, case.batches if data is None else data, loss=case.loss,
                           reduction=reduction, params=params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "cnn", "transformer", "tied", "dict_inputs"])
def test_exact_diagonal_equals_the_dense_diagonal(case_name, kind, reduction, device):
    case = models.make_case(case_name, device)
    expected = reference.dense(kind, case.model, case.batches, case.loss, reduction).diagonal()
    assert_diagonal(diagonal_of(approximate(problem(case, reduction), "diag", kind)), expected)


@pytest.mark.parametrize("kind", ["hessian", "abs_hessian"])
def test_exact_hessian_diagonals_equal_the_dense_diagonal(kind, device):
    case = models.make_case("cnn", device)
    expected = reference.dense(kind, case.model, case.batches, case.loss, "mean").diagonal()
    assert_diagonal(diagonal_of(approximate(problem(case), "diag", kind)), expected)


@pytest.mark.parametrize("case_name", ["mlp_ce", "transformer", "mlp_mse"])
def test_fisher_mc_diagonal_is_taken_at_the_operators_sampled_labels(case_name, device):
    case = models.make_case(case_name, device)
    prob = problem(case)
    targets = curvlab.curvature(prob, "fisher_mc", mc_samples=3, seed=5).sampled_targets()
    expected = reference.mc_fisher(case.model, case.batches, case.loss, "mean", targets).diagonal()
    assert_diagonal(diagonal_of(approximate(prob, "diag", "fisher_mc", mc_samples=3, seed=5)), expected)


@pytest.mark.parametrize("case_name", ["cnn", "attention", "layernorm"])
def test_exact_diagonal_of_a_parameter_subset_is_the_sub_diagonal(case_name, device):
    case = models.make_case(case_name, device)
    names = [name for name, _ in case.model.named_parameters() if re.search(case.regex, name)]
    expected = reference.dense("ggn", case.model, case.batches, case.loss, "sum", names).diagonal()
    assert_diagonal(diagonal_of(approximate(problem(case, "sum", params=case.regex), "diag", "ggn")), expected)


def test_diagonal_blocks_are_labelled_by_module(device):
    case = models.make_case("cnn", device)
    prob = problem(case)
    approximation = approximate(prob, "diag", "ggn")
    assert [(label, names) for label, names, _ in approximation.blocks] == prob.module_blocks()
    assert approximation.kind == "diag" and approximation.curvature == "ggn"
    inverse = approximation.inverse(0.1).to_dense().diagonal()
    torch.testing.assert_close(inverse, 1 / (diagonal_of(approximation) + 0.1), rtol=1e-14, atol=0)


def test_linear_layer_applied_twice_takes_the_per_example_route(device):
    layer = nn.Linear(3, 3).double()
    model = nn.Sequential(layer, nn.Tanh(), layer, nn.Linear(3, 2).double()).to(device)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 2, (6,), generator=g).to(device)
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    expected = reference.dense("ggn", model, batches, "cross_entropy", "mean").diagonal()
    prob = curvlab.Problem(model, batches)
    assert_diagonal(diagonal_of(approximate(prob, "diag", "ggn")), expected)


# ----------------------------------------------------------------------------------------------
# diag_sqgrad and the gradient second moment


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sqgrad_is_adagrads_accumulator_over_the_number_of_batches(reduction, device):
    case = models.make_case("mlp_ce", device)
    prob = problem(case, reduction)
    model = models.make_case("mlp_ce", device).model  # a copy to step: the accumulator is the only result used
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.0, initial_accumulator_value=0.0)
    for x, y in case.batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
        optimizer.step()
    accumulator = torch.cat([optimizer.state[p]["sum"].flatten() for p in model.parameters()])
    expected = accumulator / len(case.batches)
    assert_diagonal(diagonal_of(approximate(prob, "diag_sqgrad")), expected)
    assert_diagonal(diagonal_of(approximate(prob, "diag", "gradient_second_moment")), expected)


def test_sqgrad_records_the_curvature_it_stands_for(device):
    prob = problem(models.make_case("mlp_ce", device))
    assert approximate(prob, "diag_sqgrad").curvature == "gradient_second_moment"
    compared_with_ggn = approximate(prob, "diag_sqgrad", "ggn")
    assert compared_with_ggn.curvature == "ggn"
    assert torch.equal(diagonal_of(compared_with_ggn), diagonal_of(approximate(prob, "diag_sqgrad")))


# ----------------------------------------------------------------------------------------------
# diag_hutchinson


class Scale(nn.Module):
    """f = w ⊙ x: with MSE its Hessian, 2 R diag(Σ_n x_n²), is diagonal."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, size, dtype=torch.float64))

    def forward(self, x):
        return self.weight * x


def test_hutchinson_is_exact_for_a_diagonal_curvature(device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device)
    prob = curvlab.Problem(Scale(4).to(device), (X, y), loss="mse")
    exact = 2 * X.square().sum(0) / X.numel()
    for kind in ("hessian", "ggn"):
        estimate = diagonal_of(approximate(prob, "diag_hutchinson", kind, samples=3, seed=1))
        torch.testing.assert_close(estimate, exact, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind, samples", [("ggn", 1000), ("hessian", 300)])
def test_hutchinson_converges_to_the_exact_diagonal(kind, samples, device):
    case = models.make_case("mlp_mse", device)
    dense = reference.dense(kind, case.model, case.batches, case.loss, "mean")
    # Var(z ⊙ C z)_i = Σ_{j≠i} C_ij²; the mean of `samples` draws has that over `samples`.
    std_error = ((dense.square().sum(1) - dense.diagonal().square()) / samples).sqrt()
    estimate = diagonal_of(approximate(problem(case), "diag_hutchinson", kind, samples=samples, seed=3))
    assert bool(((estimate - dense.diagonal()).abs() <= 5 * std_error + 1e-12).all())
    assert float((estimate - dense.diagonal()).abs().max()) > 0  # the estimate is random, not the exact diagonal


def test_hutchinson_spatial_average_is_the_kernel_window_mean_of_conv_weights(device):
    prob = problem(models.make_case("cnn", device))
    plain = prob.unflatten(diagonal_of(diag_hutchinson(prob, "ggn", samples=2, seed=4)))
    averaged = prob.unflatten(diagonal_of(diag_hutchinson(prob, "ggn", samples=2, seed=4, spatial_average=True)))
    for name, values in plain.items():
        if values.ndim == 4:
            window = values.mean(dim=(2, 3), keepdim=True).expand_as(values)
            torch.testing.assert_close(averaged[name], window, rtol=1e-14, atol=1e-17)
        else:
            assert torch.equal(averaged[name], values)


def test_hutchinson_absolute_takes_each_samples_magnitude_as_adahessian(device):
    prob = problem(models.make_case("mlp_ce", device))
    signed = diagonal_of(diag_hutchinson(prob, "hessian", samples=1, seed=7))
    absolute = diagonal_of(diag_hutchinson(prob, "hessian", samples=1, seed=7, absolute=True))
    assert torch.equal(absolute, signed.abs())
    assert bool((signed < 0).any())  # the Hessian estimate has negative entries, so the option matters


def test_hutchinson_is_reproducible_and_leaves_the_callers_rng_alone(device):
    prob = problem(models.make_case("mlp_ce", device))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = diagonal_of(diag_hutchinson(prob, "ggn", samples=2, seed=9))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(diagonal_of(diag_hutchinson(prob, "ggn", samples=2, seed=9)), first)
    assert not torch.equal(diagonal_of(diag_hutchinson(prob, "ggn", samples=2, seed=10)), first)


# ----------------------------------------------------------------------------------------------
# diag_gnb


def reference_gnb(case, reduction, targets) -> torch.Tensor:
    """(1/R) Σ_b (1/S) Σ_s (∇ R Σ_{n∈b} ℓ(f_n, ŷ_bsn))², with autograd."""
    R = reference.reduction_factor(case.batches, reduction)
    params = list(case.model.parameters())
    total = 0
    for (x, _), labels in zip(case.batches, targets, strict=True):
        for sample in labels:
            out = reference.forward(case.model, x)
            loss = R * reference.example_losses(out, sample, case.loss).sum()
            g = torch.cat([p.flatten() for p in torch.autograd.grad(loss, params)])
            total = total + g.square() / labels.shape[0] / R
    return total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_bce", "transformer"])
def test_gnb_scaling_at_fixed_labels_matches_autograd(case_name, reduction, device):
    case = models.make_case(case_name, device)
    prob = problem(case, reduction)
    targets = curvlab.curvature(prob, "fisher_mc", mc_samples=2, seed=1).sampled_targets()
    assert_diagonal(gnb_diagonal(prob, targets), reference_gnb(case, reduction, targets))
    assert_diagonal(diagonal_of(approximate(prob, "diag_gnb", samples=2, seed=1)), gnb_diagonal(prob, targets))


def test_gnb_equals_the_mc_fisher_diagonal_when_every_batch_has_one_example(device):
    case = models.make_case("mlp_ce", device)
    x, y = case.data
    prob = problem(case, data=[(x[n:n + 1], y[n:n + 1]) for n in range(y.shape[0])])
    gnb = diagonal_of(approximate(prob, "diag_gnb", samples=2, seed=4))
    assert_diagonal(gnb, diagonal_of(approximate(prob, "diag", "fisher_mc", mc_samples=2, seed=4)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gnb_is_unbiased_for_the_ggn_diagonal(reduction, device):
    case = models.make_case("mlp_mse", device)
    prob = problem(case, reduction)
    draws = torch.stack([diagonal_of(approximate(prob, "diag_gnb", seed=seed)) for seed in range(300)])
    exact = reference.dense("ggn", case.model, case.batches, case.loss, reduction).diagonal()
    # The draws are independent; their sample standard deviation over sqrt(300) is the standard error.
    std_error = draws.std(0) / 300 ** 0.5
    assert bool(((draws.mean(0) - exact).abs() <= 5 * std_error + 1e-12).all())


def test_gnb_leaves_the_callers_rng_alone(device):
    prob = problem(models.make_case("mlp_ce", device))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    approximate(prob, "diag_gnb")
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kind, options, message", [
    ("diag", {"curvature": "kfac"}, "diag does not support curvature='kfac'"),
    ("diag", {"mc_samples": 0}, "mc_samples must be a positive integer"),
    ("diag_gnb", {"curvature": "hessian"}, "diag_gnb does not support curvature='hessian'"),
    ("diag_gnb", {"samples": 1.5}, "samples must be a positive integer"),
    ("diag_gnb", {"seed": -1}, "seed must be an integer of at least 0"),
    ("diag_hutchinson", {"samples": 0}, "samples must be a positive integer"),
    ("diag_hutchinson", {"spatial_average": "yes"}, "spatial_average must be True or False"),
    ("diag_hutchinson", {"curvature": "gram"}, "diag_hutchinson does not support curvature='gram'"),
    ("diag_sqgrad", {"curvature": "adam"}, "diag_sqgrad does not support curvature='adam'"),
])
def test_bad_options_are_refused_with_the_fix(kind, options, message, device):
    prob = problem(models.make_case("mlp_ce", device))
    with pytest.raises(InvalidProblem, match=message.replace("(", r"\(")):
        approximate(prob, kind, **options)


def test_gnb_refuses_labels_that_do_not_fit_the_batches(device):
    prob = problem(models.make_case("mlp_ce", device))
    targets = curvlab.curvature(prob, "fisher_mc").sampled_targets()
    with pytest.raises(InvalidProblem, match="one .* per batch"):
        gnb_diagonal(prob, targets[:2])
