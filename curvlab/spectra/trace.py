"""The trace and the diagonal of a curvature operator, exactly or from random probes.

``C`` is a symmetric ``(P, P)`` operator known only through its products. Every method applies it
to blocks of at most ``batch`` directions, the rows of a ``(b, P)`` tensor, so memory stays at a few
``(batch, P)`` tensors (Hutch++ also keeps its ``(samples/3, P)`` sketch); the ``(P, P)`` matrix is
never formed.

- **exact**: ``tr C = Σ_i e_iᵀ C e_i`` and ``diag C = (e_iᵀ C e_i)_i`` from the ``P`` products with
  the identity's rows.
- **Hutchinson** (Hutchinson 1989; Bekas, Kokiopoulou & Saad 2007 for the diagonal): for Rademacher
  ``z`` (independent entries ±1), ``E[zᵀ C z] = tr C`` with ``Var = 2 (‖C‖_F² − Σ_i C_ii²)``, and
  ``E[z ⊙ C z] = diag C``, entry ``i`` with ``Var = Σ_{j≠i} C_ij²``. The estimate is the mean over
  ``m`` probes and its standard error the sample standard deviation over ``sqrt(m)``.
- **Hutch++** (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1) for the trace, with ``m`` products:
  ``k = ⌊m/3⌋`` Rademacher columns ``S`` ``(P, k)``, ``Q = orth(C S)`` ``(P, k)``, then
  ``tr C = tr(Qᵀ C Q) + tr((I − QQᵀ) C (I − QQᵀ))``: the first term exactly from ``k`` products,
  the second by Hutchinson with the ``m − 2k`` deflated probes ``(I − QQᵀ) g``. Deflation removes
  the top of the spectrum from the variance, so when the eigenvalues decay Hutch++ is far more
  accurate than Hutchinson with the same number of products, and exact when ``rank C ≤ k``.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from curvlab.errors import InvalidProblem, require_integer
from curvlab.operators.base import exact_diagonal, rademacher

TRACE_METHODS = ("auto", "exact", "hutchinson", "hutchpp")
DIAGONAL_METHODS = ("auto", "exact", "hutchinson")
BATCH = 32
PROGRESS_BLOCKS = 4  # a progress bar from this many blocks of products on


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of ``tr C``.

    Attributes:
        estimate: the estimate of ``tr C``.
        std_error: its standard error, ``s / sqrt(samples)`` with ``s`` the sample standard deviation of
            the ``samples`` Hutchinson terms; for Hutch++ only the deflated part is random, so this is
            its whole standard error. 0.0 for ``"exact"``; nan when ``samples`` is 1. It is itself
            estimated: with few samples, or when the deflated remainder of Hutch++ has a rank of one
            or two and its terms are heavily skewed, the estimate can miss by more than 3 of them.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutchpp"`` (what ``"auto"`` chose).
        products: the operator-vector products used.
        samples: the Hutchinson terms behind ``std_error``: all probes for ``"hutchinson"``, the
            ``m − 2⌊m/3⌋`` deflated probes for ``"hutchpp"``, 0 for ``"exact"``.
    """

    estimate: float
    std_error: float
    method: str
    products: int
    samples: int


@dataclass(frozen=True)
class DiagonalEstimate:
    """An estimate of ``diag C``.

    Attributes:
        estimate: ``(P,)`` tensor on the operator's device and dtype.
        std_error: ``(P,)`` standard error of each entry (sample standard deviation over
            ``sqrt(samples)``); zeros for ``"exact"``, nan when ``samples`` is 1.
        method: ``"exact"`` or ``"hutchinson"`` (what ``"auto"`` chose).
        products: the operator-vector products used.
        samples: the Hutchinson probes (0 for ``"exact"``).
    """

    estimate: torch.Tensor
    std_error: torch.Tensor
    method: str
    products: int
    samples: int


