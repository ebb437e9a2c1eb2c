"""What the benchmarks share: command line, the seed study's MLP, timing, JSON record and Markdown table.

Every benchmark times calls on the seed study's MLP 784-2048-2048-10 (ReLU), cross-entropy, float32, on a
random batch, and reports each time in gradient evaluations timed in the same round.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.func import grad

import curvlab
from curvlab.cost import seconds

MODEL = "MLP 784-2048-2048-10 (ReLU), cross-entropy, float32"


def arguments(doc: str, repeats: int, **options: int) -> argparse.Namespace:
    """The parsed command line: ``--repeats``, ``--threads``, ``--device`` (a ``torch.device``), ``--batch``.

    ``doc``'s first line describes the script; each keyword of ``options`` adds an integer option with
    its value as default.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", type=torch.device, default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser.parse_args()


def seed_mlp(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor, curvlab.Problem]:
    """``(model, X, y, problem)`` on ``args.device`` from seed 0, after setting ``args.threads`` CPU threads."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10)).to(args.device)
    X = torch.randn(args.batch, 784, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    return model, X, y, curvlab.Problem(model, (X, y))


def backward_gradient(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """One gradient evaluation as training does it: forward and ``loss.backward()``."""
    def gradient():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X), y).backward()
    return gradient


def func_gradient(prob: curvlab.Problem, X: torch.Tensor, y: torch.Tensor):
    """One gradient evaluation through ``torch.func``: ``grad`` of ``prob.batch_loss`` on ``(X, y)``."""
    gradient = grad(prob.batch_loss)
    return lambda: gradient(prob.params, X, y)


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Times of every function, called in turn in each of ``repeats`` rounds after one warm-up round.

    Ratios are taken within a round, so that slow drifts of a shared machine cancel.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return times


def median_ratio(numerator: list[float], denominator: list[float], scale: float = 1.0) -> float:
    """The median over rounds of ``numerator / (scale * denominator)``."""
    return statistics.median(n / (scale * d) for n, d in zip(numerator, denominator))


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(args: argparse.Namespace) -> dict:
    """The fields every JSON record starts with: model, batch, threads, device, machine, torch version."""
    device = args.device
    return {
        "model": MODEL, "batch": args.batch, "threads": args.threads, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": platform.platform(), "torch": torch.__version__,
    }


def write_record(name: str, args: argparse.Namespace, **fields) -> None:
    """Writes :func:`machine_record` updated with ``fields`` as ``<name>-<device type>.json`` next to this file."""
    record = machine_record(args) | fields
    Path(__file__).with_name(f"{name}-{args.device.type}.json").write_text(json.dumps(record, indent=2))


def write_timings(name: str, args: argparse.Namespace, gradient_times: list[float], rows: list[dict],
                  gradient: str = "gradient") -> None:
    """Writes the record with the median gradient time, repeats and ``rows``; prints that time as ``one <gradient>``."""
    base = statistics.median(gradient_times)
    write_record(name, args, gradient_seconds=base, repeats=args.repeats, rows=rows)
    print(f"one {gradient}: {base * 1e3:.1f} ms on {args.device} ({args.threads} threads)")


def print_table(header: list[str], lines) -> None:
    """Prints a Markdown table: the ``header`` cells, then a row per list of cells in ``lines``."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")
