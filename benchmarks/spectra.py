"""Cost of eigenvalues and densities of the Hessian, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. Three
tasks are timed against the gradient (forward + ``loss.backward()``), each figure the median over
rounds of the task's time over the median gradient time of the same round:

- PyHessian's power iteration for the top eigenvalue, 20 iterations: its algorithm (Yao et al. 2020,
  ``hessian.eigenvalues``), written out here with plain autograd — one backward with
  ``create_graph=True``, then per iteration a double-backward Hessian-vector product on the kept
  graph and a normalisation;
- curvlab's Lanczos for the top eigenvalue to relative residual 1e-3, and for the top 5;
- curvlab's SLQ density, 5 probes × 80 steps, against 5 × 80 single Hessian products;
- for the GGN (no target): Lanczos for the top 5 and one product, where products within an estimator
  replay a linearised pass (``curvlab.operators.output_space.LINEARISE_FROM``).

Targets (issue 4): top eigenvalue in at most half of PyHessian's time; top 5 within 150 gradients;
SLQ within 5 × 80 products plus 10%. Prints a Markdown table and writes ``spectra-<device>.json``.

Usage: ``python benchmarks/spectra.py [--repeats 3] [--threads 2] [--device cpu] [--batch 128]``
"""

import statistics

import torch
from torch import nn

import curvlab
from seed_study import MODEL, arguments, backward_gradient, print_table, seconds, seed_mlp, write_record


def pyhessian_top_eigenvalue(model: nn.Module, X: torch.Tensor, y: torch.Tensor, iterations: int) -> float:
    """The power iteration of PyHessian for the top Hessian eigenvalue, ``iterations`` products."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(X), y)
    gradients = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    eigenvalue = 0.0
    for _ in range(iterations):
        Hv = torch.autograd.grad(gradients, params, grad_outputs=v, retain_graph=True)
        eigenvalue = float(sum((h * u).sum() for h, u in zip(Hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in Hv))
        v = [h / norm for h in Hv]
    return eigenvalue


def main() -> None:
    args = arguments(__doc__, repeats=3)
    device = args.device
    model, X, y, prob = seed_mlp(args)
    H = curvlab.curvature(prob, "hessian")
    G = curvlab.curvature(prob, "ggn")
    v = torch.randn(prob.num_params, device=device)
    gradient = backward_gradient(model, X, y)

    results = {}
    tasks = {
        "pyhessian_power_20": lambda: pyhessian_top_eigenvalue(model, X, y, 20),
        "lanczos_top1_1e-3": lambda: curvlab.spectrum(H, method="lanczos", k=1, tol=1e-3, progress=False),
        "lanczos_top5_1e-3": lambda: curvlab.spectrum(H, method="lanczos", k=5, tol=1e-3, progress=False),
        "slq_5x80": lambda: curvlab.spectrum(H, method="slq", probes=5, steps=80, progress=False),
        "single_product": lambda: H @ v,
        "ggn_lanczos_top5_1e-3": lambda: curvlab.spectrum(G, method="lanczos", k=5, tol=1e-3, progress=False),
        "ggn_single_product": lambda: G @ v,
    }
    ratios = {name: [] for name in tasks}
    for _ in range(args.repeats):
        base = statistics.median(seconds(gradient, device) for _ in range(5))
        for name, task in tasks.items():
            torch.manual_seed(1)
            elapsed = seconds(lambda: results.__setitem__(name, task()), device)
            ratios[name].append(elapsed / base)
    top1, top5, slq = results["lanczos_top1_1e-3"], results["lanczos_top5_1e-3"], results["slq_5x80"]
    ggn_top5 = results["ggn_lanczos_top5_1e-3"]
    power = statistics.median(ratios["pyhessian_power_20"])
    single = statistics.median(ratios["single_product"])
    rows = [
        {"task": "PyHessian power iteration, 20 iterations", "gradients": power,
         "result": f"λ_max ≈ {results['pyhessian_power_20']:.5g} (no residual)", "target": "—"},
        {"task": "curvlab Lanczos, top eigenvalue to 1e-3", "gradients": statistics.median(ratios["lanczos_top1_1e-3"]),
         "result": f"λ_max = {float(top1.eigenvalues[-1]):.5g}, residual {float(top1.residuals[-1]):.1e}, "
                   f"{top1.products} products", "target": f"≤ {power / 2:.1f} (half of PyHessian)"},
        {"task": "curvlab Lanczos, top 5 to 1e-3", "gradients": statistics.median(ratios["lanczos_top5_1e-3"]),
         "result": f"max residual {float(top5.residuals.max()):.1e}, all converged: {bool(top5.converged.all())}, "
                   f"{top5.products} products", "target": "≤ 150"},
        {"task": "curvlab SLQ, 5 probes × 80 steps", "gradients": statistics.median(ratios["slq_5x80"]),
         "result": f"{slq.products} products; reorthogonalised: {slq.reorthogonalized}",
         "target": f"≤ {1.1 * 400 * single:.0f} (400 single products + 10%)"},
        {"task": "one Hessian product", "gradients": single, "result": "", "target": "—"},
        {"task": "curvlab Lanczos, GGN top 5 to 1e-3", "gradients": statistics.median(ratios["ggn_lanczos_top5_1e-3"]),
         "result": f"max residual {float(ggn_top5.residuals.max()):.1e}, all converged: "
                   f"{bool(ggn_top5.converged.all())}, {ggn_top5.products} products", "target": "—"},
        {"task": "one GGN product", "gradients": statistics.median(ratios["ggn_single_product"]), "result": "",
         "target": "—"},
    ]
    write_record("spectra", args, model=f"{MODEL}, random init and data", repeats=args.repeats, rows=rows)
    print_table(["task", "cost (gradients)", "target", "result"],
                ([row["task"], f"{row['gradients']:.1f}", row["target"], row["result"]] for row in rows))


if __name__ == "__main__":
    main()
