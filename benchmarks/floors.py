"""The open speed targets' floors: each task's matrix products alone, replayed, in gradients.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. One call
of each task runs under a dispatch mode that records every matrix product it makes (``aten.mm``,
``addmm``, ``bmm``, ``baddbmm``, in-place and ``out=`` forms) with its operands' shapes and strides;
replaying those products on random operands laid out the same way, and nothing else, times what no
implementation built on them can undercut. Tasks: the gradient (forward + ``loss.backward()``), one
Hessian product (issue 2's target ≤ 3), one Hessian product replaying the recorded ``∇L`` as Lanczos
does (issue 4: the top eigenvalue needs 17 of these on this spectrum, in half of PyHessian's 52
gradients), and the KFAC factors with ``fisher_mc`` (issue 3's target ≤ 1.5). Each task, its replay
and the gradient are called in turn, round after round, apart from the other tasks (whose
allocations would change what memory the next one finds); each figure is the median over rounds of
a time over the gradient's in the same round. Prints a Markdown table and writes ``floors-<device>.json``.

Usage: ``python benchmarks/floors.py [--repeats 11] [--threads 2] [--device cpu] [--batch 128]``
"""

from contextlib import ExitStack

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import curvlab
from curvlab.approx.kfac import kfac_factors
from seed_study import arguments, backward_gradient, interleaved, median_ratio, print_table, seed_mlp, write_timings

PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
            torch.ops.aten.addmm_, torch.ops.aten.baddbmm_}
TARGETS = {"hessian product": "≤ 3", "kfac factors fisher_mc": "≤ 1.5"}


class MatrixProducts(TorchDispatchMode):
    """Records ``(op, args, kwargs)`` of every matrix product run on a real device, tensors as ``(shape, stride, dtype)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func.overloadpacket in PRODUCTS and all(t.device.type != "meta" for t in tensors):
            def layout(a):
                return (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            self.calls.append((func, [layout(a) for a in args], {k: layout(a) for k, a in kwargs.items()}))
        return func(*args, **kwargs)


def recorded_products(task) -> list:
    """The matrix products of one call of ``task``."""
    with MatrixProducts() as products:
        task()
    return products.calls


def replay(calls: list):
    """A function that runs ``calls`` on fixed random operands of the recorded layouts."""
    def operand(a):
        if not isinstance(a, tuple) or len(a) != 4 or not isinstance(a[2], torch.dtype):
            return a
        shape, stride, dtype, device = a
        storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
        return torch.empty(storage, dtype=dtype, device=device).uniform_(-0.1, 0.1).as_strided(shape, stride)

    ready = [(func, [operand(a) for a in args], {k: operand(a) for k, a in kwargs.items()})
             for func, args, kwargs in calls]

    def run():
        for func, args, kwargs in ready:
            func(*args, **kwargs)
    return run


def main() -> None:
    args = arguments(__doc__, repeats=11)
    model, X, y, prob = seed_mlp(args)
    H = curvlab.curvature(prob, "hessian")
    v = torch.randn(prob.num_params, device=args.device)
    with ExitStack() as reusing:
        reused = curvlab.curvature(prob, "hessian")
        reusing.enter_context(reused.reusing_passes())
        reused @ v
        gradient = backward_gradient(model, X, y)
        tasks = {"gradient": gradient, "hessian product": lambda: H @ v,
                 "hessian product, recorded pass reused": lambda: reused @ v,
                 "kfac factors fisher_mc": lambda: kfac_factors(prob, "fisher_mc")}
        rows, gradient_times = [], []
        for name, task in tasks.items():
            task()
            calls = recorded_products(task)
            times = interleaved({"gradient": gradient, "task": task, "products": replay(calls)}, args.repeats,
                                args.device)
            gradient_times += times["gradient"]
            rows.append({"task": name, "in_gradients": median_ratio(times["task"], times["gradient"]),
                         "products_in_gradients": median_ratio(times["products"], times["gradient"]),
                         "matrix_products": len(calls), "target": TARGETS.get(name, "—")})
    write_timings("floors", args, gradient_times, rows)
    print_table(["task", "time (gradients)", "its matrix products alone (gradients)", "matrix products", "target"],
                ([row["task"], f"{row['in_gradients']:.2f}", f"{row['products_in_gradients']:.2f}",
                  str(row["matrix_products"]), row["target"]] for row in rows))


if __name__ == "__main__":
    main()
