"""Test accuracy against batch size after a hyperparameter search: the seed study's second experiment.

For each optimizer and batch size ``B``, every point of a small grid over the learning rate (and the
damping, for methods that have one) trains the task's model from the same initialisation for a fixed
number of epochs (``⌈N/B⌉`` steps each, the examples reshuffled every epoch), once per seed; the test
accuracy is measured after every epoch. The best grid point per batch size is the one with the highest
final test accuracy averaged over the seeds, among the points none of whose runs diverged (a loss that
is not finite, or a factorisation that fails after the first step, stops a run and marks it diverged).
"""

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from curvlab import optim, tasks
from curvlab.errors import InvalidProblem, require_integer
from curvlab.figures import png

#: The study's optimizers, as label -> (curvlab.optim name, hyperparameters). K-FAC "local" uses the
#: factors of the current batch alone, "global" an exponential moving average of them (OPTIMIZERS.md §1).
DEFAULT_OPTIMIZERS = {
    "sgd": ("sgd", {"momentum": 0.9}),
    "adamw": ("adamw", {}),
    "adahessian": ("adahessian", {}),
    "kfac_local": ("kfac", {}),
    "kfac_global": ("kfac", {"ema_decay": 0.05}),
    "foof": ("foof", {}),
    "psgd": ("psgd_kron", {}),
    "shampoo": ("shampoo", {}),
    "seng": ("seng", {}),
}
_SECOND_ORDER_LR = (0.01, 0.03, 0.1)
_DAMPINGS = (1e-3, 1e-2)
#: The grid searched per batch size when none is given: by optimizer name of curvlab.optim.
DEFAULT_GRIDS = {
    "sgd": {"lr": (0.01, 0.03, 0.1)},
    "adam": {"lr": (1e-3, 3e-3, 1e-2)},
    "adamw": {"lr": (1e-3, 3e-3, 1e-2)},
    "adagrad": {"lr": (3e-3, 1e-2, 3e-2)},
    "adahessian": {"lr": (0.03, 0.1, 0.3)},
    "sophia_g": {"lr": (1e-3, 3e-3, 1e-2)},
    "sophia_h": {"lr": (1e-3, 3e-3, 1e-2)},
    "soap": {"lr": (1e-3, 3e-3, 1e-2)},
    "distributed_shampoo": {"lr": (1e-3, 3e-3, 1e-2)},
    "nlcg": {"lr": (0.01, 0.03, 0.1)},
}
#: Batch sizes and epochs per scale.
BATCH_SIZES = {"cpu": (32, 128, 512), "full": (32, 128, 512, 2048, 8192)}
EPOCHS = {"cpu": 3, "full": 50}

#: Columns of the two tables, with their meaning.
COLUMNS = {
    "accuracy": {
        "task": {"meaning": "the task (curvlab.tasks)"},
        "optimizer": {"meaning": "the optimizer's label"},
        "method": {"meaning": "its curvlab.optim name"},
        "batch_size": {"meaning": "examples per step"},
        "lr": {"meaning": "the learning rate of the best grid point"},
        "damping": {"meaning": "the damping of the best grid point (— where the method has none)"},
        "test_accuracy": {"meaning": "final test accuracy of the best grid point, mean over seeds"},
        "test_accuracy_std": {"meaning": "its standard deviation over seeds (0 for one seed)"},
        "diverged_points": {"meaning": "grid points at this batch size with a diverged run"},
    },
    "accuracy_runs": {
        "task": {"meaning": "the task"},
        "optimizer": {"meaning": "the optimizer's label"},
        "method": {"meaning": "its curvlab.optim name"},
        "batch_size": {"meaning": "examples per step"},
        "lr": {"meaning": "learning rate"},
        "damping": {"meaning": "damping (— where the method has none)"},
        "seed": {"meaning": "seed of the initialisation, the shuffling and the optimizer"},
        "epochs": {"meaning": "epochs completed"},
        "final_test_accuracy": {"meaning": "test accuracy after the last completed epoch"},
        "best_test_accuracy": {"meaning": "the highest test accuracy after any epoch"},
        "final_train_loss": {"meaning": "mean training loss of the last epoch"},
        "diverged": {"meaning": "the loss became non-finite (the run was stopped)"},
        "seconds": {"meaning": "wall time of the run", "unit": "s"},
    },
}


