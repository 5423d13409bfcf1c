"""Wave equation in 1-D: two standing modes, released with an initial velocity.

    u_tt = c^2 u_xx,   x in [0, 1], t in [0, 1],   c = 1,
    u(x, 0) = sin(pi x),   u_t(x, 0) = pi c sin(2 pi x),   u(0, t) = u(1, t) = 0,

exact solution u = sin(pi x) cos(pi c t) + sin(2 pi x) sin(2 pi c t) / 2 (the reference).
The initial displacement and velocity and the boundary values are built into
`output_transform` (hard constraints from the initial data alone, not the
solution): u = sin(pi x) + pi c t sin(2 pi x) + 16 x (1 - x) t^2 N; the factor
16 keeps N of order one (without it, N must reach about 20 and Adam did not
fit it in 5,000 steps: relative L2 about 1.3 at the end of Adam under both
policies). Measured on CPU, float32, one thread, the solver's defaults
(32 x 4 tanh, 5,000 Adam + 5,000 L-BFGS steps), relative L2: 1.4e-2 (`exact`)
and 1.5e-2 (`lowrank`) with the conditions as loss terms (weighted 10x);
1.7e-4 and 1.7e-4 with these hard constraints (benchmarks/README.md,
"Problem library").

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
    conditions = ()  # built into output_transform
    tolerance = 1e-3

    def residual(self, x, u):
        return u.tt - self.c**2 * u.xx

    def output_transform(self, x, u):
        """u = sin(pi x) + pi c t sin(2 pi x) + 16 x (1 - x) t^2 N (the factor 16 lets N be O(1))."""
        xs, t = x[:, 0:1], x[:, 1:2]
        return (torch.sin(math.pi * xs) + math.pi * C * t * torch.sin(2 * math.pi * xs)
                + 16.0 * xs * (1 - xs) * t**2 * u)

    def exact(self, x):
        s, t = math.pi * x[:, 0], math.pi * self.c * x[:, 1]
        return (torch.sin(s) * torch.cos(t) + 0.5 * torch.sin(2 * s) * torch.sin(2 * t))[:, None]
