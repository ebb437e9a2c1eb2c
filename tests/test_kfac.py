"""KFAC, EKFAC and FOOF against independent float64 references written with plain torch.autograd.

References. Exact curvature blocks come from tests/reference.py (dense GGN, empirical and MC Fisher).
Kronecker factors are rebuilt here from their definitions: a forward hook keeps a layer's input
(explicit ``F.unfold`` patches for a Conv2d) and output ``s``; ``J_nt = ∂f_n/∂s_nt`` row by row with
``torch.autograd.grad``; then ``A = Σ aaᵀ / (N T)`` and ``B = R Σ J_ntᵀ M_n J_nt`` with ``M_n`` the
output Hessian (reference.output_hessian), ``r rᵀ`` at true labels, or the mean of ``r rᵀ`` at the
sampled labels. For ``(N, C)`` outputs this ``B`` equals the square-root form curvlab uses, whatever
the square root.

Tolerance. Both sides are sums of O(100) float64 products evaluated in different orders, so entries
agree to about 1e-15 relative to the matrix norm; rtol = 1e-10 (atol 1e-10·‖M‖) leaves room for
rounding while a wrong scale, a missing term or a wrong sign shows up at O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
import models
import reference
from curvlab.approx import DenseBlock, EigenbasisBlock, KroneckerBlock, approximate
from curvlab.errors import InvalidProblem

# torch's own note that an even kernel with padding="same" pads a copy of the input (the cnn below).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

RTOL = 1e-10
DTYPE = torch.float64


def assert_matches(actual, expected, rtol=RTOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.norm()))


def seeded(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class SequenceNet(nn.Module):
    """A Linear on (N, T, 3) inputs, tanh, mean over T, Linear head: weight sharing with (N, C) outputs."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(x)).mean(1))