@dataclass(frozen=True)
class ConvergenceStudy:
    """The result of :func:`convergence_study`.

    Attributes:
        runs: one row per optimizer, batch size, grid point and seed (:data:`COLUMNS` ``accuracy_runs``).
        best: per optimizer and batch size, the best grid point (:data:`COLUMNS` ``accuracy``).
        facts: the task, scale, epochs, grids, seeds, device and torch version.
    """

    runs: pd.DataFrame
    best: pd.DataFrame
    facts: dict


def _configurations(optimizers) -> dict[str, tuple[str, dict]]:
    if optimizers is None:
        return dict(DEFAULT_OPTIMIZERS)
    if isinstance(optimizers, Mapping):
        configurations = {label: (name, dict(options)) for label, (name, options) in optimizers.items()}
    else:
        configurations = {name: (name, {}) for name in optimizers}
    unknown = sorted({name for name, _ in configurations.values()} - set(optim.names()))
    if unknown or not configurations:
        raise InvalidProblem(f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; choose among "
                             f"{', '.join(optim.names())}")
    return configurations


def default_grid(name: str) -> dict[str, tuple[float, ...]]:
    """The grid searched for optimizer ``name``: :data:`DEFAULT_GRIDS`, else the second-order grid (with damping if it has one)."""
    if name in DEFAULT_GRIDS:
        return DEFAULT_GRIDS[name]
    grid = {"lr": _SECOND_ORDER_LR}
    if "damping" in optim.hyperparameters(name) and name != "shampoo":  # Shampoo's damping is a relative ridge
        grid["damping"] = _DAMPINGS
    return grid


def _accuracy(model, X: torch.Tensor, y: torch.Tensor) -> float:
    training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(X[start:start + 1024]).argmax(-1) == y[start:start + 1024]).sum())
                      for start in range(0, len(y), 1024))
    model.train(training)
    return correct / len(y)


def _train(task: tasks.Task, name: str, options: dict, size: int, epochs: int, seed: int, device, dtype) -> dict:
    """One run: ``epochs`` epochs of ``opt.step`` on shuffled batches of ``size``; accuracy after each epoch."""
    start = time.perf_counter()
    model = task.build_model(seed).to(device=device, dtype=dtype).train()
    opt = optim.make(name, model, seed=seed, **options)
    X, y = task.X_train.to(device=device, dtype=dtype), task.y_train.to(device)
    X_test, y_test = task.X_test.to(device=device, dtype=dtype), task.y_test.to(device)
    accuracies, loss, diverged, completed = [], math.nan, False, 0
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)
        losses = []
        try:
            for first in range(0, len(y), size):
                index = order[first:first + size]
                losses.append(opt.step((X[index], y[index])))
                if not math.isfinite(losses[-1]):
                    break
        except (torch.linalg.LinAlgError, InvalidProblem):
            if opt.steps == 0:
                raise  # the method cannot run on this task at all: not a divergence
            losses.append(math.nan)  # a factorisation failed on exploding statistics
        if not all(math.isfinite(value) for value in losses) or not all(
                torch.isfinite(p).all() for p in model.parameters()):
            diverged = True
            break
        loss = float(np.mean(losses))
        accuracies.append(_accuracy(model, X_test, y_test))
        completed = epoch + 1
    return {"epochs": completed, "final_test_accuracy": accuracies[-1] if accuracies else math.nan,
            "best_test_accuracy": max(accuracies) if accuracies else math.nan, "final_train_loss": loss,
            "diverged": diverged, "seconds": time.perf_counter() - start}


