"""The analysis run behind ``curvlab compare``: every exact curvature matrix of one problem, side by side.

For each kind, within the memory budget the dense ``(P, P)`` matrix ``C`` is built with
``op.to_dense()``, symmetrised and diagonalised in float64 with :func:`torch.linalg.eigvalsh`: its
trace, every eigenvalue, the derived quantities of :mod:`curvlab.spectra.summary` and the spectra of
its diagonal (per-layer) blocks are exact. Beyond the budget the same quantities are estimated
matrix-free: the top eigenpairs by Lanczos (with residuals and converged flags), the trace by Hutch++
(with its standard error), the density and the counts by SLQ, each layer's trace and largest
eigenvalue from products with its block. Every kind also gets its SLQ density, which the report
draws over the dense eigenvalues where those exist, so that its accuracy is visible. The ``how``
column of each table says how every number was obtained.
"""

import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import wasserstein_distance
from tqdm.auto import tqdm

from curvlab import cost_figures, optim, report, step_figures
from curvlab.cost import COLUMNS as COST_COLUMNS, cost_findings, cost_study
from curvlab.approx import APPROXIMATIONS, Approximation, approximate, options_of
from curvlab.errors import CurvlabError, DenseTooLarge, InvalidProblem, require_integer
from curvlab.metrics import approximation_error
from curvlab.operators import KINDS, AbsHessian, DenseMatrix, curvature
from curvlab.problem import Problem
from curvlab.spectra import Spectrum, spectral_summary, spectrum, trace
from curvlab.spectra.blocks import blocks_of
from curvlab.steps import compare_steps

#: The kinds :func:`compare` studies by default: every exact kind except ``fisher``, which equals ``ggn``.
DEFAULT_KINDS = ("hessian", "abs_hessian", "ggn", "fisher_mc", "empirical_fisher")

FORMAT = "curvlab.compare/2"

#: The approximations :func:`compare` measures by default, each against the curvature it stands for. The
#: others are available through ``approximations=``; Shampoo's target, the gradient second moment, has
#: the rank of the number of batches, which for one analysis batch makes the comparison degenerate.
DEFAULT_APPROXIMATIONS = ("diag", "kfac", "ekfac", "foof")

#: The optimizers whose one-shot steps :func:`compare` measures by default: all of them.
DEFAULT_OPTIMIZERS = tuple(optim.names())

#: The kinds whose dense matrices :func:`compare` hands on to the steps' reference and exact methods (the
#: Monte-Carlo Fisher is left out: an optimizer draws its labels with its own seed).
SHARED_WITH_STEPS = ("hessian", "ggn", "fisher", "empirical_fisher")

#: Options of the approximations in :func:`compare` (the others use their builders' defaults).
APPROXIMATION_OPTIONS = {"diag_hutchinson": {"samples": 10}, "lowrank": {"k": 20, "unconverged": "warn"},
                         "psgd_kron": {"iterations": 1000}}

#: The damping δ of the damped condition number κ_δ: the study's default damping.
DAMPING = 1e-3

CURVATURE_UNIT = "loss / parameter²"

