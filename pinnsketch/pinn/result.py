"""`Result` of a solve, batched prediction, and the reference evaluation grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..nn.jet import Jet, JetSpec
from .errors import ProblemDefinitionError
from .problem import Layout, Problem, as_points

__all__ = ["Result", "Evaluator", "predict"]


@torch.no_grad()
def predict(network: torch.nn.Module, problem: Problem, x, *, batch_size: int = 65_536,
            dtype: torch.dtype | None = None, device: torch.device | None = None):
    """Outputs (M, n_out) at x (M, d), in batches; numpy in -> numpy out, tensor in -> tensor out."""
    param = next(network.parameters())
    dtype, device = dtype or param.dtype, device or param.device
    as_numpy = not isinstance(x, torch.Tensor)
    xt = torch.as_tensor(np.asarray(x) if as_numpy else x)
    if xt.dim() != 2:
        raise ValueError(f"x of shape {tuple(xt.shape)} must be (M, d)")
    transform = getattr(problem, "output_transform", None)
    out = []
    for start in range(0, len(xt), batch_size):
        xb = xt[start:start + batch_size].to(device=device, dtype=dtype)
        u = network(xb)
        if transform is not None:
            spec = JetSpec(xb.shape[1])
            u = transform(Jet.input(xb, spec), Jet(u.unsqueeze(0), spec)).value
        out.append(u)
    u = torch.cat(out) if out else torch.zeros((0, 0), dtype=dtype, device=device)
    return u.double().cpu().numpy() if as_numpy else u.to(xt.device)


class Evaluator:
    """The reference on an evaluation grid: `problem.reference()`, else `problem.exact` on a grid.

    Attributes: x (M, d) and u (M, n_out) float64 numpy, or None when the problem
    has neither a reference nor an exact solution.
    """

    def __init__(self, problem: Problem, layout: Layout, n_points: int = 10_000):
        self.x = self.u = None
        kind = type(problem).__name__
        ref = problem.reference()
        if ref is not None:
            if not (isinstance(ref, (tuple, list)) and len(ref) == 2):
                raise ProblemDefinitionError(f"{kind}.reference() must return (x (M, d), u (M, n_out)) or None")
            x = as_points(ref[0], layout.dim, f"{kind}.reference() x")
            u = ref[1].detach().cpu().numpy() if isinstance(ref[1], torch.Tensor) else np.asarray(ref[1])
        elif callable(getattr(problem, "exact", None)):
            x = layout.domain.sample_domain(n_points, "uniform")
            u = problem.exact(torch.as_tensor(x, dtype=torch.float64))
            u = u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u)
        else:
            return
        u = np.asarray(u, dtype=np.float64)
        n_out = len(layout.output_names)
        if u.ndim == 1 and n_out == 1:
            u = u[:, None]
        if u.shape != (len(x), n_out):
            raise ProblemDefinitionError(
                f"{kind} reference values have shape {u.shape}; expected ({len(x)}, {n_out}) "
                f"(one column per output {layout.output_names})"
            )
        if not np.isfinite(u).all():
            raise ProblemDefinitionError(
                f"{kind} reference contains {int((~np.isfinite(u)).sum())} NaN/inf values; fix reference()/exact()"
            )
        if not np.any(u):
            raise ProblemDefinitionError(f"{kind} reference is identically zero; a relative error is undefined")
        self.x, self.u = x, u
        self.output_names = layout.output_names

    @property
    def available(self) -> bool:
        return self.x is not None

    def errors(self, prediction: np.ndarray) -> tuple[float, dict[str, float]]:
        """Relative L2 error over all outputs (Frobenius), and per output."""
        diff = prediction - self.u
        overall = float(np.linalg.norm(diff) / np.linalg.norm(self.u))
        per = {}
        for i, name in enumerate(self.output_names):
            denom = np.linalg.norm(self.u[:, i])
            per[name] = float(np.linalg.norm(diff[:, i]) / denom) if denom > 0 else math.nan
        return overall, per


@dataclass
class Result:
    """What `solve` returns.

    Attributes:
        problem, model: the problem and the trained network.
        history: per-step lists (step, phase, loss, lr, wall_time_s, step_time_s, terms{name: [...]},
            parameters{name: [...]}); `step` counts iterations done (an L-BFGS record may cover several)
            and evaluations (eval{step, l2_relative_error, per_field{name: [...]}}),
            memory{step, saved_bytes, step_peak_bytes (-1: not measured)}, refine{step, points_added}.
        l2_relative_error: final relative L2 error over all outputs (None without a reference);
            l2_per_field: the same per output.
        parameters: trained values of the problem's `Parameter`s.
        timing: seconds per phase, milliseconds per Adam / L-BFGS step, total.
        saved_bytes_peak: peak bytes autograd saved for backward on metered steps.
        step_peak_bytes: peak of all live tensor bytes of a metered step above its start (what
            decides whether a problem fits; `pinnsketch.nn.MemoryMeter`), max over metered steps.
        storage_report: per-layer storage figures at the end (ranks, errors, bytes).
        evaluation: {"x", "reference", "prediction"} numpy arrays on the evaluation grid.
        config: the JSON-able options of the run; state: the final TrainingState.
    """

    problem: Problem
    model: torch.nn.Module
    history: dict
    l2_relative_error: float | None
    l2_per_field: dict[str, float]
    parameters: dict[str, float]
    timing: dict[str, float]
    saved_bytes_peak: int | None
    storage_report: list[dict]
    evaluation: dict[str, np.ndarray] | None
    config: dict
    state: Any = field(default=None, repr=False)
    step_peak_bytes: int | None = None

    def predict(self, x, *, batch_size: int = 65_536):
        """Outputs (M, n_out) at x (M, d), computed in batches (numpy or tensor, as given)."""
        self.model.eval()
        return predict(self.model, self.problem, x, batch_size=batch_size)

    @property
    def memory(self) -> dict:
        return {"saved_bytes_peak": self.saved_bytes_peak, "step_peak_bytes": self.step_peak_bytes,
                "storage_report": self.storage_report}

    def __repr__(self) -> str:
        l2 = "n/a" if self.l2_relative_error is None else f"{self.l2_relative_error:.3e}"
        return (f"Result(problem={type(self.problem).__name__}, steps={self.config.get('steps_done')}, "
                f"l2_relative_error={l2}, time={self.timing.get('total_s', float('nan')):.1f}s)")
