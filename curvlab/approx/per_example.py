"""Sums of squared per-example pullbacks, ``s = Σ_n Σ_m (J_nᵀ u_mn)²`` ``(P,)``, squares entrywise.

``J_n = ∂f(θ, x_n)/∂θ`` ``(D, P)`` is the Jacobian of example n's output (``D`` entries) and
``u_mn`` ``(D,)``, ``m = 1 … M``, are output-space cotangents given per example. The diagonal of a
curvature ``R Σ_n J_nᵀ (Σ_m u_mn u_mnᵀ) J_n`` is ``R · s``: the GGN with the columns of the output
Hessian's square root, the empirical Fisher with the residual, the MC Fisher with the sampled
residuals. The squares are taken per example, before the sum over examples, which a batch's ordinary
backward pass (it sums over examples first) cannot give. Two routes:

- an ``nn.Linear`` layer ``z_n = W a_n + b`` with input ``a`` ``(N, in)``: ``J_nᵀ u_mn`` restricted to
  ``W`` is ``e_mn a_nᵀ`` with ``e_mn = ∂(u_mnᵀ f_n)/∂z_n`` ``(out,)``, so its share of ``s`` is
  ``(Σ_m e_m ⊙ e_m)ᵀ (a ⊙ a)``, an ``(out, N) · (N, in)`` product, and the bias's is
  ``Σ_n Σ_m e_mn ⊙ e_mn``. The ``e_mn`` are the gradients of a zero probe added to the layer's output:
  one forward pass, and ``M`` backward passes through the activations only (vmapped, at most
  :data:`~curvlab.operators.base.DIRECTIONS_PER_PASS` at once; no weight gradients are formed).
- any other parameter: per-example pullbacks, vmap over the examples (in chunks of at most
  :data:`CHUNK_ENTRIES` gradient entries, and of at most ``DIRECTIONS_PER_PASS`` batches' worth of
  pullbacks) of ``vjp``, ``M`` per example, squared and summed. This materialises ``(chunk, M, p)``
  per-example gradients.

A linear layer takes the first route when it is called once per forward pass, on a 2-D input, and
owns its parameters alone (no weight tying); otherwise its parameters take the second.
"""

from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import vjp, vmap

from curvlab.operators.base import DIRECTIONS_PER_PASS
from curvlab.problem import Problem, batch_size, differentiable_kernels, example_slice

CHUNK_ENTRIES = 2 ** 24
"""The most per-example gradient entries (examples × M × parameters) the second route holds at once."""

Cotangents = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear_layers(problem: Problem) -> dict[str, tuple[nn.Linear, list[str]]]:
    """Module name -> (layer, its studied parameter names) for the linear layers eligible for the first route."""
    owners = Counter(id(p) for _, p in problem.model.named_parameters(remove_duplicate=False))
    layers = {}
    for module_name, names in problem.module_blocks():
        module = problem.model.get_submodule(module_name)
        if type(module) is nn.Linear and all(owners[id(p)] == 1 for p in module.parameters(recurse=False)):
            layers[module_name] = (module, names)
    return layers


def _probed_forward(problem: Problem, X, layers: dict):
    """``f(θ, X)`` with its pullback to zero probes on the layers' outputs, their inputs, and the layers that qualified."""
    size = batch_size(X)
    calls = Counter()
    probes = {name: torch.zeros(size, module.out_features, dtype=problem.dtype, device=problem.device)
              for name, (module, _) in layers.items()}

    def forward(probes):
        inputs = {}

        def hook_for(name):
            def add_probe(module, args, output):
                calls[name] += 1
                if calls[name] == 1 and len(args) == 1 and args[0].ndim == 2 and args[0].shape[0] == size:
                    inputs[name] = args[0]
                    return output + probes[name]
                return None
            return add_probe

        handles = [module.register_forward_hook(hook_for(name)) for name, (module, _) in layers.items()]
        try:
            return problem.forward(problem.params, X), inputs
        finally:
            for handle in handles:
                handle.remove()

    output, pullback, inputs = vjp(forward, probes, has_aux=True)
    qualified = [name for name in inputs if calls[name] == 1]
    return output, pullback, inputs, qualified


def _linear_squares(pullback, inputs, cotangents: torch.Tensor, layers: dict,
                    qualified: list[str]) -> dict[str, torch.Tensor]:
    summed = {}
    for part in cotangents.split(DIRECTIONS_PER_PASS):
        errors = vmap(lambda u: pullback(u)[0])(part)
        for name in qualified:
            e2 = errors[name].square().sum(0)
            summed[name] = e2 if name not in summed else summed[name].add_(e2)
    squares = {}
    for name in qualified:
        module, names = layers[name]
        e2 = summed[name]
        prefix = f"{name}." if name else ""
        if prefix + "weight" in names:
            squares[prefix + "weight"] = e2.T @ inputs[name].square()
        if prefix + "bias" in names:
            squares[prefix + "bias"] = e2.sum(0)
    return squares


def _per_example_squares(problem: Problem, X, cotangents: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    params = {name: problem.params[name] for name in names}

    def one(x, u):
        batch_of_one = {key: value.unsqueeze(0) for key, value in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)
        _, pullback = vjp(lambda p: problem.forward(p, batch_of_one)[0], params)
        return vmap(lambda c: pullback(c)[0])(u)

    size, count = batch_size(X), cotangents.shape[0]
    chunk = max(1, min(CHUNK_ENTRIES // (count * sum(p.numel() for p in params.values())),
                       DIRECTIONS_PER_PASS * size // count))
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    per_example = cotangents.movedim(1, 0)
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        grads = vmap(one)(example_slice(X, start, stop), per_example[start:stop])
        for name in names:
            squares[name] += grads[name].square().sum((0, 1))
    return squares


def squared_pullbacks(problem: Problem, cotangents: Cotangents) -> torch.Tensor:
    """``s = Σ_n Σ_m (J_nᵀ u_mn)²`` ``(P,)`` over all data (of all ranks), the ``u`` from ``cotangents(index, output, y)``.

    Args:
        problem: the model, data, loss and studied parameters.
        cotangents: for batch ``index`` with outputs ``output`` ``(N, *O)`` and targets ``y``, the
            ``M`` cotangents of every example as a ``(M, N, *O)`` tensor (``M`` may differ between batches).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.per_example import squared_pullbacks
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> prob = curvlab.Problem(model, (X, y))
        >>> s = squared_pullbacks(prob, lambda index, output, y: torch.ones_like(output)[None])
        >>> # J_nᵀ 1 is x_n in each row of the weight and 1 for each bias entry; 4 examples
        >>> bool(torch.allclose(s, torch.cat([X.square().sum(0).repeat(2), torch.full((2,), 4.0)])))
        True
    """
    layers = _linear_layers(problem)
    total = {name: torch.zeros_like(p) for name, p in problem.params.items()}
    with torch.no_grad(), differentiable_kernels():
        for index, X, y in problem.batches():
            if layers:
                output, pullback, inputs, qualified = _probed_forward(problem, X, layers)
            else:
                output, qualified = problem.forward(problem.params, X), []
            U = cotangents(index, output, y)
            squares = _linear_squares(pullback, inputs, U, layers, qualified) if qualified else {}
            rest = [name for name in problem.param_names if name not in squares]
            if rest:
                squares.update(_per_example_squares(problem, X, U, rest))
            for name, value in squares.items():
                total[name] += value
    return problem.reduce(problem.flatten(total))
