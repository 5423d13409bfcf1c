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
the jet streams of one activation).
"""

from __future__ import annotations

import torch

__all__ = ["TrackedSubspace"]


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
        g = gram.to(torch.float64)
        evals, evecs = torch.linalg.eigh(g)                                  # ascending
        return TrackedSubspace(evecs.flip(-1)[..., :k].to(gram.dtype).contiguous(),
                               evals.flip(-1)[..., :k].clamp_min(0), g.diagonal(dim1=-2, dim2=-1).sum(-1))

    def update(self, gram: torch.Tensor, k: int) -> None:
        """Refine the basis with the next Gram matrix (S, w, w), keeping k columns."""
        g = gram.to(torch.float64)
        w = g.shape[-1]
        if 4 * k >= w or k != self.q.shape[-1]:
            fresh = TrackedSubspace.from_gram(g, k)
            self.q, self.evals, self.energy = fresh.q.to(self.q.dtype), fresh.evals, fresh.energy
            return
        y = g @ self.q.to(torch.float64)                                     # (S, w, k)
        q, _ = torch.linalg.qr(y)
        evals, v = torch.linalg.eigh(q.mT @ g @ q)                           # (S, k, k), ascending
        self.q = (q @ v.flip(-1)).to(self.q.dtype).contiguous()
        self.evals = evals.flip(-1).clamp_min(0)
        self.energy = g.diagonal(dim1=-2, dim2=-1).sum(-1)

    def tail_factors(self, r: int) -> tuple[list[str], torch.Tensor | None]:
        """How the residual norm ||Z - Z Q_r Q_r^T|| would change at rank 2r ("up") and r/2 ("down"),
        worst over S: (names, a device tensor of one factor per name), or ([], None) when the
        tracked columns cannot tell."""
        k = self.evals.shape[-1]
        names = [name for name, ok in (("up", 2 * r <= k), ("down", r // 2 >= 1)) if ok]
        if r > k or not names:
            return [], None
        cols = [r - 1] + [2 * r - 1 if name == "up" else r // 2 - 1 for name in names]
        captured = self.evals.cumsum(-1)[..., cols]                         # (S, 1 + len(names))
        tails = (self.energy[:, None] - captured).clamp_min(0).sqrt()
        floor = 1e-30 * self.energy.max().clamp_min(1e-30).sqrt()
        base = torch.maximum(tails[:, 0], floor)
        return names, (tails[:, 1:] / base[:, None]).amax(dim=0)

    def state(self) -> dict:
        return {"q": self.q.clone(), "evals": self.evals.clone(), "energy": self.energy.clone()}

    @staticmethod
    def from_state(state: dict) -> "TrackedSubspace":
        return TrackedSubspace(state["q"].clone(), state["evals"].clone(), state["energy"].clone())
