"""The loss of each supported likelihood, in output space.

For one example with network output ``f`` the loss ``ℓ(f, y)`` is the *summed* negative
log-likelihood over the example's output entries (and sequence positions), up to constants:

- ``cross_entropy``: ``f`` of shape ``(..., C)`` (class dimension last), ``y`` integer ``(...)``;
  ``ℓ = Σ −log softmax(f)_y``; output Hessian per position ``diag(p) − p pᵀ``.
- ``mse``: ``ℓ = Σ (f − y)²`` (no ½), the Gaussian likelihood with variance ½ per entry;
  output Hessian ``2 I``.
- ``bce``: ``ℓ = Σ −y log σ(f) − (1 − y) log(1 − σ(f))``; output Hessian ``diag(σ(f)(1 − σ(f)))``.

Every function takes a whole batch (leading dimension N) and acts per example.
"""

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from curvlab.errors import InvalidProblem


def _require_output_shape(loss: str, output: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(output.shape):
        raise InvalidProblem(
            f"{loss}: targets {tuple(target.shape)} must have the outputs' shape {tuple(output.shape)}; "
            f"reshape the targets (e.g. y.view(-1, 1)) so that no broadcasting is needed"
        )


class Likelihood(ABC):
    """Output-space loss, gradient, Hessian, Hessian square root and label sampling of one loss."""

    name: str

    @abstractmethod
    def validate(self, output: torch.Tensor, target: torch.Tensor) -> int:
        """Check that ``target`` fits ``output``; return the number of terms torch's mean averages over."""

    def prepare_target(self, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``target`` in the dtype the loss needs (floating targets take the parameters' dtype)."""
        return target.to(dtype) if target.is_floating_point() else target

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``Σ_n ℓ(f_n, y_n)``: a scalar."""

    @abstractmethod
    def output_grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∂ℓ(f_n, y_n)/∂f_n`` for every example: the shape of ``output``."""

    @abstractmethod
    def hessian_product(self, output: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``∇²_f ℓ(f_n) · u_n`` for every example: ``u`` and the result have the shape of ``output``."""

    @abstractmethod
    def hessian_sqrt(self, output: torch.Tensor) -> torch.Tensor:
        """``S`` of shape ``(*output.shape, K)`` with ``∇²_f ℓ = S Sᵀ`` per independent output group.

        For cross-entropy a group is one position's ``C`` logits (``K = C``); for MSE and BCE every
        output entry is its own group (``K = 1``).
        """

    @abstractmethod
    def sample(self, output: torch.Tensor, samples: int, generator: torch.Generator,
               part: tuple[int, int] | None = None) -> torch.Tensor:
        """Targets drawn from the predictive distribution: shape ``(samples, *target_shape)``.

        Random numbers come from the CPU ``generator`` in float64 so that CPU and GPU draw the same labels.
        ``part = (offset, total)``: ``output`` holds examples ``offset`` to ``offset + N`` of a batch of
        ``total``; the numbers drawn are those of the whole batch, and these examples get their share.
        """


class CrossEntropy(Likelihood):
    name = "cross_entropy"

    def validate(self, output, target):
        if output.ndim < 2:
            raise InvalidProblem(
                f"cross_entropy needs model outputs of shape (N, C) or (N, T, C) with classes last, "
                f"got {tuple(output.shape)}; use loss='bce' or 'mse' for one output per example"
            )
        if target.is_floating_point():
            raise InvalidProblem(
                "cross_entropy targets must be integer class indices (class probabilities are not "
                f"supported); got a {target.dtype} tensor: convert with y.long()"
            )
        if tuple(target.shape) != tuple(output.shape[:-1]):
            raise InvalidProblem(
                f"cross_entropy: outputs {tuple(output.shape)} need targets of shape "
                f"{tuple(output.shape[:-1])} (class dimension last), got {tuple(target.shape)}"
            )
        classes = output.shape[-1]
        if target.numel() and (target.min() < 0 or target.max() >= classes):
            raise InvalidProblem(
                f"cross_entropy: class labels must lie in [0, {classes - 1}] for {classes} outputs, "
                f"found labels in [{int(target.min())}, {int(target.max())}]; relabel the targets "
                f"or widen the output layer"
            )
        return target.numel()

    def loss(self, output, target):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction="sum")

    def output_grad(self, output, target):
        return output.softmax(-1) - F.one_hot(target, output.shape[-1]).to(output.dtype)

    def hessian_product(self, output, u):
        p = output.softmax(-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def hessian_sqrt(self, output):
        p = output.softmax(-1)
        root = p.sqrt()
        return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)

    def sample(self, output, samples, generator, part=None):
        cdf = output.detach().to(torch.float64).softmax(-1).cumsum(-1).cpu()
        u = _draw(torch.rand, (samples, *cdf.shape[:-1], 1), generator, part)
        labels = torch.searchsorted(cdf.expand(samples, *cdf.shape).contiguous(), u).squeeze(-1)
        return labels.clamp_(max=output.shape[-1] - 1).to(output.device)


class MeanSquaredError(Likelihood):
    name = "mse"

    def validate(self, output, target):
        _require_output_shape(self.name, output, target)
        if not target.is_floating_point():
            raise InvalidProblem(f"mse targets must be floating point, got {target.dtype}: use y.float()")
        return target.numel()

    def loss(self, output, target):
        return (output - target).square().sum()

    def output_grad(self, output, target):
        return 2 * (output - target)

    def hessian_product(self, output, u):
        return 2 * u

    def hessian_sqrt(self, output):
        return torch.full((*output.shape, 1), math.sqrt(2.0), dtype=output.dtype, device=output.device)

    def sample(self, output, samples, generator, part=None):
        noise = _draw(torch.randn, (samples, *output.shape), generator, part)
        return output.detach() + math.sqrt(0.5) * noise.to(device=output.device, dtype=output.dtype)


class BinaryCrossEntropy(Likelihood):
    name = "bce"

    def validate(self, output, target):
        _require_output_shape(self.name, output, target)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise InvalidProblem(
                f"bce: targets must lie in [0, 1], found [{float(target.min())}, {float(target.max())}]"
            )
        return target.numel()

    def prepare_target(self, target, dtype):
        return target.to(dtype)

    def loss(self, output, target):
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")

    def output_grad(self, output, target):
        return output.sigmoid() - target

    def hessian_product(self, output, u):
        p = output.sigmoid()
        return p * (1 - p) * u

    def hessian_sqrt(self, output):
        p = output.sigmoid()
        return (p * (1 - p)).sqrt().unsqueeze(-1)

    def sample(self, output, samples, generator, part=None):
        u = _draw(torch.rand, (samples, *output.shape), generator, part)
        p = output.detach().to(torch.float64).sigmoid().cpu()
        return (u < p).to(device=output.device, dtype=output.dtype)


def _draw(draw, shape: tuple, generator: torch.Generator, part: tuple[int, int] | None) -> torch.Tensor:
    """``draw`` (``torch.rand`` or ``torch.randn``) of ``shape`` ``(samples, N, …)`` in float64; with ``part = (offset,
    total)`` the draw for all ``total`` examples, of which examples ``offset`` to ``offset + N`` are kept."""
    if part is None:
        return draw(shape, generator=generator, dtype=torch.float64)
    offset, total = part
    return draw((shape[0], total, *shape[2:]), generator=generator, dtype=torch.float64)[:, offset:offset + shape[1]]


def label_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator batch ``index``'s labels are drawn from, derived from ``(seed, index)`` alone."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


LIKELIHOODS = {cls.name: cls for cls in (CrossEntropy, MeanSquaredError, BinaryCrossEntropy)}
