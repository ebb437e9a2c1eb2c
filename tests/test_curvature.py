"""Exact curvature operators against independent dense float64 references (tests/reference.py).

Tolerance. Models and data are float64. curvlab (torch.func) and the references (autograd loops)
evaluate the same sums in different orders, and for ``abs_hessian`` through separate ``eigh`` calls;
the rounding error of each entry is then about sqrt(P·N)·eps·‖M‖ ≈ 1e-14·‖M‖ (eps = 2.2e-16,
P·N ≤ 3000), and |·| of a symmetric matrix is Lipschitz up to a log(P) factor, so eigenvalue gaps do
not amplify it. We compare with rtol = 1e-10 and atol = 1e-10·‖M‖_F: four orders of magnitude of
room for rounding, while a wrong factor, a missing term or a wrong sign shows up at O(1)·‖M‖.
"""

from __future__ import annotations

import functools
import re
import resource
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvlab
from curvlab.operators.hessian import gradient_and_hessian_product
import models
import reference

RTOL = 1e-10
EXACT_KINDS = ["hessian", "abs_hessian", "ggn", "fisher", "empirical_fisher"]
ALL_KINDS = EXACT_KINDS + ["fisher_mc"]
REDUCTIONS = ["mean", "sum"]
CASES = models.CASE_NAMES


# ----------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def reference_matrix(case_name: str, kind: str, reduction: str, device: str) -> torch.Tensor:
    """Dense reference of an exact kind on all parameters of a freshly built case (cached)."""
    case = models.make_case(case_name, device)
    return reference.dense(kind, case.model, case.batches, case.loss, reduction)


