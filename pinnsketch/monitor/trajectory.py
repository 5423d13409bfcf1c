"""Streaming low-rank trackers of a (parameters x steps) matrix, filled one column per training step.

Two trackers with the same interface (``add_column``, ``reconstruct``, ``column_errors``,
``sketches`` / ``load_sketches``, ``nbytes``), both carrying a Gaussian error sketch
W = Theta A (q x steps) whose columns give an a-posteriori estimate of every reconstructed
column's error (Tropp et al. 2019, §6, applied column-wise: E ||Theta r||^2 = ||r||^2):

* :class:`TrajectorySketch`: the three-sketch of :class:`~pinnsketch.sketch.ThreeSketch`
  (linear, randomized, single pass; reconstruction rank k).
* :class:`IncrementalSVD`: a truncated SVD A ~ V diag(S) U^T updated with every new column
  (Brand 2002), keeping the ``rank`` leading directions. Deterministic and, on gradient
  histories whose spectrum decays, much closer to the best rank-``rank`` approximation than a
  randomized sketch of the same memory (see benchmarks/gradient_monitoring.py); not linear in A.
"""

from __future__ import annotations

import torch

from ..sketch import LowRankFactors, ThreeSketch, derive_seed, make_operator

__all__ = ["TrajectorySketch", "IncrementalSVD"]


def _column_errors(theta, w: torch.Tensor, factors: LowRankFactors) -> torch.Tensor:
    """||A[:, j] - A_hat[:, j]|| estimates from the error sketch W = Theta A, shape (n,)."""
    residual = w - (theta.apply(factors.Q) @ factors.C) @ factors.P.mT
    return torch.linalg.vector_norm(residual, dim=0)


def _check_column(shape: tuple[int, int], j: int, v: torch.Tensor) -> None:
    if not 0 <= j < shape[1]:
        raise IndexError(f"column {j} is outside the tracked matrix of {shape[1]} columns")
    if v.shape != (shape[0],):
        raise ValueError(f"column of shape {tuple(v.shape)} does not fit a {shape[0]}-row matrix")


