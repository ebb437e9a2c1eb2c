"""Data parallelism over a ``torch.distributed`` process group: sums, concatenations and errors across ranks.

Each rank holds a shard of the data; a quantity that is a sum over the data is the sum of the ranks'
shares (one all-reduce), and rows indexed by examples are the ranks' rows concatenated in rank order.
Every rank receives the same bits from a collective, so computations that branch on reduced values
(Lanczos restarts, convergence tests) stay in lockstep. ``group=None`` means one process: every
function is then the identity.
"""

import torch
import torch.distributed as dist

from curvlab.errors import CurvlabError, InvalidProblem


def check_group(group) -> None:
    """Refuse anything but a process group of an initialised ``torch.distributed``."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidProblem(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (torchrun sets up the environment) or pass process_group=None"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidProblem(
            f"process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD), "
            f"got {type(group).__name__}"
        )


def rank_and_size(group) -> tuple[int, int]:
    """``(rank, world size)`` within ``group``; ``(0, 1)`` for one process."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sum_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` replaced in place by its sum over the ranks of ``group``, and returned."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _device(group) -> torch.device:
    """Where ``group``'s collectives take tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int, group) -> int:
    """The largest of the ranks' integers ``value``."""
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def gather_counts(count: int, group) -> list[int]:
    """Every rank's integer ``count``, in rank order."""
    if group is None:
        return [count]
    counts = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, count, group=group)
    return counts


def common_to_ranks(names: set[str], group) -> set[str]:
    """The names in every rank's set ``names``."""
    if group is None:
        return names
    sets = [None] * dist.get_world_size(group)
    dist.all_gather_object(sets, sorted(names), group=group)
    return set.intersection(*map(set, sets))


def concat_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """The ranks' tensors concatenated along dimension 0 in rank order; they may differ in their first size only."""
    if group is None:
        return tensor
    sizes = gather_counts(tensor.shape[0], group)
    padded = torch.zeros(max(sizes), *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


def spread(function, items: dict, group) -> dict:
    """``function(items)`` computed a share at a time: each rank takes every size-th key (sorted), all get the union.

    ``function`` maps a dict to a dict with the same keys, entry by entry; its results travel pickled
    (one all-gather), so every rank ends with the results of all keys.
    """
    if group is None:
        return function(items)
    rank, size = rank_and_size(group)
    keys = sorted(items)
    mine = function({key: items[key] for key in keys[rank::size]})
    shares = [None] * size
    dist.all_gather_object(shares, mine, group=group)
    return {key: shares[position % size][key] for position, key in enumerate(keys)}


def raise_together(error: CurvlabError | None, group) -> None:
    """Raise on every rank if ``error`` was raised on any: the rank's own error, else one naming the first failing rank.

    Without it, the ranks that did not fail would wait in their next collective for ever.
    """
    if group is None:
        if error is not None:
            raise error
        return
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else str(error), group=group)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise InvalidProblem(f"rank {rank} of the process group failed: {message}")
