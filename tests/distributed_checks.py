"""One rank of the data-parallel checks: ``python distributed_checks.py OUT CASE...`` under a torchrun environment.

Each rank holds a contiguous shard of a test case's batches (``shard``: unequal sizes) and computes
every quantity twice: data-parallel on its shard (``process_group``), and in one process on all the
batches (no group). It writes, per quantity, ``max |parallel − single| / max(max |single|, tiny)`` to
``OUT/rank{r}.json``; ``test_distributed.py`` requires every entry to be at most 1e-12. Shampoo is
compared through its factors: the square roots of its rank-deficient factors turn last-bit differences
at their zero eigenvalues into differences of about √ε = 1e-8 in either computation.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvlab  # noqa: E402
from curvlab.approx.shampoo import shampoo_factors  # noqa: E402
from models import concat_batches, make_case  # noqa: E402

STEPS = 3
#: The cases whose optimizer steps are checked too (every optimizer, a few steps each).
OPTIMIZER_CASES = ("mlp_ce", "cnn")
#: Methods whose steps amplify roundings of the gradient: SOAP's Adam in the eigenbasis of rank-deficient
#: factors (a basis within a null space is arbitrary, and Adam normalises each coordinate), Shampoo's inverse
#: roots at zero eigenvalues. Their steps are compared with the single-process steps on the batch reversed,
#: which differ from the batch's only by roundings (the entry suffixed :data:`FLOOR`).
ROUNDING_SENSITIVE = ("shampoo", "distributed_shampoo", "soap")
FLOOR = " (single process, batch reversed)"
KINDS = ("hessian", "abs_hessian", "ggn", "fisher_mc", "empirical_fisher", "gradient_second_moment")
APPROXIMATIONS = (
    ("diag", {"curvature": "ggn"}), ("diag", {"curvature": "fisher_mc", "mc_samples": 2, "seed": 3}),
    ("diag", {"curvature": "empirical_fisher"}), ("diag_sqgrad", {}), ("diag_gnb", {"samples": 2, "seed": 1}),
    ("diag_hutchinson", {"samples": 5, "seed": 2}),
    ("kfac", {"curvature": "ggn"}), ("kfac", {"curvature": "fisher_mc", "mc_samples": 2, "seed": 4}),
    ("kfac", {"curvature": "empirical_fisher", "kfac_approx": "reduce", "joint_bias": True}),
    ("ekfac", {"curvature": "ggn"}), ("foof", {}),
    ("gram", {}), ("gram", {"per_layer": True, "sketch": 5, "sketch_method": "gaussian", "seed": 2}),
    ("lowrank", {"k": 3, "tol": 1e-10, "progress": False}), ("psgd_kron", {"seed": 1, "iterations": 20, "progress": False}),
)


def shard(batches: list, rank: int, size: int) -> list:
    """Rank ``rank``'s contiguous share of ``batches``: the first rank takes the remainder."""
    base, extra = divmod(len(batches), size)
    counts = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(counts[:rank])
    return batches[start:start + counts[rank]]


def deviation(parallel, single) -> float:
    """The largest entry of ``|parallel − single|`` relative to the largest of ``|single|``."""
    parallel, single = torch.as_tensor(parallel, dtype=torch.float64), torch.as_tensor(single, dtype=torch.float64)
    if parallel.shape != single.shape:
        return float("inf")
    return float((parallel - single).abs().max() / single.abs().max().clamp_min(1e-300))


