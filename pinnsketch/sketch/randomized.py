"""Randomized range finder and SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 / 5.1)."""

from __future__ import annotations

import torch

from ._checks import check_finite, check_int, check_seed, check_tensor
from ._linalg import orth
from .operators import GaussianOperator

__all__ = ["randomized_range_finder", "randomized_svd"]


def _check_matrix(a) -> torch.Tensor:
    a = check_tensor("A", a, ndim=(2,))
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A has dtype {a.dtype}; pass a float32 or float64 matrix")
    check_finite("A", a)
    return a


def randomized_range_finder(a: torch.Tensor, size: int, *, power_iters: int = 2, seed: int = 0) -> torch.Tensor:
    """Orthonormal Q (m, size) whose span approximates the dominant range of A (m, n).

    Y = A Omega^T for a Gaussian Omega (size, n) drawn from ``seed`` on A's
    device, followed by ``power_iters`` subspace iterations (A A^T)^q, each
    re-orthonormalized to stay accurate in float32.
    """
    a = _check_matrix(a)
    m, n = a.shape
    size = check_int("size", size, minimum=1, maximum=min(m, n),
                     hint=f"the range of a {m} x {n} matrix has dimension <= {min(m, n)}")
    power_iters = check_int("power_iters", power_iters, minimum=0)
    omega = GaussianOperator(size, n, seed=check_seed(seed), dtype=a.dtype, device=a.device)
    q = orth(omega.apply_right(a))
    for _ in range(power_iters):
        q = orth(a @ orth(a.mT @ q))
    return q


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate truncated SVD of A (m, n): U (m, rank), S (rank,), Vh (rank, n).

    Uses a range of ``min(rank + oversample, min(m, n))`` columns from
    :func:`randomized_range_finder`, then the exact SVD of the small Q^T A.
    """
    a = _check_matrix(a)
    m, n = a.shape
    rank = check_int("rank", rank, minimum=1, maximum=min(m, n),
                     hint=f"a {m} x {n} matrix has rank <= {min(m, n)}")
    oversample = check_int("oversample", oversample, minimum=0)
    q = randomized_range_finder(a, min(rank + oversample, m, n), power_iters=power_iters, seed=seed)
    u, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ u[:, :rank], s[:rank], vh[:rank]
