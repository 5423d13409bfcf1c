"""Rank controllers: choose the sketch rank from an error measurement.

A controller sees only numbers: ``propose(error, step)`` returns the rank to
use next. Where the error comes from (a sketch's a-posteriori estimate, a
measured weight-gradient error on an audit step, ...) is the caller's business;
``target`` is in the same units.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

from ._checks import check_float, check_int

__all__ = ["AbstractRankController", "FixedRank", "AdaptiveRank"]


class AbstractRankController(abc.ABC):
    """Decides the rank step by step.

    ``history`` is a list of events, one dict per rank change (or other notable
    decision) with keys ``step, error, old_rank, new_rank, reason``, meant for
    logging (e.g. the ``/sketch`` group of the HDF5 run file).
    """

    def __init__(self):
        self._history: list[dict] = []

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """The current rank."""

    @abc.abstractmethod
    def propose(self, error: float, step: int) -> int:
        """Take the error measured at ``step`` with the current rank; return the rank to use next."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Mutable state for checkpoints (plain Python values)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""

    @property
    def history(self) -> list[dict]:
        return self._history

    @property
    def saturated(self) -> bool:
        """True when the last proposal wanted a larger rank than the bounds allow.

        A caller may then fall back to exact storage for that layer.
        """
        return False

    @staticmethod
    def _check_step(error, step) -> tuple[float, int]:
        return (check_float("error", error, nonnegative=True, allow_inf=True),
                check_int("step", step, minimum=0))


class FixedRank(AbstractRankController):
    """Always the same rank (history stays empty)."""

    def __init__(self, rank: int):
        super().__init__()
        self._rank = check_int("rank", rank, minimum=1)

    @property
    def rank(self) -> int:
        return self._rank

    def propose(self, error: float, step: int) -> int:
        self._check_step(error, step)
        return self._rank

    def state_dict(self) -> dict:
        return {"rank": self._rank}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self._rank:
            raise ValueError(f"saved rank={state['rank']!r} differs from FixedRank({self._rank})")

    def __repr__(self) -> str:
        return f"FixedRank({self._rank})"


