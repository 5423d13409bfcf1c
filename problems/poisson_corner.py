"""Poisson 2-D on the L-shape with a re-entrant corner singularity (no closed-form solution).

    -(u_xx + u_yy) = 1   on  (-1, 1)^2 minus [0, 1]^2,
    u = 0 on the boundary.

The interior angle at the re-entrant corner (0, 0) is 3 pi / 2, so near it
u ~ K r^(2/3) sin(2/3 (theta - pi/2)) (polar angle theta in [pi/2, 2 pi]): u is
continuous but its gradient is unbounded at the corner. The domain and the data
are symmetric under (x, y) -> (y, x), and so is u; the maximum, u = 0.1494, lies
on the diagonal y = x near (-0.33, -0.33).

Reference: the 5-point finite-difference Laplacian on uniform grids whose lines
pass through the corner (`lshape_poisson_fd`, scipy.sparse + spsolve), combined
by Richardson extrapolation with the exponent 4/3 (`lshape_poisson_reference`).
Measured relative L2 on the evaluation grid (h = 1/64, 12,545 nodes):

    plain FD, n and 2n cells per side:  n = 128/256: 7.8e-4, 256/512: 3.1e-4, 512/1024: 1.2e-4
        (a factor 2.55 = 2^1.35 per halving: the h^(4/3) of the corner singularity)
    Richardson (n, 2n) against Richardson (512, 1024):  (128, 256): 2.4e-5,  (256, 512): 6.5e-6

so the default reference, Richardson (128, 256) (0.3 s), is accurate to about 2.5e-5 relative
L2, far below the PINN tolerance. The plain FD solution with 1024 cells per side is 7.9e-5 from it.

PINN with the solver defaults (32 x 4 tanh, 5,000 Adam + 5,000 L-BFGS steps, 6,000 points with
RAR, float32, exact storage; benchmarks/results/poisson_corner.json): relative L2 4.2e-2 against
this reference, 0.18 at the end of Adam. The error gathers at the corner: 41% of the squared
error lies within r < 0.2 (3% of the nodes), the largest, 0.047, at the corner itself. That run
predates the fix of the CSG boundary sampler: deepxde's put about a quarter of the boundary points
on the removed square's far edges x = 1 and y = 1, outside the L, and `pinnsketch.pinn.geometry`
now keeps only points on the L's own boundary.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl

from pinnsketch import pinn as ps

from ._grid import CachedReference, tensor_grid

__all__ = ["PoissonCorner", "lshape_poisson_fd", "lshape_poisson_reference", "CORNER_EXPONENT"]

#: Order of the 5-point scheme's error for this problem: the corner singularity's r^(2/3) limits
#: it to h^(4/3) (measured 1.35 between 128 and 1024 cells per side).
CORNER_EXPONENT = 4.0 / 3.0


def _check_cells(n: int, name: str) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 4 or n % 2:
        raise ValueError(f"{name}={n!r} must be an even int >= 4 (cells per side; even so a grid line "
                         "passes through the re-entrant corner)")


def _inside(n: int) -> np.ndarray:
    """(n + 1, n + 1) bool: the nodes strictly inside the L on the grid of n cells per side, indexed [x, y]."""
    i = np.arange(n + 1)
    interior = (i > 0) & (i < n)
    half = i >= n // 2
    return interior[:, None] & interior[None, :] & ~(half[:, None] & half[None, :])


def lshape_poisson_fd(n: int, source: float = 1.0) -> np.ndarray:
    """5-point finite differences for -Lap u = source on the L-shape, u = 0 on its boundary.

    Grid: nodes -1 + 2 k / n, k = 0..n, in x and y (h = 2 / n); n even, so the lines
    x = 0 and y = 0 are grid lines and the corner (0, 0) is a node. The sparse system
    over the ~3 n^2 / 4 interior nodes is solved directly (spsolve).

    Returns:
        u (n + 1, n + 1) float64 indexed [x, y]: 0 on the boundary, NaN on the nodes strictly
        inside the removed square (0, 1]^2 \\ boundary, which are not part of the domain.
    """
    _check_cells(n, "n")
    h = 2.0 / n
    inside = _inside(n)
    index = np.full(inside.shape, -1, dtype=np.int64)
    m = int(inside.sum())
    index[inside] = np.arange(m)
    ii, jj = np.nonzero(inside)
    rows, cols, vals = [np.arange(m)], [np.arange(m)], [np.full(m, 4.0)]
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        neighbour = index[ii + di, jj + dj]
        known = neighbour >= 0  # boundary neighbours carry u = 0: nothing moves to the right-hand side
        rows.append(np.flatnonzero(known))
        cols.append(neighbour[known])
        vals.append(np.full(int(known.sum()), -1.0))
    matrix = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
    u = np.zeros(inside.shape)
    u[inside] = spl.spsolve(matrix, np.full(m, h * h * float(source)))
    i = np.arange(n + 1)
    removed = (i > n // 2)[:, None] & (i > n // 2)[None, :]
    u[removed] = np.nan
    return u


def lshape_poisson_reference(n_eval: int = 128, n_fd: int = 128, source: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Richardson-extrapolated finite-difference solution on the evaluation grid.

    Solves with n_fd and 2 n_fd cells per side (`lshape_poisson_fd`) and combines
    u_2n + (u_2n - u_n) / (2^(4/3) - 1) at the nodes of the evaluation grid
    (n_eval cells per side), which both FD grids contain.

    Returns:
        x (M, 2): the evaluation grid's nodes in the closed L (boundary included), x slowest;
        u (M, 1) float64. M = (n_eval + 1)^2 - (n_eval / 2)^2 (12,545 for n_eval = 128).
    """
    _check_cells(n_eval, "n_eval")
    _check_cells(n_fd, "n_fd")
    if n_fd % n_eval:
        raise ValueError(f"n_fd={n_fd} must be a multiple of n_eval={n_eval} so the evaluation nodes are FD nodes")
    stride = n_fd // n_eval
    coarse = lshape_poisson_fd(n_fd, source)[::stride, ::stride]
    fine = lshape_poisson_fd(2 * n_fd, source)[:: 2 * stride, :: 2 * stride]
    u = fine + (fine - coarse) / (2.0**CORNER_EXPONENT - 1.0)
    axis = np.linspace(-1.0, 1.0, n_eval + 1)
    keep = np.isfinite(u).ravel()
    return tensor_grid(axis, axis)[keep], u.reshape(-1, 1)[keep]


class PoissonCorner(CachedReference, ps.Problem):
    """Poisson 2-D, -Lap u = 1 on the L-shape, u = 0: r^(2/3) corner singularity (reference: FD + Richardson)."""

    name = "poisson_corner"
    domain = ps.geometry.Rectangle((-1, -1), (1, 1)) - ps.geometry.Rectangle((0, 0), (1, 1))
    source = 1.0
    conditions = (ps.Dirichlet(0.0),)
    # measured 4.2e-2 with the defaults (see the module docstring); 2.4x margin for seeds and storage policies
    tolerance = 1e-1

    def residual(self, x, u):
        return u.xx + u.yy + self.source

    def compute_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """x (12545, 2) on the grid of spacing 1/64 in the closed L, rows in x-major order; u (12545, 1)."""
        return lshape_poisson_reference(source=self.source)
