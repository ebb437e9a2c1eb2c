"""Shampoo (the study's ASDL variant) and distributed Shampoo take the steps OPTIMIZERS.md §4, §5 specify.

The references below rebuild every statistic from gradients computed with plain autograd on the
model as it is before each step, and take matrix roots with ``eigh``.

Tolerance of the coupled Newton roots: the iteration stops once ``E = M − I`` has entries ≤ 1e-6,
where ``M = X^p A`` (``X`` commutes with ``A``), so ``X = A^{-1/p}(I + E)^{1/p}`` and
``‖X − A^{-1/p}‖ ≤ ‖A^{-1/p}‖·‖E‖₂/p ≤ ‖A^{-1/p}‖·n·1e-6/p`` for an ``n × n`` factor. With factors of
size ≤ 8 and ``p = 4``, each factor contributes at most 2e-6 relative, hence ``NEWTON_RTOL = 4e-6`` for
the two-factor product (quadratic convergence makes the errors far smaller in practice). The
relative ridge ``ε λ_max`` uses a power-iteration ``λ_max`` converged to 1e-6 relative, which moves the
root by at most about that much times ``ε``: negligible at the ``ε`` used here.
"""

import copy
import dataclasses

import pytest
import torch

import curvlab
from curvlab.optim.shampoo import asdl_inverse_root, block_slices, coupled_newton_inverse_root, merge_small_dims
from models import make_case
from reference import loss as reference_loss

NEWTON_RTOL = 4e-6


def _gradients(model, batch, loss, names):
    """``∇L`` of one batch by plain autograd: name -> tensor."""
    named = dict(model.named_parameters())
    value = reference_loss(model, [batch], loss, "mean")
    return dict(zip(names, torch.autograd.grad(value, [named[n] for n in names])))


def _root(matrix, power):
    """``matrix^power`` of a symmetric positive definite matrix by ``eigh``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.pow(power)) @ eigenvectors.T


def _unfoldings(g):
    """``G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ`` by explicit mode-i unfolding (movedim then reshape)."""
    return [g.movedim(i, 0).reshape(g.shape[i], -1) @ g.movedim(i, 0).reshape(g.shape[i], -1).T
            for i in range(g.ndim)]


def _apply_modes(g, matrices):
    """``G ×_1 X_1 ⋯ ×_k X_k`` with einsum, one mode at a time."""
    for i, x in enumerate(matrices):
        g = torch.movedim(torch.tensordot(x, g.movedim(i, 0), dims=([1], [0])), 0, i)
    return g


def _relative_error(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _ridged(statistic, damping):
    return statistic + damping * torch.linalg.eigvalsh(statistic)[-1] * torch.eye(statistic.shape[0],
                                                                                   dtype=statistic.dtype)


# ----------------------------------------------------------------------------------------------
# Shampoo (ASDL)


@pytest.mark.parametrize("case_name, params", [("mlp_ce", None), ("cnn", r"^(0|4|8)\.weight$")])
def test_shampoo_direction_is_dense_inverse_root_product_float64(case_name, params):
    """``Δ = ⊗_i (F_i + ελ_max I)^{-1/(2k)}`` applied to ``G``, sums over steps; 1-D parameters raw."""
    case = make_case(case_name)
    model = copy.deepcopy(case.model)
    damping = 1e-4
    opt = curvlab.optim.make("shampoo", model, case.loss, lr=0.05, params=params, damping=damping)
    names = opt.names
    statistics = {}
    for batch in case.batches * 2:
        g = _gradients(model, batch, case.loss, names)
        opt.step(batch)
        for name in names:
            if g[name].ndim < 2:
                torch.testing.assert_close(opt.last_direction[name], g[name], rtol=1e-12, atol=1e-15)
                continue
            terms = _unfoldings(g[name])
            statistics[name] = [s + t for s, t in zip(statistics[name], terms)] if name in statistics else [
                1e-12 * torch.eye(t.shape[0], dtype=t.dtype) + t for t in terms]
            k = g[name].ndim
            roots = [_root(_ridged(s, damping), -1 / (2 * k)) for s in statistics[name]]
            assert len(opt.preconditioner_state.roots[name]) == k
            expected = _apply_modes(g[name], roots)
            assert _relative_error(opt.last_direction[name], expected) < NEWTON_RTOL * k / 2


def test_shampoo_study_damping_direction_matches_dense_float64():
    """At the study's ε = 1e-12 (near-singular factors, ≈ 31 Newton iterations) the roots still converge."""
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("shampoo", model, case.loss, params=r"weight$")
    batch = case.batches[0]
    g = _gradients(model, batch, case.loss, opt.names)
    opt.step(batch)
    for name in opt.names:
        left, right = (1e-12 * torch.eye(t.shape[0], dtype=t.dtype) + t for t in _unfoldings(g[name]))
        expected = _root(_ridged(left, 1e-12), -0.25) @ g[name] @ _root(_ridged(right, 1e-12), -0.25)
        assert _relative_error(opt.last_direction[name], expected) < NEWTON_RTOL


