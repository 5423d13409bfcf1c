"""Summaries of a run for `pinnsketch inspect`: a JSON-able dict and readable text."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["summarize", "format_summary", "SUMMARY_KEYS"]

#: Keys every summary has (None when the run does not have the value).
SUMMARY_KEYS = ("path", "schema_version", "kind", "problem", "storage", "steps", "completed", "l2_relative_error",
                "saved_bytes_peak", "step_peak_bytes", "wall_time_s", "final_loss", "final_losses", "seed", "device",
                "checkpoint_step", "layers", "gradient_monitor", "test_accuracy", "pinnsketch_version",
                "torch_version", "created", "status", "stop_cause", "stop_step", "stop_phase", "lbfgs_stop", "lbfgs_float64_from")


def summarize(run) -> dict[str, Any]:
    """The facts of ``run`` (a :class:`~pinnsketch.io.Run`) as a JSON-able dict with ``SUMMARY_KEYS``."""
    training = run.training
    final_losses = {term: _last(values) for term, values in run.losses.items()}
    layers = []
    for name, columns in run.sketch_layers.items():
        layers.append({"layer": name, **{key: _last(values) for key, values in columns.items()}})
    monitor = run.gradient_memory
    if monitor is not None:
        norms = run.gradient_norms
        monitor = {**{k: _py(v) for k, v in monitor.items()}, "steps": int(len(run.gradient_steps)),
                   "final_norms": {name: _last(v) for name, v in norms.items()}}
    attrs = run.attrs
    return {
        "path": str(run.path),
        "schema_version": run.schema_version,
        "kind": attrs.get("kind"),
        "problem": run.problem,
        "storage": run.storage,
        "steps": run.steps,
        "completed": run.completed,
        "l2_relative_error": run.l2_relative_error,
        "saved_bytes_peak": run.saved_bytes_peak,
        "step_peak_bytes": run.step_peak_bytes,
        "wall_time_s": run.wall_time_s,
        "final_loss": _last(training.get("loss")),
        "final_losses": final_losses,
        "seed": run.seed,
        "device": run.device,
        "checkpoint_step": run.checkpoint_step,
        "layers": layers,
        "gradient_monitor": monitor,
        "test_accuracy": _py(attrs.get("test_accuracy")),
        "pinnsketch_version": attrs.get("pinnsketch_version"),
        "torch_version": attrs.get("torch_version"),
        "created": attrs.get("created"),
        # status: completed | running (or killed) | diverged | interrupted | failed (schema 1: from `completed`)
        "status": attrs.get("status") or ("completed" if run.completed else None),
        "stop_cause": attrs.get("stop_cause"),
        "stop_step": _py(attrs.get("stop_step")),
        "stop_phase": attrs.get("stop_phase"),
        "lbfgs_stop": None if attrs.get("lbfgs_stop_reason") is None else {
            "reason": attrs.get("lbfgs_stop_reason"), "detail": attrs.get("lbfgs_stop_detail"),
            "step": _py(attrs.get("lbfgs_stop_step"))},
        "lbfgs_float64_from": (None if attrs.get("lbfgs_float64_from") is None
                               else [int(v) for v in np.atleast_1d(attrs["lbfgs_float64_from"])]),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Readable multi-line text of :func:`summarize` output."""
    s = summary
    if s["completed"]:
        status = "completed"
    elif s.get("stop_cause"):
        status = (f"{s['status']} at step {s['stop_step']} ({s['stop_phase']}); last checkpoint at step "
                  f"{_text(s['checkpoint_step'])}")
    else:
        status = f"interrupted (last checkpoint at step {_text(s['checkpoint_step'])})"
    lines = [
        f"{s['path']}  (pinnsketch run, schema {s['schema_version']}, {s['kind'] or 'run'})",
        f"  problem      {s['problem'] or '-'}",
        f"  storage      {s['storage'] or '-'}",
        f"  steps        {s['steps']}  [{status}]",
        f"  seed/device  {_text(s['seed'])} / {_text(s['device'])}",
        f"  wall time    {_seconds(s['wall_time_s'])}",
        f"  final loss   {_num(s['final_loss'])}" + (
            "  (" + ", ".join(f"{k} {_num(v)}" for k, v in s["final_losses"].items()) + ")"
            if s["final_losses"] else ""),
        f"  rel. L2 err  {_num(s['l2_relative_error'])}",
    ]
    if s.get("stop_cause"):
        lines.insert(4, f"  cause        {s['stop_cause']}")
    if s.get("lbfgs_stop"):
        stop = s["lbfgs_stop"]
        lines.append(f"  L-BFGS stop  {stop['reason']} at step {_text(stop['step'])} ({_text(stop['detail'])})")
    if s.get("lbfgs_float64_from"):
        lines.append(f"  float64      L-BFGS continued in float64 from step {', '.join(map(str, s['lbfgs_float64_from']))}")
    if s.get("test_accuracy") is not None:
        lines.append(f"  test acc.    {s['test_accuracy']:.4f}")
    lines.append(f"  saved bytes  {_bytes(s['saved_bytes_peak'])} peak for backward")
    if s.get("step_peak_bytes") is not None:
        lines.append(f"  step peak    {_bytes(s['step_peak_bytes'])} of live tensors above the step's start")
    if s["layers"]:
        lines.append("  layers (last logged):")
        for layer in s["layers"]:
            extras = ", ".join(f"{k}={_text(v)}" for k, v in layer.items()
                               if k not in ("layer", "storage", "rank", "error_estimate", "saved_bytes"))
            lines.append(f"    {layer['layer']:<9} {_text(layer.get('storage')):<11} rank {_text(layer.get('rank')):>5}"
                         f"  err.est. {_num(layer.get('error_estimate'))}  saved {_bytes(layer.get('saved_bytes'))}"
                         + (f"  {extras}" if extras else ""))
    m = s["gradient_monitor"]
    if m:
        red = m.get("memory_reduction")
        lines.append(f"  gradients    {m['steps']} steps monitored; sketches {_bytes(m.get('monitor_bytes'))} vs "
                     f"full history {_bytes(m.get('full_history_bytes'))}"
                     + (f" ({100 * red:.2f}% less)" if red is not None and math.isfinite(red) else ""))
    lines.append(f"  written by   pinnsketch {_text(s['pinnsketch_version'])}, torch {_text(s['torch_version'])}"
                 f", {_text(s['created'])}")
    return "\n".join(lines)


def _last(values) -> Any:
    """The last non-missing value of a column (NaN, -1 for counts, "" are missing)."""
    if values is None or len(values) == 0:
        return None
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        arr = arr[~np.isnan(arr)]
    elif arr.dtype.kind == "i":
        arr = arr[arr != -1]
    elif arr.dtype.kind in "OUS":
        arr = arr[arr != ""]
    return _py(arr[-1]) if arr.size else None


def _py(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _text(value) -> str:
    return "-" if value is None else str(value)


def _num(value) -> str:
    return "-" if value is None else f"{value:.4e}"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _bytes(value) -> str:
    if value is None or value < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)
