"""Classification tasks that need no download, for the accuracy-against-batch-size study.

- ``mnist1d``: MNIST-1D (Greydanus 2020) generated locally by the ``mnist1d`` package (4000 training and
  1000 test sequences of length 40, 10 classes), with the study's MLP (width 2048; 128 at CPU scale).
- ``cifar_like``: 3×32×32 images of 10 classes made here: each class is a smooth random colour pattern;
  an example is its class pattern shifted circularly by up to 6 pixels, scaled in contrast, plus a
  smooth random pattern of its own and white noise, standardised per channel. Classes overlap, so a
  small CNN learns it well above chance without solving it in a few epochs. The study's 4-layer CNN.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from curvlab import models
from curvlab.errors import InvalidProblem

SCALES = ("cpu", "full")


@dataclass(frozen=True)
class Task:
    """A classification task: its data and the model the study trains on it.

    Attributes:
        name: its key in :data:`TASKS`.
        X_train, y_train, X_test, y_test: float32 inputs ``(N, ...)`` and int64 labels ``(N,)``.
        build_model: ``build_model(seed) -> nn.Module``, initialised from ``seed`` (the caller's RNG untouched).
        description: what the data and the model are, with their sizes.
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    build_model: Callable[[int], nn.Module]
    description: str


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build_model(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()
    return build_model


def mnist1d_task(scale: str = "cpu") -> Task:
    """MNIST-1D with the MLP ``40 → W → W → 10`` (ReLU), ``W = 2048`` at full scale and 128 at CPU scale."""
    from curvlab.zoo import mnist1d_arrays

    _require_scale(scale)
    arrays = mnist1d_arrays()
    width = 2048 if scale == "full" else 128
    data = [torch.as_tensor(arrays[key]) for key in ("x", "y", "x_test", "y_test")]
    X_train, X_test = data[0].float(), data[2].float()
    y_train, y_test = data[1].long(), data[3].long()
    description = (f"MNIST-1D ({len(y_train)} training, {len(y_test)} test sequences of length {X_train.shape[1]}, "
                   f"10 classes), MLP 40-{width}-{width}-10 (ReLU)")
    return Task("mnist1d", X_train, y_train, X_test, y_test,
                _seeded(lambda: models.mlp(in_features=X_train.shape[1], width=width, classes=10)), description)


def _smooth_patterns(count: int, generator: torch.Generator, coarse: int = 8, size: int = 32) -> torch.Tensor:
    """``count`` random colour patterns ``(count, 3, size, size)``: Gaussian noise on a ``coarse`` grid, upsampled bicubically, unit variance."""
    noise = torch.randn(count, 3, coarse, coarse, generator=generator)
    patterns = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return patterns / patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def cifar_like_task(scale: str = "cpu", seed: int = 0) -> Task:
    """The CIFAR-like synthetic task (module docstring) with the study's CNN (width 32; 8 at CPU scale).

    Sizes: 50000 training and 10000 test images at full scale, 2000 and 1000 at CPU scale. The data
    depend only on ``seed``.
    """
    _require_scale(scale)
    train, test = (50_000, 10_000) if scale == "full" else (2_000, 1_000)
    generator = torch.Generator().manual_seed(seed)
    classes = 10
    templates = _smooth_patterns(classes, generator)
    labels = torch.randint(classes, (train + test,), generator=generator)
    shifts = torch.randint(-6, 7, (train + test, 2), generator=generator)
    contrast = 0.6 + 0.8 * torch.rand(train + test, 1, 1, 1, generator=generator)
    images = torch.stack([torch.roll(templates[label], (int(dy), int(dx)), dims=(1, 2))
                          for label, (dy, dx) in zip(labels.tolist(), shifts.tolist())])
    images = contrast * images + 1.2 * _smooth_patterns(train + test, generator)
    images = images + 0.5 * torch.randn(images.shape, generator=generator)
    mean = images[:train].mean(dim=(0, 2, 3), keepdim=True)
    std = images[:train].std(dim=(0, 2, 3), keepdim=True)
    images = ((images - mean) / std).float()
    width = 32 if scale == "full" else 8
    description = (f"CIFAR-like synthetic images (3×32×32, 10 classes, {train} training, {test} test, data seed "
                   f"{seed}), CNN width {width}")
    return Task("cifar_like", images[:train], labels[:train], images[train:], labels[train:],
                _seeded(lambda: models.cnn(in_channels=3, image_size=32, classes=classes, width=width)), description)


#: The tasks by name: ``TASKS[name](scale, seed) -> Task``.
TASKS = {"mnist1d": lambda scale, seed: mnist1d_task(scale), "cifar_like": cifar_like_task}


def task(name: str, scale: str = "cpu", seed: int = 0) -> Task:
    """The task ``name`` of :data:`TASKS` at ``scale`` (``"cpu"`` or ``"full"``); ``seed`` fixes generated data."""
    if name not in TASKS:
        raise InvalidProblem(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](scale, seed)


def _require_scale(scale: str) -> None:
    if scale not in SCALES:
        raise InvalidProblem(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")


__all__ = ["SCALES", "TASKS", "Task", "cifar_like_task", "mnist1d_task", "task"]
