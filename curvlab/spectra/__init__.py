"""Spectral quantities of curvature operators: traces and diagonals."""

from curvlab.spectra.trace import DiagonalEstimate, TraceEstimate, diagonal, trace

__all__ = ["DiagonalEstimate", "TraceEstimate", "diagonal", "trace"]
