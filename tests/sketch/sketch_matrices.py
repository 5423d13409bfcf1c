"""Matrices with known singular values for the sketch tests (a uniquely named helper module)."""

import torch

#: Singular value profiles of length 80: slow (polynomial) and fast (exponential) decay.
_I = torch.arange(1, 81, dtype=torch.float64)
SPECTRA = {
    "poly1": _I**-1.0,
    "poly2": _I**-2.0,
    "exp": 0.7**_I,
}


def known_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """A = U diag(s) V^T (float64) with random orthonormal U (m, p), V (n, p)."""
    gen = torch.Generator().manual_seed(seed)
    p = singular_values.numel()
    u = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q
    return (u * singular_values) @ v.mT


def tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Optimal rank-``rank`` Frobenius error: sqrt(sum_{i > rank} s_i^2)."""
    return float(singular_values[rank:].square().sum().sqrt())
