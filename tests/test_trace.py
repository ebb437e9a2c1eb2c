"""Traces and diagonals (curvlab.spectra.trace) against the dense float64 matrices of tiny models.

The exact methods sum the same products as ``to_dense``, so they agree with it to rounding (1e-12
relative). The random ones are checked statistically, always with fixed seeds so that every run
gives the same numbers: a single seed must land within 3 standard errors, and over 20 seeds at
least 90% must (a Gaussian gives 99.7%, but the standard error is itself estimated from as few as
12 terms, whose distribution is skewed).
"""

from __future__ import annotations

import functools

import pytest
import torch

import curvlab
import models
from curvlab.spectra import diagonal, trace

CASES = ["mlp_ce", "cnn"]  # P = 84 and 130
KINDS = ["hessian", "ggn"]  # indefinite, and positive semi-definite with a decaying spectrum
SEEDS = range(20)


@functools.lru_cache(maxsize=None)
def operator(case_name: str, kind: str, device: str, dtype=torch.float64):
    """The curvature operator of a case on all its parameters, and its dense matrix."""
    case = models.make_case(case_name, device, dtype)
    op = curvlab.curvature(curvlab.Problem(case.model, case.data, loss=case.loss), kind)
    return op, op.to_dense(progress=False)


def hutchinson_std(dense: torch.Tensor, samples: int) -> float:
    """The standard deviation of Hutchinson's trace estimate: ``sqrt(2 (‖C‖_F² − Σ C_ii²) / m)``."""
    return float((2 * (dense.square().sum() - dense.diagonal().square().sum()) / samples).sqrt())


