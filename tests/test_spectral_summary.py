"""Derived spectral quantities, per-block spectra and eigenspace overlaps against direct dense computations."""

from __future__ import annotations

import math

import pytest
import torch

import curvlab
import models
from curvlab.spectra import block_spectra, eigenspace_overlap, spectral_summary
from curvlab.spectra.overlap import leading_eigenspace, projector_cosine
from curvlab.spectra.spectrum import spectrum
from test_density import PROBES, STEPS, synthetic
from test_spectrum import operator


def test_dense_summary_equals_the_formulas_on_an_indefinite_hessian(device):
    op, dense = operator("cnn", "hessian", str(device))
    values = torch.linalg.eigvalsh((dense + dense.T) / 2).cpu()
    tau = values.numel() * torch.finfo(torch.float64).eps * float(values.abs().max())
    summary = spectral_summary(spectrum(op, method="dense", k=None, progress=False), damping=2.0)
    p = values.abs() / values.abs().sum()
    assert summary.lambda_max == pytest.approx(float(values[-1]), rel=1e-14)
    assert summary.lambda_min == pytest.approx(float(values[0]), rel=1e-14)
    assert summary.condition_positive == pytest.approx(float(values[-1] / values[values > tau][0]), rel=1e-12)
    assert summary.condition_damped == pytest.approx(float((values[-1] + 2) / (values[0] + 2)), rel=1e-12)
    assert summary.negative_count == int((values < -tau).sum()) > 0
    assert summary.negative_mass == pytest.approx(float(values[values < -tau].abs().sum() / values.abs().sum()),
                                                  rel=1e-12)
    assert summary.effective_rank == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-12)
    assert summary.source == "dense eigh" and summary.threshold == pytest.approx(tau, rel=1e-14)


def test_damped_condition_is_infinite_when_the_damped_matrix_is_not_positive_definite(device):
    op, _ = operator("cnn", "hessian", str(device))
    summary = spectral_summary(spectrum(op, method="dense", k=None, progress=False), damping=0.0)
    assert summary.condition_damped == math.inf


def test_partial_spectra_give_only_the_extremes_they_computed(device):
    op, dense = operator("mlp_ce", "hessian", str(device))
    values = torch.linalg.eigvalsh(dense).cpu()
    top = spectral_summary(spectrum(op, method="lanczos", k=3, which="LA", tol=1e-10, progress=False))
    both = spectral_summary(spectrum(op, method="lanczos", k=4, which="BE", tol=1e-10, progress=False), damping=1.0)
    assert top.lambda_max == pytest.approx(float(values[-1]), rel=1e-8) and math.isnan(top.lambda_min)
    assert both.lambda_min == pytest.approx(float(values[0]), rel=1e-8)
    assert both.condition_damped == pytest.approx(float((values[-1] + 1) / (values[0] + 1)), rel=1e-7)
    assert math.isnan(top.condition_damped)
    for summary in (top, both):
        assert math.isnan(summary.negative_count) and math.isnan(summary.effective_rank)
        assert "lanczos" in summary.source


def test_slq_summary_estimates_agree_with_the_exact_values(device):
    """SLQ estimates of a P = 1500 spectrum with 140 negative eigenvalues out of 1500.

    The negative count is P times a Hutchinson estimate of the fraction, of standard deviation about
    sqrt(2 · 140 / 10) ≈ 5.3 for 10 probes: the test allows under 4 of them. The mass and the effective
    rank are ratios of such estimates; over seeds 0–5 they scattered by up to 12 % and 24 % (seed 0:
    6 % and 4 %), so the bounds are 15 % each, tight for this seed and below the estimator's own spread.
    """
    op, values = synthetic(device)
    spec = spectrum(op, method="slq", probes=PROBES, steps=STEPS, progress=False)
    summary = spectral_summary(spec, damping=1.0)
    assert summary.negative_count == pytest.approx(140, abs=20)
    exact_mass = float(values[values < 0].abs().sum() / values.abs().sum())
    assert summary.negative_mass == pytest.approx(exact_mass, rel=0.15)
    p = values.abs() / values.abs().sum()
    exact_rank = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
    assert summary.effective_rank == pytest.approx(exact_rank, rel=0.15)
    assert summary.lambda_max == pytest.approx(50.0, rel=1e-6)
    assert math.isnan(summary.condition_positive) and "SLQ" in summary.source


