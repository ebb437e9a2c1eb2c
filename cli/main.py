"""``curvlab``: parse the command line, run the library, write the report, map errors to exit codes.

Exit status: 0 on success; 2 when curvlab refuses the request (invalid input, a report directory
that would be overwritten) or click rejects the arguments; 1 when the report cannot be written
(an operating-system error); 130 when interrupted, in which case no report is written.
"""

import sys
from pathlib import Path

import click

DTYPES = ("float32", "float64")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="curvlab", prog_name="curvlab")
def cli() -> None:
    """Exact curvature matrices (Hessian, GGN, Fisher, ...) of PyTorch models.

    \b
    Example: compare the curvature matrices of the built-in MNIST-1D model
      $ curvlab compare --out reports/default --force
      reports/default/index.html
    """


@cli.command(epilog="Exit status: 0 success, 2 invalid request, 1 I/O failure, 130 interrupted.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/default"),
              show_default=True, help="Directory of the report (index.html and results.json).")
@click.option("--force", is_flag=True,
              help="Replace a previous report in --out (a directory with other files is never replaced).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the training of the model and the labels of the Monte-Carlo Fisher.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the analysis (training always runs on the CPU).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float64", show_default=True,
              help="Floating-point type of the analysis; eigenvalues are always computed in float64.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(out: Path, force: bool, seed: int, device: str, dtype: str, quiet: bool) -> None:
    """Compare every exact curvature matrix of the built-in model.

    The built-in model is a small MLP (40-32-32-10, 2698 parameters) trained for a few seconds on
    MNIST-1D, which is generated locally. For each of the Hessian, |Hessian|, GGN, Monte-Carlo
    Fisher and empirical Fisher on 512 held-out examples, the report gives the trace, the extreme
    eigenvalues, the number of negative ones and the time taken, and plots every eigenvalue.

    \b
    Example:
      $ curvlab compare --out reports/seed1 --seed 1
      reports/seed1/index.html
    """
    # Imported here so that --help and --version answer without loading torch.
    import torch

    from curvlab.compare import compare as run_compare
    from curvlab.errors import CurvlabError
    from curvlab.report import check_target
    from curvlab.zoo import default_problem

    try:
        check_target(out, force)
        builtin = default_problem(seed, dtype=getattr(torch, dtype), device=device, progress=not quiet)
        result = run_compare(builtin.problem, seed=seed, context=builtin.facts, progress=not quiet)
        index = result.to_html(out, force=force)
    except CurvlabError as err:
        fail(err, 2)
    except OSError as err:
        fail(err, 1)
    except KeyboardInterrupt:
        click.echo("Interrupted: no report was written.", err=True)
        sys.exit(130)
    click.echo(str(index))


def fail(err: Exception, status: int) -> None:
    """Print ``Error: <message>`` on one line to stderr and exit with ``status``."""
    message = " ".join(str(err).split()) or type(err).__name__
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def main() -> None:
    """The console script ``curvlab``."""
    cli(prog_name="curvlab")
