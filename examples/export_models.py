"""Export three models of your own and let ``curvlab compare`` study each: an MLP, a small CNN, a transformer.

Run from the repository root::

    python examples/export_models.py                 # models and reports under examples/output/
    python examples/export_models.py --out /tmp/x    # elsewhere

Each model is trained for a moment on a synthetic task and written in a form that curvlab loads
without running code from the file:

- the MLP and the CNN with ``curvlab.save``: one file holding the exported program (``torch.export``
  with a dynamic batch dimension), example data and the loss, so ``curvlab compare mlp.pt`` needs
  nothing else;
- the transformer encoder with plain ``torch.export.save`` and its data in a separate ``.pt`` file,
  as one would for a model exported elsewhere: ``curvlab compare transformer.pt2 --data ...``.

Then ``curvlab compare`` writes a report for each (``index.html``, ``results.json``, one CSV per table).
Export in eval mode (``model.eval()``) and give the batch dimension as dynamic: curvlab calls the model
on single examples for per-example gradients, and refuses a program with a fixed batch size.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import curvlab


class Encoder(nn.Module):
    """Token embedding, one transformer encoder layer, mean pooling over positions, a linear classifier."""

    def __init__(self, vocab: int = 12, dim: int = 12, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def tasks(generator: torch.Generator) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Model, inputs and labels of each task: labels that the inputs determine, so that training helps."""
    x = torch.randn(512, 20, generator=generator)
    mlp = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    images = torch.randn(512, 1, 12, 12, generator=generator)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    tokens = torch.randint(0, 12, (512, 6), generator=generator)
    return {
        "mlp": (mlp, x, (x[:, :4].argmax(1))),
        "cnn": (cnn, images, (images[:, 0, :6].mean((1, 2)) > 0).long() + (images[:, 0, 6:].mean((1, 2)) > 0).long()),
        "transformer": (Encoder(), tokens, (tokens[:, 0] + tokens[:, -1]) % 4),
    }


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    """A few Adam steps on mini-batches of 64, then eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = torch.randint(len(y), (64,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/output"), help="folder for models and reports")
    parser.add_argument("--examples", type=int, default=128, help="examples stored with each model for the analysis")
    args = parser.parse_args()
    models = args.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    commands = []
    for name, (model, X, y) in tasks(torch.Generator().manual_seed(0)).items():
        model = train(model, X, y)
        X, y = X[:args.examples], y[:args.examples]
        if name == "transformer":
            program = torch.export.export(model, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, models / "transformer.pt2")
            torch.save({"inputs": X, "targets": y}, models / "transformer-data.pt")
            commands.append([models / "transformer.pt2", "--data", models / "transformer-data.pt"])
        else:
            curvlab.save(models / f"{name}.pt", model, data=(X, y), loss="cross_entropy")
            commands.append([models / f"{name}.pt"])
    curvlab_script = Path(sys.executable).with_name("curvlab")
    for arguments in commands:
        report = args.out / "reports" / arguments[0].stem
        subprocess.run([curvlab_script, "compare", *map(str, arguments), "--out", str(report), "--force"], check=True)


if __name__ == "__main__":
    main()
