"""Exceptions curvlab raises on bad input or on requests it cannot honour, and the common argument checks."""

import math
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


def require_number(name: str, value, minimum: float = 0.0, strict: bool = True, maximum: float = math.inf,
                   hint: str = "") -> float:
    """``value`` as a float if it is a real number above ``minimum`` (or equal, unless ``strict``) and below
    ``maximum``, else :class:`InvalidProblem`; nan and infinities never pass."""
    if (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value < maximum
            and (value > minimum if strict else value >= minimum)):
        return float(value)
    if maximum < math.inf:
        bounds = f"a number in {'(' if strict else '['}{minimum:g}, {maximum:g})"
    elif minimum == -math.inf:
        bounds = "a finite number"
    elif minimum == 0:
        bounds = "a positive number" if strict else "a finite number ≥ 0"
    else:
        bounds = f"a finite number {'>' if strict else '≥'} {minimum:g}"
    raise InvalidProblem(f"{name} must be {bounds}{hint}, got {value!r}")