def aligned(vectors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``vectors``' columns with the signs of ``reference``'s."""
    return vectors * torch.sign((vectors * reference).sum(0, keepdim=True))


def checks(name: str, group) -> dict[str, float]:
    case = make_case(name)
    rank, size = dist.get_rank(), dist.get_world_size()
    local = shard(case.batches, rank, size)
    parallel = curvlab.Problem(case.model, local, loss=case.loss, process_group=group)
    single = curvlab.Problem(case.model, case.batches, loss=case.loss)
    V = torch.randn(single.num_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    found = {
        "counts": deviation([parallel.num_examples, parallel.num_terms, parallel.num_batches, parallel.reduction_factor],
                            [single.num_examples, single.num_terms, single.num_batches, single.reduction_factor]),
        "loss": deviation(parallel.loss_value(), single.loss_value()),
        "gradient": deviation(parallel.gradient(), single.gradient()),
    }
    for kind in KINDS:
        options = {"mc_samples": 2, "seed": 5} if kind == "fisher_mc" else {}
        for blocks in (False, True):
            A = curvlab.curvature(parallel, kind, block_diagonal=blocks, **options)
            B = curvlab.curvature(single, kind, block_diagonal=blocks, **options)
            found[f"{kind}{' blocks' if blocks else ''} @ V"] = deviation(A @ V, B @ V)
    wrapped = curvlab.Problem(DistributedDataParallel(copy.deepcopy(case.model)), local, loss=case.loss,
                              process_group=group)
    found["ggn @ V, DistributedDataParallel model"] = deviation(curvlab.curvature(wrapped, "ggn") @ V,
                                                                curvlab.curvature(single, "ggn") @ V)
    ggn_parallel, ggn_single = curvlab.curvature(parallel, "ggn"), curvlab.curvature(single, "ggn")
    found["ggn dense"] = deviation(ggn_parallel.to_dense(), ggn_single.to_dense())
    for kind, options in APPROXIMATIONS:
        label = f"{kind} {options}" if options else kind
        found[label] = deviation(curvlab.approximate(parallel, kind, **options).to_dense(),
                                 curvlab.approximate(single, kind, **options).to_dense())
    factors = [shampoo_factors(problem) for problem in (parallel, single)]
    found["shampoo factors"] = max(deviation(torch.cat([f.flatten() for f in factors[0][name]]),
                                             torch.cat([f.flatten() for f in factors[1][name]])) for name in factors[1])
    hessian_parallel, hessian_single = curvlab.curvature(parallel, "hessian"), curvlab.curvature(single, "hessian")
    top_parallel = curvlab.spectrum(hessian_parallel, method="lanczos", k=3, which="LM", tol=1e-10, progress=False)
    top_single = curvlab.spectrum(hessian_single, method="lanczos", k=3, which="LM", tol=1e-10, progress=False)
    found["lanczos eigenvalues"] = deviation(top_parallel.eigenvalues, top_single.eigenvalues)
    found["lanczos eigenvectors"] = deviation(aligned(top_parallel.eigenvectors, top_single.eigenvectors),
                                              top_single.eigenvectors)
    found["lanczos products"] = deviation(top_parallel.products, top_single.products)
    slq_parallel = curvlab.spectrum(ggn_parallel, method="slq", probes=3, steps=10, seed=2, progress=False)
    slq_single = curvlab.spectrum(ggn_single, method="slq", probes=3, steps=10, seed=2, progress=False)
    found["slq nodes"] = deviation(slq_parallel.nodes, slq_single.nodes)
    found["slq weights"] = deviation(slq_parallel.weights, slq_single.weights)
    found["slq density"] = deviation(slq_parallel.density[1], slq_single.density[1])
    for method in ("hutchinson", "hutchpp"):
        estimates = [curvlab.trace(op, method=method, samples=12, seed=7, progress=False)
                     for op in (hessian_parallel, hessian_single)]
        found[f"trace {method}"] = deviation([estimates[0].estimate, estimates[0].std_error],
                                             [estimates[1].estimate, estimates[1].std_error])
    if name in OPTIMIZER_CASES:
        found.update(optimizer_checks(case, rank, size, group))
    return {f"{name}: {label}": value for label, value in found.items()}


def optimizer_checks(case, rank: int, size: int, group) -> dict[str, float]:
    """Every optimizer's parameters after :data:`STEPS` steps, data-parallel on shards of the batch and on the whole batch."""
    local = concat_batches(shard(case.batches, rank, size))
    found = {}
    for name, options in [(name, {}) for name in curvlab.optim.names()] + [
            (name, {"spread_inversions": True}) for name in ("kfac", "foof", "skfac")]:
        label = f"{name} {options}" if options else name
        parallel, losses = train(case.model, name, case.loss, [local] * STEPS, group, options)
        single, single_losses = train(case.model, name, case.loss, [case.data] * STEPS)
        found[f"{label} steps"] = deviation(parallel, single)
        found[f"{label} losses"] = deviation(losses, single_losses)
        if name == "kfac" and not options:
            wrapped, _ = train(case.model, name, case.loss, [local] * STEPS, group, wrap=True)
            found[f"{label} steps, DistributedDataParallel model"] = deviation(wrapped, single)
        if name in ROUNDING_SENSITIVE:
            reordered, _ = train(case.model, name, case.loss, [reverse(case.data)] * STEPS)
            found[f"{label} steps{FLOOR}"] = deviation(reordered, single)
    return found


def train(model, name: str, loss: str, batches: list, group=None, options=None,
          wrap: bool = False) -> tuple[torch.Tensor, list[float]]:
    """A copy of ``model`` (``wrap``: in ``DistributedDataParallel``) after ``name``'s steps on ``batches``: its
    parameters, flat, and the step losses."""
    model = copy.deepcopy(model)
    trained = DistributedDataParallel(model) if wrap else model
    optimizer = curvlab.optim.make(name, trained, loss, lr=0.01, process_group=group, **(options or {}))
    losses = [optimizer.step(batch) for batch in batches]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses


def reverse(batch):
    """The batch's examples in reverse order: the same loss and gradient, other roundings."""
    X, y = batch
    flip = torch.arange(y.shape[0] - 1, -1, -1)
    return ({key: value[flip] for key, value in X.items()} if isinstance(X, dict) else X[flip]), y[flip]


def invalid_shard_check(group) -> dict[str, float]:
    """0 when labels out of range on the last rank make every rank raise, naming that rank elsewhere; else inf."""
    case = make_case("mlp_ce")
    rank, size = dist.get_rank(), dist.get_world_size()
    X, y = concat_batches(shard(case.batches, rank, size))
    if rank == size - 1:
        y = y + 10
    try:
        curvlab.Problem(case.model, (X, y), loss=case.loss, process_group=group)
    except curvlab.InvalidProblem as err:
        expected = "class label" if rank == size - 1 else f"rank {size - 1} of the process group failed"
        return {"invalid shard raises on every rank": 0.0 if expected in str(err) else float("inf")}
    return {"invalid shard raises on every rank": float("inf")}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        found = invalid_shard_check(dist.group.WORLD)
        for name in names:
            found.update(checks(name, dist.group.WORLD))
        with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as file:
            json.dump(found, file, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
