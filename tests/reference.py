"""Independent dense float64 references, written with plain ``torch.autograd.grad`` loops.

Nothing here uses torch.func or curvlab. The losses are written from their formulas, the reduction
factor is counted from the data, and every matrix is built one autograd call at a time:

    L   = R Σ_n ℓ_n,  ℓ_n = the loss of example n summed over its output entries / positions
    R   = 1 (sum) or 1 / (total number of target entries) (mean: N, N·T, or N·D)
    H   = ∇²L                               rows: ∂/∂θ of each entry of ∇L
    G   = R Σ_n J_nᵀ (∇²_f ℓ_n) J_n         J_n rows: ∂f_n[k]/∂θ; ∇²_f ℓ_n by a double loop in f_n
    E   = R Σ_n ∇ℓ_n ∇ℓ_nᵀ
    Fmc = R Σ_n (1/S) Σ_s ∇ℓ(f_n, ŷ_ns) ∇ℓ(f_n, ŷ_ns)ᵀ   at given labels ŷ
    |H| = V |Λ| Vᵀ,  H = V Λ Vᵀ
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def forward(model: nn.Module, x):
    # The math attention kernel, because the fused CPU/GPU kernels have no double backward.
    with sdpa_kernel(SDPBackend.MATH):
        return model(**x) if isinstance(x, dict) else model(x)


def example_losses(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ_n for every example of a batch: shape (N,), each summed over entries and positions."""
    n = out.shape[0]
    if loss == "cross_entropy":  # out (N, [T,] C), y (N, [T]) integer labels
        log_p = out - torch.logsumexp(out, dim=-1, keepdim=True)
        terms = -log_p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    elif loss == "mse":
        terms = (out - y) ** 2
    elif loss == "bce":  # -y log σ(f) - (1-y) log(1-σ(f)) = softplus(f) - y f
        terms = F.softplus(out) - y * out
    else:
        raise ValueError(loss)
    return terms.reshape(n, -1).sum(dim=1)


def reduction_factor(batches, reduction: str) -> float:
    """R: 1 for sum; 1 / (number of target entries over all batches) for mean."""
    if reduction == "sum":
        return 1.0
    return 1.0 / sum(y.numel() for _, y in batches)


def _params(model: nn.Module, names: Optional[Sequence[str]]) -> List[torch.Tensor]:
    named = dict(model.named_parameters())
    return [named[n] for n in (names if names is not None else named)]


def _flat_grad(output: torch.Tensor, params, create_graph: bool = False) -> torch.Tensor:
    """∂output/∂θ, flattened; parameters the output does not depend on get zeros."""
    if not output.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(
        output, params, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )


def loss(model, batches, loss_name: str, reduction: str) -> torch.Tensor:
    R = reduction_factor(batches, reduction)
    return R * sum(example_losses(forward(model, x), y, loss_name).sum() for x, y in batches)


def gradient(model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    return _flat_grad(loss(model, batches, loss_name, reduction), _params(model, names))


def hessian(model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    params = _params(model, names)
    g = _flat_grad(loss(model, batches, loss_name, reduction), params, create_graph=True)
    return torch.stack([_flat_grad(g[i], params) for i in range(g.numel())])


def abs_matrix(m: torch.Tensor) -> torch.Tensor:
    """V |Λ| Vᵀ from eigh of the symmetric part."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return evecs @ torch.diag(evals.abs()) @ evecs.T


def abs_hessian(model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    return abs_matrix(hessian(model, batches, loss_name, reduction, names))


def output_hessian(f: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    """∇²_f ℓ(f, y) for one example's output f (any shape), as a (f.numel(), f.numel()) matrix."""
    f = f.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(example_losses(f[None], y[None], loss_name).sum(), f, create_graph=True)[0]
    g = g.reshape(-1)
    return torch.stack([torch.autograd.grad(g[k], f, retain_graph=True)[0].reshape(-1) for k in range(g.numel())])


def ggn(model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    params = _params(model, names)
    P = sum(p.numel() for p in params)
    G = torch.zeros(P, P, dtype=params[0].dtype, device=params[0].device)
    for x, y in batches:
        out = forward(model, x)
        for n in range(out.shape[0]):
            f_n = out[n].reshape(-1)
            J = torch.stack([_flat_grad(f_n[k], params) for k in range(f_n.numel())])
            G += J.T @ output_hessian(out[n], y[n], loss_name) @ J
    return reduction_factor(batches, reduction) * G


def empirical_fisher(model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    params = _params(model, names)
    grads = []
    for x, y in batches:
        losses = example_losses(forward(model, x), y, loss_name)
        grads += [_flat_grad(losses[n], params) for n in range(losses.numel())]
    g = torch.stack(grads)
    return reduction_factor(batches, reduction) * g.T @ g


def mc_fisher(model, batches, loss_name, reduction, sampled_targets, names=None) -> torch.Tensor:
    """MC Fisher at the given labels: ``sampled_targets[b]`` has shape (S, *targets of batch b)."""
    params = _params(model, names)
    P = sum(p.numel() for p in params)
    Fmc = torch.zeros(P, P, dtype=params[0].dtype, device=params[0].device)
    for (x, _), y_hat in zip(batches, sampled_targets, strict=True):
        out = forward(model, x)
        S = y_hat.shape[0]
        for s in range(S):
            losses = example_losses(out, y_hat[s], loss_name)
            for n in range(losses.numel()):
                g = _flat_grad(losses[n], params)
                Fmc += torch.outer(g, g) / S
    return reduction_factor(batches, reduction) * Fmc


def dense(kind, model, batches, loss_name, reduction, names=None) -> torch.Tensor:
    """The reference of an exact kind (``fisher`` is the GGN for these likelihoods)."""
    fn = {
        "hessian": hessian,
        "abs_hessian": abs_hessian,
        "ggn": ggn,
        "fisher": ggn,
        "empirical_fisher": empirical_fisher,
    }[kind]
    return fn(model, batches, loss_name, reduction, names).detach()