def test_shampoo_intervals_and_ema_follow_the_schedule_float64():
    """Statistics on steps ≡ 0 mod 2 (EMA), roots on steps ≡ 0 mod 3, stale roots between."""
    case = make_case("mlp_mse")
    model = copy.deepcopy(case.model)
    beta, damping = 0.3, 1e-3
    opt = curvlab.optim.make("shampoo", model, case.loss, lr=0.05, momentum=0.0, params=r"weight$",
                             damping=damping, ema_decay=beta, curvature_update_interval=2,
                             preconditioner_update_interval=3)
    names = opt.names
    statistics = {n: [1e-12 * torch.eye(d, dtype=torch.float64) for d in p.shape]
                  for n, p in model.named_parameters() if n in names}
    roots = {n: [torch.eye(s.shape[0], dtype=torch.float64) for s in statistics[n]] for n in names}
    for t, batch in enumerate(case.batches * 2):
        g = _gradients(model, batch, case.loss, names)
        state_before = opt.preconditioner_state
        opt.step(batch)
        for name in names:
            if t % 2 == 0:
                statistics[name] = [(1 - beta) * s + beta * u for s, u in zip(statistics[name], _unfoldings(g[name]))]
            if t % 3 == 0:
                roots[name] = [_root(_ridged(s, damping), -0.25) for s in statistics[name]]
            expected = roots[name][0] @ g[name] @ roots[name][1]
            assert _relative_error(opt.last_direction[name], expected) < NEWTON_RTOL
        if t % 3 != 0:  # no refresh: the step is the previous state's linear map
            stale = opt.method.preconditioner.linear(state_before)(g)
            for name in names:
                torch.testing.assert_close(opt.last_direction[name], stale[name], rtol=1e-13, atol=0)


def test_shampoo_compat_asdl_accumulates_the_ridge_in_the_statistic_float64():
    """compat="asdl": ``F ← F + GGᵀ + ελ_max(F + GGᵀ) I`` at each refresh; default: ``F ← F + GGᵀ``."""
    case = make_case("mlp_ce")
    damping = 0.05
    trained = {}
    for compat in (None, "asdl"):
        model = copy.deepcopy(case.model)
        opt = curvlab.optim.make("shampoo", model, case.loss, params=r"^2\.weight$", damping=damping,
                                 compat=compat)
        opt.param_groups[0]["lr"] = 0.0  # the same gradient every step
        g = _gradients(model, case.batches[0], case.loss, opt.names)["2.weight"]
        statistics = [1e-12 * torch.eye(d, dtype=torch.float64) for d in g.shape]
        for _ in range(3):
            opt.step(case.batches[0])
            statistics = [s + u for s, u in zip(statistics, _unfoldings(g))]
            ridged = [_ridged(s, damping) for s in statistics]
            if compat == "asdl":
                statistics = ridged
            for kept, expected in zip(opt.preconditioner_state.statistics["2.weight"], statistics):
                # the stored ridge ε·λ_max carries the power iteration's relative error (≤ ~1e-6) times ε
                bound = 1e-6 * damping * float(torch.linalg.eigvalsh(expected)[-1])
                torch.testing.assert_close(kept, expected, rtol=0, atol=bound)
            expected = _root(ridged[0], -0.25) @ g @ _root(ridged[1], -0.25)
            assert _relative_error(opt.last_direction["2.weight"], expected) < NEWTON_RTOL
        trained[compat] = opt.last_direction["2.weight"]
    assert _relative_error(trained["asdl"], trained[None]) > 1e-2


