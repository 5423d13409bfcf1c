"""Causal weighting of the residual for time-dependent problems (Wang, Sankaran & Perdikaris 2022).

    ps.solve(problem, causal=ps.Causal(chunks=32, tol=1.0))

The interior points are split by their time into `chunks` equal intervals of
[t0, t1]. With L_k the mean square residual of chunk k (all residual terms
summed), chunk k gets the weight

    w_k = exp(-tol * sum_{j<k} L_j)      (w_0 = 1; no gradient flows through w),

so a later time counts only once the earlier times are resolved. Each
residual term's loss becomes mean_k(w_k L_k^term) over the non-empty chunks
(the plain mean square when every w_k = 1 and the chunks hold equal counts).
The smallest weight tells how far causality has let training reach: near 1
all times train, near 0 the late times wait. During Adam the weights follow
every loss evaluation; during L-BFGS they are computed at the first evaluation
of each L-BFGS step and held for its iterations and line searches (`hold`),
since weights that move between evaluations break the line search and the
curvature pairs. With time-window marching (`ps.TimeWindows`, `windows.py`) the chunks
split each window's own interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["Causal", "CausalWeights", "causal_weights"]


@dataclass(frozen=True)
class Causal:
    """Causal residual weights over `chunks` time intervals with tolerance `tol`."""

    chunks: int = 32
    tol: float = 1.0

    def __post_init__(self):
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 2:
            raise ValueError(f"Causal chunks={self.chunks!r} must be an int >= 2 (time intervals)")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise ValueError(f"Causal tol={self.tol!r} must be a positive number (the causality tolerance epsilon)")

    def config(self) -> dict:
        return {"name": "causal", **asdict(self)}


def causal_weights(chunk_losses: torch.Tensor, tol: float) -> torch.Tensor:
    """exp(-tol * exclusive cumulative sum of chunk_losses), (M,), detached."""
    losses = chunk_losses.detach()
    before = torch.cumsum(losses, 0) - losses
    return torch.exp(-tol * before)


class CausalWeights:
    """Causal reduction of the residual terms of one run.

    Args:
        option: the `Causal` settings; t0, t1: the time interval; time_axis: column of t in x.
    After each `reduce`, `weights` (M,) holds the last chunk weights (empty chunks: nan).
    """

    def __init__(self, option: Causal, t0: float, t1: float, time_axis: int):
        self.option, self.t0, self.t1, self.time_axis = option, float(t0), float(t1), time_axis
        self.weights: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # weights fixed by `hold()` for the following evaluations
        self._holding = False

    def hold(self) -> None:
        """Fix the weights at the next evaluation's values until `release()` or the next `hold()`."""
        self._holding, self.held = True, None

    def release(self) -> None:
        """Let the weights follow every evaluation again."""
        self._holding, self.held = False, None

    def chunk_index(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk of each point of x (N, d), (N,) int64 in [0, M)."""
        m = self.option.chunks
        scaled = (x[:, self.time_axis] - self.t0) * (m / (self.t1 - self.t0))
        return scaled.floor().clamp(0, m - 1).long()

    def reduce(self, x: torch.Tensor, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """Causally weighted mean squares of `residuals` (each (N,)) at points x (N, d): one 0-d loss each."""
        m = self.option.chunks
        index = self.chunk_index(x)
        counts = torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, index, torch.ones_like(x[:, 0]))
        filled = counts > 0
        safe = counts.clamp(min=1)
        chunk = [torch.zeros(m, dtype=r.dtype, device=r.device).index_add(0, index, r.square()) / safe
                 for r in residuals]
        if self._holding and self.held is not None:
            w = self.held
        else:
            w = causal_weights(torch.stack(chunk).sum(0), self.option.tol)
            if self._holding:
                self.held = w
        self.weights = torch.where(filled, w, torch.full_like(w, float("nan")))
        n = filled.sum()
        return [(w * c).sum() / n for c in chunk]

    def min_weight(self) -> float:
        """The smallest weight of a non-empty chunk in the last `reduce` (nan before any)."""
        if self.weights is None:
            return float("nan")
        w = self.weights[~torch.isnan(self.weights)]
        return float(w.min()) if w.numel() else float("nan")
