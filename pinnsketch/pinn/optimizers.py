"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, arXiv 2409.11321).

For a weight matrix W (m, n) with gradient G, SOAP keeps Shampoo's factors

    L <- b L + (1 - b) G G^T   (m, m),     R <- b R + (1 - b) G^T G   (n, n),

and their eigenvectors Q_L, Q_R, refreshed every `precondition_every` steps.
Adam's second moment lives in the rotated space G' = Q_L^T G Q_R; the first
moment is kept in the original space and rotated when used; the update
Q_L (m' / (sqrt(v') + eps)) Q_R^T is rotated back. Vectors (biases) and
scalars (inverse-problem parameters) get plain Adam. The eigenvectors are
computed in float64 (`torch.linalg.eigh`) from float32 factors, so the
optimizer runs in float32; matrices of a PINN are small (width x width), so
a refresh costs little.

Wang et al. 2025 ("Gradient alignment in physics-informed neural networks: a
second-order optimization perspective") report SOAP well ahead of Adam on
PINN benchmarks; here it replaces Adam in the first phase (`adam=ps.SOAP(...)`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SOAPOptimizer"]


class SOAPOptimizer(torch.optim.Optimizer):
    """SOAP for parameters of any shape (matrices preconditioned, the rest plain Adam).

    Args:
        params: iterable of tensors; lr: step size; betas: (b1, b2) of Adam's moments;
        shampoo_beta: decay of L and R (None: b2); eps: Adam's epsilon;
        precondition_every: steps between eigenbasis refreshes.
    The first step of a matrix only initializes its factors and eigenbasis (no update), as in the paper's code.
    """

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, precondition_every: int = 10):
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=betas[1] if shampoo_beta is None else shampoo_beta,
                        eps=eps, precondition_every=precondition_every)
        super().__init__(params, defaults)

    @staticmethod
    def _eigenbasis(factor: torch.Tensor) -> torch.Tensor:
        """Eigenvectors of a symmetric PSD factor, largest eigenvalue first, in the factor's dtype."""
        _, vectors = torch.linalg.eigh(factor.double())
        return vectors.flip(-1).to(factor.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            bs, eps, lr, every = group["shampoo_beta"], group["eps"], group["lr"], group["precondition_every"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                matrix = g.dim() == 2
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                    if matrix:
                        state["L"] = (1 - bs) * g @ g.T
                        state["R"] = (1 - bs) * g.T @ g
                        state["QL"], state["QR"] = self._eigenbasis(state["L"]), self._eigenbasis(state["R"])
                        continue
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                if matrix:
                    ql, qr = state["QL"], state["QR"]
                    v.mul_(b2).addcmul_(ql.T @ g @ qr, ql.T @ g @ qr, value=1 - b2)
                    direction = ql @ ((ql.T @ m @ qr) / (v.sqrt() + eps)) @ qr.T
                else:
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    direction = m / (v.sqrt() + eps)
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.add_(direction, alpha=-step_size)
                if matrix:
                    state["L"].mul_(bs).add_(g @ g.T, alpha=1 - bs)
                    state["R"].mul_(bs).add_(g.T @ g, alpha=1 - bs)
                    if t % every == 0:
                        state["QL"], state["QR"] = self._eigenbasis(state["L"]), self._eigenbasis(state["R"])
        return loss
