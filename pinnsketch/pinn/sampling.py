"""Collocation points of one run: sampling, resampling, residual-based refinement.

`CollocationPoints` owns the float64 numpy point sets of a solve (interior
points, refinement anchors, the boundary and initial pools, and each
condition's selection), so a run's points can be saved and restored exactly.
All randomness comes from the run's torch.Generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .conditions import Condition, ConditionPoints, PointPool
from .options import RAR, Points
from .problem import Layout

__all__ = ["CollocationPoints", "refine_points"]


class CollocationPoints:
    """The point sets of a run.

    Attributes (numpy float64):
        domain: (n, d) interior points for the residual, refinement anchors last.
        anchors: (m, d) points added by refinement (kept across resampling).
        conditions: one ConditionPoints per condition.
    """

    def __init__(self, layout: Layout, conditions: Sequence[Condition], options: Points, generator: torch.Generator):
        self.layout, self.conditions, self.options, self.generator = layout, list(conditions), options, generator
        needs = {c.needs() for c in self.conditions}
        self._need_boundary = "boundary" in needs
        # without a time axis the initial conditions report the problem themselves
        self._need_initial = "initial" in needs and layout.time_axis is not None
        for pool, count in (("boundary", options.boundary), ("initial", options.initial)):
            if pool in needs and count == 0:
                users = [type(c).__name__ for c in self.conditions if c.needs() == pool]
                raise ValueError(
                    f"{', '.join(users)} need {pool} points but Points({pool}=0); pass {pool} > 0"
                )
        self.anchors = np.zeros((0, layout.dim))
        self._base = np.zeros((0, layout.dim))
        self.pool = PointPool(None, None)
        self.conditions_points: list[ConditionPoints] = []
        self.version = 0  # bumped whenever any set changes (consumers rebuild their tensors)

    @property
    def domain(self) -> np.ndarray:
        return np.concatenate([self._base, self.anchors]) if len(self.anchors) else self._base

    def sample(self, sampler: str | None = None) -> None:
        """Draw every set afresh (`sampler` overrides the configured one)."""
        sampler = sampler or self.options.sampler
        geom, gen, opt = self.layout.domain, self.generator, self.options
        self._base = geom.sample_domain(opt.domain, sampler, gen)
        boundary = geom.sample_boundary(opt.boundary, sampler, gen) if self._need_boundary else None
        initial = geom.sample_initial(opt.initial, sampler, gen) if self._need_initial else None
        self.pool = PointPool(boundary, initial)
        self.conditions_points = [c.points(self.pool, self.layout) for c in self.conditions]
        self.version += 1

    def resample(self) -> None:
        """Fresh pseudo-random sets (a quasi-random sequence would repeat itself); anchors stay."""
        self.sample("random" if self.options.sampler in ("hammersley", "sobol", "halton", "uniform") else None)

    def add_anchors(self, x: np.ndarray) -> None:
        self.anchors = np.concatenate([self.anchors, np.asarray(x, dtype=np.float64)])
        self.version += 1

    # --- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "base": self._base.copy(),
            "anchors": self.anchors.copy(),
            "boundary": None if self.pool.boundary is None else self.pool.boundary.copy(),
            "initial": None if self.pool.initial is None else self.pool.initial.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._base = np.asarray(state["base"], dtype=np.float64).copy()
        self.anchors = np.asarray(state["anchors"], dtype=np.float64).copy()
        b, i = state["boundary"], state["initial"]
        self.pool = PointPool(None if b is None else np.array(b, dtype=np.float64),
                              None if i is None else np.array(i, dtype=np.float64))
        self.conditions_points = [c.points(self.pool, self.layout) for c in self.conditions]
        self.version += 1


def refine_points(points: CollocationPoints, rar: RAR, residual: Callable[[np.ndarray], np.ndarray]) -> int:
    """One RAR round: add the `rar.add` candidates with the largest residual; returns how many."""
    room = rar.max_points - len(points.anchors)
    if room <= 0:
        return 0
    candidates = points.layout.domain.sample_domain(rar.candidates, "random", points.generator)
    scores = residual(candidates)
    k = min(rar.add, room, len(candidates))
    worst = np.argpartition(-scores, k - 1)[:k]
    points.add_anchors(candidates[np.sort(worst)])
    return k
