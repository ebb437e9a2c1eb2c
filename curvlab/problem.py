"""The object of study: a model, its data, its loss and the parameters whose curvature is measured.

The model becomes the pure function ``f(θ, X)`` through :func:`torch.func.functional_call`; the
loss on all data is ``L(θ) = R · Σ_n ℓ(f(θ, x_n), y_n)`` with the reduction factor ``R`` of
DESIGN.md (1 for ``sum``; one over the number of terms torch averages over for ``mean``).
"""

import contextlib
import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from curvlab.errors import InvalidProblem
from curvlab.likelihoods import LIKELIHOODS, Likelihood, label_generator
from curvlab.parallel import check_group, concat_over_ranks, gather_counts, raise_together, rank_and_size, sum_over_ranks

_LOSS_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}


@contextlib.contextmanager
def differentiable_kernels():
    """Run attention through kernels that support forward mode and double backward.

    The fused fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` and the fused
    scaled-dot-product kernels implement neither; inside this context they fall back to the
    composite implementation, whose derivatives are exact.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def likelihood_of(loss, reduction: str) -> Likelihood:
    """The likelihood of ``loss`` (a name or a ``torch.nn`` loss module), checked against ``reduction``."""
    if isinstance(loss, nn.Module):
        name = _LOSS_MODULES.get(type(loss))
        if name is None:
            raise InvalidProblem(
                f"unsupported loss module {type(loss).__name__}; use nn.CrossEntropyLoss, nn.MSELoss, "
                f"nn.BCEWithLogitsLoss or the names 'cross_entropy', 'mse', 'bce'"
            )
        unsupported = [
            option for option in ("weight", "pos_weight")
            if getattr(loss, option, None) is not None
        ] + (["label_smoothing"] if getattr(loss, "label_smoothing", 0.0) else [])
        if unsupported:
            raise InvalidProblem(
                f"{type(loss).__name__} with {', '.join(unsupported)} is not supported: its curvature is "
                f"not that of a likelihood; pass the loss without {' or '.join(unsupported)}"
            )
        if loss.reduction != reduction:
            raise InvalidProblem(
                f"the loss module has reduction={loss.reduction!r} but reduction={reduction!r} was given; "
                f"pass reduction={loss.reduction!r}"
            )
        return LIKELIHOODS[name]()
    if loss not in LIKELIHOODS:
        raise InvalidProblem(f"unknown loss {loss!r}; choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[loss]()


def select_parameters(model: nn.Module, params) -> list[str]:
    """The names of the trainable parameters that ``params`` (None, a list of names or a regex) selects."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if params is None:
        names = trainable
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as err:
            raise InvalidProblem(f"params={params!r} is not a valid regular expression: {err}") from None
        names = [name for name in trainable if pattern.search(name)]
        if not names:
            raise InvalidProblem(
                f"params={params!r} matches no trainable parameter; the names are: {', '.join(trainable)}"
            )
    else:
        wanted = list(params)
        unknown = [name for name in wanted if name not in trainable]
        if unknown:
            raise InvalidProblem(
                f"unknown or frozen parameter name(s) {', '.join(map(repr, unknown))}; the trainable "
                f"parameters are: {', '.join(trainable)}"
            )
        names = [name for name in trainable if name in set(wanted)]
    if not names:
        raise InvalidProblem("the model has no trainable parameters to study")
    return names


def _as_batches(data) -> Iterable:
    if is_batch(data):
        return [tuple(data)]
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise InvalidProblem(
            "the DataLoader shuffles (shuffle=True): curvature operators pass over the data many times "
            "and need the same batches each time; build it with shuffle=False"
        )
    sampler = getattr(data, "sampler", None)
    if isinstance(data, DataLoader) and isinstance(sampler, DistributedSampler) and (
            sampler.total_size > len(sampler.dataset)):
        raise InvalidProblem(
            f"the DataLoader's DistributedSampler pads the shards to {sampler.total_size} examples by repeating "
            f"some of the {len(sampler.dataset)}, which would count them twice; give each rank a contiguous "
            f"torch.utils.data.Subset of the dataset instead (shards may differ in size)"
        )
    if not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, Mapping, str)):
        raise InvalidProblem(
            f"data must be a pair (X, y) or an iterable of (X, y) batches, got {type(data).__name__}"
        )
    return list(data) if iter(data) is data else data