def make_problem(case: models.Case, reduction="mean", data=None, params=None) -> curvlab.Problem:
    return curvlab.Problem(
        case.model, case.data if data is None else data, loss=case.loss, params=params,
        reduction=reduction,
    )


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, scale=None, rtol=RTOL) -> None:
    """Entrywise |a - e| <= rtol·|e| + rtol·scale, scale defaulting to ‖expected‖_F (module doc)."""
    scale = float(expected.norm()) if scale is None else float(scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def param_indices(case: models.Case, names) -> torch.Tensor:
    """Positions of the named parameters' entries in the flat vector of all parameters."""
    offsets, start = {}, 0
    for name, p in case.model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([offsets[n] for n in names])


def owner_modules(names) -> dict:
    """module name -> names of its own parameters, in order of first appearance."""
    owners: dict = {}
    for name in names:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    return owners


def random_vector(shape, device, dtype=torch.float64, seed=1) -> torch.Tensor:
    """Random numbers from a local generator: never touches the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ----------------------------------------------------------------------------------------------
# exact kinds against the dense references


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_exact_curvature_matches_dense_reference(case_name, kind, reduction, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case, reduction), kind)
    P = sum(p.numel() for p in case.model.parameters())
    assert op.shape == (P, P)
    expected = reference_matrix(case_name, kind, reduction, str(device))
    assert_matches(op.to_dense(), expected)


@pytest.mark.parametrize("case_name", CASES)
def test_fisher_equals_ggn(case_name, device):
    case = models.make_case(case_name, device)
    prob = make_problem(case)
    ggn = curvlab.curvature(prob, "ggn").to_dense()
    assert_matches(curvlab.curvature(prob, "fisher").to_dense(), ggn)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_unequal_batches_give_the_one_batch_matrix(case_name, kind, reduction, device):
    case = models.make_case(case_name, device)
    assert len({y.shape[0] for _, y in case.batches}) > 1
    one = curvlab.curvature(make_problem(case, reduction, data=case.data), kind).to_dense()
    many = curvlab.curvature(make_problem(case, reduction, data=case.batches), kind).to_dense()
    assert_matches(many, one)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.sets(st.integers(1, models.N - 1)), reduction=st.sampled_from(REDUCTIONS))
@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_any_split_of_sequence_data_gives_the_same_matrix(kind, cuts, reduction, device):
    # sequence cross-entropy: the mean's R = 1/(N·T) must count positions over all batches
    case = models.make_case("tied", device)
    bounds = [0, *sorted(cuts), models.N]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    batches = models.split_batch(*case.data, sizes)
    op = curvlab.curvature(make_problem(case, reduction, data=batches), kind)
    assert_matches(op.to_dense(), reference_matrix("tied", kind, reduction, str(device)))


# ----------------------------------------------------------------------------------------------
# products and scipy


def _dense_for_products(case_name, kind, op, device):
    if kind == "fisher_mc":  # its dense form is checked against the reference elsewhere
        return op.to_dense()
    return reference_matrix(case_name, kind, "mean", str(device))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_products_with_vectors_matrices_and_dicts_match_dense(case_name, kind, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), kind)
    dense = _dense_for_products(case_name, kind, op, device)
    P = dense.shape[0]

    v = random_vector(P, device)
    out = op @ v
    assert out.shape == (P,)
    assert_matches(out, dense @ v, scale=dense.norm() * v.norm())

    for K in (1, 3):
        V = random_vector((P, K), device, seed=K)
        out = op @ V
        assert out.shape == (P, K)
        assert_matches(out, dense @ V, scale=dense.norm() * V.norm())

    named = dict(case.model.named_parameters())
    v_dict, start = {}, 0
    for name, p in named.items():
        v_dict[name] = v[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    out = op @ v_dict
    assert isinstance(out, dict) and list(out) == list(named)
    for name, p in named.items():
        assert out[name].shape == p.shape
    flat = torch.cat([out[name].reshape(-1) for name in named])
    assert_matches(flat, dense @ v, scale=dense.norm() * v.norm())


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_scipy_operator_matches_dense(case_name, kind, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), kind)
    dense = _dense_for_products(case_name, kind, op, device).cpu().numpy()
    P = dense.shape[0]
    A = op.to_scipy()
    assert A.shape == (P, P)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(P)
    X = rng.standard_normal((P, 4))
    y = A.matvec(x)
    Y = A.matmat(X)
    assert y.dtype == np.float64 and Y.dtype == np.float64
    norm = np.linalg.norm(dense)
    np.testing.assert_allclose(y.reshape(-1), dense @ x, rtol=RTOL, atol=RTOL * norm * np.linalg.norm(x))
    np.testing.assert_allclose(Y, dense @ X, rtol=RTOL, atol=RTOL * norm * np.linalg.norm(X))
    np.testing.assert_allclose(A @ x, dense @ x, rtol=RTOL, atol=RTOL * norm * np.linalg.norm(x))


# ----------------------------------------------------------------------------------------------
# block diagonal and parameter selection


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_block_diagonal_equals_dense_diagonal_blocks_per_module(case_name, kind, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), kind, block_diagonal=True)
    owners = owner_modules(case.param_names)
    blocks = list(op.blocks)
    assert [module for module, _ in blocks] == list(owners)

    # |λ|-Hessian blocks are |H_bb| of the Hessian's diagonal blocks, not blocks of |H|
    full = reference_matrix(case_name, "hessian" if kind == "abs_hessian" else kind, "mean", str(device))
    expected = torch.zeros_like(full)
    for module, block in blocks:
        idx = param_indices(case, owners[module])
        sub = full[idx][:, idx]
        if kind == "abs_hessian":
            sub = reference.abs_matrix(sub)
        assert block.shape == (idx.numel(), idx.numel())
        assert_matches(block.to_dense(), sub, scale=full.norm())
        expected[idx[:, None], idx] = sub

    assert_matches(op.to_dense(), expected, scale=full.norm())
    v = random_vector(full.shape[0], device)
    assert_matches(op @ v, expected @ v, scale=full.norm() * v.norm())


@pytest.mark.parametrize("selector", ["names", "regex"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("case_name", CASES)
def test_parameter_selection_gives_the_submatrix(case_name, kind, selector, device):
    case = models.make_case(case_name, device)
    if selector == "names":
        params = names = case.some_names
    else:
        params = case.regex
        names = [n for n in case.param_names if re.search(case.regex, n)]
    assert 0 < len(names) < len(case.param_names)  # a proper subset, or the test proves nothing
    prob = make_problem(case, params=params)
    assert prob.param_names == names

    full = reference_matrix(case_name, "hessian" if kind == "abs_hessian" else kind, "mean", str(device))
    idx = param_indices(case, names)
    sub = full[idx][:, idx]
    if kind == "abs_hessian":  # |H_SS| of the studied block, not a block of |H|
        sub = reference.abs_matrix(sub)
    op = curvlab.curvature(prob, kind)
    assert op.shape == (idx.numel(), idx.numel())
    assert_matches(op.to_dense(), sub, scale=full.norm())


# ----------------------------------------------------------------------------------------------
# |λ|-Hessian


@pytest.mark.parametrize("case_name", CASES)
def test_abs_hessian_has_absolute_eigenvalues_and_the_hessians_eigenvectors(case_name, device):
    case = models.make_case(case_name, device)
    prob = make_problem(case)
    H = curvlab.curvature(prob, "hessian").to_dense()
    A = curvlab.curvature(prob, "abs_hessian").to_dense()
    scale = H.norm()
    evals, V = torch.linalg.eigh((H + H.T) / 2)
    # A v = |λ| v for every eigenpair of H: holds for any orthonormal eigenbasis, even with repeats
    assert_matches(A @ V, V * evals.abs(), scale=scale)
    assert_matches(torch.linalg.eigvalsh(A), evals.abs().sort().values, scale=scale)
    assert_matches(H @ A, A @ H, scale=scale**2)
    assert_matches(A, A.T, scale=scale)


def test_abs_hessian_eigenvectors_match_on_a_distinct_spectrum(device):
    """On a Hessian whose |eigenvalues| are well separated, eigh(|H|) returns H's eigenvectors."""
    case = models.make_case("mlp_mse", device)
    prob = make_problem(case)
    H = curvlab.curvature(prob, "hessian").to_dense()
    A = curvlab.curvature(prob, "abs_hessian").to_dense()
    evals, V = torch.linalg.eigh((H + H.T) / 2)
    order = evals.abs().argsort()
    abs_sorted, V = evals.abs()[order], V[:, order]
    gap = (abs_sorted[1:] - abs_sorted[:-1]).min()
    assert gap > 1e-6 * H.norm()  # precondition: eigenvectors are well defined
    a_evals, U = torch.linalg.eigh(A)
    assert_matches(a_evals, abs_sorted, scale=H.norm())
    # each eigenvector agrees up to sign; the eigenvector error is about eps·‖H‖ / gap
    overlaps = (U * V).sum(dim=0).abs()
    assert_matches(overlaps, torch.ones_like(overlaps), scale=1e4)


# ----------------------------------------------------------------------------------------------
# MC Fisher


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case_name", CASES)
def test_mc_fisher_matches_reference_at_its_sampled_targets(case_name, reduction, mc_samples, device):
    case = models.make_case(case_name, device)
    prob = make_problem(case, reduction, data=case.batches)
    op = curvlab.curvature(prob, "fisher_mc", mc_samples=mc_samples, seed=3)
    targets = op.sampled_targets()
    assert len(targets) == len(case.batches)
    for drawn, (_, y) in zip(targets, case.batches):
        assert drawn.shape == (mc_samples, *y.shape)
        assert drawn.device == y.device
    fresh = models.make_case(case_name, device)
    expected = reference.mc_fisher(fresh.model, fresh.batches, fresh.loss, reduction, targets).detach()
    assert_matches(op.to_dense(), expected)


@pytest.mark.parametrize("case_name", CASES)
def test_mc_fisher_targets_lie_in_the_label_space(case_name, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), "fisher_mc", mc_samples=50)
    (drawn,) = op.sampled_targets()
    out = reference.forward(case.model, case.data[0])
    if case.loss == "cross_entropy":
        assert not drawn.is_floating_point()
        assert drawn.min() >= 0 and drawn.max() < out.shape[-1]
    elif case.loss == "bce":
        assert set(drawn.unique().tolist()) == {0.0, 1.0}
    else:
        assert drawn.is_floating_point() and drawn.dtype == out.dtype


