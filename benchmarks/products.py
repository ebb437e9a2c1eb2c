"""Cost of one curvature-matrix product, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. The
gradient (forward + ``loss.backward()``), ``prob.gradient()`` (the same gradient through ``torch.func``,
returned as one flat vector as every product is) and the products are called in turn, round after
round; each figure is the median over rounds of a product's time over the gradient's time in the
same round, so that slow drifts of a shared machine cancel. Prints a Markdown table and writes it
as JSON next to this file (``products-<device>.json``) with the machine, device and torch version.

Usage: ``python benchmarks/products.py [--repeats 11] [--threads 2] [--device cpu] [--batch 128] [--columns 16]``
"""

import torch

import curvlab
from seed_study import arguments, backward_gradient, interleaved, median_ratio, print_table, seed_mlp, write_timings


def main() -> None:
    args = arguments(__doc__, repeats=11, columns=16)
    device = args.device
    model, X, y, prob = seed_mlp(args)
    gradient = backward_gradient(model, X, y)
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
    write_timings("products", args, gradient_times, rows)
    print_table(["kind", "product (gradients)", "product (flat torch.func gradients)", f"(P, {K}) product (gradients)",
                 f"(P, {K}) / {K} single products", f"the same, row-major (P, {K})"],
                ([kind, f"{single:.2f}", f"{single_flat:.2f}", f"{multi:.1f}", f"{ratio:.2f}", f"{row_major:.2f}"]
                 for kind, single, single_flat, multi, ratio, row_major in map(dict.values, rows)))


if __name__ == "__main__":
    main()
