"""Exceptions curvlab raises on bad input or on requests it cannot honour."""


class CurvlabError(Exception):
    """Base class of every error curvlab raises on purpose; its message names the problem and the fix."""


class InvalidProblem(CurvlabError, ValueError):
    """The model, data, loss, parameter selection or requested kind cannot be analysed as given."""


class DenseTooLarge(CurvlabError, MemoryError):
    """A dense (P, P) matrix would exceed the memory budget; use the matrix-free product instead."""
