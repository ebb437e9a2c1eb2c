"""One training step of curvlab's optimizers against ASDL's at the same settings, time and peak memory.

ASDL 0.1a5 (PyPI ``asdfghjkl``, import name ``asdl``) is the reference implementation of the seed study.
For every method both implement, a training step on the seed study's MLP 784-2048-2048-10 (ReLU),
cross-entropy, float32, is measured with :func:`curvlab.cost.measure` (median of ``--repeats`` steps after
one warm-up step; peak memory from the model copy onwards): ASDL's gradient maker
(``forward_and_backward``) followed by ``torch.optim.SGD`` with momentum 0.9, and
``curvlab.optim.make(name, compat="asdl")`` (whose heavy-ball momentum 0.9 is the same rule). Both update
their curvature and preconditioner every step with damping 1e-3 (Shampoo: ASDL's relative ridge 1e-12;
PSGD: its own defaults; K-FAC with the MC Fisher, EKFAC with the empirical Fisher, the only one ASDL's
EKFAC supports). Prints a Markdown table and writes ``asdl-<device>.json`` next to this file.

Usage: ``pip install asdfghjkl==0.1a5; python benchmarks/asdl_compare.py [--repeats 5] [--threads 2] [--device cpu]
[--batch 128]``
"""

import copy
import sys

import torch
import torch.nn.functional as F

import curvlab
from curvlab.cost import measure
from seed_study import arguments, print_table, seed_mlp, write_record

try:
    import asdl
except ImportError:
    sys.exit("benchmarks/asdl_compare.py needs ASDL: pip install asdfghjkl==0.1a5")

DAMPING = 1e-3


def asdl_makers(batch: int) -> dict:
    """curvlab name -> (ASDL gradient maker of a model, curvlab hyperparameters) at the same settings."""
    config = asdl.PreconditioningConfig(data_size=batch, damping=DAMPING)
    return {
        "kfac": (lambda model: asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_MC),
                 {"compat": "asdl", "curvature": "fisher_mc", "damping": DAMPING}),
        "ekfac": (lambda model: asdl.EkfacGradientMaker(model, config, fisher_type=asdl.FISHER_EMP),
                  {"curvature": "empirical_fisher", "damping": DAMPING}),
        "shampoo": (lambda model: asdl.ShampooGradientMaker(model, asdl.PreconditioningConfig(damping=1e-12)),
                    {"compat": "asdl"}),
        "psgd_kron": (lambda model: asdl.KronPsgdGradientMaker(model, config), {"compat": "asdl"}),
        "seng": (lambda model: asdl.SengGradientMaker(model, config), {"compat": "asdl", "damping": DAMPING}),
        "smw_ng": (lambda model: asdl.SmwEmpNaturalGradientMaker(
            model, asdl.SmwEmpNaturalGradientConfig(data_size=batch, damping=DAMPING)), {"damping": DAMPING}),
        "kbfgs": (lambda model: asdl.KronBfgsGradientMaker(model, config), {"compat": "asdl"}),
    }


def asdl_builder(model, maker, X, y):
    def build():
        copy_ = copy.deepcopy(model).train()
        gradient_maker = maker(copy_)
        sgd = torch.optim.SGD(copy_.parameters(), lr=1e-3, momentum=0.9)

        def step():
            sgd.zero_grad(set_to_none=True)
            dummy = gradient_maker.setup_model_call(copy_, X)
            gradient_maker.setup_loss_call(F.cross_entropy, dummy, y)
            gradient_maker.forward_and_backward()
            sgd.step()

        return step

    return build


def curvlab_builder(model, name, options, X, y):
    def build():
        opt = curvlab.optim.make(name, copy.deepcopy(model).train(), lr=1e-3, **options)
        return lambda: opt.step((X, y))

    return build


def main() -> None:
    args = arguments(__doc__, repeats=5)
    model, X, y, _ = seed_mlp(args)
    rows = []
    for name, (maker, options) in asdl_makers(args.batch).items():
        row = {"method": name, "curvlab_options": dict(options)}
        for implementation, build in (("asdl", asdl_builder(model, maker, X, y)),
                                      ("curvlab", curvlab_builder(model, name, options, X, y))):
            try:
                result = measure(build, args.device, args.repeats, 1)
                row[f"{implementation}_seconds"] = result.seconds
                row[f"{implementation}_peak_mib"] = (result.peak_bytes / 2**20 if result.peak_bytes is not None
                                                     else None)
            except Exception as error:  # a reference that fails on this model is recorded, not fatal
                row[f"{implementation}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        rows.append(row)
    print_table(["method", "ASDL s/step", "curvlab s/step", "curvlab / ASDL", "ASDL peak MiB", "curvlab peak MiB",
                 "curvlab / ASDL"], [_cells(row) for row in rows])
    write_record("asdl", args, repeats=args.repeats, rows=rows)


def _cells(row: dict) -> list[str]:
    def number(key, fmt):
        value = row.get(key)
        return format(value, fmt) if value is not None else row.get(key.split("_")[0] + "_error", "—")

    def ratio(a, b):
        if row.get(a) is None or row.get(b) is None or not row[b]:
            return "—"
        return f"{row[a] / row[b]:.2f}"

    return [row["method"], number("asdl_seconds", ".3f"), number("curvlab_seconds", ".3f"),
            ratio("curvlab_seconds", "asdl_seconds"), number("asdl_peak_mib", ".0f"),
            number("curvlab_peak_mib", ".0f"), ratio("curvlab_peak_mib", "asdl_peak_mib")]


if __name__ == "__main__":
    main()
