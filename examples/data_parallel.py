"""Curvature and K-FAC training over several processes with torch.distributed, launched by torchrun.

Run from the repository root::

    .venv/bin/torchrun --nproc-per-node 2 examples/data_parallel.py

Every rank builds the same model, takes a contiguous shard of the same synthetic data set (shards of
unequal sizes are fine), and then, as one process holding all the data would:

1. the top Hessian eigenvalues by Lanczos and the GGN trace by Hutch++ (every product on the local
   shard, then one all-reduce; every rank gets the same numbers);
2. a few K-FAC training steps, each rank passing its share of each batch; the layers' inversions are
   spread over the ranks (``spread_inversions=True``).

Only rank 0 prints. Run it with ``--nproc-per-node 1`` (or plain ``python``) to see the same numbers.
"""

import os

import torch
import torch.distributed as dist
from torch import nn

import curvlab


def main() -> None:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    group = dist.group.WORLD if distributed else None
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5)).double()
    X = torch.randn(1000, 20, dtype=torch.float64)
    y = (X @ torch.randn(20, 5, dtype=torch.float64)).argmax(1)  # a teacher's labels: learnable
    mine = torch.arange(len(y)).tensor_split(size)[rank]

    prob = curvlab.Problem(model, (X[mine], y[mine]), process_group=group)
    top = curvlab.spectrum(curvlab.curvature(prob, "hessian"), method="lanczos", k=3, which="LA", tol=1e-8,
                           progress=False)
    trace = curvlab.trace(curvlab.curvature(prob, "ggn"), method="hutchpp", samples=60, seed=0, progress=False)

    opt = curvlab.optim.make("kfac", model, lr=0.1, damping=1e-2, process_group=group, spread_inversions=distributed)
    losses = []
    for step in range(10):
        batch = torch.arange(step * 100, (step + 1) * 100).tensor_split(size)[rank]
        losses.append(opt.step((X[batch], y[batch])))
    if rank == 0:
        print(f"{size} process(es), {prob.num_examples} examples, P = {prob.num_params}")
        print("top Hessian eigenvalues:", [f"{v:.6f}" for v in top.eigenvalues.tolist()],
              "converged:", top.converged.tolist())
        print(f"GGN trace (Hutch++): {trace.estimate:.4f} ± {trace.std_error:.4f}")
        print("K-FAC losses:", [f"{loss:.4f}" for loss in losses])
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