@pytest.mark.parametrize("hyper", [{"compat": "asdl"}, {"ema_decay": 0.3}, {"preconditioner_update_interval": 2}])
def test_the_optimizer_updates_the_statistics_and_roots_in_place_and_steps_as_the_pure_apply(hyper):
    """``apply_owned`` (the optimizer's) adds to the statistics in place and replaces each root as soon as its
    successor exists; its steps equal the pure ``apply``'s to the bit."""
    case = make_case("mlp_ce")
    method = curvlab.optim.method("shampoo", damping=0.05, **hyper)
    pure = dataclasses.replace(method, preconditioner=dataclasses.replace(method.preconditioner, apply_owned=None))
    owned_opt, pure_opt = (curvlab.optim.PreconditionedOptimizer(copy.deepcopy(case.model), m, case.loss, lr=0.1)
                           for m in (method, pure))
    storage = {name: [f.data_ptr() for f in stats] for name, stats in owned_opt.preconditioner_state.statistics.items()}
    for batch in case.batches * 2:
        owned_opt.step(batch), pure_opt.step(batch)
        for name, direction in pure_opt.last_direction.items():
            torch.testing.assert_close(owned_opt.last_direction[name], direction, rtol=0, atol=0)
        for name, stats in pure_opt.preconditioner_state.statistics.items():
            for kept, expected in zip(owned_opt.preconditioner_state.statistics[name], stats):
                torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert {name: [f.data_ptr() for f in stats]
            for name, stats in owned_opt.preconditioner_state.statistics.items()} == storage


def test_asdl_newton_growth_guard_can_stop_at_the_scaled_identity_float64():
    """ASDL's 1.2× guard fires when the entrywise error grows on the first iteration of a convergent run."""
    u = torch.tensor([[0.13, 1.02], [-0.45, 0.45], [-0.98, 0.71], [-0.76, -0.64]], dtype=torch.float64)
    A = u @ u.T + 1e-3 * torch.eye(4, dtype=torch.float64)
    exact = _root(A, -0.25)
    converged = coupled_newton_inverse_root(A, 4)
    guarded = coupled_newton_inverse_root(A, 4, growth_guard=True)
    assert _relative_error(converged, exact) < 4 * 1e-6 / 4
    z = 5 / (2 * torch.linalg.matrix_norm(A))
    torch.testing.assert_close(guarded, z ** 0.25 * torch.eye(4, dtype=torch.float64), rtol=1e-15, atol=0)


def test_shampoo_linear_map_is_the_one_shot_direction_map():
    case = make_case("mlp_ce")
    prob = curvlab.Problem(case.model, case.batches, case.loss)
    direction, inverse = curvlab.optim.one_shot(curvlab.optim.method("shampoo", damping=1e-3), prob)
    gradient = prob.unflatten(prob.gradient())
    mapped = inverse(gradient)
    for name in prob.param_names:
        torch.testing.assert_close(mapped[name], direction[name], rtol=1e-13, atol=0)
    probe = {name: torch.randn_like(g) for name, g in gradient.items()}
    mixed = inverse({name: 2 * gradient[name] - 3 * probe[name] for name in gradient})
    for name, value in inverse(probe).items():
        torch.testing.assert_close(mixed[name], 2 * mapped[name] - 3 * value, rtol=1e-12, atol=1e-12)


