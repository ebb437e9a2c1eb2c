"""curvlab: exact curvature of PyTorch models, its approximations, and the steps optimizers take with them."""

from importlib.metadata import PackageNotFoundError, version

from curvlab.compare import Comparison, compare
from curvlab.errors import CurvlabError, DenseTooLarge, InvalidProblem
from curvlab.operators import KINDS, curvature
from curvlab.problem import Problem
from curvlab.spectra import DiagonalEstimate, Spectrum, TraceEstimate, spectrum, trace

try:
    __version__ = version("curvlab")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

__all__ = ["KINDS", "Comparison", "CurvlabError", "DenseTooLarge", "DiagonalEstimate", "InvalidProblem", "Problem",
           "Spectrum", "TraceEstimate", "compare", "curvature", "spectrum", "trace", "__version__"]
