"""The seed study's two experiments on the built-in models, as one run and one report (``curvlab bench``).

Cost (:func:`curvlab.cost_study`) on the study's four architectures (:mod:`curvlab.models`) with random
inputs of their shape, and accuracy against batch size (:func:`curvlab.convergence_study`) on the offline
tasks (:mod:`curvlab.tasks`). ``scale="cpu"`` (the default) keeps every architecture but shrinks its
widths, batches and budgets so that the whole run takes minutes on a laptop CPU; ``scale="full"`` is the
study's size, for a GPU.
"""

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from curvlab import convergence, cost, cost_figures, models, report
from curvlab.compare import provenance, table_to_json
from curvlab.errors import InvalidProblem, require_integer

FORMAT = "curvlab.bench/1"
#: The architectures of the seed study.
DEFAULT_MODELS = ("mlp", "cnn", "resnet18", "vit_tiny")
#: The tasks of the accuracy study by default: MNIST-1D with the MLP (minutes on a CPU at CPU scale). The
#: CIFAR-like synthetic task with the CNN (``"cifar_like"``) takes about ten times longer.
DEFAULT_TASKS = ("mnist1d",)
#: Batch sizes of the cost sweep per scale (at full scale the sweep goes on until memory runs out).
BATCH_SIZES = {"cpu": (32, 64, 128, 256), "full": tuple(2 ** k for k in range(5, 14))}
SCALES = tuple(BATCH_SIZES)


