"""Data-parallel curvlab equals one process: 2 and 3 gloo processes on CPU, unequal shards, float64.

Each rank runs ``distributed_checks.py``, which computes every product, statistic and estimate on its
shard with ``process_group`` and again in one process on all the data, and records the largest
relative difference of each. Ranks get different ``PYTHONHASHSEED`` s, so code whose collectives
follow the iteration order of a set of names fails here instead of hanging in production.

Tolerance 1e-12: the two computations differ only in the order of the floating-point sums over
batches (rank-local sums, then the all-reduce), a few roundings of 1e-16 relative; every quantity
checked is well conditioned at these sizes (Lanczos pairs to 1e-10 residual). The optimizers that
amplify roundings (``ROUNDING_SENSITIVE`` in the checks) may differ from one process by ten times as
much as one process differs from itself on the batch reversed.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvlab

from distributed_checks import FLOOR

CHECKS = Path(__file__).with_name("distributed_checks.py")
TOLERANCE = 1e-12
TIMEOUT = 300
#: Cases per world size: Linear, Conv2d with pooling and batch norm, attention over sequences, dict inputs,
#: weight tying and BCE (the checks of one case take a few seconds per rank; CI has two cores).
CASES = {2: ["mlp_ce", "cnn", "transformer", "dict_inputs"], 3: ["mlp_ce", "tied", "mlp_bce"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], world: int) -> list[subprocess.CompletedProcess]:
    """Run ``python command…`` as ``world`` gloo ranks on this machine (torchrun's environment variables), all to completion."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONHASHSEED": str(rank + 1), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for process in processes:
            output, errors = process.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output, errors))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("world", [2, 3])
def test_every_quantity_equals_the_single_process_one(world, tmp_path):
    results = launch([str(CHECKS), str(tmp_path), *CASES[world]], world)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
    for rank in range(world):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(found) >= 40 * len(CASES[world])
        bad = {label: value for label, value in found.items()
               if not label.endswith(FLOOR) and not value <= max(TOLERANCE, 10 * found.get(label + FLOOR, 0.0))}
        assert not bad, f"rank {rank}: {bad}"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A curvlab bundle: an MLP 5 → 6 → 3 (P = 57) with 24 examples."""
    path = tmp_path_factory.mktemp("files") / "mlp.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        X, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    curvlab.save(path, model, data=(X, y))
    return path


def numbers_of(results: dict) -> dict[tuple, object]:
    """Every cell of the report's tables, keyed by (table, row, column); timings and run facts left out."""
    cells = {}
    for table, content in results["tables"].items():
        for index, row in enumerate(content["rows"]):
            if table == "summary" and row[0] in ("time taken", "data parallel"):
                continue
            for column, value in zip(content["columns"], row):
                if column != "seconds":
                    cells[table, row[0] if table == "summary" else index, column] = value
    return cells


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_torchrun_compare_reports_once_what_one_process_reports(model_file, tmp_path):
    arguments = ["compare", str(model_file), "--batch-size", "5", "--curvature", "hessian,fisher_mc",
                 "--approximations", "kfac", "--optimizers", "kfac", "--quiet"]
    results = launch(["-m", "curvlab", *arguments, "--out", str(tmp_path / "parallel")], 3)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
    assert results[0].stdout.strip() == str(tmp_path / "parallel" / "index.html")
    assert results[1].stdout == results[2].stdout == ""
    single = subprocess.run([sys.executable, "-m", "curvlab", *arguments, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    parallel_cells, single_cells = (numbers_of(json.loads((tmp_path / name / "results.json").read_text()))
                                    for name in ("parallel", "single"))
    assert parallel_cells.keys() == single_cells.keys()
    summary = json.loads((tmp_path / "parallel" / "results.json").read_text())["tables"]["summary"]["rows"]
    assert ["data parallel", "3 processes (torchrun, gloo), each holding a contiguous run of the batches", ""] in summary
    for key, value in single_cells.items():
        other = parallel_cells[key]
        if isinstance(value, float) and isinstance(other, float):
            assert other == pytest.approx(value, rel=1e-12, abs=1e-15), key
        else:
            assert other == value, key


def test_torchrun_with_fewer_batches_than_processes_exits_2_on_every_rank(model_file, tmp_path):
    results = launch(["-m", "curvlab", "compare", str(model_file), "--batch-size", "24", "--quiet",
                      "--out", str(tmp_path / "report")], 2)
    for result in results:
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            "Error: 1 batches for 2 processes: every process needs at least one; give a smaller --batch-size or "
            "run fewer processes")
    assert not (tmp_path / "report").exists()
