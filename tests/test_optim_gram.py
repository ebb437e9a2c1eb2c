"""SMW-NG and SENG take the damped empirical-Fisher natural gradient, whole or per layer; compat="asdl" SENG is ASDL's formula."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.errors import InvalidProblem
from curvlab.optim import Statistics
from models import make_case
import reference
from reference import example_losses, forward, gradient, reduction_factor


def _example_gradients(model, batches, loss_name, names):
    """``U`` ``(N, P)``: the gradient of each example's summed loss, one autograd call per example."""
    named = dict(model.named_parameters())
    params = [named[name] for name in names]
    rows = []
    for x, y in batches:
        losses = example_losses(forward(model, x), y, loss_name)
        for n in range(losses.numel()):
            grads = torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, params)]))
    return torch.stack(rows)


def _module_blocks(names):
    """Flat index ranges of the parameters grouped by their owning module (the name up to the last dot)."""
    blocks, start = {}, 0
    for name, size in names:
        blocks.setdefault(name.rpartition(".")[0], []).extend(range(start, start + size))
        start += size
    return list(blocks.values())


def _dense_natural_gradient(model, batches, loss_name, damping, per_layer):
    """``(E + λI)⁻¹ ḡ`` with ``E = R UᵀU``, whole or restricted to each module's block; and the matrix ``(E + λI)⁻¹``."""
    names = [name for name, _ in model.named_parameters()]
    U = _example_gradients(model, batches, loss_name, names)
    E = reduction_factor(batches, "mean") * U.T @ U
    if per_layer:
        mask = torch.zeros_like(E, dtype=torch.bool)
        for block in _module_blocks([(name, p.numel()) for name, p in model.named_parameters()]):
            index = torch.tensor(block)
            mask[index[:, None], index[None, :]] = True
        E = torch.where(mask, E, 0)
    inverse = torch.linalg.inv(E + damping * torch.eye(E.shape[0], dtype=E.dtype))
    return inverse @ gradient(model, batches, loss_name, "mean"), inverse


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn", "mlp_mse"])
@pytest.mark.parametrize("name, per_layer", [("smw_ng", False), ("seng", True)])
def test_one_shot_step_is_the_dense_damped_empirical_fisher_natural_gradient_float64(case_name, name, per_layer):
    case = make_case(case_name)
    damping = 1e-2
    expected, inverse = _dense_natural_gradient(case.model, case.batches, case.loss, damping, per_layer)
    problem = curvlab.Problem(case.model, case.batches, case.loss)
    direction, linear = curvlab.optim.one_shot(curvlab.optim.method(name, damping=damping), problem)
    torch.testing.assert_close(problem.flatten(direction), expected, rtol=1e-10, atol=1e-12)
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(problem.flatten(linear(problem.unflatten(v))), inverse @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, per_layer", [("smw_ng", False), ("seng", True)])
def test_training_directions_follow_each_batch_and_the_update_interval_float64(name, per_layer):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    interval = 2 if name == "seng" else 1
    hyper = {"damping": 1e-2, **({"curvature_update_interval": interval} if name == "seng" else {})}
    opt = curvlab.optim.make(name, model, case.loss, lr=0.05, **hyper)
    inverse = None
    for step, batch in enumerate(case.batches * 2):
        if step % interval == 0:
            _, inverse = _dense_natural_gradient(model, [batch], case.loss, 1e-2, per_layer)
        g = gradient(model, [batch], case.loss, "mean")
        opt.step(batch)
        direction = torch.cat([opt.last_direction[n].reshape(-1) for n, _ in model.named_parameters()])
        torch.testing.assert_close(direction, inverse @ g, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case_name, train", [("mlp_ce", True), ("mlp_mse", True), ("cnn", False)])
@pytest.mark.parametrize("name, per_layer", [("smw_ng", False), ("seng", True)])
def test_one_pass_steps_are_the_dense_damped_natural_gradient_float64(case_name, train, name, per_layer):
    # The step from the Gram form alone, U (K + λI)⁻¹ √R 1 per block, against (E + λI)⁻¹ ḡ from autograd; the
    # two-pass step reaches it through ḡ/λ − U(…)Uᵀḡ/λ, whose cancellation (ε·‖E‖/λ ≈ 1e-13 here) sets the rtol.
    case = make_case(case_name)
    model = copy.deepcopy(case.model).train(train)
    interval = 2 if name == "seng" else 1
    hyper = {"damping": 1e-2, **({"curvature_update_interval": interval} if name == "seng" else {})}
    opt = curvlab.optim.make(name, model, case.loss, lr=0.05, one_pass=True, **hyper)
    inverse = None
    for step, batch in enumerate(case.batches * 2):
        if step % interval == 0:
            _, inverse = _dense_natural_gradient(model, [batch], case.loss, 1e-2, per_layer)
        g = gradient(model, [batch], case.loss, "mean")
        loss = float(reference.loss(model, [batch], case.loss, "mean").detach())
        assert opt.step(batch) == pytest.approx(loss, rel=1e-12)
        direction = torch.cat([opt.last_direction[n].reshape(-1) for n, _ in model.named_parameters()])
        torch.testing.assert_close(direction, inverse @ g, rtol=1e-9, atol=1e-11)
        one_pass = step % interval == 0
        assert all((p.grad is None) == one_pass for p in model.parameters()), step
    assert model.training == train


@pytest.mark.parametrize("case_name, hyper, rtol", [
    ("mlp_ce", {"sketching_size": 2}, 1e-9),  # batches of 3, 5: the sketch of 2 columns is drawn on both
    # ASDL's SENG: ḡ of each Linear/Conv2d layer from its inputs and output gradients (R Σ e aᵀ), other
    # parameters' raw gradient from a pass of their own (the layer norm)
    ("mlp_ce", {"compat": "asdl", "sketching_size": 256}, 1e-10),
    ("mlp_ce", {"compat": "asdl", "sketching_size": 3}, 1e-10),
    ("cnn", {"compat": "asdl", "sketching_size": 2}, 1e-10),
    ("layernorm", {"compat": "asdl", "sketching_size": 3}, 1e-10),
])
def test_one_pass_seng_takes_the_two_pass_step_float64(case_name, hyper, rtol):
    """The same sketches in one pass and in two, so the steps agree to rounding."""
    case = make_case(case_name)
    models_ = [copy.deepcopy(case.model) for _ in range(2)]
    opts = [curvlab.optim.make("seng", model, case.loss, lr=0.05, damping=1e-2, one_pass=one_pass, **hyper)
            for model, one_pass in zip(models_, (False, True))]
    for batch in case.batches * 2:
        losses = [opt.step(batch) for opt in opts]
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
        for name in opts[0].last_direction:
            torch.testing.assert_close(opts[1].last_direction[name], opts[0].last_direction[name], rtol=rtol,
                                       atol=rtol / 100)


@pytest.mark.parametrize("name, hyper, one_pass", [("smw_ng", {}, False), ("smw_ng", {}, True),
                                                    ("seng", {"compat": "asdl"}, True)])
def test_a_curvature_step_drops_the_old_gram_state_before_building_the_new_one(name, hyper, one_pass):
    """``release`` gives ``None``: the whole state is rebuilt from the batch, so the old one is freed first."""
    case = make_case("mlp_ce")
    method = curvlab.optim.method(name, damping=1e-2, **hyper)
    pre, seen = method.preconditioner, []

    def spy(function):
        def recorded(state, statistics):
            seen.append(state)
            return function(state, statistics)
        return recorded

    spied = dataclasses.replace(method, preconditioner=dataclasses.replace(
        pre, accumulate=spy(pre.accumulate), step_from_statistics=spy(pre.step_from_statistics)))
    opt, twin = (curvlab.optim.PreconditionedOptimizer(copy.deepcopy(case.model), m, case.loss, lr=0.05,
                                                       one_pass=one_pass) for m in (spied, method))
    for batch in case.batches * 2:
        opt.step(batch), twin.step(batch)
        for key, direction in twin.last_direction.items():
            torch.testing.assert_close(opt.last_direction[key], direction, rtol=0, atol=0)
    assert len(seen) == 2 * len(case.batches) and all(state is None for state in seen)
    assert opt.preconditioner_state is not None


def test_one_pass_refuses_models_that_differ_between_training_and_eval_mode_and_leaves_their_state():
    case = make_case("cnn")  # batch norm
    model = copy.deepcopy(case.model).train()
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.random.get_rng_state()
    opt = curvlab.optim.make("smw_ng", model, case.loss, lr=0.05, one_pass=True)
    with pytest.raises(InvalidProblem, match="same in training and eval mode"):
        opt.step(case.batches[0])
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.random.get_rng_state()) and model.training
    dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(InvalidProblem, match="same in training and eval mode"):
        curvlab.optim.make("seng", dropout, lr=0.1, one_pass=True).step(batch)
    curvlab.optim.make("seng", dropout.eval(), lr=0.1, one_pass=True).step(batch)  # eval mode: nothing to differ


@pytest.mark.parametrize("name, hyper", [("smw_ng", {"damping": 1e-2}), ("seng", {"damping": 1e-2}),
                                         ("seng", {"compat": "asdl", "damping": 1e-2}), ("psgd_kron", {})])
def test_a_one_pass_step_runs_the_model_once_on_the_batch_and_returns_that_pass_loss_float64(name, hyper):
    """Besides the statistics' pass only the check of the targets on one example (and the Gram capture's own
    probe of two) runs the model (the layers' shapes come from a pass on the meta device, without arithmetic); the
    loss returned is that pass's, at the parameters before the step."""
    case = make_case("mlp_ce")  # batches of 3, 1 and 4
    model = copy.deepcopy(case.model).train()
    sizes = []
    model.register_forward_hook(
        lambda module, args, output: None if output.is_meta else sizes.append(output.shape[0]))
    opt = curvlab.optim.make(name, model, case.loss, lr=0.05, one_pass=True, **hyper)
    opt.step(case.batches[0])  # the first step builds the fully checked problem
    batch = case.batches[2]
    expected = float(reference.loss(model, [batch], case.loss, "mean").detach())
    sizes.clear()
    assert opt.step(batch) == pytest.approx(expected, rel=1e-12)
    assert sizes.count(4) == 1 and sizes[0] == 1 and all(size <= 2 for size in sizes if size != 4), sizes


def test_a_one_pass_step_checks_the_targets_and_the_loss():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model).train()
    opt = curvlab.optim.make("smw_ng", model, case.loss, lr=0.05, one_pass=True)
    opt.step(case.batches[0])
    X, y = case.batches[2]
    with pytest.raises(InvalidProblem, match="class labels must lie in"):
        opt.step((X, torch.full_like(y, 99)))
    with pytest.raises(InvalidProblem, match="need targets of shape"):
        opt.step((X, y[:-1]))
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(InvalidProblem, match="loss is not finite"):
        opt.step((X, y))


