"""Kronecker-factored approximations of the GGN and the Fishers: KFAC, EKFAC and FOOF.

A layer ``s = W a (+ b)``, ``W`` ``(d_out, d_in)``, applied at ``T`` positions of each example (see
:mod:`curvlab.approx.kronecker_statistics`: ``T = 1`` for a Linear on ``(N, d_in)``, sequence
positions, or the output pixels of a Conv2d on im2col patches) has the exact curvature block, in
curvlab's row-major flattening of ``W``,

    ``C_W = R Σ_n Σ_k g_nk g_nkᵀ``,  ``g_nk = vec(Σ_t e_nkt a_ntᵀ)``  ``(d_out · d_in,)``,

where ``a_nt`` ``(d_in,)`` is the layer's input and ``e_nkt`` ``(d_out,)`` the gradient at its output
of the k-th output-space column of example n (``R`` is DESIGN.md's reduction factor):

- ``ggn`` (= ``fisher``), type-2: the columns of the square root of ``∇²_f ℓ_n``
  (``likelihood.hessian_sqrt``; one column per class for cross-entropy, one per output feature for
  MSE and BCE), weight ``R``. As in curvlinops, a column is back-propagated for all positions of a
  sequence output at once, so on ``(N, T, C)`` outputs of a network that mixes positions the
  statistics hold cross-position terms that the exact GGN does not have;
- ``fisher_mc``: ``∂ℓ(f_n, ŷ_ns)/∂f_n`` at the labels that ``curvlab.curvature(problem, "fisher_mc",
  mc_samples=S, seed=seed)`` draws, weight ``R / S``;
- ``empirical_fisher``: ``∂ℓ(f_n, y_n)/∂f_n`` at the true labels, weight ``R``.

**KFAC** (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions; Eschenhagen et al. 2023 for
expand/reduce): ``C_W ≈ B ⊗ A``, ``A`` ``(d_in, d_in)``, ``B`` ``(d_out, d_out)``, summed over all
batches, with ``N`` the number of examples in the whole dataset and ``T`` that of each batch:

- expand: ``A = Σ_{n,t} a_nt a_ntᵀ / (N T)``,  ``B = R Σ_{n,k,t} e_nkt e_nktᵀ``;
- reduce: ``A = Σ_n ā_n ā_nᵀ / N``, ``ā_n = Σ_t a_nt / T``;  ``B = R Σ_{n,k} ē_nk ē_nkᵀ``, ``ē_nk = Σ_t e_nkt``.

These are the scales of curvlinops 3.0.1's ``KFACLinearOperator`` (its input covariance divides by
``N_data`` times the weight-sharing size in the expand setting; its gradient covariance undoes the
loss's mean reduction so that ``B`` carries ``R``): on one example without weight sharing
``B ⊗ A = C_W`` exactly, and in a deep linear network with MSE, where ``e_nk`` does not depend on
``n``, KFAC is exact on any data. A bias has the factor ``A = 1`` and gets its own block ``B``; with
``joint_bias=True`` the inputs become ``[a; 1]`` and ``[W b]`` ``(d_out, d_in + 1)`` gets ``B ⊗ A``.

**EKFAC** (George et al. 2018): KFAC's eigenbasis ``Q_B ⊗ Q_A`` with the eigenvalues refitted to
the diagonal of ``C_W`` in that basis, ``S = R Σ_n Σ_k (Q_Bᵀ G_nk Q_A)²`` ``(d_out, d_in)`` with
``G_nk = Σ_t e_nkt a_ntᵀ`` the per-example gradient (summed over positions in either setting), from
a second pass over the data. Among matrices diagonal in this basis it is the closest to ``C_W`` in
Frobenius norm, hence never further than KFAC.

**FOOF** (Benzing 2022): ``C_W ≈ I ⊗ A`` (``B = I``: forward passes only, as curvlinops'
``FisherType.FORWARD_ONLY``) and ``I`` for a bias, the diagonal block that ``joint_bias=True`` gives
it (the last entry of the homogeneous ``A`` is 1). For one Linear layer with MSE the GGN block is
``2 R N (I ⊗ A)`` (bias ``2 R N I``): FOOF is the GGN of the layer's outputs up to that scale.

Parameters of other modules (normalisation layers, embeddings, attention projections, Conv2d with
several groups or non-zero padding modes), of layers that hold a tied parameter, or of layers
called other than once per forward pass get their exact block of the curvature;
``Approximation.exact_parameters`` lists them.
"""

