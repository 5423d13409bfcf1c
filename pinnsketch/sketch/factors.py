"""Low-rank factored matrices A_hat = Q C P^T."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_int, check_tensor

__all__ = ["LowRankFactors"]


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """A_hat = Q @ C @ P.T with Q (m, r), C (r, r), P (n, r); Q and P have orthonormal columns.

    Products never form the dense (m, n) matrix: :meth:`matmul` and
    :meth:`rmatmul` cost O((m + n) r b) for b right-hand sides.
    """

    Q: torch.Tensor
    C: torch.Tensor
    P: torch.Tensor

    def __post_init__(self):
        for name in ("Q", "C", "P"):
            check_tensor(name, getattr(self, name), ndim=(2,))
        r = self.Q.shape[1]
        if self.C.shape != (r, self.P.shape[1]) or self.P.shape[1] != r:
            raise ValueError(f"inconsistent factor shapes: Q {tuple(self.Q.shape)}, C {tuple(self.C.shape)}, "
                             f"P {tuple(self.P.shape)}; need Q (m, r), C (r, r), P (n, r)")

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the represented matrix."""
        return (self.Q.shape[0], self.P.shape[0])

    @property
    def rank(self) -> int:
        """Inner dimension r (an upper bound on the numerical rank)."""
        return self.C.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.Q, self.C, self.P))

    @property
    def T(self) -> "LowRankFactors":
        """The transpose A_hat^T = P C^T Q^T (no copy)."""
        return LowRankFactors(self.P, self.C.mT, self.Q)

    def matmul(self, b: torch.Tensor) -> torch.Tensor:
        """A_hat @ b for b (n,) or (n, j)."""
        return self.Q @ (self.C @ (self.P.mT @ b))

    def rmatmul(self, b: torch.Tensor) -> torch.Tensor:
        """b @ A_hat for b (m,) or (j, m); e.g. a weight gradient G^T @ A_hat with b = G^T."""
        return ((b @ self.Q) @ self.C) @ self.P.mT

    def dense(self) -> torch.Tensor:
        """The dense (m, n) matrix."""
        return self.Q @ self.C @ self.P.mT

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD (U (m, r), S (r,), Vh (r, n)) of A_hat, via the SVD of the small core C."""
        u, s, vh = torch.linalg.svd(self.C)
        return self.Q @ u, s, vh @ self.P.mT

    def truncate(self, rank: int) -> "LowRankFactors":
        """Best rank-``rank`` approximation of A_hat (SVD of C); the new C is diagonal."""
        rank = check_int("rank", rank, minimum=1, maximum=self.rank,
                         hint=f"these factors have rank {self.rank}")
        u, s, vh = torch.linalg.svd(self.C)
        return LowRankFactors(self.Q @ u[:, :rank], torch.diag(s[:rank]), self.P @ vh[:rank].mT)