def test_summary_rows_carry_their_labels(device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    rows = spectral_summary(spectrum(op, method="dense", k=None, progress=False)).rows()
    assert [label for label, _ in rows][:2] == ["λ_max", "λ_min"] and len(rows) == 7


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_block_spectra_equal_the_spectra_of_the_dense_diagonal_blocks(kind, device):
    case = models.make_case("cnn", device, torch.float64)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    op = curvlab.curvature(prob, kind)
    dense = op.to_dense(progress=False)
    spectra = block_spectra(op, progress=False)
    assert list(spectra) == [module for module, _ in prob.module_blocks()]
    offset = 0
    for (module, names), spec in zip(prob.module_blocks(), spectra.values()):
        size = sum(prob.params[name].numel() for name in names)
        block = dense[offset:offset + size, offset:offset + size]
        offset += size
        torch.testing.assert_close(spec.eigenvalues, torch.linalg.eigvalsh(block), rtol=0,
                                   atol=1e-12 * float(dense.abs().max()))


def test_block_spectra_of_a_block_diagonal_operator_use_its_blocks(device):
    case = models.make_case("mlp_ce", device, torch.float64)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    op = curvlab.curvature(prob, "ggn", block_diagonal=True)
    spectra = block_spectra(op, method="lanczos", k=2, tol=1e-10, progress=False)
    assert list(spectra) == ["0", "2"]
    for (_, block), spec in zip(op.blocks, spectra.values()):
        exact = torch.linalg.eigvalsh(block.to_dense(progress=False))[-2:]
        torch.testing.assert_close(spec.eigenvalues, exact, rtol=1e-8, atol=0)


def test_eigenspace_overlap_is_the_mean_squared_cosine_of_the_principal_angles():
    angle = 0.3
    U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    V = torch.tensor([[1.0, 0.0], [0.0, math.cos(angle)], [0.0, math.sin(angle)]], dtype=torch.float64)
    assert eigenspace_overlap(U, V) == pytest.approx((1 + math.cos(angle) ** 2) / 2, rel=1e-14)
    assert eigenspace_overlap(U, U) == pytest.approx(1.0, rel=1e-14)


def _orthogonal(n, generator):
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q


def test_tie_weighted_overlap_does_not_depend_on_the_basis_chosen_within_a_tie():
    # A has a 3-fold eigenvalue across the 2nd place of its top 2 (and -3 ties with it in magnitude); two
    # eigenbases of A differing by a rotation inside that eigenspace give different plain overlaps with
    # C's top 2, while the weighted projector (weights 1, 1/4, 1/4, 1/4, 1/4) is the same for both.
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([5.0, 3.0, 3.0, -3.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    Q = _orthogonal(7, g)
    rotated = Q.clone()
    rotated[:, 1:5] = Q[:, 1:5] @ _orthogonal(4, g)
    C = Q @ torch.diag(torch.tensor([4.0, 0.1, 0.2, 0.3, 2.0, 0.4, 0.5], dtype=torch.float64)) @ Q.T
    values_c, vectors_c = torch.linalg.eigh(C)
    top_c = leading_eigenspace(values_c, vectors_c, 2)
    assert top_c[1].tolist() == [1.0, 1.0]
    first, second = leading_eigenspace(values, Q, 2), leading_eigenspace(values, rotated, 2)
    assert first[1].tolist() == [1.0, 0.25, 0.25, 0.25, 0.25]
    plain = [eigenspace_overlap(U[:, :2], top_c[0]) for U in (first[0], second[0])]
    assert abs(plain[0] - plain[1]) > 0.01
    assert projector_cosine(first, top_c) == pytest.approx(projector_cosine(second, top_c), rel=1e-13)
    # against the explicit projectors: P_A = e1 e1ᵀ + (1/4) Q_tie Q_tieᵀ
    P_a = Q[:, :1] @ Q[:, :1].T + Q[:, 1:5] @ Q[:, 1:5].T / 4
    P_c = top_c[0] @ top_c[0].T
    expected = (P_a * P_c).sum() / (P_a.norm() * P_c.norm())
    assert projector_cosine(first, top_c) == pytest.approx(float(expected), rel=1e-13)
    assert projector_cosine(first, second) == pytest.approx(1.0, rel=1e-13)


def test_without_ties_the_weighted_overlap_is_the_plain_one():
    g = torch.Generator().manual_seed(1)
    values = torch.linspace(-2.0, 3.0, 9, dtype=torch.float64)
    Q, R = _orthogonal(9, g), _orthogonal(9, g)
    for k in (1, 4, 9):
        first, second = leading_eigenspace(values, Q, k), leading_eigenspace(values + 0.3, R, k)
        assert first[1].tolist() == [1.0] * k
        assert projector_cosine(first, second) == pytest.approx(eigenspace_overlap(first[0], second[0]), rel=1e-13)
    zero = leading_eigenspace(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 2)
    assert zero[1].tolist() == [0.5] * 4 and projector_cosine(zero, zero) == pytest.approx(1.0, rel=1e-14)


def test_overlap_of_two_curvatures_top_eigenspaces_from_their_spectra(device):
    op_h, dense_h = operator("mlp_ce", "hessian", str(device))
    op_g, dense_g = operator("mlp_ce", "ggn", str(device))
    k = 5
    h = spectrum(op_h, method="lanczos", k=k, tol=1e-10, progress=False)
    g = spectrum(op_g, method="lanczos", k=k, tol=1e-10, progress=False)
    U = torch.linalg.eigh(dense_h).eigenvectors[:, -k:]
    V = torch.linalg.eigh(dense_g).eigenvectors[:, -k:]
    assert eigenspace_overlap(h, g) == pytest.approx(float((U.T @ V).square().sum() / k), abs=1e-8)
    with pytest.raises(curvlab.InvalidProblem, match="no eigenvectors"):
        eigenspace_overlap(spectrum(op_h, method="lanczos", k=2, vectors=False, progress=False), g)


def test_bad_damping_is_refused(device):
    op, _ = operator("mlp_ce", "ggn", str(device))
    with pytest.raises(curvlab.InvalidProblem, match="damping"):
        spectral_summary(spectrum(op, method="dense", k=3, progress=False), damping=-1.0)
