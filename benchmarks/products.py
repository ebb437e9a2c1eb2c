"""Cost of one curvature-matrix product, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. Each
figure is the median wall time of a product divided by the median time of one gradient
(forward + ``loss.backward()``) on the same model and batch. Prints a Markdown table and writes it
as JSON next to this file (``products.json``) with the machine, device and torch version.

Usage: ``python benchmarks/products.py [--repeats 7] [--threads 2] [--device cpu] [--columns 16]``
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import curvlab


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--columns", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10)).to(device)
    X = torch.randn(args.batch, 784, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    prob = curvlab.Problem(model, (X, y))

    def gradient():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X), y).backward()

    base = median_seconds(gradient, args.repeats, device)
    v = torch.randn(prob.num_params, device=device)
    # The (P, K) matrix in column-major layout, the transpose of a contiguous (K, P) tensor: curvlab
    # works on contiguous directions, so a row-major (P, K) matrix costs one transposing copy more,
    # reported in its own column.
    V = torch.randn(args.columns, prob.num_params, device=device).T
    V_row_major = V.contiguous()
    rows = []
    for kind in ("hessian", "ggn", "empirical_fisher", "fisher_mc"):
        op = curvlab.curvature(prob, kind)
        single = median_seconds(lambda: op @ v, args.repeats, device)
        multi = median_seconds(lambda: op @ V, max(3, args.repeats // 2), device)
        row_major = median_seconds(lambda: op @ V_row_major, max(3, args.repeats // 2), device)
        rows.append({"kind": kind, "product_in_gradients": single / base,
                     f"product_P_{args.columns}_in_gradients": multi / base,
                     f"P_{args.columns}_over_{args.columns}_single": multi / (args.columns * single),
                     f"row_major_P_{args.columns}_over_{args.columns}_single": row_major / (args.columns * single)})
    record = {
        "model": "MLP 784-2048-2048-10 (ReLU), cross-entropy, float32",
        "batch": args.batch, "threads": args.threads, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": platform.platform(), "torch": torch.__version__, "gradient_seconds": base,
        "repeats": args.repeats, "rows": rows,
    }
    Path(__file__).with_name(f"products-{device.type}.json").write_text(json.dumps(record, indent=2))
    print(f"one gradient: {base * 1e3:.1f} ms on {device} ({args.threads} threads)")
    K = args.columns
    print(f"| kind | product (gradients) | (P, {K}) product (gradients) | (P, {K}) / {K} single products "
          f"| the same, row-major (P, {K}) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        kind, single, multi, ratio, row_major = row.values()
        print(f"| {kind} | {single:.2f} | {multi:.1f} | {ratio:.2f} | {row_major:.2f} |")


if __name__ == "__main__":
    main()
