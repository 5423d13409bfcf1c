"""pinnsketch.monitor: exact per-layer gradient norms and a sketched gradient history."""

from .monitor import METHODS, SOURCES, Estimate, GradientMonitor, Subspace
from .trajectory import IncrementalSVD, TrajectorySketch

__all__ = ["GradientMonitor", "Estimate", "Subspace", "METHODS", "SOURCES", "TrajectorySketch", "IncrementalSVD"]
