"""KFAC, SKFAC, FOOF and EKFAC take the steps of OPTIMIZERS.md §1–§3 (dense float64 references)."""

import copy
import dataclasses
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.approx.kfac import kfac_factors
from curvlab.errors import InvalidProblem
from curvlab.optim.kronecker import kronecker_layers, swift_rows
from models import make_case
from reference import example_losses

TOL = dict(rtol=1e-9, atol=1e-11)


def _per_example(model, X, y, columns="empirical"):
    """Per Linear/Conv2d layer, per example n: inputs a_n (T, d_in) and output gradients e_nk (K, T, d_out).

    ``columns="empirical"``: e = ∂ℓ_n/∂s at the true label (K = 1); ``"ggn"``: the output gradients of
    the columns of the square root of ∇²_f ℓ_n (softmax cross-entropy: diag(p) − ppᵀ), K = C.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    stats = {name: ([], []) for name in layers}
    for n in range(y.shape[0]):
        record = {}

        def hook(module, args, output, name=None):
            output.retain_grad()
            record[name] = (args[0].detach(), output)

        handles = [m.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name)) for name, m in layers.items()]
        out = model(X[n:n + 1])
        for h in handles:
            h.remove()
        if columns == "empirical":
            cotangents = [torch.autograd.grad(example_losses(out, y[n:n + 1], "cross_entropy").sum(), out,
                                              retain_graph=True)[0]]
        else:
            p = out.detach()[0].softmax(-1)
            values, vectors = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
            root = vectors * values.clamp(min=0).sqrt()
            cotangents = [root[:, k][None] for k in range(root.shape[1])]
        gradients = {name: [] for name in layers}
        for u in cotangents:
            for name in layers:
                record[name][1].grad = None
            out.backward(u, retain_graph=True)
            for name, module in layers.items():
                g = record[name][1].grad[0]
                gradients[name].append(g.reshape(g.shape[0], -1).T if isinstance(module, nn.Conv2d) else g[None])
        for name, module in layers.items():
            a = record[name][0]
            if isinstance(module, nn.Conv2d):
                a = F.unfold(a, module.kernel_size, padding=module.padding, stride=module.stride)[0].T
            stats[name][0].append(a)
            stats[name][1].append(torch.stack(gradients[name]))
    return layers, stats


def _reference_factors(stats, N):
    """A = Σ_{n,t} a aᵀ / (N T), B = (1/N) Σ_{n,k,t} e eᵀ (mean cross-entropy: R = 1/N)."""
    factors = {}
    for name, (a_list, e_list) in stats.items():
        T = a_list[0].shape[0]
        A = sum(a.T @ a for a in a_list) / (N * T)
        B = sum(torch.einsum("kto,ktp->op", e, e) for e in e_list) / N
        factors[name] = (A, B)
    return factors


def _pi_damping(A, B, damping):
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(B) / B.shape[0]))
    return max(math.sqrt(damping) * pi, 1e-7), max(math.sqrt(damping) / pi, 1e-7)


def _gradient(model, X, y):
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _kfac_reference(model, layers, factors, grads, damping, pi=True, foof=False):
    """(B + λ_B)⁻¹ G (A + λ_A)⁻¹ and (B + λ_B)⁻¹ g_b per layer (FOOF: G (A + λ)⁻¹, g_b); other parameters raw."""
    expected = dict(grads)
    for name, module in layers.items():
        A, B = factors[name]
        lam_A, lam_B = _pi_damping(A, B, damping) if pi else (damping, damping)
        A_inv = torch.linalg.inv(A + lam_A * torch.eye(A.shape[0], dtype=A.dtype))
        B_inv = torch.eye(B.shape[0], dtype=B.dtype) if foof else torch.linalg.inv(
            B + lam_B * torch.eye(B.shape[0], dtype=B.dtype))
        G = grads[f"{name}.weight"].reshape(B.shape[0], -1)
        expected[f"{name}.weight"] = (B_inv @ G @ A_inv).reshape(module.weight.shape)
        expected[f"{name}.bias"] = B_inv @ grads[f"{name}.bias"]
    return expected


def _one_shot(name, model, X, y, **hp):
    problem = curvlab.Problem(model, (X, y))
    return curvlab.optim.one_shot(curvlab.optim.method(name, **hp), problem)


def _close(actual, expected, **tol):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **(tol or TOL))


@pytest.mark.parametrize("case_name, examples", [("mlp_ce", None), ("mlp_ce", 3), ("cnn", None), ("cnn", 1)])
@pytest.mark.parametrize("curvature", ["empirical_fisher", "ggn"])
def test_kfac_step_matches_dense_formula_float64(case_name, examples, curvature):
    # Few examples leave factors with fewer rows than features: local KFAC keeps them as rows and inverts by Woodbury.
    case = make_case(case_name)
    X, y = case.data
    X, y = X[:examples], y[:examples]
    damping = 1e-2
    direction, linear = _one_shot("kfac", case.model, X, y, damping=damping, curvature=curvature)
    layers, stats = _per_example(case.model, X, y, "empirical" if curvature == "empirical_fisher" else "ggn")
    grads = _gradient(case.model, X, y)
    expected = _kfac_reference(case.model, layers, _reference_factors(stats, len(y)), grads, damping)
    _close(direction, expected)
    _close(linear(grads), expected)


@pytest.mark.parametrize("case_name", ["mlp_ce", "cnn"])
def test_foof_step_matches_dense_formula_float64(case_name):
    case = make_case(case_name)
    X, y = case.data
    damping = 1e-2
    direction, linear = _one_shot("foof", case.model, X, y, damping=damping)
    layers, stats = _per_example(case.model, X, y)
    grads = _gradient(case.model, X, y)
    expected = _kfac_reference(case.model, layers, _reference_factors(stats, len(y)), grads, damping, pi=False,
                               foof=True)
    for name in layers:
        expected[f"{name}.bias"] = grads[f"{name}.bias"]
    _close(direction, expected)
    _close(linear(grads), expected)


def test_skfac_step_matches_dense_formula_on_a_cnn_float64():
    """Conv factors with fewer examples than columns use the spatially summed rows; the others are KFAC's."""
    case = make_case("cnn")
    X, y = case.data
    N, damping = len(y), 1e-2
    direction, _ = _one_shot("skfac", case.model, X, y, damping=damping, curvature="empirical_fisher")
    layers, stats = _per_example(case.model, X, y)
    factors = _reference_factors(stats, N)
    for name, module in layers.items():
        a_list, _ = stats[name]
        if isinstance(module, nn.Conv2d) and N < a_list[0].shape[1]:
            rows = torch.stack([a.sum(0) for a in a_list]) / math.sqrt(N)
            factors[name] = (rows.T @ rows, factors[name][1])
    assert any(isinstance(m, nn.Conv2d) for m in layers.values())
    expected = _kfac_reference(case.model, layers, factors, _gradient(case.model, X, y), damping)
    _close(direction, expected)