@pytest.mark.parametrize("case_name", CASES)
def test_mc_fisher_is_symmetric_positive_semidefinite(case_name, device):
    case = models.make_case(case_name, device)
    F = curvlab.curvature(make_problem(case), "fisher_mc", mc_samples=2).to_dense()
    assert_matches(F, F.T)
    assert torch.linalg.eigvalsh(F).min() >= -RTOL * F.norm()


@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied"])
def test_mc_fisher_is_a_fixed_matrix(case_name, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), "fisher_mc")
    v = random_vector(op.shape[0], device)
    assert torch.equal(op @ v, op @ v)
    assert torch.equal(op.to_dense(), op.to_dense())


@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied"])
def test_mc_fisher_same_seed_same_matrix_other_seed_other_matrix(case_name, device):
    case = models.make_case(case_name, device)
    prob = make_problem(case)
    torch.manual_seed(1)  # the global RNG must not matter
    a = curvlab.curvature(prob, "fisher_mc", seed=0)
    torch.manual_seed(2)
    b = curvlab.curvature(prob, "fisher_mc", seed=0)
    c = curvlab.curvature(prob, "fisher_mc", seed=1)
    assert torch.equal(a.sampled_targets()[0], b.sampled_targets()[0])
    assert torch.equal(a.to_dense(), b.to_dense())
    assert (a.to_dense() - c.to_dense()).norm() > 1e-3 * a.to_dense().norm()


