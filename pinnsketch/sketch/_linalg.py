"""Small dense linear-algebra helpers shared by the sketch modules (private)."""

from __future__ import annotations

import torch


def orth(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a (m, k), m >= k: the reduced QR factor Q (m, k)."""
    return torch.linalg.qr(a, mode="reduced").Q


def lstsq_qr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least-squares solution x = a^+ b for a (s, k) of full column rank, b (s, m) -> (k, m).

    Householder QR and a triangular solve: no normal equations, no explicit
    inverse, and the same code path on CPU and CUDA (``torch.linalg.lstsq`` has
    only the QR-based 'gels' driver on CUDA anyway).
    """
    q, r = torch.linalg.qr(a, mode="reduced")
    return torch.linalg.solve_triangular(r, q.mT @ b, upper=True)
