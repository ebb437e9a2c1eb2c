"""Forward hooks on a problem's layers that record each one's input and perturb its output.

A zero perturbation ``δ`` added to a layer's output ``s`` gives ``∂L/∂δ = ∂L/∂s``: a gradient or a
vector-Jacobian product with respect to the perturbations yields the layers' output gradients
without computing any weight gradient. :class:`TappedLayers` chooses the layers (not tied to another
module, run exactly once per forward pass) and keeps their output shapes per input shape, from a
pass on the ``meta`` device, which does no arithmetic.
"""

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from curvlab.errors import InvalidProblem
from curvlab.problem import Problem, batch_size, differentiable_kernels


def shared_parameters(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` lists them) of the parameters that more than one module holds (weight tying)."""
    holders: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(name)
    return {names[0] for names in holders.values() if len(names) > 1}


def _to_meta(value):
    if isinstance(value, Mapping):
        return {key: _to_meta(item) for key, item in value.items()}
    return torch.empty_like(value, device="meta")


def _meta_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` as a ``meta`` tensor, for a forward pass without arithmetic."""
    return _to_meta(dict(model.named_parameters()) | dict(model.named_buffers()))


class Taps:
    """Forward hooks on the tapped layers; record inputs, output shapes and calls, and add perturbations."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = layers
        self.perturbations: Mapping[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self.calls: dict[str, int] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self, perturbations: Mapping[str, torch.Tensor]) -> None:
        self.perturbations = perturbations
        self.inputs, self.shapes, self.calls = {}, {}, {}

    def check(self, index: int) -> None:
        """Raises :class:`curvlab.InvalidProblem` unless every tapped layer ran exactly once on batch ``index``."""
        irregular = [name for name in self.layers if self.calls.get(name) != 1 or name not in self.inputs]
        if irregular:
            raise InvalidProblem(
                f"batch {index}: layer(s) {', '.join(irregular)} did not run exactly once as on the first batch; "
                f"give batches on which the model runs the same layers"
            )

    def _hook(self, name: str):
        def hook(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if not args or not isinstance(output, torch.Tensor):
                return output
            self.inputs[name] = args[0]
            self.shapes[name] = (args[0].shape, output.shape)
            return output + self.perturbations[name] if name in self.perturbations else output
        return hook


def layer_shapes(problem: Problem, taps: Taps, X) -> tuple[dict, dict]:
    """Input/output shapes and call counts of the tapped layers on batch ``X``, without arithmetic.

    The forward pass runs on the ``meta`` device; a model it cannot run there (an operator without a
    meta kernel, or control flow on values) is run for real once, without gradients.
    """
    taps.reset({})
    try:
        problem.forward(_meta_values(problem.model), _to_meta(X))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        taps.reset({})
        with torch.no_grad():
            problem.forward(problem.params, X)
    return dict(taps.shapes), dict(taps.calls)


class _ParameterReads(TorchDispatchMode):
    """Records the modules whose parameters an operation reads outside the module's own call."""

    def __init__(self, owners: dict[int, str]):
        super().__init__()
        self.owners, self.inside, self.outside = owners, set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            owner = self.owners.get(id(leaf))
            if owner is not None and owner not in self.inside:
                self.outside.add(owner)
        return func(*args, **kwargs)


def read_elsewhere(problem: Problem, layers: Mapping[str, nn.Module], X) -> set[str]:
    """The names in ``layers`` whose parameters the forward pass on ``X`` reads outside the layer's own call.

    Found on the ``meta`` device (for real, without gradients, when the model cannot run there): a
    dispatch mode sees every operation's operands while hooks mark which layer is running.
    """
    owned = {name: [f"{name}.{local}" if name else local for local, _ in module.named_parameters(recurse=False)]
             for name, module in layers.items()}
    for values, inputs in ((_meta_values(problem.model), _to_meta(X)), (problem.params, X)):
        reads = _ParameterReads({id(values[full]): name for name, names in owned.items() for full in names
                                 if full in values})
        hooks = [hook for name, module in layers.items() for hook in (
            module.register_forward_pre_hook(lambda *_, name=name: reads.inside.add(name)),
            module.register_forward_hook(lambda *_, name=name: reads.inside.discard(name)))]
        try:
            with reads, torch.no_grad():
                problem.forward(values, inputs)
            return reads.outside
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            continue
        finally:
            for hook in hooks:
                hook.remove()
    return set(layers)


def _shape_key(X) -> tuple:
    if isinstance(X, Mapping):
        return tuple((key, tuple(value.shape)) for key, value in sorted(X.items()))
    return tuple(X.shape)


class TappedLayers:
    """The modules of a problem whose outputs are tapped, and the zero perturbations of their outputs.

    A module qualifies when ``accept(module, names)`` holds for it and its studied parameter names, it
    holds no parameter that another module also holds (weight tying), it is called exactly once per
    forward pass with a tensor output (checked on the first batch), and :meth:`fits` its shapes. With
    ``exclusive``, the forward pass must also read its parameters only inside its own call
    (:func:`read_elsewhere`).

    Attributes:
        modules: module name -> module, in ``problem.module_blocks()`` order.
    """

    def __init__(self, problem: Problem, accept: Callable[[nn.Module, list[str]], bool], exclusive: bool = False):
        self.problem = problem
        named = dict(problem.model.named_modules())
        shared = shared_parameters(problem.model)
        candidates = {name: named[name] for name, names in problem.module_blocks()
                      if accept(named[name], names) and not shared.intersection(names)}
        self.modules: dict[str, nn.Module] = {}
        self._output_shapes: dict[tuple, dict[str, torch.Size]] = {}
        if not candidates:
            return
        _, X, _ = next(iter(problem.batches()))
        with Taps(candidates) as taps, differentiable_kernels():
            shapes, calls = layer_shapes(problem, taps, X)
        self.modules = {name: module for name, module in candidates.items()
                        if calls.get(name) == 1 and name in shapes and self.fits(module, *shapes[name], batch_size(X))}
        if exclusive and self.modules:
            with differentiable_kernels():  # the kernels the products run, which may read other parameters
                elsewhere = read_elsewhere(problem, self.modules, X)
            self.modules = {name: module for name, module in self.modules.items() if name not in elsewhere}
        self._output_shapes[_shape_key(X)] = {name: shapes[name][1] for name in self.modules}

    def fits(self, module: nn.Module, input_shape: torch.Size, output_shape: torch.Size, size: int) -> bool:
        """Whether a candidate with these shapes on a first batch of ``size`` examples is tapped (here: always)."""
        return True

    def perturbations(self, taps: Taps, X) -> dict[str, torch.Tensor]:
        """Zeros of every tapped layer's output shape on batch ``X`` (new input shapes: a ``meta`` pass through ``taps``)."""
        key = _shape_key(X)
        if key not in self._output_shapes:
            shapes, _ = layer_shapes(self.problem, taps, X)
            self._output_shapes[key] = {name: shapes[name][1] for name in self.modules if name in shapes}
        problem = self.problem
        return {name: torch.zeros(shape, dtype=problem.dtype, device=problem.device)
                for name, shape in self._output_shapes[key].items()}
