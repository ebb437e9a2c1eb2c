"""Safe loading: curvlab bundles, torch.export archives, pickles, state_dicts, damaged files and data files.

The curvature of an exported program's module is checked against the autograd references of
tests/reference.py evaluated on the ORIGINAL module, and the Kronecker-factored approximations
against those of the original module, whose layers are real nn.Linear/nn.Conv2d.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

import curvlab
import models
import reference
from curvlab.io import exported_module, load_data

BATCH = torch.export.Dim("batch")


def _export(model: nn.Module, X) -> torch.export.ExportedProgram:
    return torch.export.export(model.eval(), (X,), dynamic_shapes=({0: BATCH},))


def _archive(tmp_path, model, X, name="model.pt2"):
    path = tmp_path / name
    torch.export.save(_export(model, X), path)
    return path


def _permutation(original: nn.Module, loaded: nn.Module) -> torch.Tensor:
    """Indices that reorder the loaded module's flat parameter vector into the original's order."""
    offsets, start = {}, 0
    for name, p in loaded.named_parameters():
        if p.requires_grad:
            offsets[name] = (start, p.numel())
            start += p.numel()
    ties = {"embed.weight": "out.weight"}  # the tied weight keeps the name the graph reads
    pieces = []
    for name, p in original.named_parameters():
        begin, count = offsets[name] if name in offsets else offsets[ties[name]]
        pieces.append(torch.arange(begin, begin + count))
    return torch.cat(pieces)


@pytest.mark.parametrize("name", ["mlp_ce", "cnn", "transformer"])
def test_exported_module_has_the_exact_curvature_of_the_original_float64(name, tmp_path):
    case = models.make_case(name)
    loaded = curvlab.load(_archive(tmp_path, case.model, case.data[0]))
    prob = curvlab.Problem(loaded.model, case.batches, loss=case.loss)

    assert loaded.format == "torch.export archive"
    assert prob.num_params == sum(p.numel() for p in case.model.parameters())
    for kind in ("hessian", "ggn", "empirical_fisher"):
        expected = reference.dense(kind, case.model, case.batches, case.loss, "mean")
        actual = curvlab.curvature(prob, kind).to_dense(progress=False)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    gradient = reference.gradient(case.model, case.batches, case.loss, "mean")
    torch.testing.assert_close(prob.gradient(), gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, layers", [("mlp_ce", ["0", "2"]), ("cnn", ["0", "4", "8"]),
                                          ("transformer", ["encoder.linear1", "encoder.linear2", "head"])])
def test_kronecker_approximations_see_the_rebuilt_layers_float64(name, layers, tmp_path):
    case = models.make_case(name)
    loaded = curvlab.load(_archive(tmp_path, case.model, case.data[0]))
    rebuilt = [module_name for module_name, module in loaded.model.named_modules()
               if type(module) in (nn.Linear, nn.Conv2d)]
    original = curvlab.Problem(case.model, case.batches, loss=case.loss)
    exported = curvlab.Problem(loaded.model, case.batches, loss=case.loss)

    assert rebuilt == layers and any("rebuilt" in note for note in loaded.notes)
    for kind in ("kfac", "ekfac", "diag"):
        expected, actual = curvlab.approximate(original, kind), curvlab.approximate(exported, kind)
        assert actual.exact_parameters == expected.exact_parameters
        torch.testing.assert_close(actual.to_dense(progress=False), expected.to_dense(progress=False),
                                   rtol=1e-10, atol=1e-12)


def test_tied_weight_stored_twice_is_studied_once_float64(tmp_path):
    case = models.make_case("tied")
    loaded = curvlab.load(_archive(tmp_path, case.model, case.data[0]))
    prob = curvlab.Problem(loaded.model, case.batches, loss=case.loss)
    order = _permutation(case.model, loaded.model)

    assert prob.num_params == sum(p.numel() for p in case.model.parameters())
    assert any("embed.weight" in note and "not studied" in note for note in loaded.notes)
    expected = reference.dense("hessian", case.model, case.batches, case.loss, "mean")
    actual = curvlab.curvature(prob, "hessian").to_dense(progress=False)
    torch.testing.assert_close(actual[order][:, order], expected, rtol=1e-10, atol=1e-12)


def test_bundle_round_trip_keeps_outputs_data_loss_and_training_mode(tmp_path):
    case = models.make_case("mlp_mse")
    X, y = case.data
    case.model.train()
    path = curvlab.save(tmp_path / "bundle.pt", case.model, data=(X, y), loss=nn.MSELoss(reduction="sum"),
                        reduction="sum")
    loaded = curvlab.load(path)

    assert case.model.training
    assert (loaded.format, loaded.loss, loaded.reduction) == ("curvlab bundle", "mse", "sum")
    torch.testing.assert_close(loaded.data[0], X, rtol=0, atol=0)
    torch.testing.assert_close(loaded.data[1], y, rtol=0, atol=0)
    fresh = torch.randn(7, X.shape[1], dtype=X.dtype)
    for inputs in (fresh, fresh[:1]):
        torch.testing.assert_close(loaded.model(inputs), case.model.eval()(inputs), rtol=0, atol=0)


def test_bundle_with_a_dict_of_inputs_and_one_example_round_trips(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 2)

        def forward(self, image, extra):
            return self.head(torch.tanh(self.a(image) + self.b(extra)))

    torch.manual_seed(0)
    model = TwoInputs().double()
    X = {"image": torch.randn(1, 3, dtype=torch.float64), "extra": torch.randn(1, 2, dtype=torch.float64)}
    loaded = curvlab.load(curvlab.save(tmp_path / "two.pt", model, data=(X, torch.tensor([1]))))
    fresh = {"image": torch.randn(5, 3, dtype=torch.float64), "extra": torch.randn(5, 2, dtype=torch.float64)}

    torch.testing.assert_close(loaded.model(**fresh), model(**fresh), rtol=0, atol=0)
    assert set(loaded.data[0]) == {"image", "extra"}


def test_save_refuses_labels_that_do_not_fit_the_loss(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(curvlab.InvalidProblem, match=r"labels must lie in \[0, 1\]"):
        curvlab.save(tmp_path / "bad.pt", model, data=(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, exported", [("transformer", "dropout"), ("batchnorm", "batch_norm")])
def test_program_exported_in_training_mode_is_refused(name, exported, tmp_path):
    case = models.make_case(name)
    program = torch.export.export(case.model.train(), (case.data[0],), dynamic_shapes=({0: BATCH},))
    with pytest.raises(curvlab.InvalidProblem, match=f"training mode.*{exported}.*model.eval()"):
        exported_module(program)


def test_program_with_a_fixed_batch_size_is_refused(tmp_path):
    model = nn.Linear(3, 2).eval()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 3),)), path)
    with pytest.raises(curvlab.InvalidProblem, match=r"fixed batch size.*Dim\('batch'\)"):
        curvlab.load(path)


def test_pickled_module_is_refused_without_trust_code_and_loaded_with_it(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    path = tmp_path / "pickled.pt"
    torch.save(model, path)
    with pytest.raises(curvlab.InvalidProblem, match=r"runs code.*--trust-code.*torch\.export\.save.*curvlab\.save"):
        curvlab.load(path)

    loaded = curvlab.load(path, trust_code=True)
    X = torch.randn(5, 3)
    assert loaded.format == "pickled nn.Module"
    torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)


def test_state_dict_gets_an_error_saying_what_to_save_instead(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    for trust in (False, True):
        with pytest.raises(curvlab.InvalidProblem, match=r"state_dict.*weight, bias.*curvlab\.save\("):
            curvlab.load(path, trust_code=trust)


def _damaged_files(tmp_path) -> dict:
    model, X = nn.Linear(3, 2), torch.randn(4, 3)
    whole = {"bundle": curvlab.save(tmp_path / "b.pt", model, data=(X, torch.tensor([0, 1, 1, 0]))),
             "archive": _archive(tmp_path, model, X), "pickle": tmp_path / "p.pt"}
    torch.save(model, whole["pickle"])
    rng = random.Random(0)
    files = {f"truncated {kind}": path.read_bytes()[:len(path.read_bytes()) // 2] for kind, path in whole.items()}
    files |= {"random bytes": rng.randbytes(4096), "random bytes after a pickle header": b"\x80" + rng.randbytes(4096),
              "empty": b""}
    paths = {}
    for index, (kind, content) in enumerate(files.items()):
        paths[kind] = tmp_path / f"damaged{index}.pt"
        paths[kind].write_bytes(content)
    return paths


def test_truncated_and_random_files_get_a_one_line_error(tmp_path):
    for kind, path in _damaged_files(tmp_path).items():
        for trust in (False, True):
            with pytest.raises(curvlab.InvalidProblem) as raised:
                curvlab.load(path, trust_code=trust)
            message = str(raised.value)
            assert "\n" not in message and str(path) in message, kind
            assert any(word in message for word in ("truncated", "damaged", "not a model file")), (kind, message)


def test_data_files_hold_tensors_or_dicts_of_tensors(tmp_path):
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    torch.save({"inputs": {"a": X, "b": X[:, :1]}, "targets": y}, tmp_path / "dict.pt")
    np.savez(tmp_path / "plain.npz", inputs=X.numpy(), targets=y.numpy())
    np.savez(tmp_path / "named.npz", **{"inputs.a": X.numpy(), "inputs.b": X[:, :1].numpy()}, targets=y.numpy())

    inputs, targets = load_data(tmp_path / "dict.pt")
    assert torch.equal(inputs["a"], X) and torch.equal(targets, y)
    inputs, targets = load_data(tmp_path / "plain.npz")
    assert torch.equal(inputs, X) and torch.equal(targets, y)
    inputs, targets = load_data(tmp_path / "named.npz")
    assert sorted(inputs) == ["a", "b"] and torch.equal(inputs["b"], X[:, :1])


def test_bad_data_files_are_refused_with_what_is_expected(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "keys.pt")
    torch.save({"inputs": nn.Linear(2, 2), "targets": torch.zeros(2)}, tmp_path / "objects.pt")
    np.savez(tmp_path / "keys.npz", x=np.zeros(2))
    (tmp_path / "data.csv").write_text("1,2\n")
    expected = {"keys.pt": r"'inputs' and 'targets'", "objects.pt": r"objects other than tensors",
                "keys.npz": r"'targets' and either 'inputs'", "data.csv": r"\.pt file .* or an \.npz",
                "missing.pt": r"does not exist"}
    for name, pattern in expected.items():
        with pytest.raises(curvlab.InvalidProblem, match=pattern):
            load_data(tmp_path / name)
