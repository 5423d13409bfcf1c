"""Training callbacks and the `TrainingState` they see (shared by every training loop).

    class Print(ps.Callback):
        def on_step(self, state):
            if state.step % 100 == 0:
                print(state.step, state.phase, state.loss)

    ps.solve(problem, callbacks=[Print(), ps.EarlyStopping(patience=2000)])

`TrainingState.state_dict()` captures everything needed to continue a run
(model, trainable problem parameters, optimizer, RNG, collocation points,
histories, callback states); `solve(..., resume=state_dict)` continues it and,
on CPU with a fixed seed, ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Callback", "TrainingState", "EarlyStopping", "ProgressBar", "STATE_FORMAT"]

STATE_FORMAT = "pinnsketch.TrainingState/1"


class Callback:
    """Hooks called by the training loop; all are no-ops by default.

    A callback with `state_dict()` / `load_state_dict(d)` methods has its state
    saved in, and restored from, the run's TrainingState.state_dict().
    """

    def on_start(self, state: TrainingState) -> None:
        """Before the first step (also when resuming)."""

    def on_step(self, state: TrainingState) -> None:
        """After each optimizer step; gradients are still in p.grad."""

    def on_end(self, state: TrainingState, result) -> None:
        """After training, with the Result."""

    def on_failure(self, state: TrainingState, error: BaseException) -> None:
        """When training raises (divergence, Ctrl-C, any error), before the error propagates."""


@dataclass
class TrainingState:
    """What callbacks see, updated in place after every step.

    Fields: problem (None for classifiers), model, optimizer, step (steps done,
    global over phases), phase ("adam" | "lbfgs" in the PINN solver, "train" in
    `train_classifier`), losses (term -> float, at the start of the step), loss
    (weighted total), lr, wall_time_s, saved_bytes_peak (int | None),
    step_peak_bytes (int | None: the peak of all live tensor bytes of a metered
    step's first loss evaluation above its start, `MemoryMeter(step_peak=True)`), l2_relative_error (set
    on evaluation steps, else None), config (JSON-able), storage_report (list of dicts;
    the PINN solver refreshes it on metered and evaluation steps only, as reading it costs a
    host wait on a GPU: call `state.model.storage_report()` for the current one).
    Extra: max_steps, phase_start, history, parameters, generator, points,
    callbacks, and the flags `stop_phase` / `stop_training` a callback may set.
    """

    problem: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    phase: str = "adam"
    losses: dict[str, float] = field(default_factory=dict)
    loss: float = math.nan
    lr: float = math.nan
    wall_time_s: float = 0.0
    saved_bytes_peak: int | None = None
    step_peak_bytes: int | None = None
    l2_relative_error: float | None = None
    config: dict = field(default_factory=dict)
    storage_report: list = field(default_factory=list)
    max_steps: int = 0
    phase_start: int = 0
    history: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    points: Any = None
    callbacks: list = field(default_factory=list)
    stop_phase: bool = False
    stop_training: bool = False
    pending_optimizer_state: dict | None = field(default=None, repr=False)

    def state_dict(self) -> dict:
        """A deep copy of everything needed to resume this run."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "phase": self.phase,
            "phase_start": self.phase_start,
            # deepcopy: model state may hold non-tensor entries (storage policies' extra state)
            "model": copy.deepcopy(self.model.state_dict()),
            "parameters": {k: v.detach().clone() for k, v in self.parameters.items()},
            "optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict()),
            "generator": None if self.generator is None else self.generator.get_state(),
            "points": None if self.points is None else self.points.state_dict(),
            "history": copy.deepcopy(self.history),
            "wall_time_s": self.wall_time_s,
            "saved_bytes_peak": self.saved_bytes_peak,
            "step_peak_bytes": self.step_peak_bytes,
            "config": copy.deepcopy(self.config),
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the optimizer state is applied when its phase starts."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"resume= expects a TrainingState.state_dict() (format {STATE_FORMAT!r}), got "
                f"{type(state).__name__} with format {state.get('format') if isinstance(state, dict) else None!r}"
            )
        if state["phase"] not in ("adam", "lbfgs"):
            raise ValueError(f"resume state has unknown phase {state['phase']!r}")
        saved = state.get("config", {}).get("problem")
        mine = self.config.get("problem")
        if saved is not None and mine is not None and saved != mine:
            raise ValueError(f"resume state is from problem {saved!r}, not {mine!r}")
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for name, value in state["parameters"].items():
                self.parameters[name].copy_(value)
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        if self.points is not None and state["points"] is not None:
            self.points.load_state_dict(state["points"])
        self.step, self.phase, self.phase_start = state["step"], state["phase"], state["phase_start"]
        self.history = copy.deepcopy(state["history"])
        self.wall_time_s = state["wall_time_s"]
        self.saved_bytes_peak = state["saved_bytes_peak"]
        self.step_peak_bytes = state.get("step_peak_bytes")
        self.pending_optimizer_state = copy.deepcopy(state["optimizer"])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)