@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied"])
def test_mc_fisher_leaves_the_global_rng_untouched(case_name, device):
    case = models.make_case(case_name, device)
    prob = make_problem(case)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    op = curvlab.curvature(prob, "fisher_mc", mc_samples=4, seed=5)
    op.to_dense()
    op @ random_vector(op.shape[0], device)
    op.sampled_targets()
    op.to_scipy().matvec(np.ones(op.shape[0]))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_state)


def _relative_error_to_ggn(case_name, mc_samples, seed, device):
    case = models.make_case(case_name, device)
    op = curvlab.curvature(make_problem(case), "fisher_mc", mc_samples=mc_samples, seed=seed)
    # Products with 4 columns at a time: with tens of thousands of samples a product's memory
    # grows with columns x samples (to_dense itself is checked against the reference above).
    eye = torch.eye(op.shape[0], dtype=torch.float64, device=device)
    F = torch.cat([op @ eye[:, k : k + 4] for k in range(0, op.shape[0], 4)], dim=1)
    G = reference_matrix(case_name, "ggn", "mean", str(device))
    return float((F - G).norm() / G.norm())


# Sequence cross-entropy (tied) draws one label per position.
@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied"])
def test_mc_fisher_converges_to_the_ggn(case_name, device):
    # E[F_mc] = G and the error of the S-sample mean is about 0.85/sqrt(S) on these cases (measured:
    # ~0.2 at S = 16), i.e. ~0.006 at S = 20000; 0.02 leaves a factor 3. A wrong label distribution
    # (e.g. Gaussian variance 1 instead of 1/2 for MSE) gives an O(1) error.
    assert _relative_error_to_ggn(case_name, 20_000, seed=0, device=device) < 0.02


@pytest.mark.parametrize("case_name", ["mlp_ce", "mlp_mse", "mlp_bce", "tied"])
def test_mc_fisher_error_shrinks_as_samples_grow(case_name, device):
    # 16x more samples should cut the error 4x; averaged over three seeds, demand at least 2.5x.
    def mean_error(S):
        return sum(_relative_error_to_ggn(case_name, S, seed, device) for seed in range(3)) / 3

    errors = [mean_error(S) for S in (16, 256, 4096)]
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5, errors


