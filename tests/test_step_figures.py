"""Each figure of the steps section is a PNG drawn from a compare_steps table, and the section's partial renders."""

import base64
import math
from importlib.resources import files

import jinja2
import pandas as pd
import pytest

import curvlab
from curvlab import step_figures
from curvlab.errors import InvalidProblem
from curvlab.report import table_rows
from models import make_case

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tables():
    case = make_case("cnn")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    names = ["sgd", "adam", "newton", "natural_gradient"]
    return {"one_shot": curvlab.compare_steps(prob, names, per_block=True, progress=False),
            "trajectory": curvlab.compare_steps(prob, names[:2], mode="trajectory", steps=3, per_block=True,
                                                progress=False)}


FIGURES = [step_figures.cosine_bars, step_figures.cosine_heatmap, step_figures.loss_change_figure,
           step_figures.sharpness_figure]


@pytest.mark.parametrize("mode", ["one_shot", "trajectory"])
@pytest.mark.parametrize("draw", FIGURES)
def test_each_step_figure_is_a_png(draw, mode, tables):
    png = draw(tables[mode])
    assert png.startswith(PNG) and len(png) > 10_000


def test_figures_refuse_tables_without_the_rows_they_draw(tables):
    whole = tables["one_shot"][tables["one_shot"].block == "all"]
    with pytest.raises(InvalidProblem, match="per_block=True"):
        step_figures.cosine_heatmap(whole)
    with pytest.raises(InvalidProblem, match="lacks column"):
        step_figures.sharpness_figure(pd.DataFrame({"optimizer": ["sgd"], "block": ["all"]}))
    with pytest.raises(InvalidProblem, match="newton_abs"):
        step_figures.cosine_heatmap(tables["one_shot"], reference="hessian")


def test_figures_draw_infinite_and_missing_values():
    table = pd.DataFrame({"optimizer": ["a", "b"], "block": ["all", "all"], "cos_natural_gradient": [0.5, math.nan],
                          "cos_newton_abs": [0.2, -0.3], "cos_newton": [math.nan, math.nan],
                          "loss_change": [-0.1, math.nan], "quadratic_decrease": [math.inf, 0.2],
                          "line_search_alpha": [1.0, 0.5], "sharpness": [math.nan, -1.0],
                          "threshold_2_over_lr": [20.0, 2.0], "stability_threshold": [38.0, 2.0]})
    for draw in (step_figures.cosine_bars, step_figures.loss_change_figure, step_figures.sharpness_figure):
        assert draw(table).startswith(PNG)


def test_steps_partial_renders_its_figures_table_and_note(tables):
    table = tables["one_shot"]
    macros = ('{% macro render_table(name) %}<table id="{{ name }}">{{ tables[name].rows | length }}</table>'
              '{% endmacro %}{% macro figure(name, caption, alt) %}{% if figures[name] is defined %}'
              '<img alt="{{ alt }}">{% endif %}{% endmacro %}{% include "steps.html.j2" %}')
    loader = jinja2.DictLoader({"steps.html.j2": files("curvlab").joinpath("templates", "steps.html.j2")
                                .read_text(encoding="utf-8"), "page": macros})
    environment = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    figures = {"step_cosines": base64.b64encode(step_figures.cosine_bars(table)).decode("ascii")}
    html = environment.get_template("page").render(
        tables={"steps": {"columns": list(table.columns), "rows": table_rows(table)}}, figures=figures)
    assert f'<table id="steps">{len(table)}</table>' in html
    assert html.count("<img") == 1 and "How these numbers were obtained" in html
    assert environment.get_template("page").render(tables={}, figures={}).strip() == ""
