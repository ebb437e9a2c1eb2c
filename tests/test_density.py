"""Spectral densities by stochastic Lanczos quadrature against the exact eigenvalues of ``eigh`` (float64).

Accuracy is the issue's: the smoothed density within 2% of the spectral range of the exact eigenvalue
distribution in 1-Wasserstein distance, with 10 probes × 80 steps, with and without full
reorthogonalisation, on the Hessians and GGNs of tiny models and on synthetic spectra with many more
eigenvalues than steps.
"""

from __future__ import annotations

import functools

import pytest
import scipy.stats
import torch

import curvlab
import models
from curvlab.spectra.density import smoothed_density
from curvlab.spectra.spectrum import spectrum
from test_spectrum import with_spectrum

PROBES, STEPS = 10, 80


@functools.lru_cache(maxsize=None)
def operator(case_name: str, kind: str, device: str):
    case = models.make_case(case_name, device, torch.float64)
    op = curvlab.curvature(curvlab.Problem(case.model, case.batches, loss=case.loss), kind)
    return op, torch.linalg.eigvalsh(op.to_dense(progress=False)).cpu()


def wasserstein(points: torch.Tensor, weights: torch.Tensor, exact: torch.Tensor) -> float:
    return scipy.stats.wasserstein_distance(points.flatten().numpy(), exact.numpy(),
                                            u_weights=weights.flatten().numpy())


def density_error(spec, exact: torch.Tensor) -> float:
    """W1 between the smoothed density (as grid weights) and the exact eigenvalues, over their range."""
    grid, values = spec.density
    return wasserstein(grid, values * (grid[1] - grid[0]), exact) / float(exact.max() - exact.min())


def synthetic(device):
    """P = 1500: a bulk near zero (half of it exactly zero), a negative tail and a few outliers on top."""
    generator = torch.Generator().manual_seed(3)
    bulk = torch.rand(600, generator=generator, dtype=torch.float64) ** 4
    values = torch.cat([torch.zeros(750, dtype=torch.float64), bulk, -0.3 * torch.rand(140, generator=generator,
                        dtype=torch.float64), torch.tensor([50.0, 30.0, 20.0, 20.0, 10.0] + [5.0] * 5,
                                                           dtype=torch.float64)])
    return with_spectrum(values, device, seed=1), values.sort().values


@pytest.mark.parametrize("reorthogonalize", [True, False])
@pytest.mark.parametrize("case_name, kind", [("mlp_ce", "hessian"), ("mlp_ce", "ggn"), ("cnn", "hessian"),
                                             ("transformer", "hessian"), ("transformer", "ggn"),
                                             ("layernorm", "ggn")])
def test_slq_density_is_within_two_percent_of_the_range_in_wasserstein(case_name, kind, reorthogonalize, device):
    op, exact = operator(case_name, kind, str(device))
    spec = spectrum(op, method="slq", probes=PROBES, steps=STEPS, reorthogonalize=reorthogonalize, progress=False)
    assert spec.method == "slq" and spec.reorthogonalized is reorthogonalize
    assert density_error(spec, exact) < 0.02


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_slq_density_of_many_eigenvalues_with_few_steps(reorthogonalize, device):
    op, exact = synthetic(device)
    spec = spectrum(op, method="slq", probes=PROBES, steps=STEPS, reorthogonalize=reorthogonalize, progress=False)
    assert density_error(spec, exact) < 0.02
    assert spec.products == PROBES * STEPS


@pytest.mark.parametrize("decades, steps", [(4, STEPS), (6, 200)])
def test_log_density_is_within_two_percent_of_its_range_across_the_decades_the_steps_resolve(decades, steps, device):
    """Eigenvalues log-uniform over ``decades`` below 100: 80 steps resolve four decades, 200 steps six."""
    generator = torch.Generator().manual_seed(5)
    values = 10.0 ** (2 - decades * torch.rand(1000, generator=generator, dtype=torch.float64))
    op = with_spectrum(values, device, seed=2)
    spec = spectrum(op, method="slq", probes=PROBES, steps=steps, log_eps=1e-9, progress=False)
    exact = torch.log10(values.abs() + 1e-9)
    grid, density = spec.log_density
    error = wasserstein(grid, density * (grid[1] - grid[0]), exact) / float(exact.max() - exact.min())
    assert spec.log_eps == 1e-9
    assert error < 0.02


def test_extreme_ritz_values_are_the_extreme_eigenvalues(device):
    op, exact = operator("transformer", "hessian", str(device))
    spec = spectrum(op, method="slq", probes=PROBES, steps=STEPS, tol=1e-8, progress=False)
    assert bool(spec.converged.all())
    torch.testing.assert_close(spec.eigenvalues.cpu(), exact[[0, -1]], rtol=1e-8, atol=0)


def test_quadrature_weights_sum_to_one_and_density_integrates_to_one(device):
    op, _ = operator("cnn", "ggn", str(device))
    spec = spectrum(op, method="slq", probes=4, steps=30, progress=False)
    torch.testing.assert_close(spec.weights.sum(dim=1), torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=0)
    for grid, values in (spec.density, spec.log_density):
        # A Riemann sum over ±5σ margins: the Gaussian tails beyond them hold 6e-7 of the mass.
        assert abs(float(values.sum() * (grid[1] - grid[0])) - 1) < 1e-5
    assert spec.nodes.shape == spec.weights.shape == (4, 30)


def test_smoothed_density_is_the_stated_gaussian_mixture():
    points = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    grid, values, width = smoothed_density(points, weights, width=0.5, grid_points=7)
    expected = sum(w * torch.exp(-0.5 * ((grid - x) / 0.5) ** 2) / (0.5 * (2 * torch.pi) ** 0.5)
                   for x, w in zip(points, weights))
    assert width == 0.5
    torch.testing.assert_close(values, expected, rtol=1e-14, atol=0)
    assert float(grid[0]) == -2.5 and float(grid[-1]) == 5.5


def test_reorthogonalised_slq_stops_exactly_at_an_invariant_krylov_space(device):
    """A GGN of rank r: each probe's Krylov space is invariant after at most r + 1 steps."""
    op, exact = operator("mlp_ce", "ggn", str(device))
    rank = int((exact > 1e-12 * exact.max()).sum())
    spec = spectrum(op, method="slq", probes=PROBES, steps=STEPS, reorthogonalize=True, progress=False)
    assert spec.products <= PROBES * (rank + 2)  # r + 1, and one more where rounding hides the breakdown


def test_same_seed_same_density_and_caller_state_untouched(device):
    op, _ = operator("mlp_ce", "hessian", str(device))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first, again = (spectrum(op, method="slq", probes=3, steps=20, seed=4, progress=False) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.nodes, again.nodes) and torch.equal(first.density[1], again.density[1])
    other = spectrum(op, method="slq", probes=3, steps=20, seed=5, progress=False)
    assert not torch.equal(other.weights, first.weights)


def test_auto_gives_the_density_beyond_the_memory_budget_when_all_eigenvalues_are_asked(monkeypatch, device):
    op, _ = operator("mlp_ce", "hessian", str(device))
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1000")
    assert spectrum(op, k=None, probes=2, steps=10, progress=False).method == "slq"
    assert spectrum(op, k=2, progress=False).method == "lanczos"
