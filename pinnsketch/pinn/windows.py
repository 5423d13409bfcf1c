"""Time-window marching for time-dependent problems (sequence-to-sequence training).

    ps.solve(problem, windows=ps.TimeWindows(4))

[t0, t1] is split into K equal windows [t_k, t_{k+1}], trained one after another
(Krishnapriyan et al. 2021, "Characterizing possible failure modes in PINNs",
arXiv 2109.01050; Wight & Zhao 2020, arXiv 2007.04542; the time windows of Wang,
Wang & Perdikaris, "An expert's guide to training PINNs", arXiv 2308.08468):

* window k trains its own network on space x [t_k, t_{k+1}] with the problem's
  residual and boundary conditions, starting from window k-1's trained weights;
* its initial condition at t_k comes from window k-1: each of the problem's
  `Initial` / `InitialVelocity` conditions is imposed at t_k with the value (or
  time derivative) of window k-1's solution there, output transform applied and
  detached (`continuation_conditions`). A problem whose initial condition is a
  hard constraint in `output_transform` (no `Initial` condition) gets one
  `Initial` term per output at t_k (and an `InitialVelocity` term when its
  residual reads a second time derivative); its transform still applies to every
  window, so its boundary values stay exact;
* the solution is a `TimeWindowNetwork`: the K networks, each point answered by
  the window of its time, so prediction, evaluation and run files see one
  module mapping (N, d) points to (N, n_out).

Each window runs the configured Adam and L-BFGS budgets and `Points` counts (the
budgets are per window: K windows train K times the steps of one run).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..nn.jet import JetSpec
from .conditions import Condition, Initial, InitialVelocity, PointData
from .derivatives import DerivativeProvider, fields_of
from .geometry import SpaceTime, TimeDomain
from .problem import Layout, Problem

__all__ = ["TimeWindows", "TimeWindowNetwork", "window_bounds", "window_problem", "continuation_conditions"]


@dataclass(frozen=True)
class TimeWindows:
    """Train `windows` equal time windows one after another (time-window marching).

    Each window runs the full `adam` and `lbfgs` budgets and the `points` counts of the
    solve; window k starts from window k-1's weights and takes its initial values at
    t_k from window k-1's solution (module docstring).
    """

    windows: int = 4

    def __post_init__(self):
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 2:
            raise ValueError(f"TimeWindows windows={self.windows!r} must be an int >= 2 (windows=None trains one "
                             "network on the whole interval)")

    def config(self) -> dict:
        return {"name": "time_windows", **asdict(self)}


def window_bounds(t0: float, t1: float, windows: int) -> list[float]:
    """The K + 1 window boundaries t_0 < t_1 < ... < t_K of [t0, t1] (equal windows, float64)."""
    bounds = [t0 + (t1 - t0) * k / windows for k in range(windows + 1)]
    bounds[-1] = t1
    return bounds


class TimeWindowNetwork(torch.nn.Module):
    """K trained networks, one per time window: point x is answered by the window of its time.

    Args:
        members: K networks mapping (N, d) to (N, n_out); or None to build them from `member`.
        bounds: the K + 1 window boundaries t_0 < ... < t_K.
        time_axis: column of t in x.
        member: {"class": "module.Class", "init_kwargs": {...}}: how to build each member
            (what a run file records; `pinnsketch.io` rebuilds the module from `init_kwargs`).

    Window k covers [t_k, t_{k+1}) (the last window also t_K; times outside [t_0, t_K] go to
    the nearest window). Only windows 0..`active` are trained: during training a point of a
    later window is answered by window `active` (extrapolation); after training active = K - 1.
    """

    def __init__(self, members: Sequence[torch.nn.Module] | None = None, *, bounds: Sequence[float],
                 time_axis: int, member: dict | None = None):
        super().__init__()
        bounds = [float(b) for b in bounds]
        if len(bounds) < 3 or any(b >= c for b, c in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"bounds={bounds} must be at least 3 increasing times (2 windows or more)")
        if members is None:
            if not isinstance(member, dict) or not isinstance(member.get("init_kwargs"), dict):
                raise ValueError("TimeWindowNetwork needs members= or member={'class': ..., 'init_kwargs': {...}}")
            module_name, _, name = member["class"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), name)
            members = [cls(**member["init_kwargs"]) for _ in bounds[1:]]
        if len(members) != len(bounds) - 1:
            raise ValueError(f"{len(members)} networks for {len(bounds) - 1} windows (bounds={bounds}); pass one "
                             "network per window")
        self.members = torch.nn.ModuleList(members)
        self.bounds, self.time_axis = bounds, int(time_axis)
        self.register_buffer("active", torch.tensor(len(members) - 1))
        own = getattr(members[0], "init_kwargs", None)
        cls = type(members[0])
        self._member = member or ({"class": f"{cls.__module__}.{cls.__qualname__}", "init_kwargs": dict(own)}
                                  if isinstance(own, dict) else None)

    @property
    def windows(self) -> int:
        return len(self.members)

    @property
    def init_kwargs(self) -> dict | None:
        """Constructor keyword arguments (None when the members cannot be rebuilt from theirs)."""
        if self._member is None:
            return None
        return {"bounds": list(self.bounds), "time_axis": self.time_axis, "member": self._member}

    def window_of(self, x: torch.Tensor) -> torch.Tensor:
        """Window of each point of x (N, d), (N,) int64 in [0, K)."""
        t = x[:, self.time_axis].contiguous()
        inner = torch.tensor(self.bounds[1:-1], dtype=t.dtype, device=t.device)
        return torch.bucketize(t, inner, right=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (N, n_out) at x (N, d): each point through the network of its window."""
        index = self.window_of(x).clamp(max=int(self.active))
        parts = [(rows, self.members[k](x[rows])) for k in range(self.windows)
                 if len(rows := (index == k).nonzero()[:, 0])]
        if not parts:
            return self.members[0](x)
        out = parts[0][1].new_empty((len(x), parts[0][1].shape[1]))
        for rows, u in parts:
            out = out.index_copy(0, rows, u)
        return out

    # the storage of the network being trained (what run files and reports describe)
    def storage_report(self) -> list[dict]:
        report = getattr(self.members[int(self.active)], "storage_report", None)
        return report() if callable(report) else []

    @property
    def storages(self):
        return getattr(self.members[int(self.active)], "storages", None)