class Twice(nn.Module):
    """One Linear called twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.inner(torch.tanh(self.inner(x))))


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def deep_linear():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, padding="same"),
                         nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))


def build(name, sizes=(3, 1, 2)):
    """A float64 model and unequal batches: ``(model, batches, loss)``."""
    seeded(0)
    N = sum(sizes)
    if name == "mlp":
        model, X, y, loss = mlp(), torch.randn(N, 3), torch.randint(0, 3, (N,)), "cross_entropy"
    elif name == "mlp_mse":
        model, X, y, loss = mlp(), torch.randn(N, 3), torch.randn(N, 3), "mse"
    elif name == "mlp_bce":
        model, X, y, loss = mlp(), torch.randn(N, 3), torch.randint(0, 2, (N, 3)).double(), "bce"
    elif name == "deep_linear":
        model, X, y, loss = deep_linear(), torch.randn(N, 3), torch.randn(N, 2), "mse"
    elif name == "sequence":
        model, X, y, loss = SequenceNet(), torch.randn(N, 4, 3), torch.randint(0, 3, (N,)), "cross_entropy"
    elif name == "cnn":
        model, X, y, loss = cnn(), torch.randn(N, 2, 5, 5), torch.randint(0, 3, (N,)), "cross_entropy"
    model = model.to(DTYPE).eval()
    X = X.to(DTYPE)
    return model, models.split_batch(X, y, list(sizes)), loss


def problem(model, batches, loss, reduction="mean"):
    return curvlab.Problem(model, batches, loss=loss, reduction=reduction)


def indices(model, names):
    """Positions of the parameters ``names`` in the flat vector of all parameters."""
    offsets, offset = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(offset, offset + p.numel())
        offset += p.numel()
    return torch.cat([offsets[name] for name in names])


def exact_block(matrix, model, names):
    index = indices(model, names)
    return matrix[index[:, None], index[None, :]]


def exact_matrix(kind, model, batches, loss, reduction="mean", targets=None):
    if kind == "fisher_mc":
        return reference.mc_fisher(model, batches, loss, reduction, targets)
    return reference.dense(kind, model, batches, loss, reduction)


def sampled_targets(prob, mc_samples, seed):
    return curvlab.curvature(prob, "fisher_mc", mc_samples=mc_samples, seed=seed).sampled_targets()


def output_matrices(out, y, loss, kind, targets):
    """``M_n`` per example of a batch: ``(N, D, D)`` over the flattened output of each example."""
    matrices = []
    for n in range(out.shape[0]):
        if kind in ("ggn", "fisher"):
            matrices.append(reference.output_hessian(out[n], y[n], loss))
            continue
        labels = [y[n]] if kind == "empirical_fisher" else list(targets[:, n])
        f = out[n].detach().clone().requires_grad_(True)
        residuals = [torch.autograd.grad(reference.example_losses(f[None], label[None], loss).sum(), f)[0].reshape(-1)
                     for label in labels]
        matrices.append(sum(torch.outer(r, r) for r in residuals) / len(residuals))
    return matrices


def reference_factors(model, batches, loss, layer, kind="ggn", approx="expand", joint=False, targets=None,
                      reduction="mean"):
    """KFAC's ``(A, B)`` for ``layer`` from their definitions (see the module docstring)."""
    R = reference.reduction_factor(batches, reduction)
    N = sum(y.shape[0] for _, y in batches)
    A = B = 0
    for b, (x, y) in enumerate(batches):
        record = {}
        handle = layer.register_forward_hook(lambda m, args, out: record.update(a=args[0], s=out))
        out = reference.forward(model, x)
        handle.remove()
        a, s = record["a"].detach(), record["s"]
        if isinstance(layer, nn.Conv2d):
            pad = layer.padding if layer.padding != "same" else 0
            if layer.padding == "same":  # kernel 2, dilation 1: one extra row/column on the far side
                a = F.pad(a, (0, 1, 0, 1))
            a = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride)
            a = a.transpose(1, 2)
        else:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
        T = a.shape[1]
        x_in = a.reshape(-1, a.shape[-1]) if approx == "expand" else a.mean(1)
        if joint:
            x_in = torch.cat([x_in, torch.ones(x_in.shape[0], 1, dtype=DTYPE)], 1)
        A = A + x_in.T @ x_in / (N * (T if approx == "expand" else 1))
        flat_out = out.reshape(out.shape[0], -1)
        M = output_matrices(out, y, loss, kind, None if targets is None else targets[b])
        for n in range(out.shape[0]):
            rows = [torch.autograd.grad(flat_out[n, c], s, retain_graph=True)[0][n] for c in range(flat_out.shape[1])]
            J = torch.stack(rows)  # (D, *s.shape[1:])
            J = J.flatten(2).transpose(1, 2) if isinstance(layer, nn.Conv2d) else J.reshape(J.shape[0], -1, J.shape[-1])
            Js = [J[:, t] for t in range(T)] if approx == "expand" else [J.sum(1)]
            B = B + R * sum(Jt.T @ M[n] @ Jt for Jt in Js)
    return A, B


def blocks_by_label(approximation):
    return {label: (names, block) for label, names, block in approximation.blocks}


# ----------------------------------------------------------------------------------------------
# KFAC is exact where its assumptions hold


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "fisher_mc"])
@pytest.mark.parametrize("joint_bias", [False, True])
def test_kfac_equals_exact_layer_blocks_on_one_example(kind, joint_bias):
    model, batches, loss = build("mlp", sizes=(1,))
    prob = problem(model, batches, loss)
    targets = sampled_targets(prob, 2, 5) if kind == "fisher_mc" else None
    K = approximate(prob, "kfac", kind, joint_bias=joint_bias, mc_samples=2, seed=5)
    exact = exact_matrix(kind, model, batches, loss, targets=targets)
    assert len(K.blocks) == (2 if joint_bias else 4)
    for _, names, block in K.blocks:
        assert_matches(block.to_dense(), exact_block(exact, model, names))


