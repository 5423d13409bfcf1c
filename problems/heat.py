"""Heat equation in 1-D with homogeneous Dirichlet ends (DeepXDE's heat example).

    u_t = a u_xx,   x in [0, 1], t in [0, 1],   a = 0.4,
    u(x, 0) = sin(pi x),   u(0, t) = u(1, t) = 0,

exact solution u = exp(-a pi^2 t) sin(pi x) (the reference; DeepXDE's example with n = 1, L = 1).
"""

from __future__ import annotations

import math

import torch

from pinnsketch import pinn as ps

__all__ = ["Heat"]


class Heat(ps.Problem):
    """Heat 1-D, a = 0.4, one decaying sine mode (exact solution)."""

    name = "heat"
    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    a = 0.4
    conditions = (ps.Dirichlet(0.0), ps.Initial(lambda x: torch.sin(math.pi * x[:, 0])))
    tolerance = 1e-2

    def residual(self, x, u):
        return u.t - self.a * u.xx

    def exact(self, x):
        return (torch.exp(-self.a * math.pi**2 * x[:, 1]) * torch.sin(math.pi * x[:, 0]))[:, None]
