"""Scaling of the data-parallel path: time of products and statistics against the number of processes.

The seed study's MLP 784-2048-2048-10 (ReLU), cross-entropy, float32, on one batch of ``--batch``
examples split over ``W`` processes (torchrun, gloo, one CPU thread each): the GGN product with one and
with 16 vectors, the Hessian product, the MC-Fisher KFAC factors and ten Lanczos steps for the top
eigenvalue of the GGN, each the median of ``--repeats`` calls. For each ``W`` of ``--processes`` the
script runs itself under ``python -m torch.distributed.run``; rank 0 records the times. Figures are in
seconds and as speed-ups over one process with one thread; one process with ``W`` threads is measured
too, since threads are the other way to spend the same cores. Prints a Markdown table and writes
``data_parallel-cpu.json`` next to this file.

Usage: ``python benchmarks/data_parallel.py [--processes 1,2] [--batch 1024] [--repeats 3]``
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import curvlab
from curvlab.approx.kfac import kfac_factors
from curvlab.cost import seconds
from seed_study import MODEL, cpu_name

OPERATIONS = ("ggn @ v", "ggn @ V (16)", "hessian @ v", "kfac factors", "lanczos 10 steps")


def measure(batch: int, repeats: int, group) -> dict[str, float]:
    """Median seconds of each of :data:`OPERATIONS` on this rank's shard (all of the batch without ``group``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    X, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    rank, size = (0, 1) if group is None else (dist.get_rank(), dist.get_world_size())
    shard = torch.arange(batch).tensor_split(size)[rank]
    prob = curvlab.Problem(model, (X[shard], y[shard]), process_group=group)
    ggn, hessian = curvlab.curvature(prob, "ggn"), curvlab.curvature(prob, "hessian")
    v, V = torch.randn(prob.num_params), torch.randn(prob.num_params, 16)
    calls = {"ggn @ v": lambda: ggn @ v, "ggn @ V (16)": lambda: ggn @ V, "hessian @ v": lambda: hessian @ v,
             "kfac factors": lambda: kfac_factors(prob, "fisher_mc"),
             "lanczos 10 steps": lambda: curvlab.spectrum(ggn, method="lanczos", k=1, max_products=10, progress=False)}
    times = {}
    for name, call in calls.items():
        call()
        times[name] = statistics.median(seconds(call, prob.device) for _ in range(repeats))
    return times


def rank_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    times = measure(args.batch, args.repeats, group)
    if group is None or dist.get_rank() == 0:
        Path(args.record).write_text(json.dumps(times))
    if group is not None:
        dist.destroy_process_group()


def run(processes: int, threads: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    record = folder / f"{processes}x{threads}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(29500 + processes), __file__, "--rank", "--record", str(record),
               "--threads", str(threads), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(record.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    counts = [int(count) for count in args.processes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base = run(1, 1, args, Path(folder))
        for count in counts:
            for processes, threads in sorted({(count, 1), (1, count)}):
                times = base if (processes, threads) == (1, 1) else run(processes, threads, args, Path(folder))
                rows += [{"processes": processes, "threads": threads, "operation": name, "seconds": times[name],
                          "speedup": base[name] / times[name]} for name in OPERATIONS]
    unique = {(row["processes"], row["threads"], row["operation"]): row for row in rows}
    rows = sorted(unique.values(), key=lambda row: (OPERATIONS.index(row["operation"]), row["threads"],
                                                      row["processes"]))
    record = {"model": MODEL, "batch": args.batch, "device": "cpu", "device_name": cpu_name(),
              "cores": os.cpu_count(), "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    Path(__file__).with_name("data_parallel-cpu.json").write_text(json.dumps(record, indent=2))
    print(f"{MODEL}, batch {args.batch} split over the processes, {cpu_name()} ({os.cpu_count()} cores)")
    print("| operation | processes × threads | seconds | speed-up over 1 × 1 |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['operation']} | {row['processes']} × {row['threads']} | {row['seconds']:.3f} | "
              f"{row['speedup']:.2f} |")


if __name__ == "__main__":
    main()