@pytest.mark.parametrize("joint_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_ggn_is_exact_for_deep_linear_networks_with_mse(joint_bias, reduction):
    model, batches, loss = build("deep_linear")
    prob = problem(model, batches, loss, reduction)
    K = approximate(prob, "kfac", joint_bias=joint_bias)
    exact = exact_matrix("ggn", model, batches, loss, reduction)
    for _, names, block in K.blocks:
        assert_matches(block.to_dense(), exact_block(exact, model, names))


def test_fisher_is_an_alias_of_ggn():
    model, batches, loss = build("mlp")
    prob = problem(model, batches, loss)
    assert torch.equal(approximate(prob, "kfac", "fisher").to_dense(),
                       approximate(prob, "kfac", "ggn").to_dense())


# ----------------------------------------------------------------------------------------------
# factors against their definitions


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("joint_bias", [False, True])
def test_weight_shared_linear_factors_match_reference(approx, joint_bias):
    model, batches, loss = build("sequence")
    K = approximate(problem(model, batches, loss), "kfac", kfac_approx=approx, joint_bias=joint_bias)
    A, B = reference_factors(model, batches, loss, model.shared, approx=approx, joint=joint_bias)
    blocks = blocks_by_label(K)
    block = blocks["shared" if joint_bias else "shared.weight"][1]
    assert_matches(block.factors[1], A)
    assert_matches(block.factors[0], B)
    if not joint_bias:
        assert_matches(blocks["shared.bias"][1].factors[0], B)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv2d_factors_match_im2col_reference(approx):
    model, batches, loss = build("cnn")
    K = approximate(problem(model, batches, loss), "kfac", kfac_approx=approx)
    blocks = blocks_by_label(K)
    for index in ("0", "2"):
        A, B = reference_factors(model, batches, loss, model[int(index)], approx=approx)
        block = blocks[f"{index}.weight"][1]
        assert block.layout.shape == (model[int(index)].out_channels, A.shape[0])
        assert_matches(block.factors[1], A)
        assert_matches(block.factors[0], B)


@pytest.mark.parametrize("kind", ["fisher_mc", "empirical_fisher"])
def test_fisher_factors_match_reference_at_the_labels_of_the_exact_operator(kind):
    model, batches, loss = build("mlp_bce")
    prob = problem(model, batches, loss, "sum")
    targets = sampled_targets(prob, 3, 7) if kind == "fisher_mc" else None
    K = approximate(prob, "kfac", kind, mc_samples=3, seed=7)
    for index in (0, 2):
        A, B = reference_factors(model, batches, loss, model[index], kind=kind, targets=targets, reduction="sum")
        factors = blocks_by_label(K)[f"{index}.weight"][1].factors
        assert_matches(factors[1], A)
        assert_matches(factors[0], B)


def test_mc_labels_differ_with_the_seed():
    model, batches, loss = build("mlp")
    prob = problem(model, batches, loss)
    first, second = (approximate(prob, "kfac", "fisher_mc", seed=seed).to_dense() for seed in (0, 1))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_joint_bias_block_restricts_to_the_separate_blocks(approx):
    model, batches, loss = build("sequence")
    prob = problem(model, batches, loss)
    joint = blocks_by_label(approximate(prob, "kfac", kfac_approx=approx, joint_bias=True))
    separate = blocks_by_label(approximate(prob, "kfac", kfac_approx=approx))
    dense = joint["shared"][1].to_dense()
    # [W b] Kronecker: the weight block is B ⊗ A[:in, :in]; the bias block is B · A[in, in] with A[in, in] = 1.
    assert_matches(dense[:12, :12], separate["shared.weight"][1].to_dense())
    assert_matches(dense[12:, 12:], separate["shared.bias"][1].to_dense())


# ----------------------------------------------------------------------------------------------
# EKFAC


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "mlp_bce", "sequence", "cnn"])
def test_ekfac_is_the_diagonal_of_the_exact_block_in_kfac_eigenbasis(name):
    model, batches, loss = build(name)
    prob = problem(model, batches, loss)
    exact = exact_matrix("ggn", model, batches, loss)
    E = approximate(prob, "ekfac")
    K = approximate(prob, "kfac")
    for (label, names, ekfac_block), (_, _, kfac_block) in zip(E.blocks, K.blocks, strict=True):
        assert isinstance(ekfac_block, EigenbasisBlock) and isinstance(kfac_block, KroneckerBlock)
        G = exact_block(exact, model, names)
        Q = ekfac_block.bases[0]
        for basis in ekfac_block.bases[1:]:
            Q = torch.kron(Q, basis)
        assert_matches(ekfac_block.eigenvalues.flatten(), torch.diagonal(Q.T @ G @ Q))
        # Best Frobenius fit among matrices diagonal in that basis, which KFAC also is; where both are
        # exact (biases without weight sharing) they differ by rounding, ~1e-16·‖G‖.
        ekfac_error = torch.linalg.norm(ekfac_block.to_dense() - G)
        kfac_error = torch.linalg.norm(kfac_block.to_dense() - G)
        assert ekfac_error <= kfac_error + RTOL * torch.linalg.norm(G), label