COLUMNS = {
    "summary": {
        "quantity": {"meaning": "what is described"},
        "value": {"meaning": "its value"},
        "unit": {"meaning": "unit of the value, where it has one"},
    },
    "parameters": {
        "parameter": {"meaning": "name in model.named_parameters()"},
        "module": {"meaning": "the module that owns it"},
        "shape": {"meaning": "tensor shape"},
        "count": {"meaning": "number of scalar parameters", "unit": "parameters"},
    },
    "spectra": {
        "kind": {"meaning": "curvature matrix C (see the notes)"},
        "status": {"meaning": "'dense' (exact numbers), 'matrix-free' (estimates), or why a row has no numbers"},
        "trace": {"meaning": "tr C = Σᵢ Cᵢᵢ", "unit": CURVATURE_UNIT},
        "trace_std_error": {"meaning": "standard error of the trace (0 when exact)", "unit": CURVATURE_UNIT},
        "lambda_max": {"meaning": "largest eigenvalue", "unit": CURVATURE_UNIT},
        "lambda_min": {"meaning": "smallest eigenvalue", "unit": CURVATURE_UNIT},
        "condition_positive": {"meaning": "κ₊ = λ_max / λ_min⁺, λ_min⁺ the smallest eigenvalue above the tolerance "
                                          "(dense only)"},
        "condition_damped": {"meaning": f"κ_δ = (λ_max + δ) / (λ_min + δ) with δ = {DAMPING:g}; "
                                        "inf when C + δI is not positive definite"},
        "negative": {"meaning": "eigenvalues below −tolerance (an SLQ estimate when matrix-free)",
                     "unit": "eigenvalues"},
        "negative_mass": {"meaning": "Σ|λ₋| / Σ|λ|, the share of the spectrum's mass below −tolerance"},
        "zero": {"meaning": "eigenvalues within ±tolerance (numerically zero; dense only)", "unit": "eigenvalues"},
        "effective_rank": {"meaning": "exp(−Σ pᵢ log pᵢ), pᵢ = |λᵢ| / Σ|λ| (Roy & Vetterli 2007)"},
        "tolerance": {"meaning": "P · ε · max|λ| (dense) or 10⁻⁶ max|θ| (SLQ), ε the machine epsilon of the "
                                 "problem's dtype", "unit": CURVATURE_UNIT},
        "asymmetry": {"meaning": "‖C − Cᵀ‖_F / ‖C‖_F of the dense matrix before symmetrising"},
        "slq_error": {"meaning": "1-Wasserstein distance between the SLQ density and the dense eigenvalues, "
                                 "over the spectral range"},
        "products": {"meaning": "operator-vector products behind this row (dense: the P that build the matrix; "
                                 "SLQ products not included)",
                     "unit": "products"},
        "seconds": {"meaning": "wall-clock time of this row's numbers (dense matrix and eigvalsh, or the "
                               "estimators)", "unit": "s"},
        "how": {"meaning": "how the numbers were obtained"},
    },
    "top_eigenvalues": {
        "kind": {"meaning": "curvature matrix C"},
        "rank": {"meaning": "i, counted from the largest eigenvalue (1 = λ_max)"},
        "eigenvalue": {"meaning": "λᵢ", "unit": CURVATURE_UNIT},
        "residual": {"meaning": "‖C v − λ v‖ / max(|λ|, 10⁻³ ‖C‖₂) of the eigenpair"},
        "converged": {"meaning": "residual ≤ the tolerance asked for (always for dense)"},
        "how": {"meaning": "dense eigh, or Lanczos with its products and seed"},
    },
    "approximations": {
        "approximation": {"meaning": "structured approximation A (see the notes)"},
        "curvature": {"meaning": "the exact matrix C it stands for"},
        "rel_fro": {"meaning": "‖A − C‖_F / ‖C‖_F"},
        "rel_fro_scaled": {"meaning": "min_α ‖αA − C‖_F / ‖C‖_F (a preconditioner's scale is absorbed by the "
                                      "learning rate)"},
        "scale": {"meaning": "the best α = ⟨A, C⟩_F / ‖A‖_F²"},
        "cos_fro": {"meaning": "⟨A, C⟩_F / (‖A‖_F ‖C‖_F)"},
        "rel_spectral": {"meaning": "‖A − C‖₂ / ‖C‖₂"},
        "overlap_at_k": {"meaning": "‖U_Aᵀ U_C‖_F² / k for the top-k eigenvectors by |λ| (a tie across the k-th "
                                    "place averaged: the Frobenius cosine of the two projectors)"},
        "inverse_action": {"meaning": "‖(A + δI)⁻¹v − (C + δI)⁻¹v‖ / ‖(C + δI)⁻¹v‖, mean over random v"},
        "inverse_action_gradient": {"meaning": "the same for v = ∇L, the gradient"},
        "damping": {"meaning": "δ of the inverse errors: 10⁻³ ‖C‖_F / √P", "unit": CURVATURE_UNIT},
        "mode": {"meaning": "'dense' (exact) or 'randomized' (estimates, standard errors in results.json)"},
        "seconds": {"meaning": "wall-clock time to build A", "unit": "s"},
    },
    "approximation_modules": {
        "approximation": {"meaning": "structured approximation A"},
        "module": {"meaning": "module owning the block's parameters"},
        "rel_fro_scaled": {"meaning": "min_α ‖αA_mm − C_mm‖_F / ‖C_mm‖_F over the module's diagonal block"},
        "cos_fro": {"meaning": "⟨A_mm, C_mm⟩_F / (‖A_mm‖_F ‖C_mm‖_F)"},
    },
    "steps": {
        "optimizer": {"meaning": "the optimizer (curvlab.optim.names())"},
        "block": {"meaning": "'all' (the whole model) or the module whose entries the row restricts to"},
        "mode": {"meaning": "'one_shot' (P⁻¹g, state built on the data) or 'trajectory' (applied step)"},
        "step": {"meaning": "the training step measured (trajectory mode; 0 in one-shot mode)"},
        "lr": {"meaning": "learning rate η of the optimizer"},
        "cos_natural_gradient": {"meaning": "cos(d, (G + λI)⁻¹g), G the GGN"},
        "cos_newton_abs": {"meaning": "cos(d, (|H| + λI)⁻¹g)"},
        "cos_newton": {"meaning": "cos(d, (H + λI)⁻¹g); missing where H + λI is not positive definite"},
        "norm_ratio": {"meaning": "‖d‖ / ‖d_ref‖ for the reference step"},
        "alpha_star": {"meaning": "α* = gᵀd / dᵀHd, the best scalar step of the quadratic model"},
        "quadratic_decrease": {"meaning": "(gᵀd)² / (2dᵀHd): the exact quadratic model's decrease at α* (inf where "
                                          "dᵀHd ≤ 0)", "unit": "loss"},
        "reference_quadratic_decrease": {"meaning": "the same for the reference step", "unit": "loss"},
        "quadratic_decrease_ratio": {"meaning": "quadratic_decrease / reference_quadratic_decrease (missing where "
                                                "either is infinite)"},
        "newton_positive_definite": {"meaning": "whether H + λI is positive definite"},
        "line_search_alpha": {"meaning": "step size α chosen by the line search along −d"},
        "loss_change": {"meaning": "L(θ − αd) − L(θ) on all the data", "unit": "loss"},
        "sharpness": {"meaning": "λ_max(P⁻¹H), the preconditioned sharpness"},
        "sharpness_method": {"meaning": "how the sharpness was computed, or why it is missing"},
        "threshold_2_over_lr": {"meaning": "2/η, the stability threshold of plain gradient descent"},
        "stability_threshold": {"meaning": "the method's threshold with its momentum: (2 + 2μ)/η heavy ball, "
                                           "(2 + 2β₁)/((1 − β₁)η) for an EMA (38/η at β₁ = 0.9)"},
        "reference": {"meaning": "the reference step of norm_ratio and quadratic_decrease_ratio"},
        "damping": {"meaning": "λ of the reference steps"},
        "exact": {"meaning": "'dense' or 'matrix-free': how the exact steps were solved"},
    },
    "layers": {
        "kind": {"meaning": "curvature matrix C"},
        "layer": {"meaning": "module owning the block's parameters"},
        "parameters": {"meaning": "size of the diagonal block C_bb", "unit": "parameters"},
        "trace": {"meaning": "tr C_bb", "unit": CURVATURE_UNIT},
        "trace_std_error": {"meaning": "standard error of tr C_bb (0 when exact)", "unit": CURVATURE_UNIT},
        "lambda_max": {"meaning": "largest eigenvalue of C_bb", "unit": CURVATURE_UNIT},
        "lambda_min": {"meaning": "smallest eigenvalue of C_bb (dense only)", "unit": CURVATURE_UNIT},
        "negative": {"meaning": "eigenvalues of C_bb below −tolerance (dense only)", "unit": "eigenvalues"},
        "how": {"meaning": "how the numbers were obtained"},
    },
    "cost": COST_COLUMNS,
}


