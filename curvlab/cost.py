"""What a training step costs: seconds per step and peak memory, as ratios to SGD, as the batch grows.

The seed study's first experiment. For every optimizer and batch size ``B`` two kinds of step are
timed on the same batch: an *update* step (the method's :data:`INTERVAL_HYPERPARAMETERS` set to 1:
curvature statistics gathered and the preconditioner refreshed) and a *plain* step (set to never:
the preconditioner of the first step applied to the new gradient). With updates every ``k`` steps
the cost per step is

    ``t_k = (t_update + (k − 1) t_plain) / k``,

reported as ``t_k / t_SGD``, where SGD is ``torch.optim.SGD`` (momentum 0.9) on the same model and
batch, and split into the phases of :attr:`PreconditionedOptimizer.phase_seconds` (gradient,
statistics, inversion, application; methods that keep their statistics inside the application, such
as SOAP and distributed Shampoo, count them there). Every time is the median over ``repeats`` steps
after ``warmup`` steps. Peak memory counts everything a training step keeps alive or creates (the
model, its gradients, the optimizer's state, the step's temporaries; not the input batch): on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the process's own accounting, its peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set just before the model and
the optimizer are built.
"""

import copy
import ctypes
import ctypes.util
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from curvlab import optim
from curvlab.errors import CurvlabError, DenseTooLarge, InvalidProblem, require_integer
from curvlab.optim.optimizer import PHASES
from curvlab.problem import likelihood_of, prepare_input, select_parameters

#: The optimizers :func:`cost_study` measures by default: all of curvlab.optim but the exact Newton and
#: natural-gradient steps, whose dense ``(P, P)`` matrices fit only for small models.
DEFAULT_OPTIMIZERS = tuple(name for name in optim.names() if name not in ("newton", "natural_gradient"))
#: Curvature update intervals of the study: every step, every 10 and every 100 steps.
DEFAULT_INTERVALS = (1, 10, 100)
#: The baseline every ratio divides by: ``torch.optim.SGD`` with momentum 0.9.
SGD_BASELINE = "sgd (torch)"
#: Statuses of a configuration that was not measured.
OUT_OF_MEMORY = "out of memory"
_NEVER = 2**62
_STATUS_FILE = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class Measurement:
    """Timings of one configuration.

    Attributes:
        seconds: the median of ``times``.
        times: seconds of each timed step.
        peak_bytes: the peak memory of building and running the step (module docstring), ``None``
            where the platform cannot tell.
    """

    seconds: float
    times: tuple[float, ...]
    peak_bytes: int | None


