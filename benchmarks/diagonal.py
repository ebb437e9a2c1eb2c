"""Cost of the exact GGN diagonal and of Sophia-G's GNB estimate, in gradients, on the seed study's MLP.

Model 784-2048-2048-10 (ReLU), batch 128, cross-entropy, float32, 2 CPU threads by default. One
gradient (``torch.func.grad`` of ``problem.batch_loss`` on the same batch), ``diag`` (curvature
``"ggn"``) and ``diag_gnb`` through ``approximate`` and their ``(P,)`` values alone
(``exact_diagonal``, ``gnb_estimate``; the difference is building the ``Approximation``) are called in
turn, round after round; each figure is the median over rounds of a time over the gradient's time in
the same round, so that slow drifts of a shared machine cancel. Targets: exact GGN diagonal ≤ 1 + C = 11 gradients, ``diag_gnb`` ≤ 2.
Prints a Markdown table and writes it as JSON next to this file (``diagonal-<device>.json``).

Usage: ``python benchmarks/diagonal.py [--repeats 11] [--threads 2] [--device cpu] [--batch 128]``
"""

from curvlab.approx import approximate
from curvlab.approx.diagonal import exact_diagonal
from curvlab.approx.gnb import gnb_estimate
from seed_study import arguments, func_gradient, interleaved, median_ratio, print_table, seed_mlp, write_timings


def main() -> None:
    args = arguments(__doc__, repeats=11)
    _, X, y, prob = seed_mlp(args)
    times = interleaved({"gradient": func_gradient(prob, X, y),
                         "diag_ggn": lambda: approximate(prob, "diag", "ggn"),
                         "diag_ggn_values": lambda: exact_diagonal(prob, "ggn"),
                         "diag_gnb": lambda: approximate(prob, "diag_gnb"),
                         "diag_gnb_values": lambda: gnb_estimate(prob)}, args.repeats, args.device)
    rows = [{"estimator": name, "target_in_gradients": target,
             "time_in_gradients": median_ratio(times[name], times["gradient"]),
             "values_only_in_gradients": median_ratio(times[f"{name}_values"], times["gradient"])}
            for name, target in (("diag_ggn", 11.0), ("diag_gnb", 2.0))]
    write_timings("diagonal", args, times["gradient"], rows)
    print_table(["estimator", "approximate(...) (gradients)", "the (P,) values alone (gradients)", "target (gradients)"],
                ([row["estimator"], f"{row['time_in_gradients']:.2f}", f"{row['values_only_in_gradients']:.2f}",
                  f"≤ {row['target_in_gradients']:g}"] for row in rows))


if __name__ == "__main__":
    main()
