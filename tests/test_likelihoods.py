"""Output-space quantities of each likelihood against autograd on the summed loss."""

import pytest
import torch

from curvlab.likelihoods import LIKELIHOODS

CASES = {
    "cross_entropy": ((5, 4), lambda shape: torch.randint(0, shape[-1], shape[:-1])),
    "mse": ((5, 3), lambda shape: torch.randn(shape, dtype=torch.float64)),
    "bce": ((5, 3), lambda shape: torch.randint(0, 2, shape).double()),
}
SEQUENCE = ((3, 2, 4), lambda shape: torch.randint(0, shape[-1], shape[:-1]))


def _case(name, sequence=False):
    torch.manual_seed(0)
    shape, make_target = SEQUENCE if sequence else CASES[name]
    return LIKELIHOODS[name](), torch.randn(shape, dtype=torch.float64), make_target(shape)


def _output_hessian(likelihood, output, target):
    """Dense ∇²_f ℓ of the whole batch by autograd double loops: (numel, numel)."""
    flat = output.detach().flatten().requires_grad_()
    gradient = torch.autograd.grad(likelihood.loss(flat.view(output.shape), target), flat, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g, flat, retain_graph=True)[0] for g in gradient])


@pytest.mark.parametrize("name,sequence", [(name, False) for name in CASES] + [("cross_entropy", True)])
def test_output_grad_and_hessian_match_autograd(name, sequence):
    likelihood, output, target = _case(name, sequence)
    leaf = output.clone().requires_grad_()
    expected_grad = torch.autograd.grad(likelihood.loss(leaf, target), leaf)[0]
    torch.testing.assert_close(likelihood.output_grad(output, target), expected_grad, rtol=1e-13, atol=1e-13)
    hessian = _output_hessian(likelihood, output, target)
    u = torch.randn_like(output)
    torch.testing.assert_close(likelihood.hessian_product(output, u).flatten(), hessian @ u.flatten(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,sequence", [(name, False) for name in CASES] + [("cross_entropy", True)])
def test_hessian_sqrt_squares_to_output_hessian(name, sequence):
    likelihood, output, target = _case(name, sequence)
    root = likelihood.hessian_sqrt(output)
    hessian = _output_hessian(likelihood, output, target)
    if name == "cross_entropy":
        groups = output.shape[-1]
        blocks = root.reshape(-1, groups, groups)
        expected = torch.block_diag(*[block @ block.T for block in blocks])
    else:
        expected = torch.diag(root.squeeze(-1).flatten().square())
    torch.testing.assert_close(expected, hessian, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_residual_second_moment_is_output_hessian(name):
    # E_ŷ[∇ℓ(f, ŷ) ∇ℓ(f, ŷ)ᵀ] = ∇²_f ℓ(f): the identity that makes E[F_mc] = G. With 4·10⁵ draws the
    # Monte-Carlo error of each entry is below ~4·sd/√S ≈ 0.006·scale; 0.02 leaves room for every entry.
    likelihood, output, target = _case(name)
    samples = 400_000
    drawn = likelihood.sample(output[:1], samples, torch.Generator().manual_seed(1))
    assert drawn.shape == (samples, *target[:1].shape)
    residuals = likelihood.output_grad(output[:1], drawn).reshape(samples, -1)
    second_moment = residuals.T @ residuals / samples
    hessian = _output_hessian(likelihood, output[:1], target[:1])
    torch.testing.assert_close(second_moment, hessian, rtol=0, atol=0.02 * hessian.abs().max().item())


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_is_fixed_by_the_generator_and_leaves_global_rng_alone(name):
    likelihood, output, _ = _case(name)
    state = torch.get_rng_state()
    first = likelihood.sample(output, 3, torch.Generator().manual_seed(7))
    second = likelihood.sample(output, 3, torch.Generator().manual_seed(7))
    other = likelihood.sample(output, 3, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(state, torch.get_rng_state())
