"""Models and data from files, read without running code from them unless asked to.

Three model formats are read by :func:`load`:

- a ``torch.export`` archive (``torch.export.save``): a graph of ATen operations and its weights,
  whose loading runs no code from the file;
- a curvlab bundle, written by :func:`save`: a zip archive holding such an exported program, example
  data ``{"inputs", "targets"}`` and the loss, equally safe;
- a pickled ``nn.Module`` (``torch.save(model)``): unpickling runs code that the file names, so it
  is read only with ``trust_code=True``.

An exported program becomes an ``nn.Module`` through :func:`exported_module`, which makes it fit for
curvlab: its graph is fixed at export, so a program exported in training mode (dropout, batch
statistics) is refused, and ``train()``/``eval()`` only set the flag; the batch dimension must be
dynamic, since per-example products call the model on one example; parameters the graph never reads
(the second name of a tied weight, which ``torch.export.save`` stores as a copy) are frozen; and every
``aten.linear``/``aten.conv2d`` call whose weight and bias belong to one submodule alone and whose
input is batch-first becomes a call of an ``nn.Linear``/``nn.Conv2d`` holding those very parameters,
so that the Kronecker-factored approximations see the layers the model was written with.

Data files (:func:`load_data`): a ``.pt`` file holding ``{"inputs": X, "targets": y}``, read with
``weights_only=True``, or an ``.npz`` archive with the arrays ``inputs`` (or ``inputs.NAME`` for each
entry of a dict of inputs) and ``targets``.
"""

import io
import json
import os
import pickle
import pickletools
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from curvlab.errors import CurvlabError, InvalidProblem
from curvlab.problem import Problem

BUNDLE_FORMAT = "curvlab.bundle/1"
_BUNDLE_META, _BUNDLE_PROGRAM, _BUNDLE_DATA = "curvlab.json", "program.pt2", "data.pt"

_EXPORT_HINT = ("export the model instead: torch.export.save(torch.export.export(model.eval(), (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2'), or write a bundle with "
                "curvlab.save('model.pt', model, data=(x, y), loss='cross_entropy')")

_TRAINING_OPS = {  # operator -> position of its "training" argument
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.native_dropout.default: 2,
    torch.ops.aten.batch_norm.default: 5,
}

_LAYER_OPS = {torch.ops.aten.linear.default: ("input", "weight", "bias"),
              torch.ops.aten.conv2d.default: ("input", "weight", "bias", "stride", "padding", "dilation", "groups")}


@dataclass
class LoadedModel:
    """A model read by :func:`load` and what its file says about data and loss.

    Attributes:
        model: the ``nn.Module`` (for an exported program, the module of :func:`exported_module`).
        data: ``(inputs, targets)`` stored with the model (a bundle), else ``None``.
        loss, reduction: as stored in a bundle, else ``None``.
        format: ``"torch.export archive"``, ``"curvlab bundle"`` or ``"pickled nn.Module"``.
        notes: what loading changed or found, in words (frozen parameters, rebuilt layers).
    """

    model: nn.Module
    data: tuple | None = None
    loss: str | None = None
    reduction: str | None = None
    format: str = "torch.export archive"
    notes: list[str] = field(default_factory=list)


