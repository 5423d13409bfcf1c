"""Random test operators ("sketching matrices") S of shape (k, n): R^n -> R^k.

Scaling convention (all operators): **E[S^T S] = I_n** (Johnson-Lindenstrauss
scaling). Consequences the rest of the package relies on:

* ``E ||S x||^2 = ||x||^2``: a sketch preserves norms in expectation, so
  ``||S M||_F`` is an unbiased estimate of ``||M||_F`` (squared), which is how
  :class:`~pinnsketch.sketch.ThreeSketch` estimates errors;
* ``E[(S G)^T (S A)] = G^T A``: projecting the batch dimension of a weight
  gradient ``G^T A`` with S gives an unbiased gradient (the ``projection``
  storage policy).

An operator is defined by ``(k, n, seed, dtype, device)`` (plus its own
options) and is **regenerated from its seed** instead of being stored as a
dense matrix where the structure allows it. The same seed on a different
device or dtype gives a different (equally valid) matrix.

| operator | entries | stored | cost of S @ A (A: n x m) |
|---|---|---|---|
| :class:`GaussianOperator` | i.i.d. N(0, 1/k) | nothing (blocks redrawn per call) | O(k n m) |
| :class:`SparseSignOperator` | ``nnz`` of ±1/sqrt(nnz) per column | rows + signs (or nothing) | O(nnz n m) |
| :class:`SRFTOperator` | sqrt(n/k) R H D (Hartley transform) | n signs + k row indices | O(n m log n) |
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from types import MappingProxyType

import torch

from ._checks import check_choice, check_device, check_dtype, check_int, check_seed, check_tensor
from .seeding import derive_seed, make_generator

__all__ = [
    "AbstractSketchOperator",
    "GaussianOperator",
    "SparseSignOperator",
    "SRFTOperator",
    "OPERATORS",
    "make_operator",
]


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") (current device) matches "cuda:0" etc.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class AbstractSketchOperator(abc.ABC):
    """A random linear map S: R^n -> R^k, shape ``(k, n)``, with E[S^T S] = I_n.

    Subclasses implement :meth:`_matmul` (S @ A), :meth:`_tmatmul` (S^T @ B),
    :meth:`columns` and :attr:`nbytes`; the public methods validate inputs and
    handle 1-D vectors.
    """

    def __init__(self, k: int, n: int, *, seed: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self._n = check_int("n", n, minimum=1)
        self._k = check_int("k", k, minimum=1)
        self._seed = check_seed(seed)
        self._dtype = check_dtype(dtype)
        self._device = check_device(device)

    # -- description -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(k, n)``: S maps R^n to R^k."""
        return (self._k, self._n)

    @property
    def k(self) -> int:
        return self._k

    @property
    def n(self) -> int:
        return self._n

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes this operator keeps in memory (0 when regenerated from its seed)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(k={self._k}, n={self._n}, seed={self._seed}, "
                f"dtype={self._dtype}, device={str(self._device)!r})")

    # -- to implement ------------------------------------------------------------
    @abc.abstractmethod
    def _matmul(self, a: torch.Tensor) -> torch.Tensor:
        """S @ a for a of shape (n, m) -> (k, m); inputs already validated."""

    @abc.abstractmethod
    def _tmatmul(self, b: torch.Tensor) -> torch.Tensor:
        """S^T @ b for b of shape (k, m) -> (n, m); inputs already validated."""

    def _rmatmul_t(self, a: torch.Tensor) -> torch.Tensor:
        """a @ S^T for a of shape (m, n) -> (m, k). Override when a faster layout exists."""
        return self._matmul(a.mT).mT

    @abc.abstractmethod
    def columns(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The dense columns ``S[:, index]``, shape (k, len(index)), without forming S."""

    # -- public API --------------------------------------------------------------
    def apply(self, a: torch.Tensor) -> torch.Tensor:
        """S @ a: a (n, m) -> (k, m), or a (n,) -> (k,)."""
        a = self._check(a, "a", axis=0, size=self._n)
        out = self._matmul(a if a.ndim == 2 else a[:, None])
        return out if a.ndim == 2 else out[:, 0]

    def apply_right(self, a: torch.Tensor) -> torch.Tensor:
        """a @ S^T: a (m, n) -> (m, k), or a (n,) -> (k,)."""
        a = self._check(a, "a", axis=-1, size=self._n)
        if a.ndim == 1:
            return self._matmul(a[:, None])[:, 0]
        return self._rmatmul_t(a)

    def transpose_apply(self, b: torch.Tensor) -> torch.Tensor:
        """S^T @ b: b (k, m) -> (n, m), or b (k,) -> (n,)."""
        b = self._check(b, "b", axis=0, size=self._k)
        out = self._tmatmul(b if b.ndim == 2 else b[:, None])
        return out if b.ndim == 2 else out[:, 0]

    def dense(self) -> torch.Tensor:
        """The dense (k, n) matrix (for tests and small problems)."""
        return self.columns(torch.arange(self._n, device=self._device))

    # -- helpers -----------------------------------------------------------------
    def _check(self, a, name: str, *, axis: int, size: int) -> torch.Tensor:
        a = check_tensor(name, a)
        if a.shape[axis] != size:
            raise ValueError(f"{type(self).__name__} of shape {self.shape} cannot act on {name} of shape "
                             f"{tuple(a.shape)}: expected size {size} along dim {axis}")
        if a.dtype != self._dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but the operator was built with dtype "
                            f"{self._dtype}; convert with .to({self._dtype}) or build the operator in {a.dtype}")
        if not _same_device(a.device, self._device):
            raise ValueError(f"{name} is on device {a.device} but the operator on {self._device}; "
                             f"build the operator with device={str(a.device)!r}")
        return a

    def _index(self, index) -> torch.Tensor:
        index = torch.as_tensor(index, device=self._device)
        if index.ndim != 1 or index.dtype in (torch.bool,) or index.is_floating_point():
            raise ValueError(f"column index must be a 1-D integer sequence, got {index!r}")
        index = index.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._n):
            raise ValueError(f"column index out of range for n={self._n}: "
                             f"min {int(index.min())}, max {int(index.max())}")
        return index


class GaussianOperator(AbstractSketchOperator):
    """Dense Gaussian test matrix with i.i.d. N(0, 1/k) entries, regenerated on demand.

    The matrix is drawn in column blocks of ``max(1, 2**18 // k)`` columns, block
    ``b`` from its own generator seeded with ``derive_seed(seed, "gaussian", b)``,
    so applying it needs at most one block (about 1 MiB in float32) at a time and
    any column can be redrawn without the others. ``store=True`` keeps the dense
    matrix instead (faster when applied many times, costs k*n elements).
    """

    _BLOCK_ELEMENTS = 2**18

    def __init__(self, k: int, n: int, *, seed: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, store: bool = False):
        super().__init__(k, n, seed=seed, dtype=dtype, device=device)
        if not isinstance(store, bool):
            raise TypeError(f"store must be a bool, got {store!r}")
        self._block = max(1, self._BLOCK_ELEMENTS // self._k)
        self._dense = torch.cat([self._draw(b) for b in range(self._num_blocks)], dim=1) if store else None

    @property
    def nbytes(self) -> int:
        return 0 if self._dense is None else self._dense.numel() * self._dense.element_size()

    @property
    def _num_blocks(self) -> int:
        return -(-self._n // self._block)

    def _draw(self, b: int) -> torch.Tensor:
        start, stop = b * self._block, min(self._n, (b + 1) * self._block)
        gen = make_generator(derive_seed(self._seed, "gaussian", b), self._device)
        g = torch.randn(self._k, stop - start, generator=gen, dtype=self._dtype, device=self._device)
        return g.mul_(1.0 / math.sqrt(self._k))

    def _blocks(self):
        for b in range(self._num_blocks):
            start = b * self._block
            block = self._draw(b) if self._dense is None else self._dense[:, start:start + self._block]
            yield start, block

    def _matmul(self, a):
        if self._dense is not None:
            return self._dense @ a
        out = None
        for start, g in self._blocks():
            part = g @ a[start:start + g.shape[1]]
            out = part if out is None else out.add_(part)
        return out

    def _tmatmul(self, b):
        if self._dense is not None:
            return self._dense.mT @ b
        return torch.cat([g.mT @ b for _, g in self._blocks()], dim=0)

    def columns(self, index):
        index = self._index(index)
        if self._dense is not None:
            return self._dense[:, index]
        out = torch.empty(self._k, index.numel(), dtype=self._dtype, device=self._device)
        block_of = torch.div(index, self._block, rounding_mode="floor")
        for b in torch.unique(block_of).tolist():
            hit = (block_of == b).nonzero().flatten()
            out[:, hit] = self._draw(b)[:, index[hit] - b * self._block]
        return out


class SparseSignOperator(AbstractSketchOperator):
    """Sparse sign matrix: each column has ``nnz`` nonzeros ±1/sqrt(nnz) in distinct random rows.

    ``nnz`` defaults to ``min(k, 8)`` (Tropp et al. 2019 recommend a small
    constant). Every column has unit norm exactly, and distinct columns are
    uncorrelated, so E[S^T S] = I_n. Applying costs O(nnz * n * m) with
    ``index_add`` passes, or one dense BLAS product when S is no larger than the
    operand (faster in practice; the result is the same matrix product).

    ``store=True`` (default) keeps the structure: ``n*nnz`` int32 row indices
    and int8 signs (5*n*nnz bytes, which for k < 10 is more than the k*n
    float32 sketch it produces); ``store=False`` keeps nothing and redraws the
    structure from the seed on every use (O(n k) work per call).
    """

    def __init__(self, k: int, n: int, *, seed: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, nnz: int | None = None, store: bool = True):
        super().__init__(k, n, seed=seed, dtype=dtype, device=device)
        self._nnz = min(self._k, 8) if nnz is None else check_int(
            "nnz", nnz, minimum=1, maximum=self._k, hint=f"each column has at most k={self._k} nonzeros")
        if not isinstance(store, bool):
            raise TypeError(f"store must be a bool, got {store!r}")
        self._stored = self._draw() if store else None

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (n, nnz) int32 and signs (n, nnz) int8, from the seed."""
        gen = make_generator(self._seed, self._device)
        # Distinct rows per column: the top-nnz of k uniform keys, drawn in chunks to bound memory.
        chunk = max(1, 2**22 // self._k)
        rows = [torch.rand(min(chunk, self._n - c), self._k, generator=gen, device=self._device)
                .topk(self._nnz, dim=1).indices.to(torch.int32) for c in range(0, self._n, chunk)]
        signs = (torch.randint(0, 2, (self._n, self._nnz), generator=gen, device=self._device)
                 .to(torch.int8).mul_(2).sub_(1))
        return torch.cat(rows), signs

    def _structure(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._draw() if self._stored is None else self._stored

    @property
    def nnz(self) -> int:
        """Nonzeros per column."""
        return self._nnz

    @property
    def nbytes(self) -> int:
        return 0 if self._stored is None else sum(t.numel() * t.element_size() for t in self._stored)

    def _rows_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, signs = self._structure()
        return rows, signs.to(self._dtype).mul_(1.0 / math.sqrt(self._nnz))    # (n, nnz) each

    # When S is no larger than the operand, forming it densely (one scatter) and
    # calling BLAS is several times faster than nnz index_add passes (measured on
    # CPU: 8192 x 256 operand, k = 17: 1.5 ms against 8-45 ms); the transient
    # dense S is then at most the operand's size.
    def _small(self, operand: torch.Tensor) -> bool:
        return self._k * self._n <= operand.numel()

    def _matmul(self, a):
        if self._small(a):
            return self.dense() @ a
        rows, vals = self._rows_values()
        out = torch.zeros(self._k, a.shape[1], dtype=self._dtype, device=self._device)
        for j in range(self._nnz):
            out.index_add_(0, rows[:, j], a * vals[:, j, None])
        return out

    def _rmatmul_t(self, a):
        if self._small(a):
            return a @ self.dense().mT
        rows, vals = self._rows_values()
        out = torch.zeros(a.shape[0], self._k, dtype=self._dtype, device=self._device)
        for j in range(self._nnz):
            out.index_add_(1, rows[:, j], a * vals[:, j])
        return out

    def _tmatmul(self, b):
        if self._small(b):
            return self.dense().mT @ b
        rows, vals = self._rows_values()
        out = b.index_select(0, rows[:, 0]) * vals[:, 0, None]
        for j in range(1, self._nnz):
            out.add_(b.index_select(0, rows[:, j]) * vals[:, j, None])
        return out

    def dense(self) -> torch.Tensor:
        rows, vals = self._rows_values()
        out = torch.zeros(self._k, self._n, dtype=self._dtype, device=self._device)
        return out.scatter_(0, rows.mT.long(), vals.mT)

    def columns(self, index):
        index = self._index(index)
        rows, vals = self._rows_values()
        out = torch.zeros(self._k, index.numel(), dtype=self._dtype, device=self._device)
        return out.scatter_(0, rows[index].mT.long(), vals[index].mT)


class SRFTOperator(AbstractSketchOperator):
    """Subsampled randomized trigonometric transform S = sqrt(n/k) R H D (requires k <= n).

    * D: n random signs;
    * H: the orthonormal discrete **Hartley** transform, H[i, j] = cas(2 pi i j / n) / sqrt(n)
      with cas = cos + sin, a real, symmetric, orthogonal trig transform computed
      with ``torch.fft.rfft`` in O(n log n) for any n (no padding);
    * R: k distinct rows of n drawn uniformly (kept sorted).

    E[R^T R] = (k/n) I and H, D are orthogonal, hence E[S^T S] = I_n. This is
    the SRFT of Woolfe, Liberty, Rokhlin & Tygert (2008) with a real transform,
    as in Tropp et al.'s SSRFT. Stores n int8 signs and k int64 row indices.
    """

    def __init__(self, k: int, n: int, *, seed: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(k, n, seed=seed, dtype=dtype, device=device)
        if self._k > self._n:
            raise ValueError(f"SRFTOperator needs k <= n (it subsamples k of n rows), got k={self._k}, "
                             f"n={self._n}; pass k <= {self._n} or use operator='gaussian'")
        gen = make_generator(self._seed, self._device)
        self._signs = (torch.randint(0, 2, (self._n,), generator=gen, device=self._device)
                       .to(torch.int8).mul_(2).sub_(1))
        self._rows = torch.randperm(self._n, generator=gen, device=self._device)[:self._k].sort().values
        self._scale = math.sqrt(self._n / self._k)

    @property
    def nbytes(self) -> int:
        return self._signs.numel() * self._signs.element_size() + self._rows.numel() * self._rows.element_size()

    def _hartley_rows(self, x: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows ``rows`` of the orthonormal Hartley transform of x along ``dim``.

        H x = Re(F x) - Im(F x) with the unitary DFT F. rfft gives frequencies
        0..n//2; for r > n//2, F x[r] = conj(F x[n-r]) since x is real.
        """
        spec = torch.fft.rfft(x, dim=dim, norm="ortho")
        low = rows <= self._n // 2
        src = torch.where(low, rows, self._n - rows)
        sign = torch.where(low, -1.0, 1.0).to(self._dtype)
        shape = [1] * x.ndim
        shape[dim] = -1
        return spec.real.index_select(dim, src) + sign.view(shape) * spec.imag.index_select(dim, src)

    def _matmul(self, a):
        x = a * self._signs.to(self._dtype)[:, None]
        return self._hartley_rows(x, self._rows, dim=0).mul_(self._scale)

    def _rmatmul_t(self, a):
        # Transform along the last (contiguous) dim instead of transposing twice.
        x = a * self._signs.to(self._dtype)
        return self._hartley_rows(x, self._rows, dim=1).mul_(self._scale)

    def _tmatmul(self, b):
        # S^T b = sqrt(n/k) D H R^T b (H is symmetric).
        y = torch.zeros(self._n, b.shape[1], dtype=self._dtype, device=self._device)
        y[self._rows] = b
        full = torch.arange(self._n, device=self._device)
        return self._hartley_rows(y, full, dim=0).mul_(self._signs.to(self._dtype)[:, None] * self._scale)

    def columns(self, index):
        index = self._index(index)
        # Integer phase (r * j mod n) keeps the angle exact for large n.
        phase = (self._rows[:, None] * index[None, :]).remainder(self._n).to(torch.float64)
        angle = phase * (2 * math.pi / self._n)
        cas = (torch.cos(angle) + torch.sin(angle)) / math.sqrt(self._n)
        return (cas * (self._scale * self._signs[index].to(torch.float64))).to(self._dtype)


#: Registry of operator names accepted by :func:`make_operator`.
OPERATORS = MappingProxyType({
    "gaussian": GaussianOperator,
    "sparse": SparseSignOperator,
    "srft": SRFTOperator,
})


def make_operator(name: str, k: int, n: int, *, seed: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, **options) -> AbstractSketchOperator:
    """Build the operator called ``name`` ("gaussian" | "sparse" | "srft") of shape (k, n).

    ``options`` go to the class (``store=`` for Gaussian, ``nnz=`` for sparse).
    """
    check_choice("operator", name, OPERATORS)
    return OPERATORS[name](k, n, seed=seed, dtype=dtype, device=device, **options)
