"""The figures of the cost study (:func:`curvlab.cost_study`), drawn from its table as PNG bytes.

Like the seed study's: the ratio of each optimizer's time per step (or peak memory) to SGD's at the
same batch size, against the batch size, one line per optimizer, one panel per model and curvature
update interval; and where the time of a step goes.
"""

import math

import numpy as np
import pandas as pd
import seaborn
from matplotlib.figure import Figure

from curvlab.cost import SGD_BASELINE
from curvlab.errors import InvalidProblem
from curvlab.figures import png
from curvlab.optim.optimizer import PHASES

#: The ratio columns a figure can show, and their axis labels.
RATIOS = {"time_ratio": "time per step / SGD's", "memory_ratio": "peak memory / SGD's"}


def _measured(table: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    missing = [column for column in ("model", "optimizer", "batch_size", "interval", "status", *columns)
               if column not in table.columns]
    if missing:
        raise InvalidProblem(f"the table lacks column(s) {', '.join(missing)}: pass the table cost_study returns")
    rows = table[(table["status"] == "ok") & (table["optimizer"] != SGD_BASELINE)]
    if rows.empty:
        raise InvalidProblem("the table has no measured optimizer besides the SGD baseline")
    return rows


def ratio_figure(table: pd.DataFrame, column: str = "time_ratio") -> bytes:
    """A PNG: ``column`` (a ratio to SGD) against the batch size, one line per optimizer.

    One panel per model (columns) and update interval (rows; peak memory, which does not depend on the
    interval, only for the smallest); both axes logarithmic; the dashed line at 1 is SGD.

    Examples:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"model": ["mlp"] * 2, "optimizer": ["kfac"] * 2, "batch_size": [32, 64],
        ...                       "interval": [1, 1], "time_ratio": [3.0, 2.5], "status": ["ok", "ok"]})
        >>> ratio_figure(table)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    if column not in RATIOS:
        raise InvalidProblem(f"unknown ratio {column!r}; choose one of {', '.join(RATIOS)}")
    rows = _measured(table, (column,))
    rows = rows[np.isfinite(rows[column].to_numpy(dtype=float))]
    if rows.empty:
        raise InvalidProblem(f"the table has no finite {column}")
    models = list(dict.fromkeys(rows["model"]))
    intervals = sorted(set(rows["interval"]))[:1 if column == "memory_ratio" else None]
    order = list(dict.fromkeys(rows["optimizer"]))
    palette = dict(zip(order, seaborn.color_palette("tab20", len(order))))
    figure = Figure(figsize=(4.2 * len(models) + 2.2, 3.2 * len(intervals) + 0.6), dpi=100, layout="constrained")
    grid = figure.subplots(len(intervals), len(models), squeeze=False, sharey=True)
    for i, interval in enumerate(intervals):
        for j, model in enumerate(models):
            axes = grid[i][j]
            panel = rows[(rows["model"] == model) & (rows["interval"] == interval)]
            for name in order:
                line = panel[panel["optimizer"] == name].sort_values("batch_size")
                if not line.empty:
                    axes.plot(line["batch_size"], line[column], marker="o", markersize=3, color=palette[name],
                              label=name)
            axes.axhline(1.0, color="#444444", linestyle="--", linewidth=0.8)
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.grid(True, which="both", alpha=0.25)
            axes.set_title(f"{model} · update every {interval} step{'s' if interval > 1 else ''}", fontsize="medium")
            axes.set(xlabel="batch size", ylabel=RATIOS[column] if j == 0 else None)
    seen = {}
    for axes in grid.flat:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    figure.legend([seen[name] for name in order if name in seen], [name for name in order if name in seen],
                  loc="outside right upper", fontsize="small")
    return png(figure)


def phase_figure(table: pd.DataFrame, interval: int = 1) -> bytes:
    """A PNG: where the time of a step goes, per optimizer, at each model's largest measured batch size.

    Stacked bars of the gradient, curvature statistics, inversion and application seconds with
    updates every ``interval`` steps (one panel per model; logarithmic axis would hide the stacking,
    so the axis is linear in seconds).
    """
    columns = tuple(f"{phase}_seconds" for phase in PHASES)
    rows = _measured(table, columns)
    rows = rows[rows["interval"] == interval]
    if rows.empty:
        raise InvalidProblem(f"the table has no rows with interval {interval}")
    models = list(dict.fromkeys(rows["model"]))
    figure = Figure(figsize=(4.6 * len(models) + 1.0, 0.28 * rows["optimizer"].nunique() + 2.4), dpi=100,
                    layout="constrained")
    grid = figure.subplots(1, len(models), squeeze=False)
    colors = seaborn.color_palette("deep", len(PHASES))
    for axes, model in zip(grid[0], models):
        panel = rows[rows["model"] == model]
        largest = panel["batch_size"].max()
        panel = panel[panel["batch_size"] == largest].iloc[::-1]
        left = np.zeros(len(panel))
        for phase, color in zip(PHASES, colors):
            values = panel[f"{phase}_seconds"].to_numpy(dtype=float)
            axes.barh(panel["optimizer"], values, left=left, color=color, label=phase)
            left += np.nan_to_num(values)
        axes.set(xlabel="seconds per step", title=f"{model} · batch {largest} · updates every {interval}")
        axes.grid(True, axis="x", alpha=0.3)
        axes.tick_params(axis="y", labelsize="small")
        if math.isfinite(left.max()) and left.max() > 0:
            axes.set_xlim(0, 1.05 * left.max())
    grid[0][0].legend(fontsize="small", loc="lower right")
    return png(figure)


__all__ = ["RATIOS", "phase_figure", "ratio_figure"]