@dataclass
class Comparison:
    """The results of :func:`compare`.

    Attributes:
        tables: ``"summary"`` (the problem), ``"parameters"`` (one row per studied parameter),
            ``"spectra"`` (one row per curvature kind), ``"top_eigenvalues"``, ``"layers"`` (one row
            per kind and layer), ``"approximations"`` (one row per approximation, its whole-model
            errors), ``"approximation_modules"`` (per approximation and module) and ``"steps"`` (per
            optimizer and module, :func:`curvlab.compare_steps`) as pandas DataFrames.
        eigenvalues: kind -> ascending float64 eigenvalues, for every kind whose dense matrix fitted.
        approximation_spectra: approximation -> ``{"curvature": kind, "eigenvalues": …, "exact": …}``, the
            ascending float64 eigenvalues of its dense matrix and of the exact one, where both fitted.
        densities: kind -> its SLQ density: ``grid``/``values`` and ``log_grid``/``log_values`` (of
            ``log₁₀(|λ| + log_eps)``), the smoothing ``width``/``log_width``, the raw Ritz ``nodes``
            and Gauss ``weights`` (probes × steps), ``probes``, ``steps``, ``products``, ``seed``.
        findings: short factual sentences for the top of the report.
        notes: what the numbers mean and how they were obtained.
        provenance: versions, seed, time of the run.
    """

    tables: dict[str, pd.DataFrame]
    eigenvalues: dict[str, np.ndarray]
    densities: dict[str, dict] = field(default_factory=dict)
    approximation_spectra: dict[str, dict] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything as a JSON-compatible dict: the contents of ``results.json``."""
        return {
            "format": FORMAT,
            "findings": self.findings,
            "notes": self.notes,
            "provenance": self.provenance,
            "columns": COLUMNS,
            "tables": {name: table_to_json(table) for name, table in self.tables.items()},
            "eigenvalues": {"unit": CURVATURE_UNIT, "order": "ascending",
                            "values": {kind: values.tolist() for kind, values in self.eigenvalues.items()}},
            "densities": {"unit": f"1 / ({CURVATURE_UNIT}); log densities per decade",
                          "values": {kind: {key: value.tolist() if isinstance(value, np.ndarray) else value
                                            for key, value in density.items()}
                                     for kind, density in self.densities.items()}},
            "approximation_spectra": {"unit": CURVATURE_UNIT, "order": "ascending",
                                      "values": {name: {"curvature": entry["curvature"],
                                                        "eigenvalues": entry["eigenvalues"].tolist(),
                                                        "exact": entry["exact"].tolist()}
                                                 for name, entry in self.approximation_spectra.items()}},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Comparison":
        """The inverse of :meth:`to_dict`."""
        if data.get("format") != FORMAT:
            raise InvalidProblem(f"not a curvlab compare result (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls(
            tables={name: _table_from_json(table) for name, table in data["tables"].items()},
            eigenvalues={kind: np.asarray(values, dtype=np.float64)
                         for kind, values in data["eigenvalues"]["values"].items()},
            densities={kind: {key: np.asarray(value, dtype=np.float64) if isinstance(value, list) else value
                              for key, value in density.items()}
                       for kind, density in data["densities"]["values"].items()},
            approximation_spectra={name: {"curvature": entry["curvature"],
                                          "eigenvalues": np.asarray(entry["eigenvalues"], dtype=np.float64),
                                          "exact": np.asarray(entry["exact"], dtype=np.float64)}
                                   for name, entry in data["approximation_spectra"]["values"].items()},
            findings=list(data["findings"]),
            notes=list(data["notes"]),
            provenance=dict(data["provenance"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        """Read a ``results.json`` written by :meth:`to_html`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_html(self, directory: str | Path, force: bool = False, progress: bool = False) -> Path:
        """Write ``directory/index.html`` (self-contained), ``directory/results.json`` and one CSV per table.

        The directory appears complete or not at all; an existing non-empty one is replaced only
        with ``force=True`` (otherwise :class:`curvlab.report.ReportExists`). ``progress`` shows a bar
        over the figures (stderr). Returns the path of ``index.html``.
        """
        report.check_target(directory, force)
        results = self.to_dict()
        modules = self.tables.get("approximation_modules")
        steps = self.tables.get("steps")
        has_steps = steps is not None and not steps.empty
        costs = self.tables.get("cost")
        has_cost = costs is not None and bool((costs["status"] == "ok").any()) and costs["optimizer"].nunique() > 1
        has_memory = has_cost and bool(np.isfinite(costs["memory_ratio"].to_numpy(dtype=float)).any())
        drawings = [(name, draw) for name, draw, wanted in (
            ("spectra", lambda: report.spectrum_figure(self.eigenvalues), self.eigenvalues),
            ("densities", lambda: report.density_figure(self.densities, self.eigenvalues), self.densities),
            ("approximation_heatmap", lambda: report.error_heatmap(modules), modules is not None and len(modules)),
            ("approximation_spectra", lambda: report.kept_eigenvalues_figure(self.approximation_spectra),
             self.approximation_spectra),
            ("step_cosines", lambda: step_figures.cosine_bars(steps), has_steps),
            ("step_cosine_heatmap", lambda: step_figures.cosine_heatmap(steps), has_steps),
            ("step_loss_change", lambda: step_figures.loss_change_figure(steps), has_steps),
            ("step_sharpness", lambda: step_figures.sharpness_figure(steps), has_steps),
            ("cost_time", lambda: cost_figures.ratio_figure(costs, "time_ratio"), has_cost),
            ("cost_memory", lambda: cost_figures.ratio_figure(costs, "memory_ratio"), has_cost and has_memory),
            ("cost_phases", lambda: cost_figures.phase_figure(costs), has_cost)) if wanted]
        figures = {name: draw() for name, draw in tqdm(drawings, desc="figures", unit="figure", disable=not progress,
                                                      file=sys.stderr)}
        html = report.render_html(results, self.tables, figures)
        contents = {"index.html": html, "results.json": report.to_json(results)} | report.table_csvs(self.tables)
        target = report.write_report(directory, contents, force=force)
        return target / "index.html"


