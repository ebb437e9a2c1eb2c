"""Spectral quantities of curvature operators: eigenpairs, traces and diagonals."""

from curvlab.spectra.spectrum import Spectrum, spectrum
from curvlab.spectra.trace import DiagonalEstimate, TraceEstimate, diagonal, trace

__all__ = ["DiagonalEstimate", "Spectrum", "TraceEstimate", "diagonal", "spectrum", "trace"]