def test_shampoo_closure_step_equals_batch_step():
    case = make_case("mlp_ce")
    first, second = copy.deepcopy(case.model), copy.deepcopy(case.model)
    by_batch = curvlab.optim.make("shampoo", first, case.loss, lr=0.05, damping=1e-3)
    by_closure = curvlab.optim.make("shampoo", second, case.loss, lr=0.05, damping=1e-3)
    for batch in case.batches:
        def closure():
            by_closure.zero_grad()
            value = reference_loss(second, [batch], case.loss, "mean")
            value.backward()
            return value

        by_batch.step(batch)
        by_closure.step(closure)
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name, hyper", [
    ("shampoo", {"damping": 1e-3, "momentum": 0.5}),
    ("distributed_shampoo", {"grafting": "adagrad"}),
])
def test_training_decreases_the_loss(name, hyper):
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make(name, model, case.loss, lr=0.05, **hyper)
    before = float(reference_loss(model, [case.data], case.loss, "mean").detach())
    for _ in range(15):
        opt.step(case.data)
    assert float(reference_loss(model, [case.data], case.loss, "mean").detach()) < 0.8 * before


@pytest.mark.parametrize("hyper", [{"ema_decay": 1.5}, {"compat": "pytorch"}, {"damping": -1.0},
                                   {"preconditioner_update_interval": 0}])
def test_shampoo_refuses_bad_hyperparameters(hyper):
    with pytest.raises(curvlab.InvalidProblem):
        curvlab.optim.method("shampoo", **hyper)


# ----------------------------------------------------------------------------------------------
# Distributed Shampoo (facebookresearch)


@pytest.mark.parametrize("shape, max_dim, merged", [
    ((1, 2, 5, 1), 10, (10,)),  # size-1 dimensions dropped, the rest merged
    ((1, 2, 5, 1), 1, (2, 5)),
    ((32, 3, 64, 64), 8192, (96, 4096)),  # merged from the end
    ((8, 5), 1024, (40,)),  # a small Linear: full-matrix AdaGrad on vec(W)
    ((3, 2, 3, 3), 1024, (54,)),
    ((64, 32, 3, 3), 1024, (64, 288)),  # conv (c_out, c_in·kh·kw)
    ((), 1024, (1,)),
])
def test_merge_small_dims_matches_the_reference_examples(shape, max_dim, merged):
    assert merge_small_dims(shape, max_dim) == merged


def _distributed_reference(case, names, steps, beta1, beta2, eps, max_dim, reshape):
    """Full-matrix AdaGrad/EMA per block: ``(F/bc2 + εI)^{-1/(2k)}`` on the bias-corrected filtered gradient."""
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("distributed_shampoo", model, case.loss, lr=0.05, params=names, betas=(beta1, beta2),
                             eps=eps, max_preconditioner_dim=max_dim)
    factors, filtered = {}, {}
    for t, batch in enumerate(case.batches * steps, start=1):
        g = _gradients(model, batch, case.loss, opt.names)
        opt.step(batch)
        for name in opt.names:
            merged = reshape(g[name])
            filtered[name] = beta1 * filtered.get(name, 0) + (1 - beta1) * merged
            bar = filtered[name] / (1 - beta1 ** t) if beta1 > 0 else merged
            weight = 1.0 if beta2 == 1 else 1 - beta2
            expected = torch.empty_like(merged)
            for b, where in enumerate(block_slices(merged.shape, max_dim)):
                block = merged[where]
                factors[name, b] = [beta2 * f + weight * u for f, u in
                                    zip(factors.get((name, b), [0] * block.ndim), _unfoldings(block))]
                bias = 1 - beta2 ** t if beta2 < 1 else 1.0
                roots = [_root(f / bias + eps * torch.eye(f.shape[0], dtype=f.dtype), -1 / (2 * block.ndim))
                         for f in factors[name, b]]
                expected[where] = _apply_modes(bar[where], roots)
            yield opt.last_direction[name].reshape(merged.shape), expected


