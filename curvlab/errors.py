"""Exceptions curvlab raises on bad input or on requests it cannot honour, and the common argument check."""

import numbers


class CurvlabError(Exception):
    """Base class of every error curvlab raises on purpose; its message names the problem and the fix."""


class InvalidProblem(CurvlabError, ValueError):
    """The model, data, loss, parameter selection or requested kind cannot be analysed as given."""


class DenseTooLarge(CurvlabError, MemoryError):
    """A dense (P, P) matrix would exceed the memory budget; use the matrix-free product instead."""


def require_integer(name: str, value, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an int if it is an integer in ``[minimum, maximum]``, else :class:`InvalidProblem`."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and minimum <= value <= (maximum or value):
        return int(value)
    if maximum is not None:
        bounds = f"an integer from {minimum} to {maximum}"
    else:
        bounds = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
    raise InvalidProblem(f"{name} must be {bounds}{hint}, got {value!r}")