@pytest.mark.parametrize("curvature", ["fisher_mc", "empirical_fisher"])
def test_skfac_equals_kfac_on_linear_layers_with_fewer_examples_than_inputs_float64(curvature):
    case = make_case("mlp_ce")
    X, y = case.batches[0]  # 3 examples; d_in = 5 and 8, d_out = 8 and 4: every factor is rectangular
    kfac_direction, _ = _one_shot("kfac", case.model, X, y, damping=1e-3, curvature=curvature)
    skfac_direction, linear = _one_shot("skfac", case.model, X, y, damping=1e-3, curvature=curvature)
    _close(skfac_direction, kfac_direction, rtol=1e-8, atol=1e-10)
    method = curvlab.optim.method("skfac", damping=1e-3, curvature=curvature)
    problem = curvlab.Problem(case.model, (X, y))
    state = method.preconditioner.accumulate(method.preconditioner.init(problem.params),
                                             curvlab.optim.Statistics(problem, {}, 0.0, 0, 0))
    state_inverses = [inverse for pair in method.preconditioner.refresh(state).inverses.values() for inverse in pair]
    assert all(inverse.rows is not None for inverse in state_inverses)


@pytest.mark.parametrize("name, batches", [("mlp_ce", 2), ("mlp_ce", 3), ("cnn", 3), ("transformer", 3)])
@pytest.mark.parametrize("curvature, mc_samples", [("empirical_fisher", 1), ("fisher_mc", 3), ("ggn", 1)])
def test_factor_rows_fed_batch_by_batch_are_kfacs_factors_float64(name, batches, curvature, mc_samples):
    """Local K-FAC's factors: rows while fewer than the columns, folded square from the batch that reaches them."""
    case = make_case(name)
    problem = curvlab.Problem(case.model, case.batches[:batches], case.loss)
    statistics = curvlab.optim.Statistics(problem, {}, 0.0, 0, 0)
    found = swift_rows(statistics, kronecker_layers(statistics), curvature, mc_samples, sum_conv_positions=False)
    expected = kfac_factors(problem, curvature, mc_samples=mc_samples, seed=statistics.seed_for())
    kinds = set()
    for label, pair in found.items():
        for (kind, value), factor in zip(pair, expected[label]):
            kinds.add(kind)
            assert (kind == "rows") == (value.shape[0] < value.shape[1])
            torch.testing.assert_close(value.T @ value if kind == "rows" else value, factor, **TOL)
    if (name, batches) == ("mlp_ce", 2):  # 4 examples: d_in 5 and 8, d_out 8 are rows; d_out 4 folds on batch 2
        assert kinds == {"rows", "square"}


