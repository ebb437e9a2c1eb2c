"""Cost of KFAC and FOOF, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. A
gradient evaluation is one ``torch.func.grad`` of ``problem.batch_loss``. The gradient and each
approximation (built from scratch through :func:`curvlab.approx.approximate`: factors and blocks)
are called in turn, round after round; each figure is the median over rounds of the
approximation's time over the gradient's time in the same round (see ``seed_study.interleaved``).
The issue's target: KFAC factors with ``fisher_mc`` (one sample) in at most 1.5 gradients; the
factors alone (:func:`curvlab.approx.kfac.kfac_factors`) are timed too. EKFAC is left out: its
cost here is that of ``eigh`` on four ``(2048, 2048)`` factors, hundreds of gradients.
Prints a Markdown table and writes it as JSON next to this file (``kfac-<device>.json``).

Usage: ``python benchmarks/kfac.py [--repeats 11] [--threads 2] [--device cpu] [--batch 128]``
"""

from curvlab.approx import approximate
from curvlab.approx.kfac import kfac_factors
from seed_study import arguments, func_gradient, interleaved, median_ratio, print_table, seed_mlp, write_timings

VARIANTS = {
    "kfac fisher_mc": ("kfac", "fisher_mc"),
    "kfac empirical_fisher": ("kfac", "empirical_fisher"),
    "kfac ggn": ("kfac", "ggn"),
    "foof": ("foof", "ggn"),
}


def main() -> None:
    args = arguments(__doc__, repeats=11)
    _, X, y, prob = seed_mlp(args)

    fns = {"gradient": func_gradient(prob, X, y),
           "kfac factors fisher_mc": lambda: kfac_factors(prob, "fisher_mc")}
    for label, (kind, curvature) in VARIANTS.items():
        fns[label] = lambda kind=kind, curvature=curvature: approximate(prob, kind, curvature)
    times = interleaved(fns, args.repeats, args.device)
    rows = [{"approximation": label, "in_gradients": median_ratio(times[label], times["gradient"])}
            for label in ["kfac factors fisher_mc", *VARIANTS]]
    write_timings("kfac", args, times["gradient"], rows, gradient="torch.func gradient")
    print_table(["approximation", "time (gradients)"],
                ([row["approximation"], f"{row['in_gradients']:.2f}"] for row in rows))


if __name__ == "__main__":
    main()
