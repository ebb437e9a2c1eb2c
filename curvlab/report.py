"""The self-contained HTML report and its on-disk form: ``index.html`` next to ``results.json``.

The report is one HTML file with inline CSS and figures embedded as base64 PNG: no scripts, fonts,
style sheets or images are fetched from anywhere. A report directory is written completely into a
temporary directory beside the target and moved into place at the end, so an interrupted run never
leaves a partial report; an existing non-empty directory is replaced only when asked to.
"""

import base64
import io
import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from curvlab.errors import CurvlabError


class ReportExists(CurvlabError, FileExistsError):
    """The report directory is not empty: replaced only with ``force=True``, and only if it holds just a report."""


REPORT_FILES = frozenset({"index.html", "results.json"})


def check_target(directory: str | Path, force: bool = False) -> Path:
    """``directory`` as a path, after checking that a report may be written there.

    A missing or empty directory is always fine. A non-empty one is replaced only with ``force``,
    and only if it holds nothing but a previous report, so that ``--force`` never deletes other files.

    Raises:
        ReportExists: ``directory`` is not a directory, or is not empty and may not be replaced.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ReportExists(f"{target} exists and is not a directory; choose another output directory")
    present = {entry.name for entry in target.iterdir()} if target.is_dir() else set()
    if present and not force:
        raise ReportExists(f"{target} exists and is not empty; choose another directory or pass --force "
                           f"(force=True) to replace the report in it")
    foreign = sorted(present - REPORT_FILES)
    if foreign:
        raise ReportExists(f"{target} holds files other than a curvlab report ({', '.join(foreign)}); it is not "
                           f"replaced even with --force: choose another directory")
    return target


def write_report(directory: str | Path, contents: Mapping[str, str], force: bool = False) -> Path:
    """Write the files ``contents`` (name -> text) as the directory ``directory``, all or nothing.

    The files go into a temporary directory beside ``directory``, which then takes its place; an
    existing directory is removed only after the new one is complete, and only with ``force``.
    Returns the path of the report directory.
    """
    target = check_target(directory, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        for name, text in contents.items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        if target.exists():
            check_target(target, force)
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def format_value(value) -> str:
    """A table cell as text: integers exactly, other numbers with 4 significant digits, missing as —."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def table_rows(table: pd.DataFrame) -> list[list[tuple[str, bool]]]:
    """The cells of ``table`` row by row, each as ``(text, is_number)``."""
    return [[(format_value(value), _is_number(value)) for value in row]
            for row in table.astype(object).itertuples(index=False)]


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def spectrum_figure(eigenvalues: Mapping[str, np.ndarray]) -> bytes:
    """A PNG: each matrix's eigenvalues sorted by size, and their cumulative distribution.

    Both panels use a symmetric-log axis, linear within about ``10⁻⁶ · max |λ|`` of zero, so that
    negative, (numerically) zero and positive eigenvalues over many orders of magnitude are visible.
    """
    figure = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    by_rank, cumulative = figure.subplots(1, 2)
    largest = max((float(np.abs(values).max()) for values in eigenvalues.values() if values.size), default=1.0)
    threshold = 10.0 ** np.floor(np.log10(max(largest, np.finfo(np.float64).tiny) * 1e-6))
    for kind, values in eigenvalues.items():
        ordered = np.sort(values)[::-1]
        by_rank.plot(np.arange(1, ordered.size + 1), ordered, label=kind, linewidth=1.4)
        cumulative.step(ordered[::-1], np.arange(1, ordered.size + 1) / ordered.size, where="post",
                        label=kind, linewidth=1.4)
    # Ticks at 0 and ±10^k, every second decade down to 100 × the linear threshold, so labels never crowd.
    top = int(np.ceil(np.log10(max(largest, threshold))))
    decades = [10.0 ** k for k in range(top, round(np.log10(threshold)) + 1, -2)]
    ticks = sorted([0.0] + decades + [-d for d in decades])
    by_rank.set_yscale("symlog", linthresh=threshold)
    by_rank.yaxis.set_major_locator(FixedLocator(ticks))
    by_rank.set(xlabel="rank i (largest first)", ylabel="eigenvalue λᵢ", title="Eigenvalues by rank")
    cumulative.set_xscale("symlog", linthresh=threshold)
    cumulative.xaxis.set_major_locator(FixedLocator(ticks))
    cumulative.set(xlabel="eigenvalue λ", ylabel="fraction of eigenvalues ≤ λ",
                   title="Cumulative eigenvalue distribution")
    for axes in (by_rank, cumulative):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(results: Mapping, tables: Mapping[str, pd.DataFrame], figures: Mapping[str, bytes]) -> str:
    """The report page for ``results`` (the JSON document), its ``tables`` and PNG ``figures``."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(
        files("curvlab").joinpath("templates", "report.html.j2").read_text(encoding="utf-8"))
    rendered_tables = {
        name: {"columns": list(table.columns), "rows": table_rows(table),
               "legend": results.get("columns", {}).get(name, {})}
        for name, table in tables.items()
    }
    images = {name: base64.b64encode(png).decode("ascii") for name, png in figures.items()}
    return template.render(results=results, tables=rendered_tables, figures=images)


def to_json(results: Mapping) -> str:
    """``results`` as strict JSON (missing numbers as ``null``, never ``NaN``)."""
    return json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
