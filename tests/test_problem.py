"""curvlab.Problem: bad input is refused at construction with a message naming the problem; good
input gives the loss, gradient, counts and reduction factor of the whole data set."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab
import models
import reference

C = 4  # classes of the mlp_ce case


def mlp_ce(device):
    case = models.make_case("mlp_ce", device)
    x, y = case.data
    return case.model, x, y


def mlp_mse(device):
    case = models.make_case("mlp_mse", device)
    x, y = case.data
    return case.model, x, y


def assert_invalid(match, build):
    """``build()`` raises InvalidProblem (a CurvlabError and a ValueError) whose message matches."""
    with pytest.raises(curvlab.InvalidProblem, match=match) as info:
        build()
    assert isinstance(info.value, curvlab.CurvlabError)
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------------------------
# refused at construction


def test_invalid_problem_is_a_curvlab_error():
    assert issubclass(curvlab.InvalidProblem, curvlab.CurvlabError)
    assert issubclass(curvlab.DenseTooLarge, curvlab.CurvlabError)


@pytest.mark.parametrize(
    "case_name, make_targets",
    [
        ("mlp_mse", lambda y: torch.zeros(y.shape[0], y.shape[1] + 1, dtype=y.dtype, device=y.device)),
        ("mlp_mse", lambda y: y[:, 0]),  # (N,) against outputs (N, D): torch would broadcast
        ("mlp_mse", lambda y: y[:-1]),
        ("mlp_bce", lambda y: y[:, :-1]),
        ("mlp_ce", lambda y: torch.zeros(y.shape[0], 2, dtype=y.dtype, device=y.device)),
        ("mlp_ce", lambda y: y[:-1]),
        ("transformer", lambda y: torch.cat([y, y[:, :1]], dim=1)),  # (N, T+1) against (N, T, C)
    ],
    ids=["mse-D+1", "mse-(N,)", "mse-N-1", "bce-D-1", "ce-(N,2)", "ce-N-1", "seq-ce-T+1"],
)
def test_mismatched_output_and_target_shapes_are_refused(case_name, make_targets, device):
    case = models.make_case(case_name, device)
    x, y = case.data
    assert_invalid(r"(?i)shape", lambda: curvlab.Problem(case.model, (x, make_targets(y)), loss=case.loss))


@pytest.mark.parametrize("bad_label", [-1, C], ids=["negative", "equal-to-C"])
def test_class_labels_out_of_range_are_refused(bad_label, device):
    model, x, y = mlp_ce(device)
    y = y.clone()
    y[-1] = bad_label  # in the last batch, so every batch must be checked
    batches = models.split_batch(x, y, models.SIZES)
    assert_invalid(r"(?i)label|class|range", lambda: curvlab.Problem(model, batches, loss="cross_entropy"))


def test_sequence_labels_out_of_range_are_refused(device):
    case = models.make_case("transformer", device)
    x, y = case.data
    y = y.clone()
    y[0, -1] = 4  # 4 classes
    assert_invalid(r"(?i)label|class|range", lambda: curvlab.Problem(case.model, (x, y), loss="cross_entropy"))


@pytest.mark.parametrize("where", ["input", "input-later-batch", "target"])
def test_non_finite_loss_is_refused(where, device):
    model, x, y = mlp_mse(device)
    x, y = x.clone(), y.clone()
    if where == "target":
        y[5, 1] = float("inf")
    else:
        x[2 if where == "input" else -1, 0] = float("nan")
    data = models.split_batch(x, y, models.SIZES) if where == "input-later-batch" else (x, y)
    assert_invalid(r"(?i)finite|nan|inf", lambda: curvlab.Problem(model, data, loss="mse"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters_are_refused(value, device):
    model, x, y = mlp_ce(device)
    with torch.no_grad():
        model[2].weight[1, 3] = value
    assert_invalid(r"(?i)finite|nan|inf", lambda: curvlab.Problem(model, (x, y), loss="cross_entropy"))


@pytest.mark.parametrize("kind", ["hessain", "fisher_exact", "", "GGN_mc"])
def test_unknown_kind_is_refused(kind, device):
    model, x, y = mlp_ce(device)
    prob = curvlab.Problem(model, (x, y), loss="cross_entropy")
    assert_invalid(r"(?i)kind|" + (kind or "curvature"), lambda: curvlab.curvature(prob, kind))


@pytest.mark.parametrize("loss", ["hinge", "crossentropy", nn.L1Loss(), nn.NLLLoss()], ids=str)
def test_unknown_loss_is_refused(loss, device):
    model, x, y = mlp_ce(device)
    assert_invalid(r"(?i)loss", lambda: curvlab.Problem(model, (x, y), loss=loss))


def test_unknown_reduction_is_refused(device):
    model, x, y = mlp_ce(device)
    assert_invalid(r"(?i)reduction", lambda: curvlab.Problem(model, (x, y), loss="cross_entropy", reduction="avg"))


@pytest.mark.parametrize("kind", ["no-batches", "zero-examples", "batch-of-zero"])
def test_empty_data_is_refused(kind, device):
    model, x, y = mlp_ce(device)
    data = {"no-batches": [], "zero-examples": (x[:0], y[:0]), "batch-of-zero": [(x[:0], y[:0])]}[kind]
    assert_invalid(r"(?i)empty|no (data|batch|example)|zero|example", lambda: curvlab.Problem(model, data, loss="cross_entropy"))


def test_model_whose_identical_passes_differ_is_refused(device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), models.RandomNoise(), nn.Linear(6, 4)).double().to(device)
    _, x, y = mlp_ce(device)
    assert_invalid(
        r"(?i)determinis|differ|identical|random|reproduc",
        lambda: curvlab.Problem(model, (x, y), loss="cross_entropy"),
    )


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(C, dtype=torch.float64)),
        nn.BCEWithLogitsLoss(pos_weight=torch.full((4,), 2.0, dtype=torch.float64)),
        nn.BCEWithLogitsLoss(weight=torch.full((4,), 2.0, dtype=torch.float64)),
    ],
    ids=["ce-label_smoothing", "ce-weight", "bce-pos_weight", "bce-weight"],
)
def test_unsupported_loss_options_are_refused(loss, device):
    case = models.make_case("mlp_ce" if isinstance(loss, nn.CrossEntropyLoss) else "mlp_bce", device)
    match = r"(?i)label_smoothing|smoothing" if getattr(loss, "label_smoothing", 0) else r"(?i)weight"
    assert_invalid(match, lambda: curvlab.Problem(case.model, case.data, loss=loss.to(device)))


@pytest.mark.parametrize(
    "loss, reduction",
    [(nn.MSELoss(reduction="sum"), "mean"), (nn.MSELoss(), "sum"), (nn.MSELoss(reduction="none"), "mean")],
    ids=["sum-vs-mean", "mean-vs-sum", "none"],
)
def test_loss_reduction_conflicting_with_the_argument_is_refused(loss, reduction, device):
    model, x, y = mlp_mse(device)
    assert_invalid(r"(?i)reduction", lambda: curvlab.Problem(model, (x, y), loss=loss, reduction=reduction))


@pytest.mark.parametrize("params", [r"^nothing$", ["0.weight", "no.such.parameter"], []], ids=["regex", "name", "empty-list"])
def test_parameter_selection_matching_nothing_is_refused(params, device):
    model, x, y = mlp_ce(device)
    assert_invalid(r"(?i)param|match|no\.such", lambda: curvlab.Problem(model, (x, y), loss="cross_entropy", params=params))


# ----------------------------------------------------------------------------------------------
# accepted input


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "case_name, module",
    [("mlp_ce", nn.CrossEntropyLoss), ("transformer", nn.CrossEntropyLoss), ("mlp_mse", nn.MSELoss), ("mlp_bce", nn.BCEWithLogitsLoss)],
)
def test_loss_module_instance_equals_named_loss(case_name, module, reduction, device):
    case = models.make_case(case_name, device)
    named = curvlab.Problem(case.model, case.data, loss=case.loss, reduction=reduction)
    instance = curvlab.Problem(case.model, case.data, loss=module(reduction=reduction), reduction=reduction)
    assert instance.reduction_factor == named.reduction_factor
    assert instance.loss_value() == pytest.approx(named.loss_value(), rel=1e-12)
    torch.testing.assert_close(instance.gradient(), named.gradient(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        curvlab.curvature(instance, "ggn").to_dense(), curvlab.curvature(named, "ggn").to_dense(), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "case_name, terms",
    [("mlp_ce", models.N), ("transformer", models.N * 4), ("tied", models.N * 5), ("mlp_mse", models.N * 3), ("mlp_bce", models.N * 4)],
    ids=["ce-(N,C)", "seq-ce-(N,T,C)", "seq-ce-tied", "mse-(N,D)", "bce-(N,D)"],
)
def test_num_examples_and_reduction_factor(case_name, terms, device):
    case = models.make_case(case_name, device)
    for data in (case.data, case.batches):
        mean = curvlab.Problem(case.model, data, loss=case.loss, reduction="mean")
        total = curvlab.Problem(case.model, data, loss=case.loss, reduction="sum")
        assert mean.num_examples == total.num_examples == models.N
        assert mean.reduction_factor == pytest.approx(1.0 / terms, rel=1e-15)
        assert total.reduction_factor == 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_name", models.CASE_NAMES)
def test_loss_and_gradient_match_autograd_on_all_data(case_name, reduction, device):
    case = models.make_case(case_name, device)
    prob = curvlab.Problem(case.model, case.batches, loss=case.loss, reduction=reduction)
    fresh = models.make_case(case_name, device)
    expected_loss = reference.loss(fresh.model, fresh.batches, fresh.loss, reduction)
    expected_grad = reference.gradient(fresh.model, fresh.batches, fresh.loss, reduction)
    assert isinstance(prob.loss_value(), float)
    assert prob.loss_value() == pytest.approx(float(expected_loss.detach()), rel=1e-12)
    torch.testing.assert_close(prob.gradient(), expected_grad, rtol=1e-12, atol=1e-12 * float(expected_grad.norm()))
    assert prob.num_params == expected_grad.numel()
    assert prob.dtype == torch.float64
    assert torch.device(prob.device).type == device.type


def test_model_is_put_in_eval_mode(device):
    case = models.make_case("transformer", device)
    case.model.train()
    curvlab.Problem(case.model, case.data, loss="cross_entropy")
    assert not any(m.training for m in case.model.modules())


def test_tied_weights_are_studied_once_in_named_parameters_order(device):
    case = models.make_case("tied", device)
    prob = curvlab.Problem(case.model, case.data, loss="cross_entropy")
    assert prob.param_names == ["embed.weight", "mid.weight", "mid.bias", "out.bias"]
    assert prob.num_params == 24 + 20 + 6


def test_names_given_out_of_order_are_studied_in_model_order(device):
    case = models.make_case("cnn", device)
    prob = curvlab.Problem(case.model, case.data, loss="cross_entropy", params=["8.weight", "0.bias", "4.weight"])
    assert prob.param_names == ["0.bias", "4.weight", "8.weight"]
    assert prob.num_params == 3 + 48 + 12


def test_floating_inputs_and_targets_are_cast_to_the_parameter_dtype(device):
    case = models.make_case("mlp_mse", device)
    x, y = case.data
    prob32 = curvlab.Problem(case.model, (x.float(), y.float()), loss="mse")
    expected = reference.loss(case.model, [(x.float().double(), y.float().double())], "mse", "mean")
    assert prob32.dtype == torch.float64
    assert prob32.loss_value() == pytest.approx(float(expected.detach()), rel=1e-12)


def test_dataloader_is_accepted_as_data(device):
    case = models.make_case("dict_inputs", device)
    x, y = case.data
    dataset = [({k: v[i] for k, v in x.items()}, y[i]) for i in range(models.N)]
    loader = DataLoader(dataset, batch_size=3)  # batches of 3, 3, 2
    from_loader = curvlab.Problem(case.model, loader, loss="bce")
    from_list = curvlab.Problem(case.model, case.batches, loss="bce")
    assert from_loader.num_examples == models.N
    assert from_loader.loss_value() == pytest.approx(from_list.loss_value(), rel=1e-12)
    torch.testing.assert_close(from_loader.gradient(), from_list.gradient(), rtol=1e-12, atol=1e-15)


def test_tensor_dataloader_is_accepted_as_data(device):
    model, x, y = mlp_ce(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # batches of 5, 3
    from_loader = curvlab.Problem(model, loader, loss="cross_entropy", reduction="sum")
    from_batch = curvlab.Problem(model, (x, y), loss="cross_entropy", reduction="sum")
    assert from_loader.num_examples == models.N
    torch.testing.assert_close(
        curvlab.curvature(from_loader, "hessian").to_dense(),
        curvlab.curvature(from_batch, "hessian").to_dense(),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("case_name", ["mlp_ce", "transformer"])
def test_with_batch_is_the_problem_built_on_that_batch(case_name, device):
    """An optimizer's cheap re-use of its problem on a new batch: products, gradient, counts as a fresh Problem."""
    case = models.make_case(case_name, device)
    X, y = case.data
    first, second = (X[:3], y[:3]), (X[3:], y[3:])
    built = curvlab.Problem(case.model, first, case.loss)
    with torch.no_grad():
        terms = built.likelihood.validate(case.model(second[0]), second[1])
    fresh = curvlab.Problem(case.model, second, case.loss)
    reused = built.with_batch(second, terms, fresh.loss_value())
    assert (reused.num_examples, reused.num_terms, reused.reduction_factor) == (
        fresh.num_examples, fresh.num_terms, fresh.reduction_factor)
    torch.testing.assert_close(reused.gradient(), fresh.gradient(), rtol=0, atol=0)
    v = torch.randn(fresh.num_params, dtype=fresh.dtype, device=fresh.device)
    torch.testing.assert_close(curvlab.curvature(reused, "ggn") @ v, curvlab.curvature(fresh, "ggn") @ v, rtol=0, atol=0)
    assert built.num_examples == 3  # the original is untouched