def _training_batches(case, steps):
    X, y = case.data
    return [(X[(3 * k) % 8:(3 * k) % 8 + 4], y[(3 * k) % 8:(3 * k) % 8 + 4]) for k in range(steps)]


def _local_factors(model, batch):
    problem = curvlab.Problem(model, batch)
    return kfac_factors(problem, "empirical_fisher")


@pytest.mark.parametrize("compat", [None, "asdl"])
def test_global_kfac_moving_average_is_the_weighted_sum_of_local_factors_float64(compat):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    beta, damping, steps = 0.3, 1e-2, 3
    opt = curvlab.optim.make("kfac", model, lr=0.1, damping=damping, ema_decay=beta, curvature="empirical_fisher",
                             compat=compat)
    local = []
    for k, batch in enumerate(_training_batches(case, steps)):
        local.append(_local_factors(model, batch))
        grads = _gradient(model, *batch)
        opt.step(batch)
        weights = [beta * (1 - beta) ** (k - j) for j in range(k + 1)]
        norm = 1.0 if compat == "asdl" else sum(weights)
        expected = {name: tuple(sum(w * f[name][i] for w, f in zip(weights, local)) / norm for i in range(2))
                    for name in local[0]}
        actual = opt.preconditioner_state.factors.value(compat is None)
        for name in expected:
            for i in range(2):
                torch.testing.assert_close(actual[name][i], expected[name][i], **TOL)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        _close(opt.last_direction, _kfac_reference(model, layers, expected, grads, damping))
    if compat == "asdl":  # ASDL's zero initialisation: the first factors are β A_0, β B_0
        first = curvlab.optim.make("kfac", copy.deepcopy(case.model), damping=damping, ema_decay=beta,
                                   curvature="empirical_fisher", compat="asdl")
        first.step(_training_batches(case, 1)[0])
        A, B = first.preconditioner_state.factors.value(False)["0"]
        torch.testing.assert_close(A, beta * local[0]["0"][0], **TOL)
        torch.testing.assert_close(B, beta * local[0]["0"][1], **TOL)


def test_kfac_applies_the_stale_inverse_between_updates_float64():
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("kfac", model, lr=0.1, damping=1e-2, curvature_update_interval=2,
                             preconditioner_update_interval=2)
    batches = _training_batches(case, 3)
    opt.step(batches[0])
    state = opt.preconditioner_state
    grads = _gradient(model, *batches[1])
    opt.step(batches[1])
    assert opt.preconditioner_state.factors is state.factors
    _close(opt.last_direction, opt.method.preconditioner.linear(state)(grads))
    opt.step(batches[2])
    assert opt.preconditioner_state.factors is not state.factors


