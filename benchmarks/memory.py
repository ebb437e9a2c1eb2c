"""Peak memory of the memory-heavy paths, in multiples of one gradient's, on a model whose activations dominate.

A small CNN (conv 3→8, conv 8→8, 3×3, on 64×64 images, average pooling, linear 8→10; P = 898) on a
batch of 32, float32, CPU: its activations (4 MB per channel map) outweigh its parameters by far, which
is where sending many directions through the model at once costs memory. Each path runs in a fresh
process (``curvlab.cost.measure``: the process's peak resident set above its state before the path's
objects are built, after one priming call); the figure is that peak over the peak of one gradient
(forward and ``loss.backward()``) measured the same way. Prints a Markdown table and writes
``memory-cpu.json`` next to this file.

Usage: ``python benchmarks/memory.py``
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import curvlab
from curvlab.approx.kfac import kfac_factors
from curvlab.cost import measure
from seed_study import cpu_name

PATHS = {
    "gradient": "forward and loss.backward()",
    "ggn_16": "GGN product with 16 directions",
    "ggn_dense": "dense GGN (898 × 898)",
    "hessian_dense": "dense Hessian (898 × 898)",
    "diag_ggn": "exact GGN diagonal (per-example pullbacks)",
    "kfac": "KFAC factors (MC, 1 sample)",
}


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, curvlab.Problem]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    X, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    return model, X, y, curvlab.Problem(model, (X, y))


def one(path: str) -> int:
    """Peak bytes of ``path`` in this process."""
    torch.set_num_threads(2)
    model, X, y, prob = problem()

    def build():
        if path == "gradient":
            def step():
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(X), y).backward()
            return step
        if path == "ggn_16":
            op, V = curvlab.curvature(prob, "ggn"), torch.randn(16, prob.num_params).T
            return lambda: op @ V
        if path.endswith("_dense"):
            op = curvlab.curvature(prob, path.removesuffix("_dense"))
            return lambda: op.to_dense(progress=False)
        if path == "diag_ggn":
            return lambda: curvlab.approximate(prob, "diag", curvature="ggn")
        return lambda: kfac_factors(prob, "fisher_mc")

    return measure(build, repeats=1, warmup=0).peak_bytes


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
        return
    peaks = {path: int(subprocess.run([sys.executable, __file__, "--one", path], check=True, capture_output=True,
                                      text=True).stdout.split()[-1]) for path in PATHS}
    rows = [{"path": path, "what": what, "peak_MiB": peaks[path] / 2**20, "in_gradients": peaks[path] / peaks["gradient"]}
            for path, what in PATHS.items()]
    record = {"model": "CNN conv(3→8) conv(8→8) 64×64, linear 8→10, P = 898", "batch": 32, "dtype": "float32",
              "device": "cpu", "device_name": cpu_name(), "torch": torch.__version__, "rows": rows}
    Path(__file__).with_name("memory-cpu.json").write_text(json.dumps(record, indent=2))
    print(f"{record['model']}, batch 32, float32, {cpu_name()}")
    print("| path | peak | in gradients |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['what']} | {row['peak_MiB']:.0f} MiB | {row['in_gradients']:.1f} |")


if __name__ == "__main__":
    main()
