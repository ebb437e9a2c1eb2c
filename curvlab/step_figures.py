"""The figures of the report's steps section, drawn from a :func:`curvlab.compare_steps` table, as PNG bytes.

Each function takes the table (one row per optimizer, measured step and block) and draws the
whole-model rows (``block == "all"``) unless it is about blocks. Where a trajectory measured several
steps, the bar charts show the mean over the measured steps with their range as error bars, and the
sharpness figure one point per measured step.
"""

import math

import numpy as np
import pandas as pd
import seaborn
from matplotlib.figure import Figure

from curvlab.errors import InvalidProblem
from curvlab.figures import png

#: The reference steps, as their cosine columns and as they are labelled.
REFERENCE_LABELS = {"cos_natural_gradient": "natural gradient (G + λI)⁻¹g",
                    "cos_newton_abs": "saddle-free Newton (|H| + λI)⁻¹g",
                    "cos_newton": "Newton (H + λI)⁻¹g"}


def _whole_model(table: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    missing = [column for column in ("optimizer", "block", *columns) if column not in table.columns]
    if missing:
        raise InvalidProblem(f"the table lacks column(s) {', '.join(missing)}: pass the table compare_steps returns")
    rows = table[table["block"] == "all"]
    if rows.empty:
        raise InvalidProblem("the table has no whole-model rows (block == 'all'): pass the table compare_steps returns")
    return rows


def _order(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["optimizer"]))


