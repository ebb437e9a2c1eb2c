"""The memory budget for dense materialisation.

A dense ``(P, P)`` matrix is refused when ``P² · itemsize`` exceeds the budget: half of the memory
currently free on the device, or the number of bytes in the environment variable
``CURVLAB_DENSE_BUDGET``, or the ``budget`` given by the caller.
"""

import os

import torch

from curvlab.errors import DenseTooLarge, InvalidProblem


def free_memory(device: torch.device) -> int:
    """Bytes currently available for new allocations on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def dense_budget(device: torch.device, budget: int | None = None) -> int:
    """Bytes a dense matrix may take: ``budget``, else ``$CURVLAB_DENSE_BUDGET``, else half the free memory."""
    if budget is not None:
        return int(budget)
    configured = os.environ.get("CURVLAB_DENSE_BUDGET")
    if configured:
        try:
            return int(float(configured))
        except ValueError:
            raise InvalidProblem(
                f"CURVLAB_DENSE_BUDGET={configured!r} is not a number of bytes; unset it or give e.g. 4e9"
            ) from None
    return free_memory(device) // 2


def check_dense(rows: int, cols: int, dtype: torch.dtype, device: torch.device, what: str,
                budget: int | None = None) -> None:
    """Raise :class:`DenseTooLarge` when a ``(rows, cols)`` matrix of ``dtype`` exceeds the budget."""
    need = rows * cols * torch.empty((), dtype=dtype).element_size()
    allowed = dense_budget(device, budget)
    if need > allowed:
        raise DenseTooLarge(
            f"the dense {what} is {rows}×{cols} ({need / 2**30:.3g} GiB), over the memory budget of "
            f"{allowed / 2**30:.3g} GiB on {device}; use the matrix-free product `op @ v`, `op.to_scipy()` "
            f"or block_diagonal=True instead, or raise the budget with CURVLAB_DENSE_BUDGET (bytes)"
        )
