"""The command line: `curvlab --version`, `curvlab compare`, exit codes and the report it writes."""

import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import curvlab
import curvlab.zoo
from curvlab_cli.main import cli


@pytest.fixture
def small_default(monkeypatch):
    """A smaller, faster built-in problem for `curvlab compare` (same code path, fewer steps and units)."""
    small = functools.partial(curvlab.zoo.default_problem, train_steps=20, hidden=8, analysis_examples=64)
    monkeypatch.setattr(curvlab.zoo, "default_problem", small)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"curvlab, version {curvlab.__version__}\n"


def test_help_shows_a_worked_example():
    for args in ([], ["compare"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0
        assert "Example" in result.output and "$ curvlab compare --out" in result.output


def test_compare_writes_a_self_contained_report(small_default, tmp_path):
    out = tmp_path / "report"
    result = invoke("compare", "--out", str(out), "--quiet", "--seed", "1")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out / 'index.html'}\n"
    assert result.stderr == ""
    html = (out / "index.html").read_text()
    results = json.loads((out / "results.json").read_text())
    for external in ('src="http', "src='http", "<script", "<link", "@import", "url("):
        assert external not in html
    assert "data:image/png;base64," in html
    assert results["provenance"]["seed"] == 1
    assert [row[0] for row in results["tables"]["spectra"]["rows"]] == [
        "hessian", "abs_hessian", "ggn", "fisher_mc", "empirical_fisher"]


def test_existing_report_exits_2_with_one_line_and_force_replaces_it(small_default, tmp_path):
    out = tmp_path / "report"
    assert invoke("compare", "--out", str(out), "--quiet").exit_code == 0
    first = (out / "results.json").read_text()

    refused = invoke("compare", "--out", str(out), "--quiet", "--seed", "1")
    assert refused.exit_code == 2
    assert refused.stdout == ""
    assert refused.stderr.startswith("Error: ") and refused.stderr.count("\n") == 1
    assert "--force" in refused.stderr
    assert (out / "results.json").read_text() == first

    forced = invoke("compare", "--out", str(out), "--quiet", "--seed", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "results.json").read_text())["provenance"]["seed"] == 1


def test_force_refuses_a_directory_with_other_files(small_default, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = invoke("compare", "--out", str(tmp_path), "--quiet", "--force")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and "keep.txt" in result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_curvlab_error_maps_to_exit_2_and_one_line_without_traceback(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise curvlab.InvalidProblem("the model is broken;\nfix it")

    monkeypatch.setattr(curvlab.zoo, "default_problem", refuse)
    result = invoke("compare", "--out", str(tmp_path / "report"), "--quiet")

    assert result.exit_code == 2
    assert result.stderr == "Error: the model is broken; fix it\n"
    assert not (tmp_path / "report").exists()


def test_keyboard_interrupt_exits_130_without_a_report(small_default, monkeypatch, tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # The module, not the attribute curvlab.compare (which the package may bind to the function).
    monkeypatch.setattr(importlib.import_module("curvlab.compare"), "compare", interrupt)
    result = invoke("compare", "--out", str(tmp_path / "report"), "--quiet")

    assert result.exit_code == 130
    assert "no report" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed_and_cli_is_not_a_top_level_module(tmp_path):
    script = Path(sys.executable).with_name("curvlab")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout == f"curvlab, version {curvlab.__version__}\n"
    stray = subprocess.run([sys.executable, "-c", "import cli"], cwd=tmp_path, capture_output=True, text=True)
    assert "ModuleNotFoundError" in stray.stderr