def compare(prob: Problem, kinds: Sequence[str] | None = None, seed: int = 0, *, mc_samples: int = 1,
            k: int = 10, probes: int = 10, steps: int = 80, approximations: Sequence[str] | None = None,
            optimizers: Sequence[str] | None = None, step_options: Mapping[str, object] | None = None,
            cost: Mapping[str, object] | None = None, context: Mapping[str, object] | None = None,
            progress: bool = True) -> Comparison:
    """The spectra of the exact curvature matrices of ``prob``: dense within the memory budget, else estimated.

    Args:
        prob: the problem; its dtype and device are used throughout, dense eigenvalues in float64.
        kinds: curvature kinds (see :func:`curvlab.curvature`); default :data:`DEFAULT_KINDS`.
        seed: fixes the labels of ``fisher_mc`` and every estimator's random vectors.
        mc_samples: labels drawn per example for ``fisher_mc``.
        k: top eigenvalues listed per kind (at most P).
        probes, steps: of the SLQ density of every kind.
        approximations: structured approximations to measure against the curvature each stands for
            (see :func:`curvlab.approximate`); default :data:`DEFAULT_APPROXIMATIONS`, ``()`` for none.
        optimizers: optimizers whose one-shot steps are measured against the exact natural-gradient and
            Newton steps (see :func:`curvlab.compare_steps`, damping :data:`DAMPING`, per module too);
            default :data:`DEFAULT_OPTIMIZERS`, ``()`` for none.
        step_options: further arguments of :func:`curvlab.compare_steps` (``mode``, ``steps``, ``at``,
            ``reference``, ``damping``, ``lr``, ``hyperparameters``).
        cost: when given (``{}`` for the defaults), the cost of a training step of each optimizer against SGD
            over a batch-size sweep on the problem's data (:func:`curvlab.cost_study`; these are its further
            arguments, e.g. ``optimizers``, ``batch_sizes``, ``intervals``, ``repeats``).
        context: facts about the problem shown first in the summary (e.g. how the model was trained).
        progress: show progress bars (stderr).

    Returns:
        A :class:`Comparison`; ``result.tables["spectra"]`` has one row per kind.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)))
        >>> result = compare(prob, kinds=["hessian", "ggn"], probes=2, steps=5, approximations=["kfac"],
        ...                  optimizers=["adam", "kfac"], progress=False)
        >>> result.tables["spectra"]["kind"].tolist()
        ['hessian', 'ggn']
    """
    kinds = list(DEFAULT_KINDS if kinds is None else kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise InvalidProblem(f"kinds must be distinct names among {', '.join(KINDS)}; got {kinds}")
    k = min(require_integer("k", k), prob.num_params)
    names = list(DEFAULT_APPROXIMATIONS if approximations is None else approximations)
    if any(name not in APPROXIMATIONS for name in names) or len(set(names)) != len(names):
        raise InvalidProblem(f"approximations must be distinct names among {', '.join(APPROXIMATIONS)}; got {names}")
    optimizer_names = list(DEFAULT_OPTIMIZERS if optimizers is None else optimizers)
    if any(name not in optim.names() for name in optimizer_names) or len(set(optimizer_names)) != len(optimizer_names):
        raise InvalidProblem(f"optimizers must be distinct names among {', '.join(optim.names())}; "
                             f"got {optimizer_names}")
    require_integer("probes", probes)
    require_integer("steps", steps, minimum=2)
    if prob.process_group is not None and (cost is not None or (step_options or {}).get("mode") == "trajectory"):
        raise InvalidProblem("the cost study and trajectory steps train in one process; with a process group (torchrun) "
                             "leave out the cost study and use one-shot steps")
    start = time.perf_counter()
    operators = {kind: curvature(prob, kind, mc_samples=mc_samples, seed=seed) for kind in kinds}
    rows, tops, layers, eigenvalues, densities, matrices, remarks = [], [], [], {}, {}, {}, []
    hessian_eigen = None
    bar = tqdm(kinds, desc="curvature", unit="matrix", disable=not progress, file=sys.stderr)
    for kind in bar:
        bar.set_postfix_str(kind)
        op = operators[kind]
        if kind == "abs_hessian" and "hessian" in matrices:  # |H| = V|Λ|Vᵀ from the dense Hessian already built
            hessian_eigen = torch.linalg.eigh(matrices["hessian"])
            op = AbsHessian.from_eigen(prob, *hessian_eigen, "eigh of the dense Hessian built for the hessian row")
        slq = spectrum(op, method="slq", probes=probes, steps=steps, seed=seed, progress=progress)
        analysis = _KindAnalysis(op, prob, k, seed, slq, progress)
        rows.append(analysis.row)
        tops += analysis.top
        layers += analysis.layers
        if analysis.eigenvalues is not None:
            eigenvalues[kind] = analysis.eigenvalues
            matrices[kind] = analysis.dense
        densities[kind] = _density(slq, seed)
        if analysis.eigenvalues is not None:
            rows[-1]["slq_error"] = _wasserstein(densities[kind], analysis.eigenvalues)
        remarks += [f"{kind}: {remark}" for remark in analysis.remarks]
    measured = _approximations(prob, names, matrices, eigenvalues, seed, mc_samples, progress)
    remarks += measured.remarks
    step_arguments = {"damping": DAMPING, "per_block": True} | dict(step_options or {})
    curvatures = {kind: DenseMatrix(prob, kind, matrix, hessian_eigen if kind == "hessian" else None)
                  for kind, matrix in matrices.items() if kind in SHARED_WITH_STEPS}
    step_table = (compare_steps(prob, optimizer_names, seed=seed, progress=progress, curvatures=curvatures,
                                **step_arguments)
                  if optimizer_names else pd.DataFrame(columns=list(COLUMNS["steps"])))
    cost_table, cost_notes = _cost(prob, cost, seed, progress)
    seconds = time.perf_counter() - start
    tables = {"summary": _summary_table(prob, seed, mc_samples, context or {}, seconds),
              "parameters": _parameter_table(prob),
              "spectra": _frame(rows, "spectra", {"negative": "Int64", "zero": "Int64", "products": "Int64"}),
              "top_eigenvalues": _frame(tops, "top_eigenvalues", {"rank": "int64", "converged": "bool"}),
              "layers": _frame(layers, "layers", {"parameters": "int64", "negative": "Int64"}),
              "approximations": _frame(measured.rows, "approximations", {}),
              "approximation_modules": _frame(measured.modules, "approximation_modules", {}),
              "steps": step_table[list(COLUMNS["steps"])].reset_index(drop=True)}
    if cost_table is not None:
        tables["cost"] = cost_table
    return Comparison(
        tables=tables,
        eigenvalues=eigenvalues,
        densities=densities,
        approximation_spectra=measured.spectra,
        findings=_findings(tables["spectra"], tables["approximations"], tables["steps"], prob, mc_samples)
        + (cost_findings(cost_table) if cost_table is not None else []),
        notes=_notes(kinds, prob, seed, mc_samples, probes, steps) + _approximation_notes(names) + remarks + cost_notes,
        provenance=provenance(seed) | {"seconds": round(seconds, 3)},
    )


def _cost(prob: Problem, options: Mapping[str, object] | None, seed: int,
          progress: bool) -> tuple[pd.DataFrame | None, list[str]]:
    """The cost study of ``prob``'s model on all its examples (one batch), and a note on how it was measured."""
    if options is None:
        return None, []
    batches = [(X, y) for _, X, y in prob.batches()]
    if isinstance(batches[0][0], Mapping):
        X = {key: torch.cat([batch[0][key] for batch in batches]) for key in batches[0][0]}
    else:
        X = torch.cat([X for X, _ in batches])
    y = torch.cat([y for _, y in batches])
    arguments = {"seed": seed, "progress": progress} | dict(options)
    study = cost_study(prob.model, (X, y), loss=prob.loss, params=prob.param_names, **arguments)
    facts = study.facts
    one_pass = [name for name, values in facts["hyperparameters"].items() if values.get("one_pass")]
    note = (f"cost: {facts['processor']} ({facts['threads']} threads), device {facts['device']}, torch "
            f"{facts['torch']}; median of {facts['repeats']} steps after {facts['warmup']} warm-up step(s); "
            f"peak memory: {facts['peak memory']}"
            + (f"; curvature-update steps from one pass of the model: {', '.join(one_pass)}" if one_pass else ""))
    return study.table, [note]


def _frame(rows: list[dict], name: str, dtypes: Mapping[str, str]) -> pd.DataFrame:
    """The table ``name`` from ``rows``: its columns in order, numbers as float64 unless ``dtypes`` says otherwise."""
    columns = list(COLUMNS[name])
    text = {"kind", "status", "how", "layer", "approximation", "curvature", "module", "mode"}
    types = {column: dtypes.get(column, object if column in text else "float64") for column in columns}
    return pd.DataFrame(rows, columns=columns).astype(types)


class _KindAnalysis:
    """The spectra row, top eigenvalues and layer rows of one kind: exact when dense fits, else estimated."""

    def __init__(self, op, prob: Problem, k: int, seed: int, slq: Spectrum, progress: bool):
        self.op, self.prob, self.k, self.seed, self.slq, self.progress = op, prob, k, seed, slq, progress
        self.remarks: list[str] = []
        self.row = {"kind": op.kind}
        start = _clock(prob.device)
        try:
            dense = op.to_dense(progress=progress).to(torch.float64)
        except DenseTooLarge as err:
            self.remarks.append(f"estimated matrix-free: {err}")
            self._matrix_free(start)
            return
        norm = torch.linalg.matrix_norm(dense).item()
        self.row["asymmetry"] = torch.linalg.matrix_norm(dense - dense.T).item() / norm if norm else 0.0
        dense = (dense + dense.T) / 2
        self.row["trace"] = dense.diagonal().sum().item()
        values = torch.linalg.eigvalsh(dense).cpu().numpy()
        self.dense = dense
        self._from_eigenvalues(values, start)
        self.layers = self._layers_of(self._dense_blocks(dense))
        if getattr(op, "method", None):
            self.remarks.append(op.method)

    def _from_eigenvalues(self, values: np.ndarray, start: float) -> None:
        P = self.prob.num_params
        tensor = torch.from_numpy(values)
        spec = Spectrum(tensor, None, torch.zeros_like(tensor), torch.ones_like(tensor, dtype=torch.bool), P,
                        "dense", P)
        summary = spectral_summary(spec, damping=DAMPING, threshold=P * torch.finfo(self.prob.dtype).eps
                                   * float(np.abs(values).max()))
        self.eigenvalues = values
        self.row |= _summary_columns(summary) | {
            "status": "dense", "trace_std_error": 0.0,
            "zero": int((np.abs(values) <= summary.threshold).sum()), "products": P,
            "seconds": _clock(self.prob.device) - start, "how": "dense matrix, eigvalsh in float64"}
        self.top = [{"kind": self.op.kind, "rank": i + 1, "eigenvalue": float(value), "residual": 0.0,
                     "converged": True, "how": "dense eigh"}
                    for i, value in enumerate(values[::-1][:self.k])]

    def _matrix_free(self, start: float) -> None:
        op, seed = self.op, self.seed
        which = "BE" if op.kind == "hessian" else "LA"
        top = spectrum(op, method="lanczos", k=self.k, which=which, tol=1e-6, seed=seed, progress=self.progress)
        estimate = trace(op, method="hutchpp", samples=99, seed=seed, progress=self.progress)
        slq = self.slq
        summary = spectral_summary(slq, damping=DAMPING)
        order = top.eigenvalues.flip(0).cpu()
        self.eigenvalues = None
        self.row |= _summary_columns(summary) | {
            "status": "matrix-free", "trace": estimate.estimate, "trace_std_error": estimate.std_error,
            "lambda_max": max(float(order[0]), summary.lambda_max),
            "lambda_min": min(float(order[-1]), summary.lambda_min) if which == "BE" else summary.lambda_min,
            "products": top.products + estimate.products,
            "seconds": _clock(self.prob.device) - start,
            "how": f"Lanczos (k={self.k}, which={which}, {top.products} products), Hutch++ trace "
                   f"({estimate.products} products), SLQ counts ({slq.weights.shape[0]} probes × "
                   f"{slq.weights.shape[1]} steps); seed {seed}"}
        residuals = top.residuals.flip(0).cpu()
        converged = top.converged.flip(0).cpu()
        self.top = [{"kind": op.kind, "rank": i + 1, "eigenvalue": float(value), "residual": float(residual),
                     "converged": bool(flag), "how": f"Lanczos, {top.products} products, seed {seed}"}
                    for i, (value, residual, flag) in enumerate(zip(order, residuals, converged))]
        self.layers = self._layers_matrix_free()

    def _dense_blocks(self, dense: torch.Tensor):
        for label, names in blocks_of(self.op):
            index = self.prob.entries(names).to(dense.device)
            yield label, dense[index][:, index]

    def _layers_of(self, blocks) -> list[dict]:
        rows = []
        for label, block in blocks:
            values = torch.linalg.eigvalsh(block).cpu().numpy()
            tolerance = values.size * torch.finfo(self.prob.dtype).eps * float(np.abs(values).max())
            rows.append({"kind": self.op.kind, "layer": label, "parameters": values.size,
                         "trace": float(block.diagonal().sum()), "trace_std_error": 0.0,
                         "lambda_max": float(values[-1]), "lambda_min": float(values[0]),
                         "negative": int((values < -tolerance).sum()), "how": "dense block, eigvalsh"})
        return rows

    def _layers_matrix_free(self) -> list[dict]:
        rows = []
        for label, names in blocks_of(self.op):
            block = self.op.block(names)
            estimate = trace(block, method="hutchpp", samples=30, seed=self.seed, progress=False)
            top = spectrum(block, method="lanczos", k=1, tol=1e-3, seed=self.seed, progress=False)
            rows.append({"kind": self.op.kind, "layer": label, "parameters": block.shape[0],
                         "trace": estimate.estimate, "trace_std_error": estimate.std_error,
                         "lambda_max": float(top.eigenvalues[-1]),
                         "how": f"Hutch++ ({estimate.products} products), Lanczos λ_max to 1e-3 "
                                f"({top.products} products, converged: {bool(top.converged.all())})"})
        return rows


@dataclass
class _Measured:
    rows: list[dict] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    spectra: dict[str, dict] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)