@dataclass
class Bench:
    """The result of :func:`bench`.

    Attributes:
        tables: ``cost`` (:data:`curvlab.cost.COLUMNS`), ``accuracy`` (best test accuracy per task, optimizer
            and batch size) and ``accuracy_runs`` (every run of the grid); a study not run has no table.
        findings: what the tables show, in sentences.
        facts: the settings, the machine and the models of each study.
        provenance: versions and time of the run.
    """

    tables: dict[str, pd.DataFrame]
    findings: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything as a JSON-compatible dict: the contents of ``results.json``."""
        return {"format": FORMAT, "findings": self.findings, "facts": self.facts, "provenance": self.provenance,
                "columns": {"cost": cost.COLUMNS, **convergence.COLUMNS},
                "tables": {name: table_to_json(table) for name, table in self.tables.items()}}

    def to_html(self, directory: str | Path, force: bool = False, progress: bool = False) -> Path:
        """Write ``directory/index.html`` (self-contained), ``results.json`` and one CSV per table; returns ``index.html``.

        Written complete or not at all; an existing report is replaced only with ``force=True``.
        """
        report.check_target(directory, force)
        results = self.to_dict()
        costs = self.tables.get("cost")
        accuracy = self.tables.get("accuracy")
        drawings = []
        if costs is not None and bool((costs["status"] == "ok").any()):
            drawings += [("cost_time", lambda: cost_figures.ratio_figure(costs, "time_ratio")),
                         ("cost_phases", lambda: cost_figures.phase_figure(costs))]
            if np.isfinite(costs["memory_ratio"].to_numpy(dtype=float)).any():
                drawings.append(("cost_memory", lambda: cost_figures.ratio_figure(costs, "memory_ratio")))
        if accuracy is not None and not accuracy.empty:
            for task in dict.fromkeys(accuracy["task"]):
                drawings.append((f"accuracy_{task}",
                                 lambda task=task: convergence.accuracy_figure(accuracy[accuracy["task"] == task])))
        figures = {name: draw() for name, draw in tqdm(drawings, desc="figures", unit="figure", disable=not progress,
                                                      file=sys.stderr)}
        tasks = list(dict.fromkeys(accuracy["task"])) if accuracy is not None and not accuracy.empty else []
        html = report.render_page("bench.html.j2", results, self.tables, figures, tasks=tasks)
        contents = {"index.html": html, "results.json": report.to_json(results)} | report.table_csvs(self.tables)
        return report.write_report(directory, contents, force=force) / "index.html"


def bench(model_names: Iterable[str] | None = None, scale: str = "cpu", optimizers: Iterable[str] | None = None,
          batch_sizes: Iterable[int] | None = None, intervals: Iterable[int] = cost.DEFAULT_INTERVALS, repeats: int = 5,
          warmup: int = 1, tasks: Iterable[str] | None = None, convergence_options: Mapping | None = None,
          device: str | torch.device = "cpu", seed: int = 0, progress: bool = False, one_pass: bool = False) -> Bench:
    """The cost study on each built-in model and the convergence study on each task.

    Args:
        model_names: architectures of :data:`curvlab.models.STUDY_MODELS` whose cost is measured (default
            :data:`DEFAULT_MODELS`; ``()``: none).
        scale: ``"cpu"`` (reduced widths and budgets) or ``"full"`` (the study's).
        optimizers: of the cost study (default :data:`curvlab.cost.DEFAULT_OPTIMIZERS`).
        batch_sizes: of the cost study (default :data:`BATCH_SIZES` of the scale).
        intervals, repeats, warmup, one_pass: of the cost study.
        tasks: of :data:`curvlab.tasks.TASKS` for the convergence study (default :data:`DEFAULT_TASKS`;
            ``()``: none).
        convergence_options: further arguments of :func:`curvlab.convergence_study` (``optimizers``,
            ``batch_sizes``, ``epochs``, ``grid``, ``seeds``).
        device, seed: for both studies.
        progress: show progress bars (stderr).
    """
    if scale not in SCALES:
        raise InvalidProblem(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    model_names = list(DEFAULT_MODELS if model_names is None else model_names)
    tasks = list(DEFAULT_TASKS if tasks is None else tasks)
    if not model_names and not tasks:
        raise InvalidProblem("nothing to run: give at least one model (cost) or one task (convergence)")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidProblem("device 'cuda' was requested but torch sees no CUDA device; use device='cpu'")
    sizes = tuple(batch_sizes) if batch_sizes is not None else BATCH_SIZES[scale]
    names = list(optimizers) if optimizers is not None else list(cost.DEFAULT_OPTIMIZERS)
    tables, facts = {}, {"scale": scale, "device": str(device)}
    studies = []
    for name in model_names:
        model, about = models.study_model(name, scale=scale, seed=seed)
        model = model.to(device)
        generator = torch.Generator().manual_seed(seed)
        count = max(require_integer("batch size", size) for size in sizes)
        X = torch.randn((count, *about.input_shape), generator=generator)
        y = torch.randint(about.classes, (count,), generator=generator)
        studies.append(cost.cost_study(model, (X, y), optimizers=names, batch_sizes=sizes, intervals=intervals,
                                       repeats=repeats, warmup=warmup, device=device, seed=seed, label=name,
                                       progress=progress, one_pass=one_pass))
        facts[f"cost: {name}"] = f"{about.describe(model, scale)}; random inputs {tuple(about.input_shape)}, {about.classes} classes"
    if studies:
        tables["cost"] = pd.concat([study.table for study in studies], ignore_index=True)
        shared = {key: value for key, value in studies[0].facts.items()
                  if key not in ("model", "parameters", "hyperparameters")}
        facts |= {f"cost {key}": value for key, value in shared.items()}
        if one_pass:
            facts["cost: one pass"] = ", ".join(name for name, values in studies[0].facts["hyperparameters"].items()
                                                if values.get("one_pass")) or "none of the optimizers measured"
    runs, best = [], []
    for task in tasks:
        study = convergence.convergence_study(task=task, scale=scale, device=device, progress=progress,
                                              **{"seeds": (seed,)} | dict(convergence_options or {}))
        runs.append(study.runs.assign(task=task))
        best.append(study.best.assign(task=task))
        facts |= {f"accuracy: {task} {key}": value for key, value in study.facts.items()}
    if tasks:
        tables["accuracy"] = _task_first(pd.concat(best, ignore_index=True))
        tables["accuracy_runs"] = _task_first(pd.concat(runs, ignore_index=True))
    findings = []
    if "cost" in tables:
        findings += cost.cost_findings(tables["cost"])
    if "accuracy" in tables:
        findings += convergence.accuracy_findings(tables["accuracy"])
    return Bench(tables, findings, facts, provenance(seed))


def _task_first(table: pd.DataFrame) -> pd.DataFrame:
    return table[["task", *(column for column in table.columns if column != "task")]]


__all__ = ["BATCH_SIZES", "Bench", "DEFAULT_MODELS", "DEFAULT_TASKS", "SCALES", "bench"]
