"""The self-contained HTML report and its on-disk form: ``index.html`` next to ``results.json``.

The report is one HTML file with inline CSS, one inline script (sortable tables) and figures
embedded as base64 PNG; its content security policy forbids fetching anything, so it reads the same
offline. Next to it, ``results.json`` holds every number with units and provenance, and each table
is also a CSV file. A report directory is written completely into a temporary directory beside the
target and moved into place at the end, so an interrupted run never leaves a partial report; an
existing non-empty directory is replaced only when asked to. A ``screenshot.png`` that someone put
into a report directory is kept when the report is replaced.
"""

import base64
import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import seaborn
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from curvlab.errors import CurvlabError
from curvlab.figures import png


class ReportExists(CurvlabError, FileExistsError):
    """The report directory is not empty: replaced only with ``force=True``, and only if it holds just a report."""


REPORT_FILES = frozenset({"index.html", "results.json"})
#: Files a person may add to a report directory; replacing the report keeps them.
KEPT_FILES = frozenset({"screenshot.png"})


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or name in KEPT_FILES or re.fullmatch(r"[a-z_]+\.csv", name) is not None


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
    foreign = sorted(name for name in present if not _is_report_file(name))
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
            for name in KEPT_FILES:
                if (target / name).is_file() and name not in contents:
                    shutil.copy2(target / name, staging / name)
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


def table_rows(table: pd.DataFrame) -> list[list[tuple[str, bool, str | None]]]:
    """The cells of ``table`` row by row, each as ``(text, is_number, sort_key)``.

    The sort key of a number is its full value (``inf``/``-inf`` as such), of a missing value the
    empty string, and of text ``None`` (sorted by the text), so that the report's tables sort by
    value, not by the rounded text.
    """
    return [[(format_value(value), _is_number(value), _sort_key(value)) for value in row]
            for row in table.astype(object).itertuples(index=False)]


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _sort_key(value) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if not _is_number(value):
        return None
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(int(value))


def table_csvs(tables: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """``name.csv`` -> the table as CSV text (full precision; units and meanings are in ``results.json``)."""
    return {f"{name}.csv": table.to_csv(index=False) for name, table in tables.items()}


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
    return png(figure)


def density_figure(densities: Mapping[str, Mapping], eigenvalues: Mapping[str, np.ndarray]) -> bytes:
    """A PNG: per kind, the SLQ density of λ (top row) and of log₁₀(|λ| + ε) (bottom row) on a log-y axis.

    Where the dense eigenvalues exist their histogram, normalised as a density, is drawn underneath,
    so that the estimate can be judged against the truth.
    """
    kinds = list(densities)
    figure = Figure(figsize=(3.4 * len(kinds) + 0.6, 6.4), dpi=100, layout="constrained")
    axes = figure.subplots(2, len(kinds), squeeze=False)
    for column, kind in enumerate(kinds):
        density = densities[kind]
        exact = eigenvalues.get(kind)
        for row, (grid, values, width, transform, xlabel) in enumerate((
                (density["grid"], density["values"], density["width"], None, "eigenvalue λ"),
                (density["log_grid"], density["log_values"], density["log_width"],
                 lambda x: np.log10(np.abs(x) + density["log_eps"]), f"log₁₀(|λ| + {density['log_eps']:.1g})"))):
            ax = axes[row, column]
            if exact is not None:
                points = exact if transform is None else transform(exact)
                ax.hist(points, bins=60, density=True, color="#c9d6e3", label="dense eigenvalues")
            floor = max(float(np.max(values)) * 1e-7, np.finfo(np.float64).tiny)
            ax.plot(grid, np.maximum(values, floor), color="#1f5a99", linewidth=1.3, label=f"SLQ (σ = {width:.2g})")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor * 10)
            ax.set(xlabel=xlabel, ylabel="density" if column == 0 else None, title=kind if row == 0 else None)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
    return png(figure)