def window_problem(problem: Problem, layout: Layout, t0: float, t1: float, conditions: Sequence[Condition]) -> Problem:
    """A copy of `problem` on space x [t0, t1] with the given conditions (the residual, transform
    and references are the problem's own)."""
    domain = layout.domain
    time = TimeDomain(t0, t1)
    window = copy.copy(problem)
    window.domain = SpaceTime(domain.space, time) if isinstance(domain, SpaceTime) else time
    window.conditions = list(conditions)
    return window


class _Targets:
    """The value of `what(x)` at the last points it was called with: condition targets computed
    once per point set (the previous window's network is fixed during a window)."""

    def __init__(self, what: Callable[[torch.Tensor], torch.Tensor]):
        self.what, self._x, self._u = what, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is None or self._x.shape != x.shape or not torch.equal(self._x, x):
            self._x, self._u = x.detach().clone(), self.what(x).detach()
        return self._u


def continuation_conditions(problem: Problem, layout: Layout, residual_spec: JetSpec, previous: torch.nn.Module,
                            provider: DerivativeProvider) -> list[Condition]:
    """The conditions of a window k > 0: the problem's own, with every `Initial` / `InitialVelocity`
    value replaced by what window k-1's network `previous` gives at the window's initial points
    (output transform applied, detached); for a problem without such conditions (a hard initial
    condition in its output transform) one `Initial` per output, and one `InitialVelocity` per output
    when the residual reads a second time derivative."""
    own = list(problem.conditions)
    initial = [c for c in own if isinstance(c, Initial)]
    if not initial:
        axis = layout.time_axis
        second = any(mi.count(axis) >= 2 for mi in residual_spec.indices)
        initial = [Initial(0.0, field=name) for name in layout.output_names]
        initial += [InitialVelocity(0.0, field=name) for name in layout.output_names] if second else []
        own += initial
    transform = getattr(problem, "output_transform", None)

    def continued(cond: Condition) -> Condition:
        column = layout.field_index(cond.field, type(cond).__name__)
        spec = JetSpec(layout.dim, cond.derivatives(layout))
        measured = copy.copy(cond)
        measured.value = 0.0      # its residual is then the quantity it constrains (u, or u_t)

        def target(x: torch.Tensor) -> torch.Tensor:
            # jets need no autograd graph; nested autograd does
            with torch.no_grad() if provider.name == "jet" else torch.enable_grad():
                jet = provider(previous, x, spec, transform)
                u = fields_of(jet, layout.input_names, layout.output_names, "the previous window")[column]
                return measured.residual(x, u, {}, layout)

        out = copy.copy(cond)
        out.value, out.name = _Targets(target), cond.term_name(layout)
        return out

    return [continued(c) if isinstance(c, Initial) else c for c in own]


def check_windows(problem: Problem, layout: Layout, option: TimeWindows) -> None:
    """Refuse problems marching cannot train: no time axis, trainable coefficients, observations."""
    kind = type(problem).__name__
    if layout.time_axis is None:
        raise ValueError(f"windows={option!r} needs a time-dependent problem; {kind}'s domain {layout.domain!r} has "
                         "no time (use space * ps.geometry.TimeDomain(t0, t1)) or pass windows=None")
    if type(problem).parameters():
        raise ValueError(f"windows={option!r} cannot train {kind}'s ps.Parameter coefficients "
                         f"{sorted(type(problem).parameters())}: each window would fit its own value; solve the "
                         "inverse problem without windows")
    if any(isinstance(c, PointData) for c in problem.conditions):
        raise ValueError(f"windows={option!r} does not split {kind}'s PointData observations over the windows; "
                         "solve it without windows")


def window_errors(network: TimeWindowNetwork, x: np.ndarray, prediction: np.ndarray, reference: np.ndarray,
                  window: int) -> float | None:
    """Relative L2 error of `prediction` (M, n_out) against `reference` on the points x (M, d) of `window`."""
    index = network.window_of(torch.as_tensor(x, dtype=torch.float64)).numpy()
    rows = index == window
    norm = np.linalg.norm(reference[rows])
    return float(np.linalg.norm(prediction[rows] - reference[rows]) / norm) if rows.any() and norm > 0 else None
