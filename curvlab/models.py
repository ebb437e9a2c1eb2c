"""The seed study's four architectures, written with ``torch.nn`` alone (no torchvision).

Every weight matrix lives in an ``nn.Linear`` or ``nn.Conv2d``, so that the Kronecker-factored methods
see every layer (attention is written with ``nn.Linear`` projections, never ``nn.MultiheadAttention``,
whose packed ``in_proj_weight`` is a raw parameter); only the ViT's class token and position embedding
are raw parameters. :data:`STUDY_MODELS` names them; :func:`study_model` builds one at the study's size
(``"full"``) or at a reduced width that keeps the architecture (``"cpu"``).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from curvlab.errors import InvalidProblem


def mlp(in_features: int = 784, width: int = 2048, depth: int = 3, classes: int = 10) -> nn.Sequential:
    """``depth`` Linear layers with ReLU between: ``in_features → width → … → width → classes``.

    At the defaults (the study's 784-2048-2048-10) it has 5,824,522 parameters.
    """
    widths = [in_features] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers[:-1])


def cnn(in_channels: int = 3, image_size: int = 32, classes: int = 10, width: int = 32) -> nn.Sequential:
    """Two ``conv 5×5 → ReLU → max-pool 2`` stages (``width``, ``2·width`` channels), then two Linear layers.

    ``Linear(2·width·(s/4)², 16·width) → ReLU → Linear(16·width, classes)``; at the defaults on 32×32
    images: 2,156,490 parameters.
    """
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * side * side, 16 * width), nn.ReLU(), nn.Linear(16 * width, classes),
    )


class BasicBlock(nn.Module):
    """ResNet's ``x ↦ ReLU(BN(conv(ReLU(BN(conv x)))) + shortcut x)``; the shortcut is a 1×1 conv and BN when the shape changes."""

    def __init__(self, fan_in: int, fan_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(fan_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or fan_in != fan_out:
            self.shortcut = nn.Sequential(nn.Conv2d(fan_in, fan_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32×32 images (He et al. 2016, CIFAR variant): a 3×3 stem without max-pool, four stages of two
    :class:`BasicBlock` with ``width·(1, 2, 4, 8)`` channels (strides 1, 2, 2, 2), global average pooling and a Linear head.

    At ``width = 64`` with 10 classes: 11,173,962 parameters.
    """

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, fan_in = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            fan_out = width * 2 ** stage
            blocks += [BasicBlock(fan_in, fan_out, stride), BasicBlock(fan_out, fan_out, 1)]
            fan_in = fan_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(fan_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(QKᵀ/√d_h) V`` with ``nn.Linear`` projections: ``(N, T, D) → (N, T, D)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InvalidProblem(f"the width {dim} must be a multiple of the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: ``x + Attention(LN x)``, then ``x + MLP(LN x)`` with a GELU MLP of ``mlp_ratio·D``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): ``patch_size`` patches embedded by a strided ``nn.Conv2d``, a class token,
    learned position embeddings, ``depth`` :class:`EncoderBlock`, a final LayerNorm and a Linear head on the class token.

    ViT-Tiny is ``dim = 192``, ``depth = 12``, ``heads = 3``, ``mlp_ratio = 4``; with 4×4 patches of 32×32 images
    (64 patches) and 10 classes it has 5,362,762 parameters.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, classes: int = 10,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: int = 4):
        super().__init__()
        if image_size % patch_size:
            raise InvalidProblem(f"the image size {image_size} must be a multiple of the patch size {patch_size}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patches = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), patches], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@dataclass(frozen=True)
class StudyModel:
    """One architecture of the study and how to build it at each scale.

    Attributes:
        name: its key in :data:`STUDY_MODELS`.
        build: ``build(**sizes) -> nn.Module``.
        sizes: per scale (``"full"``, ``"cpu"``), the keyword arguments of ``build``.
        input_shape: the shape of one example.
        classes: the number of outputs.
        title: the architecture in words.
    """

    name: str
    build: Callable[..., nn.Module]
    sizes: dict[str, dict[str, int]]
    input_shape: tuple[int, ...]
    classes: int
    title: str

    def describe(self, model: nn.Module, scale: str) -> str:
        """The architecture, the sizes of ``scale`` and the parameter count of ``model``."""
        sizes = ", ".join(f"{key} {value}" for key, value in self.sizes[scale].items())
        count = sum(p.numel() for p in model.parameters())
        return f"{self.title} ({sizes}), {count / 1e6:.3g}M parameters"


#: The study's architectures, each with its full size and a CPU size that keeps depth and layer types.
STUDY_MODELS = {
    "mlp": StudyModel("mlp", mlp, {"full": {"width": 2048}, "cpu": {"width": 256}}, (784,), 10,
                      "MLP 784-W-W-10 (ReLU)"),
    "cnn": StudyModel("cnn", cnn, {"full": {"width": 32}, "cpu": {"width": 8}}, (3, 32, 32), 10,
                      "CNN, two conv 5×5 + max-pool, two Linear"),
    "resnet18": StudyModel("resnet18", ResNet18, {"full": {"width": 64}, "cpu": {"width": 8}}, (3, 32, 32), 10,
                           "ResNet18 (CIFAR variant)"),
    "vit_tiny": StudyModel("vit_tiny", VisionTransformer, {"full": {"dim": 192, "depth": 12, "heads": 3},
                                                          "cpu": {"dim": 48, "depth": 4, "heads": 3}},
                           (3, 32, 32), 10, "ViT-Tiny, 4×4 patches of 32×32 images"),
}


def study_model(name: str, scale: str = "full", seed: int = 0) -> tuple[nn.Module, StudyModel]:
    """The architecture ``name`` at ``scale`` (``"full"`` or ``"cpu"``), initialised from ``seed``, and its description.

    The caller's random state is untouched.

    Examples:
        >>> model, about = study_model("mlp", scale="cpu")
        >>> about.input_shape, model(torch.zeros(2, 784)).shape
        ((784,), torch.Size([2, 10]))
    """
    if name not in STUDY_MODELS:
        raise InvalidProblem(f"unknown model {name!r}; choose one of {', '.join(STUDY_MODELS)}")
    about = STUDY_MODELS[name]
    if scale not in about.sizes:
        raise InvalidProblem(f"unknown scale {scale!r}; choose one of {', '.join(about.sizes)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = about.build(**about.sizes[scale])
    return model, about


__all__ = ["Attention", "BasicBlock", "EncoderBlock", "ResNet18", "STUDY_MODELS", "StudyModel", "VisionTransformer",
           "cnn", "mlp", "study_model"]
