"""The Gram (per-example gradient) empirical Fisher against dense float64 references.

References are plain autograd: ``reference.empirical_fisher`` for ``E``, and here the matrix
``U = √R [g_1 … g_N]`` of per-example gradients, one ``torch.autograd.grad`` call per example. The
Gram form sums the same O(1) products in another order (Hadamard products, Woodbury), so entries
agree to ~1e-15 relative; rtol 1e-10 (atol 1e-10·‖E‖_F) leaves room for rounding while a missing
√R, position or bias term is an O(1) error.
"""

import importlib

import pytest
import torch
from torch import nn

import curvlab
import models
import reference
from curvlab.approx import approximate
from curvlab.approx.gram import GramBlock, LinearGradients, _sketch, natural_gradient_of_batch

RTOL = 1e-10
CASES = ["mlp_ce", "cnn", "transformer", "attention", "tied", "dict_inputs"]


class SharedLayer(nn.Module):
    """One Linear layer applied twice: its two calls count as two positions."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.layer(torch.tanh(self.layer(x))))


def shared_layer_case():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = SharedLayer().double().eval()
        x, y = torch.randn(models.N, 3, dtype=torch.float64), torch.randint(0, 2, (models.N,))
    return models.Case("shared", model, models.split_batch(x, y, models.SIZES), "cross_entropy", "")


def make(case_name):
    return shared_layer_case() if case_name == "shared" else models.make_case(case_name)


def per_example_gradients(case, reduction="mean"):
    """``Uᵀ = √R [g_1 … g_N]ᵀ`` ``(N, P)`` by one autograd call per example."""
    params = list(case.model.parameters())
    rows = []
    for x, y in case.batches:
        losses = reference.example_losses(reference.forward(case.model, x), y, case.loss)
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]))
    return reference.reduction_factor(case.batches, reduction) ** 0.5 * torch.stack(rows)


def assert_matches(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.norm()))


def block_mask(problem):
    """True on the diagonal blocks of the modules that own studied parameters."""
    mask = torch.zeros(problem.num_params, problem.num_params, dtype=torch.bool)
    for _, names in problem.module_blocks():
        index = problem.entries(names)
        mask[index[:, None], index[None, :]] = True
    return mask


def problem_of(case, reduction="mean"):
    return curvlab.Problem(case.model, case.batches, loss=case.loss, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", CASES + ["shared"])
def test_gram_equals_the_dense_empirical_fisher(case_name, reduction):
    case = make(case_name)
    expected = reference.empirical_fisher(case.model, case.batches, case.loss, reduction)
    actual = approximate(problem_of(case, reduction), "gram", curvature="empirical_fisher").to_dense()
    assert_matches(actual, expected)


@pytest.mark.parametrize("case_name", CASES)
def test_per_layer_gram_equals_the_block_diagonal_of_the_empirical_fisher(case_name):
    case = make(case_name)
    problem = problem_of(case)
    expected = reference.empirical_fisher(case.model, case.batches, case.loss, "mean")
    mask = block_mask(problem)
    approximation = approximate(problem, "gram", curvature="empirical_fisher", per_layer=True)
    assert [label for label, _, _ in approximation.blocks] == [module for module, _ in problem.module_blocks()]
    assert_matches(approximation.to_dense(), expected * mask)


@pytest.mark.parametrize("case_name", ["mlp_ce", "transformer", "tied", "shared"])
def test_linear_hadamard_gram_equals_gram_of_explicit_per_example_gradients(case_name):
    case = make(case_name)
    problem = problem_of(case)
    rows = per_example_gradients(case)
    approximation = approximate(problem, "gram", curvature="empirical_fisher", per_layer=True)
    linear = 0
    for label, names, block in approximation.blocks:
        if type(problem.model.get_submodule(label)) is nn.Linear:  # not MultiheadAttention's out_proj subclass
            assert [type(part) for part in block.parts] == [LinearGradients]
            linear += 1
        explicit = rows[:, problem.entries(names)]
        assert_matches(block.gram, explicit @ explicit.T)
    assert linear >= 2


@pytest.mark.parametrize("chunk", [2 ** 16, 24, 1])  # combine's scaled copies: all 5 examples, 2, then 1 at a time
def test_sequence_positions_enter_the_gram_as_a_double_sum(chunk, monkeypatch):
    # Direct check of Σ_{t,s} (a_ntᵀ a_ms)(e_ntᵀ e_ms) + bias against explicit G_n = Σ_t e_nt a_ntᵀ.
    monkeypatch.setattr(importlib.import_module("curvlab.approx.gram"), "COMBINE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    e = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    part = LinearGradients(["w", "b"], a, e, weight=True, bias=True)
    explicit = torch.cat([torch.einsum("nto,nti->noi", e, a).flatten(1), e.sum(1)], dim=1)
    assert_matches(part.gram(), explicit @ explicit.T)
    v = torch.randn(2, part.size, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, generator=g, dtype=torch.float64)
    assert_matches(part.project(v), v @ explicit.T)
    wide = torch.full((2, part.size + 3), torch.nan, dtype=torch.float64)  # columns of a wider result: not contiguous
    assert_matches(part.combine(c, wide[:, 1:-2]), c @ explicit)
    assert wide[:, [0, -2, -1]].isnan().all()
    assert_matches(part.combine(c[:1], torch.empty(1, part.size, dtype=torch.float64)), c[:1] @ explicit)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_damped_inverse_undoes_the_damped_empirical_fisher(case_name, per_layer):
    case = make(case_name)
    problem = problem_of(case)
    approximation = approximate(problem, "gram", curvature="empirical_fisher", per_layer=per_layer)
    dense = approximation.to_dense()
    v = torch.randn(problem.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    damping = 1e-3
    # (E + δI) has condition number ‖E‖/δ ≈ 1e3 here: rounding of the round trip stays below 1e-12·‖v‖.
    torch.testing.assert_close(approximation.inverse(damping) @ (dense @ v + damping * v), v, rtol=0, atol=1e-10)
    twice = approximation.inverse(damping).inverse(0.5)
    eye = torch.eye(problem.num_params, dtype=torch.float64)
    expected = torch.linalg.inv(torch.linalg.inv(dense + damping * eye) + 0.5 * eye)
    assert_matches(twice.to_dense(), expected)


@pytest.mark.parametrize("sketch", [None, 4])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("case_name, reduction", [("mlp_ce", "mean"), ("cnn", "sum"), ("tied", "mean"),
                                                  ("transformer", "mean")])
def test_natural_gradient_of_the_batch_needs_no_gradient(case_name, reduction, per_layer, sketch):
    # (E + δI)⁻¹ ḡ from the Gram form alone (ḡ = √R U 1), against the operator's own inverse applied to the
    # autograd gradient and, unsketched, the dense solve; condition number ‖E‖/δ ≤ 1e3 bounds the rounding.
    case = make(case_name)
    problem = problem_of(case, reduction)
    fisher = approximate(problem, "gram", curvature="empirical_fisher", per_layer=per_layer, sketch=sketch, seed=2)
    damping = 1e-3
    g = reference.gradient(case.model, case.batches, case.loss, reduction)
    direction = problem.flatten(natural_gradient_of_batch(fisher, damping))
    torch.testing.assert_close(direction, fisher.inverse(damping) @ g, rtol=1e-9, atol=1e-9 * float(g.norm()))
    if sketch is None:
        U = per_example_gradients(case, reduction)
        E = U.T @ U
        if per_layer:
            E = torch.where(block_mask(problem), E, 0)
        expected = torch.linalg.solve(E + damping * torch.eye(problem.num_params, dtype=torch.float64), g)
        torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-9 * float(expected.norm()))


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_power_equals_the_dense_matrix_power(p):
    case = make("cnn")
    approximation = approximate(problem_of(case), "gram", curvature="empirical_fisher")
    dense = approximation.to_dense()
    values, vectors = torch.linalg.eigh(dense)
    # The dense side's zero eigenvalues are ±eps·‖E‖; for p = 1/2 their roots (√eps relative) bound
    # the agreement, for integer p rounding does.
    values = torch.where(values > 1e-12 * values.max(), values, 0)
    expected = (vectors * values ** p) @ vectors.T
    tolerance = 1e-7 if p < 1 else RTOL
    torch.testing.assert_close(approximation.power(p).to_dense(), expected, rtol=0,
                               atol=tolerance * float(expected.norm()))


def test_powers_that_do_not_exist_are_refused():
    approximation = approximate(problem_of(make("mlp_ce")), "gram", curvature="empirical_fisher")
    for p in (-0.5, 0):
        with pytest.raises(curvlab.InvalidProblem, match="p > 0"):
            approximation.power(p)
    with pytest.raises(curvlab.InvalidProblem, match="p > 0"):
        approximation.inverse(0.1).power(0.5)
    with pytest.raises(curvlab.InvalidProblem, match="damping > 0"):
        approximation.inverse(0)


@pytest.mark.parametrize("method", ["subsample", "gaussian"])
def test_sketch_is_u_s_st_ut_and_deterministic_given_the_seed(method):
    case = make("mlp_ce")
    problem = problem_of(case)
    rows = per_example_gradients(case)
    state = torch.get_rng_state()
    first = approximate(problem, "gram", curvature="empirical_fisher", sketch=3, sketch_method=method, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = approximate(problem, "gram", curvature="empirical_fisher", sketch=3, sketch_method=method, seed=7)
    other = approximate(problem, "gram", curvature="empirical_fisher", sketch=3, sketch_method=method, seed=8)
    dense = first.to_dense()
    assert torch.equal(dense, again.to_dense())
    assert not torch.allclose(dense, other.to_dense())
    ((_, _, block),) = first.blocks
    assert block.mixing.shape == (problem.num_examples, 3)
    sketched = rows.T @ block.mixing
    assert_matches(dense, sketched @ sketched.T)
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first.inverse(0.1) @ (dense @ v + 0.1 * v), v, rtol=0, atol=1e-11)


def test_per_layer_sketches_are_independent_per_block():
    approximation = approximate(problem_of(make("mlp_ce")), "gram", curvature="empirical_fisher", per_layer=True,
                                sketch=4, sketch_method="gaussian")
    first, second = (block.mixing for _, _, block in approximation.blocks)
    assert not torch.allclose(first, second)


def test_subsampling_every_example_is_exact():
    case = make("cnn")
    expected = reference.empirical_fisher(case.model, case.batches, case.loss, "mean")
    actual = approximate(problem_of(case), "gram", curvature="empirical_fisher", sketch=models.N).to_dense()
    assert_matches(actual, expected)


@pytest.mark.parametrize("method", ["subsample", "gaussian"])
def test_sketch_is_unbiased(method):
    # E[S Sᵀ] = I, so E[U S Sᵀ Uᵀ] = U Uᵀ. Over M = 4000 draws with N = 8, s = 3 each entry of the
    # mean has standard deviation ≤ sqrt(max(2/s, N/s − 1)/M) ≈ 0.023; 0.15 is over 6 of them.
    generator = torch.Generator().manual_seed(0)
    like = torch.zeros((), dtype=torch.float64)
    draws = [_sketch(8, 3, method, generator, like) for _ in range(4000)]
    mean = sum(s @ s.T for s in draws) / len(draws)
    torch.testing.assert_close(mean, torch.eye(8, dtype=torch.float64), rtol=0, atol=0.15)
    if method == "subsample":
        assert all(torch.count_nonzero(s @ s.T - torch.diag(torch.diag(s @ s.T))) == 0 for s in draws[:10])


@pytest.mark.parametrize("options, message", [
    ({"curvature": "ggn"}, "empirical_fisher"),
    ({"sketch": 0}, "sketch"),
    ({"sketch": models.N + 1}, "at most the N = 8 examples"),
    ({"sketch": 2.5, "sketch_method": "gaussian"}, "sketch"),
    ({"sketch": 2, "sketch_method": "srht"}, "sketch_method"),
    ({"per_layer": "yes"}, "per_layer"),
    ({"seed": -1}, "seed"),
])
def test_bad_options_are_refused(options, message):
    problem = problem_of(make("mlp_ce"))
    options = {"curvature": "empirical_fisher", **options}
    with pytest.raises(curvlab.InvalidProblem, match=message):
        approximate(problem, "gram", **options)


def test_gram_block_refuses_zero_damping_only_without_shift():
    block = GramBlock.from_gradients([LinearGradients(["w"], torch.ones(2, 1, 3), torch.ones(2, 1, 2), True, False)])
    assert block.inverse(0.5).inverse(0).shift == pytest.approx(0.5)


class MixesExamples(nn.Module):
    """Flattens the whole batch into one row: examples are not independent."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3 * models.N, 2 * models.N)

    def forward(self, x):
        return self.layer(x.reshape(1, -1)).reshape(x.shape[0], 2)


def test_models_that_mix_examples_are_refused():
    model = MixesExamples().double()
    x, y = torch.randn(models.N, 3, dtype=torch.float64), torch.zeros(models.N, dtype=torch.long)
    with pytest.raises(curvlab.InvalidProblem, match="treats examples independently"):
        approximate(curvlab.Problem(model, (x, y)), "gram", curvature="empirical_fisher")