class _PeakMemory:
    """Peak bytes above a baseline taken at :meth:`start` (module docstring: CUDA or the process's ``VmHWM``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open(_STATUS_FILE) as status:
            return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024

    @staticmethod
    def available(device: torch.device) -> bool:
        """Whether peak memory can be measured on ``device`` in this process."""
        return device.type == "cuda" or (os.access(_CLEAR_REFS, os.W_OK) and os.path.exists(_STATUS_FILE))

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        libc = ctypes.util.find_library("c")
        if libc:
            trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
            if trim is not None:
                trim(0)  # hand freed heap pages back, so that the resident set starts from live memory
        with open(_CLEAR_REFS, "w") as clear:
            clear.write("5")  # reset VmHWM to the current resident set
        self.baseline = self._status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.baseline)
        return max(0, self._status_bytes("VmHWM") - self.baseline)


def seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``step``, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(build: Callable[[], Callable[[], object]], device: str | torch.device = "cpu", repeats: int = 5,
            warmup: int = 1) -> Measurement:
    """Time ``step = build()``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    Memory is counted from just before ``build()``, so the peak includes what ``build`` creates (a
    model copy, the optimizer's state) and every step's temporaries. Before that, one step of a
    throwaway ``build()`` primes the process: what it loads once (libraries, lazily imported modules,
    thread pools; ``torch.func``'s first call imports ~80 MB of ``torch._dynamo``) is not counted.

    Examples:
        >>> import torch
        >>> def build():
        ...     x = torch.ones(1000)
        ...     return lambda: x.sum()
        >>> m = measure(build, repeats=3)
        >>> len(m.times), m.seconds == sorted(m.times)[1]
        (3, True)
    """
    device = torch.device(device)
    repeats = require_integer("repeats", repeats)
    warmup = require_integer("warmup", warmup, minimum=0)
    meter = _PeakMemory(device) if _PeakMemory.available(device) else None
    build()()
    if meter is not None:
        meter.start()
    step = build()
    for _ in range(warmup):
        step()
    times = [seconds(step, device) for _ in range(repeats)]
    peak = meter.peak() if meter is not None else None
    return Measurement(statistics.median(times), tuple(times), peak)


def machine_facts(device: str | torch.device = "cpu") -> dict[str, str | int]:
    """The machine a measurement ran on: processor, cores, threads, device, torch and Python versions."""
    device = torch.device(device)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        processor = found.group(1).strip() if found else processor
    except OSError:
        pass
    facts = {"processor": processor, "cores": os.cpu_count() or 0, "threads": torch.get_num_threads(),
             "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "system": f"{platform.system()} {platform.release()}"}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


@dataclass(frozen=True)
class CostStudy:
    """The result of :func:`cost_study`.

    Attributes:
        table: one row per model, optimizer, batch size and interval (columns: :data:`COLUMNS`).
        facts: the machine, the settings and the model(s) measured.
    """

    table: pd.DataFrame
    facts: dict


#: Columns of :attr:`CostStudy.table`, with their meaning and unit.
COLUMNS = {
    "model": {"meaning": "the model measured"},
    "optimizer": {"meaning": f"the optimizer (curvlab.optim.names()); '{SGD_BASELINE}' is the baseline"},
    "batch_size": {"meaning": "examples per training step"},
    "interval": {"meaning": "curvature and preconditioner updated every this many steps"},
    "seconds_per_step": {"meaning": "(t_update + (interval − 1) t_plain) / interval, medians", "unit": "s"},
    "time_ratio": {"meaning": "seconds_per_step / SGD's at the same batch size"},
    "peak_mib": {"meaning": "peak memory of model, gradients, optimizer state and step temporaries", "unit": "MiB"},
    "memory_ratio": {"meaning": "peak_mib / SGD's at the same batch size"},
    "gradient_seconds": {"meaning": "forward and backward of the batch loss, per step", "unit": "s"},
    "statistics_seconds": {"meaning": "curvature statistics of the batch, per step (amortised)", "unit": "s"},
    "inversion_seconds": {"meaning": "inverses, roots or eigenbases of the statistics, per step (amortised)",
                          "unit": "s"},
    "application_seconds": {"meaning": "applying the preconditioner, momentum and the parameter update", "unit": "s"},
    "status": {"meaning": "'ok', or why the configuration was not measured"},
}


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("DefaultCPUAllocator" in str(error) or "not enough memory" in str(error))
    )


def _batch(data, size: int, device: torch.device, dtype: torch.dtype):
    X, y = data
    X = prepare_input(X, dtype, device)
    if isinstance(X, Mapping):
        return {key: value[:size] for key, value in X.items()}, y[:size].to(device)
    return X[:size], y[:size].to(device)


def _trainable_copy(model: nn.Module, names: list[str]) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A copy of ``model`` in train mode in which only the parameters ``names`` require gradients, and those parameters."""
    copy_ = copy.deepcopy(model).train()
    named = dict(copy_.named_parameters())
    for name, parameter in named.items():
        parameter.requires_grad_(name in names)
    return copy_, {name: named[name] for name in names}


def _sgd_builder(model: nn.Module, loss, batch, lr: float, names: list[str]):
    """``torch.optim.SGD`` (momentum 0.9) training the parameters ``names`` of a fresh copy of ``model``: the baseline."""
    likelihood = likelihood_of(loss, "mean")

    def build():
        copy_, named = _trainable_copy(model, names)
        first = named[names[0]]
        X, y = batch
        target = likelihood.prepare_target(y, first.dtype)
        forward = (lambda: copy_(**X)) if isinstance(X, Mapping) else (lambda: copy_(X))
        with torch.no_grad():
            terms = likelihood.validate(forward(), target)
        sgd = torch.optim.SGD(list(named.values()), lr=lr, momentum=0.9)

        def step():
            sgd.zero_grad(set_to_none=True)
            (likelihood.loss(forward(), target) / terms).backward()
            sgd.step()

        return step

    return build


#: The hyperparameters that set how often a method updates its curvature and its preconditioner.
INTERVAL_HYPERPARAMETERS = ("curvature_update_interval", "preconditioner_update_interval", "precondition_frequency")


def interval_hyperparameters(name: str, interval: int) -> dict[str, int]:
    """The hyperparameters of optimizer ``name`` that make it update its curvature and preconditioner every ``interval`` steps."""
    return {key: interval for key in INTERVAL_HYPERPARAMETERS if key in optim.hyperparameters(name)}


def _optimizer_builder(name: str, model: nn.Module, loss, batch, lr: float, names: list[str], hyperparameters: dict,
                       seed: int, interval: int, phases: list[dict[str, float]]):
    """A fresh ``curvlab.optim`` optimizer on a copy of ``model`` updating every ``interval`` steps, timing each step's phases.

    Each build starts ``phases`` afresh, so that it holds the phases of the last build's steps.
    """

    def build():
        phases.clear()
        copy_, _ = _trainable_copy(model, names)
        opt = optim.make(name, copy_, loss=loss, lr=lr, params=names, seed=seed,
                         **{**hyperparameters, **interval_hyperparameters(name, interval)})
        opt.time_phases = True

        def step():
            opt.step(batch)
            phases.append(dict(opt.phase_seconds))

        return step

    return build


def default_batch_sizes(examples: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``examples`` (and ``examples`` itself when fewer)."""
    sizes = []
    size = smallest
    while size <= examples:
        sizes.append(size)
        size *= 2
    return tuple(sizes) or (examples,)


def cost_study(model: nn.Module, data, loss="cross_entropy", optimizers: Iterable[str] | None = None,
               batch_sizes: Iterable[int] | None = None, intervals: Iterable[int] = DEFAULT_INTERVALS,
               repeats: int = 5, warmup: int = 1, hyperparameters: Mapping[str, Mapping] | None = None,
               lr: float = 1e-3, params=None, device: str | torch.device | None = None, seed: int = 0,
               label: str = "model", progress: bool = False, one_pass: bool = False) -> CostStudy:
    """Seconds per step and peak memory of each optimizer against SGD, over batch sizes and update intervals.

    Args:
        model: the network; every configuration trains its own copy (in train mode) from these weights.
        data: ``(X, y)`` with at least ``max(batch_sizes)`` examples; a batch of size ``B`` is the first ``B``.
        loss: as for :class:`curvlab.Problem`.
        optimizers: names of :func:`curvlab.optim.names` (default :data:`DEFAULT_OPTIMIZERS`; the exact
            methods, where asked for, are reported as too large where their dense matrix exceeds the budget).
        batch_sizes: default: powers of two from 32 up to the number of examples. A configuration that
            runs out of memory is recorded as such, and that optimizer's larger batches are skipped.
        intervals: curvature (and preconditioner) update intervals ``k``.
        repeats, warmup: timed and untimed steps of each kind (``warmup ≥ 1``: the first step builds the
            preconditioner that plain steps reuse).
        hyperparameters: per optimizer name, extra hyperparameters for :func:`curvlab.optim.make`, its
            ``one_pass`` included (SMW-NG's, SENG's and PSGD-Newton's step from one pass of the model).
        lr: learning rate of every optimizer (small: the weights barely move during the measurement).
        params: the parameters trained, as for :class:`curvlab.Problem` (default: all trainable ones); the
            others stay fixed for SGD too.
        device: where to measure (default: the model's device).
        seed: seeds every optimizer's random draws.
        label: the model's name in the table.
        progress: show a progress bar over the configurations.
        one_pass: measure every optimizer that can take its curvature-update steps from one pass of the
            model (``one_pass=True`` of :func:`curvlab.optim.make`) so, unless its ``hyperparameters`` set
            ``one_pass`` themselves.

    Returns:
        A :class:`CostStudy`; ``time_ratio = t_k / t_SGD`` and ``memory_ratio = peak / peak_SGD`` at the
        same batch size, with SGD's own rows under :data:`SGD_BASELINE`.
    """
    if not isinstance(model, nn.Module):
        raise InvalidProblem(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise InvalidProblem("data must be one batch (X, y) holding at least the largest batch size of examples")
    first = next(model.parameters(), None)
    if first is None:
        raise InvalidProblem("the model has no parameters to train")
    device = torch.device(device) if device is not None else first.device
    model = copy.deepcopy(model).to(device)
    trained = select_parameters(model, params)
    X, y = data
    examples = len(next(iter(X.values()))) if isinstance(X, Mapping) else len(X)
    sizes = tuple(batch_sizes) if batch_sizes is not None else default_batch_sizes(examples)
    if not sizes:
        raise InvalidProblem("batch_sizes is empty; give at least one batch size")
    for size in sizes:
        require_integer("batch size", size, maximum=examples,
                        hint=f" (the data hold {examples} examples)")
    intervals = tuple(require_integer("interval", k) for k in intervals)
    if not intervals:
        raise InvalidProblem("intervals is empty; give at least one curvature update interval, e.g. (1, 10, 100)")
    require_integer("warmup", warmup)
    names = list(optimizers) if optimizers is not None else list(DEFAULT_OPTIMIZERS)
    hyperparameters = {name: dict(values) for name, values in (hyperparameters or {}).items()}
    unknown = sorted(set(hyperparameters) - set(names))
    if unknown:
        raise InvalidProblem(f"hyperparameters given for {', '.join(unknown)}, which are not among the optimizers measured")
    for name in names:  # unknown names, hyperparameters and options fail here, before any timing
        settings = hyperparameters.get(name, {})
        built = optim.make(name, model, loss, lr, params=trained, **settings)
        if one_pass and "one_pass" not in settings and built.method.preconditioner.step_from_statistics:
            hyperparameters[name] = settings | {"one_pass": True}

    rows = []
    failed: dict[str, str] = {}
    bar = tqdm(total=len(sizes) * (len(names) + 1), desc=f"cost of {label}", disable=not progress, leave=False)
    for size in sizes:
        batch = _batch((X, y), size, device, first.dtype)
        baseline = measure(_sgd_builder(model, loss, batch, lr, trained), device, repeats, warmup)
        bar.update()
        for interval in intervals:
            rows.append(_row(label, SGD_BASELINE, size, interval, baseline.seconds, {"gradient": baseline.seconds},
                             baseline.peak_bytes, baseline))
        for name in names:
            bar.update()
            if name in failed:
                rows += [_empty_row(label, name, size, interval, failed[name]) for interval in intervals]
                continue
            update_phases, plain_phases = [], []
            settings = hyperparameters.get(name, {})
            try:
                update = measure(_optimizer_builder(name, model, loss, batch, lr, trained, settings, seed, 1,
                                                    update_phases), device, repeats, warmup)
                plain, plain_phases = update, update_phases
                if interval_hyperparameters(name, 1):
                    plain_phases = []
                    plain = measure(_optimizer_builder(name, model, loss, batch, lr, trained, settings, seed, _NEVER,
                                                       plain_phases), device, repeats, warmup)
            except DenseTooLarge as error:
                failed[name] = f"too large: {error}"
            except CurvlabError as error:  # parameters made non-finite by the steps themselves: the method diverged
                failed[name] = f"{'diverged' if 'non-finite' in str(error) else 'not applicable'}: {error}"
            except (RuntimeError, MemoryError) as error:
                if not isinstance(error, MemoryError) and not _is_out_of_memory(error):
                    raise
                failed[name] = OUT_OF_MEMORY
            if name in failed:
                rows += [_empty_row(label, name, size, interval, failed[name]) for interval in intervals]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            update_split = _median_phases(update_phases[warmup:])
            plain_split = _median_phases(plain_phases[warmup:])
            peak = max(update.peak_bytes, plain.peak_bytes) if update.peak_bytes is not None else None
            for interval in intervals:
                split = {phase: (update_split[phase] + (interval - 1) * plain_split[phase]) / interval
                         for phase in PHASES}
                per_step = (update.seconds + (interval - 1) * plain.seconds) / interval
                rows.append(_row(label, name, size, interval, per_step, split, peak, baseline))
    bar.close()
    named = dict(model.named_parameters())
    facts = {**machine_facts(device), "model": label, "parameters": sum(named[name].numel() for name in trained),
             "dtype": str(first.dtype).removeprefix("torch."), "repeats": repeats, "warmup": warmup, "lr": lr,
             "seed": seed, "batch sizes": list(sizes), "intervals": list(intervals),
             "peak memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                             "peak resident set (VmHWM) above the resident set before building"
                             if _PeakMemory.available(device) else "not measurable on this platform"),
             "hyperparameters": {name: hyperparameters.get(name, {}) for name in names}}
    return CostStudy(pd.DataFrame(rows, columns=list(COLUMNS)), facts)


def _median_phases(records: list[dict[str, float]]) -> dict[str, float]:
    return {phase: statistics.median(record.get(phase, 0.0) for record in records) for phase in PHASES}


def _mib(value: int | None) -> float:
    return value / 2**20 if value is not None else math.nan


def _row(model: str, optimizer: str, size: int, interval: int, per_step: float, split: dict[str, float],
         peak: int | None, baseline: Measurement) -> dict:
    sgd_peak = baseline.peak_bytes
    return {"model": model, "optimizer": optimizer, "batch_size": size, "interval": interval,
            "seconds_per_step": per_step, "time_ratio": per_step / baseline.seconds, "peak_mib": _mib(peak),
            "memory_ratio": peak / sgd_peak if peak is not None and sgd_peak else math.nan,
            **{f"{phase}_seconds": split.get(phase, 0.0) for phase in PHASES}, "status": "ok"}


def _empty_row(model: str, optimizer: str, size: int, interval: int, status: str) -> dict:
    return {"model": model, "optimizer": optimizer, "batch_size": size, "interval": interval,
            **{column: math.nan for column in list(COLUMNS)[4:-1]}, "status": status}


def uses_curvature(name: str) -> bool:
    """Whether optimizer ``name`` gathers curvature (statistics of the batch, or its own update schedule) beyond the gradient."""
    return optim.method(name).preconditioner.needs_statistics or bool(interval_hyperparameters(name, 1))


def cost_findings(table: pd.DataFrame) -> list[str]:
    """One sentence per model: the cheapest and the dearest curvature method against SGD at the largest batch, updates every step."""
    findings = []
    curvature = [name for name in dict.fromkeys(table["optimizer"]) if name in optim.names() and uses_curvature(name)]
    measured = table[(table["status"] == "ok") & table["optimizer"].isin(curvature) & (table["interval"] == 1)]
    for model, rows in measured.groupby("model", sort=False):
        largest = rows[rows["batch_size"] == rows["batch_size"].max()].sort_values("time_ratio")
        if largest.empty:
            continue
        cheap, dear = largest.iloc[0], largest.iloc[-1]
        findings.append(
            f"Cost of {model} at batch {int(cheap['batch_size'])} with updates every step: {cheap['optimizer']} is the "
            f"cheapest at {cheap['time_ratio']:.3g}× SGD's time per step, {dear['optimizer']} the dearest at "
            f"{dear['time_ratio']:.3g}× (memory {dear['memory_ratio']:.3g}× SGD's)."
        )
    return findings


__all__ = ["COLUMNS", "CostStudy", "DEFAULT_INTERVALS", "DEFAULT_OPTIMIZERS", "INTERVAL_HYPERPARAMETERS", "Measurement", "OUT_OF_MEMORY",
           "SGD_BASELINE", "cost_findings", "cost_study", "uses_curvature", "default_batch_sizes", "interval_hyperparameters", "machine_facts", "measure",
           "seconds"]
