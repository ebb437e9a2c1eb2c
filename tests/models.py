"""Small deterministic models and data sets for the curvature tests.

Every case is tiny (P between about 50 and 400) so that dense float64 references built from plain
autograd loops take well under a second. A case is built from its own seed inside
``torch.random.fork_rng``, so building one never disturbs the caller's random state and two builds of
the same case are identical.

A case's data is a list of unequal batches (one of them a single example); ``Case.data`` is the
same examples as one batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import nn

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]
Batch = Tuple[Inputs, torch.Tensor]


@dataclasses.dataclass
class Case:
    """A model in eval mode, its data as unequal batches, the loss name and a parameter regex.

    ``regex`` selects a proper, non-contiguous subset of the parameters; ``some_names`` is another
    proper subset given as a list of names.
    """

    name: str
    model: nn.Module
    batches: List[Batch]
    loss: str
    regex: str

    @property
    def data(self) -> Batch:
        """All examples as one batch, in the order of ``batches``."""
        return concat_batches(self.batches)

    @property
    def param_names(self) -> List[str]:
        return [name for name, _ in self.model.named_parameters()]

    @property
    def some_names(self) -> List[str]:
        """Every other parameter name, starting with the second."""
        return self.param_names[1::2]


def concat_batches(batches: List[Batch]) -> Batch:
    xs, ys = zip(*batches)
    if isinstance(xs[0], dict):
        x = {key: torch.cat([xb[key] for xb in xs]) for key in xs[0]}
    else:
        x = torch.cat(xs)
    return x, torch.cat(ys)


def split_batch(x: Inputs, y: torch.Tensor, sizes: List[int]) -> List[Batch]:
    """Split one batch into consecutive batches of the given sizes."""
    assert sum(sizes) == y.shape[0]
    out, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        xb = {k: v[part] for k, v in x.items()} if isinstance(x, dict) else x[part]
        out.append((xb, y[part]))
        start += size
    return out


SIZES = [3, 1, 4]  # unequal batches, one with a single example
N = sum(SIZES)


def _labels(classes: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, classes, shape)


def _bits(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).to(torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------
# Models that need their own class


class AttentionClassifier(nn.Module):
    """Self-attention with nn.MultiheadAttention, mean pooled over the sequence, then a linear head."""

    def __init__(self, dim: int = 6, heads: int = 2, classes: int = 3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(a).mean(dim=1))


class TinyTransformer(nn.Module):
    """Embedding -> TransformerEncoderLayer -> per-position classifier: outputs (N, T, C)."""

    def __init__(self, vocab: int = 5, dim: int = 6, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=2, dim_feedforward=8, dropout=0.1, activation="gelu", batch_first=True
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class TiedLanguageModel(nn.Module):
    """Output layer shares the embedding weight; outputs (N, T, vocab)."""

    def __init__(self, vocab: int = 6, dim: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.embed(tokens))))


class EmbeddingClassifier(nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 3, length: int = 4, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim * length, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens).flatten(1)))


class TwoInputs(nn.Module):
    """Called as model(image=..., meta=...), i.e. with a dict of inputs."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(3, 4)
        self.meta = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.image(image) + self.meta(meta)))


class RandomNoise(nn.Module):
    """A dropout-like layer that ignores eval mode: every forward pass differs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + 0.1 * torch.rand_like(x))


# ----------------------------------------------------------------------------------------------
# Factories: each returns (model, x, y, loss, regex) for one batch of N examples


def _mlp_ce():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))  # P = 84
    return model, torch.randn(N, 5), _labels(4, N), "cross_entropy", r"weight$"


def _mlp_mse():
    model = nn.Sequential(nn.Linear(4, 7), nn.Sigmoid(), nn.Linear(7, 3))  # P = 59
    return model, torch.randn(N, 4), torch.randn(N, 3), "mse", r"^2\."


def _mlp_bce():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))  # P = 64
    return model, torch.randn(N, 5), _bits(N, 4), "bce", r"^0\."


def _cnn():
    model = nn.Sequential(  # P = 57 + 6 + 52 + 15 = 130
        nn.Conv2d(2, 3, 3, padding=1),  # (3, 6, 6)
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.MaxPool2d(2),  # (3, 3, 3)
        nn.Conv2d(3, 4, 2),  # (4, 2, 2)
        nn.Tanh(),
        nn.AvgPool2d(2),  # (4, 1, 1)
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return model, torch.randn(N, 2, 6, 6), _labels(3, N), "cross_entropy", r"^(0|4)\."


def _transformer():
    model = TinyTransformer()  # P = 30 + 302 + 28 = 360
    return model, _labels(5, N, 4), _labels(4, N, 4), "cross_entropy", r"self_attn|head"


def _attention():
    model = AttentionClassifier()  # P = 168 + 21 = 189
    return model, torch.randn(N, 4, 6), _labels(3, N), "cross_entropy", r"^attn\.in_proj|^head\.bias"


def _batchnorm():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))  # P = 63
    return model, torch.randn(N, 4), _labels(3, N), "cross_entropy", r"^1\."


def _layernorm():
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))  # P = 69
    return model, torch.randn(N, 5), torch.randn(N, 3), "mse", r"^1\.|^3\.weight"


def _embedding():
    model = EmbeddingClassifier()  # P = 30 + 52 = 82
    return model, _labels(10, N, 4), _labels(4, N), "cross_entropy", r"embed"


def _tied():
    model = TiedLanguageModel()  # P = 24 + 20 + 6 = 50 (out.weight is embed.weight)
    return model, _labels(6, N, 5), _labels(6, N, 5), "cross_entropy", r"embed|out"


def _dict_inputs():
    model = TwoInputs()  # P = 16 + 12 + 15 = 43
    x = {"image": torch.randn(N, 3), "meta": torch.randn(N, 2)}
    return model, x, _bits(N, 3), "bce", r"^(image|head)\.weight"


FACTORIES: Dict[str, Callable] = {
    "mlp_ce": _mlp_ce,
    "mlp_mse": _mlp_mse,
    "mlp_bce": _mlp_bce,
    "cnn": _cnn,
    "transformer": _transformer,
    "attention": _attention,
    "batchnorm": _batchnorm,
    "layernorm": _layernorm,
    "embedding": _embedding,
    "tied": _tied,
    "dict_inputs": _dict_inputs,
}
CASE_NAMES = list(FACTORIES)
SEQUENCE_CASES = ["transformer", "tied"]


def _warm_up_running_stats(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode passes on shifted, scaled inputs, so running stats are far from (0, 1)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(3.0 * torch.randn_like(x) + 2.0)


def _to(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def make_case(name: str, device="cpu", dtype=torch.float64, seed: int = 0) -> Case:
    """Build case ``name`` from seed ``seed`` without touching the global random state.

    The case is always built in float64 on the CPU and then converted, so a float32 case is the
    float64 one rounded.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            model, x, y, loss, regex = FACTORIES[name]()
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                _warm_up_running_stats(model, x)
        finally:
            torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    if isinstance(x, dict):
        x = {k: _to(v, device, dtype) for k, v in x.items()}
    else:
        x = _to(x, device, dtype)
    return Case(name, model, split_batch(x, _to(y, device, dtype), SIZES), loss, regex)


def big_linear(device="cpu", dtype=torch.float32):
    """About 10^6 parameters: its dense curvature (4 TB in float32) must be refused."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(1000, 1000).to(device=device, dtype=dtype)
        x = torch.randn(2, 1000, device=device, dtype=dtype)
        y = torch.randn(2, 1000, device=device, dtype=dtype)
    return model, (x, y)