import torch

from curvlab.approx.base import (Approximation, DenseBlock, DiagonalBlock, EigenbasisBlock, Homogeneous,
                                 KroneckerBlock, Reshape)
from curvlab.approx.kronecker_statistics import Cotangents, KroneckerLayers
from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators import curvature as exact_curvature
from curvlab.parallel import concat_over_ranks
from curvlab.problem import Problem

CURVATURES = ("ggn", "fisher", "fisher_mc", "empirical_fisher")
KFAC_APPROX = ("expand", "reduce")
OPTIONS = ("kfac_approx", "joint_bias", "mc_samples", "seed")
# Entries of one chunk of per-example gradients (k · n · d_out · d_in) when EKFAC sums over positions.
GRADIENT_CHUNK = 2 ** 22


class _Layer:
    """A Kronecker-factored module: its studied weight and bias names and the weight's matrix shape."""

    def __init__(self, label: str, module, names: list[str], joint_bias: bool):
        prefix = f"{label}." if label else ""
        self.label = label
        self.weight = prefix + "weight" if prefix + "weight" in names else None
        self.bias = prefix + "bias" if prefix + "bias" in names else None
        self.joint = joint_bias and self.weight is not None and self.bias is not None
        self.shape = (module.weight.shape[0], module.weight[0].numel())

    @property
    def layout(self):
        return Homogeneous(*self.shape) if self.joint else Reshape(self.shape)


