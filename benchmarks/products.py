"""Cost of one curvature-matrix product, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. The
gradient (forward + ``loss.backward()``), ``prob.gradient()`` (the same gradient through ``torch.func``,
returned as one flat vector as every product is) and the products are called in turn, round after
round; each figure is the median over rounds of a product's time over the gradient's time in the
same round, so that slow drifts of a shared machine cancel. Prints a Markdown table and writes it
as JSON next to this file (``products-<device>.json``) with the machine, device and torch version.

Usage: ``python benchmarks/products.py [--repeats 11] [--threads 2] [--device cpu] [--columns 16]``
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


def seconds(fn, device: torch.device) -> float:
    """Wall time of one call of ``fn``, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
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

    v = torch.randn(prob.num_params, device=device)
    # The (P, K) matrix in column-major layout, the transpose of a contiguous (K, P) tensor: curvlab
    # works on contiguous directions, so a row-major (P, K) matrix costs one transposing copy more,
    # reported in its own column.
    K = args.columns
    V = torch.randn(K, prob.num_params, device=device).T
    V_row_major = V.contiguous()
    rows, gradient_times = [], []
    for kind in ("hessian", "ggn", "empirical_fisher", "fisher_mc"):
        op = curvlab.curvature(prob, kind)
        t = interleaved({"gradient": gradient, "flat": prob.gradient, "single": lambda: op @ v,
                         "multi": lambda: op @ V, "row_major": lambda: op @ V_row_major}, args.repeats, device)
        gradient_times += t["gradient"]
        rows.append({"kind": kind, "product_in_gradients": median_ratio(t["single"], t["gradient"]),
                     "product_in_flat_func_gradients": median_ratio(t["single"], t["flat"]),
                     f"product_P_{K}_in_gradients": median_ratio(t["multi"], t["gradient"]),
                     f"P_{K}_over_{K}_single": median_ratio(t["multi"], t["single"], K),
                     f"row_major_P_{K}_over_{K}_single": median_ratio(t["row_major"], t["single"], K)})
    base = statistics.median(gradient_times)
    record = {
        "model": "MLP 784-2048-2048-10 (ReLU), cross-entropy, float32",
        "batch": args.batch, "threads": args.threads, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": platform.platform(), "torch": torch.__version__, "gradient_seconds": base,
        "repeats": args.repeats, "rows": rows,
    }
    Path(__file__).with_name(f"products-{device.type}.json").write_text(json.dumps(record, indent=2))
    print(f"one gradient: {base * 1e3:.1f} ms on {device} ({args.threads} threads)")
    print(f"| kind | product (gradients) | product (flat torch.func gradients) | (P, {K}) product (gradients) "
          f"| (P, {K}) / {K} single products | the same, row-major (P, {K}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        kind, single, single_flat, multi, ratio, row_major = row.values()
        print(f"| {kind} | {single:.2f} | {single_flat:.2f} | {multi:.1f} | {ratio:.2f} | {row_major:.2f} |")


if __name__ == "__main__":
    main()