def _approximations(prob: Problem, names: list[str], matrices: dict[str, torch.Tensor],
                    eigenvalues: dict[str, np.ndarray], seed: int, mc_samples: int, progress: bool) -> _Measured:
    """Each approximation's errors against its curvature: dense when both matrices fit, else randomized.

    ``matrices`` and ``eigenvalues`` hold the dense matrices (float64, symmetrised) and eigenvalues of
    the kinds already analysed; those of further kinds are added to ``matrices`` only.
    """
    measured, shared, eigenvalues = _Measured(), {}, dict(eigenvalues)
    for name in tqdm(names, desc="approximations", unit="approximation", disable=not progress, file=sys.stderr):
        accepted = options_of(name)
        options = {key: value for key, value in (("seed", seed), ("progress", False)) if key in accepted}
        try:
            _measure(prob, name, options, matrices, eigenvalues, shared, seed, mc_samples, measured)
        except CurvlabError as err:
            measured.remarks.append(f"{name}: not measured: {err}")
    return measured


def _measure(prob: Problem, name: str, options: dict, matrices: dict, eigenvalues: dict, shared: dict, seed: int,
             mc_samples: int, measured: _Measured) -> None:
    start = _clock(prob.device)
    approx = approximate(prob, name, **options, **APPROXIMATION_OPTIONS.get(name, {}))
    seconds = _clock(prob.device) - start
    kind = "ggn" if approx.curvature == "fisher" else approx.curvature
    exact = curvature(prob, kind, mc_samples=mc_samples, seed=seed)
    if kind not in matrices:
        try:
            dense = exact.to_dense(progress=False).to(torch.float64)
            matrices[kind] = (dense + dense.T) / 2
            eigenvalues[kind] = torch.linalg.eigvalsh(matrices[kind]).cpu().numpy()
        except DenseTooLarge:
            pass
    if kind in matrices:
        shared.setdefault(kind, DenseMatrix(prob, kind, matrices[kind]))
        exact = shared[kind]
    error = approximation_error(approx, exact, k=10, seed=seed, progress=False)
    measured.rows.append({"approximation": name, "curvature": kind, "seconds": seconds,
                          **{column: error[column] for column in COLUMNS["approximations"] if column in error}})
    if kind in matrices:
        A = approx.to_dense(progress=False).to(torch.float64)
        A = (A + A.T) / 2
        measured.spectra[name] = {"curvature": kind, "eigenvalues": _block_eigenvalues(prob, approx, A),
                                  "exact": eigenvalues[kind]}
        measured.modules += _module_errors(prob, name, A, matrices[kind])


