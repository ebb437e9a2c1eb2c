"""The analysis run (curvlab.compare), the built-in problem (curvlab.zoo) and the report directory."""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import curvlab
import reference
from curvlab.compare import Comparison, compare
from curvlab.report import ReportExists
from curvlab.zoo import default_problem
from models import make_case

SMALL_ZOO = dict(train_steps=20, hidden=8, analysis_examples=64)
ALL_KINDS = ["hessian", "abs_hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher"]


@pytest.fixture(scope="module")
def case():
    return make_case("mlp_ce")


@pytest.fixture(scope="module")
def result(case):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    return compare(prob, kinds=ALL_KINDS, seed=3, probes=4, steps=30, optimizers=["sgd", "kfac", "natural_gradient"],
                   progress=False)


def test_default_problem_is_deterministic_and_leaves_global_rng_alone():
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    first = default_problem(seed=1, **SMALL_ZOO).problem
    second = default_problem(seed=1, **SMALL_ZOO).problem
    other = default_problem(seed=2, **SMALL_ZOO).problem

    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert first.num_examples == 64 and first.dtype == torch.float64
    for name in first.param_names:
        assert torch.equal(first.params[name], second.params[name])
    assert not torch.equal(first.params["0.weight"], other.params["0.weight"])
    assert first.loss_value() == second.loss_value()


def test_spectra_match_eigvalsh_of_autograd_references(case, result):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    labels = curvlab.curvature(prob, "fisher_mc", seed=3).sampled_targets()
    spectra = result.tables["spectra"].set_index("kind")
    for kind in ALL_KINDS:
        if kind == "fisher_mc":
            dense = reference.mc_fisher(case.model, case.batches, case.loss, "mean", labels).detach()
        else:
            dense = reference.dense(kind, case.model, case.batches, case.loss, "mean")
        expected = torch.linalg.eigvalsh((dense + dense.T) / 2).numpy()
        scale = np.abs(expected).max()
        row = spectra.loc[kind]

        assert row["status"] == "dense"
        np.testing.assert_allclose(result.eigenvalues[kind], expected, rtol=0, atol=1e-10 * scale)
        assert row["trace"] == pytest.approx(dense.trace().item(), rel=1e-10)
        assert row["lambda_max"] == pytest.approx(expected[-1], rel=1e-10)
        assert row["lambda_min"] == pytest.approx(expected[0], rel=0, abs=1e-10 * scale)
        assert row["negative"] == (expected < -row["tolerance"]).sum()
        assert row["zero"] == (np.abs(expected) <= row["tolerance"]).sum()
        assert row["seconds"] >= 0 and row["products"] == prob.num_params
        top = result.tables["top_eigenvalues"].query("kind == @kind")
        np.testing.assert_allclose(top["eigenvalue"], expected[::-1][:len(top)], rtol=0, atol=1e-10 * scale)
    assert spectra.loc["hessian", "negative"] > 0
    assert (spectra.loc[["abs_hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher"], "negative"] == 0).all()


def test_parameter_table_counts_every_studied_parameter(case, result):
    parameters = result.tables["parameters"]
    assert parameters["parameter"].tolist() == case.param_names
    assert parameters["count"].sum() == sum(p.numel() for p in case.model.parameters())
    assert parameters["module"].tolist() == ["0", "0", "2", "2"]