def prepare_input(X, dtype: torch.dtype, device: torch.device):
    """``X`` (a tensor or a dict of tensors) on ``device``, floating tensors cast to ``dtype``."""
    if isinstance(X, Mapping):
        return {key: prepare_input(value, dtype, device) for key, value in X.items()}
    X = X.to(device)
    return X.to(dtype) if X.is_floating_point() else X


def _is_input(x) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, Mapping) and len(x) > 0 and all(isinstance(v, torch.Tensor) for v in x.values())
    )


def is_batch(item) -> bool:
    """Whether ``item`` is one batch ``(X, y)``: X a tensor or a dict of tensors, y a tensor."""
    return (isinstance(item, (tuple, list)) and len(item) == 2 and _is_input(item[0])
            and isinstance(item[1], torch.Tensor))


def batch_size(X) -> int:
    """The number of examples of the input ``X`` (a tensor or a dict of tensors): their common leading dimension."""
    sizes = {t.shape[0] if t.ndim else None for t in (X.values() if isinstance(X, Mapping) else [X])}
    if len(sizes) != 1 or None in sizes:
        raise InvalidProblem(
            "every input tensor of a batch needs the same leading (batch) dimension, got sizes "
            f"{sorted(map(str, sizes))}"
        )
    return sizes.pop()


def example_slice(X, start: int, stop: int):
    """Examples ``start:stop`` of the input ``X`` (a tensor or a dict of tensors)."""
    return {key: value[start:stop] for key, value in X.items()} if isinstance(X, Mapping) else X[start:stop]


