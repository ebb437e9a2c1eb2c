"""Spectral quantities of curvature operators: eigenpairs, densities, traces, diagonals, summaries, overlaps."""

from curvlab.spectra.blocks import block_spectra
from curvlab.spectra.overlap import eigenspace_overlap
from curvlab.spectra.spectrum import Spectrum, spectrum
from curvlab.spectra.summary import SpectralSummary, spectral_summary
from curvlab.spectra.trace import DiagonalEstimate, TraceEstimate, diagonal, trace

__all__ = ["DiagonalEstimate", "SpectralSummary", "Spectrum", "TraceEstimate", "block_spectra", "diagonal",
           "eigenspace_overlap", "spectral_summary", "spectrum", "trace"]
