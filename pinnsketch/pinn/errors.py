"""Exceptions raised by the PINN layer (subclasses of built-ins, so `except ValueError` works)."""

from __future__ import annotations

from ..training import TrainingDivergedError

__all__ = ["ProblemDefinitionError", "DerivativeNameError", "TrainingDivergedError"]


class ProblemDefinitionError(ValueError):
    """A Problem subclass is inconsistent: residual shape, conditions, reference data, domain."""


class DerivativeNameError(AttributeError, ValueError):
    """A residual or condition asked a field for a derivative the problem cannot provide."""
