"""One training step of curvlab's optimizers against ASDL's at the same settings, time and peak memory.

ASDL 0.1a5 (PyPI ``asdfghjkl``, import name ``asdl``) is the reference implementation of the seed study.
For every method both implement, a training step on the seed study's MLP 784-2048-2048-10 (ReLU),
cross-entropy, float32, is measured with :func:`curvlab.cost.measure`, each measurement in a fresh Python
process so that neither implementation inherits the other's allocator state: the time is the median of
``--repeats`` steps after one warm-up step; the peak memory (from the model copy onwards, over one warm-up
step and one step) is, on the CPU, taken in a process of its own whose glibc hands every allocation above
64 KiB back to the system when it is freed (``MALLOC_MMAP_THRESHOLD_=65536``), so that the peak resident
set is the peak of live tensors: with glibc's default, which keeps freed memory in its heap and moves its
threshold as it goes, the same step's peak varied by 60 MiB between runs (CUDA counts live tensors
itself). ASDL's gradient maker
(``forward_and_backward``) followed by ``torch.optim.SGD`` with momentum 0.9, and
``curvlab.optim.make(name, compat="asdl")`` (whose heavy-ball momentum 0.9 is the same rule; SENG, SMW-NG and
PSGD with ``one_pass=True``, taking gradient and statistics from one pass as ASDL does). Both update
their curvature and preconditioner every step with damping 1e-3 (Shampoo: ASDL's relative ridge 1e-12;
PSGD: its own defaults; K-FAC with the MC Fisher, EKFAC with the empirical Fisher, the only one ASDL's
EKFAC supports). Each ASDL method is also checked to change the gradient it is given
(``asdl_preconditions``, on its second step): ASDL 0.1a5's ``EkfacGradientMaker`` does not (its ``precondition`` is called
with ``use_inv=True``, which its eigenbasis skips), so its step is SGD plus EKFAC's statistics and is
compared with curvlab's step without the application (``curvlab_seconds_without_application``). Prints a
Markdown table and writes ``asdl-<device>.json`` next to this file.

Usage: ``pip install asdfghjkl==0.1a5; python benchmarks/asdl_compare.py [--repeats 5] [--threads 2] [--device cpu]
[--batch 128]``
"""

import copy
import json
import os
import statistics
import subprocess
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
#: glibc's setting for the memory runs on the CPU (module docstring): freed tensors leave the resident set.
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}


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
        "psgd_kron": (lambda model: asdl.KronPsgdGradientMaker(model, config), {"compat": "asdl", "one_pass": True}),
        "seng": (lambda model: asdl.SengGradientMaker(model, config),
                 {"compat": "asdl", "damping": DAMPING, "one_pass": True}),
        "smw_ng": (lambda model: asdl.SmwEmpNaturalGradientMaker(
            model, asdl.SmwEmpNaturalGradientConfig(data_size=batch, damping=DAMPING)),
                   {"damping": DAMPING, "one_pass": True}),
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


def curvlab_builder(model, name, options, X, y, phases=None):
    def build():
        if phases is not None:
            phases.clear()
        opt = curvlab.optim.make(name, copy.deepcopy(model).train(), lr=1e-3, **options)
        opt.time_phases = phases is not None

        def step():
            loss = opt.step((X, y))
            if phases is not None:
                phases.append(dict(opt.phase_seconds))
            return loss

        return step

    return build


def preconditions(model, maker, X, y) -> bool:
    """Whether ASDL's gradient maker, on its second call (some initialise on the first), changes the gradient."""
    plain, tested = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    F.cross_entropy(plain(X), y).backward()
    gradient_maker = maker(tested)
    for _ in range(2):
        tested.zero_grad(set_to_none=True)
        dummy = gradient_maker.setup_model_call(tested, X)
        gradient_maker.setup_loss_call(F.cross_entropy, dummy, y)
        gradient_maker.forward_and_backward()
    return any(not torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), tested.parameters()))


