"""The analysis run behind ``curvlab compare``: every exact curvature matrix of one problem, side by side.

For each kind the dense ``(P, P)`` matrix ``C`` is built with ``op.to_dense()``, symmetrised and
diagonalised in float64 with :func:`torch.linalg.eigvalsh`; the run records its trace, extreme
eigenvalues, the number of negative and of (numerically) zero eigenvalues, and the time taken. A
kind whose dense matrix exceeds the memory budget gets a row that says so and no numbers.
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
from tqdm.auto import tqdm

from curvlab import report
from curvlab.errors import DenseTooLarge, InvalidProblem
from curvlab.operators import KINDS, curvature
from curvlab.problem import Problem

#: The kinds :func:`compare` studies by default: every exact kind except ``fisher``, which equals ``ggn``.
DEFAULT_KINDS = ("hessian", "abs_hessian", "ggn", "fisher_mc", "empirical_fisher")

FORMAT = "curvlab.compare/1"

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
        "status": {"meaning": "'ok', or why the row has no numbers (details in the notes)"},
        "trace": {"meaning": "tr C = Σᵢ Cᵢᵢ", "unit": CURVATURE_UNIT},
        "lambda_max": {"meaning": "largest eigenvalue", "unit": CURVATURE_UNIT},
        "lambda_min": {"meaning": "smallest eigenvalue", "unit": CURVATURE_UNIT},
        "negative": {"meaning": "eigenvalues below −tolerance", "unit": "eigenvalues"},
        "zero": {"meaning": "eigenvalues within ±tolerance (numerically zero)", "unit": "eigenvalues"},
        "tolerance": {"meaning": "P · ε · max|λ|, ε the machine epsilon of the problem's dtype",
                      "unit": CURVATURE_UNIT},
        "asymmetry": {"meaning": "‖C − Cᵀ‖_F / ‖C‖_F of the dense matrix before symmetrising"},
        "seconds_dense": {"meaning": "wall-clock time of op.to_dense()", "unit": "s"},
        "seconds_eigvalsh": {"meaning": "wall-clock time of torch.linalg.eigvalsh in float64", "unit": "s"},
    },
}


@dataclass
class Comparison:
    """The results of :func:`compare`.

    Attributes:
        tables: ``"summary"`` (the problem), ``"parameters"`` (one row per studied parameter) and
            ``"spectra"`` (one row per curvature kind) as pandas DataFrames.
        eigenvalues: kind -> ascending float64 eigenvalues, for every kind whose dense matrix fitted.
        findings: short factual sentences for the top of the report.
        notes: what the numbers mean and how they were obtained.
        provenance: versions, seed, time of the run.
    """

    tables: dict[str, pd.DataFrame]
    eigenvalues: dict[str, np.ndarray]
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
            "tables": {name: _table_to_json(table) for name, table in self.tables.items()},
            "eigenvalues": {"unit": CURVATURE_UNIT, "order": "ascending",
                            "values": {kind: values.tolist() for kind, values in self.eigenvalues.items()}},
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
            findings=list(data["findings"]),
            notes=list(data["notes"]),
            provenance=dict(data["provenance"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        """Read a ``results.json`` written by :meth:`to_html`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_html(self, directory: str | Path, force: bool = False) -> Path:
        """Write ``directory/index.html`` (self-contained) and ``directory/results.json``.

        The directory appears complete or not at all; an existing non-empty one is replaced only
        with ``force=True`` (otherwise :class:`curvlab.report.ReportExists`). Returns the path of
        ``index.html``.
        """
        report.check_target(directory, force)
        results = self.to_dict()
        figures = {"spectra": report.spectrum_figure(self.eigenvalues)} if self.eigenvalues else {}
        html = report.render_html(results, self.tables, figures)
        target = report.write_report(directory, {"index.html": html, "results.json": report.to_json(results)},
                                     force=force)
        return target / "index.html"


