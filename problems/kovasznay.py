"""Kovasznay flow: steady incompressible Navier-Stokes in 2-D, three fields (Kovasznay 1948; DeepXDE's Kovasznay_flow example).

    u u_x + v u_y + p_x - (u_xx + u_yy) / Re = 0,
    u v_x + v v_y + p_y - (v_xx + v_yy) / Re = 0,
    u_x + v_y = 0,          on [-0.5, 1] x [-0.5, 1.5],   Re = 20,

with exact solution (lam = Re/2 - sqrt(Re^2/4 + 4 pi^2))
    u = 1 - e^{lam x} cos(2 pi y),  v = lam / (2 pi) e^{lam x} sin(2 pi y),  p = (1 - e^{2 lam x}) / 2.
Velocities are given on the whole boundary, the pressure on the outflow x = 1
(it is otherwise determined only up to a constant), as in DeepXDE's example.
The reference is the exact solution.

Defaults: a 96 x 5 tanh network. Measured on CPU, float32, one thread, the
solver's other defaults (5,000 Adam + 5,000 L-BFGS steps), seed 0, relative L2
of the three fields: 96 x 5: 2.8e-4 under `exact`, 5.9e-4 under `lowrank`;
64 x 4: 1.4e-3 and 1.5e-3; 32 x 4: 2.7e-3 and 3.3e-3 (benchmarks/README.md,
"Problem library").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pinnsketch import pinn as ps

__all__ = ["Kovasznay"]

RE = 20.0
LAM = RE / 2 - math.sqrt(RE**2 / 4 + 4 * math.pi**2)


def _velocity_u(x: torch.Tensor) -> torch.Tensor:
    return 1 - torch.exp(LAM * x[:, 0]) * torch.cos(2 * math.pi * x[:, 1])


def _velocity_v(x: torch.Tensor) -> torch.Tensor:
    return LAM / (2 * math.pi) * torch.exp(LAM * x[:, 0]) * torch.sin(2 * math.pi * x[:, 1])


def _pressure(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 - torch.exp(2 * LAM * x[:, 0]))


def _outflow(x: np.ndarray, on_boundary: np.ndarray) -> np.ndarray:
    """Boundary points on the right edge x = 1, (n,) bool."""
    return on_boundary & np.isclose(x[:, 0], 1.0)


class Kovasznay(ps.Problem):
    """Kovasznay flow, steady Navier-Stokes at Re = 20, fields (u, v, p) (exact solution)."""

    name = "kovasznay"
    domain = ps.geometry.Rectangle((-0.5, -0.5), (1.0, 1.5))
    output_names = ("u", "v", "p")
    re = RE
    conditions = (
        ps.Dirichlet(_velocity_u, field="u"),
        ps.Dirichlet(_velocity_v, field="v"),
        ps.Dirichlet(_pressure, on=_outflow, field="p"),
    )
    tolerance = 1e-3
    solver_defaults = {"network": ps.Network(width=96, depth=5, activation="tanh")}

    def residual(self, x, u, v, p):
        return {
            "momentum_x": u * u.x + v * u.y + p.x - (u.xx + u.yy) / self.re,
            "momentum_y": u * v.x + v * v.y + p.y - (v.xx + v.yy) / self.re,
            "continuity": u.x + v.y,
        }

    def exact(self, x):
        return torch.stack([_velocity_u(x), _velocity_v(x), _pressure(x)], dim=1)