# ----------------------------------------------------------------------------------------------
# memory budget and precision


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher_mc", "empirical_fisher"])
def test_dense_too_large_is_refused_without_allocating(kind, device):
    model, data = models.big_linear(device)
    prob = curvlab.Problem(model, data, loss="mse")
    P = prob.num_params
    assert P == 1000 * 1000 + 1000
    op = curvlab.curvature(prob, kind)
    assert op.shape == (P, P)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        before = max_rss_bytes()
    start = time.perf_counter()
    with pytest.raises(curvlab.DenseTooLarge) as info:
        op.to_dense()  # 4 TB in float32
    assert isinstance(info.value, curvlab.CurvlabError)
    assert time.perf_counter() - start < 5.0
    after = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    assert after - before < 256 * 2**20  # no (P, P) nor even (P, k) slab of any size was built


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_float32_model_gives_float32_operator(kind, device):
    case = models.make_case("mlp_ce", device, dtype=torch.float32)
    prob = make_problem(case)
    assert prob.dtype == torch.float32
    op = curvlab.curvature(prob, kind)
    dense = op.to_dense()
    assert dense.dtype == torch.float32
    v = random_vector(op.shape[0], device, dtype=torch.float32)
    assert (op @ v).dtype == torch.float32
    assert (op @ v[:, None]).dtype == torch.float32
    v_dict = {n: torch.zeros_like(p) for n, p in case.model.named_parameters()}
    assert all(t.dtype == torch.float32 for t in (op @ v_dict).values())
    if kind != "fisher_mc":  # the same matrix as the float64 model's, up to float32 rounding
        expected = reference_matrix("mlp_ce", kind, "mean", str(device))
        assert_matches(dense.double(), expected, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_cuda_operator_matches_cpu_reference(kind, device):
    case = models.make_case("cnn", device)
    op = curvlab.curvature(make_problem(case), kind)
    dense = op.to_dense()
    assert dense.device.type == "cuda"
    expected = reference_matrix("cnn", kind, "mean", "cpu")
    assert_matches(dense.cpu(), expected)


# ----------------------------------------------------------------------------------------------
# |λ|-Hessian beyond the dense budget, and argument checks


def test_abs_hessian_beyond_budget_keeps_top_k_eigenpairs_by_magnitude(device, monkeypatch):
    case = models.make_case("mlp_ce", device)
    hessian = reference_matrix("mlp_ce", "hessian", "mean", str(device))
    values, vectors = torch.linalg.eigh(hessian)
    P, k = hessian.shape[0], 6
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", str(P * P * 8 - 1))  # one byte short of the dense Hessian
    op = curvlab.curvature(make_problem(case), "abs_hessian", top_k=k)
    ritz_values, ritz_vectors = op.eigen()
    assert op.method.startswith(f"top-{k}")
    top = values.abs().argsort(descending=True)[:k]
    expected = vectors[:, top] @ torch.diag(values[top].abs()) @ vectors[:, top].T
    # ARPACK converges the k eigenpairs to its tolerance of machine precision relative to ‖H‖;
    # the rank-k |H| is then exact up to ~1e-12·‖H‖ when the k-th and (k+1)-th |λ| are separated.
    gap = values.abs().sort(descending=True).values
    assert gap[k - 1] - gap[k] > 1e-6 * gap[0]
    torch.testing.assert_close(ritz_values.abs().sort().values, values[top].abs().sort().values,
                               rtol=1e-10, atol=1e-12 * gap[0].item())
    monkeypatch.delenv("CURVLAB_DENSE_BUDGET")
    assert_matches(op.to_dense(), expected, rtol=1e-9)


def test_shuffling_dataloader_is_refused(device):
    case = models.make_case("mlp_ce", device)
    X, y = case.batches[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=2, shuffle=True)
    with pytest.raises(curvlab.InvalidProblem, match="shuffle"):
        curvlab.Problem(case.model, loader, loss=case.loss)


@pytest.mark.parametrize("mc_samples", [0, -1, 1.5, True])
def test_invalid_mc_samples_are_refused(mc_samples, device):
    prob = make_problem(models.make_case("mlp_ce", device))
    with pytest.raises(curvlab.InvalidProblem, match="mc_samples"):
        curvlab.curvature(prob, "fisher_mc", mc_samples=mc_samples)


def test_products_with_wrong_shapes_or_missing_parameters_are_refused(device):
    prob = make_problem(models.make_case("mlp_ce", device))
    op = curvlab.curvature(prob, "ggn")
    with pytest.raises(curvlab.InvalidProblem, match="cannot multiply"):
        op @ torch.zeros(prob.num_params + 1, dtype=torch.float64)
    with pytest.raises(curvlab.InvalidProblem, match="lacks parameter"):
        op @ {prob.param_names[0]: torch.zeros(prob.param_shapes[0], dtype=torch.float64)}


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_block_of_an_operator_is_the_dense_sub_block(kind, device):
    case = models.make_case("cnn", device=device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    op = curvlab.curvature(prob, kind)
    names = ["4.weight", "0.bias"]  # out of order: the block keeps the flat order
    block = op.block(names)
    full = op.to_dense()
    index = torch.cat([torch.arange(*span) for span in _spans(prob, block.problem.param_names)])
    assert block.shape == (index.numel(), index.numel())
    assert torch.allclose(block.to_dense(), full[index][:, index], rtol=1e-12, atol=1e-14)


def _spans(prob, names):
    offset, spans = 0, {}
    for name, shape in zip(prob.param_names, prob.param_shapes):
        spans[name] = (offset, offset + shape.numel())
        offset += shape.numel()
    return [spans[name] for name in names]


def test_block_of_unknown_parameters_is_refused(device):
    case = models.make_case("mlp_ce", device=device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    with pytest.raises(curvlab.InvalidProblem, match="block needs"):
        curvlab.curvature(prob, "ggn").block(["nope"])


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher_mc"])
def test_a_product_sends_at_most_directions_per_pass_through_the_model(kind, device, monkeypatch):
    from curvlab.operators import base

    prob = make_problem(models.make_case("cnn", device))
    op = curvlab.curvature(prob, kind)
    V = random_vector((op.shape[0], 2 * base.DIRECTIONS_PER_PASS + 3), device)
    expected = torch.cat([op @ part for part in V.split(5, dim=1)], dim=1)
    sizes = []
    original = type(op)._batch_matmat

    def counting(self, index, X, y, directions):
        sizes.append(next(iter(directions.values())).shape[0])
        return original(self, index, X, y, directions)

    monkeypatch.setattr(type(op), "_batch_matmat", counting)
    out = op @ V
    assert max(sizes) == base.DIRECTIONS_PER_PASS and sum(sizes) == V.shape[1] * prob.num_batches
    assert_matches(out, expected, scale=float(expected.norm()))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("case_name", ["mlp_ce", "transformer"])
def test_reusing_passes_records_the_first_batch_once_and_changes_no_product(case_name, batched, device,
                                                                             monkeypatch):
    from curvlab.operators import hessian

    case = models.make_case(case_name, device)
    prob = curvlab.Problem(case.model, case.batches if batched else case.data, loss=case.loss)
    op = curvlab.curvature(prob, "hessian")
    block = op.block(case.some_names)
    V = random_vector((3, op.shape[0]), device)
    expected = [op @ v for v in V]
    expected_block = block @ V[0, :block.shape[0]]
    recorded = []
    original = hessian.vjp
    monkeypatch.setattr(hessian, "vjp", lambda *args, **kwargs: recorded.append(1) or original(*args, **kwargs))
    with op.reusing_passes():
        products = [op @ v for v in V]
    assert len(recorded) == 1  # the first batch's pass is kept; the other batches' lone products record none
    for actual, wanted in zip(products, expected):
        assert_matches(actual, wanted)
    recorded.clear()
    op @ V[:2].T
    assert len(recorded) == prob.num_batches  # released after the block: two directions record each batch's pass
    recorded.clear()
    with block.reusing_passes():  # a block reuses the passes of the operator it restricts
        products = [block @ V[0, :block.shape[0]] for _ in range(2)]
    assert len(recorded) == 1
    for actual in products:
        assert_matches(actual, expected_block)


class _TwiceApplied(torch.nn.Module):
    """A Linear applied twice (not tapped: it does not run once) before a tapped head."""

    def __init__(self):
        super().__init__()
        self.square, self.head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.square(torch.tanh(self.square(x)))))


class _ExtraOnEvenBatches(torch.nn.Module):
    """A Linear that runs only on batches of an even size: on the others the lone product falls back.

    The tapped first layer's output (its perturbation added) is then changed in place.
    """

    def __init__(self):
        super().__init__()
        self.first, self.extra, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.first(x), 0.1, inplace=True)
        if x.shape[0] % 2 == 0:
            h = torch.tanh(self.extra(h))
        return self.head(h)