def test_results_json_round_trips(result, tmp_path):
    index = result.to_html(tmp_path / "report")
    text = (tmp_path / "report" / "results.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    loaded = Comparison.load(tmp_path / "report" / "results.json")

    assert index == tmp_path / "report" / "index.html" and index.is_file()
    assert loaded.tables.keys() == result.tables.keys()
    for name, table in result.tables.items():
        pd.testing.assert_frame_equal(loaded.tables[name], table)
    assert loaded.eigenvalues.keys() == result.eigenvalues.keys()
    for kind, values in result.eigenvalues.items():
        np.testing.assert_array_equal(loaded.eigenvalues[kind], values)
    assert (loaded.findings, loaded.notes, loaded.provenance) == (result.findings, result.notes, result.provenance)


def test_layer_table_holds_the_spectra_of_the_dense_diagonal_blocks(case, result):
    dense = reference.dense("hessian", case.model, case.batches, case.loss, "mean")
    layers = result.tables["layers"].query("kind == 'hessian'").set_index("layer")
    for layer, index in (("0", slice(0, 48)), ("2", slice(48, 84))):
        values = torch.linalg.eigvalsh(dense[index, index]).numpy()
        assert layers.loc[layer, "lambda_max"] == pytest.approx(values[-1], rel=1e-10)
        assert layers.loc[layer, "lambda_min"] == pytest.approx(values[0], rel=1e-10)
        assert layers.loc[layer, "trace"] == pytest.approx(float(dense[index, index].trace()), rel=1e-10)
    abs_layers = result.tables["layers"].query("kind == 'abs_hessian'").set_index("layer")
    absolute = reference.abs_matrix(dense)[:48, :48]
    assert abs_layers.loc["0", "trace"] == pytest.approx(float(absolute.trace()), rel=1e-10)
    assert abs_layers.loc["0", "lambda_max"] == pytest.approx(torch.linalg.eigvalsh(absolute)[-1].item(), rel=1e-10)


def test_every_kind_has_an_slq_density_measured_against_the_dense_eigenvalues(result):
    spectra = result.tables["spectra"].set_index("kind")
    for kind in ALL_KINDS:
        density = result.densities[kind]
        assert density["nodes"].shape == density["weights"].shape == (4, 30)
        grid, values, exact = density["grid"], density["values"], result.eigenvalues[kind]
        distance = scipy.stats.wasserstein_distance(grid, exact, u_weights=values * (grid[1] - grid[0]))
        assert spectra.loc[kind, "slq_error"] == pytest.approx(distance / (exact[-1] - exact[0]), rel=1e-12)
        assert spectra.loc[kind, "slq_error"] < 0.1


def test_kind_over_the_memory_budget_is_estimated_matrix_free(case, monkeypatch, tmp_path):
    dense = reference.dense("hessian", case.model, case.batches, case.loss, "mean")
    values = torch.linalg.eigvalsh(dense).numpy()
    monkeypatch.setenv("CURVLAB_DENSE_BUDGET", "1")
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    result = compare(prob, kinds=["hessian"], k=4, probes=4, steps=30, approximations=(), optimizers=(),
                     progress=False)
    row = result.tables["spectra"].iloc[0]

    assert row["status"] == "matrix-free" and result.eigenvalues == {}
    assert row["lambda_max"] == pytest.approx(values[-1], rel=1e-6)
    assert row["lambda_min"] == pytest.approx(values[0], rel=1e-6)
    assert abs(row["trace"] - values.sum()) <= 3 * row["trace_std_error"] + 1e-10
    top = result.tables["top_eigenvalues"]
    assert top["converged"].all() and len(top) == 4
    assert pd.isna(row["zero"]) and pd.isna(row["asymmetry"])
    layers = result.tables["layers"].set_index("layer")
    assert layers.loc["2", "lambda_max"] == pytest.approx(torch.linalg.eigvalsh(dense[48:, 48:])[-1].item(), rel=1e-3)
    assert any("CURVLAB_DENSE_BUDGET" in note for note in result.notes)
    html = result.to_html(tmp_path / "report").read_text()
    assert "matrix-free" in html
    pd.testing.assert_frame_equal(Comparison.load(tmp_path / "report" / "results.json").tables["spectra"],
                                  result.tables["spectra"])


def test_unknown_kind_is_refused_before_any_work(case):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    with pytest.raises(curvlab.InvalidProblem, match="kinds"):
        compare(prob, kinds=["hessian", "laplacian"], progress=False)


def test_existing_report_is_replaced_only_with_force(result, tmp_path):
    target = tmp_path / "report"
    result.to_html(target)
    first = (target / "results.json").read_text()

    with pytest.raises(ReportExists, match="not empty"):
        result.to_html(target)
    assert (target / "results.json").read_text() == first

    result.to_html(target, force=True)
    assert sorted(path.name for path in target.iterdir()) == sorted(
        ["index.html", "results.json"] + [f"{name}.csv" for name in result.tables])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"]


def test_force_never_deletes_files_that_are_not_a_report(result, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(ReportExists):
            result.to_html(tmp_path, force=force)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_no_partial_report(result, tmp_path, monkeypatch, existing):
    target = tmp_path / "report"
    if existing:
        result.to_html(target)
    before = {path.name: path.read_bytes() for path in target.iterdir()} if existing else None
    write_text = pathlib.Path.write_text

    def interrupted_after_first_file(self, *args, **kwargs):
        if self.name == "results.json":
            raise KeyboardInterrupt
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", interrupted_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        result.to_html(target, force=True)

    assert [path.name for path in tmp_path.iterdir()] == (["report"] if existing else [])
    if existing:
        assert {path.name: path.read_bytes() for path in target.iterdir()} == before


def test_approximations_are_measured_against_the_curvature_each_stands_for(case, tmp_path):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    result = compare(prob, kinds=["ggn"], probes=2, steps=10, approximations=["kfac", "diag", "gram"],
                     optimizers=(), progress=False)
    table = result.tables["approximations"].set_index("approximation")
    dense = reference.dense("ggn", case.model, case.batches, case.loss, "mean")
    kfac = curvlab.approximate(prob, "kfac").to_dense(progress=False)
    alpha = float((kfac * dense).sum() / kfac.square().sum())
    assert table.loc["kfac", "curvature"] == "ggn" and table.loc["kfac", "mode"] == "dense"
    assert table.loc["kfac", "rel_fro"] == pytest.approx(float(torch.linalg.matrix_norm(kfac - dense)
                                                               / torch.linalg.matrix_norm(dense)), rel=1e-9)
    assert table.loc["kfac", "scale"] == pytest.approx(alpha, rel=1e-9)
    assert table.loc["gram", "curvature"] == "empirical_fisher" and table.loc["gram", "rel_fro"] < 1e-10
    modules = result.tables["approximation_modules"].query("approximation == 'diag'").set_index("module")
    block = dense[:48, :48]
    diagonal = torch.diag(block.diagonal())
    scale = float((diagonal * block).sum() / diagonal.square().sum())
    assert modules.loc["0", "rel_fro_scaled"] == pytest.approx(
        float(torch.linalg.matrix_norm(scale * diagonal - block) / torch.linalg.matrix_norm(block)), rel=1e-9)
    assert set(result.approximation_spectra) == {"kfac", "diag", "gram"}
    assert list(result.eigenvalues) == ["ggn"]
    html = result.to_html(tmp_path / "report").read_text()
    assert "Approximations" in html and "kfac" in html
    loaded = Comparison.load(tmp_path / "report" / "results.json")
    pd.testing.assert_frame_equal(loaded.tables["approximations"], result.tables["approximations"])
    np.testing.assert_array_equal(loaded.approximation_spectra["kfac"]["eigenvalues"],
                                  result.approximation_spectra["kfac"]["eigenvalues"])


def test_unknown_approximation_is_refused_before_any_work(case):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    with pytest.raises(curvlab.InvalidProblem, match="approximations"):
        compare(prob, kinds=["ggn"], approximations=["kfac", "bfgs"], progress=False)


def test_optimizer_steps_are_measured_per_module_and_reported(case, result, tmp_path):
    steps = result.tables["steps"]
    whole = steps[steps["block"] == "all"].set_index("optimizer")
    assert list(whole.index) == ["sgd", "kfac", "natural_gradient"]
    assert set(steps["block"]) == {"all", "0", "2"}
    assert whole.loc["natural_gradient", "cos_natural_gradient"] == pytest.approx(1.0, abs=1e-10)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    gradient = prob.gradient()
    natural = torch.linalg.solve(reference.dense("ggn", case.model, case.batches, case.loss, "mean")
                                 + 1e-3 * torch.eye(prob.num_params, dtype=torch.float64), gradient)
    assert whole.loc["sgd", "cos_natural_gradient"] == pytest.approx(
        float(gradient @ natural / (gradient.norm() * natural.norm())), rel=1e-9)
    assert any("closest to the damped natural gradient" in finding for finding in result.findings)
    html = result.to_html(tmp_path / "report").read_text()
    assert 'id="steps"' in html and html.count("data:image/png;base64,") == 8
    loaded = Comparison.load(tmp_path / "report" / "results.json")
    pd.testing.assert_frame_equal(loaded.tables["steps"], result.tables["steps"], check_dtype=False)


def test_unknown_optimizer_is_refused_before_any_work(case):
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss)
    with pytest.raises(curvlab.InvalidProblem, match="optimizers must be distinct names among sgd, adam"):
        compare(prob, kinds=["ggn"], optimizers=["adam", "lbfgs"], progress=False)