class CountingOperator:
    """Wraps an operator and records how many directions each product had."""

    def __init__(self, op):
        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device
        self.blocks: list[int] = []

    def reusing_passes(self):
        return self.op.reusing_passes()

    def _apply(self, rows):
        self.blocks.append(rows.shape[0])
        return self.op._apply(rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_exact_trace_matches_dense_trace_float64(case_name, kind, device):
    op, dense = operator(case_name, kind, str(device))
    est = trace(op, method="exact")
    assert est.estimate == pytest.approx(float(dense.trace()), rel=1e-12)
    assert (est.std_error, est.method, est.products, est.samples) == (0.0, "exact", op.shape[0], 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_exact_diagonal_matches_dense_diagonal_float64(case_name, kind, device):
    op, dense = operator(case_name, kind, str(device))
    est = diagonal(op, method="exact")
    torch.testing.assert_close(est.estimate, dense.diagonal(), rtol=1e-12, atol=1e-12 * float(dense.norm()))
    assert torch.equal(est.std_error, torch.zeros_like(dense.diagonal()))
    assert (est.method, est.products) == ("exact", op.shape[0])


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_estimates_lie_within_three_standard_errors_of_the_exact_trace(case_name, kind, method, device):
    # With 36 products Hutch++ sketches 12 directions, fewer than the rank of either GGN (at least
    # 16), so its deflated remainder is random, not rounding error, and 12 terms estimate its spread.
    op, dense = operator(case_name, kind, str(device))
    exact = float(dense.trace())
    estimates = [trace(op, method=method, samples=36, seed=seed) for seed in SEEDS]
    assert all(est.products == 36 and est.method == method for est in estimates)
    assert abs(estimates[0].estimate - exact) <= 3 * estimates[0].std_error
    within = [abs(est.estimate - exact) <= 3 * est.std_error for est in estimates]
    assert sum(within) >= 0.9 * len(within)


def test_hutchpp_has_lower_variance_than_hutchinson_on_a_decaying_ggn_spectrum(device):
    # The CNN's GGN has eigenvalues 0.53, 0.28, then below 0.01: Hutch++'s sketch of 10 directions
    # takes the top away. Measured over 30 seeds with 30 products: std 0.099 (Hutchinson, theory 0.120)
    # against 0.0018 (Hutch++), a ratio of 56.
    op, dense = operator("cnn", "ggn", str(device))
    spread = {
        method: torch.tensor([trace(op, method=method, samples=30, seed=seed).estimate for seed in range(30)]).std()
        for method in ("hutchinson", "hutchpp")
    }
    assert spread["hutchinson"] >= 10 * spread["hutchpp"]
    assert spread["hutchinson"] == pytest.approx(hutchinson_std(dense, 30), rel=0.4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_hutchinson_std_error_estimates_the_true_standard_deviation(case_name, kind, device):
    # The mean over seeds of std_error² is an unbiased estimate of Var(zᵀCz) / m.
    op, dense = operator(case_name, kind, str(device))
    errors = torch.tensor([trace(op, method="hutchinson", samples=30, seed=seed).std_error for seed in SEEDS])
    assert float(errors.square().mean().sqrt()) == pytest.approx(hutchinson_std(dense, 30), rel=0.15)


@pytest.mark.parametrize("case_name, samples", [("mlp_ce", 75), ("cnn", 51)])
def test_hutchpp_is_exact_when_the_rank_is_at_most_the_sketch_size(case_name, samples, device):
    # Cross-entropy's GGN on N = 8 examples of C classes has rank at most N (C − 1): 24 for mlp_ce
    # (C = 4), 16 for cnn (C = 3); the sketch has samples / 3 = 25 and 17 directions.
    op, dense = operator(case_name, "ggn", str(device))
    est = trace(op, samples=samples)
    assert est.method == "hutchpp" and op.shape[0] > samples
    assert est.estimate == pytest.approx(float(dense.trace()), rel=1e-10)
    assert est.std_error <= 1e-10 * float(dense.trace())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_hutchinson_diagonal_lies_within_four_standard_errors_for_95_percent_of_entries(case_name, kind, device):
    op, dense = operator(case_name, kind, str(device))
    est = diagonal(op, method="hutchinson", samples=100, seed=0)
    assert (est.method, est.products, est.samples) == ("hutchinson", 100, 100)
    error = (est.estimate - dense.diagonal()).abs()
    within = error <= 4 * est.std_error + 1e-12 * float(dense.norm())
    assert within.double().mean() >= 0.95
    # Entry i has variance Σ_{j≠i} C_ij² per probe; the estimated standard errors follow it.
    true_std = ((dense.square().sum(1) - dense.diagonal().square()) / 100).sqrt()
    assert float(est.std_error.norm() / true_std.norm()) == pytest.approx(1.0, rel=0.15)


def test_auto_is_exact_when_samples_cover_P_and_random_otherwise(device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    P = op.shape[0]
    assert [trace(op, samples=s).method for s in (P, P - 1, 2)] == ["exact", "hutchpp", "hutchinson"]
    assert [diagonal(op, samples=s).method for s in (P, P - 1)] == ["exact", "hutchinson"]


@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutchpp"])
def test_products_are_counted_and_applied_at_most_batch_at_a_time(method, device):
    op, dense = operator("mlp_ce", "ggn", str(device))
    counting = CountingOperator(op)
    est = trace(counting, method=method, samples=40, seed=1, batch=7)
    assert sum(counting.blocks) == est.products == (op.shape[0] if method == "exact" else 40)
    assert max(counting.blocks) <= 7
    assert est.estimate == pytest.approx(trace(op, method=method, samples=40, seed=1).estimate, rel=1e-12)
    if method != "hutchpp":
        counting.blocks.clear()
        est = diagonal(counting, method=method, samples=40, seed=1, batch=7)
        assert sum(counting.blocks) == est.products and max(counting.blocks) <= 7
        torch.testing.assert_close(est.estimate, diagonal(op, method=method, samples=40, seed=1).estimate,
                                   rtol=1e-12, atol=1e-12 * float(dense.norm()))


def test_diagonal_comes_back_on_the_operators_device_and_dtype(device):
    op, _ = operator("mlp_ce", "hessian", str(device), torch.float32)
    for method in ("exact", "hutchinson"):
        est = diagonal(op, method=method, samples=10)
        for tensor in (est.estimate, est.std_error):
            assert (tensor.shape, tensor.dtype, tensor.device.type) == ((op.shape[0],), torch.float32, device.type)


def test_same_seed_gives_identical_numbers_and_other_seeds_differ(device):
    op, _ = operator("cnn", "hessian", str(device))
    for method in ("hutchinson", "hutchpp"):
        first, again, other = (trace(op, method=method, samples=12, seed=seed) for seed in (3, 3, 4))
        assert first == again
        assert first.estimate != other.estimate and first.std_error != other.std_error
    first, again, other = (diagonal(op, method="hutchinson", samples=12, seed=seed) for seed in (3, 3, 4))
    assert torch.equal(first.estimate, again.estimate) and torch.equal(first.std_error, again.std_error)
    assert not torch.equal(first.estimate, other.estimate)


def test_the_callers_random_state_is_untouched(device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    trace(op, method="hutchinson", samples=12)
    trace(op, method="hutchpp", samples=12)
    diagonal(op, method="hutchinson", samples=12)
    assert torch.equal(torch.rand(5), expected)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)


@pytest.mark.parametrize("call, message", [
    (lambda op: trace(op, method="lanczos"), "unknown method 'lanczos'"),
    (lambda op: diagonal(op, method="hutchpp"), "unknown method 'hutchpp'"),
    (lambda op: trace(op, samples=0), "samples must be a positive integer"),
    (lambda op: diagonal(op, samples=-3), "samples must be a positive integer"),
    (lambda op: trace(op, samples=2.5), "samples must be a positive integer"),
    (lambda op: trace(op, method="hutchpp", samples=2), "Hutch\\+\\+ .* needs samples >= 3"),
    (lambda op: trace(op, batch=0), "batch must be a positive integer"),
])
def test_bad_arguments_are_refused(call, message, device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    with pytest.raises(curvlab.InvalidProblem, match=message):
        call(op)