def measure_one(args, name: str, implementation: str, quantity: str) -> dict:
    """One implementation of one method in this process: its time (with phases or the gradient check) or its peak MiB."""
    model, X, y, _ = seed_mlp(args)
    maker, options = asdl_makers(args.batch)[name]
    phases = []
    build = (asdl_builder(model, maker, X, y) if implementation == "asdl"
             else curvlab_builder(model, name, options, X, y, phases))
    result = measure(build, args.device, args.repeats if quantity == "time" else 1, 1)
    record = {"peak_mib": result.peak_bytes / 2**20 if result.peak_bytes is not None else None}
    if quantity == "memory":
        return record
    record = {"seconds": result.seconds} | (record if args.device.type == "cuda" else {})
    if implementation == "asdl":
        record["preconditions"] = preconditions(model, maker, X, y)
    else:
        record["seconds_without_application"] = statistics.median(
            sum(p[phase] for phase in ("gradient", "statistics", "inversion")) for p in phases[1:])
    return record


def main() -> None:
    if "--one" in sys.argv:
        position = sys.argv.index("--one")
        name, implementation, quantity = sys.argv[position + 1:position + 4]
        del sys.argv[position:position + 4]
        print(json.dumps(measure_one(arguments(__doc__, repeats=5), name, implementation, quantity)))
        return
    args = arguments(__doc__, repeats=5)
    forwarded = [f"--repeats={args.repeats}", f"--threads={args.threads}", f"--device={args.device}",
                 f"--batch={args.batch}"]
    rows = []
    for name, (_, options) in asdl_makers(args.batch).items():
        row = {"method": name, "curvlab_options": dict(options)}
        for implementation in ("asdl", "curvlab"):
            for quantity, environment in [("time", {})] + [("memory", LIVE_MEMORY)] * (args.device.type == "cpu"):
                run = subprocess.run([sys.executable, __file__, "--one", name, implementation, quantity, *forwarded],
                                     capture_output=True, text=True, env=os.environ | environment)
                if run.returncode == 0:
                    row.update({f"{implementation}_{key}": value
                                for key, value in json.loads(run.stdout.splitlines()[-1]).items()})
                else:  # a reference that fails on this model is recorded, not fatal
                    lines = run.stderr.strip().splitlines() or ["exit " + str(run.returncode)]
                    row[f"{implementation}_error"] = lines[-1][:160]
                    break
        rows.append(row)
    print_table(["method", "ASDL s/step", "curvlab s/step", "curvlab / ASDL", "ASDL peak MiB", "curvlab peak MiB",
                 "curvlab / ASDL"], [_cells(row) for row in rows])
    write_record("asdl", args, repeats=args.repeats, rows=rows,
                 memory="peak of live tensors: " + ("torch.cuda.max_memory_allocated" if args.device.type == "cuda"
                                                   else "resident set with " + " ".join(f"{k}={v}" for k, v in LIVE_MEMORY.items())))


def _cells(row: dict) -> list[str]:
    def number(key, fmt):
        value = row.get(key)
        return format(value, fmt) if value is not None else row.get(key.split("_")[0] + "_error", "—")

    def ratio(a, b):
        if row.get(a) is None or row.get(b) is None or not row[b]:
            return "—"
        return f"{row[a] / row[b]:.2f}"

    time_ratio = ratio("curvlab_seconds", "asdl_seconds")
    if row.get("asdl_preconditions") is False:  # ASDL's step is SGD plus statistics: compare without the application
        time_ratio = f"{ratio('curvlab_seconds_without_application', 'asdl_seconds')} (without the application, which ASDL skips)"
    return [row["method"], number("asdl_seconds", ".3f"), number("curvlab_seconds", ".3f"),
            time_ratio, number("asdl_peak_mib", ".0f"),
            number("curvlab_peak_mib", ".0f"), ratio("curvlab_peak_mib", "asdl_peak_mib")]


if __name__ == "__main__":
    main()