def _block_eigenvalues(prob: Problem, approx, A: torch.Tensor) -> np.ndarray:
    """The eigenvalues of the dense ``A`` ``(P, P)``, ascending: those of its diagonal blocks when it is an
    :class:`~curvlab.approx.Approximation` (zero outside them), else of the whole matrix."""
    if not isinstance(approx, Approximation):
        return torch.linalg.eigvalsh(A).cpu().numpy()
    index = [prob.entries(names).to(A.device) for _, names, _ in approx.blocks]
    return torch.cat([torch.linalg.eigvalsh(A[i][:, i]) for i in index]).sort().values.cpu().numpy()


def _module_errors(prob: Problem, name: str, A: torch.Tensor, C: torch.Tensor) -> list[dict]:
    """The scaled Frobenius error and cosine of every module's diagonal block of ``A`` against ``C``'s."""
    rows = []
    for module, parameters in prob.module_blocks():
        index = prob.entries(parameters).to(A.device)
        a, c = A[index][:, index], C[index][:, index]
        inner, norm_a, norm_c = float((a * c).sum()), float(a.square().sum()), float(c.square().sum())
        scale = inner / norm_a if norm_a > 0 else 0.0
        rows.append({"approximation": name, "module": module,
                     "rel_fro_scaled": float(torch.linalg.matrix_norm(scale * a - c)) / norm_c ** 0.5
                     if norm_c > 0 else np.nan,
                     "cos_fro": inner / (norm_a * norm_c) ** 0.5 if norm_a * norm_c > 0 else np.nan})
    return rows


