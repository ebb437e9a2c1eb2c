"""curvlab: exact curvature of PyTorch models, its approximations, and the steps optimizers take with them."""

from importlib.metadata import PackageNotFoundError, version

from curvlab.approx import APPROXIMATIONS, Approximation, approximate
from curvlab import optim
from curvlab.compare import Comparison, compare
from curvlab.convergence import ConvergenceStudy, convergence_study
from curvlab.cost import CostStudy, cost_study
from curvlab.errors import CurvlabError, DenseTooLarge, InvalidProblem
from curvlab.io import load, save
from curvlab.metrics import approximation_error
from curvlab.operators import KINDS, curvature
from curvlab.problem import Problem
from curvlab.steps import CapturedStep, capture_step, compare_steps
from curvlab.spectra import (DiagonalEstimate, SpectralSummary, Spectrum, TraceEstimate, block_spectra,
                             eigenspace_overlap, spectral_summary, spectrum, trace)

try:
    __version__ = version("curvlab")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

__all__ = ["APPROXIMATIONS", "KINDS", "Approximation", "CapturedStep", "Comparison", "ConvergenceStudy", "CostStudy",
           "CurvlabError", "DenseTooLarge", "DiagonalEstimate", "InvalidProblem", "Problem", "SpectralSummary",
           "Spectrum", "TraceEstimate", "approximate", "approximation_error", "block_spectra", "capture_step", "compare",
           "compare_steps", "convergence_study", "cost_study", "curvature", "eigenspace_overlap", "load", "optim",
           "save", "spectral_summary", "spectrum", "trace", "__version__"]