def test_a_one_pass_step_runs_a_model_that_needs_the_whole_batch_on_it_first():
    class Centred(nn.Module):  # subtracts the batch mean: one example alone gives zeros; a batch of one fails
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[0] < 2:
                raise ValueError("needs a batch")
            out = self.linear(x)
            return out - out.mean(0, keepdim=True).detach()

    model = Centred().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    opt = curvlab.optim.make("psgd_kron", model, lr=0.05, one_pass=True)
    for _ in range(2):
        with torch.no_grad():
            expected = float(F.cross_entropy(model(batch[0]), batch[1]))
        assert opt.step(batch) == pytest.approx(expected, rel=1e-12)


def test_one_pass_is_refused_for_methods_that_need_the_gradient():
    model = nn.Linear(3, 2)
    for name, hyper in [("kfac", {}), ("ekfac", {}), ("sgd", {}), ("psgd_kron", {"form": "whitening"})]:
        with pytest.raises(InvalidProblem, match="one_pass=True is for methods whose statistics. pass gives the gradient"):
            curvlab.optim.make(name, model, one_pass=True, **hyper)
    with pytest.raises(InvalidProblem, match="one_pass must be True or False"):
        curvlab.optim.make("smw_ng", model, one_pass=1)


def test_seng_sketch_keeps_the_step_exact_up_to_sketching_size_and_changes_it_beyond():
    case = make_case("mlp_ce")  # N = 8
    problem = curvlab.Problem(case.model, case.batches, case.loss)
    exact, _ = _dense_natural_gradient(case.model, case.batches, case.loss, 1e-2, True)
    for size, close in [(8, True), (None, True), (4, False)]:
        direction, _ = curvlab.optim.one_shot(curvlab.optim.method("seng", damping=1e-2, sketching_size=size), problem)
        error = float(torch.linalg.norm(problem.flatten(direction) - exact) / torch.linalg.norm(exact))
        assert (error < 1e-10) == close, (size, error)


