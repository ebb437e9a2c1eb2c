"""The command line: every exit status, safe loading from files, and the report directory it writes."""

import csv
import functools
import importlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import curvlab
import curvlab.zoo
from curvlab_cli.main import cli

TABLES = ["summary", "parameters", "spectra", "top_eigenvalues", "layers", "approximations", "approximation_modules",
          "steps"]


@pytest.fixture
def small_default(monkeypatch):
    """A smaller, faster built-in problem for `curvlab compare` (same code path, fewer steps and units)."""
    small = functools.partial(curvlab.zoo.default_problem, train_steps=20, hidden=8, analysis_examples=64)
    monkeypatch.setattr(curvlab.zoo, "default_problem", small)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Model and data files of a small MLP (5 → 6 → 3, P = 57) in every format the command line meets."""
    folder = tmp_path_factory.mktemp("files")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        X, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    paths = {name: folder / name for name in ("mlp.pt", "model.pt2", "pickled.pt", "weights.pt", "data.npz",
                                              "narrow.pt", "labels.pt", "floats.pt", "truncated.pt", "random.pt")}
    curvlab.save(paths["mlp.pt"], model, data=(X, y))
    torch.export.save(torch.export.export(model.eval(), (X,), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      paths["model.pt2"])
    torch.save(model, paths["pickled.pt"])
    torch.save(model.state_dict(), paths["weights.pt"])
    np.savez(paths["data.npz"], inputs=X.numpy(), targets=y.numpy())
    torch.save({"inputs": X[:, :4], "targets": y}, paths["narrow.pt"])
    torch.save({"inputs": X, "targets": y + 5}, paths["labels.pt"])
    torch.save({"inputs": X, "targets": torch.randn(24, 3)}, paths["floats.pt"])
    whole = paths["mlp.pt"].read_bytes()
    paths["truncated.pt"].write_bytes(whole[:len(whole) // 2])
    paths["random.pt"].write_bytes(random.Random(0).randbytes(2048))
    return paths


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_line_error(result, status: int, *fragments: str) -> None:
    assert result.exit_code == status, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"curvlab, version {curvlab.__version__}\n"


def test_help_shows_worked_examples_and_the_valid_names():
    for args in ([], ["compare"], ["spectrum"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0
        assert "Example" in result.output and "$ curvlab " in result.output
    compare = invoke("compare", "--help").output
    for name in curvlab.KINDS + curvlab.APPROXIMATIONS:
        assert name in compare
    assert "--trust-code" in compare and "--max-examples" in compare and "--batch-size" in compare


def test_default_compare_writes_a_self_contained_report_with_one_csv_per_table(small_default, tmp_path):
    out = tmp_path / "report"
    result = invoke("compare", "--out", out, "--quiet", "--seed", "1")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out / 'index.html'}\n"
    assert result.stderr == ""
    html = (out / "index.html").read_text()
    results = json.loads((out / "results.json").read_text())
    for external in ("src=\"http", "src='http", "<script src", "<link", "@import", "url("):
        assert external not in html
    assert html.count("data:image/png;base64,") == 8 and "What matters most" in html
    assert {row[0] for row in results["tables"]["steps"]["rows"]} == set(curvlab.optim.names())
    assert results["provenance"]["seed"] == 1 and results["provenance"]["options"]["seed"] == 1
    assert [row[0] for row in results["tables"]["spectra"]["rows"]] == [
        "hessian", "abs_hessian", "ggn", "fisher_mc", "empirical_fisher"]
    summary = dict((row[0], row[1]) for row in results["tables"]["summary"]["rows"])
    assert summary["time taken"] > 0 and summary["examples N"] == 64
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["index.html", "results.json"] + [f"{name}.csv" for name in TABLES])
    for name in TABLES:
        with (out / f"{name}.csv").open() as file:
            rows = list(csv.reader(file))
        assert rows[0] == results["tables"][name]["columns"]
        assert len(rows) - 1 == len(results["tables"][name]["rows"])


def test_compare_on_a_bundle_uses_its_data_and_loss_and_reports_progress(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("compare", files["mlp.pt"], "--curvature", "hessian,ggn", "--approximations", "kfac,diag")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{Path('reports', 'mlp', 'index.html')}\n"
    for stage in ("curvature", "approximations", "figures"):
        assert stage in result.stderr
    results = json.loads((tmp_path / "reports" / "mlp" / "results.json").read_text())
    summary = dict((row[0], row[1]) for row in results["tables"]["summary"]["rows"])
    assert summary["model"].startswith("mlp.pt (curvlab bundle), 57 parameters")
    assert summary["examples N"] == 24 and summary["dtype"] == "float64"
    assert summary["loss"] == "cross_entropy, reduction=mean"
    approximations = {row[0]: row for row in results["tables"]["approximations"]["rows"]}
    assert set(approximations) == {"kfac", "diag"}


def test_steps_of_chosen_optimizers_along_a_trajectory(files, tmp_path):
    out = tmp_path / "steps"
    result = invoke("steps", files["mlp.pt"], "--optimizers", "sgd,adam,kfac", "--mode", "trajectory", "--steps",
                    "3", "--reference", "newton_abs", "--out", out, "--quiet")

    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    columns = results["tables"]["steps"]["columns"]
    rows = [dict(zip(columns, row)) for row in results["tables"]["steps"]["rows"]]
    assert {row["optimizer"] for row in rows} == {"sgd", "adam", "kfac"}
    assert {row["mode"] for row in rows} == {"trajectory"} and {row["reference"] for row in rows} == {"newton_abs"}
    assert [row[0] for row in results["tables"]["spectra"]["rows"]] == ["hessian", "ggn"]
    assert results["tables"]["approximations"]["rows"] == []


def test_unknown_optimizer_exits_2_naming_the_valid_ones(tmp_path):
    result = invoke("compare", "--optimizers", "adam,lbfgs", "--out", tmp_path / "report", "--quiet")
    assert_one_line_error(result, 2, "'lbfgs'", "sgd, adam")


def test_spectrum_of_an_export_archive_with_an_npz_data_file(files, tmp_path):
    out = tmp_path / "spectrum"
    result = invoke("spectrum", files["model.pt2"], "--data", files["data.npz"], "--curvature", "ggn",
                    "--max-examples", "10", "--batch-size", "4", "--params", r"^2\.", "--dtype", "float32",
                    "--out", out, "--quiet")

    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    summary = dict((row[0], row[1]) for row in results["tables"]["summary"]["rows"])
    assert summary["examples N"] == 10 and summary["studied parameters P"] == 21 and summary["dtype"] == "float32"
    assert summary["batches"] == "3 of at most 4 examples"
    assert results["tables"]["approximations"]["rows"] == []
    assert "Approximations</h2>" not in (out / "index.html").read_text()


def test_pickled_module_runs_only_with_trust_code(files, tmp_path):
    out = tmp_path / "report"
    refused = invoke("spectrum", files["pickled.pt"], "--data", files["data.npz"], "--out", out, "--quiet")
    assert_one_line_error(refused, 2, "--trust-code", "torch.export.save")
    assert not out.exists()

    trusted = invoke("spectrum", files["pickled.pt"], "--data", files["data.npz"], "--out", out, "--quiet",
                     "--trust-code", "--curvature", "ggn")
    assert trusted.exit_code == 0, trusted.output
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("args, fragments", [
    (["truncated.pt"], ["truncated or damaged"]),
    (["random.pt"], ["not a model file"]),
    (["weights.pt"], ["state_dict", "curvlab.save("]),
    (["model.pt2"], ["holds no data", "--data"]),
    (["model.pt2", "--data", "narrow.pt"], ["model failed on batch 0"]),
    (["model.pt2", "--data", "labels.pt"], ["labels must lie in [0, 2]"]),
    (["model.pt2", "--data", "floats.pt"], ["--loss mse", "--loss bce"]),
    (["model.pt2", "--data", "data.npz", "--loss", "mse"], ["mse"]),
    (["model.pt2", "--data", "data.npz", "--params", "nothing"], ["matches no trainable parameter"]),
    (["mlp.pt", "--curvature", "hessian,laplacian"], ["'laplacian'", "empirical_fisher", "--help"]),
    (["mlp.pt", "--approximations", "kfac,bfgs"], ["'bfgs'", "psgd_kron"]),
    (["mlp.pt", "--curvature", "ggn,ggn"], ["more than once"]),
    (["mlp.pt", "--loss", "hinge"], ["'hinge'", "cross_entropy"]),
    (["mlp.pt", "--max-examples", "0"], ["--max-examples"]),
    (["mlp.pt", "--colour"], ["No such option", "--colour"]),
    (["missing.pt"], ["does not exist"]),
    (["--data", "data.npz"], ["--data needs a MODEL"]),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, tmp_path, args, fragments):
    args = [files.get(arg, arg) for arg in args]
    args = [files["model.pt2"].parent / arg if arg == "missing.pt" else arg for arg in args]
    out = tmp_path / "report"
    assert_one_line_error(invoke("compare", *args, "--out", out, "--quiet"), 2, *fragments)
    assert not out.exists()


def test_dense_analysis_over_the_memory_budget_exits_3_naming_the_matrix_free_alternative(files, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1000")
    out = tmp_path / "report"
    result = invoke("compare", files["mlp.pt"], "--dense", "--dtype", "float64", "--out", out, "--quiet")
    assert_one_line_error(result, 3, "57×57", "without --dense", "matrix-free", "CURVLAB_DENSE_BUDGET")
    assert not out.exists()


def test_internal_error_exits_1_with_the_traceback_only_under_debug(files, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    # The module, not the attribute curvlab.compare (which the package binds to the function).
    monkeypatch.setattr(importlib.import_module("curvlab.compare"), "compare", broken)
    plain = invoke("spectrum", files["mlp.pt"], "--out", tmp_path / "a", "--quiet")
    assert_one_line_error(plain, 1, "internal error: RuntimeError: boom", "--debug")

    debug = invoke("spectrum", files["mlp.pt"], "--out", tmp_path / "b", "--quiet", "--debug")
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and 'raise RuntimeError("boom")' in debug.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_report_exits_2_with_one_line_and_force_replaces_it_keeping_a_screenshot(files, tmp_path):
    out = tmp_path / "report"
    quick = [files["mlp.pt"], "--curvature", "ggn", "--approximations", "none", "--out", out, "--quiet"]
    assert invoke("compare", *quick).exit_code == 0
    first = (out / "results.json").read_text()

    (out / "screenshot.png").write_bytes(b"a picture of the report")

    refused = invoke("compare", *quick, "--seed", "1")
    assert_one_line_error(refused, 2, "--force")
    assert (out / "results.json").read_text() == first

    forced = invoke("compare", *quick, "--seed", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "results.json").read_text())["provenance"]["seed"] == 1
    assert (out / "screenshot.png").read_bytes() == b"a picture of the report"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"]


def test_force_refuses_a_directory_with_other_files(files, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = invoke("compare", files["mlp.pt"], "--out", tmp_path, "--quiet", "--force")
    assert_one_line_error(result, 2, "keep.txt")
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_curvlab_error_maps_to_exit_2_and_one_line_without_traceback(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise curvlab.InvalidProblem("the model is broken;\nfix it")

    monkeypatch.setattr(curvlab.zoo, "default_problem", refuse)
    result = invoke("compare", "--out", tmp_path / "report", "--quiet")

    assert result.exit_code == 2
    assert result.stderr == "Error: the model is broken; fix it\n"
    assert not (tmp_path / "report").exists()


def test_ctrl_c_exits_130_and_leaves_no_report(tmp_path):
    out = tmp_path / "reports" / "default"
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # A shell without job control starts background commands with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: restore the default so that the test means the same there.
    process = subprocess.Popen([Path(sys.executable).with_name("curvlab"), "compare", "--out", str(out)],
                               cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    while b"training" not in seen:  # the built-in model is being trained: well inside the run
        chunk = process.stderr.read1(4096)
        assert chunk, f"curvlab ended before training: {seen.decode()}"
        seen += chunk
    # Once the run is under way, Ctrl-C, and again if it has not ended 15 s later: on a loaded machine
    # one signal was seen to go unanswered (cause unknown); a run that ignores SIGINT still fails here.
    for _ in range(4):
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        process.kill()
        pytest.fail("curvlab kept running for 60 s of Ctrl-C")

    assert process.returncode == 130, (seen + stderr).decode()
    assert stdout == b"" and b"Interrupted: no report was written." in stderr
    assert b"Traceback" not in seen + stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_console_script_is_installed_and_cli_is_not_a_top_level_module(tmp_path):
    script = Path(sys.executable).with_name("curvlab")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout == f"curvlab, version {curvlab.__version__}\n"
    stray = subprocess.run([sys.executable, "-c", "import cli"], cwd=tmp_path, capture_output=True, text=True)
    assert "ModuleNotFoundError" in stray.stderr
