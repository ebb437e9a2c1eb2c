"""The empirical Fisher in Gram (per-example gradient) form, inverted with the Woodbury identity.

With ``g_n = ∇ℓ_n`` ``(P,)`` the gradient of example ``n``'s summed loss and ``R`` the reduction
factor, the empirical Fisher of ``N`` examples is ``E = R Σ_n g_n g_nᵀ = U Uᵀ`` with
``U = √R [g_1 … g_N]`` ``(P, N)``. Everything needed for ``E`` and its damped inverse lives in the
``N × N`` Gram matrix ``K = Uᵀ U``:

    ``(U Uᵀ + δ I)⁻¹ = (I − U (δ I + K)⁻¹ Uᵀ) / δ``,   and with ``K = V Λ Vᵀ``,
    ``(U Uᵀ)^p = U V Λ^{p−1} Vᵀ Uᵀ``  (``p > 0``, over the nonzero ``λ``).

SMW-NG (Ren & Goldfarb 2019) uses one such block over all parameters (``per_layer=False``); SENG
(Yang et al. 2022) one per module (``per_layer=True``, the block-diagonal of ``E``).

``U`` is never materialised for ``nn.Linear`` layers (``s_nt = W a_nt + b``, positions ``t`` of
sequence inputs ``(N, T, in)``, ``T = 1`` otherwise, and the calls of a layer used several times
all count as positions): with the inputs ``a_nt`` and the output gradients ``e_nt = √R ∂ℓ_n/∂s_nt``
a layer's per-example gradient is ``G_n = Σ_t e_nt a_ntᵀ`` (and ``Σ_t e_nt`` for the bias), so

    ``(Uᵀ v)_n = Σ_t e_ntᵀ V a_nt + e_ntᵀ v_b``,   ``U c = (Σ_{n,t} c_n e_nt a_ntᵀ, Σ_{n,t} c_n e_nt)``,
    ``K_nm = Σ_{t,s} (a_ntᵀ a_ms)(e_ntᵀ e_ms) + (Σ_t e_nt)ᵀ(Σ_s e_ms)``

(for ``T = 1`` the Hadamard product ``(A Aᵀ) ⊙ (E Eᵀ) + E Eᵀ``; it costs ``N²T²(in + out)``). The
``a_nt`` and ``e_nt`` come from one forward and one backward pass of ``torch.func.vjp``: forward
hooks record each layer's input and add a zero perturbation to its output, and the pull-back of the
summed loss to the perturbations gives the ``e_nt``. This assumes that examples pass through the model
independently with the batch dimension leading every layer input (a probe on two examples finds the
layers and their shapes; a layer whose output shape then disagrees on the whole batch is refused),
and that a layer's parameters are used only by calling the layer. Parameters of every
other module, and Linear parameters shared with another name (tied weights), use explicit per-example
gradients from ``vmap(grad)``.

For the batch's own gradient ``ḡ = √R U 1`` (the mean of the per-example gradients), the damped step
needs no ``P``-vector but the result: ``(U Uᵀ + δ I)⁻¹ ḡ = √R U (δ I + K)⁻¹ 1``
(:func:`natural_gradient_of_batch`, SMW-NG's and SENG's one-pass step).

Sketching (SENG) replaces ``U`` by ``U S`` with a random ``S`` ``(N, s)`` drawn from a local
generator, so that ``E[S Sᵀ] = I`` and hence ``E[U S Sᵀ Uᵀ] = U Uᵀ``: ``"subsample"`` keeps ``s``
distinct examples scaled by ``√(N/s)`` (``s = N`` is exactly ``E``; ``s > N`` is refused),
``"gaussian"`` takes ``S`` with independent ``N(0, 1/s)`` entries. Each block draws its own ``S``.
"""

import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.func import grad, vjp, vmap

from curvlab.approx.base import Approximation, Block, eigen_power
from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators.taps import shared_parameters
from curvlab.parallel import common_to_ranks, concat_over_ranks, max_over_ranks
from curvlab.problem import Problem, differentiable_kernels, example_slice

#: Entries of the scaled copy of a Linear layer's output gradients that :meth:`LinearGradients.combine` makes at
#: once (a chunk of the examples at a time: a quarter of a batch of 128 × 2048, with no loss of speed there).
COMBINE_CHUNK = 2 ** 16

CURVATURES = ("empirical_fisher",)
SKETCH_METHODS = ("subsample", "gaussian")


