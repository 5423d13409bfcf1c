"""A dominant subspace tracked from step to step through Gram matrices (batched).

Each step brings the Gram matrix G = Z^T Z (w x w) of a sample of a changing
matrix Z's rows; the tracker keeps an orthonormal basis Q (w x k) of G's top
eigenvectors (Z's top right singular vectors), refined by one warm-started
subspace iteration with Rayleigh-Ritz per step (Halko, Martinsson & Tropp 2011,
Alg. 4.3 with q = 1, started from the previous basis): Y = G Q, Q' = qr(Y),
then the eigendecomposition of the small Q'^T G Q' orders and rotates Q'. A
full eigendecomposition replaces the iteration the first time, when k changes,
and when k is a large part of w (then it is as cheap and exact).

Everything is batched over a leading dimension S (independent matrices, e.g.
the jet streams of one activation), and `track_many` batches several trackers'
updates (e.g. every block of a network) into one call per kind of update: on a
GPU each eigensolver call costs launches and a host wait for its status, so a
network pays them once per step rather than once per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TrackedSubspace", "SubspaceRequest", "track_many", "tail_factors_from"]


class TrackedSubspace:
    """Top-k eigenvectors of a sequence of Gram matrices (S, w, w).

    Attributes:
        q: (S, w, k) orthonormal columns by decreasing energy, in the Gram matrix's dtype.
        evals: (S, k) float64 Ritz values (captured energy per column), decreasing.
        energy: (S,) float64 total energy (the Gram matrix's trace).
    """

    def __init__(self, q: torch.Tensor, evals: torch.Tensor, energy: torch.Tensor):
        self.q, self.evals, self.energy = q, evals, energy

    @staticmethod
    def from_gram(gram: torch.Tensor, k: int) -> "TrackedSubspace":
        """The exact top-k eigenvectors of `gram` (S, w, w)."""
        return track_many([SubspaceRequest(None, gram, k)])[0]

    def update(self, gram: torch.Tensor, k: int) -> None:
        """Refine the basis with the next Gram matrix (S, w, w), keeping k columns."""
        new = track_many([SubspaceRequest(self, gram, k)])[0]
        self.q, self.evals, self.energy = new.q, new.evals, new.energy

    def tail_factors(self, r: int) -> dict[str, float]:
        """How the residual norm ||Z - Z Q_r Q_r^T|| would change at rank 2r ("up") and r/2 ("down"),
        worst over S: {name: factor}, empty when the tracked columns cannot tell. Reads evals and
        energy on the host (`tail_factors_from` takes them already read)."""
        return tail_factors_from(self.evals.tolist(), self.energy.tolist(), r)

    def state(self) -> dict:
        return {"q": self.q.clone(), "evals": self.evals.clone(), "energy": self.energy.clone()}

    @staticmethod
    def from_state(state: dict) -> "TrackedSubspace":
        return TrackedSubspace(state["q"].clone(), state["evals"].clone(), state["energy"].clone())


@dataclass
class SubspaceRequest:
    """One pending update: refine `subspace` (None: start one) with `gram` (S, w, w), keeping k columns.
    `result` is set by `track_many` (a new TrackedSubspace; `subspace` itself is left as it was)."""

    subspace: TrackedSubspace | None
    gram: torch.Tensor
    k: int
    result: TrackedSubspace | None = None

    @property
    def fresh(self) -> bool:
        """Whether this update is a full eigendecomposition: no basis yet, k changes, or k is a large
        part of the width (then it is as cheap as the iteration, and exact)."""
        w = self.gram.shape[-1]
        return self.subspace is None or 4 * self.k >= w or self.k != self.subspace.q.shape[-1]


def track_many(requests: list[SubspaceRequest]) -> list[TrackedSubspace]:
    """Run every request (sets `request.result`), batching those of the same kind, width, k, dtype and
    device into one eigendecomposition (and one QR) over all their matrices; returns the results."""
    groups: dict[tuple, list[SubspaceRequest]] = {}
    for r in requests:
        key = (r.fresh, r.gram.shape[-1], r.k, r.gram.dtype, r.gram.device)
        groups.setdefault(key, []).append(r)
    for (fresh, _, k, _, _), group in groups.items():
        g = torch.cat([r.gram for r in group]).to(torch.float64)             # (sum S, w, w)
        energy = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        if fresh:
            evals, evecs = torch.linalg.eigh(g)                               # ascending
            q, evals = evecs.flip(-1)[..., :k], evals.flip(-1)[..., :k]
        else:
            # one warm-started subspace iteration with Rayleigh-Ritz (Halko et al. 2011, Alg. 4.3)
            y = g @ torch.cat([r.subspace.q for r in group]).to(torch.float64)       # (sum S, w, k)
            y, _ = torch.linalg.qr(y)
            evals, v = torch.linalg.eigh(y.mT @ g @ y)                        # (sum S, k, k), ascending
            q, evals = y @ v.flip(-1), evals.flip(-1)
        evals = evals.clamp_min(0)
        start = 0
        for r in group:
            rows = slice(start, start + r.gram.shape[0])
            start = rows.stop
            # in the activations' dtype, which may differ from the previous basis' (a float64 continuation)
            r.result = TrackedSubspace(q[rows].to(r.gram.dtype).contiguous(), evals[rows], energy[rows])
    return [r.result for r in requests]


def tail_factors_from(evals: list[list[float]], energy: list[float], r: int) -> dict[str, float]:
    """`TrackedSubspace.tail_factors` from its Ritz values evals (S lists of k, decreasing) and energies
    (S,), as plain numbers: the residual at rank c is sqrt(energy - sum of the top c Ritz values)."""
    k = len(evals[0])
    cols = {name: c for name, c, ok in (("up", 2 * r, 2 * r <= k), ("down", r // 2, r // 2 >= 1)) if ok}
    if r > k or not cols:
        return {}
    floor = 1e-30 * math.sqrt(max(max(energy), 1e-30))

    def tail(s: int, c: int) -> float:
        return math.sqrt(max(energy[s] - math.fsum(evals[s][:c]), 0.0))

    out = {}
    for name, c in cols.items():
        out[name] = max(tail(s, c) / max(tail(s, r), floor) for s in range(len(energy)))
    return out