class _SpiedRefresh:
    """An optimizer whose method's refresh records the live weak references in ``old`` and fails while ``failing``,
    and a twin with the plain method; both on copies of ``case``'s model."""

    def __init__(self, case, method):
        self.pre, self.old, self.alive, self.failing = method.preconditioner, [], [], False
        spied = dataclasses.replace(method, preconditioner=dataclasses.replace(self.pre, refresh=self.refresh))
        self.opt = curvlab.optim.PreconditionedOptimizer(copy.deepcopy(case.model), spied, lr=0.1)
        self.twin = curvlab.optim.PreconditionedOptimizer(copy.deepcopy(case.model), method, lr=0.1)

    def refresh(self, state):
        self.alive.append(sum(ref() is not None for ref in self.old))
        if self.failing:
            raise InvalidProblem("inversion failed")
        return self.pre.refresh(state)

    def step(self, batch):
        self.opt.step(batch), self.twin.step(batch)

    def fail_then_retry(self, batch):
        """The step fails, leaving the parameters; the retry equals the twin's step, which never failed."""
        self.failing = True
        before = {name: p.detach().clone() for name, p in self.opt.model.named_parameters()}
        steps = self.opt.steps
        with pytest.raises(InvalidProblem, match="inversion failed"):
            self.opt.step(batch)
        assert self.opt.steps == steps
        assert all(torch.equal(p, before[name]) for name, p in self.opt.model.named_parameters())
        failed_state = self.opt.preconditioner_state
        self.failing = False
        self.step(batch)
        _close(self.opt.last_direction, self.twin.last_direction, rtol=0, atol=0)
        return failed_state


def test_a_refresh_frees_the_old_inverses_first_and_a_failed_one_is_retried():
    case = make_case("mlp_ce")
    spy = _SpiedRefresh(case, curvlab.optim.method("kfac", damping=1e-2, preconditioner_update_interval=2))
    batches = _training_batches(case, 5)
    for batch in batches[:2]:  # step 0 inverts, step 1 only accumulates and keeps the inverses
        spy.step(batch)
    spy.old[:] = [weakref.ref(tensor) for pair in spy.opt.preconditioner_state.inverses.values()
                  for inverse in pair for tensor in (inverse.matrix, inverse.rows, inverse.kernel) if tensor is not None]
    assert len(spy.old) >= 4 and all(ref() is not None for ref in spy.old)
    spy.step(batches[2])
    assert spy.alive == [0, 0]  # at step 2's refresh the previous inverses were already freed
    spy.step(batches[3])
    spy.fail_then_retry(batches[4])  # the released state is left; the retry accumulates the factors again
    pre, state = spy.pre, spy.opt.preconditioner_state
    with pytest.raises(InvalidProblem, match="last inversion failed"):
        pre.apply(_gradient(spy.opt.model, *batches[0]), pre.release(state), None)


def test_with_moving_average_factors_a_failed_step_keeps_the_average_it_started_from():
    case = make_case("mlp_ce")
    spy = _SpiedRefresh(case, curvlab.optim.method("kfac", damping=1e-2, ema_decay=0.5))
    batches = _training_batches(case, 2)
    spy.step(batches[0])
    start = spy.opt.preconditioner_state
    # the inverses released, the batch not folded into the average: the retry folds it in once
    failed = spy.fail_then_retry(batches[1])
    assert failed.factors is start.factors and not failed.inverses and start.inverses


def test_local_ekfac_frees_its_old_eigenbases_before_the_statistics_bring_new_ones():
    case = make_case("mlp_ce")
    spy = _SpiedRefresh(case, curvlab.optim.method("ekfac", damping=1e-2))
    batches = _training_batches(case, 3)
    spy.step(batches[0])
    spy.old[:] = [weakref.ref(basis) for pair in spy.opt.preconditioner_state.extra["bases"].values()
                  for basis in pair if basis is not None]
    assert len(spy.old) == 4
    spy.step(batches[1])
    assert spy.alive == [0, 0]  # at step 1's refresh (after its statistics) the old bases are gone
    spy.fail_then_retry(batches[2])
    pre, state = spy.pre, spy.opt.preconditioner_state
    with pytest.raises(InvalidProblem, match="no eigenbases"):
        pre.apply(_gradient(spy.opt.model, *batches[0]), pre.release(state), None)


