"""Poisson 2-D on an L-shaped CSG domain, manufactured solution.

    -(u_xx + u_yy) = 2 pi^2 sin(pi x) sin(pi y)   on  [-1, 1]^2 minus [0, 1]^2,
    u = g on the boundary,

with exact solution u = sin(pi x) sin(pi y) + (x^2 - y^2) / 2 (the harmonic
term makes the boundary data g = u non-zero, and leaves the source unchanged).
The re-entrant corner at the origin is where a low-regularity Poisson problem
would be hard; this manufactured solution is smooth there. Reference: the exact
solution. DeepXDE's Poisson_Lshape example (-Lap u = 1, u = 0, on the same domain)
is the singular problem, `poisson_corner` in this library.

Defaults: a 64 x 4 tanh network. Measured on CPU, float32, one thread, the
solver's other defaults (5,000 Adam + 5,000 L-BFGS steps), relative L2:
32 x 4: 9.2e-4 under `exact`, 1.3e-3 under `lowrank`; 64 x 4: 3.9e-4 and
6.2e-4 (benchmarks/README.md, "Problem library"). Those runs had 4,500 distinct
points (deepxde's CSG sampling repeated a quarter of them); on 6,000 distinct
points, seed 0: 7.9e-4 and 6.0e-4.
"""

from __future__ import annotations

import math

import torch

from pinnsketch import pinn as ps

__all__ = ["PoissonLShape"]


def _solution(x: torch.Tensor) -> torch.Tensor:
    """u at x (N, 2) -> (N,)."""
    a, b = x[:, 0], x[:, 1]
    return torch.sin(math.pi * a) * torch.sin(math.pi * b) + 0.5 * (a**2 - b**2)


class PoissonLShape(ps.Problem):
    """Poisson 2-D on an L-shaped domain (CSG difference), manufactured smooth solution."""

    name = "poisson"
    domain = ps.geometry.Rectangle((-1, -1), (1, 1)) - ps.geometry.Rectangle((0, 0), (1, 1))
    conditions = (ps.Dirichlet(_solution),)
    tolerance = 1e-3
    solver_defaults = {"network": ps.Network(width=64, depth=4, activation="tanh")}

    def residual(self, x, u):
        source = 2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
        return u.xx + u.yy + source

    def exact(self, x):
        return _solution(x)[:, None]