# ----------------------------------------------------------------------------------------------
# ASDL's SENG formula (OPTIMIZERS.md §7), written from the per-example inputs and output gradients


def _layer_statistics(model, x, y, loss_name):
    """Per Linear/Conv2d module: ``a_n`` ``(N, d_in, T)`` and ``e_n = ∂ℓ_n/∂s_n`` ``(N, d_out, T)`` by hooks and autograd."""
    inputs, outputs, handles = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            def hook(module, args, output, name=name):
                inputs[name], outputs[name] = args[0], output
                output.retain_grad()
            handles.append(module.register_forward_hook(hook))
    out = forward(model, x)
    for handle in handles:
        handle.remove()
    example_losses(out, y, loss_name).sum().backward()
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            a = F.unfold(inputs[name], module.kernel_size, padding=module.padding, stride=module.stride)
            stats[name] = (module, a.detach(), outputs[name].grad.flatten(2))
        elif isinstance(module, nn.Linear):
            stats[name] = (module, inputs[name].detach()[:, :, None], outputs[name].grad[:, :, None])
    model.zero_grad()
    return stats


def _asdl_seng(model, x, y, loss_name, damping, rank=16, sketches=None):
    """ASDL's step per layer, ``sketches``: module -> (input indices or None, output indices or None)."""
    stats = _layer_statistics(model, x, y, loss_name)
    named = dict(model.named_parameters())
    N = y.shape[0]
    mean_loss = example_losses(forward(model, x), y, loss_name).sum() / N  # cross-entropy: ḡ is the mean
    grads = dict(zip(named, torch.autograd.grad(mean_loss, list(named.values()))))
    steps = {}
    for name, (module, a, e) in stats.items():
        if isinstance(module, nn.Conv2d) and rank < a.shape[2]:
            u, s, vt = torch.linalg.svd(e, full_matrices=False)
            a, e = a @ vt[:, :rank].transpose(1, 2), u[:, :, :rank] * s[:, None, :rank]
        in_index, out_index = (sketches or {}).get(name, (None, None))
        a_sub = a if in_index is None else a[:, in_index] * (a.shape[1] / len(in_index))
        e_sub = e if out_index is None else e[:, out_index] * (e.shape[1] / len(out_index))
        K = torch.einsum("njr,mjr->nm", a_sub, a_sub) * torch.einsum("nir,mir->nm", e_sub, e_sub) / e.shape[2]
        G = grads[f"{name}.weight"].flatten(1)
        G_hat = torch.cat([G, grads[f"{name}.bias"][:, None]], dim=1) / damping
        G_sub, ratio = G_hat[:, :-1], 1.0
        if out_index is not None:
            G_sub, ratio = G_sub[out_index], ratio * G_hat.shape[0] / len(out_index)
        if in_index is not None:
            G_sub, ratio = G_sub[:, in_index], ratio * G_hat.shape[1] / len(in_index)
        projected = torch.stack([ratio * (e_sub[n].T @ G_sub @ a_sub[n]).trace() for n in range(N)])
        v = torch.linalg.solve(K / N + damping * torch.eye(N, dtype=K.dtype), projected)
        s = v.abs().sqrt()
        a_one = torch.cat([a, torch.ones(N, 1, a.shape[2], dtype=a.dtype)], dim=1)
        c_out = sum(s[n] * e[n] for n in range(N))
        c_in = sum(v[n] / s.sum() * a_one[n] for n in range(N))
        step = G_hat - c_out @ c_in.T / N ** 2
        steps[f"{name}.weight"] = step[:, :-1].reshape(named[f"{name}.weight"].shape)
        steps[f"{name}.bias"] = step[:, -1]
    return steps, grads