class AdaptiveRank(AbstractRankController):
    """Grow the rank when the error exceeds ``target``; shrink it, with hysteresis, when far below.

    * error > target: rank <- max(rank + 1, ceil(grow * rank)), capped by ``r_max``
      and the memory budget; if capped at the current rank, ``saturated`` is set
      and one "at_r_max"/"at_budget" event is recorded.
    * error < shrink_below * target for ``patience`` consecutive proposals:
      rank <- max(r_min, min(rank - 1, floor(shrink_factor * rank))).
    * otherwise the rank is held and the shrink count restarts.

    Args:
        target: error target (> 0), in the units of the errors passed to :meth:`propose`.
        rank: initial rank (default ``r_min``).
        r_min, r_max: bounds (``r_max=None``: unbounded; the caller usually passes min(rows, cols)).
        grow: multiplicative growth factor (> 1).
        shrink_below: shrink only when error < shrink_below * target (0 < shrink_below < 1).
        shrink_factor: multiplicative shrink factor (0 < shrink_factor < 1).
        patience: consecutive low-error proposals needed before shrinking (>= 1).
        budget_bytes: optional memory budget; needs ``bytes_per_rank``.
        bytes_per_rank: callable rank -> bytes (non-decreasing), used to respect the budget.
    """

    def __init__(self, target: float, *, rank: int | None = None, r_min: int = 1, r_max: int | None = None,
                 grow: float = 2.0, shrink_below: float = 0.25, shrink_factor: float = 0.5, patience: int = 3,
                 budget_bytes: int | None = None, bytes_per_rank: Callable[[int], int] | None = None):
        super().__init__()
        self._target = check_float("target", target, positive=True)
        self._r_min = check_int("r_min", r_min, minimum=1)
        self._r_max = None if r_max is None else check_int(
            "r_max", r_max, minimum=self._r_min, hint=f"need r_min={self._r_min} <= r_max")
        self._grow = check_float("grow", grow)
        if not self._grow > 1:
            raise ValueError(f"grow={self._grow} must be > 1 (multiplicative growth factor)")
        self._shrink_below = check_float("shrink_below", shrink_below, open_unit=True)
        self._shrink_factor = check_float("shrink_factor", shrink_factor, open_unit=True)
        self._patience = check_int("patience", patience, minimum=1)
        if bytes_per_rank is not None and not callable(bytes_per_rank):
            raise TypeError(f"bytes_per_rank must be a callable rank -> bytes, got {bytes_per_rank!r}")
        if budget_bytes is not None:
            budget_bytes = check_int("budget_bytes", budget_bytes, minimum=1)
            if bytes_per_rank is None:
                raise ValueError(f"budget_bytes={budget_bytes} needs bytes_per_rank (a callable rank -> bytes) "
                                 "to know what a rank costs")
            floor_bytes = self._bytes(bytes_per_rank, self._r_min)
            if floor_bytes > budget_bytes:
                raise ValueError(f"budget_bytes={budget_bytes} is below bytes_per_rank(r_min={self._r_min})="
                                 f"{floor_bytes}; raise the budget or lower r_min")
        self._budget = budget_bytes
        self._bytes_per_rank = bytes_per_rank
        max_hint = "" if self._r_max is None else f" <= r_max={self._r_max}"
        self._rank = self._r_min if rank is None else check_int(
            "rank", rank, minimum=self._r_min, maximum=self._r_max,
            hint=f"the initial rank must satisfy r_min={self._r_min} <= rank{max_hint}")
        if not self._fits(self._rank):
            raise ValueError(f"initial rank={self._rank} costs {self._bytes(bytes_per_rank, self._rank)} bytes, "
                             f"over budget_bytes={self._budget}; pass a smaller rank")
        self._calm = 0          # consecutive proposals with error < shrink_below * target
        self._saturated = False

    @staticmethod
    def _bytes(fn, rank: int) -> int:
        value = fn(rank)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"bytes_per_rank({rank}) returned {value!r}; it must return a number of bytes >= 0")
        return value

    def _fits(self, rank: int) -> bool:
        return self._budget is None or self._bytes(self._bytes_per_rank, rank) <= self._budget

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def target(self) -> float:
        return self._target

    @property
    def r_min(self) -> int:
        return self._r_min

    @property
    def r_max(self) -> int | None:
        return self._r_max

    @property
    def saturated(self) -> bool:
        return self._saturated

    def __repr__(self) -> str:
        return (f"AdaptiveRank(target={self._target}, rank={self._rank}, r_min={self._r_min}, "
                f"r_max={self._r_max}, budget_bytes={self._budget})")

    def propose(self, error: float, step: int) -> int:
        error, step = self._check_step(error, step)
        old = self._rank
        new, reason = old, None
        if error > self._target:
            self._calm = 0
            new = max(old + 1, math.ceil(self._grow * old))
            if self._r_max is not None and new > self._r_max:
                new, reason = self._r_max, "at_r_max"
            while new > old and not self._fits(new):
                new, reason = new - 1, "at_budget"
            if new > old:
                reason = "grow" if reason is None else f"grow ({reason})"
                self._saturated = False
            else:
                # Record only the onset of saturation, not every step spent there.
                reason = None if self._saturated else (reason or "at_r_max")
                self._saturated = True
        elif error < self._shrink_below * self._target:
            self._saturated = False
            self._calm += 1
            if self._calm >= self._patience and old > self._r_min:
                new = max(self._r_min, min(old - 1, math.floor(self._shrink_factor * old)))
                reason, self._calm = "shrink", 0
        else:
            self._saturated = False
            self._calm = 0
        if reason is not None:
            self._history.append({"step": step, "error": error, "old_rank": old, "new_rank": new,
                                  "reason": reason})
        self._rank = new
        return new

    def state_dict(self) -> dict:
        """What :meth:`propose` depends on beyond the constructor arguments (for exact resume)."""
        return {"rank": self._rank, "calm": self._calm, "saturated": self._saturated,
                "history": [dict(h) for h in self._history]}

    def load_state_dict(self, state: dict) -> None:
        rank = check_int("rank", state["rank"], minimum=self._r_min, maximum=self._r_max,
                         hint="the saved rank must respect this controller's bounds")
        self._rank, self._calm = rank, check_int("calm", state["calm"], minimum=0)
        self._saturated = bool(state["saturated"])
        self._history[:] = [dict(h) for h in state["history"]]

    def set_rank(self, rank: int, *, step: int, reason: str = "external") -> int:
        """Force the rank (e.g. after a fallback decided elsewhere); bounds and budget still apply."""
        step = check_int("step", step, minimum=0)
        rank = check_int("rank", rank, minimum=self._r_min, maximum=self._r_max,
                         hint="set_rank must respect r_min/r_max")
        if not self._fits(rank):
            raise ValueError(f"rank={rank} exceeds budget_bytes={self._budget}")
        if rank != self._rank:
            self._history.append({"step": step, "error": math.nan, "old_rank": self._rank,
                                  "new_rank": rank, "reason": reason})
        self._rank, self._calm, self._saturated = rank, 0, False
        return rank