def trace(op, method: str = "auto", samples: int = 100, seed: int = 0, batch: int = BATCH,
          progress: bool = True) -> TraceEstimate:
    """``tr C`` of a ``(P, P)`` curvature operator, exactly or estimated from ``samples`` products.

    Args:
        op: a :class:`curvlab.operators.CurvatureOperator`.
        method: ``"exact"`` (``P`` products), ``"hutchinson"``, ``"hutchpp"`` (at least 3 samples) or
            ``"auto"``: exact when ``P ≤ samples``, as it then costs no more than an estimate, else
            Hutch++ (Hutchinson when ``samples < 3``, too few to split). ``"exact"`` has no size
            limit: it holds only ``(batch, P)`` tensors, and its cost, ``P`` products, shows in the
            progress bar.
        samples: the operator-vector products a random method uses.
        seed: seeds a local CPU generator for the Rademacher probes: the same seed gives the same
            numbers, and the caller's random state is untouched.
        batch: the most directions applied in one product.
        progress: show a progress bar on stderr when there are many blocks of products.

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.spectra import trace
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(10, 3).double()                      # P = 33
        >>> prob = curvlab.Problem(model, (torch.randn(4, 10), torch.tensor([0, 1, 2, 0])))
        >>> G = curvlab.curvature(prob, "ggn")
        >>> exact = trace(G, method="exact")
        >>> exact.products, exact.std_error
        (33, 0.0)
        >>> bool(abs(exact.estimate - G.to_dense().trace()) < 1e-12)
        True

        Four examples with three classes give a GGN of rank at most 4·2 = 8, so the 10 sketch
        directions of Hutch++ with 30 products capture it whole:

        >>> est = trace(G, samples=30, seed=0)
        >>> est.method, est.products, est.samples
        ('hutchpp', 30, 10)
        >>> bool(abs(est.estimate - exact.estimate) < 1e-10 * exact.estimate)
        True
    """
    _check_arguments(method, TRACE_METHODS, samples, batch)
    P = op.shape[0]
    if method == "auto":
        method = "exact" if P <= samples else "hutchpp" if samples >= 3 else "hutchinson"
    if method == "hutchpp" and samples < 3:
        raise InvalidProblem(
            f"Hutch++ splits its products in three and needs samples >= 3, got {samples}; "
            f"give more samples or use method='hutchinson'"
        )
    if method == "exact":
        diag = exact_diagonal(op, batch, progress)
        return TraceEstimate(float(diag.sum(dtype=torch.float64)), 0.0, method, P, 0)
    generator = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        with _estimating(op, _blocks(samples, batch), "trace (hutchinson)", progress) as bar:
            terms = _hutchinson_terms(op, samples, batch, lambda rows: _signs(generator, rows, op), bar)
        estimate, std_error = _mean_and_std_error(terms)
        return TraceEstimate(estimate, std_error, method, samples, samples)
    return _hutchpp(op, samples, generator, batch, progress)