class _WeightReadOutside(torch.nn.Module):
    """A Linear whose weight the forward pass also reads outside its call (a temperature of the logits)."""

    def __init__(self):
        super().__init__()
        self.first, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        out = self.head(torch.tanh(self.first(x)))
        return out * (1 + 0.1 * self.first.weight.square().sum())


def _lone_product_case(name):
    """``(model, batches)``: float64, two unequal batches."""
    gen = torch.Generator().manual_seed(3)
    nn = torch.nn
    if name == "conv1d_circular":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), nn.Tanh(), nn.Flatten(),
                              nn.Linear(15, 2, bias=False))
        x = torch.randn(7, 2, 5, generator=gen)
    elif name == "conv3d_grouped":
        model = nn.Sequential(nn.Conv3d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2))
        x = torch.randn(7, 2, 3, 3, 3, generator=gen)
    else:
        model = {"applied_twice": _TwiceApplied, "extra_on_even_batches": _ExtraOnEvenBatches,
                 "weight_read_outside": _WeightReadOutside}[name]()
        x = torch.randn(7, 3, generator=gen)
    y = torch.randint(0, 2, (7,), generator=gen)
    return model.double().eval(), [(x[:4].double(), y[:4]), (x[4:].double(), y[4:])]


# ∇L passes one lone product records, with every parameter studied and with all but the last: a layer
# runs the lone path when it is tapped (a Linear or Conv run once, all its parameters studied and read
# only inside its call), a batch on which a tapped layer does not run once records its pass, and so does
# every batch when none is tapped.
LONE_PRODUCT_PASSES = {"conv1d_circular": (0, 0), "conv3d_grouped": (0, 0), "applied_twice": (0, 2),
                       "extra_on_even_batches": (1, 1), "weight_read_outside": (0, 2)}