def cosine_bars(table: pd.DataFrame) -> bytes:
    """A PNG bar chart: per optimizer, the cosine of its step with each exact reference step (whole model).

    Examples:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"optimizer": ["sgd"], "block": ["all"], "cos_natural_gradient": [0.5],
        ...                       "cos_newton_abs": [0.4], "cos_newton": [float("nan")]})
        >>> cosine_bars(table)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    rows = _whole_model(table, tuple(REFERENCE_LABELS))
    order = _order(rows)
    long = rows.melt(id_vars=["optimizer"], value_vars=list(REFERENCE_LABELS), var_name="reference",
                     value_name="cosine")
    long["reference"] = long["reference"].map(REFERENCE_LABELS)
    figure = Figure(figsize=(max(6.0, 0.6 * len(order) + 3), 4.4), dpi=100, layout="constrained")
    axes = figure.subplots()
    seaborn.barplot(long, x="optimizer", y="cosine", hue="reference", order=order, hue_order=list(REFERENCE_LABELS.values()),
                    errorbar=("pi", 100), ax=axes, palette="deep")
    axes.axhline(0, color="#444444", linewidth=0.8)
    axes.set_ylim(-1.05, 1.05)
    axes.set(xlabel="optimizer", ylabel="cos(step, reference step)", title="Agreement with the exact steps (whole model)")
    axes.tick_params(axis="x", labelrotation=45)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small", title=None)
    return png(figure)


def cosine_heatmap(table: pd.DataFrame, reference: str = "natural_gradient") -> bytes:
    """A PNG heat map of the cosine with the ``reference`` step per module (rows) and optimizer (columns).

    Needs the per-module rows of ``compare_steps(..., per_block=True)``; a trajectory's measured steps are averaged.
    """
    column = f"cos_{reference}"
    if column not in REFERENCE_LABELS:
        raise InvalidProblem(f"unknown reference {reference!r}; choose one of natural_gradient, newton_abs, newton")
    _whole_model(table, (column,))
    blocks = table[table["block"] != "all"]
    if blocks.empty:
        raise InvalidProblem("the table has no per-module rows: run compare_steps with per_block=True")
    grid = blocks.pivot_table(index="block", columns="optimizer", values=column, aggfunc="mean", dropna=False)
    grid = grid.reindex(index=list(dict.fromkeys(blocks["block"])), columns=_order(blocks))
    figure = Figure(figsize=(0.9 * grid.shape[1] + 2.8, 0.5 * grid.shape[0] + 2.2), dpi=100, layout="constrained")
    axes = figure.subplots()
    seaborn.heatmap(grid, ax=axes, annot=True, fmt=".2f", cmap="vlag_r", vmin=-1, vmax=1,
                    cbar_kws={"label": f"cos(step, {REFERENCE_LABELS[column]})"})
    axes.set(xlabel="optimizer", ylabel="module", title=f"Per-module agreement with the {reference.replace('_', ' ')} step")
    return png(figure)


def loss_change_figure(table: pd.DataFrame) -> bytes:
    """A PNG: per optimizer, the loss change ``L(θ − αd) − L(θ)`` after the line search, next to the quadratic model's.

    Bars: the actual change at the chosen ``α`` (written above each bar); dots: ``−(gᵀd)²/(2dᵀHd)``, the
    exact quadratic model's change at ``α*`` (left out where the model is unbounded along ``d``). The
    y axis is symmetric-logarithmic, linear near zero.
    """
    rows = _whole_model(table, ("loss_change", "quadratic_decrease", "line_search_alpha"))
    order = _order(rows)
    summary = rows.groupby("optimizer", sort=False).agg(
        loss_change=("loss_change", "mean"), low=("loss_change", "min"), high=("loss_change", "max"),
        model=("quadratic_decrease", lambda x: -float(np.mean(x))), alpha=("line_search_alpha", "median"),
    ).reindex(order)
    figure = Figure(figsize=(max(6.0, 0.6 * len(order) + 3), 4.4), dpi=100, layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(order))
    values = summary["loss_change"].to_numpy(dtype=float)
    errors = np.vstack([values - summary["low"].to_numpy(dtype=float), summary["high"].to_numpy(dtype=float) - values])
    axes.bar(positions, values, color=["#4c72b0" if v <= 0 else "#c44e52" for v in values], yerr=errors,
             capsize=3, label="actual, after the line search")
    model = summary["model"].to_numpy(dtype=float)
    shown = np.isfinite(model)
    axes.scatter(positions[shown], model[shown], color="black", zorder=3, s=18, label="quadratic model at α*")
    for x, value, alpha in zip(positions, values, summary["alpha"]):
        if math.isfinite(value):
            axes.annotate(f"α={alpha:.2g}", (x, value), textcoords="offset points", xytext=(0, 4 if value > 0 else -11),
                          ha="center", fontsize="x-small")
    finite = np.abs(np.concatenate([values[np.isfinite(values)], model[shown]]))
    finite = finite[finite > 0]
    axes.set_yscale("symlog", linthresh=float(finite.min()) if finite.size else 1e-8)
    axes.axhline(0, color="#444444", linewidth=0.8)
    axes.set_xticks(positions, order, rotation=45, ha="right")
    axes.set(xlabel="optimizer", ylabel="L(θ − αd) − L(θ)", title="Loss change along each step (whole model)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return png(figure)


def sharpness_figure(table: pd.DataFrame) -> bytes:
    """A PNG on a log scale: per optimizer, the preconditioned sharpness ``λ_max(P⁻¹H)`` against ``2/η`` and its method's threshold.

    A step is stable on the quadratic model while ``λ_max(P⁻¹H)`` stays below the method's threshold
    (``2/η`` without momentum, ``(2 + 2μ)/η`` with heavy-ball momentum, ``38/η`` for Adam's β₁ = 0.9).
    Optimizers without a linear map, or with ``λ_max ≤ 0``, have no point.
    """
    rows = _whole_model(table, ("sharpness", "threshold_2_over_lr", "stability_threshold"))
    order = _order(rows)
    position = {name: k for k, name in enumerate(order)}
    x = rows["optimizer"].map(position).to_numpy(dtype=float)
    figure = Figure(figsize=(max(6.0, 0.6 * len(order) + 3), 4.4), dpi=100, layout="constrained")
    axes = figure.subplots()
    for column, style in (("threshold_2_over_lr", dict(marker="_", s=400, color="#dd8452", label="2/η")),
                          ("stability_threshold", dict(marker="_", s=400, color="#55a868",
                                                       label="the method's stability threshold")),
                          ("sharpness", dict(marker="o", s=30, color="#4c72b0", label="λ_max(P⁻¹H)", zorder=3))):
        values = rows[column].to_numpy(dtype=float)
        shown = np.isfinite(values) & (values > 0)
        axes.scatter(x[shown], values[shown], **style)
    axes.set_yscale("log")
    axes.set_xticks(np.arange(len(order)), order, rotation=45, ha="right")
    axes.set_xlim(-0.6, len(order) - 0.4)
    axes.set(xlabel="optimizer", ylabel="eigenvalue", title="Preconditioned sharpness and the edge of stability")
    axes.grid(True, axis="y", which="both", alpha=0.3)
    axes.legend(fontsize="small")
    return png(figure)