class ExampleGradients(ABC):
    """Some rows of ``U`` ``(P, N)``: the per-example gradients of the parameters ``names`` (``size`` entries)."""

    names: list[str]
    size: int

    @abstractmethod
    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """``V U`` for K directions as the rows of ``V`` ``(K, size)``: ``(K, N)``."""

    @abstractmethod
    def combine(self, coefficients: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``C Uᵀ`` for K coefficient rows ``C`` ``(K, N)``, written into ``out`` ``(K, size)`` and returned."""

    @abstractmethod
    def gram(self) -> torch.Tensor:
        """This part's share ``U_bᵀ U_b`` of the Gram matrix: ``(N, N)``."""


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b``, written in place (directly where ``out`` is contiguous: no temporary of its size)."""
    if out.is_contiguous():
        return torch.matmul(a, b, out=out)
    return out.copy_(torch.matmul(a, b))


class ExplicitGradients(ExampleGradients):
    """Per-example gradients held as a ``(N, size)`` matrix ``Uᵀ``."""

    def __init__(self, names: list[str], rows: torch.Tensor):
        self.names = names
        self.rows = rows
        self.size = rows.shape[1]

    def project(self, rows):
        return rows @ self.rows.T

    def combine(self, coefficients, out):
        return _product_into(out, coefficients, self.rows)

    def gram(self):
        return self.rows @ self.rows.T


class LinearGradients(ExampleGradients):
    """A Linear layer's per-example gradients ``G_n = Σ_t e_nt a_ntᵀ`` (and ``Σ_t e_nt``), never formed.

    Args:
        names: the studied ones of the layer's weight and bias, in that order.
        inputs: ``a`` ``(N, T, in)``.
        out_grads: ``e`` ``(N, T, out)`` (zero rows pad shorter sequences).
        weight, bias: whether the weight ``(out, in)`` and the bias ``(out,)`` are among ``names``.
    """

    def __init__(self, names: list[str], inputs: torch.Tensor, out_grads: torch.Tensor, weight: bool, bias: bool):
        self.names = names
        self.inputs = inputs
        self.out_grads = out_grads
        self.weight = weight
        self.bias = bias
        self._weight_size = out_grads.shape[2] * inputs.shape[2] if weight else 0
        self.size = self._weight_size + (out_grads.shape[2] if bias else 0)

    def project(self, rows):
        count, (N, _, out), inp = rows.shape[0], self.out_grads.shape, self.inputs.shape[2]
        result = rows.new_zeros(count, N)
        if self.weight:
            V = rows[:, :self._weight_size].reshape(count, out, inp)
            mapped = torch.matmul(self.inputs.reshape(-1, inp), V.transpose(1, 2))  # (K, N·T, out): a_ntᵀ Vᵀ
            result += (mapped.reshape(count, N, -1, out) * self.out_grads).sum((2, 3))
        if self.bias:
            result += rows[:, self._weight_size:] @ self.out_grads.sum(1).T
        return result

    def combine(self, coefficients, out):
        count, (N, T, d_out), inp = coefficients.shape[0], self.out_grads.shape, self.inputs.shape[2]
        if self.weight:  # Σ_n c_kn Σ_t e_nt a_ntᵀ, a chunk of the examples at a time
            weights = out[:, :self._weight_size].unflatten(1, (d_out, inp))
            chunk = max(1, COMBINE_CHUNK // (count * T * d_out))
            for start in range(0, N, chunk):
                weighted = (coefficients[:, start:start + chunk, None, None]
                            * self.out_grads[start:start + chunk]).reshape(count, -1, d_out).transpose(1, 2)
                inputs = self.inputs[start:start + chunk].reshape(-1, inp)
                if start == 0:
                    _product_into(weights, weighted, inputs)
                else:
                    weights.baddbmm_(weighted, inputs.expand(count, -1, -1))
        if self.bias:  # Σ_n c_kn Σ_t e_nt, without summing e over t for every example first
            summed = (coefficients @ self.out_grads.reshape(N, T * d_out)).unflatten(1, (T, d_out)).sum(1)
            out[:, self._weight_size:].copy_(summed)
        return out

    def gram(self):
        N, T, _ = self.out_grads.shape
        summed = self.out_grads.sum(1)
        result = summed @ summed.T if self.bias else summed.new_zeros(N, N)
        if self.weight:
            a = self.inputs.reshape(N * T, -1)
            e = self.out_grads.reshape(N * T, -1)
            result += ((a @ a.T) * (e @ e.T)).reshape(N, T, N, T).sum((1, 3))
        return result


class GramBlock(Block):
    """``σ I + Z V diag(c) Vᵀ Zᵀ`` with ``Z = U S`` ``(p_b, r)``, ``M = Zᵀ Z = V diag(λ) Vᵀ`` ``(r, r)``.

    The empirical-Fisher block is ``σ = 0``, ``c = 1`` (``Z Zᵀ``). Since ``Z V diag(c) Vᵀ Zᵀ`` has the
    eigenvalues ``μ = λ c`` with the orthonormal eigenvectors ``Z V Λ^{-1/2}``, the damped inverse and
    powers stay of this form: ``(σ I + …  + δ I)⁻¹`` has ``σ' = 1/d``, ``c' = −c / (d (d + μ))`` with
    ``d = σ + δ``; the power ``p > 0`` of a block with ``σ = 0`` has ``c' = μ^p / λ`` (0 where ``λ`` is
    zero to rounding).

    Args:
        parts: the rows of ``U`` ``(p_b, N)``, in the block's parameter order.
        mixing: ``S`` ``(N, r)``, or ``None`` for ``S = I``.
        example_gram: ``K = Uᵀ U`` ``(N, N)``; gram: ``M = Sᵀ K S`` ``(r, r)`` (``K`` itself for ``S = I``).
        basis, eigenvalues: ``V``, ``λ`` of ``M`` (clipped at 0).
        coefficients: ``c`` ``(r,)``; shift: ``σ``.
    """

    def __init__(self, parts: list[ExampleGradients], mixing: torch.Tensor | None, example_gram: torch.Tensor,
                 gram: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor, coefficients: torch.Tensor,
                 shift: float = 0.0):
        self.parts = parts
        self.mixing = mixing
        self.example_gram = example_gram
        self.gram = gram
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.coefficients = coefficients
        self.shift = shift
        self.size = sum(part.size for part in parts)

    @classmethod
    def from_gradients(cls, parts: list[ExampleGradients], mixing: torch.Tensor | None = None) -> "GramBlock":
        """The block ``Z Zᵀ``, ``Z = U S``, from the rows of ``U`` and the sketch ``S`` (``None``: ``I``)."""
        example_gram = sum(part.gram() for part in parts)
        gram = example_gram if mixing is None else mixing.T @ example_gram @ mixing
        values, basis = torch.linalg.eigh((gram + gram.T) / 2)
        return cls(parts, mixing, example_gram, gram, basis, values.clamp(min=0), torch.ones_like(values))

    def _derived(self, shift: float, coefficients: torch.Tensor) -> "GramBlock":
        return GramBlock(self.parts, self.mixing, self.example_gram, self.gram, self.basis, self.eigenvalues,
                         coefficients, shift)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """``V Z`` for K directions as rows ``(K, p_b)``: ``(K, r)``."""
        pieces = rows.split([part.size for part in self.parts], dim=1)
        projected = sum(part.project(piece) for part, piece in zip(self.parts, pieces))
        return projected if self.mixing is None else projected @ self.mixing

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``C Zᵀ`` for K rows ``C`` ``(K, r)``: ``(K, p_b)``."""
        if self.mixing is not None:
            coefficients = coefficients @ self.mixing.T
        return self.combine_examples(coefficients, coefficients.new_empty(coefficients.shape[0], self.size))

    def combine_examples(self, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``W Uᵀ`` for K rows ``W`` ``(K, N)`` over the examples, each part written into its columns of ``out`` ``(K, p_b)``."""
        for part, columns in zip(self.parts, out.split([part.size for part in self.parts], dim=1)):
            part.combine(weights, columns)
        return out

    def damped_solve_in_span(self, damping: float, weights: torch.Tensor) -> torch.Tensor:
        """``w`` ``(N,)`` with ``U w = (B + δ I)⁻¹ U u`` for this block ``B`` and ``u = weights`` ``(N,)``: no ``P``-vector.

        With ``d = σ + δ``, ``μ = λ c``: ``w = u/d − S V diag(c / (d (d + μ))) Vᵀ Sᵀ K u``, which for ``S = I``
        is ``V diag(1 / (d + μ)) Vᵀ u``, computed so, without the cancellation of the two terms.
        """
        d = self.shift + damping
        if d <= 0:
            raise InvalidProblem("the Gram (low-rank) empirical Fisher without damping has no inverse; give a damping > 0")
        spectrum = self.eigenvalues * self.coefficients
        if self.mixing is None:
            return self.basis @ ((self.basis.T @ weights) / (d + spectrum))
        mixed = self.basis.T @ (self.mixing.T @ (self.example_gram @ weights))
        return weights / d - self.mixing @ (self.basis @ (mixed * self.coefficients / (d * (d + spectrum))))

    def matmat(self, rows):
        core = (self.project(rows) @ self.basis) * self.coefficients
        result = self.combine(core @ self.basis.T)
        return result.add_(rows, alpha=self.shift) if self.shift else result

    def inverse(self, damping):
        d = self.shift + damping
        if d <= 0:
            raise InvalidProblem(
                "the Gram (low-rank) empirical Fisher without damping has no inverse; give a damping > 0"
            )
        spectrum = self.eigenvalues * self.coefficients
        return self._derived(1 / d, -self.coefficients / (d * (d + spectrum)))

    def power(self, p):
        if self.shift or p <= 0:
            raise InvalidProblem(
                f"the Gram block has only powers p > 0 of the undamped matrix, got p={p:g}; use inverse(damping) "
                f"for negative powers"
            )
        values = self.eigenvalues
        powered = eigen_power(values * self.coefficients, p, "Gram block")
        nonzero = values > values.max() * values.numel() * torch.finfo(values.dtype).eps
        return self._derived(0.0, torch.where(nonzero, powered / torch.where(nonzero, values, 1), 0))

    def _identity(self):
        return torch.eye(self.size, dtype=self.gram.dtype, device=self.gram.device)


def _fast_linear_layers(problem: Problem) -> dict[str, tuple[nn.Linear, list[str]]]:
    """``module name -> (layer, its studied parameter names)`` for the ``nn.Linear`` layers whose
    studied parameters have no other name."""
    shared = shared_parameters(problem.model)
    layers = {}
    for module_name, names in problem.module_blocks():
        module = problem.model.get_submodule(module_name)
        if type(module) is nn.Linear and not shared.intersection(names):
            layers[module_name] = (module, names)
    return layers


class _Recorder:
    """Forward hooks on Linear layers: record each call's input and add a perturbation to its output."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.perturbations: dict[str, list[torch.Tensor]] | None = None
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.output_shapes: dict[str, list[torch.Size]] = {}

    def run(self, forward, perturbations=None):
        self.perturbations = perturbations
        self.inputs = {name: [] for name in self.layers}
        self.output_shapes = {name: [] for name in self.layers}
        handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            return forward()
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name].append(args[0] if args else None)
            self.output_shapes[name].append(output.shape)
            if self.perturbations is None:
                return None
            perturbation = self.perturbations[name][len(self.inputs[name]) - 1]
            if perturbation.shape != output.shape:
                raise InvalidProblem(
                    f"layer {name!r} gives outputs of shape {tuple(output.shape)} on the whole batch but "
                    f"{tuple(perturbation.shape)} on its first examples; the Gram capture needs layers that "
                    f"treat examples independently along the leading dimension"
                )
            return output + perturbation
        return hook


