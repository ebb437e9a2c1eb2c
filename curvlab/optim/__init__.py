"""Every optimizer of OPTIMIZERS.md as a preconditioner (:mod:`curvlab.optim.base`) and as a ``torch.optim.Optimizer``.

``curvlab.optim.make(name, model, loss, lr, **hyperparameters)`` builds the optimizer;
``curvlab.optim.method(name, **hyperparameters)`` the :class:`Method` behind it (its preconditioner,
update rule and schedule), which :func:`curvlab.compare_steps` measures.
"""

import importlib
import inspect

from torch import nn

from curvlab.errors import InvalidProblem
from curvlab.optim.base import Preconditioner, Statistics, chain, identity
from curvlab.optim.optimizer import Method, PreconditionedOptimizer, one_shot

#: name -> "module:builder"; a builder takes the hyperparameters (not the learning rate) and returns a Method.
_BUILDERS = {
    "sgd": "adaptive:sgd",
    "adam": "adaptive:adam",
    "adamw": "adaptive:adamw",
    "adagrad": "adaptive:adagrad",
    "adahessian": "diagonal:adahessian",
    "sophia_g": "diagonal:sophia_g",
    "sophia_h": "diagonal:sophia_h",
    "shampoo": "shampoo:shampoo",
    "distributed_shampoo": "shampoo:distributed_shampoo",
    "soap": "soap:soap",
    "kfac": "kronecker:kfac",
    "skfac": "kronecker:skfac",
    "foof": "kronecker:foof",
    "ekfac": "kronecker:ekfac",
    "psgd_kron": "psgd:psgd_kron",
    "seng": "gram:seng",
    "smw_ng": "gram:smw_ng",
    "kbfgs": "kbfgs:kbfgs",
    "nlcg": "nlcg:nlcg",
    "newton": "exact:newton",
    "natural_gradient": "exact:natural_gradient",
}


def names() -> list[str]:
    """The names :func:`make` accepts."""
    return list(_BUILDERS)


def builder(name: str):
    """The function that turns ``name``'s hyperparameters into its :class:`Method`."""
    if name not in _BUILDERS:
        raise InvalidProblem(f"unknown optimizer {name!r}; choose one of {', '.join(_BUILDERS)}")
    module, function = _BUILDERS[name].split(":")
    return getattr(importlib.import_module(f"curvlab.optim.{module}"), function)


def hyperparameters(name: str) -> dict[str, object]:
    """``name``'s hyperparameters (besides ``lr``) and their defaults."""
    return {key: p.default for key, p in inspect.signature(builder(name)).parameters.items()}


def method(name: str, **hyperparameters_) -> Method:
    """``name``'s :class:`Method` with the given hyperparameters (unknown ones are refused, naming the valid ones)."""
    build = builder(name)
    unknown = sorted(set(hyperparameters_) - set(inspect.signature(build).parameters))
    if unknown:
        valid = ", ".join(hyperparameters(name)) or "none"
        raise InvalidProblem(f"{name} has no hyperparameter {', '.join(unknown)}; its hyperparameters are: {valid}")
    return build(**hyperparameters_)


def make(name: str, model: nn.Module, loss="cross_entropy", lr: float = 0.1, *, params=None, reduction: str = "mean",
         seed: int = 0, process_group=None, spread_inversions: bool = False, one_pass: bool = False,
         **hyperparameters_) -> PreconditionedOptimizer:
    """The optimizer ``name`` on ``model``'s parameters (all trainable ones, or those ``params`` selects).

    Args:
        name: one of :func:`names`.
        model: the module to train.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce"`` or the ``torch.nn`` loss module.
        lr: the learning rate ``η`` (``param_groups[0]["lr"]``, so torch's schedulers apply).
        params: ``None``, a list of parameter names or a regex, as for :class:`curvlab.Problem`.
        reduction: ``"mean"`` or ``"sum"``.
        seed: fixes every random draw of the method (sampled labels, probes, sketches).
        process_group, spread_inversions: data-parallel training (:class:`PreconditionedOptimizer`).
        one_pass: SMW-NG's, SENG's and PSGD-Newton's curvature-update steps from one pass of the model
            (:class:`PreconditionedOptimizer`).
        **hyperparameters_: the method's own (:func:`hyperparameters`).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = curvlab.optim.make("adam", model, lr=1e-2)
        >>> loss = opt.step((torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> sorted(opt.last_direction)
        ['bias', 'weight']
    """
    return PreconditionedOptimizer(model, method(name, **hyperparameters_), loss, lr, params=params,
                                   reduction=reduction, seed=seed, name=name, process_group=process_group,
                                   spread_inversions=spread_inversions, one_pass=one_pass)


__all__ = ["Method", "PreconditionedOptimizer", "Preconditioner", "Statistics", "builder", "chain",
           "hyperparameters", "identity", "make", "method", "names", "one_shot"]
