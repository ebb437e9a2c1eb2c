"""The cost study: what it measures per configuration, how it amortises updates, and how it fails."""

import pandas as pd
import pytest
import torch
from torch import nn

import curvlab
from curvlab import cost, cost_figures
from curvlab.cost import SGD_BASELINE, cost_study, interval_hyperparameters, measure

PNG = b"\x89PNG\r\n\x1a\n"


def mlp_and_data(examples: int = 32):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, (torch.randn(examples, 6), torch.randint(0, 3, (examples,)))


def test_measure_reports_the_median_and_counts_what_the_step_allocates():
    size = 40 * 2**20

    def build():
        def step():
            block = torch.ones(size // 4)  # 40 MiB of float32, freed after the step
            return block.sum()
        return step

    result = measure(build, repeats=3, warmup=1)
    assert len(result.times) == 3 and result.seconds == sorted(result.times)[1]
    if result.peak_bytes is not None:  # Linux: the peak resident set above the baseline
        assert result.peak_bytes >= 0.9 * size


def test_phase_seconds_split_an_optimizer_step_into_its_four_parts():
    model, (X, y) = mlp_and_data()
    opt = curvlab.optim.make("kfac", model, lr=0.01)
    opt.time_phases = True
    opt.step((X, y))
    assert list(opt.phase_seconds) == list(curvlab.optim.optimizer.PHASES)
    assert all(seconds >= 0 for seconds in opt.phase_seconds.values())
    assert opt.phase_seconds["statistics"] > 0 and opt.phase_seconds["inversion"] > 0
    untimed = curvlab.optim.make("kfac", model, lr=0.01)
    untimed.step((X, y))
    assert untimed.phase_seconds == {}


def test_interval_hyperparameters_name_each_method_s_own_update_schedule():
    assert interval_hyperparameters("kfac", 10) == {"curvature_update_interval": 10,
                                                    "preconditioner_update_interval": 10}
    assert interval_hyperparameters("soap", 10) == {"precondition_frequency": 10}
    assert interval_hyperparameters("psgd_kron", 10) == {"preconditioner_update_interval": 10}
    assert interval_hyperparameters("adam", 10) == {}


def test_cost_study_measures_every_configuration_against_sgd_and_amortises_updates():
    model, data = mlp_and_data()
    study = cost_study(model, data, optimizers=["adam", "kfac", "shampoo"], batch_sizes=(8, 16), intervals=(1, 4),
                       repeats=2, label="tiny")
    table = study.table
    assert list(table.columns) == list(cost.COLUMNS)
    assert len(table) == 2 * 2 * 4 and set(table["status"]) == {"ok"}
    assert set(table["model"]) == {"tiny"}
    baseline = table[table["optimizer"] == SGD_BASELINE]
    assert (baseline["time_ratio"] == 1.0).all()
    for optimizer in ("adam", "kfac", "shampoo"):
        rows = table[table["optimizer"] == optimizer]
        assert (rows["seconds_per_step"] > 0).all() and (rows["time_ratio"] > 0).all()
    kfac = table[(table["optimizer"] == "kfac") & (table["batch_size"] == 16)].set_index("interval")
    # Plain steps gather no statistics, so every-4-steps statistics cost a quarter of every-step ones.
    assert kfac.loc[4, "statistics_seconds"] <= kfac.loc[1, "statistics_seconds"] / 4 + 1e-3
    assert kfac.loc[1, "statistics_seconds"] > 0
    adam = table[(table["optimizer"] == "adam") & (table["batch_size"] == 8)]
    assert adam["seconds_per_step"].nunique() == 1  # no curvature: the interval changes nothing
    assert study.facts["torch"] == torch.__version__ and study.facts["batch sizes"] == [8, 16]
    assert model.training  # the caller's model is not touched


def test_cost_study_trains_only_the_selected_parameters():
    model, data = mlp_and_data()
    study = cost_study(model, data, optimizers=["sgd"], batch_sizes=(8,), intervals=(1,), repeats=1,
                       params=r"^2\.")
    assert study.facts["parameters"] == 3 * 8 + 3 and set(study.table["status"]) == {"ok"}


def failing(make, fail):
    """``curvlab.optim.make`` whose optimizers' ``step`` raises ``fail(name, batch)`` when that is not ``None``."""

    def make_failing(name, *args, **kwargs):
        opt = make(name, *args, **kwargs)
        step = opt.step

        def step_or_fail(batch):
            error = fail(name, batch)
            if error is not None:
                raise error
            return step(batch)

        opt.step = step_or_fail
        return opt

    return make_failing


def test_a_configuration_over_the_dense_budget_is_reported_not_measured(monkeypatch):
    model, data = mlp_and_data()
    monkeypatch.setattr(cost.optim, "make", failing(curvlab.optim.make, lambda name, batch: curvlab.DenseTooLarge(
        "the dense 99×99 Hessian is over the budget") if name == "newton" else None))
    table = cost_study(model, data, optimizers=["newton", "sgd"], batch_sizes=(8, 16), intervals=(1,),
                       repeats=1).table
    newton = table[table["optimizer"] == "newton"]
    assert len(newton) == 2 and all(status.startswith("too large: the dense 99×99") for status in newton["status"])
    assert newton["seconds_per_step"].isna().all()
    assert set(table[table["optimizer"] == "sgd"]["status"]) == {"ok"}


def test_a_method_whose_steps_make_the_parameters_non_finite_is_reported_as_diverged(monkeypatch):
    model, data = mlp_and_data()
    monkeypatch.setattr(cost.optim, "make", failing(curvlab.optim.make, lambda name, batch: curvlab.InvalidProblem(
        "non-finite values (nan or inf) in parameter(s) 0.weight; load a healthy checkpoint")
        if name == "kbfgs" else None))
    table = cost_study(model, data, optimizers=["kbfgs"], batch_sizes=(8,), intervals=(1,), repeats=1).table
    assert table[table["optimizer"] == "kbfgs"]["status"].str.startswith("diverged: non-finite").all()


def test_running_out_of_memory_stops_that_optimizer_s_sweep(monkeypatch):
    model, data = mlp_and_data()
    monkeypatch.setattr(cost.optim, "make", failing(curvlab.optim.make, lambda name, batch: RuntimeError(
        "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
        if name == "kfac" and len(batch[1]) >= 16 else None))
    table = cost_study(model, data, optimizers=["kfac", "adam"], batch_sizes=(8, 16, 32), intervals=(1,),
                       repeats=1).table
    kfac = table[table["optimizer"] == "kfac"].set_index("batch_size")["status"]
    assert kfac.to_dict() == {8: "ok", 16: cost.OUT_OF_MEMORY, 32: cost.OUT_OF_MEMORY}
    assert set(table[table["optimizer"] == "adam"]["status"]) == {"ok"}


def test_an_unexpected_error_is_not_swallowed(monkeypatch):
    model, data = mlp_and_data()
    monkeypatch.setattr(cost.optim, "make", failing(curvlab.optim.make, lambda name, batch: RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cost_study(model, data, optimizers=["kfac"], batch_sizes=(8,), intervals=(1,), repeats=1)


def test_one_pass_reaches_the_measured_optimizers(monkeypatch):
    model, data = mlp_and_data()
    built, make = [], curvlab.optim.make

    def recording(name, *args, **kwargs):
        built.append(make(name, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(cost.optim, "make", recording)
    table = cost_study(model, data, optimizers=["smw_ng", "seng"], batch_sizes=(8,), intervals=(1,), repeats=1,
                       hyperparameters={name: {"one_pass": True} for name in ("smw_ng", "seng")}).table
    assert set(table["status"]) == {"ok"} and built and all(opt.one_pass for opt in built)
    updating = [opt for opt in built if opt.steps and opt.method.curvature_update_interval == 1]
    assert updating and all(p.grad is None for opt in updating for p in opt.model.parameters())  # one-pass steps
    dropout = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    table = cost_study(dropout, data, optimizers=["smw_ng"], batch_sizes=(8,), intervals=(1,), repeats=1,
                       hyperparameters={"smw_ng": {"one_pass": True}}).table
    status = table[table["optimizer"] == "smw_ng"]["status"]
    assert status.str.startswith("not applicable: one_pass=True needs a model that computes the same").all()


def test_one_pass_true_measures_every_optimizer_that_can_take_one_pass_so(monkeypatch):
    model, data = mlp_and_data()
    built, make = [], curvlab.optim.make

    def recording(name, *args, **kwargs):
        built.append((name, kwargs.get("one_pass", False)))
        return make(name, *args, **kwargs)

    monkeypatch.setattr(cost.optim, "make", recording)
    study = cost_study(model, data, optimizers=["psgd_kron", "kfac", "seng"], batch_sizes=(8,), intervals=(1,),
                       repeats=1, one_pass=True, hyperparameters={"seng": {"one_pass": False}})
    assert set(study.table["status"]) == {"ok"}
    assert {name: one for name, one in built[3:]} == {"psgd_kron": True, "kfac": False, "seng": False}
    assert study.facts["hyperparameters"] == {"psgd_kron": {"one_pass": True}, "kfac": {}, "seng": {"one_pass": False}}


@pytest.mark.parametrize("arguments, fragment", [
    ({"optimizers": ["lbfgs"]}, "lbfgs"),
    ({"batch_sizes": (64,)}, "32 examples"),
    ({"batch_sizes": ()}, "batch_sizes is empty"),
    ({"intervals": (0,)}, "interval"),
    ({"optimizers": ["kfac"], "hyperparameters": {"adam": {"eps": 1e-6}}}, "not among the optimizers"),
    ({"optimizers": ["kfac"], "hyperparameters": {"kfac": {"dumping": 1.0}}}, "dumping"),
    ({"optimizers": ["kfac"], "hyperparameters": {"kfac": {"one_pass": True}}}, "one_pass"),
])
def test_bad_arguments_are_refused_before_any_timing(arguments, fragment):
    model, data = mlp_and_data()
    with pytest.raises(curvlab.InvalidProblem, match=fragment):
        cost_study(model, data, **arguments)


def test_cost_figures_draw_the_ratios_and_the_phases():
    rows = []
    for model in ("mlp", "cnn"):
        for optimizer in (SGD_BASELINE, "kfac", "seng"):
            for size in (32, 64):
                for interval in (1, 10):
                    rows.append({"model": model, "optimizer": optimizer, "batch_size": size, "interval": interval,
                                 "seconds_per_step": 0.1, "time_ratio": 2.0, "peak_mib": 5.0, "memory_ratio": 1.5,
                                 "gradient_seconds": 0.02, "statistics_seconds": 0.05, "inversion_seconds": 0.01,
                                 "application_seconds": 0.02, "status": "ok"})
    table = pd.DataFrame(rows)
    for png in (cost_figures.ratio_figure(table), cost_figures.ratio_figure(table, "memory_ratio"),
                cost_figures.phase_figure(table)):
        assert png.startswith(PNG)
    with pytest.raises(curvlab.InvalidProblem, match="unknown ratio"):
        cost_figures.ratio_figure(table, "seconds_per_step")
    with pytest.raises(curvlab.InvalidProblem, match="no measured optimizer"):
        cost_figures.ratio_figure(table[table["optimizer"] == SGD_BASELINE])


def test_cost_findings_name_the_cheapest_and_dearest_method_per_model():
    table = pd.DataFrame({"model": ["m"] * 3, "optimizer": [SGD_BASELINE, "kfac", "seng"], "batch_size": [64] * 3,
                          "interval": [1] * 3, "time_ratio": [1.0, 9.0, 3.0], "memory_ratio": [1.0, 2.0, 1.2],
                          "status": ["ok"] * 3})
    [finding] = cost.cost_findings(table)
    assert "seng is the cheapest at 3×" in finding and "kfac the dearest at 9×" in finding