def test_with_batch_without_a_loss_takes_the_recorded_one_or_computes_it_float64():
    case = models.make_case("mlp_ce")
    X, y = case.data
    first, second = (X[:3], y[:3]), (X[3:], y[3:])
    built = curvlab.Problem(case.model, first, case.loss)
    fresh = curvlab.Problem(case.model, second, case.loss)
    terms = fresh.num_terms
    computed = built.with_batch(second, terms, None)
    assert not computed.loss_known
    assert computed.loss_value() == pytest.approx(fresh.loss_value(), rel=1e-14) and computed.loss_known
    recorded = built.with_batch(second, terms, None)
    recorded.record_loss(torch.tensor(1.5, dtype=torch.float64))
    recorded.record_loss(torch.tensor(2.5, dtype=torch.float64))  # known: kept as first recorded
    assert recorded.loss_value() == 1.5
    with pytest.raises(curvlab.InvalidProblem, match="loss is not finite"):
        built.with_batch(second, terms, None).record_loss(torch.tensor(float("nan")))
    gram = curvlab.approximate(built.with_batch(second, terms, None), "gram")  # the capture records its pass's loss
    assert gram.problem.loss_known and gram.problem.loss_value() == pytest.approx(fresh.loss_value(), rel=1e-13)


def test_optimizer_stops_with_a_clear_error_once_its_loss_is_non_finite():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = curvlab.optim.make("kfac", model, lr=1.0, damping=1e-2)
    X, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    opt.step((X, y))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(curvlab.InvalidProblem, match="non-finite"):
        opt.step((X, y))


def test_a_process_group_without_torch_distributed_is_refused():
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(curvlab.InvalidProblem, match="torch.distributed is not initialised"):
        curvlab.Problem(model, batch, process_group=object())
    with pytest.raises(curvlab.InvalidProblem, match="torch.distributed is not initialised"):
        curvlab.optim.make("kfac", model, process_group=object())


def test_a_distributed_sampler_that_repeats_examples_is_refused():
    dataset = TensorDataset(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(curvlab.InvalidProblem, match="repeating some of the 5"):
        curvlab.Problem(torch.nn.Linear(3, 2), DataLoader(dataset, batch_size=2, sampler=sampler))
    even = torch.utils.data.DistributedSampler(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])),
                                               num_replicas=2, rank=0, shuffle=False)
    prob = curvlab.Problem(torch.nn.Linear(3, 2), DataLoader(even.dataset, batch_size=2, sampler=even))
    assert prob.num_examples == 2
