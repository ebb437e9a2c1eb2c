"""Cost of the Gram (per-example gradient) empirical Fisher, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default; every
layer is ``nn.Linear``, so the Gram comes from Hadamard products of input and output-gradient Grams
without per-example gradients. The unit is one gradient evaluation: ``torch.func.grad`` of
``problem.batch_loss`` on the same batch. The Linear-layer Gram alone (capture of inputs and output
gradients, the ``N × N`` Gram and its ``eigh``), the whole approximation (whole network, SMW-NG; per
layer, SENG; both with the :class:`Approximation` wrapper), one product with the damped inverse and
one with the matrix are called in turn with the gradient, round after round; each figure is the
median over rounds of a time over the gradient's time in the same round. Target: the Linear-layer
Gram ≤ 2 gradients. Prints a Markdown table and writes it as JSON next to this file
(``gram-<device>.json``).

Usage: ``python benchmarks/gram.py [--repeats 11] [--threads 2] [--device cpu] [--batch 128]``
"""

import torch

from curvlab.approx import approximate
from curvlab.approx.gram import GramBlock, _capture
from seed_study import arguments, func_gradient, interleaved, median_ratio, print_table, seed_mlp, write_timings


def main() -> None:
    args = arguments(__doc__, repeats=11)
    _, _, _, prob = seed_mlp(args)
    (_, X, y), = prob.batches()

    whole = approximate(prob, "gram", curvature="empirical_fisher")
    inverse = whole.inverse(1e-3)
    v = torch.randn(prob.num_params, device=args.device)
    t = interleaved({
        "gradient": func_gradient(prob, X, y),
        "gram_block": lambda: GramBlock.from_gradients(list(_capture(prob)[0].values())),
        "gram": lambda: approximate(prob, "gram", curvature="empirical_fisher"),
        "gram_per_layer": lambda: approximate(prob, "gram", curvature="empirical_fisher", per_layer=True),
        "inverse_product": lambda: inverse @ v,
        "product": lambda: whole @ v,
    }, args.repeats, args.device)
    rows = [{"what": what, "in_gradients": median_ratio(t[what], t["gradient"])}
            for what in ("gram_block", "gram", "gram_per_layer", "inverse_product", "product")]
    write_timings("gram", args, t["gradient"], rows, gradient="gradient (torch.func.grad of batch_loss)")
    descriptions = {"gram_block": "Linear-layer Gram: capture, N×N Gram, eigh",
                    "gram": "build, whole network (SMW-NG)", "gram_per_layer": "build, per layer (SENG)",
                    "inverse_product": "(E + δI)⁻¹ v, Woodbury", "product": "E v"}
    print_table(["what", "time (gradients)"],
                ([descriptions[row["what"]], f"{row['in_gradients']:.2f}"] for row in rows))


if __name__ == "__main__":
    main()
