"""Exceptions raised by the PINN layer (subclasses of built-ins, so `except ValueError` works)."""

from __future__ import annotations

__all__ = ["ProblemDefinitionError", "DerivativeNameError", "TrainingDivergedError"]


class ProblemDefinitionError(ValueError):
    """A Problem subclass is inconsistent: residual shape, conditions, reference data, domain."""


class DerivativeNameError(AttributeError, ValueError):
    """A residual or condition asked a field for a derivative the problem cannot provide."""


class TrainingDivergedError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped before updating on it."""