def _summary_columns(summary) -> dict:
    return {"lambda_max": summary.lambda_max, "lambda_min": summary.lambda_min,
            "condition_positive": summary.condition_positive, "condition_damped": summary.condition_damped,
            "negative": None if np.isnan(summary.negative_count) else round(summary.negative_count),
            "negative_mass": summary.negative_mass, "effective_rank": summary.effective_rank,
            "tolerance": summary.threshold}


def _density(spec: Spectrum, seed: int) -> dict:
    """An SLQ spectrum's density as plain numbers for the report and ``results.json``."""
    (grid, values), (log_grid, log_values) = spec.density, spec.log_density
    return {"grid": grid.numpy(), "values": values.numpy(), "width": spec.width,
            "log_grid": log_grid.numpy(), "log_values": log_values.numpy(), "log_width": spec.log_width,
            "log_eps": spec.log_eps, "nodes": spec.nodes.numpy(), "weights": spec.weights.numpy(),
            "probes": spec.nodes.shape[0], "steps": spec.nodes.shape[1], "products": spec.products, "seed": seed,
            "reorthogonalized": bool(spec.reorthogonalized)}


def _wasserstein(density: Mapping, eigenvalues: np.ndarray) -> float:
    """W1 between the smoothed SLQ density (as weights on its grid) and the eigenvalues, over their range."""
    spread = float(eigenvalues[-1] - eigenvalues[0])
    grid, values = density["grid"], density["values"]
    distance = wasserstein_distance(grid, eigenvalues, u_weights=values * (grid[1] - grid[0]))
    return distance / spread if spread > 0 else 0.0


def _clock(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _summary_table(prob: Problem, seed: int, mc_samples: int, context: Mapping[str, object],
                   seconds: float) -> pd.DataFrame:
    rows = [(str(key), value, "") for key, value in context.items()] + [
        ("studied parameters P", prob.num_params, "parameters"),
        ("examples N", prob.num_examples, "examples"),
        ("loss", f"{prob.likelihood.name}, reduction={prob.reduction}", ""),
        ("loss value L", prob.loss_value(), "loss"),
        ("reduction factor R", prob.reduction_factor, ""),
        ("dtype", str(prob.dtype).removeprefix("torch."), ""),
        ("device", str(prob.device), ""),
        ("seed (fisher_mc labels)", seed, ""),
        ("Monte-Carlo samples S", mc_samples, "labels per example"),
        ("time taken", round(seconds, 2), "s"),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS["summary"])).astype({"value": object})


def _parameter_table(prob: Problem) -> pd.DataFrame:
    module_of = {name: module for module, names in prob.module_blocks() for name in names}
    rows = [(name, module_of.get(name, ""), "×".join(map(str, shape)) or "scalar", shape.numel())
            for name, shape in zip(prob.param_names, prob.param_shapes)]
    return pd.DataFrame(rows, columns=list(COLUMNS["parameters"])).astype({"count": "int64"})


def _findings(spectra: pd.DataFrame, approximations: pd.DataFrame, steps: pd.DataFrame, prob: Problem,
              mc_samples: int) -> list[str]:
    """Short factual sentences, the most telling first: definiteness, GGN against Hessian, best approximation, steps."""
    ok = spectra[spectra["status"] == "dense"].set_index("kind")
    findings = []
    if "hessian" in ok.index:
        h = ok.loc["hessian"]
        if h["negative"]:
            findings.append(f"The Hessian is indefinite: {h['negative']} of its {prob.num_params} eigenvalues are "
                            f"negative, carrying {h['negative_mass']:.1%} of Σ|λ| (λ_min = {h['lambda_min']:.4g}, "
                            f"λ_max = {h['lambda_max']:.4g}), so the loss is not locally convex here.")
        else:
            findings.append(f"The Hessian has no eigenvalue below −{h['tolerance']:.2g}: the loss is locally convex "
                            f"here (λ_max = {h['lambda_max']:.4g}).")
        if "ggn" in ok.index and h["lambda_max"] > 0 and h["trace"] != 0:
            g = ok.loc["ggn"]
            findings.append(f"The GGN, positive semi-definite by construction, has "
                            f"{g['lambda_max'] / h['lambda_max']:.3g} × the Hessian's largest eigenvalue and "
                            f"{g['trace'] / h['trace']:.3g} × its trace.")
    measured = approximations.dropna(subset=["rel_fro_scaled"])
    if not measured.empty:
        best = measured.loc[measured["rel_fro_scaled"].idxmin()]
        worst = measured.loc[measured["rel_fro_scaled"].idxmax()]
        sentence = (f"The closest approximation is {best['approximation']} of the {best['curvature']}: scaled "
                    f"Frobenius error {best['rel_fro_scaled']:.3g}, cosine {best['cos_fro']:.3g}")
        if worst["approximation"] != best["approximation"]:
            sentence += f"; the furthest is {worst['approximation']} ({worst['rel_fro_scaled']:.3g})"
        findings.append(sentence + ".")
    findings += _step_findings(steps)
    for kind, name, bound in (("empirical_fisher", "The empirical Fisher", f"N = {prob.num_examples}"),
                              ("fisher_mc", "The Monte-Carlo Fisher",
                               f"N·S = {prob.num_examples * mc_samples}")):
        if kind in ok.index:
            nonzero = prob.num_params - ok.loc[kind, "zero"]
            findings.append(f"{name} has {nonzero} eigenvalues clearly above zero (its rank is at most {bound}).")
    estimated = spectra.loc[spectra["status"] == "matrix-free", "kind"].tolist()
    if estimated:
        findings.insert(0, f"Estimated matrix-free, since the dense matrix exceeds the memory budget: "
                           f"{', '.join(estimated)}.")
    return findings


