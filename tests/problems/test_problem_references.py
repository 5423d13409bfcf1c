"""Classical reference solutions of the problem library, checked without any network."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pinnsketch.problems.allen_cahn import allen_cahn_etdrk4
from pinnsketch.problems.burgers import cole_hopf

NU = 0.01 / math.pi
SHARED_BURGERS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "burgers_deepxde.npz"


def _relative_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(not SHARED_BURGERS.exists(), reason="shared DeepXDE Burgers data not present")
def test_cole_hopf_matches_deepxde_data():
    data = np.load(SHARED_BURGERS)
    x, t, usol = data["x"].ravel(), data["t"].ravel(), data["usol"]
    u = cole_hopf(x[:, None], t[None, :], NU)
    assert u.shape == usol.shape == (256, 100)
    # measured 2.9e-12 (the DeepXDE data was itself made by Cole-Hopf quadrature)
    assert _relative_l2(u, usol) < 1e-10
    assert np.abs(u - usol).max() < 1e-9


def test_cole_hopf_initial_boundary_and_quadrature_convergence():
    x = np.linspace(-1, 1, 101)
    np.testing.assert_allclose(cole_hopf(x, 0.0, NU), -np.sin(math.pi * x), atol=1e-14)
    t = np.linspace(0, 1, 21)
    np.testing.assert_allclose(cole_hopf(-1.0, t, NU), 0.0, atol=1e-12)
    np.testing.assert_allclose(cole_hopf(1.0, t, NU), 0.0, atol=1e-12)
    # around the shock (x = 0, t >= 0.3) the integrals live in the Gaussian's far tails
    X, T = np.meshgrid(np.linspace(-0.05, 0.05, 41), np.linspace(0.3, 1.0, 8), indexing="ij")
    fine = cole_hopf(X, T, NU, n_quad=1000)
    coarse = cole_hopf(X, T, NU, n_quad=40)
    assert _relative_l2(coarse, fine) > 1e-3  # too few nodes is visibly wrong ...
    assert _relative_l2(cole_hopf(X, T, NU), fine) < 1e-13  # ... the default is converged


def test_cole_hopf_satisfies_burgers_by_finite_differences():
    # points away from the shock, where central differences with h = 1e-4 are accurate to ~1e-7
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.9, 0.9, 200)
    t = rng.uniform(0.05, 0.25, 200)  # before the shock forms
    h = 1e-4
    u = cole_hopf(x, t, NU)
    u_t = (cole_hopf(x, t + h, NU) - cole_hopf(x, t - h, NU)) / (2 * h)
    u_x = (cole_hopf(x + h, t, NU) - cole_hopf(x - h, t, NU)) / (2 * h)
    u_xx = (cole_hopf(x + h, t, NU) - 2 * u + cole_hopf(x - h, t, NU)) / h**2
    residual = u_t + u * u_x - NU * u_xx
    scale = np.abs(u_t) + np.abs(u * u_x) + NU * np.abs(u_xx)
    assert np.max(np.abs(residual) / (scale + 1e-3)) < 1e-5
    # and a wrong viscosity is detected by the same check
    wrong = u_t + u * u_x - 2 * NU * u_xx
    assert np.max(np.abs(wrong) / (scale + 1e-3)) > 1e-3


@pytest.mark.parametrize("bad", [dict(nu=0.0), dict(nu=-1.0), dict(t=-0.1), dict(n_quad=1)])
def test_cole_hopf_rejects_bad_input(bad):
    args = dict(x=0.5, t=0.5, nu=NU) | {k: v for k, v in bad.items() if k != "n_quad"}
    with pytest.raises(ValueError):
        cole_hopf(args["x"], args["t"], args["nu"], **({"n_quad": bad["n_quad"]} if "n_quad" in bad else {}))


def test_allen_cahn_initial_condition_and_convergence():
    x = np.linspace(-1, 1, 129)
    t = np.linspace(0, 1, 11)
    fine = allen_cahn_etdrk4(x, t, n_modes=2048)
    assert fine.shape == (129, 11)
    # the kink of the periodic initial data at x = +-1 is resolved to O(1/n_modes^2)
    np.testing.assert_allclose(fine[:, 0], x**2 * np.cos(math.pi * x), atol=1e-5)
    # spatial refinement: the error drops about 4x per doubling (second order, from the kink)
    errors = [_relative_l2(allen_cahn_etdrk4(x, t, n_modes=n), fine) for n in (128, 256, 512)]
    assert errors[0] > 2.5 * errors[1] > 2.5**2 * errors[2]
    assert errors[2] < 1e-4
    # time refinement with fourth-order ETDRK4: a coarse step is already accurate, finer is better
    e_coarse = _relative_l2(allen_cahn_etdrk4(x, t, n_modes=512, dt=0.02), allen_cahn_etdrk4(x, t, n_modes=512))
    e_mid = _relative_l2(allen_cahn_etdrk4(x, t, n_modes=512, dt=0.01), allen_cahn_etdrk4(x, t, n_modes=512))
    assert e_mid < e_coarse / 8 and e_mid < 1e-5
    # the solution settles into the phases +-1 with u(+-1, t) = -1 at the periodic boundary
    assert fine.min() >= -1.0 - 1e-6 and fine.max() <= 1.0
    np.testing.assert_allclose(fine[[0, -1], -1], -1.0, atol=1e-4)


def test_allen_cahn_satisfies_pde_by_finite_differences():
    eps, dt, h = 1e-4, 1e-3, 2e-4
    x0 = np.linspace(-0.95, 0.95, 39)
    t0 = np.array([0.1, 0.5, 0.9])
    xs = np.concatenate([x0 - h, x0, x0 + h])
    ts = np.sort(np.concatenate([t0 - dt, t0, t0 + dt]))
    u = allen_cahn_etdrk4(xs, ts, n_modes=2048, dt=dt)
    n = len(x0)
    um, uc, up = u[:n], u[n : 2 * n], u[2 * n :]
    it = np.searchsorted(ts, t0)
    u_t = (uc[:, it + 1] - uc[:, it - 1]) / (2 * dt)
    u_xx = (up[:, it] - 2 * uc[:, it] + um[:, it]) / h**2
    c = uc[:, it]
    residual = u_t - eps * u_xx + 5 * c**3 - 5 * c
    scale = np.abs(u_t) + eps * np.abs(u_xx) + np.abs(5 * c**3 - 5 * c)
    assert np.max(np.abs(residual) / (scale + 1e-2)) < 1e-4  # measured 7e-6
    wrong = residual - eps * u_xx  # twice the diffusion
    assert np.max(np.abs(wrong) / (scale + 1e-2)) > 1e-2


def test_allen_cahn_rejects_bad_options():
    x = np.linspace(-1, 1, 5)
    with pytest.raises(ValueError, match="n_modes"):
        allen_cahn_etdrk4(x, [0.0, 0.1], n_modes=101)
    with pytest.raises(ValueError, match="multiples of dt"):
        allen_cahn_etdrk4(x, [0.0, 0.0105], dt=1e-3)
    with pytest.raises(ValueError, match="dt"):
        allen_cahn_etdrk4(x, [0.0], dt=0.0)