def _batch_first(inputs: list, size: int) -> bool:
    return bool(inputs) and all(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] == size for x in inputs)


def _positions(calls: list[torch.Tensor], size: int) -> torch.Tensor:
    """A layer's tensors ``(N, *, d)`` of each call, as positions of one ``(N, T, d)`` tensor."""
    tensors = [t.reshape(size, -1, t.shape[-1]) for t in calls]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _pad_positions(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(N_b, T_b, d)`` tensors along examples, padding positions with zeros to the largest ``T_b``."""
    if len(tensors) == 1:
        return tensors[0]
    length = max(t.shape[1] for t in tensors)
    return torch.cat([nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in tensors])


def _capture(problem: Problem):
    """Per-example gradients of all studied parameters, as Linear ``(a, e)`` pairs and explicit rows.

    With a process group, every rank gets the examples of all ranks, in rank order.

    Returns:
        ``linear``: module name -> :class:`LinearGradients`; ``explicit``: name -> ``(N, numel)``.
    """
    candidates = _fast_linear_layers(problem)
    recorder = _Recorder({name: layer for name, (layer, _) in candidates.items()})
    params, likelihood = problem.params, problem.likelihood
    batches, eligible = [], set(candidates)
    with torch.no_grad(), differentiable_kernels():
        for _, X, y in problem.batches():
            # A probe on (at most) two examples finds the layers whose inputs lead with the batch and
            # their outputs' shapes; the capture below checks those shapes on the whole batch.
            probe = min(2, y.shape[0])
            try:
                recorder.run(lambda: problem.forward(params, example_slice(X, 0, probe)))
            except Exception as err:
                raise InvalidProblem(
                    f"the model fails on the first {probe} examples of a batch ({type(err).__name__}: {err}); "
                    f"per-example gradients need a model that treats examples independently"
                ) from err
            eligible &= {name for name, calls in recorder.inputs.items() if _batch_first(calls, probe)}
            batches.append((X, y, {name: [(y.shape[0], *shape[1:]) for shape in shapes]
                                   for name, shapes in recorder.output_shapes.items()}))
    eligible = common_to_ranks(eligible, problem.process_group)
    recorder.layers = {name: recorder.layers[name] for name in eligible}
    fallback = [name for name in problem.param_names
                if not any(name in candidates[layer][1] for layer in eligible)]
    root = math.sqrt(problem.reduction_factor)

    def summed_loss(perturbations, X, y):
        output = recorder.run(lambda: problem.forward(params, X), perturbations)
        return likelihood.loss(output, y), recorder.inputs

    def example_loss(subset, x, y):
        one = {key: value.unsqueeze(0) for key, value in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        return likelihood.loss(problem.forward(subset, one), y.unsqueeze(0))

    pairs = {name: ([], []) for name in eligible}
    explicit = {name: [] for name in fallback}
    total = 0.0
    with differentiable_kernels():
        for X, y, shapes in batches:
            size = y.shape[0]
            if eligible:
                zeros = {name: [torch.zeros(shape, dtype=problem.dtype, device=problem.device)
                                for shape in shapes[name]] for name in eligible}
                loss, pullback, inputs = vjp(lambda z: summed_loss(z, X, y), zeros, has_aux=True)
                total = total + loss.detach()
                (out_grads,) = pullback(torch.ones_like(loss))
                for name in eligible:
                    pairs[name][0].append(_positions(inputs[name], size))
                    pairs[name][1].append(root * _positions(out_grads[name], size))
            if fallback:
                subset = {name: params[name] for name in fallback}
                grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(subset, X, y)
                for name in fallback:
                    explicit[name].append(root * grads[name].detach().flatten(1))
    if eligible:
        problem.record_loss(problem.reduction_factor * total)
    group = problem.process_group
    linear = {}
    for name in sorted(eligible):
        names = candidates[name][1]
        prefix = f"{name}." if name else ""
        inputs, out_grads = (_gathered_positions(_pad_positions(tensors).detach(), group) for tensors in pairs[name])
        linear[name] = LinearGradients(names, inputs, out_grads, weight=f"{prefix}weight" in names,
                                       bias=f"{prefix}bias" in names)
    return linear, {name: concat_over_ranks(torch.cat(rows), group) for name, rows in explicit.items()}


def _gathered_positions(tensor: torch.Tensor, group) -> torch.Tensor:
    """The ranks' ``(N_r, T_r, d)`` concatenated along examples, positions padded with zeros to the largest ``T_r``."""
    length = max_over_ranks(tensor.shape[1], group)
    if length > tensor.shape[1]:
        tensor = nn.functional.pad(tensor, (0, 0, 0, length - tensor.shape[1]))
    return concat_over_ranks(tensor, group)


def _sketch(count: int, size: int, method: str, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``S`` ``(count, size)`` with ``E[S Sᵀ] = I``."""
    if method == "subsample":
        chosen = torch.randperm(count, generator=generator)[:size]
        mixing = torch.zeros(count, size, dtype=torch.float64)
        mixing[chosen, torch.arange(size)] = math.sqrt(count / size)
    else:
        mixing = torch.randn(count, size, generator=generator, dtype=torch.float64) / math.sqrt(size)
    return mixing.to(dtype=like.dtype, device=like.device)


def gram(problem: Problem, curvature: str = "empirical_fisher", per_layer: bool = False, sketch: int | None = None,
         sketch_method: str = "subsample", seed: int = 0) -> Approximation:
    """The empirical Fisher ``E = U Uᵀ`` in Gram form, whole (SMW-NG) or per module (SENG), optionally sketched.

    Args:
        problem: the model, data (all ``N`` examples of all batches are the columns of ``U``), loss
            and studied parameters.
        curvature: ``"empirical_fisher"``, the only matrix with this per-example factorisation.
        per_layer: ``False``: one block over all parameters (exactly ``E``); ``True``: one block per
            module that owns studied parameters (the block-diagonal of ``E``).
        sketch: ``None`` (no sketch) or the number ``s`` of columns of the sketch ``U S``.
        sketch_method: ``"subsample"`` (``s ≤ N`` examples, rescaled) or ``"gaussian"``.
        seed: seeds the sketch's own generator; the caller's random state is untouched.

    Returns:
        An :class:`Approximation` of :class:`GramBlock` blocks: ``inverse(δ)`` is the exact
        ``(Z Zᵀ + δ I)⁻¹`` (``δ > 0``) and ``power(p)`` exists for ``p > 0``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx import approximate
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])))
        >>> E = approximate(prob, "gram", curvature="empirical_fisher")
        >>> exact = curvlab.curvature(prob, "empirical_fisher").to_dense()
        >>> bool(torch.allclose(E.to_dense(), exact))
        True
        >>> v = torch.randn(prob.num_params, dtype=torch.float64)
        >>> bool(torch.allclose(E.inverse(0.1) @ (exact @ v + 0.1 * v), v))
        True
    """
    if curvature not in CURVATURES:
        raise InvalidProblem(
            f"gram represents only curvature='empirical_fisher' (R Σ_n g_n g_nᵀ from per-example gradients), "
            f"got curvature={curvature!r}"
        )
    if not isinstance(per_layer, bool):
        raise InvalidProblem(f"per_layer must be True or False, got {per_layer!r}")
    if sketch_method not in SKETCH_METHODS:
        raise InvalidProblem(f"unknown sketch_method {sketch_method!r}; choose one of {', '.join(SKETCH_METHODS)}")
    seed = require_integer("seed", seed, minimum=0)
    count = problem.num_examples
    if sketch is not None:
        hint = f" (subsampling keeps at most the N = {count} examples)" if sketch_method == "subsample" else ""
        sketch = require_integer("sketch", sketch, maximum=count if sketch_method == "subsample" else None,
                                 hint=hint or " or None")
    linear, explicit = _capture(problem)
    owner = {name: layer for layer, part in linear.items() for name in part.names}

    def parts_of(names: list[str]) -> list[ExampleGradients]:
        parts = [part for part in linear.values() if part.names[0] in names]
        rest = [name for name in names if name not in owner]
        if rest:
            parts.append(ExplicitGradients(rest, torch.cat([explicit[name] for name in rest], dim=1)))
        return parts

    groups = problem.module_blocks() if per_layer else [("all", list(problem.param_names))]
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for label, names in groups:
        parts = parts_of(names)
        mixing = None if sketch is None else _sketch(count, sketch, sketch_method, generator, problem.params[names[0]])
        blocks.append((label, [name for part in parts for name in part.names], GramBlock.from_gradients(parts, mixing)))
    return Approximation(problem, "gram", curvature, blocks)


def natural_gradient_of_batch(fisher: Approximation, damping: float) -> dict[str, torch.Tensor]:
    """``(E + δ I)⁻¹ ḡ`` for ``E = U Uᵀ`` from :func:`gram` and ``ḡ = √R U 1``, the gradient of the examples ``E`` is built from.

    Block by block ``U_b w_b``, ``w_b`` from the ``N × N`` eigenbasis (:meth:`GramBlock.damped_solve_in_span` of
    ``u = √R 1``): one combination of the examples per layer and neither ``ḡ`` nor its projection ``Uᵀ ḡ``, as
    ASDL's SMW-NG takes its step from the pass that gave its Gram matrix (OPTIMIZERS.md §8).
    """
    problem = fisher.problem
    shapes = dict(zip(problem.param_names, problem.param_shapes))
    mean = torch.full((problem.num_examples,), math.sqrt(problem.reduction_factor), dtype=problem.dtype,
                      device=problem.device)
    direction = {}
    with torch.no_grad():
        for _, names, block in fisher.blocks:
            weights = block.damped_solve_in_span(damping, mean)[None]
            columns = block.combine_examples(weights, weights.new_empty(1, block.size))[0]
            for name, piece in zip(names, columns.split([shapes[name].numel() for name in names])):
                direction[name] = piece.view(shapes[name])
    return {name: direction[name] for name in problem.param_names}
