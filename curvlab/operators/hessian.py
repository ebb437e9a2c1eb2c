"""The Hessian ``H = ∇²L(θ)``, applied matrix-free as reverse-over-reverse products.

One forward and backward pass builds ``∇L`` with its graph; since ``H`` is symmetric, pulling a
direction ``v`` back through ``∇L`` gives ``H v``, and K directions are K passes back through the
one recorded graph, which :meth:`~curvlab.operators.base.SummedOverData.reusing_passes` keeps for
the next products.

A lone product skips the weight gradients of the Linear and Conv layers whose parameters are read
only inside their own call, which the pass back never reads. It is ``H v = ∇_θ (∇L · v)``, with
``∇L · v`` from a reverse pass in which each such layer's share is ``∂L/∂s · f(a; v)``: its output
gradient against its output at its input ``a`` with its parameters replaced by their part of ``v``
(``f`` is linear in them). Only the other parameters' gradients are formed. (Reverse-over-forward
would do the same with ``∇L · v`` from forward mode, but torch 2.13 differentiates layer norm's
forward-mode rule wrongly: 23 % error.)
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vjp

from curvlab.operators.base import SummedOverData
from curvlab.operators.taps import Taps, TappedLayers
from curvlab.problem import Problem, differentiable_kernels


def is_affine_layer(module: nn.Module, names: list[str]) -> bool:
    """Whether ``module`` is a Linear or Conv1d/2d/3d with every parameter studied (``names``).

    Its output ``f(a; θ)`` at its input ``a`` is then linear in its parameters ``θ``.
    """
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(names) == len(
        list(module.parameters(recurse=False)))


def _layer_at(module: nn.Module, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An affine layer's output at input ``a`` with the parameters ``(weight, bias)`` in place of its own."""
    if isinstance(module, nn.Linear):
        return F.linear(a, weight, bias)
    return module._conv_forward(a, weight, bias)


class Hessian(SummedOverData):
    """``H = ∇²_θ L``, shape ``(P, P)``."""

    kind = "hessian"
    _layers: TappedLayers | None = None

    def _batch_matmat(self, index, X, y, directions):
        problem = self.problem

        def record():
            return vjp(grad(lambda p: problem.batch_loss(p, X, y)), problem.params)[1]

        pullback = self._recorded_pass(index, record)
        count = next(iter(directions.values())).shape[0]
        if pullback is None and count == 1:
            product = self._lone_product(X, y, {name: direction[0] for name, direction in directions.items()})
            if product is not None:
                return problem.stack_columns([product], 1)
        pullback = pullback or record()
        columns = (pullback({name: direction[k] for name, direction in directions.items()})[0]
                   for k in range(count))
        return problem.stack_columns(columns, count)

    def _lone_product(self, X, y, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``H v = ∇_θ (∇L · v)`` on one batch without the affine layers' weight gradients.

        ``None`` when no layer is tapped, or when a tapped layer does not run exactly once on this
        batch: the caller then takes the recorded pass.
        """
        problem = self.problem
        if self._layers is None:
            self._layers = TappedLayers(problem, is_affine_layer, exclusive=True)
        layers = self._layers
        if not layers.modules:
            return None
        owned = {name: names for name, names in problem.module_blocks() if name in layers.modules}
        tapped = {full for names in owned.values() for full in names}
        free = [name for name in problem.param_names if name not in tapped]
        with Taps(layers.modules) as taps:
            zeros = layers.perturbations(taps, X)

        def slope(params):
            def loss(perturbations, free_params):
                with Taps(layers.modules) as taps:
                    taps.reset(perturbations)
                    value = problem.batch_loss(params | free_params, X, y)
                if any(taps.calls.get(name) != 1 or name not in taps.inputs for name in layers.modules):
                    raise _Irregular
                return value, taps.inputs

            (output_gradients, gradients), inputs = grad(loss, argnums=(0, 1), has_aux=True)(
                zeros, {name: params[name] for name in free})
            total = sum((gradients[name] * v[name]).sum() for name in free)
            for name, names in owned.items():
                local = {full.rpartition(".")[2]: v[full] for full in names}
                total = total + (output_gradients[name] * _layer_at(
                    layers.modules[name], inputs[name], local["weight"], local.get("bias"))).sum()
            return total

        try:
            return grad(slope)(problem.params)
        except _Irregular:
            return None


class _Irregular(Exception):
    """A tapped layer did not run exactly once on a batch."""


def gradient_and_hessian_product(problem: Problem, direction: Mapping[str, torch.Tensor]
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(∇L, H v)`` for ``v`` given as name -> tensor, from one pass per batch (summed over ranks).

    The gradient is the value of the reverse-over-reverse product, which :class:`Hessian` discards: one
    forward pass, one backward pass recording its graph and one pass back through it give both, as the
    Hessian-vector products of training loops (PSGD's) do. A problem whose loss is not known yet records it
    (:meth:`~curvlab.Problem.record_loss`).
    """
    gradient, product, total = None, None, 0.0

    def loss_and_value(params, X, y):
        loss = problem.batch_loss(params, X, y)
        return loss, loss.detach()

    with torch.no_grad(), differentiable_kernels():
        for _, X, y in problem.batches():
            share, pullback, loss = vjp(grad(lambda p: loss_and_value(p, X, y), has_aux=True), problem.params,
                                        has_aux=True)
            total = total + loss
            (share_product,) = pullback(dict(direction))
            del pullback  # the recorded graph, before the next batch records its own
            if gradient is None:
                gradient, product = share, share_product
            else:
                for name in gradient:
                    gradient[name].add_(share[name])
                    product[name].add_(share_product[name])
    for tensors in (gradient, product):
        for tensor in tensors.values():
            problem.reduce(tensor)
    problem.record_loss(total)
    return gradient, product
