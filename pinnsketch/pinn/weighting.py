"""Loss weights balanced by gradient norms (Wang, Teng & Perdikaris 2021; Wang et al. 2023).

    ps.solve(problem, balance=ps.GradNormWeights(every=1000, alpha=0.9))

Every `every` Adam steps the solver takes the gradient g_i of each unweighted
loss term L_i with respect to all trainable parameters (one backward pass per
term through the run's own network, so storage policies apply), and moves the
weights toward

    lambda_hat_i = sum_j ||g_j|| / ||g_i||,

the weights under which every weighted term pulls with the same gradient norm
(sum_j ||g_j||): lambda <- alpha lambda + (1 - alpha) lambda_hat. The weights
start from the fixed ones (`loss_weights` times the conditions' own weights),
are updated on the first Adam step, and stay fixed during L-BFGS, whose
curvature pairs need one objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ["GradNormWeights", "balanced_weights", "term_gradient_norms"]


@dataclass(frozen=True)
class GradNormWeights:
    """Gradient-norm loss balancing: update every `every` Adam steps, moving average `alpha` of the old weights."""

    every: int = 1_000
    alpha: float = 0.9

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"GradNormWeights every={self.every!r} must be a positive int (Adam steps between "
                             "updates)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha < 1:
            raise ValueError(f"GradNormWeights alpha={self.alpha!r} must be a number in [0, 1) (0: no moving "
                             "average)")

    def config(self) -> dict:
        return {"name": "gradnorm", **asdict(self)}


def term_gradient_norms(terms: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """||d terms[i] / d params|| for each term, (n_terms,), from one backward pass per term.

    The graph of `terms` is kept (retain_graph), so the training step's own backward can follow.
    """
    params = [p for p in params if p.requires_grad]
    norms = []
    for i in range(terms.numel()):
        grads = torch.autograd.grad(terms[i], params, retain_graph=True, allow_unused=True)
        sq = [g.detach().double().square().sum() for g in grads if g is not None]
        norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64))
    return torch.stack(norms).to(terms.device)


def balanced_weights(norms: torch.Tensor, previous: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * previous + (1 - alpha) * sum(norms) / norms, (n_terms,).

    A term with a zero (or non-finite) gradient norm keeps its previous weight:
    it cannot be balanced, and 1 / 0 would swamp the others.
    """
    norms = norms.to(previous.dtype)
    ok = torch.isfinite(norms) & (norms > 0)
    total = norms[ok].sum()
    target = torch.where(ok, total / torch.where(ok, norms, torch.ones_like(norms)), previous)
    out = alpha * previous + (1 - alpha) * target
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"balanced loss weights became non-finite: {out.tolist()} from gradient norms "
                                 f"{norms.tolist()}; lower the learning rate or use dtype='float64'")
    return out