class TrajectorySketch(ThreeSketch):
    """:class:`~pinnsketch.sketch.ThreeSketch` of A (m params, n steps) built column by column.

    Adding the gradient ``v`` of step ``j`` is the linear update
    ``A <- A + v e_j^T``; applying it through the generic dense ``update`` would
    form an (m, n) matrix every step, so :meth:`add_column` applies the same
    update to each sketch with one column of the step-side test matrices:

    * Y = A Omega^T   += v Omega[:, j]^T           (m, k)
    * X = Upsilon A   [:, j] += Upsilon v          (k, n)
    * Z = Phi A Psi^T += (Phi v) Psi[:, j]^T       (s, s)
    * W = Theta A     [:, j] += Theta v            (q, n)

    Cost per step: O((k + s + q) m) plus drawing the test columns (nothing is stored).

    NOTE: this is the column-sparse case of ``ThreeSketch.update``; it writes the
    parent's sketch tensors in place and would move there as ``ThreeSketch.update_columns``
    if another user needs it.
    """

    def add_column(self, j: int, v: torch.Tensor) -> None:
        """A[:, j] += v for v (m,)."""
        _check_column(self.shape, j, v)
        ops = self.operators
        v = v.to(self.dtype)
        index = [j]
        self._Y.addr_(v, ops["Omega"].columns(index)[:, 0])
        self._X[:, j] += ops["Upsilon"].apply(v)
        self._Z.addr_(ops["Phi"].apply(v), ops["Psi"].columns(index)[:, 0])
        if self.error_size:
            self._W[:, j] += ops["Theta"].apply(v)

    def column_errors(self, factors: LowRankFactors) -> torch.Tensor:
        """Estimates of ||A[:, j] - A_hat[:, j]||_2 for every column j, shape (n,)."""
        if not self.error_size:
            raise ValueError("column error estimates need an error sketch; use error_size >= 1")
        return _column_errors(self.operators["Theta"], self._W, factors)

    def sketches(self) -> dict[str, torch.Tensor]:
        """The sketch tensors Y, X, Z, W by name (views, not copies)."""
        return {"Y": self._Y, "X": self._X, "Z": self._Z, "W": self._W}

    def load_sketches(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite Y, X, Z, W with saved values of the same shapes (resume, reading a run file)."""
        _load(self.sketches(), tensors)


class IncrementalSVD:
    """Truncated SVD A ~ V diag(S) U^T of an (m, n) matrix whose columns arrive one at a time.

    Adding column j (which must be the next one, 0, 1, 2, ...) with p = V^T v and
    rho q = v - V p (q a unit vector orthogonal to V):

        [A, v] = [V, q] K [U, e_j]^T,   K = [[diag(S), p], [0, rho]]   ((r+1) x (r+1))

    and the SVD of the small K gives the new factors, truncated to ``rank`` (Brand 2002).
    V and U are re-orthonormalized every ``reorthogonalize`` columns against round-off drift.
    Memory: V (m, rank) + U (n, rank) + the error sketch W (q, n); cost per column
    O((m + n) rank^2 + q m).

    Args:
        shape: (m, n); rank: directions kept; error_size: q, rows of the Gaussian error sketch;
        seed: of the error sketch's test matrix Theta; dtype, device: of the factors.
    """

    def __init__(self, shape: tuple[int, int], rank: int, *, error_size: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 reorthogonalize: int = 64):
        m, n = (int(d) for d in shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
            raise ValueError(f"rank={rank!r} must be an int in [1, min(rows, cols)={min(m, n)}]")
        self._shape, self._rank, self._q = (m, n), rank, int(error_size)
        self._seed, self._dtype = int(seed), dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._reorth = int(reorthogonalize)
        opts = dict(dtype=dtype, device=self._device)
        self._V = torch.zeros(m, rank, **opts)
        self._S = torch.zeros(rank, **opts)
        self._U = torch.zeros(n, rank, **opts)
        self._W = torch.zeros(self._q, n, **opts)
        self._filled = 0          # current rank
        self._count = 0           # columns added
        self._theta = (make_operator("gaussian", self._q, m, seed=derive_seed(self._seed, "Theta"), **opts)
                       if self._q else None)

    # -- description (the TrajectorySketch attributes the monitor reads) ----------------------
    shape = property(lambda self: self._shape)
    rank = property(lambda self: self._rank)
    k = property(lambda self: self._rank)
    s = property(lambda self: None)
    error_size = property(lambda self: self._q)
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)

    @property
    def nbytes(self) -> int:
        """Bytes held: V, S, U and the error sketch (Theta is regenerated from its seed)."""
        return sum(t.numel() * t.element_size() for t in (self._V, self._S, self._U, self._W))

    def __repr__(self) -> str:
        return f"IncrementalSVD(shape={self._shape}, rank={self._rank}, columns={self._count})"

    # -- updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def add_column(self, j: int, v: torch.Tensor) -> None:
        """Append column j (= the number of columns added so far) with values v (m,)."""
        _check_column(self._shape, j, v)
        if j != self._count:
            raise ValueError(f"IncrementalSVD columns arrive in order: expected column {self._count}, got {j}")
        v = v.to(self._dtype)
        if self._q:
            self._W[:, j] += self._theta.apply(v)
        r = self._filled
        V, S = self._V[:, :r], self._S[:r]
        p = V.mT @ v
        resid = v - V @ p
        p2 = V.mT @ resid                       # second Gram-Schmidt pass: keeps V orthonormal
        resid -= V @ p2
        p += p2
        rho = float(torch.linalg.vector_norm(resid))
        # A residual at round-off level is no new direction (normalizing it would break V's orthonormality).
        grow = rho > 1e3 * torch.finfo(self._dtype).eps * float(torch.linalg.vector_norm(v))
        k = torch.zeros(r + grow, r + 1, dtype=self._dtype, device=self._device)
        k[:r, :r] = torch.diag(S)
        k[:r, r] = p
        if grow:
            k[r, r] = rho
        if k.numel():
            uk, sk, vkh = torch.linalg.svd(k, full_matrices=False)      # uk (r+g, c), vkh (c, r+1)
            keep = min(self._rank, sk.numel())
            basis = torch.cat([V, (resid / rho)[:, None]], dim=1) if grow else V
            vk = vkh.mT[:, :keep]                                       # (r+1, keep)
            new_u = self._U[:, :r] @ vk[:r]
            new_u[j] += vk[r]
            self._V[:, :keep], self._S[:keep], self._U[:, :keep] = basis @ uk[:, :keep], sk[:keep], new_u
            self._filled = keep
        self._count += 1
        if self._reorth and self._count % self._reorth == 0:
            self._reorthonormalize()

    def _reorthonormalize(self) -> None:
        r = self._filled
        qv, rv = torch.linalg.qr(self._V[:, :r])
        qu, ru = torch.linalg.qr(self._U[:, :r])
        a, s, bh = torch.linalg.svd(rv @ torch.diag(self._S[:r]) @ ru.mT)
        self._V[:, :r], self._S[:r], self._U[:, :r] = qv @ a, s, qu @ bh.mT

    # -- reconstruction -------------------------------------------------------------------------
    def reconstruct(self, rank: int | None = None) -> LowRankFactors:
        """A_hat = V diag(S) U^T (optionally its leading ``rank`` terms)."""
        r = max(self._filled, 1) if rank is None else min(rank, max(self._filled, 1))
        return LowRankFactors(self._V[:, :r], torch.diag(self._S[:r]), self._U[:, :r])

    def column_errors(self, factors: LowRankFactors) -> torch.Tensor:
        """Estimates of ||A[:, j] - A_hat[:, j]||_2 for every column j, shape (n,)."""
        if not self._q:
            raise ValueError("column error estimates need an error sketch; use error_size >= 1")
        return _column_errors(self._theta, self._W, factors)

    # -- state ----------------------------------------------------------------------------------
    def sketches(self) -> dict[str, torch.Tensor]:
        """V, S, U, W and the counters (rank in use, columns added) as tensors."""
        return {"V": self._V, "S": self._S, "U": self._U, "W": self._W,
                "filled": torch.tensor(self._filled), "count": torch.tensor(self._count)}

    def load_sketches(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.sketches()
        _load({k: own[k] for k in ("V", "S", "U", "W")}, tensors)
        self._filled, self._count = int(tensors["filled"]), int(tensors["count"])


def _load(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for name, target in own.items():
        value = saved[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"saved sketch {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value.to(target.device, target.dtype))