def _seng_state(case, **hyper):
    problem = curvlab.Problem(case.model, case.batches, case.loss)
    pre = curvlab.optim.method("seng", compat="asdl", **hyper).preconditioner
    grads = problem.unflatten(problem.gradient())
    state = pre.accumulate(pre.init(problem.params), Statistics(problem, grads, problem.loss_value(), 0, 0))
    return problem, pre.apply(grads, state, problem.params)[0], state


@pytest.mark.parametrize("case_name, sketching_size", [("mlp_ce", 256), ("mlp_ce", 3), ("cnn", 256), ("cnn", 2)])
def test_seng_asdl_compat_is_the_asdl_formula_float64(case_name, sketching_size):
    case = make_case(case_name)
    x, y = case.data
    problem, direction, state = _seng_state(case, damping=1e-2, sketching_size=sketching_size)
    sketches = {label: (layer.in_indices, layer.out_indices) for label, layer in state.items()}
    assert any(i is not None for pair in sketches.values() for i in pair) == (sketching_size < 8)
    expected, grads = _asdl_seng(case.model, x, y, case.loss, 1e-2, sketches=sketches)
    for name in problem.param_names:
        # Parameters outside Linear and Conv2d layers (the CNN's batch norm) keep their raw gradient.
        torch.testing.assert_close(direction[name], expected.get(name, grads[name]), rtol=1e-10, atol=1e-12)