def _step_findings(steps: pd.DataFrame) -> list[str]:
    """The optimizer whose step agrees best with the damped natural gradient, among those that approximate it."""
    whole = steps[(steps["block"] == "all") & ~steps["optimizer"].isin(["natural_gradient", "newton"])]
    whole = whole.dropna(subset=["cos_natural_gradient"])
    if whole.empty:
        return []
    best = whole.loc[whole["cos_natural_gradient"].idxmax()]
    worst = whole.loc[whole["cos_natural_gradient"].idxmin()]
    sgd = whole.loc[whole["optimizer"] == "sgd", "cos_natural_gradient"]
    sentence = (f"Of the optimizers' steps, {best['optimizer']}'s is closest to the damped natural gradient "
                f"(cosine {best['cos_natural_gradient']:.3g}) and {worst['optimizer']}'s furthest "
                f"({worst['cos_natural_gradient']:.3g})")
    if not sgd.empty:
        sentence += f"; the plain gradient's cosine is {sgd.iloc[0]:.3g}"
    return [sentence + "."]


def _approximation_notes(names: list[str]) -> list[str]:
    meaning = {
        "diag": "diag: the exact diagonal of the curvature.",
        "diag_hutchinson": "diag_hutchinson: AdaHessian's mean of z ⊙ Cz over Rademacher z (10 samples).",
        "diag_gnb": "diag_gnb: Sophia-G's Gauss-Newton-Bartlett estimate of the GGN diagonal from sampled labels.",
        "diag_sqgrad": "diag_sqgrad: the diagonal of the mini-batch gradient second moment (Adam, Adagrad).",
        "kfac": "kfac: K-FAC, B ⊗ A per Linear/Conv2d weight and bias (curvlinops 3.0.1 scales, expand); other "
                "modules keep their exact block.",
        "ekfac": "ekfac: K-FAC's eigenbasis with eigenvalues refitted to the exact diagonal in it.",
        "foof": "foof: the input factor only, I ⊗ A (FOOF).",
        "shampoo": "shampoo: ⊗ᵢ Lᵢ^{1/m} from the mode-wise second moments of the batch gradients.",
        "gram": "gram: the per-example-gradient Gram representation of the empirical Fisher (SMW-NG); exact by "
                "construction, so its errors are rounding.",
        "lowrank": "lowrank: the top-20 eigenpairs by |λ| from Lanczos.",
        "psgd_kron": "psgd_kron: the inverse of PSGD's Kronecker preconditioner fitted on 1000 (v, Hv) pairs.",
    }
    return [meaning[name] for name in names if name in meaning]


def _notes(kinds: list[str], prob: Problem, seed: int, mc_samples: int, probes: int, steps: int) -> list[str]:
    meaning = {
        "hessian": "hessian: H = ∇²L, the exact Hessian of the loss on all N examples.",
        "abs_hessian": "abs_hessian: |H| = V|Λ|Vᵀ from the eigendecomposition H = VΛVᵀ; "
                       "positive semi-definite, same eigenvectors as H.",
        "ggn": "ggn: the generalized Gauss-Newton G = R Σₙ Jₙᵀ ∇²_f ℓₙ Jₙ; positive semi-definite.",
        "fisher": "fisher: the exact Fisher, which equals the GGN for these losses.",
        "fisher_mc": f"fisher_mc: the Monte-Carlo Fisher R Σₙ (1/S) Σₛ ∇ℓ(fₙ, ŷₙₛ)∇ℓ(fₙ, ŷₙₛ)ᵀ with S = "
                     f"{mc_samples} label(s) per example drawn from the model's predictive distribution "
                     f"(seed {seed}); E[F_mc] = G and its rank is at most "
                     f"N·S = {prob.num_examples * mc_samples}.",
        "empirical_fisher": "empirical_fisher: E = R Σₙ ∇ℓₙ∇ℓₙᵀ with the data's labels; its rank is at most "
                            f"N = {prob.num_examples}.",
    }
    notes = [meaning[kind] for kind in kinds]
    if "fisher" not in kinds:
        notes.append("The exact Fisher equals the GGN for cross-entropy, MSE and BCE-with-logits (the model's "
                     "outputs are the natural parameters of the likelihood), so it is not listed separately.")
    notes += [
        f"L = R · Σₙ ℓₙ with R = {prob.reduction_factor:.6g} ({prob.reduction} reduction); "
        f"curvatures are in units of {CURVATURE_UNIT}.",
        "Eigenvalues: torch.linalg.eigvalsh in float64 of the symmetrised dense matrix (C + Cᵀ)/2; "
        "the trace is the sum of the diagonal of C.",
        f"Densities: stochastic Lanczos quadrature with {probes} Rademacher probes × {steps} Lanczos steps "
        f"(seed {seed}), smoothed with the Gaussian width stated on each panel; slq_error measures it "
        f"against the dense eigenvalues. The log-scale densities are of log₁₀(|λ| + ε) and resolve "
        f"about four decades below λ_max with 80 steps.",
    ]
    return notes


def provenance(seed: int) -> dict[str, object]:
    """When, with which versions, on which platform and from which seed a result was made."""
    from curvlab import __version__  # deferred: curvlab/__init__.py imports this module before setting it

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "curvlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch threads": torch.get_num_threads(),
        "seed": seed,
    }


def _json_cell(value):
    """A table cell for strict JSON: missing as ``null``, infinities as the strings ``"inf"``/``"-inf"``."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value.item() if isinstance(value, np.generic) else value


def table_to_json(table: pd.DataFrame) -> dict:
    """``table`` as strict JSON: its columns, their dtypes and the rows (see :func:`_json_cell`)."""
    return {
        "columns": list(table.columns),
        "dtypes": [str(dtype) for dtype in table.dtypes],
        "rows": [[_json_cell(value) for value in row] for row in table.astype(object).itertuples(index=False)],
    }


def _table_from_json(data: Mapping) -> pd.DataFrame:
    table = pd.DataFrame(data["rows"], columns=data["columns"], dtype=object)
    return table.astype(dict(zip(data["columns"], data["dtypes"])))
