"""The L-shape corner-singularity problem's finite-difference reference, checked without any network."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pinnsketch import problems
from pinnsketch.problems.poisson_corner import CORNER_EXPONENT, lshape_poisson_fd, lshape_poisson_reference

# -Lap u = 1 on the square (-1, 1)^2 with u = 0: its maximum (at the centre) is 4 x the unit square's
# 0.0736713 (the torsion function of a square, e.g. Timoshenko & Goodier, Theory of Elasticity, sec. 109).
SQUARE_SIDE_2_MAX = 0.2946854


def _relative_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _on_grid(x: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
    """Reference values (M, 1) at nodes x (M, 2) back on the (n + 1, n + 1) grid, NaN off the L."""
    grid = np.full((n + 1, n + 1), np.nan)
    index = np.rint((x + 1.0) * n / 2).astype(int)
    np.testing.assert_allclose(index * 2.0 / n - 1.0, x, atol=1e-12)  # the points are grid nodes
    grid[index[:, 0], index[:, 1]] = u[:, 0]
    return grid


@pytest.fixture(scope="module")
def reference():
    return problems.get("poisson_corner").reference()


def test_reference_grid_covers_the_closed_l(reference):
    x, u = reference
    assert x.shape == (129**2 - 64**2, 2) and u.shape == (len(x), 1)
    assert np.isfinite(u).all()
    in_square = (np.abs(x) <= 1).all(axis=1)
    in_removed = (x[:, 0] > 0) & (x[:, 1] > 0)
    assert in_square.all() and not in_removed.any()
    boundary = (np.abs(x) == 1).any(axis=1) | ((x[:, 0] >= 0) & (x[:, 1] == 0)) | ((x[:, 1] >= 0) & (x[:, 0] == 0))
    assert boundary.sum() == 8 * 64  # perimeter 8, spacing 1/64
    np.testing.assert_array_equal(u[boundary], 0.0)
    assert u[~boundary].min() > 0  # maximum principle: a positive source gives a positive solution


def test_reference_agrees_with_a_finer_discretization(reference):
    # the docstring's stated error of the default (Richardson of 128 and 256 cells per side): about 2.5e-5
    # (measured 2.4e-5 against Richardson (512, 1024)); against the next level (256, 512) it is 2.0e-5
    x, u = reference
    x_fine, u_fine = lshape_poisson_reference(n_fd=256)
    np.testing.assert_array_equal(x, x_fine)
    difference = _relative_l2(u, u_fine)
    assert 1e-6 < difference < 5e-5  # not identical (a finer solve happened), and within the stated error


def test_plain_finite_differences_converge_at_the_corner_rate():
    # the r^(2/3) singularity limits the 5-point scheme to h^(4/3): halving h divides the change by
    # 2^(4/3) = 2.52 (a smooth solution would give 4), which is the exponent the extrapolation uses
    def coarse(n):
        return np.nan_to_num(lshape_poisson_fd(n)[:: n // 32, :: n // 32])

    u = {n: coarse(n) for n in (64, 128, 256)}
    changes = [np.linalg.norm(u[n] - u[2 * n]) for n in (64, 128)]
    rate = math.log2(changes[0] / changes[1])  # measured 1.39
    assert abs(rate - CORNER_EXPONENT) < 0.15, rate


def test_reference_solves_the_equation_away_from_the_corner(reference):
    grid = _on_grid(*reference, 128)
    h = 1 / 64
    lap = (grid[2:, 1:-1] + grid[:-2, 1:-1] + grid[1:-1, 2:] + grid[1:-1, :-2] - 4 * grid[1:-1, 1:-1]) / h**2
    c = np.linspace(-1, 1, 129)[1:-1]
    X, Y = np.meshgrid(c, c, indexing="ij")
    interior = np.isfinite(lap) & ~((X >= 0) & (Y >= 0))
    away = interior & (np.hypot(X, Y) > 0.25) & (np.maximum(np.abs(X), np.abs(Y)) < 0.9)
    # -Lap_h u = 1 up to the 5-point truncation error (measured max 0.03 here)
    assert np.abs(lap[away] + 1).max() < 0.05
    # at the corner's neighbours the discrete Laplacian of the true solution is far off: u is not C^2 there
    corner = interior & (np.hypot(X, Y) < 1.5 * h)
    assert np.abs(lap[corner] + 1).max() > 1.0


def test_reference_symmetry_maximum_and_corner_behaviour(reference):
    x, u = reference
    grid = _on_grid(x, u, 128)
    # (x, y) -> (y, x) maps the L onto itself (the removed square [0, 1]^2 lies on the diagonal y = x)
    np.testing.assert_allclose(grid, grid.T, atol=1e-12)
    # (x, y) -> (-y, -x) does not: it maps the removed quadrant onto the third, so u is not symmetric about y = -x
    mirrored = grid[::-1, ::-1].T
    both = np.isfinite(grid) & np.isfinite(mirrored)
    assert np.abs(grid - mirrored)[both].max() > 0.05
    # the maximum sits on the diagonal in the third quadrant (measured 0.14941 at (-0.328, -0.328)) and lies
    # between the solutions on the square (-1, 0)^2 inside the L and on the square (-1, 1)^2 around it
    top = int(np.argmax(u))
    assert x[top, 0] == x[top, 1] and -0.4 < x[top, 0] < -0.25
    assert SQUARE_SIDE_2_MAX / 4 < u[top, 0] < SQUARE_SIDE_2_MAX
    assert grid[32, 32] > SQUARE_SIDE_2_MAX / 4  # at (-0.5, -0.5), the small square's centre
    # along the diagonal into the L, u ~ K r^(2/3): the local exponent log2(u(2r) / u(r)) tends to 2/3
    # (measured 0.65, 0.62, 0.55 for r = 0.022, 0.044, 0.088; a smooth u vanishing at the corner gives >= 1)
    diagonal = grid[np.arange(64, -1, -1), np.arange(64, -1, -1)]  # r = k sqrt(2) / 64, k = 0..64
    exponents = [math.log2(diagonal[2 * k] / diagonal[k]) for k in (1, 2, 4)]
    assert exponents[0] > exponents[1] > exponents[2]
    assert abs(exponents[0] - 2 / 3) < 0.04


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=7), "even int"), (dict(n=2), "even int"), (dict(n=True), "even int"),
])
def test_fd_rejects_bad_grids(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lshape_poisson_fd(**kwargs)


def test_reference_rejects_misaligned_grids():
    with pytest.raises(ValueError, match="multiple of n_eval"):
        lshape_poisson_reference(n_eval=64, n_fd=96)
    with pytest.raises(ValueError, match="n_eval"):
        lshape_poisson_reference(n_eval=63)