def _ekfac_reference(model, layers, stats, grads, damping, N):
    """(Q_B ⊗ Q_A)(S + λ)⁻¹(Q_B ⊗ Q_A)ᵀ g as a dense matrix, S = (1/N) Σ_n (Q_Bᵀ G_n Q_A)²."""
    factors = _reference_factors(stats, N)
    expected = dict(grads)
    for name, module in layers.items():
        A, B = factors[name]
        Q_A, Q_B = torch.linalg.eigh(A)[1], torch.linalg.eigh(B)[1]
        a_list, e_list = stats[name]
        G_n = [e[0].T @ a for a, e in zip(a_list, e_list)]
        K = torch.kron(Q_B, Q_A)
        S = sum((K.T @ G.reshape(-1)) ** 2 for G in G_n) / N
        M = K @ torch.diag(1 / (S + damping)) @ K.T
        expected[f"{name}.weight"] = (M @ grads[f"{name}.weight"].reshape(-1)).reshape(module.weight.shape)
        s_b = sum((Q_B.T @ e[0].sum(0)) ** 2 for e in e_list) / N
        expected[f"{name}.bias"] = Q_B @ torch.diag(1 / (s_b + damping)) @ Q_B.T @ grads[f"{name}.bias"]
    return expected


@pytest.mark.parametrize("case_name, examples", [("mlp_ce", None), ("mlp_ce", 3), ("cnn", None)])
def test_ekfac_step_matches_dense_eigenbasis_formula_float64(case_name, examples):
    # 3 examples give every factor fewer rows than features: local EKFAC keeps thin bases (d, 3), its S is 0 off
    # them; the reference rotates with eigh's full bases. A random vector, not in the span, checks the rest.
    case = make_case(case_name)
    X, y = case.data
    X, y = X[:examples], y[:examples]
    damping = 1e-3
    direction, linear = _one_shot("ekfac", case.model, X, y, damping=damping, curvature="empirical_fisher")
    layers, stats = _per_example(case.model, X, y)
    grads = _gradient(case.model, X, y)
    expected = _ekfac_reference(case.model, layers, stats, grads, damping, len(y))
    _close(direction, expected, rtol=1e-8, atol=1e-10)
    _close(linear(grads), expected, rtol=1e-8, atol=1e-10)
    generator = torch.Generator().manual_seed(0)
    v = {name: torch.randn(g.shape, generator=generator, dtype=g.dtype) for name, g in grads.items()}
    _close(linear(v), _ekfac_reference(case.model, layers, stats, v, damping, len(y)), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name, hp", [
    ("kfac", {}), ("kfac", {"ema_decay": 0.2}), ("kfac", {"joint_bias": True}), ("skfac", {}),
    ("foof", {}), ("ekfac", {}), ("ekfac", {"ema_decay": 0.2}),
])
def test_a_few_steps_decrease_the_loss(name, hp):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    X, y = case.data
    opt = curvlab.optim.make(name, model, lr=0.05, damping=1e-2, **hp)
    losses = [opt.step((X, y)) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]


def test_joint_bias_preconditions_the_homogeneous_weight_float64():
    case = make_case("mlp_ce")
    X, y = case.data
    damping = 1e-2
    direction, _ = _one_shot("kfac", case.model, X, y, damping=damping, curvature="empirical_fisher",
                             joint_bias=True)
    layers, stats = _per_example(case.model, X, y)
    ones = {name: ([torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) for a in a_list], e_list)
            for name, (a_list, e_list) in stats.items()}
    factors = _reference_factors(ones, len(y))
    grads = _gradient(case.model, X, y)
    for name, module in layers.items():
        A, B = factors[name]
        lam_A, lam_B = _pi_damping(A, B, damping)
        G = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1)
        step = torch.linalg.solve(B + lam_B * torch.eye(B.shape[0], dtype=B.dtype),
                                  G) @ torch.linalg.inv(A + lam_A * torch.eye(A.shape[0], dtype=A.dtype))
        torch.testing.assert_close(direction[f"{name}.weight"], step[:, :-1], **TOL)
        torch.testing.assert_close(direction[f"{name}.bias"], step[:, -1], **TOL)


@pytest.mark.parametrize("name, hp, message", [
    ("skfac", {"ema_decay": 0.1}, "ema_decay=-1"),
    ("kfac", {"ema_decay": 1.5}, "ema_decay"),
    ("kfac", {"curvature": "hessian"}, "fisher_mc"),
    ("foof", {"compat": "torch"}, "asdl"),
    ("ekfac", {"damping": -1.0}, "damping"),
])
def test_bad_hyperparameters_are_refused(name, hp, message):
    with pytest.raises(InvalidProblem, match=message):
        curvlab.optim.method(name, **hp)