def diagonal(op, method: str = "auto", samples: int = 100, seed: int = 0, batch: int = BATCH,
             progress: bool = True) -> DiagonalEstimate:
    """``diag C`` of a ``(P, P)`` curvature operator, exactly or estimated from ``samples`` products.

    Args:
        op: a :class:`curvlab.operators.CurvatureOperator`.
        method: ``"exact"`` (``P`` products), ``"hutchinson"`` (the mean of ``z ⊙ C z``) or
            ``"auto"``: exact when ``P ≤ samples``, else Hutchinson.
        samples, seed, batch, progress: as for :func:`trace`.
    """
    _check_arguments(method, DIAGONAL_METHODS, samples, batch)
    P = op.shape[0]
    if method == "auto":
        method = "exact" if P <= samples else "hutchinson"
    if method == "exact":
        estimate = exact_diagonal(op, batch, progress)
        return DiagonalEstimate(estimate, torch.zeros_like(estimate), method, P, 0)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    mean = torch.zeros(P, dtype=torch.float64, device=op.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations from the mean
    with _estimating(op, _blocks(samples, batch), "diagonal (hutchinson)", progress) as bar:
        for _, rows, products in _products(op, samples, batch, lambda a, b: _signs(generator, b - a, op), bar):
            terms = (rows * products).double()  # (b, P): z ⊙ C z per probe
            # Chan et al.'s update of the running mean and sum of squared deviations by one block.
            block_mean = terms.mean(0)
            block_m2 = (terms - block_mean).square().sum(0)
            delta, total = block_mean - mean, count + terms.shape[0]
            mean = mean + delta * (terms.shape[0] / total)
            m2 = m2 + block_m2 + delta.square() * (count * terms.shape[0] / total)
            count = total
    std_error = (m2 / (samples - 1) / samples).sqrt() if samples > 1 else torch.full_like(mean, float("nan"))
    return DiagonalEstimate(mean.to(op.dtype), std_error.to(op.dtype), method, samples, samples)


def _hutchpp(op, samples: int, generator: torch.Generator, batch: int, progress: bool) -> TraceEstimate:
    """Hutch++ with ``k = ⌊m/3⌋`` sketch columns and ``g = m − 2k`` deflated Hutchinson probes."""
    P = op.shape[0]
    k = samples // 3
    g = samples - 2 * k
    q = min(k, P)  # columns of Q: k unless the sketch has more columns than C has rows
    blocks = _blocks(k, batch) + _blocks(q, batch) + _blocks(g, batch)
    with _estimating(op, blocks, "trace (hutchpp)", progress) as bar:
        sketch = torch.empty(k, P, dtype=op.dtype, device=op.device)  # (C S)ᵀ, (k, P)
        for start, _, products in _products(op, k, batch, lambda a, b: _signs(generator, b - a, op), bar):
            sketch[start:start + products.shape[0]] = products
        Q = torch.linalg.qr(sketch.T).Q.T.contiguous()  # (q, P): orthonormal rows spanning C S
        top = sum(float((rows * products).sum(dtype=torch.float64))
                  for _, rows, products in _products(op, q, batch, lambda a, b: Q[a:b], bar))

        def deflated(rows: int) -> torch.Tensor:
            G = _signs(generator, rows, op)  # (b, P)
            return G - (G @ Q.T) @ Q  # rows of (I − QQᵀ) G

        terms = _hutchinson_terms(op, g, batch, deflated, bar)
    rest, std_error = _mean_and_std_error(terms)
    return TraceEstimate(top + rest, std_error, "hutchpp", k + q + g, g)


def _hutchinson_terms(op, count: int, batch: int, probes: Callable[[int], torch.Tensor], bar) -> torch.Tensor:
    """``zᵀ C z`` for ``count`` probes ``z`` drawn ``probes(b)`` rows at a time: ``(count,)`` float64."""
    return torch.cat([(rows * products).sum(1, dtype=torch.float64)
                      for _, rows, products in _products(op, count, batch, lambda a, b: probes(b - a), bar)])


def _products(op, count: int, batch: int, rows_of: Callable[[int, int], torch.Tensor],
              bar) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, V, V C)`` for ``count`` directions in blocks of at most ``batch``; ``V = rows_of(start, stop)``."""
    for start in range(0, count, batch):
        rows = rows_of(start, min(start + batch, count))
        yield start, rows, op._apply(rows)
        bar.update()


def _signs(generator: torch.Generator, rows: int, op) -> torch.Tensor:
    """``(rows, P)`` Rademacher probes on ``op``'s device and dtype."""
    return rademacher(generator, rows, op.shape[0], op.dtype, op.device)


def _mean_and_std_error(terms: torch.Tensor) -> tuple[float, float]:
    """The mean of ``terms`` ``(m,)`` and its standard error ``s / sqrt(m)`` (nan for ``m = 1``)."""
    if terms.numel() == 1:
        return float(terms[0]), float("nan")
    return float(terms.mean()), float(terms.std() / terms.numel() ** 0.5)


def _blocks(count: int, batch: int) -> int:
    return -(-count // batch)


@contextmanager
def _estimating(op, blocks: int, desc: str, progress: bool) -> Iterator[tqdm]:
    """A progress bar over ``blocks`` blocks of products, while ``op`` reuses its recorded passes."""
    with op.reusing_passes(), tqdm(total=blocks, desc=desc, disable=not progress or blocks < PROGRESS_BLOCKS,
                                   leave=False) as bar:
        yield bar


def _check_arguments(method: str, methods: tuple[str, ...], samples: int, batch: int) -> None:
    if method not in methods:
        raise InvalidProblem(f"unknown method {method!r}; choose one of {', '.join(map(repr, methods))}")
    require_integer("samples", samples)
    require_integer("batch", batch)
