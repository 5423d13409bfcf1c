"""Wave equation in 1-D: two standing modes, released with an initial velocity.

    u_tt = c^2 u_xx,   x in [0, 1], t in [0, 1],   c = 1,
    u(x, 0) = sin(pi x),   u_t(x, 0) = pi c sin(2 pi x),   u(0, t) = u(1, t) = 0,

exact solution u = sin(pi x) cos(pi c t) + sin(2 pi x) sin(2 pi c t) / 2 (the reference).
This is pinnsketch's own test case. DeepXDE's wave_1d example (from Wang, Wang &
Perdikaris 2021) is a different, multi-scale problem: c = 10, zero initial velocity,
u = sin(pi x) cos(10 pi t) + sin(2 pi x) cos(20 pi t).
"""

from __future__ import annotations

import math

import torch

from pinnsketch import pinn as ps

__all__ = ["Wave"]

C = 1.0  # wave speed; a module constant because the initial velocity (a class-level condition) uses it


class Wave(ps.Problem):
    """Wave 1-D, c = 1, initial displacement and velocity (exact solution)."""

    name = "wave"
    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    c = C
    conditions = (
        ps.Dirichlet(0.0),
        # weighted 10x: measured (32 x 3 network, 4,000 Adam + 1,500 L-BFGS steps, 2,000 points)
        # relative L2 0.16 with unit weights, 0.026 with these
        ps.Initial(lambda x: torch.sin(math.pi * x[:, 0]), weight=10.0),
        ps.InitialVelocity(lambda x: math.pi * C * torch.sin(2 * math.pi * x[:, 0]), weight=10.0),
    )
    tolerance = 2e-2

    def residual(self, x, u):
        return u.tt - self.c**2 * u.xx

    def exact(self, x):
        s, t = math.pi * x[:, 0], math.pi * self.c * x[:, 1]
        return (torch.sin(s) * torch.cos(t) + 0.5 * torch.sin(2 * s) * torch.sin(2 * t))[:, None]
