"""``curvlab``: parse the command line, load the model and data safely, run the library, write the report.

Exit status: 0 success; 2 bad input (an unreadable or unknown file, a pickle without --trust-code,
data that do not fit the model or the loss, an unknown option value, a report directory that would
be overwritten); 3 refused for resources (a dense analysis over the memory budget, or out of
memory); 130 interrupted, in which case no report is written; 1 an unexpected internal error (its
traceback with --debug) or a report that the operating system would not let be written. Every
error is one line on stderr.

The commands share their options through the decorators :func:`model_options` (what to study) and
:func:`output_options` (where the report goes), and their run through :func:`run_report`, which
loads the problem with :func:`load_problem`, calls the analysis and writes the report.
"""

import dataclasses
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

LOSSES = ("cross_entropy", "mse", "bce")
DTYPES = ("float32", "float64")
EXIT_BAD_INPUT, EXIT_RESOURCES, EXIT_INTERRUPTED, EXIT_INTERNAL = 2, 3, 130, 1


class Names(click.ParamType):
    """A comma-separated list of distinct names among those of ``source``; ``all`` for every one.

    ``source`` and ``default`` are ``"module:attribute"`` of a tuple of names or of a function returning
    one (e.g. ``"curvlab:KINDS"``); ``default`` applies when the option is not given. Both are looked up
    only when needed: loading torch is slow, and --help/--version do not need it.
    """

    name = "names"

    def __init__(self, source: str, default: str, allow_none: bool = False):
        self.source, self.default, self.allow_none = source, default, allow_none

    def choices(self) -> tuple[str, ...]:
        return _names(self.source)

    def defaults(self) -> tuple[str, ...]:
        return _names(self.default)

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = [part.strip() for part in value.split(",") if part.strip()]
        choices = self.choices()
        if names == ["all"]:
            return choices
        if names == ["none"] and self.allow_none:
            return ()
        valid = ", ".join(choices) + " (or all" + (", none)" if self.allow_none else ")")
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            self.fail(f"unknown name(s) {', '.join(map(repr, unknown)) or repr(value)}; choose among {valid}",
                      param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names one more than once", param, ctx)
        return tuple(names)


class Integers(click.ParamType):
    """A comma-separated list of positive integers, e.g. ``32,64,128``."""

    name = "integers"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            numbers = ()
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers (e.g. 32,64,128)", param, ctx)
        return numbers


def _names(reference: str) -> tuple[str, ...]:
    import importlib

    module, _, attribute = reference.partition(":")
    names = getattr(importlib.import_module(module), attribute)
    return tuple(names() if callable(names) else names)


class NamesOption(click.Option):
    """An option of :class:`Names` whose help lists the default and valid names (looked up only for help)."""

    def get_help_record(self, ctx):
        flags, text = super().get_help_record(ctx)
        return flags, (f"{text} Default: {', '.join(self.type.defaults())}. "
                       f"Choices: {', '.join(self.type.choices())}, all{', none' if self.type.allow_none else ''}.")


class Group(click.Group):
    """A click group whose usage errors are one line, ``Error: ...`` on stderr, exit status 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            status = super().main(*args, **kwargs)
        except click.ClickException as err:
            command = f" {err.ctx.info_name}" if getattr(err, "ctx", None) and err.ctx.parent else ""
            fail(f"{err.format_message()} (see curvlab{command} --help)", EXIT_BAD_INPUT)
        except click.Abort:
            click.echo("Interrupted: no report was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(status if isinstance(status, int) else 0)


@dataclasses.dataclass
class Study:
    """A loaded :class:`curvlab.Problem` and the facts its report states first."""

    problem: object
    context: dict


def model_options(command: Callable) -> Callable:
    """The MODEL argument and the options that say what is studied and how (shared by every command)."""
    decorators = [
        click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
                     help="Inputs and targets: a .pt file holding {'inputs': X, 'targets': y} (X may be a dict of "
                          "tensors) or an .npz with the same keys. Default: the data in a curvlab bundle."),
        click.option("--loss", type=click.Choice(LOSSES),
                     help="Default: the bundle's loss; else cross_entropy for integer targets."),
        click.option("--reduction", type=click.Choice(("mean", "sum")),
                     help="How the loss sums over examples. Default: the bundle's, else mean."),
        click.option("--params", metavar="REGEX",
                     help="Study only the parameters whose names match REGEX (default: all trainable)."),
        click.option("--max-examples", type=click.IntRange(min=1), metavar="N",
                     help="Use the first N examples of the data."),
        click.option("--batch-size", type=click.IntRange(min=1), metavar="N",
                     help="Pass the data through the model N examples at a time (the results do not depend "
                          "on it; the memory does)."),
        click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True),
        click.option("--dtype", type=click.Choice(DTYPES),
                     help="Default: float64 when a dense curvature matrix fits in the memory budget, else "
                          "float32. Eigenvalues of dense matrices are always computed in float64."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds the built-in model's training, the Monte-Carlo labels and every estimator."),
        click.option("--trust-code", is_flag=True,
                     help="Allow a pickled nn.Module (torch.save(model)); unpickling runs code named in the file."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def curvature_option(command: Callable) -> Callable:
    """``--curvature KINDS`` and ``--dense``."""
    command = click.option("--dense", is_flag=True,
                           help="Require the exact dense analysis: refuse (exit 3) when a dense matrix exceeds the "
                                "memory budget instead of estimating it matrix-free.")(command)
    kinds = Names("curvlab:KINDS", "curvlab.compare:DEFAULT_KINDS")
    return click.option("--curvature", "kinds", cls=NamesOption, type=kinds, metavar="KINDS",
                        help="Comma-separated curvature matrices.")(command)


def optimizers_option(command: Callable) -> Callable:
    """``--optimizers NAMES``."""
    names = Names("curvlab.optim:names", "curvlab.compare:DEFAULT_OPTIMIZERS", allow_none=True)
    return click.option("--optimizers", cls=NamesOption, type=names, metavar="NAMES",
                        help="Comma-separated optimizers whose steps are compared with the exact natural-gradient "
                             "and Newton steps.")(command)


def cost_options(prefix: str, batch_sizes: str) -> Callable:
    """The cost study's ``--{prefix}optimizers``, ``--{prefix}batch-sizes``, ``--{prefix}intervals`` and ``--repeats``."""
    decorators = [
        click.option(f"--{prefix}optimizers", cls=NamesOption, metavar="NAMES",
                     type=Names("curvlab.optim:names", "curvlab.cost:DEFAULT_OPTIMIZERS"),
                     help="Comma-separated optimizers whose cost is measured."),
        click.option(f"--{prefix}batch-sizes", type=Integers(), metavar="SIZES",
                     help=f"Comma-separated batch sizes of the cost sweep. Default: {batch_sizes}."),
        click.option(f"--{prefix}intervals", type=Integers(), default="1,10,100", show_default=True, metavar="KS",
                     help="Curvature update intervals of the cost sweep."),
        click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Timed steps per cost configuration (the median is reported)."),
        click.option("--one-pass", is_flag=True,
                     help="Measure the optimizers that can (SMW-NG, SENG, PSGD-Newton) with their curvature-update "
                          "steps from one pass of the model, as ASDL takes them; a model that computes differently "
                          "in training and eval mode is recorded as not applicable."),
    ]

    def decorate(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def output_options(command: Callable) -> Callable:
    """``--out``, ``--force``, ``--quiet`` and ``--debug`` (shared by every command)."""
    decorators = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Report directory: index.html, results.json and one CSV per table. "
                          "Default: reports/<model name>."),
        click.option("--force", is_flag=True,
                     help="Replace a previous report in --out (a directory with other files is never replaced)."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--debug", is_flag=True, help="Show the traceback of an internal error."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Exit status: 0 success, 2 bad input, 3 refused for resources, 130 interrupted, "
                    "1 internal error.")
@click.version_option(package_name="curvlab", prog_name="curvlab")
def cli() -> None:
    """Exact curvature matrices (Hessian, GGN, Fisher, ...) of PyTorch models, their approximations,
    and a self-contained HTML report.

    MODEL is a torch.export archive (torch.export.save), a curvlab bundle (curvlab.save: the exported
    model, example data and the loss), or, with --trust-code, a pickled nn.Module. Without MODEL the
    built-in model (an MLP trained on MNIST-1D, generated locally) is studied.

    \b
    Examples:
      $ curvlab compare --out reports/default --force
      reports/default/index.html
      $ python examples/export_models.py      # models and reports under examples/output/
      $ curvlab compare examples/output/models/mlp.pt --curvature hessian,ggn --approximations kfac,diag
      reports/mlp/index.html
      $ curvlab compare model.pt2 --data data.pt --loss mse --params 'fc2\\.' --batch-size 256
      $ curvlab spectrum model.pt2 --data data.npz --curvature ggn --dtype float32 --quiet
      $ curvlab steps model.pt2 --data data.pt --optimizers sgd,adam,kfac,shampoo
      $ torchrun --nproc-per-node 4 -m curvlab compare model.pt2 --data data.pt --batch-size 256

    Under torchrun each process takes a contiguous run of the batches (--batch-size, default: the examples
    split evenly), the numbers are those of one process with the same --batch-size, and rank 0 writes the
    report.
    """


@cli.command(epilog="Exit status: 0 success, 2 bad input, 3 refused for resources, 130 interrupted, 1 internal "
                    "error.")
@model_options
@curvature_option
@click.option("--approximations", cls=NamesOption, metavar="KINDS",
              type=Names("curvlab:APPROXIMATIONS", "curvlab.compare:DEFAULT_APPROXIMATIONS", allow_none=True),
              help="Comma-separated structured approximations, each measured against the curvature it stands for.")
@optimizers_option
@click.option("--cost", is_flag=True,
              help="Add the cost section: each optimizer's time per training step and peak memory against SGD's over "
                   "a batch-size sweep on the data, split into gradient, statistics, inversion and application.")
@cost_options("cost-", "powers of two from 32 up to the number of examples")
@output_options
def compare(**options) -> None:
    """Spectra of the exact curvature matrices and the errors of their approximations, as a report.

    MODEL: a torch.export archive, a curvlab bundle, or (--trust-code) a pickled nn.Module; without
    it, the built-in model. For each curvature matrix: trace, extreme eigenvalues, negative and zero
    counts, condition numbers, the spectral density and per-layer spectra: exact from the dense
    matrix when it fits in the memory budget, estimated matrix-free otherwise (Lanczos, Hutch++,
    stochastic Lanczos quadrature). For each approximation: its errors against the exact matrix it
    stands for. For each optimizer: its one-shot step P⁻¹g against the exact damped natural-gradient
    and Newton steps (cosines, quadratic-model decrease, loss change, preconditioned sharpness).

    \b
    Examples:
      $ curvlab compare --out reports/seed1 --seed 1
      reports/seed1/index.html
      $ curvlab compare model.pt2 --data data.pt --curvature hessian,ggn --approximations kfac,ekfac
      reports/model/index.html
      $ curvlab compare model.pt2 --data data.pt --optimizers adam,kfac,shampoo
      $ curvlab compare model.pt2 --data data.pt --cost --cost-optimizers kfac,shampoo,seng --cost-batch-sizes 32,128
    """
    kinds, approximations = options.pop("kinds"), options.pop("approximations")
    optimizers = options.pop("optimizers")
    cost = None
    if options.pop("cost"):
        cost = {"optimizers": options.pop("cost_optimizers"), "batch_sizes": options.pop("cost_batch_sizes"),
                "intervals": options.pop("cost_intervals"), "repeats": options.pop("repeats"),
                "one_pass": options.pop("one_pass")}
        cost = {key: value for key, value in cost.items() if value is not None}
    run_report(options, "", lambda study, progress: _compare(study, kinds, approximations, optimizers, {}, options,
                                                             progress, cost))


@cli.command(epilog="Exit status: 0 success, 2 bad input, 3 refused for resources, 130 interrupted, 1 internal "
                    "error.")
@model_options
@curvature_option
@output_options
def spectrum(**options) -> None:
    """The spectra alone: the curvature matrices of compare, without approximations.

    \b
    Example:
      $ curvlab spectrum model.pt2 --data data.pt --curvature hessian,ggn
      reports/model-spectrum/index.html
    """
    kinds = options.pop("kinds")
    run_report(options, "-spectrum", lambda study, progress: _compare(study, kinds, (), (), {}, options, progress))


@cli.command(epilog="Exit status: 0 success, 2 bad input, 3 refused for resources, 130 interrupted, 1 internal "
                    "error.")
@model_options
@optimizers_option
@click.option("--mode", type=click.Choice(("one_shot", "trajectory")), default="one_shot", show_default=True,
              help="one_shot: each optimizer's direction P⁻¹g with its state built on the data; trajectory: each "
                   "trains a copy of the model for --steps steps and its applied steps are measured.")
@click.option("--steps", "trajectory_steps", type=click.IntRange(min=1), default=10, show_default=True, metavar="T",
              help="Training steps of the trajectory mode.")
@click.option("--reference", type=click.Choice(("natural_gradient", "newton_abs", "newton")),
              default="natural_gradient", show_default=True,
              help="The exact step that norm ratios and quadratic-decrease ratios divide by.")
@click.option("--damping", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="λ of the exact reference steps (C + λI)⁻¹g.")
@output_options
def steps(**options) -> None:
    """The optimizer steps alone: each optimizer's step against the exact natural-gradient and Newton steps.

    Also gives the spectra of the Hessian and the GGN, the matrices the reference steps use.

    \b
    Examples:
      $ curvlab steps --optimizers sgd,adam,kfac,shampoo
      reports/default-steps/index.html
      $ curvlab steps model.pt2 --data data.pt --mode trajectory --steps 20 --optimizers adam,kfac
    """
    optimizers = options.pop("optimizers")
    step_options = {"mode": options.pop("mode"), "steps": options.pop("trajectory_steps"),
                    "reference": options.pop("reference"), "damping": options.pop("damping")}
    run_report(options, "-steps", lambda study, progress: _compare(study, ("hessian", "ggn"), (), optimizers,
                                                                   step_options, options, progress))


def _compare(study: Study, kinds, approximations, optimizers, step_options: dict, options: dict, progress: bool,
             cost: dict | None = None):
    from curvlab.compare import compare as run_compare

    if options.get("dense"):
        require_dense(study.problem)
    return run_compare(study.problem, kinds=kinds, seed=options["seed"], approximations=approximations,
                       optimizers=optimizers, step_options=step_options, cost=cost, context=study.context,
                       progress=progress)


def run_report(options: dict, suffix: str, analyse: Callable) -> None:
    """Load the problem, ``analyse(study, progress)`` it into a Comparison and write its report; map errors to exits.

    The report directory (``--out``, default ``reports/<model name><suffix>``) is checked before any
    work, and written complete or not at all.
    """
    out = options["out"] or Path("reports") / f"{model_name(options['model'])}{suffix}"

    def work():
        study = load_problem(options)
        writes = study.problem.rank == 0  # under torchrun every rank analyses its shard; rank 0 reports
        result = analyse(study, writes and not options["quiet"])
        if not writes:
            return None
        result.provenance["options"] = options_record(options)
        return result.to_html(out, force=options["force"], progress=not options["quiet"])

    run_guarded(options, out, work)


def options_record(options: dict) -> dict:
    """The options that were given (set flags and values), as the report's provenance records them."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()
            if value is not None and value is not False}


def run_guarded(options: dict, out: Path, work: Callable) -> None:
    """Check that a report may be written to ``out``, run ``work()`` (which writes it) and print the path it returns.

    Every error leaves as one line on stderr and its exit status (module docstring). ``work()`` returns
    ``None`` on the ranks other than 0 of a data-parallel run, which print nothing.
    """
    import torch

    from curvlab.errors import CurvlabError, DenseTooLarge
    from curvlab.report import check_target

    try:
        check_target(out, options["force"])
        index = work()
    except KeyboardInterrupt:
        click.echo("Interrupted: no report was written.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except DenseTooLarge as err:
        fail(err, EXIT_RESOURCES)
    except CurvlabError as err:
        fail(err, EXIT_BAD_INPUT)
    except (MemoryError, torch.OutOfMemoryError) as err:
        fail(f"out of memory ({err}); try --dtype float32, --params, fewer --max-examples or a smaller "
             f"--batch-size", EXIT_RESOURCES)
    except OSError as err:
        fail(f"the report could not be written: {err}", EXIT_INTERNAL)
    except Exception as err:
        if options["debug"]:
            traceback.print_exc()
        hint = "the traceback is above" if options["debug"] else "run with --debug for the traceback"
        fail(f"internal error: {type(err).__name__}: {err} ({hint})", EXIT_INTERNAL)
    finally:
        _leave_process_group()
    if index is not None:
        click.echo(str(index))


@cli.command(epilog="Exit status: 0 success, 2 bad input, 3 out of memory, 130 interrupted, 1 internal error.")
@click.option("--scale", type=click.Choice(("cpu", "full")), default="cpu", show_default=True,
              help="cpu: every architecture with reduced widths, batches and budgets (minutes on a CPU); full: the "
                   "study's sizes (for a GPU).")
@click.option("--models", "model_names", cls=NamesOption, metavar="NAMES",
              type=Names("curvlab.models:STUDY_MODELS", "curvlab.bench:DEFAULT_MODELS", allow_none=True),
              help="Comma-separated built-in models whose cost is measured.")
@cost_options("", "32,64,128,256 at cpu scale, powers of two from 32 to 8192 (until memory runs out) at full scale")
@click.option("--tasks", cls=NamesOption, metavar="NAMES",
              type=Names("curvlab.tasks:TASKS", "curvlab.bench:DEFAULT_TASKS", allow_none=True),
              help="Comma-separated tasks of the accuracy study.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs of every accuracy run. Default: the scale's.")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the models, the data and the optimizers.")
@output_options
def bench(**options) -> None:
    """The seed study's two experiments on the built-in models: cost against SGD and accuracy against batch size.

    Cost: time per training step and peak memory of each optimizer as ratios to SGD's as the batch grows, with
    the curvature updated every step and less often, on an MLP, a CNN, ResNet18 and ViT-Tiny. Accuracy: the
    best test accuracy of each optimizer after a small learning-rate and damping search, against the batch
    size, on MNIST-1D (and with --tasks on a CIFAR-like synthetic task; both generated locally). One report
    with both.

    \b
    Examples:
      $ curvlab bench --out reports/bench --force
      reports/bench/index.html
      $ curvlab bench --models mlp,cnn --optimizers kfac,shampoo,seng --tasks none
      $ curvlab bench --scale full --device cuda --out reports/bench-gpu
    """
    out = options["out"] or Path("reports") / "bench"

    def work():
        from curvlab.bench import bench as run_bench

        convergence = {"epochs": options["epochs"]} if options["epochs"] is not None else {}
        result = run_bench(options["model_names"], scale=options["scale"], optimizers=options["optimizers"],
                           batch_sizes=options["batch_sizes"], intervals=options["intervals"],
                           repeats=options["repeats"], tasks=options["tasks"], convergence_options=convergence,
                           device=options["device"], seed=options["seed"], progress=not options["quiet"],
                           one_pass=options["one_pass"])
        result.provenance["options"] = options_record(options)
        return result.to_html(out, force=options["force"], progress=not options["quiet"])

    run_guarded(options, out, work)


def model_name(model: Path | None) -> str:
    """The name of the default report directory: ``default`` for the built-in model, else the file's stem."""
    return "default" if model is None else model.stem


def load_problem(options: dict) -> Study:
    """The :class:`curvlab.Problem` that ``options`` (those of :func:`model_options`) describe, with its facts.

    Raises:
        InvalidProblem: unreadable or unsafe files, missing data, data that do not fit the model or loss.
    """
    import torch

    import curvlab
    import curvlab.zoo
    from curvlab.errors import InvalidProblem

    device = torch.device(options["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidProblem("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    group, device = _join_process_group(device)
    dtype = getattr(torch, options["dtype"]) if options["dtype"] else None
    if options["model"] is None:
        if options["data"] is not None:
            raise InvalidProblem("--data needs a MODEL file: the built-in model comes with its own data (MNIST-1D)")
        extra = {} if options["max_examples"] is None else {"analysis_examples": options["max_examples"]}
        builtin = curvlab.zoo.default_problem(options["seed"], dtype=dtype or torch.float64, device=device,
                                              progress=not options["quiet"] and group is None, **extra)
        if group is None and all(options[key] is None for key in ("loss", "reduction", "params", "batch_size")):
            return Study(builtin.problem, dict(builtin.facts))
        batches = [(X, y) for _, X, y in builtin.problem.batches()]
        model, (X, y) = builtin.problem.model, _joined(batches)
        loss, reduction = options["loss"] or "cross_entropy", options["reduction"] or "mean"
        context = dict(builtin.facts)
    else:
        loaded = curvlab.load(options["model"], trust_code=options["trust_code"])
        if options["data"] is not None:
            X, y = curvlab.io.load_data(options["data"])
            source = str(options["data"])
        elif loaded.data is not None:
            (X, y), source = loaded.data, f"stored in {options['model'].name}"
        else:
            raise InvalidProblem(f"{options['model']} ({loaded.format}) holds no data: pass --data FILE, a .pt file "
                                 f"holding {{'inputs': X, 'targets': y}} or an .npz with the same keys")
        loss = options["loss"] or loaded.loss or _loss_for(y)
        reduction = options["reduction"] or loaded.reduction or "mean"
        model = loaded.model
        dtype = dtype or _dtype_for(model, options["params"], device)
        model = model.to(device=device, dtype=dtype)
        count = sum(p.numel() for p in model.parameters())
        context = {"model": f"{options['model'].name} ({loaded.format}), {count:,} parameters",
                   "data": f"{source}: {_describe(X, y)}"}
        if loaded.notes:
            context["loading"] = "; ".join(loaded.notes)
    if options["max_examples"] is not None and options["model"] is not None:
        X, y = _first(X, options["max_examples"]), y[:options["max_examples"]]
    size = options["batch_size"]
    if group is not None and size is None:
        size = -(-len(y) // torch.distributed.get_world_size())
    batches = _split(X, y, size)
    if options["params"] is not None:
        context["parameter selection"] = f"names matching {options['params']!r}"
    if size is not None:
        context["batches"] = f"{len(batches)} of at most {size} examples"
    if group is not None:
        batches = _shard(batches)
        context["data parallel"] = (f"{torch.distributed.get_world_size()} processes (torchrun, "
                                    f"{torch.distributed.get_backend()}), each holding a contiguous run of the batches")
    problem = curvlab.Problem(model, batches, loss=loss, params=options["params"], reduction=reduction,
                              process_group=group)
    return Study(problem, context)


def _join_process_group(device):
    """``(group, device)``: under torchrun (``WORLD_SIZE`` > 1) the default process group, joined here
    (gloo on CPU, NCCL on CUDA, each rank on GPU ``LOCAL_RANK``), else ``(None, device)``."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD, device


def _leave_process_group() -> None:
    """Destroy the process group of a data-parallel run, if one was joined (torch is never imported here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _shard(batches: list) -> list:
    """This rank's contiguous run of ``batches`` (the first ranks take one more when they do not divide evenly)."""
    import torch.distributed as dist

    from curvlab.errors import InvalidProblem

    rank, size = dist.get_rank(), dist.get_world_size()
    if len(batches) < size:
        raise InvalidProblem(f"{len(batches)} batches for {size} processes: every process needs at least one; "
                             f"give a smaller --batch-size or run fewer processes")
    base, extra = divmod(len(batches), size)
    start = rank * base + min(rank, extra)
    return batches[start:start + base + (1 if rank < extra else 0)]


def require_dense(problem) -> None:
    """Refuse with :class:`curvlab.DenseTooLarge` when a dense ``(P, P)`` matrix of ``problem`` exceeds the budget."""
    from curvlab.errors import DenseTooLarge
    from curvlab.memory import check_dense, dense_budget

    P = problem.num_params
    try:
        check_dense(P, P, problem.dtype, problem.device, "curvature matrix")
    except DenseTooLarge:
        need = P * P * problem.dtype.itemsize
        raise DenseTooLarge(
            f"--dense: each dense {P}×{P} curvature matrix needs {need / 2**30:.3g} GiB, over the memory budget of "
            f"{dense_budget(problem.device) / 2**30:.3g} GiB on {problem.device}; run without --dense for the "
            f"matrix-free analysis (Lanczos eigenvalues, Hutch++ traces, SLQ densities), study fewer parameters "
            f"with --params, or raise the budget with CURVLAB_DENSE_BUDGET (bytes)") from None


def _loss_for(targets):
    from curvlab.errors import InvalidProblem

    if not targets.is_floating_point():
        return "cross_entropy"
    raise InvalidProblem("the targets are floating point and the model file names no loss: pass --loss mse "
                         "(regression) or --loss bce (0/1 labels per output)")


def _dtype_for(model, params: str | None, device):
    """float64 when a dense matrix of the studied parameters fits in the memory budget, else float32."""
    import torch

    from curvlab.memory import dense_budget

    try:
        pattern = re.compile(params) if params is not None else None
    except re.error:
        pattern = None  # Problem reports the invalid expression
    P = sum(p.numel() for name, p in model.named_parameters()
            if p.requires_grad and (pattern is None or pattern.search(name)))
    return torch.float64 if P * P * 8 <= dense_budget(device) else torch.float32


def _describe(X, y) -> str:
    inputs = (", ".join(f"{key} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
                        for key, value in X.items()) if isinstance(X, dict)
              else f"{tuple(X.shape)} {str(X.dtype).removeprefix('torch.')}")
    return f"{len(y)} examples; inputs {inputs}; targets {tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}"


def _first(X, count: int):
    return {key: value[:count] for key, value in X.items()} if isinstance(X, dict) else X[:count]


def _joined(batches: list) -> tuple:
    import torch

    inputs = [X for X, _ in batches]
    X = ({key: torch.cat([x[key] for x in inputs]) for key in inputs[0]} if isinstance(inputs[0], dict)
         else torch.cat(inputs))
    return X, torch.cat([y for _, y in batches])


def _split(X, y, size: int | None) -> list:
    if size is None:
        return [(X, y)]
    return [({key: value[start:start + size] for key, value in X.items()} if isinstance(X, dict)
             else X[start:start + size], y[start:start + size]) for start in range(0, len(y), size)]


def fail(err, status: int) -> None:
    """Print ``Error: <message>`` on one line to stderr and exit with ``status``."""
    message = " ".join(str(err).split()) or type(err).__name__
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def main() -> None:
    """The console script ``curvlab``."""
    cli(prog_name="curvlab")