@pytest.mark.parametrize("beta1, beta2", [(0.0, 1.0), (0.9, 0.99)])
def test_distributed_shampoo_small_linear_is_full_matrix_adagrad_float64(beta1, beta2):
    """A Linear with ``in·out ≤ 1024`` becomes a vector: ``Δ = (Σ g gᵀ/bc + εI)^{-1/2} ḡ``."""
    case = make_case("mlp_ce")
    states = _distributed_reference(case, ["0.weight", "2.bias"], 2, beta1, beta2, 1e-3, 1024,
                                    lambda g: g.reshape(-1))
    for direction, expected in states:
        assert direction.ndim == 1
        torch.testing.assert_close(direction, expected, rtol=1e-10, atol=1e-12)


def test_distributed_shampoo_blocks_have_their_own_factors_float64():
    """``max_preconditioner_dim = 4``: an (8, 5) weight is cut into 4×4, 4×1, 4×4, 4×1 blocks."""
    case = make_case("mlp_ce")
    assert block_slices((8, 5), 4) == [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 5)),
                                       (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 5))]
    states = _distributed_reference(case, ["0.weight", "0.bias"], 2, 0.9, 1.0, 1e-3, 4, lambda g: g)
    for direction, expected in states:
        torch.testing.assert_close(direction, expected, rtol=1e-10, atol=1e-12)


def test_distributed_shampoo_conv_kernel_is_merged_and_preconditioned_float64():
    """A (4, 3, 2, 2) kernel with max dim 8 merges only its 2×2 window (3·4 > 8): three factors, exponent −1/6."""
    case = make_case("cnn")
    assert merge_small_dims((4, 3, 2, 2), 8) == (4, 3, 4)
    states = _distributed_reference(case, ["4.weight"], 1, 0.0, 1.0, 1e-3, 8, lambda g: g.reshape(4, 3, 4))
    for direction, expected in states:
        torch.testing.assert_close(direction, expected, rtol=1e-10, atol=1e-12)


def _grafting_reference(kind, g_history, bar, beta2, eps):
    """``P_graft = Ḡ/(√(V/bc) + ε)`` with V from the raw gradients (or ``Ḡ`` for SGD)."""
    if kind == "sgd":
        return bar
    t = len(g_history)
    if kind == "adagrad":
        v = sum(g * g for g in g_history)
        return bar / (v.sqrt() + eps)
    v = sum((1 - beta2) * beta2 ** (t - 1 - s) * g * g for s, g in enumerate(g_history))
    bias = 1 - beta2 ** t if kind == "adam" else 1.0
    return bar / ((v / bias).sqrt() + eps)


@pytest.mark.parametrize("kind, beta2", [("adagrad", 1.0), ("rmsprop", 0.99), ("adam", 0.999), ("sgd", None)])
def test_distributed_shampoo_grafting_gives_each_block_the_grafted_norm_float64(kind, beta2):
    """Step 1 (before ``start_preconditioning_step = 2``) is ``P_graft``; later ``‖P_b‖ = ‖P_graft,b‖`` per block."""
    case = make_case("mlp_ce")
    model = copy.deepcopy(case.model)
    opt = curvlab.optim.make("distributed_shampoo", model, case.loss, lr=0.05, params=r"^0\.", grafting=kind,
                             precondition_frequency=2, max_preconditioner_dim=4, betas=(0.0, 1.0))
    history = {}
    for t, batch in enumerate(case.batches * 2, start=1):
        g = _gradients(model, batch, case.loss, opt.names)
        opt.step(batch)
        for name in opt.names:
            history.setdefault(name, []).append(g[name])
            graft = _grafting_reference(kind, history[name], g[name], beta2, 1e-10)
            direction = opt.last_direction[name]
            if t == 1:
                torch.testing.assert_close(direction, graft, rtol=1e-12, atol=0)
                continue
            blocks = block_slices(direction.shape, 4)
            assert len(blocks) > 1
            for where in blocks:
                torch.testing.assert_close(torch.linalg.vector_norm(direction[where]),
                                           torch.linalg.vector_norm(graft[where]), rtol=1e-12, atol=0)


