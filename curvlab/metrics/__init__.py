"""How close an approximation is to the exact curvature, and how optimizers' steps agree with exact ones."""

from curvlab.metrics.approximation_error import approximation_error

__all__ = ["approximation_error"]