class Problem:
    """A model, its data, its loss and the studied parameters θ (P numbers in all).

    Args:
        model: an ``nn.Module``; it is switched to eval mode (dropout off, batch-norm statistics fixed).
        data: one batch ``(X, y)`` or an iterable of batches (sizes may differ); ``X`` is a tensor or a
            dict of tensors passed as keyword arguments. Floating inputs and targets are cast to the
            parameters' dtype and moved to their device.
        loss: ``"cross_entropy"`` (classes on the last output dimension: ``(N, C)`` or ``(N, T, C)``),
            ``"mse"``, ``"bce"`` (with logits), or the equivalent ``torch.nn`` loss module.
        params: ``None`` (all trainable), a list of parameter names, or a regex searched in each name.
        reduction: ``"mean"`` or ``"sum"``, as torch's loss would reduce.
        process_group: ``None``, or a ``torch.distributed`` process group: then ``data`` is this rank's
            shard (shards may differ in size; none may be empty) and every loss, gradient, product
            and statistic is that of the union of the shards, taken in rank order, each rank receiving
            the same result. A ``DistributedDataParallel`` model is analysed through its ``module``.

    Examples:
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(3, 2)
        >>> prob = curvlab.Problem(model, (torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])))
        >>> prob.num_params, prob.num_examples, prob.reduction_factor
        (8, 5, 0.2)
    """

    def __init__(self, model: nn.Module, data, loss="cross_entropy", params=None, reduction: str = "mean",
                 process_group=None):
        if process_group is not None:
            check_group(process_group)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise InvalidProblem(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reduction not in ("mean", "sum"):
            raise InvalidProblem(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")
        self.model = model.eval()
        self.loss = loss
        self.likelihood = likelihood_of(loss, reduction)
        self.reduction = reduction
        self.process_group = process_group
        self.rank, self.world_size = rank_and_size(process_group)
        self.param_names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self._all_params = {name: p.detach() for name, p in named.items()}
        studied = [named[name] for name in self.param_names]
        if len({(p.dtype, p.device) for p in studied}) > 1:
            raise InvalidProblem("the studied parameters must share one dtype and one device; cast the model")
        self.dtype, self.device = studied[0].dtype, studied[0].device
        if not self.dtype.is_floating_point:
            raise InvalidProblem(f"parameters must be floating point, got {self.dtype}")
        bad = [name for name, p in named.items() if not torch.isfinite(p).all()]
        if bad:
            raise InvalidProblem(
                f"non-finite values (nan or inf) in parameter(s) {', '.join(bad)}; load a healthy checkpoint"
            )
        self._data = _as_batches(data)
        self.batch_offset, self.batch_part = 0, None
        self._scan()

    def with_batch(self, batch, terms: int, loss: float | None) -> "Problem":
        """This problem on one other batch ``(X, y)`` at the model's current ``θ``, without the checking forward pass.

        For a caller that has already validated the batch's targets (an optimizer step): ``terms`` is the
        batch's number of loss terms (``likelihood.validate``) and ``loss`` its loss, which
        :meth:`loss_value` returns, or ``None`` (one process only) where the caller has not run the model
        on the batch: the first pass over it that computes the loss records it (:meth:`record_loss`), or
        :meth:`loss_value` computes it. The model's determinism, checked when this
        problem was built, is not checked again. With a process group, ``batch`` is this rank's share of
        the step's one batch (``batch_part``: where its examples lie in the union, rank after rank), and
        the counts and the loss are those of the union.
        """
        if not is_batch(batch):
            raise InvalidProblem(f"with_batch takes one batch (X, y), got {type(batch).__name__}")
        if loss is None and self.process_group is not None:
            raise InvalidProblem("with a process group, with_batch needs the loss of the union of the ranks' shares")
        other = copy.copy(self)
        other.model = self.model.eval()
        other._all_params = {name: p.detach() for name, p in self.model.named_parameters()}
        other._data = [tuple(batch)]
        other.batch_offset, other.num_batches = 0, 1
        examples = batch_size(batch[0])
        other._loss_value = loss
        if self.process_group is not None:
            summed = loss if self.reduction == "sum" else loss * terms
            shares = concat_over_ranks(torch.tensor([[examples, terms, summed]], dtype=torch.float64, device=self.device),
                                       self.process_group)
            offset = int(shares[:self.rank, 0].sum())
            examples, terms, summed = shares.sum(0).tolist()
            examples, terms = int(examples), int(terms)
            other.batch_part = (offset, examples)
            other._loss_value = summed if self.reduction == "sum" else summed / terms
        other.num_examples, other.num_terms = examples, terms
        other.reduction_factor = 1.0 if self.reduction == "sum" else 1.0 / terms
        return other

    @property
    def data(self) -> Iterable:
        """The batches ``(X, y)`` as given (one batch becomes a list of one)."""
        return self._data

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The studied parameters θ, detached: name -> tensor."""
        return {name: self._all_params[name] for name in self.param_names}

    @property
    def param_shapes(self) -> list[torch.Size]:
        return [self._all_params[name].shape for name in self.param_names]

    @property
    def num_params(self) -> int:
        """P, the number of studied parameters."""
        return sum(self._all_params[name].numel() for name in self.param_names)

    def forward(self, params: Mapping[str, torch.Tensor], X) -> torch.Tensor:
        """``f(θ, X)``: the model's output with the studied parameters replaced by ``params``."""
        values = {**self._all_params, **params}
        if isinstance(X, Mapping):
            return functional_call(self.model, values, (), dict(X))
        return functional_call(self.model, values, (X,))

    def batch_loss(self, params: Mapping[str, torch.Tensor], X, y) -> torch.Tensor:
        """``R · Σ_{n ∈ batch} ℓ_n``: one batch's share of ``L``."""
        return self.reduction_factor * self.likelihood.loss(self.forward(params, X), y)

    def batches(self) -> Iterator[tuple[int, object, torch.Tensor]]:
        """``(index, X, y)`` for every batch of this rank, on the parameters' device and dtype.

        ``index`` numbers the batches of all ranks in rank order (``batch_offset`` + the local position),
        so what is seeded by it (Monte-Carlo labels) is the same as in one process holding all shards.
        """
        for index, batch in enumerate(self._data, start=self.batch_offset):
            if not is_batch(batch):
                raise InvalidProblem(
                    f"batch {index} is not a pair (X, y) of tensors (X may be a dict of tensors), "
                    f"got {type(batch).__name__}"
                )
            X, y = batch
            yield index, prepare_input(X, self.dtype, self.device), self.likelihood.prepare_target(
                y.to(self.device), self.dtype)

    def _scan(self) -> None:
        """One forward pass over the data: shapes, labels, finiteness, counts and determinism.

        With a process group the counts and the loss are summed over the ranks, the batches are
        numbered globally (``batch_offset``: the batches of the ranks before this one), and an
        invalid batch on any rank raises on every rank.
        """
        examples = terms = batches = 0
        total = 0.0
        error = None
        try:
            with torch.no_grad(), differentiable_kernels():
                for index, X, y in self.batches():
                    size, batch_terms, batch_loss = self._check_batch(index, X, y)
                    examples, terms, batches, total = examples + size, terms + batch_terms, batches + 1, total + batch_loss
            if self.process_group is not None and examples == 0:
                raise InvalidProblem(
                    f"rank {self.rank}'s shard of the data is empty; give every rank at least one example"
                )
        except InvalidProblem as err:
            error = err
        raise_together(error, self.process_group)
        counts = sum_over_ranks(torch.tensor([examples, terms, total], dtype=torch.float64, device=self.device),
                                self.process_group).tolist()
        per_rank = gather_counts(batches, self.process_group)
        if counts[0] == 0:
            raise InvalidProblem("the dataset is empty: give at least one example")
        self.batch_offset = sum(per_rank[:self.rank])
        self.num_batches = sum(per_rank)
        self.num_examples, self.num_terms = int(counts[0]), int(counts[1])
        self.reduction_factor = 1.0 if self.reduction == "sum" else 1.0 / self.num_terms
        self._loss_value = self.reduction_factor * counts[2]

    def _check_batch(self, index: int, X, y: torch.Tensor) -> tuple[int, int, float]:
        """Batch ``index``'s examples, loss terms and summed loss, after checking it fits the model and loss."""
        size = batch_size(X)
        if y.ndim == 0 or y.shape[0] != size:
            raise InvalidProblem(
                f"batch {index}: {size} inputs but targets of shape {tuple(y.shape)}; give one target per example"
            )
        try:
            output = self.forward(self.params, X)
        except Exception as err:
            raise InvalidProblem(f"the model failed on batch {index}: {type(err).__name__}: {err}") from err
        if not isinstance(output, torch.Tensor):
            raise InvalidProblem(
                f"the model must return one tensor of outputs, got {type(output).__name__}; "
                f"wrap it so that forward returns the logits/predictions"
            )
        terms = self.likelihood.validate(output, y)
        loss = self.likelihood.loss(output, y)
        if not torch.isfinite(loss):
            raise InvalidProblem(
                f"the loss is not finite on batch {index} ({loss.item()}); check the inputs "
                f"for nan/inf and the model for overflow"
            )
        if index == 0 and not torch.equal(output, self.forward(self.params, X)):
            raise InvalidProblem(
                "the model's outputs differ between two identical forward passes in eval mode "
                "(randomness in forward?); curvature needs a deterministic function: remove "
                "the random operations or make them respect model.training"
            )
        return size, terms, loss.item()

    def loss_value(self) -> float:
        """``L(θ)`` on all data."""
        if self._loss_value is None:
            with torch.no_grad(), differentiable_kernels():
                self._loss_value = sum(float(self.batch_loss(self.params, X, y)) for _, X, y in self.batches())
        return self._loss_value

    @property
    def loss_known(self) -> bool:
        """Whether :meth:`loss_value` has ``L(θ)`` without a pass over the data (see :meth:`with_batch`)."""
        return self._loss_value is not None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Keep ``L(θ)`` (0-d tensor, all of this process's data) from a pass that computed it, where it is not known yet.

        For the passes that run the model on the data anyway (per-example gradients, layer statistics,
        Hessian products) on a problem made by :meth:`with_batch` without a loss.
        """
        if self._loss_value is None:
            value = float(loss)
            if not math.isfinite(value):
                raise InvalidProblem(f"the loss is not finite ({value}); check the inputs for nan/inf and the model "
                                     f"for overflow (an optimizer's parameters may have diverged: lower the learning "
                                     f"rate or raise the damping)")
            self._loss_value = value

    def gradient(self) -> torch.Tensor:
        """``∇L(θ)`` on all data, flattened: shape ``(P,)``."""
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with differentiable_kernels():
            for _, X, y in self.batches():
                total += self.flatten(grad(self.batch_loss)(self.params, X, y))
        return self.reduce(total)

    def sample_targets(self, index: int, output: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
        """Targets ``(samples, *target_shape)`` drawn from the model's predictive distribution at batch ``index``'s ``output``.

        The random numbers come from a generator seeded by ``(seed, index)`` alone; for a batch split over
        ranks (:meth:`with_batch`) every rank draws those of the whole batch and keeps its examples' share,
        so the labels are those one process would draw.
        """
        return self.likelihood.sample(output, samples, label_generator(seed, index), self.batch_part)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """A sum over this rank's data replaced in place by the sum over all ranks' data (one all-reduce), and returned."""
        return sum_over_ranks(tensor, self.process_group)

    def flatten(self, tensors: Mapping[str, torch.Tensor], leading: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors of shape ``(*lead, *shape)`` into ``(*lead, P)``."""
        return torch.cat([tensors[name].flatten(leading) for name in self.param_names], dim=leading)

    def stack_columns(self, columns: Iterable[Mapping[str, torch.Tensor]], count: int) -> torch.Tensor:
        """Write the k-th per-parameter dict of ``columns`` into row k of a ``(count, P)`` tensor."""
        rows = torch.empty(count, self.num_params, dtype=self.dtype, device=self.device)
        sizes = [shape.numel() for shape in self.param_shapes]
        for row, column in zip(rows, columns):
            for piece, name in zip(row.split(sizes), self.param_names):
                piece.copy_(column[name].flatten())
        return rows

    def spans(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)``: where each studied parameter's entries lie in a flat ``(P,)`` vector."""
        spans, offset = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes):
            spans[name] = (offset, offset + shape.numel())
            offset += shape.numel()
        return spans

    def entries(self, names: Iterable[str]) -> torch.Tensor:
        """The flat-vector indices of the parameters ``names``, concatenated in the order given."""
        spans = self.spans()
        return torch.cat([torch.arange(*spans[name], device=self.device) for name in names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(*lead, P)`` into per-parameter tensors of shape ``(*lead, *shape)``."""
        lead = flat.shape[:-1]
        pieces = flat.split([shape.numel() for shape in self.param_shapes], dim=-1)
        return {name: piece.reshape(*lead, *shape)
                for name, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    def restrict(self, names: list[str]) -> "Problem":
        """The same problem with only ``names`` (a subset of the studied parameters) studied."""
        restricted = copy.copy(self)
        restricted.param_names = [name for name in self.param_names if name in set(names)]
        return restricted

    def module_blocks(self) -> list[tuple[str, list[str]]]:
        """``(module name, its studied parameter names)`` for every module that directly owns studied ones."""
        studied = set(self.param_names)
        blocks = []
        for module_name, module in self.model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            names = [prefix + local for local, _ in module.named_parameters(recurse=False)
                     if prefix + local in studied]
            if names:
                blocks.append((module_name, names))
                studied -= set(names)
        return blocks