def test_distributed_shampoo_direction_is_zero_before_the_first_roots_without_grafting():
    case = make_case("mlp_ce")
    opt = curvlab.optim.make("distributed_shampoo", copy.deepcopy(case.model), case.loss, precondition_frequency=3)
    for t, batch in enumerate(case.batches, start=1):
        opt.step(batch)
        nonzero = any(bool(d.abs().sum() > 0) for d in opt.last_direction.values())
        assert nonzero == (t == 3)


@pytest.mark.parametrize("eps", [1e-12, 1e-4])
def test_distributed_shampoo_eigh_and_newton_roots_agree_float64(eps):
    case = make_case("cnn")
    directions = {}
    for root_inverse in ("eigh", "newton"):
        model = copy.deepcopy(case.model)
        opt = curvlab.optim.make("distributed_shampoo", model, case.loss, lr=0.05, params=r"^(0|4|8)\.",
                                 max_preconditioner_dim=8, eps=eps, root_inverse=root_inverse)
        for batch in case.batches:
            opt.step(batch)
        directions[root_inverse] = opt.last_direction
    for name, direction in directions["eigh"].items():
        assert _relative_error(directions["newton"][name], direction) < NEWTON_RTOL


def test_distributed_shampoo_linear_map_is_the_step_between_refreshes_and_weight_decay_is_decoupled():
    case = make_case("mlp_mse")
    model = copy.deepcopy(case.model)
    lr, decay = 0.05, 0.1
    opt = curvlab.optim.make("distributed_shampoo", model, case.loss, lr=lr, precondition_frequency=2,
                             betas=(0.0, 1.0), weight_decay=decay, max_preconditioner_dim=6)
    for t, batch in enumerate(case.batches * 2, start=1):
        g = _gradients(model, batch, case.loss, opt.names)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = opt.preconditioner_state
        opt.step(batch)
        if t % 2 == 1 and t > 2:
            mapped = opt.method.preconditioner.linear(state)(g)
            for name in opt.names:
                torch.testing.assert_close(opt.last_direction[name], mapped[name], rtol=1e-13, atol=0)
        for name, p in model.named_parameters():
            expected = before[name] - lr * (opt.last_direction[name] + decay * before[name])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("hyper", [{"grafting": "lamb"}, {"root_inverse": "svd"}, {"betas": (0.9, 1.5)},
                                   {"precondition_frequency": 4, "start_preconditioning_step": 2},
                                   {"grafting": "adagrad", "grafting_beta2": 0.9}])
def test_distributed_shampoo_refuses_bad_hyperparameters(hyper):
    with pytest.raises(curvlab.InvalidProblem):
        curvlab.optim.method("distributed_shampoo", **hyper)


def test_root_of_a_float32_low_rank_statistic_is_finite_and_bounded_by_the_ridge():
    """Rounding makes a float32 rank-one statistic indefinite below −ελ_max, where coupled Newton diverges."""
    generator = torch.Generator().manual_seed(3)
    g = torch.randn(16, 1, generator=generator) * 0.1
    statistic = (g @ g.T + 1e-12 * torch.eye(16)).float()
    root, kept = asdl_inverse_root(statistic, 4, 1e-12)
    ridge = 1e-12 * float(torch.linalg.eigvalsh(statistic.double()).max())
    eigenvalues = torch.linalg.eigvalsh(root.double())
    assert torch.isfinite(root).all() and torch.equal(kept, statistic)
    assert float(eigenvalues.min()) > 0 and float(eigenvalues.max()) <= ridge ** -0.25 * (1 + 1e-3)