def convergence_study(task: str = "mnist1d", optimizers=None, batch_sizes: Iterable[int] | None = None,
                      epochs: int | None = None, grid: Mapping[str, Mapping] | None = None,
                      seeds: Iterable[int] = (0,), scale: str = "cpu", device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32, progress: bool = False) -> ConvergenceStudy:
    """Best test accuracy per optimizer and batch size after a grid search (module docstring).

    Args:
        task: a name of :data:`curvlab.tasks.TASKS`.
        optimizers: ``None`` (:data:`DEFAULT_OPTIMIZERS`, the study's), names of :func:`curvlab.optim.names`,
            or label -> (name, hyperparameters).
        batch_sizes, epochs: default :data:`BATCH_SIZES` and :data:`EPOCHS` of the scale.
        grid: label -> ``{"lr": [...], "damping": [...]}`` replacing that label's default grid
            (:func:`default_grid`).
        seeds: each grid point is trained once per seed (initialisation, shuffling, optimizer draws).
        scale: ``"cpu"`` or ``"full"`` (the task's data and model sizes, and the defaults above).
        device, dtype: where and in what precision to train (default: the CPU, float32).
        progress: show a progress bar over the runs.

    Examples:
        >>> study = convergence_study("mnist1d", optimizers=["sgd"], batch_sizes=[1000], epochs=1,
        ...                           grid={"sgd": {"lr": [0.1]}})
        >>> study.best[["optimizer", "batch_size", "lr"]].values.tolist()
        [['sgd', 1000, 0.1]]
    """
    if scale not in tasks.SCALES:
        raise InvalidProblem(f"unknown scale {scale!r}; choose one of {', '.join(tasks.SCALES)}")
    configurations = _configurations(optimizers)
    sizes = tuple(BATCH_SIZES[scale] if batch_sizes is None else batch_sizes)
    if not sizes:
        raise InvalidProblem("batch_sizes is empty; give at least one batch size")
    sizes = tuple(require_integer("batch size", size) for size in sizes)
    epochs = require_integer("epochs", EPOCHS[scale] if epochs is None else epochs)
    seeds = tuple(require_integer("seed", seed, minimum=0) for seed in seeds)
    if not seeds:
        raise InvalidProblem("seeds is empty; give at least one seed")
    grid = dict(grid or {})
    unknown = sorted(set(grid) - set(configurations))
    if unknown:
        raise InvalidProblem(f"grid given for {', '.join(unknown)}, which is not among the optimizers "
                             f"({', '.join(configurations)})")
    grids = {label: {key: tuple(values) for key, values in (grid.get(label) or default_grid(name)).items()}
             for label, (name, _) in configurations.items()}
    for label, points in grids.items():
        if set(points) - {"lr", "damping"} or not points.get("lr"):
            raise InvalidProblem(f"the grid of {label} must give a non-empty 'lr' list and optionally 'damping'")
    device = torch.device(device) if device is not None else torch.device("cpu")
    data = tasks.task(task, scale, seeds[0])
    runs = []
    total = sum(len(sizes) * len(seeds) * math.prod(len(values) for values in points.values())
                for points in grids.values())
    bar = tqdm(total=total, desc=f"accuracy on {task}", disable=not progress, leave=False)
    for label, (name, base) in configurations.items():
        points = grids[label]
        for size, lr, damping in itertools.product(sizes, points["lr"], points.get("damping", (None,))):
            for seed in seeds:
                options = {**base, "lr": lr} | ({"damping": damping} if damping is not None else {})
                result = _train(data, name, options, size, epochs, seed, device, dtype)
                runs.append({"optimizer": label, "method": name, "batch_size": size, "lr": lr,
                             "damping": math.nan if damping is None else damping, "seed": seed, **result})
                bar.update()
    bar.close()
    table = pd.DataFrame(runs, columns=[column for column in COLUMNS["accuracy_runs"] if column != "task"])
    facts = {"task": data.description, "scale": scale, "epochs": epochs, "batch sizes": list(sizes),
             "seeds": list(seeds), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
             "torch": torch.__version__,
             "grids": {label: {key: list(values) for key, values in points.items()} for label, points in grids.items()},
             "optimizers": {label: {"method": name, **base} for label, (name, base) in configurations.items()}}
    return ConvergenceStudy(table, best_points(table), facts)