def error_heatmap(modules: pd.DataFrame) -> bytes:
    """A PNG heat map of each approximation's scaled Frobenius error per module (rows) and approximation (columns)."""
    table = modules.pivot(index="module", columns="approximation", values="rel_fro_scaled")
    table = table[list(dict.fromkeys(modules["approximation"]))].loc[list(dict.fromkeys(modules["module"]))]
    figure = Figure(figsize=(1.0 * table.shape[1] + 2.5, 0.5 * table.shape[0] + 1.8), dpi=100, layout="constrained")
    axes = figure.subplots()
    seaborn.heatmap(table, ax=axes, annot=True, fmt=".2f", cmap="viridis_r", vmin=0, vmax=1,
                    cbar_kws={"label": "min_α ‖αA − C‖_F / ‖C‖_F"})
    axes.set(xlabel="approximation", ylabel="module", title="Scaled error of each module's diagonal block")
    return png(figure)


def kept_eigenvalues_figure(spectra: Mapping[str, Mapping]) -> bytes:
    """A PNG: per approximation, its eigenvalues by rank against those of the exact matrix it stands for."""
    names = list(spectra)
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        entry = spectra[name]
        for values, label, style in ((entry["exact"], f"exact {entry['curvature']}", dict(color="#888888")),
                                     (entry["eigenvalues"], name, dict(color="#1f5a99"))):
            ordered = np.sort(np.abs(values))[::-1]
            ax.plot(np.arange(1, ordered.size + 1), np.maximum(ordered, np.finfo(np.float64).tiny), label=label,
                    linewidth=1.3, **style)
        ax.set(xscale="log", yscale="log", xlabel="rank i", ylabel="|λᵢ|", title=name)
        top = max(float(np.abs(entry["exact"]).max()), float(np.abs(entry["eigenvalues"]).max()))
        ax.set_ylim(top * 1e-10, top * 3)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return png(figure)


#: The facts of the summary table shown at the top of the report, in this order.
OVERVIEW = ("model", "data", "parameter selection", "studied parameters P", "examples N", "loss", "device", "dtype",
            "time taken")


def render_page(template: str, results: Mapping, tables: Mapping[str, pd.DataFrame], figures: Mapping[str, bytes],
                **context) -> str:
    """The page ``template`` (in ``curvlab/templates``) for ``results`` (the JSON document), its tables and PNG figures.

    Each table reaches the template as its columns, its rows (:func:`table_rows`) and the legend of its
    columns from ``results["columns"]``; each figure as base64 text; ``context`` as it is.
    """
    environment = jinja2.Environment(loader=jinja2.PackageLoader("curvlab", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    rendered_tables = {
        name: {"columns": list(table.columns), "rows": table_rows(table),
               "legend": results.get("columns", {}).get(name, {})}
        for name, table in tables.items()
    }
    images = {name: base64.b64encode(png).decode("ascii") for name, png in figures.items()}
    return environment.get_template(template).render(results=results, tables=rendered_tables, figures=images,
                                                     **context)


def render_html(results: Mapping, tables: Mapping[str, pd.DataFrame], figures: Mapping[str, bytes]) -> str:
    """The report page of :func:`curvlab.compare` for ``results`` (the JSON document), its ``tables`` and PNG ``figures``."""
    facts = {}
    if "summary" in tables:
        facts = {quantity: format_value(value) + (f" {unit}" if unit else "")
                 for quantity, value, unit in tables["summary"].astype(object).itertuples(index=False)}
    overview = [(quantity, facts[quantity]) for quantity in OVERVIEW if quantity in facts]
    title = str(facts.get("model", "")).split(",")[0]
    return render_page("report.html.j2", results, tables, figures, overview=overview, title=title)


def to_json(results: Mapping) -> str:
    """``results`` as strict JSON (missing numbers as ``null``, never ``NaN``)."""
    return json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
