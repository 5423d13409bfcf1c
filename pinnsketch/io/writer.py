"""Write runs to HDF5: the `RunWriter` training callback and `save_result` for finished runs.

    writer = RunWriter("burgers.h5", checkpoint_every=1000, monitor=GradientMonitor(rank=4))
    result = ps.solve(Burgers(), callbacks=[writer])
    # interrupted? continue from the last checkpoint, ending where the uninterrupted run ends:
    result = ps.solve(Burgers(), resume=load_checkpoint("burgers.h5"),
                      callbacks=[RunWriter("burgers.h5", mode="a", monitor=GradientMonitor(rank=4))])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nn.policies import STORAGES
from ..training import Callback, TrainingDivergedError, crossed
from .runfile import COMPRESSIONS, RunFile
from .schema import storage_spec

__all__ = ["RunWriter", "save_result", "WRITE_MODES"]

#: "w": new file (replaces an existing one at the first commit); "x": new file, error if it exists;
#: "a": continue the run stored in the file from its checkpoint.
WRITE_MODES = ("w", "x", "a")


class RunWriter(Callback):
    """Training callback that records a run in one HDF5 file (see ``pinnsketch/io/SCHEMA.md``).

    Args:
        path: the run file; written atomically (``runfile`` module docstring).
        mode: "w" | "x" | "a" (see ``WRITE_MODES``).
        log_every: steps between rows of /training (evaluation steps are always logged); /sketch
            gets a row on those steps whenever the model's storage report changed.
        checkpoint_every: steps between checkpoints (model, optimizer, RNG, histories) and commits;
            a checkpoint is also written when the Adam phase ends. A step that advances the counter
            past a multiple of either (an L-BFGS step of several iterations) counts as reaching it.
            0: no checkpoints before the end.
        flush_every: logged rows buffered in memory before they go to the live file.
        monitor: a :class:`~pinnsketch.monitor.GradientMonitor` that the writer drives (do not also
            pass it in ``callbacks``); its norms and sketches go to /gradients and are restored on resume.
        compression: "gzip" | "lzf" | None.
        config: entries added to (and replacing those of) the run configuration recorded in the
            root attribute ``config``, e.g. the command line's storage spec.

    A run that raises (divergence, Ctrl-C, an error) is closed by :meth:`on_failure`: the file keeps
    its last checkpoint and the history up to the failure, and records ``status``, ``stop_cause``,
    ``stop_step`` and ``stop_phase``. Only one writer may write a path at a time (``RunFileLocked``).
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "w", log_every: int = 1,
                 checkpoint_every: int = 1000, flush_every: int = 100, monitor=None,
                 compression: str | None = "gzip", config: Mapping[str, Any] | None = None):
        if mode not in WRITE_MODES:
            raise ValueError(f"mode={mode!r} is not one of {WRITE_MODES}: 'w' writes a new file, 'x' refuses "
                             "to replace one, 'a' continues the run in an existing file")
        for name, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                            ("flush_every", flush_every)):
            low = 0 if name == "checkpoint_every" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r} is not one of {COMPRESSIONS}")
        if monitor is not None and not callable(getattr(monitor, "memory_report", None)):
            raise TypeError(f"monitor={monitor!r} must be a pinnsketch.monitor.GradientMonitor")
        path = Path(path)
        if path.suffix == ".partial":
            raise ValueError(f"path={str(path)!r} ends in .partial, the suffix of live files; choose another name")
        self.path, self.mode = path, mode
        self.log_every, self.checkpoint_every, self.flush_every = log_every, checkpoint_every, flush_every
        self.monitor = monitor
        self.compression = compression
        self.config = dict(config or {})
        self._file: RunFile | None = None
        self._last_logged = None
        self._report = None
        self._previous_step = 0
        self._monitor_rows = 0

    def __repr__(self) -> str:
        return f"RunWriter({str(self.path)!r}, mode={self.mode!r}, checkpoint_every={self.checkpoint_every})"

    # -- callback ------------------------------------------------------------------------
    def on_start(self, state) -> None:
        self._previous_step = state.step
        if self.monitor is not None and any(cb is self.monitor for cb in getattr(state, "callbacks", ()) or ()):
            raise ValueError("the GradientMonitor given to RunWriter(monitor=...) is also in callbacks; the "
                             "writer drives it, so pass it only to the writer")
        if self.mode == "a":
            self._resume(state)
            return
        if self.mode == "x" and self.path.exists():
            raise FileExistsError(f"{self.path} exists and mode='x'; pass mode='w' to replace it or "
                                  "mode='a' to continue its run")
        self._file = RunFile(self.path, compression=self.compression)
        root = _root_attributes(state)
        root["config"] = {**root["config"], **self.config}
        if "storage" in self.config:          # the caller's own record replaces the derived one
            root["config"].pop("storage_options", None)
        if "storage" in self.config and isinstance(self.config["storage"], str):
            root["storage"] = self.config["storage"]
        self._file.write_root(**root)
        self._file.write_model(state.model)
        if self.monitor is not None:
            self.monitor.on_start(state)
        self._file.commit()

    def on_step(self, state) -> None:
        if self._file is None:
            raise RuntimeError("RunWriter.on_step before on_start; pass the writer in callbacks=[...]")
        if self.monitor is not None:
            self.monitor.on_step(state)
        # A step may advance the counter by several iterations (L-BFGS): act when a multiple is crossed.
        previous, self._previous_step = self._previous_step, state.step
        if crossed(previous, state.step, self.log_every) or state.l2_relative_error is not None:
            self._log(state)
        if self._file.training.buffered >= self.flush_every:
            self._flush()
        if self.checkpoint_every and (crossed(previous, state.step, self.checkpoint_every)
                                      or _ends_adam(state, previous)):
            self.checkpoint(state)

    def on_end(self, state, result) -> None:
        if self._file is None:
            raise RuntimeError("RunWriter.on_end before on_start; pass the writer in callbacks=[...]")
        if self._last_logged != state.step:
            self._log(state)
        elif state.l2_relative_error is not None:      # evaluated after the last step was logged
            self._file.training.update_last({k: v for k, v in training_row(state).items() if k.startswith("l2_")})
        root: dict[str, Any] = {"completed": True}
        evaluation = getattr(result, "evaluation", None)
        if isinstance(evaluation, Mapping) and evaluation.get("x") is not None:
            config = getattr(state, "config", {}) or {}
            root["l2_relative_error"] = self._file.write_solution(
                evaluation["x"], evaluation["prediction"], evaluation.get("reference"),
                input_names=config.get("input_names"), output_names=config.get("output_names"))
        if getattr(result, "l2_relative_error", None) is not None:
            root["l2_relative_error"] = float(result.l2_relative_error)
        if getattr(result, "test_accuracy", None) is not None:
            root["test_accuracy"] = float(result.test_accuracy)
        for key in ("saved_bytes_peak", "step_peak_bytes"):
            if getattr(result, key, None) is not None:
                root[key] = int(getattr(result, key))
        root["status"] = "completed"
        root.update(_lbfgs_stop_attributes(state))
        self._store(state, **root)
        self._file.close()
        self._file = None

    def on_failure(self, state, error: BaseException) -> None:
        """Training raised: keep the last checkpoint, write the history up to the failure and its cause."""
        if self._file is None:               # never started (e.g. another writer holds the file)
            return
        status = ("diverged" if isinstance(error, TrainingDivergedError) else
                  "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        text = str(error).strip()
        cause = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        try:
            if self._last_logged != state.step and state.step > 0:
                self._log(state)
            self._flush()
            self._file.update_root(completed=False, status=status, stop_cause=cause, stop_step=int(state.step),
                                   stop_phase=str(state.phase), **_lbfgs_stop_attributes(state))
            self._file.close()
        except BaseException:
            self._file.abort()
            raise
        finally:
            self._file = None

    @classmethod
    def resume(cls, path: str | os.PathLike, **options) -> tuple["RunWriter", dict]:
        """A writer continuing the run in ``path`` and the checkpoint to pass to ``solve(resume=...)``.

        The gradient monitor, when the file has one, is rebuilt with its stored options (pass
        ``monitor=`` to override); other ``options`` are those of the constructor except ``mode``.

            writer, state = RunWriter.resume("run.h5")
            ps.solve(problem, ..., resume=state, callbacks=[writer])
        """
        from ..monitor import GradientMonitor
        from .reader import load_checkpoint, open_run

        if "mode" in options:
            raise TypeError("RunWriter.resume always continues the file (mode='a'); do not pass mode")
        state = load_checkpoint(path)
        if options.get("monitor") is None:
            with open_run(path) as f:
                config = f["gradients"].attrs.get("config") if "gradients" in f else None
            if config is not None:
                options["monitor"] = GradientMonitor.from_config(json.loads(config))
        return cls(path, mode="a", **options), state

    # -- public --------------------------------------------------------------------------
    def checkpoint(self, state) -> None:
        """Write a checkpoint of ``state`` and commit the file (called every ``checkpoint_every`` steps)."""
        self._store(state)
        self._file.commit()

    def close(self) -> None:
        """Stop writing without a final commit (``path`` keeps the last checkpoint)."""
        if self._file is not None:
            self._file.abort()
            self._file = None

    # -- internals -----------------------------------------------------------------------
    def _store(self, state, **root) -> None:
        self._flush()
        if self.monitor is not None and len(self.monitor):
            self._file.write_monitor_sketches(self.monitor)
        self._file.write_model(state.model)
        self._file.write_checkpoint(_state_dict(state), step=state.step, wall_time_s=state.wall_time_s)
        attrs = {"steps": int(state.step), "wall_time_s": float(state.wall_time_s)}
        for key in ("saved_bytes_peak", "step_peak_bytes"):
            if getattr(state, key, None) is not None:
                attrs[key] = int(getattr(state, key))
        attrs.update(root)
        self._file.update_root(**attrs)

    def _flush(self) -> None:
        self._file.flush()
        if self.monitor is not None:
            self._monitor_rows = self._file.append_monitor_rows(self.monitor, self._monitor_rows)

    def _log(self, state) -> None:
        self._last_logged = state.step
        self._file.training.append(training_row(state))
        row, values = self._report_values(state)
        if row is not None and values != self._report:       # a row whenever the report changes
            self._report = values
            self._file.sketch.append(row)

    @staticmethod
    def _report_values(state) -> tuple[dict | None, dict | None]:
        """(/sketch row, its values without the step) of the model's current storage report."""
        own = getattr(state.model, "storage_report", None)
        report = own() if callable(own) else getattr(state, "storage_report", None)
        if not report:
            return None, None
        row = sketch_row(state.step, report)
        values = {k: _canon(v) for k, v in row.items() if k != "step"}
        return row, {k: v for k, v in values.items() if v is not None}

    def _resume(self, state) -> None:
        from .reader import open_run

        with open_run(self.path) as f:
            if "checkpoint" not in f:
                raise ValueError(f"{self.path} has no checkpoint to continue from; start a new run with mode='w'")
            saved = int(f["checkpoint"].attrs["step"])
        if saved != state.step:
            raise ValueError(f"{self.path} holds a checkpoint at step {saved} but training resumes at step "
                             f"{state.step}; pass solve(resume=load_checkpoint({str(self.path)!r}))")
        self._file = RunFile(self.path, compression=self.compression, resume=True)
        self._file.training.truncate_after(state.step)
        self._file.sketch.truncate_after(state.step)
        self._file.gradients.truncate_after(state.step)
        self._file.update_root(completed=False, status="running", stop_cause=None, stop_step=None,
                               stop_phase=None)
        self._last_logged = state.step
        self._report = _last_row_values(self._file.file["sketch"])      # compare new reports with the file's
        if self.monitor is not None:
            self.monitor.on_start(state)
            if "windows" in self._file.file["gradients"].attrs:
                from .schema import read_monitor_state

                self.monitor.load_state_dict(read_monitor_state(self._file.file["gradients"]))
            self._monitor_rows = len(self._file.gradients)


# -- rows ------------------------------------------------------------------------------------
def training_row(state) -> dict[str, Any]:
    """The /training row of one step from a TrainingState."""
    row = {"step": int(state.step), "phase": str(state.phase), "loss": _float(state.loss),
           "lr": _float(state.lr), "wall_time_s": _float(state.wall_time_s),
           "l2_relative_error": _float(state.l2_relative_error),
           "saved_bytes_peak": None if state.saved_bytes_peak is None else int(state.saved_bytes_peak),
           "step_peak_bytes": None if getattr(state, "step_peak_bytes", None) is None
           else int(state.step_peak_bytes)}
    for term, value in (state.losses or {}).items():
        row[f"losses/{_name(term)}"] = _float(value)
    evals = (getattr(state, "history", None) or {}).get("eval") if isinstance(getattr(state, "history", None),
                                                                            dict) else None
    if state.l2_relative_error is not None and evals and evals.get("step") and evals["step"][-1] == state.step:
        for field, values in evals.get("per_field", {}).items():
            row[f"l2_per_output/{_name(field)}"] = _float(values[-1])
    return row


def sketch_row(step: int, report) -> dict[str, Any]:
    """The /sketch row of one step from a storage report (one dict per layer)."""
    row: dict[str, Any] = {"step": int(step)}
    for i, layer in enumerate(report):
        index = layer.get("layer", i)
        for key, value in layer.items():
            if key == "layer":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if value is None or isinstance(value, (bool, int, float, str)):
                row[f"layer_{index}/{_name(key)}"] = value
    return row


def _root_attributes(state) -> dict[str, Any]:
    config = dict(getattr(state, "config", None) or {})
    problem = state.problem
    name = config.get("problem") or getattr(problem, "name", None) or config.get("dataset")
    if name is None and problem is not None:
        name = type(problem).__name__.lower()
    storage = config.get("storage") if isinstance(config.get("storage"), str) else None
    storages = getattr(state.model, "storages", None)
    if storage is not None and storage not in STORAGES and storages:
        # a policy object: the solver recorded its repr; record its constructor options instead
        specs = [storage_spec(s) for s in storages]
        config["storage"] = specs[0]["spec"] or repr(storages[0])
        config["storage_options"] = specs[0] if all(s == specs[0] for s in specs) else specs
        storage = specs[0]["name"]
    if storage is None:
        names = sorted({str(r.get("storage")) for r in (getattr(state, "storage_report", None) or [])
                        if r.get("storage") is not None})
        storage = ",".join(names) or None
    param = next(state.model.parameters(), None)
    kind = "pinn" if problem is not None else ("classifier" if state.phase == "train" else "custom")
    seed = config.get("seed")
    return {"problem": name, "storage": storage, "seed": seed if isinstance(seed, int) else None,
            "device": str(param.device) if param is not None else None, "config": config, "kind": kind}


def _state_dict(state) -> dict:
    own = getattr(state, "state_dict", None)
    if callable(own):
        return own()
    opt = getattr(state, "optimizer", None)
    return {"step": int(state.step), "model": state.model.state_dict(),
            "optimizer": None if opt is None else opt.state_dict()}


def _canon(value):
    """A /sketch value as it reads back from the file: None for missing (None, NaN, ""), numbers as float."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value) if isinstance(value, (bool, int, float)) else str(value)


def _last_row_values(group) -> dict | None:
    """The last /sketch row's values (without the step) in the form of ``_canon``; None for an empty table."""
    from .table import read_table

    table = read_table(group)
    if not len(table.get("step", ())):
        return None
    values = {k: _canon(v[-1]) for k, v in table.items() if k != "step"}
    return {k: v for k, v in values.items() if v is not None}


def _ends_adam(state, previous: int) -> bool:
    """Whether this step ended the Adam phase (its configured step count was reached)."""
    adam = (getattr(state, "config", None) or {}).get("adam")
    steps = adam.get("steps") if isinstance(adam, Mapping) else None
    return state.phase == "adam" and isinstance(steps, int) and previous < steps <= state.step


def _lbfgs_stop_attributes(state) -> dict[str, Any]:
    history = getattr(state, "history", None)
    stop = history.get("lbfgs_stop") if isinstance(history, Mapping) else None
    if not isinstance(stop, Mapping):
        return {}
    out = {"lbfgs_stop_reason": stop.get("reason"), "lbfgs_stop_detail": stop.get("detail"),
           "lbfgs_stop_step": stop.get("step")}
    precision = history.get("precision")
    if isinstance(precision, Mapping) and precision.get("dtype"):  # the L-BFGS float64 continuations' first steps
        out["lbfgs_float64_from"] = np.asarray([s for s, d in zip(precision["step"], precision["dtype"])
                                                if d == "float64"], dtype=np.int64)
    return out


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _name(key: str) -> str:
    return str(key).replace("/", ".") or "_"


# -- finished runs -----------------------------------------------------------------------------
def save_result(result, path: str | os.PathLike, *, compression: str | None = "gzip") -> Path:
    """Write a finished ``pinnsketch.solve`` Result to ``path``; returns the path (``pinnsketch.save``).

    Without a RunWriter during training, /training comes from ``result.history``, /sketch holds
    the final storage report only, and there is no /gradients. The checkpoint is the final state.
    """
    history = getattr(result, "history", None)
    config = getattr(result, "config", None)
    if not isinstance(history, Mapping) or "step" not in history or not isinstance(config, Mapping):
        raise TypeError(f"save_result needs a pinnsketch.solve Result, got {type(result).__name__}; record "
                        "other training loops with callbacks=[RunWriter(path)]")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r} is not one of {COMPRESSIONS}")
    path = Path(path)
    rf = RunFile(path, compression=compression)
    try:
        state = getattr(result, "state", None)
        storage = config.get("storage") if isinstance(config.get("storage"), str) else None
        param = next(result.model.parameters(), None)
        rf.write_root(problem=config.get("problem"), storage=storage, seed=config.get("seed"),
                      device=str(param.device) if param is not None else None, config=dict(config), kind="pinn")
        evals = history.get("eval", {})
        l2_at = dict(zip(evals.get("step", []), evals.get("l2_relative_error", [])))
        per_at = {name: dict(zip(evals.get("step", []), values))
                  for name, values in evals.get("per_field", {}).items()}
        memory = history.get("memory", {})
        mem_at = dict(zip(memory.get("step", []), memory.get("saved_bytes", [])))
        step_peak_at = dict(zip(memory.get("step", []), memory.get("step_peak_bytes", [])))
        peak = step_peak = None
        for i, step in enumerate(history["step"]):
            if step in mem_at:
                peak = max(peak or 0, int(mem_at[step]))
            if step_peak_at.get(step, -1) >= 0:
                step_peak = max(step_peak or 0, int(step_peak_at[step]))
            row = {"step": int(step), "phase": str(history["phase"][i]), "loss": float(history["loss"][i]),
                   "lr": float(history["lr"][i]), "wall_time_s": float(history["wall_time_s"][i]),
                   "l2_relative_error": float(l2_at.get(step, math.nan)), "saved_bytes_peak": peak,
                   "step_peak_bytes": step_peak}
            for term, values in history.get("terms", {}).items():
                row[f"losses/{_name(term)}"] = float(values[i])
            for name, values in per_at.items():
                if step in values:
                    row[f"l2_per_output/{_name(name)}"] = float(values[step])
            rf.training.append(row)
        if result.storage_report:
            rf.sketch.append(sketch_row(history["step"][-1] if history["step"] else 0, result.storage_report))
        rf.write_model(result.model)
        root: dict[str, Any] = {"completed": True, "status": "completed",
                                "steps": int(history["step"][-1]) if history["step"] else 0,
                                "wall_time_s": float(getattr(result, "timing", {}).get("total_s", math.nan)),
                                **_lbfgs_stop_attributes(result)}
        evaluation = getattr(result, "evaluation", None)
        if isinstance(evaluation, Mapping) and evaluation.get("x") is not None:
            rf.write_solution(evaluation["x"], evaluation["prediction"], evaluation.get("reference"),
                              input_names=config.get("input_names"), output_names=config.get("output_names"))
        if result.l2_relative_error is not None:
            root["l2_relative_error"] = float(result.l2_relative_error)
        for key in ("saved_bytes_peak", "step_peak_bytes"):
            if getattr(result, key, None) is not None:
                root[key] = int(getattr(result, key))
        if state is not None and callable(getattr(state, "state_dict", None)):
            rf.write_checkpoint(state.state_dict(), step=state.step, wall_time_s=state.wall_time_s)
        rf.update_root(**root)
    except BaseException:
        rf.abort()
        raise
    rf.close()
    return path