def best_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and batch size, the grid point with the highest mean final test accuracy over seeds, among those without a diverged run."""
    keys = ["optimizer", "method", "batch_size", "lr", "damping"]
    points = runs.assign(damping=runs["damping"].fillna(-1.0)).groupby(keys, sort=False).agg(
        test_accuracy=("final_test_accuracy", "mean"), test_accuracy_std=("final_test_accuracy", lambda x: float(
            np.std(x.to_numpy(dtype=float)))), diverged=("diverged", "any")).reset_index()
    points["damping"] = points["damping"].where(points["damping"] >= 0, math.nan)
    rows = []
    for (label, size), group in points.groupby(["optimizer", "batch_size"], sort=False):
        healthy = group[~group["diverged"]]
        row = {"optimizer": label, "method": group["method"].iloc[0], "batch_size": size, "lr": math.nan,
               "damping": math.nan, "test_accuracy": math.nan, "test_accuracy_std": math.nan}
        if not healthy.empty:
            best = healthy.loc[healthy["test_accuracy"].idxmax()]
            row |= {key: best[key] for key in ("lr", "damping", "test_accuracy", "test_accuracy_std")}
        rows.append(row | {"diverged_points": int(group["diverged"].sum())})
    return pd.DataFrame(rows, columns=[column for column in COLUMNS["accuracy"] if column != "task"])


def accuracy_figure(best: pd.DataFrame) -> bytes:
    """A PNG: the best test accuracy against the batch size (logarithmic), one line per optimizer."""
    missing = [column for column in ("optimizer", "batch_size", "test_accuracy") if column not in best.columns]
    if missing or best.empty:
        raise InvalidProblem("pass the best table of a convergence study (columns optimizer, batch_size, test_accuracy)")
    figure = Figure(figsize=(7.0, 4.4), dpi=100, layout="constrained")
    axes = figure.subplots()
    seaborn.lineplot(best, x="batch_size", y="test_accuracy", hue="optimizer", marker="o", ax=axes,
                     palette="tab10", hue_order=list(dict.fromkeys(best["optimizer"])))
    axes.set_xscale("log", base=2)
    axes.set(xlabel="batch size", ylabel="test accuracy (best grid point)",
             title="Test accuracy against batch size" + (f" · {best['task'].iloc[0]}" if "task" in best else ""))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    return png(figure)


def accuracy_findings(best: pd.DataFrame) -> list[str]:
    """Per task, a sentence on which optimizers lead at the smallest and at the largest batch size."""
    findings = []
    groups = best.groupby("task", sort=False) if "task" in best else [("the task", best)]
    for task, table in groups:
        table = table.dropna(subset=["test_accuracy"])
        if table.empty:
            continue
        small, large = table["batch_size"].min(), table["batch_size"].max()
        lead = {size: table[table["batch_size"] == size].sort_values("test_accuracy", ascending=False).iloc[0]
                for size in (small, large)}
        spread = table[table["batch_size"] == large]["test_accuracy"]
        findings.append(
            f"Accuracy on {task}: at batch {small} {lead[small]['optimizer']} leads with "
            f"{lead[small]['test_accuracy']:.3f}; at batch {large} {lead[large]['optimizer']} leads with "
            f"{lead[large]['test_accuracy']:.3f} (the optimizers span {spread.min():.3f}–{spread.max():.3f} there)."
        )
    return findings


__all__ = ["BATCH_SIZES", "COLUMNS", "ConvergenceStudy", "DEFAULT_GRIDS", "DEFAULT_OPTIMIZERS", "EPOCHS",
           "accuracy_figure", "accuracy_findings", "best_points", "convergence_study", "default_grid"]