@pytest.mark.parametrize("thin", [False, True])
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "fisher_mc"])
@pytest.mark.parametrize("name, sizes", [("mlp", (3, 1, 2)), ("mlp", (1, 1)), ("cnn", (3, 1, 2))])
def test_ekfac_in_one_pass_is_ekfac(name, sizes, kind, thin):
    """Two examples give fewer rows than features (bases from SVDs of the rows, thin or completed), the others eigh
    of the factors; the EKFAC matrix ``Q diag(S) Qᵀ`` is the same either way and ``S`` is the exact block's diagonal
    in ``Q``."""
    from curvlab.approx.kfac import ekfac_one_pass

    model, batches, loss = build(name, sizes)
    prob = problem(model, batches, loss)
    targets = sampled_targets(prob, 1, 3) if kind == "fisher_mc" else None
    exact = exact_matrix(kind, model, batches, loss, targets=targets)
    bases, S = ekfac_one_pass(prob, kind, seed=3, thin=thin)
    thinned = False
    two_pass = {label: block for label, _, block in approximate(prob, "ekfac", kind, seed=3).blocks}
    named = dict(model.named_parameters())
    for label, (Q_B, Q_A) in bases.items():
        for part, Q in (("weight", torch.kron(Q_B.contiguous(), Q_A.contiguous())), ("bias", Q_B)):
            name_ = f"{label}.{part}"
            assert_matches(Q.T @ Q, torch.eye(Q.shape[1], dtype=DTYPE))
            G = exact_block(exact, model, [name_])
            assert_matches(S[label, part].flatten(), torch.diagonal(Q.T @ G @ Q))
            assert_matches((Q * S[label, part].flatten()) @ Q.T, two_pass[name_].to_dense())
            full = named[name_].shape if part == "bias" else named[name_].flatten(1).shape
            assert S[label, part].shape == (Q_B.shape[1],) + ((Q_A.shape[1],) if part == "weight" else ())
            thinned |= S[label, part].shape != full
    assert thinned == thin if sizes == (1, 1) else thinned <= thin, "two examples give fewer rows than features"


@pytest.mark.parametrize("kind", ["empirical_fisher", "fisher_mc"])
def test_ekfac_joint_bias_and_reduce_refit_the_exact_block(kind):
    model, batches, loss = build("sequence")
    prob = problem(model, batches, loss)
    targets = sampled_targets(prob, 1, 0) if kind == "fisher_mc" else None
    exact = exact_matrix(kind, model, batches, loss, targets=targets)
    E = approximate(prob, "ekfac", kind, kfac_approx="reduce", joint_bias=True)
    for _, names, block in E.blocks:
        G = exact_block(exact, model, names)
        # The layout puts the bias last, as the flat vector does: compare in the block's own basis.
        basis = block.layout.to_rows(torch.einsum("ao,ci->oiac", *block.bases).reshape(-1, *block.layout.shape))
        assert_matches(block.eigenvalues.flatten(), torch.diagonal(basis @ G @ basis.T))


# ----------------------------------------------------------------------------------------------
# FOOF


@pytest.mark.parametrize("joint_bias", [False, True])
def test_foof_is_the_ggn_of_one_linear_layer_with_mse_up_to_2RN(joint_bias):
    seeded(1)
    model = nn.Linear(3, 2).to(DTYPE)
    batches = models.split_batch(torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE), [2, 3])
    prob = problem(model, batches, "mse")
    foof = approximate(prob, "foof", joint_bias=joint_bias)
    exact = exact_matrix("ggn", model, batches, "mse")
    scale = 2 * prob.reduction_factor * prob.num_examples
    for _, names, block in foof.blocks:
        assert_matches(scale * block.to_dense(), exact_block(exact, model, names))