def _add_gram(total: torch.Tensor | None, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``total + scale · xᵀ x`` for ``x`` ``(m, d)``, the scale applied inside the matrix product."""
    if total is None:
        return torch.mm(x.T, x * scale)
    return total.addmm_(x.T, x, alpha=scale)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def output_columns(problem: Problem, curvature: str, mc_samples: int, seed: int) -> Cotangents:
    """``(index, f, y) -> (U, weight)``: the output-space columns ``U`` ``(K, *f.shape)`` of ``curvature`` and their weight."""
    likelihood, R = problem.likelihood, problem.reduction_factor

    def square_root(index, output, y):
        root = likelihood.hessian_sqrt(output)
        if output.ndim > 1 and root.shape[-1] == 1:
            root = torch.diag_embed(root[..., 0])
        return root.movedim(-1, 0), R

    def sampled(index, output, y):
        targets = problem.sample_targets(index, output, mc_samples, seed)
        return likelihood.output_grad(output, targets), R / mc_samples

    def empirical(index, output, y):
        return likelihood.output_grad(output, y).unsqueeze(0), R

    return {"ggn": square_root, "fisher": square_root, "fisher_mc": sampled, "empirical_fisher": empirical}[curvature]


def _check(curvature, kfac_approx, joint_bias, mc_samples, seed, unknown) -> int:
    if unknown:
        raise InvalidProblem(
            f"unknown option(s) {', '.join(map(repr, unknown))} for a Kronecker-factored approximation; "
            f"the options are {', '.join(OPTIONS)}"
        )
    if curvature not in CURVATURES:
        raise InvalidProblem(
            f"Kronecker-factored approximations approximate a curvature of the form R Σ J^T M J; "
            f"curvature={curvature!r} is not one: choose one of {', '.join(CURVATURES)}"
        )
    if kfac_approx not in KFAC_APPROX:
        raise InvalidProblem(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
    if not isinstance(joint_bias, bool):
        raise InvalidProblem(f"joint_bias must be True or False, got {joint_bias!r}")
    require_integer("seed", seed, minimum=0)
    return require_integer("mc_samples", mc_samples)


def _plan(problem: Problem, joint_bias: bool) -> tuple[KroneckerLayers, list[_Layer], list[tuple[str, list[str]]]]:
    """The tapped layers, the Kronecker-factored ones and the ``(module, names)`` that get exact blocks."""
    taps = KroneckerLayers(problem)
    layers, exact = [], []
    for label, names in problem.module_blocks():
        if label in taps.modules:
            layers.append(_Layer(label, taps.modules[label], names, joint_bias))
        else:
            exact.append((label, names))
    return taps, layers, exact


def _factors(taps: KroneckerLayers, layers: list[_Layer], columns: Cotangents | None,
             kfac_approx: str) -> tuple[dict, dict]:
    """KFAC's input factors ``A`` (layers with a studied weight) and gradient factors ``B`` (all, unless ``columns`` is None)."""
    by_label = {layer.label: layer for layer in layers}
    expand = kfac_approx == "expand"
    N = taps.problem.num_examples
    A, B = {}, {}
    inputs_of = {layer.label for layer in layers if layer.weight is not None}
    for inputs, gradients in taps.statistics(inputs_of, columns):
        for label, a in inputs.items():
            x = a.reshape(-1, a.shape[-1]) if expand else a.mean(1)
            x = _with_ones(x) if by_label[label].joint else x
            A[label] = _add_gram(A.get(label), x, 1 / (N * (a.shape[1] if expand else 1)))
        for e, weight in gradients:
            for label, g in e.items():
                g = g.reshape(-1, g.shape[-1]) if expand else g.sum(2).reshape(-1, g.shape[-1])
                B[label] = _add_gram(B.get(label), g, weight)
    for factors in (A, B):
        for label in sorted(factors):
            taps.problem.reduce(factors[label])
    return A, B


def _squared_gradients(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Σ_{k,n} (Σ_t e_knt a_ntᵀ)²`` ``(d_out, d_in)`` for ``e`` ``(K, N, T, d_out)`` and ``a`` ``(N, T, d_in)``."""
    if e.shape[2] == 1:
        return e[:, :, 0].square().sum(0).T @ a[:, 0].square()
    K, N, _, d_out = e.shape
    chunk = max(1, GRADIENT_CHUNK // (K * d_out * a.shape[-1]))
    total = e.new_zeros(d_out, a.shape[-1])
    for start in range(0, N, chunk):
        gradients = torch.einsum("knto,nti->knoi", e[:, start:start + chunk], a[start:start + chunk])
        total += gradients.square().sum((0, 1))
    return total


def _eigenvalues(problem: Problem, statistics, layers: list[_Layer], bases: dict) -> dict:
    """EKFAC's eigenvalues: ``(label, "weight" | "bias") -> S``, the curvature's diagonal in the bases ``(Q_B, Q_A)``.

    ``statistics`` are the ``(inputs, gradients)`` pairs of :meth:`KroneckerLayers.statistics`.
    """
    by_label = {layer.label: layer for layer in layers}
    S = {}

    def add(key, share):
        S[key] = share if key not in S else S[key].add_(share)

    for inputs, gradients in statistics:
        rotated = {label: (_with_ones(a) if by_label[label].joint else a) @ bases[label][1]
                   for label, a in inputs.items()}
        for e, weight in gradients:
            for label, g in e.items():
                layer, r = by_label[label], g @ bases[label][0]
                if layer.weight is not None:
                    add((label, "weight"), _squared_gradients(r, rotated[label]).mul_(weight))
                if layer.bias is not None and not layer.joint:
                    add((label, "bias"), r.sum(2).square().sum((0, 1)).mul_(weight))
    for key in sorted(S):
        problem.reduce(S[key])
    return S


def _exact_blocks(problem: Problem, exact, curvature: str, mc_samples: int, seed: int) -> list:
    return [(label, names, DenseBlock(exact_curvature(problem.restrict(names), curvature, mc_samples=mc_samples,
                                                      seed=seed).to_dense(progress=False)))
            for label, names in exact]


def _kronecker_blocks(layers: list[_Layer], weight_block, bias_block) -> list:
    """Each layer's blocks, from ``weight_block(layer)`` (weight, or ``[W b]`` when joint) and ``bias_block(layer)``."""
    blocks = []
    for layer in layers:
        if layer.joint:
            blocks.append((layer.label, [layer.weight, layer.bias], weight_block(layer)))
            continue
        if layer.weight is not None:
            blocks.append((layer.weight, [layer.weight], weight_block(layer)))
        if layer.bias is not None:
            blocks.append((layer.bias, [layer.bias], bias_block(layer)))
    return blocks


def _approximation(problem, kind, curvature, kronecker_blocks, exact, mc_samples, seed) -> Approximation:
    with torch.no_grad():
        blocks = kronecker_blocks + _exact_blocks(problem, exact, curvature, mc_samples, seed)
    order = {name: position for position, name in enumerate(problem.param_names)}
    blocks.sort(key=lambda block: order[block[1][0]])
    return Approximation(problem, kind, curvature, blocks, tuple(name for _, names in exact for name in names))


def kfac_factors(problem: Problem, curvature: str = "ggn", *, kfac_approx: str = "expand", joint_bias: bool = False,
                 mc_samples: int = 1, seed: int = 0) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """KFAC's factors of every Kronecker-factored module, without building the operator: name -> ``(A, B)``.

    Takes the arguments of :func:`kfac`. ``A`` ``(d_in, d_in)`` (``(d_in + 1, d_in + 1)`` with
    ``joint_bias`` when the bias is studied too) is ``None`` when the module's weight is not studied;
    ``B`` is ``(d_out, d_out)``.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.kfac import kfac_factors
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> {name: (tuple(A.shape), tuple(B.shape)) for name, (A, B) in kfac_factors(prob, "fisher_mc").items()}
        {'0': ((3, 3), (4, 4)), '2': ((4, 4), (2, 2))}
    """
    mc_samples = _check(curvature, kfac_approx, joint_bias, mc_samples, seed, {})
    taps, layers, _ = _plan(problem, joint_bias)
    A, B = _factors(taps, layers, output_columns(problem, curvature, mc_samples, seed), kfac_approx)
    return {layer.label: (A.get(layer.label), B[layer.label]) for layer in layers}


def ekfac_eigenvalues(problem: Problem, bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                      curvature: str = "ggn", *, joint_bias: bool = False, mc_samples: int = 1,
                      seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    """EKFAC's eigenvalues in given Kronecker bases: ``(module, "weight" | "bias") -> S``.

    ``bases`` maps each module of :func:`kfac_factors` to ``(Q_B, Q_A)`` (``Q_A`` ``None`` when the
    weight is not studied); ``S = R Σ_n Σ_k (Q_Bᵀ G_nk Q_A)²`` ``(d_out, d_in)`` for the weight (or
    ``[W b]`` with ``joint_bias``) and ``R Σ_n Σ_k (Q_Bᵀ ē_nk)²`` ``(d_out,)`` for a separate bias, as
    in :func:`ekfac`, which is this function in the eigenbases of the problem's own KFAC factors.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.kfac import ekfac_eigenvalues
        >>> prob = curvlab.Problem(torch.nn.Linear(3, 2).double(), (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
        >>> S = ekfac_eigenvalues(prob, {"": (torch.eye(2).double(), torch.eye(3).double())})
        >>> sorted(key for key in S), tuple(S["", "weight"].shape)
        ([('', 'bias'), ('', 'weight')], (2, 3))
    """
    mc_samples = _check(curvature, "expand", joint_bias, mc_samples, seed, {})
    taps, layers, _ = _plan(problem, joint_bias)
    inputs_of = {layer.label for layer in layers if layer.weight is not None}
    return _eigenvalues(problem, taps.statistics(inputs_of, output_columns(problem, curvature, mc_samples, seed)),
                        layers, bases)


def eigenbasis_of_rows(rows: torch.Tensor, thin: bool = False) -> torch.Tensor:
    """The eigenvectors ``Q`` ``(d, d)`` of ``XᵀX`` for rows ``X`` ``(m, d)``.

    With ``m < d`` they are the right singular vectors of ``X`` completed to an orthonormal basis
    (``O(m d²)``, ASDL's choice; the completion spans the null space, where ``XᵀX`` is 0), or with
    ``thin`` only those ``m`` vectors ``(d, m)``, which span the row space; otherwise ``eigh(XᵀX)`` (``O(d³)``).
    """
    if rows.shape[0] < rows.shape[1]:
        return torch.linalg.svd(rows, full_matrices=not thin).Vh.T
    return torch.linalg.eigh(rows.T @ rows)[1]


def ekfac_one_pass(problem: Problem, curvature: str = "ggn", *, mc_samples: int = 1, seed: int = 0,
                   thin: bool = False) -> tuple[dict[str, tuple], dict[tuple[str, str], torch.Tensor]]:
    """EKFAC's bases and eigenvalues of :func:`ekfac` (expand, separate bias) in one pass, keeping every batch's rows.

    Returns ``label -> (Q_B, Q_A)`` and ``(label, "weight" | "bias") -> S`` as :func:`ekfac_eigenvalues`.
    The bases come from the layers' input rows ``a_nt`` and output-gradient rows ``e_nkt``
    (:func:`eigenbasis_of_rows`; a basis is unique up to rotations within eigenspaces, which leave
    ``EKFAC`` unchanged where ``S`` is constant, as on the null space). With ``thin``, a factor with
    fewer rows ``m`` than features ``d`` keeps only the ``m`` vectors of its row space, ``(d, m)``, and
    ``S`` only their entries: every per-example gradient lies in that span, so ``S`` is 0 off it and
    ``Q diag(S) Qᵀ`` is the same matrix. The rows of all batches (of all ranks, gathered) are held at
    once: meant for one mini-batch (an optimizer's curvature step).
    """
    mc_samples = _check(curvature, "expand", False, mc_samples, seed, {})
    taps, layers, _ = _plan(problem, False)
    inputs_of = {layer.label for layer in layers if layer.weight is not None}
    kept = []
    for inputs, gradients in taps.statistics(inputs_of, output_columns(problem, curvature, mc_samples, seed)):
        kept.append((inputs, [(e, weight) for e, weight in gradients]))
    group = problem.process_group
    rows_A = {label: concat_over_ranks(torch.cat([inputs[label].reshape(-1, inputs[label].shape[-1])
                                                  for inputs, _ in kept]), group) for label in sorted(inputs_of)}
    rows_B = {layer.label: concat_over_ranks(torch.cat([g[layer.label].reshape(-1, g[layer.label].shape[-1]) * weight ** 0.5
                                                        for _, gradients in kept for g, weight in gradients]), group)
              for layer in layers}
    bases = {label: (eigenbasis_of_rows(rows_B[label], thin),
                     eigenbasis_of_rows(rows_A[label], thin) if label in rows_A else None) for label in rows_B}
    del rows_A, rows_B
    return bases, _eigenvalues(problem, kept, layers, bases)


def kfac(problem: Problem, curvature: str = "ggn", *, kfac_approx: str = "expand", joint_bias: bool = False,
         mc_samples: int = 1, seed: int = 0, **unknown) -> Approximation:
    """KFAC: ``B ⊗ A`` per Linear / Conv2d layer, exact blocks for the other modules.

    Args:
        problem: the model, data, loss and studied parameters.
        curvature: ``"ggn"`` (type-2, through the output Hessian's square root), ``"fisher"`` (the
            same matrix), ``"fisher_mc"`` or ``"empirical_fisher"``.
        kfac_approx: ``"expand"`` or ``"reduce"``, for layers shared over positions (sequences, convolutions).
        joint_bias: one block for ``[W b]`` (homogeneous coordinate) instead of separate blocks.
        mc_samples: labels drawn per example for ``"fisher_mc"`` (as in :func:`curvlab.curvature`).
        seed: fixes the labels of ``"fisher_mc"``.

    Returns:
        An :class:`~curvlab.approx.Approximation` of :class:`KroneckerBlock` s (and :class:`DenseBlock` s
        for ``exact_parameters``).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.kfac import kfac
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> K = kfac(prob)
        >>> [label for label, _, _ in K.blocks]
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> [tuple(f.shape) for f in K.blocks[0][2].factors]
        [(4, 4), (3, 3)]
    """
    mc_samples = _check(curvature, kfac_approx, joint_bias, mc_samples, seed, unknown)
    taps, layers, exact = _plan(problem, joint_bias)
    columns = output_columns(problem, curvature, mc_samples, seed)
    A, B = _factors(taps, layers, columns, kfac_approx)
    blocks = _kronecker_blocks(layers, lambda layer: KroneckerBlock([B[layer.label], A[layer.label]], layer.layout),
                               lambda layer: KroneckerBlock([B[layer.label]], Reshape(layer.shape[:1])))
    return _approximation(problem, "kfac", curvature, blocks, exact, mc_samples, seed)


def ekfac(problem: Problem, curvature: str = "ggn", *, kfac_approx: str = "expand", joint_bias: bool = False,
          mc_samples: int = 1, seed: int = 0, **unknown) -> Approximation:
    """EKFAC: KFAC's Kronecker eigenbasis with eigenvalues refitted to the curvature's diagonal in it.

    Takes the arguments of :func:`kfac`; ``kfac_approx`` chooses the factors whose eigenbasis is
    used. Two passes over the data (:func:`ekfac_one_pass` takes one, keeping the rows).

    Returns:
        An :class:`~curvlab.approx.Approximation` of :class:`EigenbasisBlock` s (and :class:`DenseBlock` s
        for ``exact_parameters``).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.kfac import ekfac, kfac
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> G = curvlab.curvature(prob, "ggn", block_diagonal=True).to_dense()
        >>> distance = lambda C: float(torch.linalg.norm(C.to_dense() - G))
        >>> distance(ekfac(prob)) <= distance(kfac(prob))
        True
    """
    mc_samples = _check(curvature, kfac_approx, joint_bias, mc_samples, seed, unknown)
    taps, layers, exact = _plan(problem, joint_bias)
    columns = output_columns(problem, curvature, mc_samples, seed)
    A, B = _factors(taps, layers, columns, kfac_approx)
    bases = {label: (torch.linalg.eigh(B[label])[1], torch.linalg.eigh(A[label])[1] if label in A else None)
             for label in B}
    inputs_of = {layer.label for layer in layers if layer.weight is not None}
    S = _eigenvalues(problem, taps.statistics(inputs_of, columns), layers, bases)
    blocks = _kronecker_blocks(
        layers,
        lambda layer: EigenbasisBlock(list(bases[layer.label]), S[layer.label, "weight"], layer.layout),
        lambda layer: EigenbasisBlock([bases[layer.label][0]], S[layer.label, "bias"], Reshape(layer.shape[:1])),
    )
    return _approximation(problem, "ekfac", curvature, blocks, exact, mc_samples, seed)


def foof(problem: Problem, curvature: str = "ggn", *, kfac_approx: str = "expand", joint_bias: bool = False,
         mc_samples: int = 1, seed: int = 0, **unknown) -> Approximation:
    """FOOF: ``I ⊗ A`` per Linear / Conv2d weight (``I`` for a bias), from forward passes only.

    Takes the arguments of :func:`kfac`. ``curvature`` is the matrix FOOF stands in for: it fixes
    the exact blocks of the other modules (and what the approximation is compared with), not the
    Kronecker blocks.

    Returns:
        An :class:`~curvlab.approx.Approximation` of :class:`KroneckerBlock` s and :class:`DiagonalBlock` s
        (and :class:`DenseBlock` s for ``exact_parameters``).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.approx.kfac import foof
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> prob = curvlab.Problem(torch.nn.Linear(3, 2, bias=False).double(), (X, X[:, :2]), loss="mse")
        >>> block = foof(prob).blocks[0][2]
        >>> bool(torch.allclose(block.factors[1], X.T @ X / 5))
        True
    """
    mc_samples = _check(curvature, kfac_approx, joint_bias, mc_samples, seed, unknown)
    taps, layers, exact = _plan(problem, joint_bias)
    A, _ = _factors(taps, layers, None, kfac_approx)

    def ones(layer):
        return torch.ones(layer.shape[0], dtype=problem.dtype, device=problem.device)

    blocks = _kronecker_blocks(layers, lambda layer: KroneckerBlock([torch.diag(ones(layer)), A[layer.label]],
                                                                    layer.layout),
                               lambda layer: DiagonalBlock(ones(layer)))
    return _approximation(problem, "foof", curvature, blocks, exact, mc_samples, seed)