class EarlyStopping(Callback):
    """End the current phase when `monitor` stops improving; end the run at `target`.

    Args:
        patience: steps without a relative improvement of at least `min_delta`
            before the phase (Adam, then L-BFGS) ends.
        min_delta: relative improvement that counts (0.0: any decrease).
        monitor: "loss" (weighted total) or a term name.
        target: stop the whole run once the monitored value is <= target.
    """

    def __init__(self, patience: int = 2_000, min_delta: float = 0.0, monitor: str = "loss", target: float | None = None):
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping patience={patience!r} must be a positive int")
        if not 0 <= min_delta < 1:
            raise ValueError(f"EarlyStopping min_delta={min_delta!r} must be in [0, 1) (a relative improvement)")
        self.patience, self.min_delta, self.monitor, self.target = patience, min_delta, monitor, target
        self.best, self.best_step, self.phase = math.inf, 0, None

    def _value(self, state: TrainingState) -> float:
        if self.monitor == "loss":
            return state.loss
        if self.monitor not in state.losses:
            raise ValueError(f"EarlyStopping monitor={self.monitor!r} is not a loss term; terms: {sorted(state.losses)}")
        return state.losses[self.monitor]

    def on_step(self, state):
        if state.phase != self.phase:
            self.best, self.best_step, self.phase = math.inf, state.step, state.phase
        value = self._value(state)
        if value < self.best * (1 - self.min_delta):
            self.best, self.best_step = value, state.step
        elif state.step - self.best_step >= self.patience:
            state.stop_phase = True
        if self.target is not None and value <= self.target:
            state.stop_training = True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.phase = state["best"], state["best_step"], state["phase"]


class ProgressBar(Callback):
    """A tqdm bar over all steps with the loss terms as postfix (silent when not a tty)."""

    def __init__(self, every: int = 50, disable: bool | None = None):
        self.every = every
        self.disable = (not sys.stderr.isatty()) if disable is None else disable
        self._bar = None
        self._l2 = None
        self._phase = None
        self._done = 0
        self._posted = -1

    def on_start(self, state):
        from tqdm.auto import tqdm

        self._phase, self._done = state.phase, state.step
        self._bar = tqdm(total=state.max_steps, initial=state.step, disable=self.disable,
                         desc=state.phase, dynamic_ncols=True, leave=True)

    def on_step(self, state):
        bar = self._bar
        if bar is None:
            return
        bar.update(state.step - self._done)
        self._done = state.step
        if state.l2_relative_error is not None:
            self._l2 = state.l2_relative_error
        if self._phase != state.phase:
            self._phase = state.phase
            bar.set_description(state.phase, refresh=False)
        if state.step // self.every > self._posted:
            self._posted = state.step // self.every
            post = {"loss": f"{state.loss:.2e}", **{k: f"{v:.1e}" for k, v in state.losses.items()}}
            if self._l2 is not None:
                post["L2"] = f"{self._l2:.2e}"
            bar.set_postfix(post, refresh=False)

    def on_end(self, state, result):
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