def test_foof_input_factor_is_kfac_input_factor():
    model, batches, loss = build("cnn")
    prob = problem(model, batches, loss)
    foof, kfac = blocks_by_label(approximate(prob, "foof")), blocks_by_label(approximate(prob, "kfac"))
    for label in ("0.weight", "2.weight", "5.weight"):
        assert torch.equal(foof[label][1].factors[0], torch.eye(foof[label][1].factors[0].shape[0], dtype=DTYPE))
        assert_matches(foof[label][1].factors[1], kfac[label][1].factors[1])


# ----------------------------------------------------------------------------------------------
# other modules, tying and reuse


@pytest.mark.parametrize("case_name, expected", [("batchnorm", ("1.weight", "1.bias")),
                                                 ("layernorm", ("1.weight", "1.bias")),
                                                 ("cnn", ("1.weight", "1.bias"))])
def test_normalisation_layers_get_their_exact_block(case_name, expected):
    case = models.make_case(case_name)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    K = approximate(prob, "kfac")
    assert K.exact_parameters == expected
    exact = exact_matrix("ggn", case.model, case.batches, case.loss)
    for _, names, block in K.blocks:
        if names[0] in expected:
            assert isinstance(block, DenseBlock)
            assert_matches(block.to_dense(), exact_block(exact, case.model, names))


def test_tied_weight_gets_its_exact_block():
    case = models.make_case("tied")
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    K = approximate(prob, "kfac")
    assert K.exact_parameters == ("embed.weight",)
    exact = exact_matrix("ggn", case.model, case.batches, case.loss)
    names, block = blocks_by_label(K)["embed"]
    assert_matches(block.to_dense(), exact_block(exact, case.model, names))


def test_layer_called_twice_gets_its_exact_block():
    seeded(2)
    model = Twice().to(DTYPE)
    batches = [(torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 2, (4,)))]
    K = approximate(problem(model, batches, "cross_entropy"), "kfac")
    assert K.exact_parameters == ("inner.weight", "inner.bias")
    exact = exact_matrix("ggn", model, batches, "cross_entropy")
    names, block = blocks_by_label(K)["inner"]
    assert_matches(block.to_dense(), exact_block(exact, model, names))


def test_grouped_convolution_gets_its_exact_block():
    seeded(3)
    model = nn.Sequential(nn.Conv2d(2, 2, 2, groups=2), nn.Flatten(), nn.Linear(8, 2)).to(DTYPE)
    batches = [(torch.randn(3, 2, 3, 3, dtype=DTYPE), torch.randint(0, 2, (3,)))]
    K = approximate(problem(model, batches, "cross_entropy"), "ekfac")
    assert K.exact_parameters == ("0.weight", "0.bias")


# ----------------------------------------------------------------------------------------------
# operator behaviour and bad input


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "foof"])
def test_damped_inverse_undoes_the_damped_approximation(kind):
    case = models.make_case("cnn")
    approximation = approximate(curvlab.Problem(case.model, case.batches, loss=case.loss), kind,
                                        joint_bias=True)
    v = torch.randn(approximation.shape[0], 3, generator=seeded(4), dtype=DTYPE)
    damping = 0.1
    # (C̃ + δI) has condition number below ‖C̃‖/δ ≈ 1e2 here: the round trip loses at most ~1e-13.
    assert_matches(approximation.inverse(damping) @ (approximation @ v + damping * v), v, rtol=1e-10)


def test_dense_matrix_is_block_diagonal_in_parameter_order():
    model, batches, loss = build("mlp")
    K = approximate(problem(model, batches, loss), "kfac")
    dense = K.to_dense()
    v = torch.randn(dense.shape[0], generator=seeded(5), dtype=DTYPE)
    assert_matches(K @ v, dense @ v)
    assert_matches(dense[:12, 12:], torch.zeros(12, dense.shape[0] - 12, dtype=DTYPE))


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "foof"])
@pytest.mark.parametrize("options, message", [
    ({"curvature": "hessian"}, "curvature='hessian'"),
    ({"kfac_approx": "mean"}, "kfac_approx"),
    ({"joint_bias": 1}, "joint_bias"),
    ({"mc_samples": 0}, "mc_samples"),
    ({"damping": 1.0}, "unknown option"),
])
def test_bad_input_raises_invalid_problem(kind, options, message):
    model, batches, loss = build("mlp")
    with pytest.raises(InvalidProblem, match=message):
        approximate(problem(model, batches, loss), kind, **options)
