"""SMW-NG and SENG: damped empirical-Fisher natural gradients through ``N × N`` Gram matrices (OPTIMIZERS.md §7, §8).

With ``g_n = ∇ℓ_n`` the gradient of example ``n``'s summed loss, ``R`` the reduction factor and
``U = √R [g_1 … g_N]`` ``(P, N)``, the empirical Fisher of the batch is ``E = R Σ_n g_n g_nᵀ = U Uᵀ``
(``(1/N) Σ_n g_n g_nᵀ`` for a mean cross-entropy). Both methods step along the damped natural gradient

    ``Δ = (E + λ I)⁻¹ ḡ = ḡ/λ − U (λ I + Uᵀ U)⁻¹ Uᵀ ḡ / λ``   (Woodbury: one ``N × N`` solve),

which :func:`curvlab.approx.gram.gram` gives exactly (its ``inverse(λ)``):

- :func:`smw_ng` (Ren & Goldfarb 2019; ASDL ``SmwEmpNaturalGradientMaker``): one Gram matrix over
  all studied parameters, rebuilt on every step's batch.
- :func:`seng` (Yang et al. 2022; ASDL ``SengGradientMaker``): the block diagonal of ``E``, one block
  per module (a Linear or Conv2d weight together with its bias), optionally sketched.

``compat="asdl"`` SENG reproduces ASDL's formula (§7, §17.1), which is not ``(E_l + λI)⁻¹ ḡ``: for
each Linear or Conv2d layer with inputs ``a_n`` and per-example output gradients ``e_n`` (both
``(d, r)``: ``r = 1`` for a Linear, the truncated-SVD rank of ``e_n`` for a Conv2d), the Gram matrix
``K = (S_a S_aᵀ) ⊙ (S_e S_eᵀ) / r`` of coordinate-sketched ``a``, ``e`` without the bias,
``v = (K/N + λI)⁻¹ (ratio · ⟨S_e e_n, S Ĝ S_a a_n⟩)_n`` with ``Ĝ = G/λ`` (bias column dropped), and the
rank-one surrogate ``Δ̂ = [G b̄]/λ − (Σ_n √|v_n| e_n)(Σ_n v_n [a_n; 1])ᵀ / (N² Σ_n √|v_n|)`` in place of
``Uᵀ v / N``; every other parameter keeps its raw gradient.
"""

from dataclasses import dataclass

import torch
from torch import nn

from curvlab.approx.gram import SKETCH_METHODS, gram, natural_gradient_of_batch
from curvlab.approx.kfac import output_columns
from curvlab.approx.kronecker_statistics import KroneckerLayers
from curvlab.errors import InvalidProblem, require_integer, require_number
from curvlab.optim.adaptive import study_method
from curvlab.optim.base import Preconditioner, require_compat
from curvlab.optim.optimizer import Method
from curvlab.parallel import concat_over_ranks

def damped_empirical_fisher(damping: float, per_layer: bool, sketching_size: int | None = None,
                            sketch_method: str = "subsample") -> Preconditioner:
    """``Δ = (E + λ I)⁻¹ g`` with ``E`` the batch's empirical Fisher, whole (``per_layer=False``) or block-diagonal per module.

    On curvature-update steps the Gram form of ``E`` (:func:`curvlab.approx.gram.gram`) of the batch
    is built and inverted; between updates the stale inverse is applied to the current gradient. Its
    ``step_from_statistics`` gives the batch's step from the Gram form alone (``ḡ = √R U 1``:
    :func:`curvlab.approx.gram.natural_gradient_of_batch`).
    With ``sketching_size`` ``s`` and a batch of ``N > s`` examples, ``U`` is replaced by its sketch
    ``U S`` with ``s`` columns (``sketch_method``), seeded by the step.
    """

    def fisher_of(statistics):
        problem = statistics.problem
        sketch = sketching_size if sketching_size is not None and problem.num_examples > sketching_size else None
        return gram(problem, "empirical_fisher", per_layer=per_layer, sketch=sketch, sketch_method=sketch_method,
                    seed=statistics.seed_for(1))

    def accumulate(state, statistics):
        return fisher_of(statistics).inverse(damping)

    def step_from_statistics(state, statistics):
        fisher = fisher_of(statistics)
        return natural_gradient_of_batch(fisher, damping), fisher.inverse(damping)

    def apply(grads, inverse, params):
        if inverse is None:
            raise InvalidProblem("the empirical-Fisher natural gradient needs the curvature of a batch before its "
                                 "first step; accumulate statistics first")
        return inverse @ grads, inverse

    def linear(inverse):
        return lambda v: inverse @ v

    return Preconditioner(init=lambda params: None, apply=apply, accumulate=accumulate, linear=linear,
                          release=_rebuilt, step_from_statistics=step_from_statistics)


