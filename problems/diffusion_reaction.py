"""Diffusion-reaction in 1-D with a multi-scale source (DeepXDE's diffusion-reaction example).

    u_t = d u_xx + e^{-t} (3/2 sin 2x + 8/3 sin 3x + 15/4 sin 4x + 63/8 sin 8x),
    x in [-pi, pi], t in [0, 1],   d = 1,   u(+-pi, t) = 0,   u(x, 0) = g(x),

with exact solution u = e^{-t} g(x), g(x) = sin x + sin 2x / 2 + sin 3x / 3 + sin 4x / 4 + sin 8x / 8
(the reference). The boundary and initial values are loss terms here; DeepXDE's example
builds them into the output (u = t (pi^2 - x^2) N + g(x)).
"""

from __future__ import annotations

import math

import torch

from pinnsketch import pinn as ps

__all__ = ["DiffusionReaction"]

_MODES = (1, 2, 3, 4, 8)  # g = sum over these k of sin(k x) / k


def _profile(x: torch.Tensor) -> torch.Tensor:
    """g at x (N, d) (first column) -> (N,)."""
    return sum(torch.sin(k * x[:, 0]) / k for k in _MODES)


class DiffusionReaction(ps.Problem):
    """Diffusion-reaction 1-D, five sine modes up to sin 8x (exact solution)."""

    name = "diffusion_reaction"
    domain = ps.geometry.Interval(-math.pi, math.pi) * ps.geometry.TimeDomain(0, 1)
    d = 1.0
    conditions = (ps.Dirichlet(0.0), ps.Initial(_profile))
    tolerance = 2e-2

    def residual(self, x, u):
        # u = e^{-t} g solves this with source e^{-t} sum (d k - 1/k) sin(k x) = the stated one for d = 1
        source = torch.exp(-x[:, 1]) * sum((self.d * k - 1 / k) * torch.sin(k * x[:, 0]) for k in _MODES)
        return u.t - self.d * u.xx - source

    def exact(self, x):
        return (torch.exp(-x[:, 1]) * _profile(x))[:, None]