@pytest.mark.parametrize("name", list(LONE_PRODUCT_PASSES))
@pytest.mark.parametrize("studied", ["all", "all but the last"])
def test_a_lone_hessian_product_matches_the_reference_for_every_layer_it_taps_or_not(name, studied, device,
                                                                                     monkeypatch):
    from curvlab.operators import hessian

    model, batches = _lone_product_case(name)
    model = model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    names = None if studied == "all" else [name for name, _ in model.named_parameters()][:-1]
    prob = curvlab.Problem(model, batches, loss="cross_entropy", params=names)
    dense = reference.hessian(model, batches, "cross_entropy", "mean", names)
    recorded = []
    original = hessian.vjp
    monkeypatch.setattr(hessian, "vjp", lambda *args, **kwargs: recorded.append(1) or original(*args, **kwargs))
    v = random_vector(prob.num_params, device)
    assert_matches(curvlab.curvature(prob, "hessian") @ v, dense @ v, scale=dense.norm() * v.norm())
    assert len(recorded) == LONE_PRODUCT_PASSES[name][studied != "all"]


@pytest.mark.parametrize("traceable", [True, False])
@pytest.mark.parametrize("kind", ["ggn", "fisher_mc", "empirical_fisher"])
@pytest.mark.parametrize("case_name", ["cnn", "transformer", "dict_inputs"])
def test_output_space_products_replay_the_first_batch_linearised(case_name, kind, traceable, device, monkeypatch):
    from curvlab.operators import output_space

    case = models.make_case(case_name, device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    op = curvlab.curvature(prob, kind)
    V = random_vector((op.shape[0], 3), device)
    expected_single, expected_block = op @ V[:, 0], op @ V
    monkeypatch.setattr(output_space, "LINEARISE_FROM", 0)  # the test models are far below it
    if not traceable:  # a forward pass make_fx cannot trace keeps the plain products
        def untraceable(*args, **kwargs):
            raise RuntimeError("cannot trace")
        monkeypatch.setattr(output_space, "linearize", untraceable)
    recorded = []
    original = output_space._linearised
    monkeypatch.setattr(output_space, "_linearised", lambda *args: recorded.append(1) or original(*args))
    with op.reusing_passes():
        single, block = op @ V[:, 0], op @ V
    assert len(recorded) == 1  # the first batch's pass, once; the other batches take the plain path
    assert_matches(single, expected_single)
    assert_matches(block, expected_block)



def test_models_below_the_linearisation_size_keep_plain_products(device, monkeypatch):
    from curvlab.operators import output_space

    prob = make_problem(models.make_case("cnn", device))
    op = curvlab.curvature(prob, "ggn")
    recorded = []
    monkeypatch.setattr(output_space, "_linearised", lambda *args: recorded.append(1))
    with op.reusing_passes():
        op @ random_vector((op.shape[0], 2), device)
    assert prob.num_params < output_space.LINEARISE_FROM and not recorded  # tracing would cost more than it saves


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn", "transformer", "tied"])
def test_gradient_and_hessian_product_of_one_pass_match_the_references(case_name, reduction, device):
    case = models.make_case(case_name, device)
    problem = make_problem(case, reduction)  # unequal batches: the shares are summed
    H = reference_matrix(case_name, "hessian", reduction, device)
    g = reference.gradient(case.model, case.batches, case.loss, reduction)
    v = random_vector(problem.num_params, device)
    gradient, product = gradient_and_hessian_product(problem, problem.unflatten(v))
    assert list(gradient) == list(product) == problem.param_names
    assert_matches(problem.flatten(gradient), g)
    assert_matches(problem.flatten(product), H @ v, scale=H.norm() * v.norm())
