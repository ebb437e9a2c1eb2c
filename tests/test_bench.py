"""``curvlab bench`` and ``curvlab compare --cost``: both studies as one report, from the library and the command line."""

import json

import pytest
from click.testing import CliRunner

import curvlab
from curvlab.bench import bench
from curvlab_cli.main import cli

TINY_ACCURACY = {"optimizers": ["sgd"], "batch_sizes": [1000], "epochs": 1, "grid": {"sgd": {"lr": [0.1]}}}


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def small_bench():
    return bench(["mlp"], optimizers=["sgd", "kfac"], batch_sizes=(8, 16), intervals=(1, 10), repeats=1,
                 tasks=["mnist1d"], convergence_options=TINY_ACCURACY)


def test_bench_runs_both_studies_into_three_tables(small_bench):
    tables = small_bench.tables
    assert set(tables) == {"cost", "accuracy", "accuracy_runs"}
    assert set(tables["cost"]["model"]) == {"mlp"} and set(tables["cost"]["status"]) == {"ok"}
    assert set(tables["cost"]["optimizer"]) == {"sgd (torch)", "sgd", "kfac"}
    assert tables["accuracy"].columns[0] == "task" and set(tables["accuracy"]["task"]) == {"mnist1d"}
    assert small_bench.facts["scale"] == "cpu" and "MLP 784-W-W-10" in small_bench.facts["cost: mlp"]
    assert any(finding.startswith("Cost of mlp") for finding in small_bench.findings)
    assert any(finding.startswith("Accuracy on mnist1d") for finding in small_bench.findings)


def test_bench_report_is_self_contained_with_every_figure_and_table(small_bench, tmp_path):
    index = small_bench.to_html(tmp_path / "bench")
    html = index.read_text()
    for section in ('id="cost"', 'id="accuracy"', 'id="run"', 'id="provenance"'):
        assert section in html
    assert html.count("data:image/png;base64,") == 4  # time, memory, phases, accuracy on mnist1d
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["format"] == "curvlab.bench/1" and set(results["tables"]) == {"cost", "accuracy", "accuracy_runs"}
    assert (tmp_path / "bench" / "cost.csv").exists()
    with pytest.raises(curvlab.report.ReportExists):
        small_bench.to_html(tmp_path / "bench")


def test_bench_command_writes_the_cost_report(tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", "--models", "mlp", "--optimizers", "sgd,adam,seng", "--batch-sizes", "8", "--intervals",
                    "1", "--repeats", "1", "--tasks", "none", "--one-pass", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out / 'index.html'}\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["tables"]) == {"cost"}
    assert results["provenance"]["options"]["optimizers"] == ["sgd", "adam", "seng"]
    assert results["facts"]["cost: one pass"] == "seng"


@pytest.mark.parametrize("args, fragment", [
    (["--batch-sizes", "0,8"], "positive integers"),
    (["--models", "lenet"], "lenet"),
    (["--models", "none", "--tasks", "none"], "nothing to run"),
    (["--scale", "huge"], "huge"),
])
def test_bench_command_refuses_bad_options_with_one_line(args, fragment, tmp_path):
    result = invoke("bench", *args, "--out", tmp_path / "bench", "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert not (tmp_path / "bench").exists()


def test_compare_with_cost_adds_the_cost_section_for_the_user_s_model(tmp_path):
    import torch
    from torch import nn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        X, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    curvlab.save(tmp_path / "mlp.pt", model, data=(X, y))
    out = tmp_path / "report"
    result = invoke("compare", tmp_path / "mlp.pt", "--curvature", "ggn", "--approximations", "none", "--optimizers",
                    "none", "--cost", "--cost-optimizers", "sgd,kfac,psgd_kron", "--cost-batch-sizes", "8,16",
                    "--cost-intervals", "1,10", "--repeats", "1", "--one-pass", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    columns = results["tables"]["cost"]["columns"]
    rows = [dict(zip(columns, row)) for row in results["tables"]["cost"]["rows"]]
    assert {(row["optimizer"], row["batch_size"], row["interval"]) for row in rows} == {
        (name, size, k) for name in ("sgd (torch)", "sgd", "kfac", "psgd_kron") for size in (8, 16) for k in (1, 10)}
    assert any(note.startswith("cost: ") and note.endswith("one pass of the model: psgd_kron")
               for note in results["notes"])
    html = (out / "index.html").read_text()
    assert 'id="cost"' in html and 'href="#cost"' in html