def smw_ng(damping: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0) -> Method:
    """SMW-NG: the exact damped empirical-Fisher natural gradient of the whole network, ``Δ = (E + λ I)⁻¹ ḡ``.

    ``E = R Σ_n g_n g_nᵀ`` ``(P, P)`` over all studied parameters of the current batch (no sketch, no
    interval: rebuilt every step) is inverted through its ``N × N`` Gram matrix (OPTIMIZERS.md §8;
    ASDL's default damping is 1e-5, the study's 1e-3). ASDL's Conv2d Gram is a Hadamard
    approximation; curvlab's per-example gradients make it exact. Every studied parameter enters
    ``E``: exclude normalisation layers, as the study did, with ``params=``.

    Args:
        damping: ``λ > 0``.
        momentum, weight_decay: torch SGD's heavy-ball momentum and L2 weight decay on ``Δ`` (the study's rule).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2).double()
        >>> opt = curvlab.optim.make("smw_ng", model, lr=0.1, damping=1e-2)
        >>> loss = opt.step((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
        >>> sorted(opt.last_direction)
        ['bias', 'weight']
    """
    damping = require_number("damping", damping)
    return study_method(damped_empirical_fisher(damping, per_layer=False), momentum, weight_decay)


def seng(damping: float = 1e-3, sketching_size: int | None = 256, sketch_method: str = "subsample",
         truncated_rank: int = 16, curvature_update_interval: int = 1, momentum: float = 0.9,
         weight_decay: float = 0.0, compat: str | None = None) -> Method:
    """SENG: the layer-wise damped empirical-Fisher natural gradient ``Δ_l = (E_l + λ I)⁻¹ ḡ_l`` (OPTIMIZERS.md §7).

    ``E_l`` is the block of ``E`` of module ``l``'s studied parameters (a weight with its bias as in
    ASDL's ``[W | b]``; a normalisation layer gets its own exact block), inverted through its
    ``N × N`` Gram matrix. On curvature-update steps the Gram matrices of the batch are built and
    inverted; in between, the stale inverses are applied to the current gradient.

    Sketching: by default (``compat=None``) a batch of ``N > sketching_size`` examples is replaced by
    ``sketching_size`` sketch columns ``U S`` (``sketch_method``: ``"subsample"`` examples rescaled by
    ``√(N/s)``, or ``"gaussian"``), the paper's sketch of the per-example gradients; for
    ``N ≤ sketching_size`` (or ``sketching_size=None``) the step is exact. With ``compat="asdl"`` the
    step is ASDL's formula (module docstring): ``sketching_size`` random input and output
    coordinates of each layer (those beyond ``sketching_size``) scaled by ``d/sketching_size``, and
    a Conv2d's output gradients truncated to rank ``truncated_rank`` over the positions. ASDL's
    default damping is the config's; the study used 1e-3 (1 for ResNet-18) and intervals 1 to 30.
    The ASDL formula reads ``ḡ`` as the mean of per-example gradients, which the optimizer's
    gradient is for a mean cross-entropy (the study's loss).

    Args:
        damping: ``λ > 0``.
        sketching_size: columns kept by the sketch (ASDL's default 256), or ``None`` for no sketch.
        sketch_method: the default mode's sketch, ``"subsample"`` or ``"gaussian"``.
        truncated_rank: ``compat="asdl"`` only: the rank of a Conv2d's output gradients (ASDL's 16).
        curvature_update_interval: the Gram matrices are rebuilt every this many steps.
        momentum, weight_decay: torch SGD's heavy-ball momentum and L2 weight decay on ``Δ`` (the study's rule).
        compat: ``None`` (the exact layer-wise step above) or ``"asdl"`` (ASDL's formula, §17.1).

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> opt = curvlab.optim.make("seng", model, lr=0.1, damping=1e-2)
        >>> loss = opt.step((torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])))
        >>> sorted(opt.last_direction)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    require_compat(compat)
    damping = require_number("damping", damping)
    if sketching_size is not None:
        sketching_size = require_integer("sketching_size", sketching_size, hint=" or None")
    if sketch_method not in SKETCH_METHODS:
        raise InvalidProblem(f"unknown sketch_method {sketch_method!r}; choose one of {', '.join(SKETCH_METHODS)}")
    truncated_rank = require_integer("truncated_rank", truncated_rank)
    interval = require_integer("curvature_update_interval", curvature_update_interval)
    if compat == "asdl":
        preconditioner = asdl_seng(damping, sketching_size, truncated_rank)
    else:
        preconditioner = damped_empirical_fisher(damping, per_layer=True, sketching_size=sketching_size,
                                                 sketch_method=sketch_method)
    return study_method(preconditioner, momentum, weight_decay, interval, interval)


@dataclass(frozen=True)
class SketchedLayer:
    """ASDL SENG's statistics of one layer on a curvature-update batch of ``N`` examples.

    Attributes:
        weight, bias: the layer's parameter names (``bias`` is ``None`` when it has no studied bias).
        inputs: ``a`` ``(N, d_in, r)``; out_grads: ``e`` ``(N, d_out, r)`` (after a Conv2d's truncation).
        sketched_inputs, sketched_out_grads: ``S_a a``, ``S_e e``: the sketched coordinates, scaled.
        in_indices, out_indices: the sketched coordinates of ``a`` and ``e`` (``None``: not sketched).
        gram_inverse: ``(K/N + λ I)⁻¹`` ``(N, N)``.
    """

    weight: str
    bias: str | None
    inputs: torch.Tensor
    out_grads: torch.Tensor
    sketched_inputs: torch.Tensor
    sketched_out_grads: torch.Tensor
    in_indices: torch.Tensor | None
    out_indices: torch.Tensor | None
    gram_inverse: torch.Tensor


def _coordinate_sketch(tensor: torch.Tensor, size: int | None, generator: torch.Generator):
    """ASDL's sketch of ``(N, d, r)``: ``size`` random coordinates of ``d`` scaled by ``d/size`` (if ``d > size``)."""
    dim = tensor.shape[1]
    if size is None or size >= dim:
        return tensor, None
    indices = torch.randperm(dim, generator=generator)[:size].to(tensor.device)
    return tensor.index_select(1, indices) * (dim / size), indices


def _truncate(inputs: torch.Tensor, out_grads: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv2d's ``e_n ≈ U_r S_r V_rᵀ`` ``(d_out, T)``: ``e_n ← U_r S_r``, ``a_n ← a_n V_r`` (ASDL ``conv.py``)."""
    if rank >= inputs.shape[2]:
        return inputs, out_grads
    u, s, vt = torch.linalg.svd(out_grads, full_matrices=False)
    return inputs @ vt[:, :rank].transpose(1, 2), u[:, :, :rank] * s[:, None, :rank]


def asdl_seng(damping: float, sketching_size: int | None, truncated_rank: int) -> Preconditioner:
    """ASDL's SENG step (``compat="asdl"``, module docstring): Linear and Conv2d layers, other parameters raw.

    A Linear layer must see one position per example (inputs ``(N, d_in)``). The coordinate
    sketches are drawn from the step's generator; the per-example output gradients ``e_n`` are those of
    the per-example summed loss at the true labels.
    """

    def layers_of(statistics, gradient: bool = False):
        """The layers' statistics and, with ``gradient``, the batch gradient ``ḡ`` of their studied parameters."""
        problem = statistics.problem
        taps = KroneckerLayers(problem)
        targets = {}
        for label, names in problem.module_blocks():
            prefix = f"{label}." if label else ""
            if label in taps.modules and prefix + "weight" in names:
                targets[label] = (prefix + "weight", prefix + "bias" if prefix + "bias" in names else None)
        inputs, out_grads = {}, {}
        columns = output_columns(problem, "empirical_fisher", 1, statistics.seed)
        for batch_inputs, gradients in taps.statistics(set(targets), columns):
            for label, a in batch_inputs.items():
                inputs.setdefault(label, []).append(a)
            for e, _ in gradients:
                for label in targets:
                    out_grads.setdefault(label, []).append(e[label][0])
        generator = statistics.generator(1)
        count = problem.num_examples
        layers, grads = {}, {}
        for label, (weight, bias) in targets.items():
            a, e = (concat_over_ranks(torch.cat(rows[label]), problem.process_group).transpose(1, 2)
                    for rows in (inputs, out_grads))
            if gradient:  # ḡ_W = R Σ_{n,t} e_nt a_ntᵀ, ḡ_b = R Σ_{n,t} e_nt
                grads[weight] = torch.einsum("nir,njr->ij", e, a).mul_(problem.reduction_factor).view(
                    problem.params[weight].shape)
                if bias is not None:
                    grads[bias] = e.sum((0, 2)).mul_(problem.reduction_factor)
            if isinstance(taps.modules[label], nn.Conv2d):
                a, e = _truncate(a, e, truncated_rank)
            elif a.shape[2] != 1:
                raise InvalidProblem(
                    f"compat='asdl' SENG takes Linear layers on (N, d_in) inputs; layer {label!r} sees "
                    f"{a.shape[2]} positions per example"
                )
            sub_a, in_indices = _coordinate_sketch(a, sketching_size, generator)
            sub_e, out_indices = _coordinate_sketch(e, sketching_size, generator)
            flat_a, flat_e = sub_a.flatten(1), sub_e.flatten(1)
            flat_a, flat_e = flat_a.double(), flat_e.double()  # in float32, rounding can make K/N + λI indefinite
            K = (flat_a @ flat_a.T) * (flat_e @ flat_e.T) / e.shape[2]
            eye = torch.eye(count, dtype=K.dtype, device=K.device)
            factor, info = torch.linalg.cholesky_ex(K / count + damping * eye)
            if int(info):
                raise InvalidProblem(
                    f"SENG: the damped Gram matrix of layer {label!r} is not positive definite even in float64 "
                    f"(largest entry {float(K.abs().max() / count):.3g}): the parameters have diverged or the "
                    f"damping is too small for them; lower the learning rate or raise the damping")
            inverse = torch.cholesky_inverse(factor).to(a.dtype)
            layers[label] = SketchedLayer(weight, bias, a, e, sub_a, sub_e, in_indices, out_indices, inverse)
        return layers, grads

    def accumulate(state, statistics):
        return layers_of(statistics)[0]

    def step_from_statistics(state, statistics):
        layers, grads = layers_of(statistics, gradient=True)
        problem = statistics.problem
        rest = [name for name in problem.param_names if name not in grads]
        if rest:  # parameters the formula leaves raw: their gradient from a pass of their own
            restricted = problem.restrict(rest)
            grads.update(restricted.unflatten(restricted.gradient()))
        return apply({name: grads[name] for name in problem.param_names}, layers, statistics.params)

    def apply(grads, layers, params):
        if layers is None:
            raise InvalidProblem("SENG needs the curvature of a batch before its first step; accumulate statistics first")
        direction = dict(grads)
        for layer in layers.values():
            weight = grads[layer.weight]
            g = weight.flatten(1)
            columns = g.shape[1] + (layer.bias is not None)  # ASDL's ratio counts the bias column
            sub_g, ratio = g, 1.0
            if layer.out_indices is not None:
                sub_g = sub_g.index_select(0, layer.out_indices)
                ratio *= g.shape[0] / sub_g.shape[0]
            if layer.in_indices is not None:
                sub_g = sub_g.index_select(1, layer.in_indices)
                ratio *= columns / sub_g.shape[1]
            projected = torch.einsum("ij,nir,njr->n", sub_g, layer.sketched_out_grads, layer.sketched_inputs)
            v = layer.gram_inverse @ projected.mul_(ratio / damping)
            roots = v.abs().sqrt()
            total = roots.sum()
            coefficients = v / total if total > 0 else torch.zeros_like(v)
            mixed_out = torch.einsum("n,nir->ir", roots, layer.out_grads)  # Σ_n √|v_n| e_n  (d_out, r)
            mixed_in = torch.einsum("n,njr->jr", coefficients, layer.inputs)  # Σ_n v_n a_n / Σ √|v_n|  (d_in, r)
            scale = -1.0 / layer.inputs.shape[0] ** 2
            direction[layer.weight] = torch.addmm(g, mixed_out, mixed_in.T, beta=1 / damping, alpha=scale).view(
                weight.shape)
            if layer.bias is not None:  # the bias column of [a_n; 1] sums the coefficients
                direction[layer.bias] = (mixed_out.sum(1) * (coefficients.sum() * scale)).add_(grads[layer.bias],
                                                                                             alpha=1 / damping)
        return direction, layers

    return Preconditioner(init=lambda params: None, apply=apply, accumulate=accumulate, release=_rebuilt,
                          step_from_statistics=step_from_statistics)


def _rebuilt(state):
    """``release``: nothing, since a step that accumulates builds the whole state again from its batch."""
    return None


__all__ = ["SketchedLayer", "asdl_seng", "damped_empirical_fisher", "seng", "smw_ng"]
