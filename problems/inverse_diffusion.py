"""Inverse problem: recover a diffusivity from point observations.

    u_t = D u_xx,   x in [0, 1], t in [0, 1],   u(x, 0) = sin(pi x),   u(0, t) = u(1, t) = 0,

with D unknown (trainable `ps.Parameter`, initial guess 1) and 50 noise-free
observations of u = exp(-D pi^2 t) sin(pi x) for the true D = 0.1, on a
5 x 10 grid of interior points. The solve must recover D and u; the reference is
that exact solution. This is pinnsketch's own set-up: DeepXDE's diffusion_1d_inverse
example has a source term, x in [-1, 1], true C = 1 (guess 2) and 10 observations at t = 1.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch

from pinnsketch import pinn as ps

from ._grid import tensor_grid

__all__ = ["InverseDiffusion"]

TRUE_D = 0.1


def _solution(x: np.ndarray, d: float) -> np.ndarray:
    """u at x (N, 2) for diffusivity d -> (N,), numpy."""
    return np.exp(-d * math.pi**2 * x[:, 1]) * np.sin(math.pi * x[:, 0])


# observation sites: x = 0.1, 0.3, ..., 0.9 at t = 0.1, 0.2, ..., 1.0
_SITES = tensor_grid(np.linspace(0.1, 0.9, 5), np.linspace(0.1, 1.0, 10))


class InverseDiffusion(ps.Problem):
    """Inverse heat 1-D: learn D (true 0.1, guess 1.0) from 50 observations (exact solution)."""

    name = "inverse_diffusion"
    domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
    D = ps.Parameter(1.0)
    true_parameters = MappingProxyType({"D": TRUE_D})
    conditions = (
        ps.Dirichlet(0.0),
        ps.Initial(lambda x: torch.sin(math.pi * x[:, 0])),
        ps.PointData(_SITES, _solution(_SITES, TRUE_D)),
    )
    tolerance = 1e-2  # relative L2 of u
    parameter_tolerance = 2e-2  # relative error of D

    def residual(self, x, u):
        return u.t - self.D * u.xx

    def exact(self, x):
        return (torch.exp(-TRUE_D * math.pi**2 * x[:, 1]) * torch.sin(math.pi * x[:, 0]))[:, None]