def compare(prob: Problem, kinds: Sequence[str] | None = None, seed: int = 0, *, mc_samples: int = 1,
            context: Mapping[str, object] | None = None, progress: bool = True) -> Comparison:
    """Build, diagonalise and compare the dense curvature matrices of ``prob``.

    Args:
        prob: the problem; its dtype and device are used throughout, eigenvalues in float64.
        kinds: curvature kinds (see :func:`curvlab.curvature`); default :data:`DEFAULT_KINDS`.
        seed: fixes the labels of ``fisher_mc``.
        mc_samples: labels drawn per example for ``fisher_mc``.
        context: facts about the problem shown first in the summary (e.g. how the model was trained).
        progress: show a progress bar over the kinds (stderr).

    Returns:
        A :class:`Comparison`; ``result.tables["spectra"]`` has one row per kind.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)))
        >>> result = compare(prob, kinds=["hessian", "ggn"], progress=False)
        >>> result.tables["spectra"]["kind"].tolist()
        ['hessian', 'ggn']
    """
    kinds = list(DEFAULT_KINDS if kinds is None else kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise InvalidProblem(f"kinds must be distinct names among {', '.join(KINDS)}; got {kinds}")
    operators = {kind: curvature(prob, kind, mc_samples=mc_samples, seed=seed) for kind in kinds}
    rows, eigenvalues, remarks = [], {}, []
    bar = tqdm(kinds, desc="curvature", unit="matrix", disable=not progress, file=sys.stderr)
    for kind in bar:
        bar.set_postfix_str(kind)
        row, values, remark = _spectrum_row(operators[kind], prob, progress)
        rows.append(row)
        if values is not None:
            eigenvalues[kind] = values
        if remark:
            remarks.append(f"{kind}: {remark}")
    spectra = pd.DataFrame(rows, columns=list(COLUMNS["spectra"])).astype(
        {"negative": "Int64", "zero": "Int64"} | {name: "float64" for name in
                                                 ("trace", "lambda_max", "lambda_min", "tolerance", "asymmetry",
                                                  "seconds_dense", "seconds_eigvalsh")})
    tables = {"summary": _summary_table(prob, seed, mc_samples, context or {}),
              "parameters": _parameter_table(prob),
              "spectra": spectra}
    return Comparison(
        tables=tables,
        eigenvalues=eigenvalues,
        findings=_findings(spectra, prob, mc_samples),
        notes=_notes(kinds, prob, seed, mc_samples) + remarks,
        provenance=_provenance(seed),
    )


def _spectrum_row(op, prob: Problem, progress: bool) -> tuple[dict, np.ndarray | None, str | None]:
    """One row of the spectra table, the eigenvalues (None if the dense matrix did not fit), a remark."""
    row = {"kind": op.kind}
    try:
        start = _clock(prob.device)
        dense = op.to_dense(progress=progress)
        seconds_dense = _clock(prob.device) - start
    except DenseTooLarge as err:
        return row | {"status": "dense matrix too large"}, None, f"not computed: {err}"
    dense = dense.to(torch.float64)
    norm = torch.linalg.matrix_norm(dense).item()
    asymmetry = torch.linalg.matrix_norm(dense - dense.T).item() / norm if norm else 0.0
    trace = dense.diagonal().sum().item()
    start = _clock(prob.device)
    values = torch.linalg.eigvalsh((dense + dense.T) / 2)
    seconds_eigvalsh = _clock(prob.device) - start
    del dense
    values = values.cpu().numpy()
    largest = float(np.abs(values).max())
    tolerance = values.size * torch.finfo(prob.dtype).eps * largest
    return row | {
        "status": "ok",
        "trace": trace,
        "lambda_max": float(values[-1]),
        "lambda_min": float(values[0]),
        "negative": int((values < -tolerance).sum()),
        "zero": int((np.abs(values) <= tolerance).sum()),
        "tolerance": tolerance,
        "asymmetry": asymmetry,
        "seconds_dense": seconds_dense,
        "seconds_eigvalsh": seconds_eigvalsh,
    }, values, getattr(op, "method", None)


def _clock(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _summary_table(prob: Problem, seed: int, mc_samples: int, context: Mapping[str, object]) -> pd.DataFrame:
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
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS["summary"])).astype({"value": object})


def _parameter_table(prob: Problem) -> pd.DataFrame:
    module_of = {name: module for module, names in prob.module_blocks() for name in names}
    rows = [(name, module_of.get(name, ""), "×".join(map(str, shape)) or "scalar", shape.numel())
            for name, shape in zip(prob.param_names, prob.param_shapes)]
    return pd.DataFrame(rows, columns=list(COLUMNS["parameters"])).astype({"count": "int64"})


def _findings(spectra: pd.DataFrame, prob: Problem, mc_samples: int) -> list[str]:
    ok = spectra[spectra["status"] == "ok"].set_index("kind")
    findings = []
    if "hessian" in ok.index:
        h = ok.loc["hessian"]
        findings.append(f"The Hessian has {h['negative']} negative eigenvalues out of {prob.num_params} "
                        f"(λ_min = {h['lambda_min']:.4g}, λ_max = {h['lambda_max']:.4g}).")
        if "ggn" in ok.index and h["lambda_max"] > 0 and h["trace"] != 0:
            g = ok.loc["ggn"]
            findings.append(f"λ_max of the GGN is {g['lambda_max'] / h['lambda_max']:.3g} × that of the Hessian; "
                            f"its trace is {g['trace'] / h['trace']:.3g} × the Hessian's.")
    for kind, name, bound in (("empirical_fisher", "The empirical Fisher", f"N = {prob.num_examples}"),
                              ("fisher_mc", "The Monte-Carlo Fisher",
                               f"N·S = {prob.num_examples * mc_samples}")):
        if kind in ok.index:
            nonzero = prob.num_params - ok.loc[kind, "zero"]
            findings.append(f"{name} has {nonzero} eigenvalues clearly above zero (its rank is at most {bound}).")
    skipped = spectra.loc[spectra["status"] != "ok", "kind"].tolist()
    if skipped:
        findings.append(f"Not computed (dense matrix over the memory budget): {', '.join(skipped)}.")
    return findings


def _notes(kinds: list[str], prob: Problem, seed: int, mc_samples: int) -> list[str]:
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
    ]
    return notes


def _provenance(seed: int) -> dict[str, object]:
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
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _table_to_json(table: pd.DataFrame) -> dict:
    return {
        "columns": list(table.columns),
        "dtypes": [str(dtype) for dtype in table.dtypes],
        "rows": [[_json_cell(value) for value in row] for row in table.astype(object).itertuples(index=False)],
    }


def _table_from_json(data: Mapping) -> pd.DataFrame:
    table = pd.DataFrame(data["rows"], columns=data["columns"], dtype=object)
    return table.astype(dict(zip(data["columns"], data["dtypes"])))