def save(path: str | Path, model: nn.Module, data, loss="cross_entropy", reduction: str = "mean") -> Path:
    """Write ``model`` with example ``data`` and its loss as a curvlab bundle that :func:`load` reads safely.

    The model is checked as a :class:`curvlab.Problem` on ``data`` (shapes, labels, loss), exported in
    eval mode with ``torch.export.export`` and a dynamic batch dimension, and written with the data
    and the loss's name into one zip archive. The model's train/eval mode is restored afterwards.

    Args:
        path: the file to write (replaced if it exists, only once complete).
        model: the ``nn.Module``; its ``forward`` takes the inputs (a dict of inputs as keyword arguments).
        data: one batch ``(X, y)``: ``X`` ``(N, ...)`` a tensor or a dict of tensors, ``y`` ``(N, ...)``.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce"`` or the equivalent ``torch.nn`` loss module.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Examples:
        >>> import tempfile, torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> path = curvlab.save(tempfile.mkdtemp() + "/model.pt", model, data=(X, y))
        >>> loaded = curvlab.load(path)
        >>> loaded.format, loaded.loss, loaded.data[0].shape
        ('curvlab bundle', 'cross_entropy', torch.Size([5, 3]))
    """
    if not isinstance(model, nn.Module):
        raise InvalidProblem(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InvalidProblem("data must be one batch (X, y): X a tensor or a dict of tensors, y a tensor")
    X, y = data
    training = model.training
    try:
        problem = Problem(model, (X, y), loss=loss, reduction=reduction)
        program = _export(model, _cast_inputs(X, problem.dtype, problem.device))
    finally:
        model.train(training)
    archive = io.BytesIO()
    torch.export.save(program, archive)
    data_file = io.BytesIO()
    torch.save({"inputs": X, "targets": y}, data_file)
    from curvlab import __version__  # deferred: curvlab/__init__.py imports this module before setting it

    meta = {"format": BUNDLE_FORMAT, "loss": problem.likelihood.name, "reduction": problem.reduction,
            "examples": problem.num_examples, "curvlab": __version__, "torch": torch.__version__}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file, zipfile.ZipFile(file, "w") as bundle:
            bundle.writestr(_BUNDLE_META, json.dumps(meta, indent=1))
            bundle.writestr(_BUNDLE_PROGRAM, archive.getvalue())
            bundle.writestr(_BUNDLE_DATA, data_file.getvalue())
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def load(path: str | Path, trust_code: bool = False) -> LoadedModel:
    """Read a model file: a ``torch.export`` archive, a curvlab bundle, or (only with ``trust_code``) a pickle.

    Args:
        path: the file. Its contents, not its name, decide the format.
        trust_code: allow unpickling a ``torch.save(model)`` file, which runs code the file names.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        InvalidProblem: a missing, truncated or unknown file; a pickle without ``trust_code``; a
            ``state_dict`` (weights without the model); an exported program curvlab cannot analyse.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidProblem(f"model file {path} does not exist or is not a file")
    with path.open("rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if _BUNDLE_META in names:
                    return _read_bundle(path, archive)
        except zipfile.BadZipFile:
            raise InvalidProblem(f"{path} is a truncated or damaged zip archive; write the file again") from None
        if any(name.endswith("/archive_format") for name in names):
            module, notes = _module_and_notes(_read_program(path, path))
            return LoadedModel(module, format="torch.export archive", notes=notes)
        if any(name.endswith("/data.pkl") for name in names):
            return _read_pickle(path, trust_code)
        raise InvalidProblem(f"{path} is a zip archive but neither a torch.export archive, a curvlab bundle nor a "
                             f"torch.save file")
    if head[:1] == b"\x80" and _starts_with_pickle(path):  # torch.save's legacy (non-zip) format
        return _read_pickle(path, trust_code)
    raise InvalidProblem(f"{path} is not a model file curvlab reads (expected a torch.export archive, a curvlab "
                         f"bundle, or with --trust-code a torch.save'd nn.Module)")


def load_data(path: str | Path) -> tuple:
    """Read ``(inputs, targets)`` from a ``.pt`` file (``weights_only=True``) or an ``.npz`` archive.

    ``inputs`` is a tensor ``(N, ...)`` or a dict of such tensors, ``targets`` a tensor ``(N, ...)``.
    In an ``.npz`` archive a dict of inputs is stored as one array ``inputs.NAME`` per entry.

    Examples:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + "/data.npz"
        >>> np.savez(path, inputs=np.zeros((4, 3)), targets=np.array([0, 1, 1, 0]))
        >>> X, y = load_data(path)
        >>> tuple(X.shape), y.dtype
        ((4, 3), torch.int64)
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidProblem(f"data file {path} does not exist or is not a file")
    if path.suffix == ".npz":
        X, y = _read_npz(path)
    elif path.suffix == ".pt":
        try:
            contents = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            raise InvalidProblem(f"{path} holds objects other than tensors; save the data as "
                                 f"torch.save({{'inputs': X, 'targets': y}}, path)") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise InvalidProblem(f"{path} is not a readable torch.save file ({_first_line(err)})") from None
        if not (isinstance(contents, Mapping) and {"inputs", "targets"} <= set(contents)):
            found = sorted(contents) if isinstance(contents, Mapping) else type(contents).__name__
            raise InvalidProblem(f"{path} must hold a dict with the keys 'inputs' and 'targets', found {found}")
        X, y = contents["inputs"], contents["targets"]
    else:
        raise InvalidProblem(f"unknown data file type {path.suffix!r} of {path}; use a .pt file holding "
                             f"{{'inputs': X, 'targets': y}} or an .npz with the same keys")
    inputs_ok = isinstance(X, torch.Tensor) or (isinstance(X, Mapping) and X
                                                and all(isinstance(v, torch.Tensor) for v in X.values()))
    if not inputs_ok or not isinstance(y, torch.Tensor):
        raise InvalidProblem(f"{path}: 'inputs' must be a tensor or a dict of tensors and 'targets' a tensor")
    return X, y


def exported_module(program: ExportedProgram) -> nn.Module:
    """The ``nn.Module`` of an exported program, fit for curvlab (see the module's description).

    Raises:
        InvalidProblem: the program was exported in training mode, or with a fixed batch size.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
        >>> program = torch.export.export(model, (torch.randn(5, 3),),
        ...                               dynamic_shapes=({0: torch.export.Dim("batch")},))
        >>> [type(layer).__name__ for layer in exported_module(program).children()][:2]
        ['Linear', 'Linear']
    """
    return _module_and_notes(program)[0]


def _module_and_notes(program: ExportedProgram) -> tuple[nn.Module, list[str]]:
    _refuse_training_mode(program)
    module = program.module()
    for switch in ("train", "eval"):  # torch.export makes them raise; the graph ignores the mode anyway
        module.__dict__.pop(switch, None)
    batch = _batch_symbols(module)
    notes = _freeze_unused(module) + _rebuild_layers(module, batch)
    return module, notes


def _refuse_training_mode(program: ExportedProgram) -> None:
    mutated = sorted(program.graph_signature.buffers_to_mutate.values())
    if mutated:
        raise InvalidProblem(f"the program updates buffers ({', '.join(mutated)}) when called: it was exported in "
                             f"training mode; call model.eval() before torch.export.export")
    for node in program.graph.nodes:
        position = _TRAINING_OPS.get(node.target)
        if position is not None and len(node.args) > position and node.args[position] is True:
            raise InvalidProblem(f"the program was exported in training mode ({node.target} with batch statistics "
                                 f"or random dropout); call model.eval() before torch.export.export")


def _batch_symbols(module: nn.Module) -> set[str]:
    """The symbolic sizes of the inputs' first dimension; refuses inputs with a fixed batch size."""
    symbols = set()
    for node in module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        if not isinstance(value.shape[0], torch.SymInt):
            raise InvalidProblem(
                f"the program was exported with a fixed batch size ({node.target} has shape {tuple(value.shape)}); "
                f"curvlab calls the model on single examples: export with a dynamic batch dimension, e.g. "
                f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)")
        symbols.add(str(value.shape[0]))
    return symbols


def _freeze_unused(module: nn.Module) -> list[str]:
    read = {node.target for node in module.graph.nodes if node.op == "get_attr" and node.users}
    unused = [name for name, parameter in module.named_parameters() if name not in read and parameter.requires_grad]
    for name in unused:
        module.get_parameter(name).requires_grad_(False)
    if not unused:
        return []
    return [f"parameter(s) {', '.join(unused)} are never read by the exported graph (a tied weight is stored "
            f"under each of its names) and are not studied"]


def _rebuild_layers(module: nn.Module, batch: set[str]) -> list[str]:
    graph = module.graph
    getters: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            getters.setdefault(node.target, []).append(node)
    rebuilt = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        arguments = dict(zip(_LAYER_OPS[node.target], node.args)) | dict(node.kwargs)
        layer = _layer_for(module, node, arguments, getters, batch)
        if layer is None:
            continue
        owner = arguments["weight"].target.removesuffix(".weight")
        parent, _, leaf = owner.rpartition(".")
        setattr(module.get_submodule(parent), leaf, layer)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (arguments["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for name in ("weight", "bias"):
            for getter in getters.get(f"{owner}.{name}", []):
                graph.erase_node(getter)
        rebuilt.append(owner)
    graph.lint()
    module.recompile()
    if not rebuilt:
        return []
    return [f"layers rebuilt from the exported graph (for the Kronecker-factored approximations): "
            f"{', '.join(rebuilt)}"]


def _layer_for(module: nn.Module, node, arguments: dict, getters: dict, batch: set[str]) -> nn.Module | None:
    """An ``nn.Linear``/``nn.Conv2d`` holding the call's parameters, or None when the call is not a layer's."""
    weight, bias, x = arguments.get("weight"), arguments.get("bias"), arguments.get("input")
    if getattr(weight, "op", None) != "get_attr" or not weight.target.endswith(".weight"):
        return None
    owner = weight.target.removesuffix(".weight")
    if bias is not None and (getattr(bias, "op", None) != "get_attr" or bias.target != f"{owner}.bias"):
        return None
    targets = [f"{owner}.weight"] + ([f"{owner}.bias"] if bias is not None else [])
    if any(set(getter.users) != {node} for target in targets for getter in getters[target]):
        return None
    submodule = module.get_submodule(owner)
    parameters = dict(submodule.named_parameters(recurse=False))
    if set(parameters) != {target.rpartition(".")[2] for target in targets} or list(submodule.children()) \
            or list(submodule.buffers(recurse=False)):
        return None
    value = x.meta.get("val") if hasattr(x, "meta") else None
    if not isinstance(value, torch.Tensor) or value.ndim < 2 or str(value.shape[0]) not in batch:
        return None
    W = parameters["weight"]
    if node.target is torch.ops.aten.linear.default:
        layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta")
    else:
        if value.ndim != 4:
            return None
        groups = arguments.get("groups", 1)
        layer = nn.Conv2d(W.shape[1] * groups, W.shape[0], tuple(W.shape[2:]), stride=arguments.get("stride", 1),
                          padding=arguments.get("padding", 0), dilation=arguments.get("dilation", 1),
                          groups=groups, bias=bias is not None, device="meta")
    layer.weight = W
    if bias is not None:
        layer.bias = parameters["bias"]
    return layer


def _export(model: nn.Module, X) -> ExportedProgram:
    """``torch.export.export`` in eval mode with one dynamic batch dimension shared by all inputs."""
    size = next(iter(X.values())).shape[0] if isinstance(X, Mapping) else X.shape[0]
    if size < 2:  # torch.export specialises sizes 0 and 1: trace on the example twice
        X = ({key: torch.cat([value, value]) for key, value in X.items()} if isinstance(X, Mapping)
             else torch.cat([X, X]))
    batch = torch.export.Dim("batch")
    if isinstance(X, Mapping):
        args, kwargs, dynamic = (), dict(X), {key: {0: batch} for key in X}
    else:
        args, kwargs, dynamic = (X,), {}, ({0: batch},)
    try:
        return torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic)
    except Exception as err:
        raise InvalidProblem(f"torch.export could not export the model ({type(err).__name__}: {_first_line(err)}); "
                             f"make its forward traceable (see the torch.export documentation)") from err


def _cast_inputs(X, dtype: torch.dtype, device: torch.device):
    if isinstance(X, Mapping):
        return {key: _cast_inputs(value, dtype, device) for key, value in X.items()}
    return X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device)


def _read_program(path: Path, source) -> ExportedProgram:
    try:
        return torch.export.load(source)
    except CurvlabError:
        raise
    except Exception as err:
        raise InvalidProblem(f"{path}: the torch.export archive cannot be read ({type(err).__name__}: "
                             f"{_first_line(err)}); export it again with this version of torch") from None


def _read_bundle(path: Path, archive: zipfile.ZipFile) -> LoadedModel:
    try:
        meta = json.loads(archive.read(_BUNDLE_META))
        program = archive.read(_BUNDLE_PROGRAM)
        data = torch.load(io.BytesIO(archive.read(_BUNDLE_DATA)), weights_only=True, map_location="cpu")
    except (KeyError, ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise InvalidProblem(f"{path} is a damaged curvlab bundle ({_first_line(err)}); write it again with "
                             f"curvlab.save") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise InvalidProblem(f"{path} is a curvlab bundle of format {meta.get('format')!r}; this curvlab reads "
                             f"{BUNDLE_FORMAT!r}")
    module, notes = _module_and_notes(_read_program(path, io.BytesIO(program)))
    return LoadedModel(module, (data["inputs"], data["targets"]), meta["loss"], meta["reduction"],
                       "curvlab bundle", notes)


def _read_pickle(path: Path, trust_code: bool) -> LoadedModel:
    try:
        contents = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        if not trust_code:
            raise InvalidProblem(
                f"{path} is a pickled object (torch.save(model)): loading it runs code named in the file, so "
                f"curvlab refuses it without --trust-code (trust_code=True); pass that only for a file you made "
                f"or trust, or {_EXPORT_HINT}") from None
        return _read_trusted(path)
    except (RuntimeError, EOFError, OSError) as err:
        raise InvalidProblem(f"{path} is a truncated or damaged torch.save file ({_first_line(err)})") from None
    if isinstance(contents, Mapping) and {"inputs", "targets"} <= set(contents):
        raise InvalidProblem(f"{path} holds data ('inputs', 'targets'), not a model: pass it with --data")
    if isinstance(contents, Mapping) and contents:
        raise InvalidProblem(
            f"{path} holds a state_dict (weights without the model's code: {', '.join(list(contents)[:3])}, ...); "
            f"curvlab needs the computation too: {_EXPORT_HINT}")
    raise InvalidProblem(f"{path} holds a {type(contents).__name__}, not a model; {_EXPORT_HINT}")


def _read_trusted(path: Path) -> LoadedModel:
    try:
        contents = torch.load(path, weights_only=False, map_location="cpu")
    except (AttributeError, ModuleNotFoundError, ImportError) as err:
        raise InvalidProblem(f"{path}: the model's class cannot be imported here ({_first_line(err)}); make its "
                             f"module importable, or {_EXPORT_HINT}") from None
    except Exception as err:
        raise InvalidProblem(f"{path} is not a readable torch.save file ({type(err).__name__}: "
                             f"{_first_line(err)})") from None
    if isinstance(contents, ExportedProgram):
        module, notes = _module_and_notes(contents)
        return LoadedModel(module, format="pickled torch.export program", notes=notes)
    if not isinstance(contents, nn.Module):
        raise InvalidProblem(f"{path} holds a {type(contents).__name__}, not an nn.Module; {_EXPORT_HINT}")
    return LoadedModel(contents, format="pickled nn.Module")


def _starts_with_pickle(path: Path) -> bool:
    """Whether the file begins with a well-formed pickle (parsed, never run)."""
    with path.open("rb") as file:
        try:
            for _ in pickletools.genops(file):
                pass
        except Exception:
            return False
    return True


def _read_npz(path: Path) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            contents = {key: arrays[key] for key in arrays.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise InvalidProblem(f"{path} is not a readable .npz archive of numeric arrays ({_first_line(err)})") from None
    named = {key.removeprefix("inputs."): value for key, value in contents.items() if key.startswith("inputs.")}
    if "targets" not in contents or ("inputs" in contents) == bool(named):
        raise InvalidProblem(f"{path} must hold the arrays 'targets' and either 'inputs' or 'inputs.NAME' for each "
                             f"named input, found {sorted(contents)}")
    X = ({key: torch.from_numpy(value) for key, value in named.items()} if named
         else torch.from_numpy(contents["inputs"]))
    return X, torch.from_numpy(contents["targets"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
