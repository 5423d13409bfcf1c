"""PNG figures of a run: solution/reference/error fields, losses, gradient norms, ranks.

Uses matplotlib's object API with an Agg canvas per figure, so plotting never
switches the global backend or opens windows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["plot_run"]


def plot_run(run, out_dir: str | os.PathLike, *, dpi: int = 120) -> list[Path]:
    """Write the figures of ``run`` (a :class:`~pinnsketch.io.Run` or a path) to ``out_dir``.

    Returns the written files: ``solution.png`` (when the run has /solution), ``training.png``,
    ``gradient_norms.png`` (with a gradient monitor), ``ranks.png`` (with rank histories).
    """
    from .reader import Run, load

    if not isinstance(run, Run):
        run = load(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    title = f"{run.problem or 'run'} | storage {run.storage or '-'} | {run.steps} steps"
    for name, draw in (("solution.png", _solution), ("training.png", _training),
                       ("gradient_norms.png", _gradients), ("ranks.png", _ranks)):
        fig = draw(run, title)
        if fig is not None:
            path = out / name
            fig.savefig(path, dpi=dpi)
            written.append(path)
    return written


def _figure(rows: int, cols: int, width: float = 4.6, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


# -- solution --------------------------------------------------------------------------------
def _solution(run, title):
    sol = run.solution
    if sol is None or sol.x is None or sol.x.size == 0:
        return None
    x, pred, ref = sol.x, sol.prediction, sol.reference
    d, n_out = x.shape[1], pred.shape[1]
    inputs = sol.input_names or [f"x{i}" for i in range(d)]
    outputs = sol.output_names or [f"u{i}" for i in range(n_out)]
    panels = 3 if ref is not None else 1
    fig, axes = _figure(n_out, panels)
    l2 = f" | rel. L2 error {sol.l2_relative_error:.3e}" if sol.l2_relative_error is not None else ""
    fig.suptitle(title + l2)
    for i, field in enumerate(outputs):
        fields = [(f"{field} predicted", pred[:, i], "viridis")]
        if ref is not None:
            fields += [(f"{field} reference", ref[:, i], "viridis"),
                       (f"|{field} error|", np.abs(pred[:, i] - ref[:, i]), "magma")]
        lo = min(np.nanmin(v) for _, v, c in fields if c == "viridis")
        hi = max(np.nanmax(v) for _, v, c in fields if c == "viridis")
        for ax, (label, values, cmap) in zip(axes[i], fields):
            limits = (lo, hi) if cmap == "viridis" else (0.0, float(np.nanmax(values)) or 1.0)
            if d == 1:
                order = np.argsort(x[:, 0])
                ax.plot(x[order, 0], values[order], color="C3" if cmap == "magma" else "C0")
                if ref is not None and label.endswith("predicted"):
                    ax.plot(x[order, 0], ref[order, i], "k--", lw=1, label="reference")
                    ax.legend(fontsize=8)
                ax.set_xlabel(inputs[0])
            else:
                _field_2d(fig, ax, x, values, inputs, cmap, limits)
            ax.set_title(label)
    return fig


def _field_2d(fig, ax, x, values, inputs, cmap, limits):
    # Time (if any) goes on the horizontal axis, as in the usual x-t heat maps.
    a, b = (inputs.index("t"), 1 - inputs.index("t")) if "t" in inputs[:2] else (0, 1)
    h, v = x[:, a], x[:, b]
    grid = _grid(h, v, values)
    if grid is not None:
        hs, vs, z = grid
        art = ax.pcolormesh(hs, vs, z, cmap=cmap, vmin=limits[0], vmax=limits[1], shading="nearest")
    elif len(values) >= 3 and np.ptp(h) > 0 and np.ptp(v) > 0:
        try:
            art = ax.tricontourf(h, v, values, levels=50, cmap=cmap, vmin=limits[0], vmax=limits[1])
        except (ValueError, RuntimeError):       # degenerate triangulation
            art = ax.scatter(h, v, c=values, s=6, cmap=cmap, vmin=limits[0], vmax=limits[1])
    else:
        art = ax.scatter(h, v, c=values, s=6, cmap=cmap, vmin=limits[0], vmax=limits[1])
    fig.colorbar(art, ax=ax)
    ax.set_xlabel(inputs[a])
    ax.set_ylabel(inputs[b])
    if x.shape[1] > 2:
        ax.text(0.01, 0.01, f"projection of {x.shape[1]}-D points", transform=ax.transAxes, fontsize=7)


def _grid(h, v, values):
    """(h values, v values, Z (len(v), len(h))) when the points form a full tensor grid."""
    hs, hi = np.unique(h, return_inverse=True)
    vs, vi = np.unique(v, return_inverse=True)
    if len(hs) * len(vs) != len(values) or len(hs) < 2 or len(vs) < 2:
        return None
    z = np.full((len(vs), len(hs)), np.nan)
    z[vi, hi] = values
    return (hs, vs, z) if not np.isnan(z).any() else None


# -- histories -------------------------------------------------------------------------------
def _training(run, title):
    t = run.training
    if "step" not in t or len(t["step"]) == 0:
        return None
    steps = t["step"]
    l2 = t.get("l2_relative_error")
    has_l2 = l2 is not None and np.isfinite(l2).any()
    mem = t.get("saved_bytes_peak")
    has_mem = mem is not None and (mem > 0).any()
    fig, axes = _figure(1, 1 + has_l2 + has_mem, width=5.2)
    fig.suptitle(title)
    ax = axes[0][0]
    ax.semilogy(steps, np.abs(t["loss"]), color="k", lw=1.5, label="total")
    for i, (term, values) in enumerate(run.losses.items()):
        ax.semilogy(steps, np.abs(values), lw=1, label=term, color=f"C{i}")
    _phases(ax, t)
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend(fontsize=7, ncol=2)
    col = 1
    if has_l2:
        ax = axes[0][col]
        ok = np.isfinite(l2)
        ax.semilogy(steps[ok], l2[ok], "o-", ms=3)
        ax.set_xlabel("step")
        ax.set_title("relative L2 error")
        col += 1
    if has_mem:
        ax = axes[0][col]
        ok = mem > 0
        ax.plot(steps[ok], mem[ok] / 2**20, drawstyle="steps-post")
        ax.set_xlabel("step")
        ax.set_ylabel("MiB")
        ax.set_title("peak bytes saved for backward")
    return fig


def _phases(ax, t):
    phase = t.get("phase")
    if phase is None or len(phase) < 2:
        return
    change = np.nonzero(phase[1:] != phase[:-1])[0]
    for i in change:
        ax.axvline(t["step"][i + 1], color="gray", ls=":", lw=1)
        ax.text(t["step"][i + 1], 1, f" {phase[i + 1]}", transform=ax.get_xaxis_transform(), fontsize=7,
                va="top", color="gray")


def _gradients(run, title):
    norms = run.gradient_norms
    if not norms or len(run.gradient_steps) == 0:
        return None
    fig, axes = _figure(1, 1, width=6.4, height=3.8)
    ax = axes[0][0]
    steps = run.gradient_steps
    for i, (name, values) in enumerate(norms.items()):
        ax.semilogy(steps, np.where(values > 0, values, np.nan), lw=0.9, label=name, color=f"C{i % 10}")
    mem = run.gradient_memory or {}
    red = mem.get("memory_reduction")
    sub = f" (history sketched: {100 * red:.1f}% less memory)" if red is not None and np.isfinite(red) else ""
    ax.set_title(f"per-layer gradient norms{sub}", fontsize=10)
    fig.suptitle(title)
    ax.set_xlabel("step")
    ax.set_ylabel("||grad||")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _ranks(run, title):
    layers = run.sketch_layers
    steps = run.sketch.get("step")
    ranked = {name: cols for name, cols in layers.items() if "rank" in cols and (cols["rank"] >= 0).any()}
    if steps is None or not ranked:
        return None
    has_err = any("error_estimate" in c and np.isfinite(c["error_estimate"]).any() for c in ranked.values())
    fig, axes = _figure(1, 1 + has_err, width=5.2)
    fig.suptitle(title)
    ax = axes[0][0]
    for i, (name, cols) in enumerate(ranked.items()):
        r = cols["rank"].astype(float)
        r[r < 0] = np.nan
        ax.plot(steps, r, drawstyle="steps-post", label=name, color=f"C{i % 10}")
    ax.set_xlabel("step")
    ax.set_title("sketch rank per layer")
    ax.legend(fontsize=7, ncol=2)
    if has_err:
        ax = axes[0][1]
        for i, (name, cols) in enumerate(ranked.items()):
            if "error_estimate" in cols:
                e = cols["error_estimate"]
                ax.semilogy(steps, np.where(e > 0, e, np.nan), label=name, color=f"C{i % 10}")
        ax.set_xlabel("step")
        ax.set_title("a-posteriori error estimate")
    return fig
