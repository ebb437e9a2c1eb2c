"""Built-in problems that need no files: small trained models with a held-out analysis batch.

The default problem is a multilayer perceptron trained on MNIST-1D (Greydanus 2020), a 1-D
analogue of MNIST: 40 numbers per example, 10 classes. The data are generated locally by the
``mnist1d`` package (never downloaded); the network is small enough (about 2.7k parameters) for
every exact curvature matrix to be materialised and diagonalised in seconds.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from curvlab.errors import InvalidProblem
from curvlab.problem import Problem

DEFAULT_TRAIN_STEPS = 2000


@dataclass(frozen=True)
class BuiltinProblem:
    """A ready-made :class:`~curvlab.Problem` and the facts a report states about it.

    Attributes:
        problem: the model (in eval mode) and its held-out analysis batch, cross-entropy loss.
        facts: human-readable description of data, model and training, e.g. ``{"model": ...}``.
    """

    problem: Problem
    facts: dict[str, str | int | float]


def mnist1d_arrays() -> dict[str, np.ndarray]:
    """The standard MNIST-1D split (4000 train, 1000 test examples of length 40), generated locally.

    ``mnist1d`` seeds numpy's and Python's global generators; their states are restored afterwards.
    """
    import mnist1d.data  # imports matplotlib.pyplot and requests: only when the data are needed

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {key: data[key] for key in ("x", "y", "x_test", "y_test")}


def mlp(widths: tuple[int, ...] = (40, 32, 32, 10)) -> nn.Sequential:
    """``Linear → tanh → … → Linear`` with the given layer widths (input first, classes last)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def default_problem(seed: int = 0, *, train_steps: int = DEFAULT_TRAIN_STEPS, hidden: int = 32,
                    batch_size: int = 128, lr: float = 3e-3, analysis_examples: int = 512,
                    dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                    progress: bool = False) -> BuiltinProblem:
    """An MLP ``40 → hidden → hidden → 10`` (tanh) trained with Adam on MNIST-1D.

    Training runs on the CPU in float64 with its own generators, so the result depends only on the
    arguments (the caller's random state is untouched); the trained model is then cast to ``dtype``
    and moved to ``device``. The analysis batch is the first ``analysis_examples`` examples of the
    held-out test split, which training never sees.

    Args:
        seed: seeds the initialisation and the order of the training mini-batches.
        train_steps: number of Adam steps on mini-batches of ``batch_size`` training examples.
        hidden: width of both hidden layers (32 gives 2698 parameters).
        analysis_examples: size of the held-out batch the curvature is measured on (at most 1000).
        dtype, device: of the returned problem.
        progress: show a progress bar over the training steps (stderr).

    Examples:
        >>> builtin = default_problem(seed=0, train_steps=10, hidden=8, analysis_examples=64)
        >>> builtin.problem.num_params, builtin.problem.num_examples
        (490, 64)
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidProblem("device 'cuda' was requested but torch sees no CUDA device; use device='cpu'")
    arrays = mnist1d_arrays()
    if not 0 < analysis_examples <= len(arrays["y_test"]):
        raise InvalidProblem(
            f"analysis_examples={analysis_examples} is outside 1..{len(arrays['y_test'])}, "
            f"the size of the MNIST-1D test split"
        )
    X_train = torch.from_numpy(arrays["x"]).to(torch.float64)
    y_train = torch.from_numpy(arrays["y"]).to(torch.int64)
    X_test = torch.from_numpy(arrays["x_test"][:analysis_examples]).to(torch.float64)
    y_test = torch.from_numpy(arrays["y_test"][:analysis_examples]).to(torch.int64)

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp((X_train.shape[1], hidden, hidden, 10)).to(torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the layers are tiny: one thread is fastest, and the same on every machine
    try:
        for _ in tqdm(range(train_steps), desc="training", disable=not progress, leave=False):
            index = torch.randint(len(y_train), (batch_size,), generator=generator)
            optimizer.zero_grad()
            loss_fn(model(X_train[index]), y_train[index]).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        train_accuracy = (model(X_train).argmax(1) == y_train).double().mean().item()
        test_accuracy = (model(X_test).argmax(1) == y_test).double().mean().item()

    model = model.to(device=device, dtype=dtype)
    problem = Problem(model, (X_test, y_test), loss="cross_entropy")
    facts = {
        "data": f"MNIST-1D generated locally by mnist1d (standard arguments): {len(y_train)} training, "
                f"{len(arrays['y_test'])} test examples of length {X_train.shape[1]}, 10 classes",
        "model": f"MLP {X_train.shape[1]}-{hidden}-{hidden}-10 with tanh, {problem.num_params} parameters",
        "training": f"{train_steps} Adam steps (lr {lr:g}, batch {batch_size}) in float64, seed {seed}",
        "analysis batch": f"the first {analysis_examples} held-out test examples",
        "train accuracy": round(train_accuracy, 4),
        "analysis-batch accuracy": round(test_accuracy, 4),
    }
    return BuiltinProblem(problem, facts)