def test_seng_asdl_compat_deviates_from_the_exact_layerwise_natural_gradient_as_documented():
    """OPTIMIZERS.md §7: 8–10× relative deviation on a 6-5-3 MLP with N = 8 and λ = 1e-2."""
    errors = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)
        x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
        batch = (x, torch.randint(0, 3, (8,), generator=generator))
        problem = curvlab.Problem(model, batch)
        asdl, _ = curvlab.optim.one_shot(curvlab.optim.method("seng", damping=1e-2, compat="asdl"), problem)
        exact, _ = curvlab.optim.one_shot(curvlab.optim.method("seng", damping=1e-2), problem)
        asdl, exact = problem.flatten(asdl), problem.flatten(exact)
        errors.append(float(torch.linalg.norm(asdl - exact) / torch.linalg.norm(exact)))
    assert min(errors) > 2.0, errors


@pytest.mark.parametrize("name, hyper", [("smw_ng", {"damping": 0.1}), ("seng", {"damping": 0.1}),
                                         ("seng", {"damping": 0.1, "compat": "asdl"})])
def test_training_decreases_the_loss(name, hyper):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make(name, model, case.loss, lr=0.05, **hyper)
    first = opt.step(case.data)
    for _ in range(15):
        last = opt.step(case.data)
    assert last < 0.7 * first, (first, last)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(InvalidProblem, match="compat"):
        curvlab.optim.method("seng", compat="kfac")
    with pytest.raises(InvalidProblem, match="sketch_method"):
        curvlab.optim.method("seng", sketch_method="uniform")
    with pytest.raises(InvalidProblem, match="damping"):
        curvlab.optim.method("smw_ng", damping=0)
    with pytest.raises(InvalidProblem, match="sketching_size"):
        curvlab.optim.method("seng", sketching_size=0)
