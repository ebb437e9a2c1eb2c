"""Sophia-G's Gauss-Newton-Bartlett (GNB) estimator of the GGN diagonal.

Sophia-G (Liu et al. 2023) draws labels ``ŷ`` from the model's predictive distribution, takes the
gradient ``ĝ`` ``(P,)`` of the mini-batch loss averaged over its ``T_b`` terms (examples, or tokens)
at those labels, and estimates the GGN diagonal by ``T_b · ĝ ⊙ ĝ``. With DESIGN.md's ``L = R Σ_n ℓ_n``
the gradient of batch b's share at the labels is ``g̃_b = R T_b ĝ`` (``R = 1/T`` for the mean over all
``T`` terms, 1 for the sum), and curvlab combines the batches as

    d̂ = (1/R) Σ_b (1/S) Σ_s g̃_bs ⊙ g̃_bs,     g̃_bs = ∇_θ R Σ_{n ∈ b} ℓ(f_n, ŷ_ns),

averaging over ``S`` independent draws; for one batch and the mean this is Sophia's ``T_b · ĝ ⊙ ĝ``.

Unbiasedness. ``g̃_bs = R Σ_{n ∈ b} J_nᵀ r_ns`` with ``r_ns = ∂ℓ(f_n, ŷ_ns)/∂f_n``. When the labels of
different examples and positions are drawn independently, each from the distribution whose negative
log-likelihood is ``ℓ`` (categorical per position; Bernoulli or Gaussian of variance ½ per entry,
independent across entries), then ``E[r_ns] = 0`` (the score has mean zero), so every cross term
``n ≠ m`` vanishes in expectation, and ``E[r_ns r_nsᵀ] = ∇²_f ℓ_n`` (Fisher = GGN for these
likelihoods). Hence ``E[d̂] = R Σ_n diag(J_nᵀ ∇²_f ℓ_n J_n) = diag(G)`` exactly, for any batching,
either reduction and any ``S``. A single estimate is not ``diag(F_mc)``: it contains the cross terms
``R Σ_{n ≠ m ∈ b} (J_nᵀ r_n) ⊙ (J_mᵀ r_m)``, which average out, and it equals ``diag(F_mc)`` at the
same labels exactly when every batch holds a single example and position (for CE; one output entry
for MSE and BCE).

The labels are those of ``curvlab.curvature(problem, "fisher_mc", mc_samples=samples, seed=seed)``
(drawn from the same per-batch generator, seeded by ``(seed, batch index)``; the caller's random
state is untouched), sampled from the outputs of the forward pass that the gradients reuse: one
forward and ``S`` backward passes per batch, i.e. ``S`` gradients.
"""

from collections.abc import Callable

import torch
from torch.func import vjp

from curvlab.approx.base import Approximation
from curvlab.approx.diagonal import diagonal_approximation, require_kind
from curvlab.errors import InvalidProblem, require_integer
from curvlab.problem import Problem, differentiable_kernels


def _estimate(problem: Problem, labels_for: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``d̂`` with batch b's labels ``labels_for(b, outputs, y)`` ``(S, *y.shape)``, drawn from the one forward pass."""
    R, split = problem.reduction_factor, problem.batch_part is not None
    total = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)
    with torch.no_grad(), differentiable_kernels():
        for index, X, y in problem.batches():
            output, pullback = vjp(lambda p: problem.forward(p, X), problem.params)
            labels = labels_for(index, output, y)
            residuals = R * problem.likelihood.output_grad(output, labels)
            for residual in residuals:
                gradient = problem.flatten(pullback(residual)[0])
                if split:  # one batch over the ranks: its gradient is the sum of theirs
                    problem.reduce(gradient)
                total += gradient.square_() / (R * len(residuals))
    return total if split else problem.reduce(total)


def gnb_diagonal(problem: Problem, targets: list[torch.Tensor]) -> torch.Tensor:
    """``d̂ = (1/R) Σ_b (1/S) Σ_s g̃_bs ⊙ g̃_bs`` ``(P,)`` at given labels, ``targets[b]`` ``(S, *y_b.shape)``.

    ``targets`` are this rank's: one tensor per batch of its shard, in order.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.gnb import gnb_diagonal
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, labels = torch.randn(4, 3, dtype=torch.float64), torch.tensor([[1, 0, 0, 1]])
        >>> prob = curvlab.Problem(model, (X, torch.zeros(4, dtype=torch.long)))
        >>> g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(X), labels[0]), model.weight)[0]
        >>> bool(torch.allclose(gnb_diagonal(prob, [labels])[:6], 4 * g.square().flatten()))  # T · ĝ ⊙ ĝ
        True
    """
    count = sum(1 for _ in problem.batches())

    def given(index, output, y):
        position = index - problem.batch_offset
        if len(targets) != count or targets[position].shape[1:] != y.shape:
            raise InvalidProblem(
                f"targets must hold one (samples, *labels) tensor per batch ({count}) matching its labels; got "
                f"{len(targets)} tensors, batch {index} has labels {tuple(y.shape)}: use FisherMC.sampled_targets()"
            )
        return targets[position].to(device=y.device, dtype=y.dtype)

    return _estimate(problem, given)


def gnb_estimate(problem: Problem, samples: int = 1, seed: int = 0) -> torch.Tensor:
    """``d̂`` ``(P,)`` at labels drawn from the model, those of ``fisher_mc`` with ``mc_samples=samples`` and ``seed``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.gnb import gnb_diagonal, gnb_estimate
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.randint(0, 2, (6,))))
        >>> labels = curvlab.curvature(prob, "fisher_mc", mc_samples=2, seed=1).sampled_targets()
        >>> bool(torch.equal(gnb_estimate(prob, samples=2, seed=1), gnb_diagonal(prob, labels)))
        True
    """
    samples = require_integer("samples", samples)
    seed = require_integer("seed", seed, minimum=0)
    return _estimate(problem, lambda index, output, y: problem.sample_targets(index, output, samples, seed))


def diag_gnb(problem: Problem, curvature: str = "ggn", samples: int = 1, seed: int = 0) -> Approximation:
    """Sophia-G's GNB estimate of ``diag(G)``, unbiased (see the module), as block-diagonal ``DiagonalBlock`` s.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: ``"ggn"`` or ``"fisher"`` (equal here), the matrix whose diagonal it estimates.
        samples: independent label draws ``S`` per example, averaged (Sophia-G: 1).
        seed: seeds the labels (the same as ``fisher_mc``'s with this seed and ``mc_samples=samples``).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.gnb import diag_gnb
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.randint(0, 2, (6,))))
        >>> D = diag_gnb(prob, samples=2, seed=1)
        >>> D.kind, D.curvature, D.shape
        ('diag_gnb', 'ggn', (8, 8))
    """
    require_kind("diag_gnb", curvature, ("ggn", "fisher"))
    return diagonal_approximation(problem, "diag_gnb", curvature, gnb_estimate(problem, samples, seed))
