"""Per-block (per-layer) spectra: the spectrum of each diagonal block ``C_bb`` of an operator.

The blocks are the operator's own when it has them (an approximation's blocks, the modules of a
block-diagonal operator), else one per module that owns studied parameters. ``C_bb`` is applied
through products of the whole operator (:meth:`CurvatureOperator.block`), so any operator works.
"""

from tqdm.auto import tqdm

from curvlab.approx.base import Approximation
from curvlab.operators.base import BlockDiagonal
from curvlab.spectra.spectrum import Spectrum, spectrum


def blocks_of(op) -> list[tuple[str, list[str]]]:
    """``(label, parameter names)`` of ``op``'s diagonal blocks."""
    if isinstance(op, Approximation):
        return [(label, list(names)) for label, names, _ in op.blocks]
    if isinstance(op, BlockDiagonal):
        return [(label, list(block.problem.param_names)) for label, block in op.blocks]
    return op.problem.module_blocks()


def block_spectra(op, method: str = "auto", k: int | None = None, progress: bool = True,
                  **options) -> dict[str, Spectrum]:
    """``{label: spectrum(C_bb, method, k, **options)}`` for every diagonal block of ``op``.

    ``k=None`` asks for every eigenvalue of each block (dense within the memory budget, else the SLQ
    density); otherwise at most ``k`` eigenpairs per block (fewer for a smaller block).

    Examples:
        >>> import torch, curvlab
        >>> from curvlab.spectra.blocks import block_spectra
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> prob = curvlab.Problem(model, (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])))
        >>> spectra = block_spectra(curvlab.curvature(prob, "ggn"), progress=False)
        >>> {label: spec.eigenvalues.numel() for label, spec in spectra.items()}
        {'0': 16, '2': 10}
    """
    result = {}
    blocks = blocks_of(op)
    for label, names in tqdm(blocks, desc="block spectra", disable=not progress or len(blocks) < 2, leave=False):
        block = op.block(names)
        size = block.shape[0]
        result[label] = spectrum(block, method=method, k=None if k is None else min(k, size), progress=False,
                                 **options)
    return result
