"""Layer inputs and output gradients of ``nn.Linear`` and ``nn.Conv2d`` layers: what Kronecker factors are built from.

A layer ``s = W a (+ b)`` with ``W`` ``(d_out, d_in)`` is applied at ``T`` positions of every example:
``T = 1`` for a Linear on ``(N, d_in)``; the product of the middle dimensions for a Linear on
``(N, …, d_in)``; ``T = h_out · w_out`` for a Conv2d, whose inputs are the im2col patches
(:func:`torch.nn.functional.unfold`, ``d_in = c_in · kh · kw``) and whose kernel is viewed as
``(c_out, c_in · kh · kw)``. One batch of ``N`` examples gives

- ``a`` ``(N, T, d_in)``: the layer's inputs;
- ``e`` ``(K, N, T, d_out)``: ``e_k = ∂(u_k · f)/∂s``, the output gradients for ``K`` output-space
  cotangents ``u_k`` of the outputs' shape (the columns of the output Hessian's square root, or
  loss gradients at sampled or true labels).

Both come from one forward pass and one vector-Jacobian product per cotangent, with
:mod:`torch.func`: a forward hook records each tapped layer's input as an auxiliary output and adds
a zero perturbation ``δ`` to its output, so that ``∂(u · f)/∂δ = ∂(u · f)/∂s``. The products are
taken with respect to the perturbations only, so no weight gradient is ever computed. The shapes
of the perturbations come from a pass on the ``meta`` device, which does no arithmetic.
"""

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from curvlab.operators.taps import Taps, TappedLayers
from curvlab.problem import Problem, differentiable_kernels

# Cotangents pulled back together: bounds the memory of the output gradients to this many copies.
COTANGENT_CHUNK = 16


def is_kronecker_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear, or a Conv2d whose patches ``unfold`` extracts (one group, zero padding)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The im2col patches of a Conv2d's input ``(N, c_in, h, w)``: ``(N, h_out · w_out, c_in · kh · kw)``."""
    padding = module.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        pads = []
        for size, dilation in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = dilation * (size - 1)
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), (0, 0)
    columns = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return columns.transpose(1, 2)


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tapped layer's input in the common form ``(N, T, d_in)``."""
    if isinstance(module, nn.Conv2d):
        return _patches(module, x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_gradient(module: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """Output gradients ``(K, N, *output_shape)`` in the common form ``(K, N, T, d_out)``."""
    if isinstance(module, nn.Conv2d):
        return e.flatten(3).transpose(2, 3)
    return e.reshape(e.shape[0], e.shape[1], -1, e.shape[-1])


Cotangents = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]


class KroneckerLayers(TappedLayers):
    """The modules of a problem whose studied parameters get Kronecker-factored blocks, and their statistics.

    A module qualifies when it passes :func:`is_kronecker_layer` and is tapped as
    :class:`~curvlab.operators.taps.TappedLayers` says (not tied, called exactly once per forward
    pass), with the batch dimension leading its input and output (4-d for a Conv2d).

    Attributes:
        modules: module name -> module, in ``problem.module_blocks()`` order.
    """

    def __init__(self, problem: Problem):
        super().__init__(problem, lambda module, names: is_kronecker_layer(module))

    def fits(self, module, input_shape, output_shape, size):
        return input_shape[0] == size and output_shape[0] == size and len(output_shape) >= 2 and (
            not isinstance(module, nn.Conv2d) or len(output_shape) == 4)

    def statistics(self, input_layers: set[str], cotangents: Cotangents | None
                   ) -> Iterator[tuple[dict, Iterator[tuple[dict, float]]]]:
        """Per batch, the inputs of ``input_layers`` and the output gradients of all :attr:`modules`.

        Args:
            input_layers: the names in :attr:`modules` whose inputs are needed.
            cotangents: ``(batch index, outputs f, targets y) -> (U, weight)`` with ``U`` ``(K, *f.shape)``,
                or ``None`` for inputs only (one forward pass without gradients). With cotangents, a
                problem whose loss is not known yet records it once every batch has been read
                (:meth:`~curvlab.Problem.record_loss`).

        Yields:
            ``(inputs, gradients)`` per batch: ``inputs`` maps names to ``a`` ``(N, T, d_in)``;
            ``gradients`` yields ``(e, weight)`` for chunks of at most :data:`COTANGENT_CHUNK` cotangents,
            ``e`` mapping names to ``(k, N, T, d_out)``. Consume ``gradients`` before the next batch.
        """
        problem, layers = self.problem, self.modules
        if not layers:
            return
        total = None if problem.loss_known or cotangents is None else 0.0
        with Taps(layers) as taps, differentiable_kernels():
            for index, X, y in problem.batches():
                if cotangents is None:
                    taps.reset({})
                    with torch.no_grad():
                        problem.forward(problem.params, X)
                    yield _inputs(taps, layers, input_layers, index), iter(())
                    continue
                zeros = self.perturbations(taps, X)

                def forward(perturbations):
                    taps.reset(perturbations)
                    output = problem.forward(problem.params, X)
                    return output, _inputs(taps, layers, input_layers, index)

                output, pullback, inputs = vjp(forward, zeros, has_aux=True)
                output = output.detach()
                if total is not None:
                    total = total + problem.likelihood.loss(output, y)
                yield inputs, _output_gradients(layers, pullback, *cotangents(index, output, y))
        if total is not None:
            problem.record_loss(problem.reduction_factor * total)


def _inputs(taps: Taps, layers, input_layers, index: int) -> dict[str, torch.Tensor]:
    """The recorded inputs, after checking that every tapped layer ran exactly once."""
    taps.check(index)
    return {name: layer_input(layers[name], taps.inputs[name].detach()) for name in input_layers}


def _output_gradients(layers, pullback, U: torch.Tensor, weight: float) -> Iterator[tuple[dict, float]]:
    for chunk in U.split(COTANGENT_CHUNK):
        if chunk.shape[0] == 1:
            e = {name: g.unsqueeze(0) for name, g in pullback(chunk[0])[0].items()}
        else:
            e = vmap(pullback)(chunk)[0]
        yield {name: layer_output_gradient(layers[name], g) for name, g in e.items()}, weight
