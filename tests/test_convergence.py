"""The accuracy-against-batch-size study and its offline tasks."""

import math

import pandas as pd
import pytest
import torch

import curvlab
from curvlab import convergence, tasks
from curvlab.convergence import best_points, convergence_study


@pytest.fixture(scope="module")
def small_study():
    """SGD at two learning rates, one of them absurd, and local K-FAC, on MNIST-1D for one epoch."""
    return convergence_study("mnist1d", optimizers={"sgd": ("sgd", {"momentum": 0.9}), "kfac_local": ("kfac", {})},
                             batch_sizes=[500, 1000], epochs=1, seeds=(0, 1),
                             grid={"sgd": {"lr": [0.05, 1e6]}, "kfac_local": {"lr": [0.05], "damping": [0.1]}})


def test_every_grid_point_seed_and_batch_size_is_one_run(small_study):
    runs = small_study.runs
    assert list(runs.columns) == [column for column in convergence.COLUMNS["accuracy_runs"] if column != "task"]
    assert len(runs) == (2 + 1) * 2 * 2
    assert runs[runs["optimizer"] == "sgd"]["damping"].isna().all()
    assert set(runs[runs["optimizer"] == "kfac_local"]["damping"]) == {0.1}
    assert small_study.facts["grids"]["sgd"] == {"lr": [0.05, 1e6]} and small_study.facts["epochs"] == 1


def test_a_diverging_learning_rate_is_marked_and_never_chosen(small_study):
    runs = small_study.runs
    assert runs[runs["lr"] == 1e6]["diverged"].all()
    assert not runs[runs["lr"] == 0.05]["diverged"].any()
    best = small_study.best
    assert (best[best["optimizer"] == "sgd"]["lr"] == 0.05).all()
    assert (best[best["optimizer"] == "sgd"]["diverged_points"] == 1).all()
    trained = runs[~runs["diverged"]]
    assert (trained["final_test_accuracy"] > 0.1).all() and trained["final_test_accuracy"].mean() > 0.15  # chance: 0.1


def test_the_same_seeds_give_the_same_runs(small_study):
    again = convergence_study("mnist1d", optimizers={"sgd": ("sgd", {"momentum": 0.9})}, batch_sizes=[500],
                              epochs=1, seeds=(0,), grid={"sgd": {"lr": [0.05]}})
    first = small_study.runs
    first = first[(first["optimizer"] == "sgd") & (first["batch_size"] == 500) & (first["lr"] == 0.05)
                  & (first["seed"] == 0)]
    columns = ["final_test_accuracy", "best_test_accuracy", "final_train_loss"]
    assert first[columns].to_numpy().tolist() == again.runs[columns].to_numpy().tolist()


def test_best_points_average_over_seeds_and_skip_diverged_points():
    runs = pd.DataFrame({
        "optimizer": ["a"] * 6, "method": ["kfac"] * 6, "batch_size": [32] * 6,
        "lr": [0.1, 0.1, 0.3, 0.3, 1.0, 1.0], "damping": [0.01] * 6, "seed": [0, 1] * 3,
        "final_test_accuracy": [0.8, 0.6, 0.75, 0.75, 0.99, 0.1],
        "diverged": [False, False, False, False, False, True]})
    [row] = best_points(runs).to_dict("records")
    assert row["lr"] == 0.3 and row["test_accuracy"] == pytest.approx(0.75) and row["test_accuracy_std"] == 0
    assert row["diverged_points"] == 1 and row["damping"] == 0.01
    all_diverged = best_points(runs.assign(diverged=True)).iloc[0]
    assert math.isnan(all_diverged["test_accuracy"]) and all_diverged["diverged_points"] == 3


def test_the_figure_and_the_findings_summarise_the_best_table(small_study):
    best = small_study.best.assign(task="mnist1d")
    assert convergence.accuracy_figure(best).startswith(b"\x89PNG\r\n\x1a\n")
    [finding] = convergence.accuracy_findings(best)
    assert finding.startswith("Accuracy on mnist1d: at batch 500")


@pytest.mark.parametrize("arguments, fragment", [
    ({"task": "cifar100"}, "unknown task"),
    ({"optimizers": ["lbfgs"]}, "lbfgs"),
    ({"batch_sizes": []}, "batch_sizes is empty"),
    ({"optimizers": ["sgd"], "grid": {"adam": {"lr": [0.1]}}}, "not among the optimizers"),
    ({"optimizers": ["sgd"], "grid": {"sgd": {"momentum": [0.9]}}}, "'lr'"),
    ({"scale": "huge"}, "unknown scale"),
    ({"seeds": ()}, "seeds is empty"),
])
def test_bad_arguments_are_refused_before_training(arguments, fragment):
    with pytest.raises(curvlab.InvalidProblem, match=fragment):
        convergence_study(**{"epochs": 1, "batch_sizes": [1000]} | arguments)


def test_the_default_grid_searches_damping_only_where_the_method_has_one():
    assert convergence.default_grid("kfac") == {"lr": (0.01, 0.03, 0.1), "damping": (1e-3, 1e-2)}
    assert convergence.default_grid("psgd_kron") == {"lr": (0.01, 0.03, 0.1)}
    assert set(convergence.default_grid("sgd")) == {"lr"}


def test_mnist1d_task_is_the_standard_split_with_the_study_s_mlp():
    task = tasks.task("mnist1d")
    assert task.X_train.shape == (4000, 40) and task.X_test.shape == (1000, 40)
    assert task.X_train.dtype == torch.float32 and task.y_train.dtype == torch.int64
    model = task.build_model(0)
    assert model(task.X_test[:5]).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


def test_cifar_like_task_is_reproducible_learnable_and_not_trivial():
    task = tasks.task("cifar_like", seed=0)
    again = tasks.task("cifar_like", seed=0)
    other = tasks.task("cifar_like", seed=1)
    assert task.X_train.shape == (2000, 3, 32, 32) and task.X_test.shape == (1000, 3, 32, 32)
    assert torch.equal(task.X_train, again.X_train) and torch.equal(task.y_test, again.y_test)
    assert not torch.equal(task.X_train, other.X_train)
    assert set(task.y_train.tolist()) == set(range(10))
    torch.testing.assert_close(task.X_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    # A linear classifier trained briefly beats chance by far but does not solve the task.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        classifier = torch.nn.Linear(3 * 32 * 32, 10)
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    X, y = task.X_train.flatten(1), task.y_train
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(classifier(X), y).backward()
        opt.step()
    accuracy = (classifier(task.X_test.flatten(1)).argmax(1) == task.y_test).float().mean().item()
    assert 0.3 < accuracy < 0.95
    assert task.build_model(0)(task.X_test[:2]).shape == (2, 10)
