"""The three-sketch of Tropp, Yurtsever, Udell & Cevher (SIAM J. Sci. Comput. 2019).

For an m x n matrix A (never stored) the sketch keeps

* range sketch     Y = A Omega^T      (m, k)    Omega   (k, n)
* co-range sketch  X = Upsilon A      (k, n)    Upsilon (k, m)
* core sketch      Z = Phi A Psi^T    (s, s)    Phi (s, m), Psi (s, n)
* error sketch     W = Theta A        (q, n)    Theta   (q, m), Gaussian

All four are linear in A, so the stream of updates A <- theta A + eta H
(plain sums, exponential moving averages) is applied to the sketches directly.
The reconstruction is A_hat = Q C P^T with Q = orth(Y), P = orth(X^T) and
C = (Phi Q)^+ Z ((Psi P)^+)^T (Tropp et al., Alg. 7 / eq. (4.3)); truncating C
by SVD gives their fixed-rank approximation.

Error estimate (Tropp et al. §6): Theta is independent of the other test
matrices and JL-scaled (entries N(0, 1/q)), so ||W - Theta A_hat||_F^2 is an
unbiased estimate of ||A - A_hat||_F^2 with q degrees of freedom
(||W||_F likewise estimates ||A||_F).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from ._checks import check_choice, check_device, check_dtype, check_finite, check_float, check_int, check_seed, \
    check_tensor
from ._linalg import lstsq_qr, orth
from .factors import LowRankFactors
from .operators import OPERATORS, AbstractSketchOperator, GaussianOperator, _same_device, make_operator
from .seeding import derive_seed

__all__ = ["ThreeSketch", "SIZINGS", "sketch_sizes"]

#: Sizing rules: name -> (k(r), s(k)) before clamping to the matrix dimensions.
SIZINGS = MappingProxyType({
    "default": "k = 2r + 1, s = 2k + 1 (Muthukumar, Kouri & Udell 2021)",
    "tropp": "k = 4r + 1, s = 2k + 1 (Tropp et al. 2019)",
})


def sketch_sizes(shape: tuple[int, int], rank: int, *, k: int | None = None, s: int | None = None,
                 sizing: str = "default") -> tuple[int, int]:
    """Validated sketch sizes (k, s) for an ``shape`` matrix at target ``rank``.

    Defaults follow ``sizing`` and are clamped to ``min(rows, cols)`` (beyond
    that the sketch is already exact); explicit ``k``/``s`` must satisfy
    ``rank <= k <= s <= min(rows, cols)``.
    """
    m, n = _check_shape(shape)
    check_choice("sizing", sizing, SIZINGS)
    limit = min(m, n)
    rank = check_int("rank", rank, minimum=1)
    if rank > limit:
        raise ValueError(f"rank={rank} exceeds min(rows, cols)={limit} for a {m} x {n} matrix; "
                         f"pass rank <= {limit}")
    if k is None:
        k = min(limit, (2 if sizing == "default" else 4) * rank + 1)
    else:
        k = check_int("k", k, minimum=rank, maximum=limit,
                      hint=f"need rank={rank} <= k <= min(rows, cols)={limit}")
    if s is None:
        s = min(limit, 2 * k + 1)
    else:
        s = check_int("s", s, minimum=k, maximum=limit,
                      hint=f"need k={k} <= s <= min(rows, cols)={limit}")
    return k, s


def _check_shape(shape) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be a pair (rows, cols), got {shape!r}")
    return check_int("rows", shape[0], minimum=1), check_int("cols", shape[1], minimum=1)


class ThreeSketch:
    """Streaming three-sketch (plus error sketch) of an m x n matrix.

    Args:
        shape: (m, n) of the sketched matrix.
        rank: target rank r; sets the default sizes (see :func:`sketch_sizes`).
        k: range/co-range sketch size (default from ``sizing``).
        s: core sketch size (default 2k + 1, clamped).
        sizing: "default" (k = 2r+1) or "tropp" (k = 4r+1).
        operator: test operator for Omega, Upsilon, Phi, Psi: "gaussian" | "sparse" | "srft".
        error_size: q, rows of the Gaussian error sketch (0 disables error estimates).
        seed: the test matrices are redrawn from ``derive_seed(seed, name)``.
        dtype, device: of the sketches and test matrices.

    Memory: (m k + k n + s^2 + q n) elements plus what the operators store
    (nothing for Gaussian ones), reported by :attr:`nbytes`.
    """

    def __init__(self, shape: tuple[int, int], rank: int, *, k: int | None = None, s: int | None = None,
                 sizing: str = "default", operator: str = "gaussian", error_size: int = 10, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self._m, self._n = _check_shape(shape)
        self._k, self._s = sketch_sizes((self._m, self._n), rank, k=k, s=s, sizing=sizing)
        self._rank = int(rank)
        self._operator = check_choice("operator", operator, OPERATORS)
        self._q = check_int("error_size", error_size, minimum=0)
        self._dtype = check_dtype(dtype)
        self._device = check_device(device)
        self._build_operators(check_seed(seed))
        zeros = dict(dtype=self._dtype, device=self._device)
        self._Y = torch.zeros(self._m, self._k, **zeros)
        self._X = torch.zeros(self._k, self._n, **zeros)
        self._Z = torch.zeros(self._s, self._s, **zeros)
        self._W = torch.zeros(self._q, self._n, **zeros)

    def _build_operators(self, seed: int) -> None:
        self._seed = seed
        opts = dict(dtype=self._dtype, device=self._device)
        m, n, k, s = self._m, self._n, self._k, self._s
        self._Omega = make_operator(self._operator, k, n, seed=derive_seed(seed, "Omega"), **opts)
        self._Upsilon = make_operator(self._operator, k, m, seed=derive_seed(seed, "Upsilon"), **opts)
        self._Phi = make_operator(self._operator, s, m, seed=derive_seed(seed, "Phi"), **opts)
        self._Psi = make_operator(self._operator, s, n, seed=derive_seed(seed, "Psi"), **opts)
        # Gaussian whatever `operator` is: Tropp et al. §6 analyse the estimator for Gaussian Theta.
        self._Theta = (GaussianOperator(self._q, m, seed=derive_seed(seed, "Theta"), **opts)
                       if self._q else None)

    @classmethod
    def from_matrix(cls, a: torch.Tensor, rank: int, **kwargs) -> "ThreeSketch":
        """Sketch a dense matrix ``a`` (m, n); dtype/device default to those of ``a``."""
        a = check_tensor("a", a, ndim=(2,))
        kwargs.setdefault("dtype", a.dtype)
        kwargs.setdefault("device", a.device)
        sketch = cls(tuple(a.shape), rank, **kwargs)
        sketch.update(a)
        return sketch

    # -- description -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self._m, self._n)

    @property
    def rank(self) -> int:
        """Target rank r the sizes were chosen for."""
        return self._rank

    @property
    def k(self) -> int:
        return self._k

    @property
    def s(self) -> int:
        return self._s

    @property
    def error_size(self) -> int:
        return self._q

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def operator(self) -> str:
        return self._operator

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def Y(self) -> torch.Tensor:
        """Range sketch A Omega^T, (m, k)."""
        return self._Y

    @property
    def X(self) -> torch.Tensor:
        """Co-range sketch Upsilon A, (k, n)."""
        return self._X

    @property
    def Z(self) -> torch.Tensor:
        """Core sketch Phi A Psi^T, (s, s)."""
        return self._Z

    @property
    def W(self) -> torch.Tensor:
        """Error sketch Theta A, (q, n)."""
        return self._W

    @property
    def operators(self) -> dict[str, AbstractSketchOperator]:
        """The test operators by name: Omega (k, n), Upsilon (k, m), Phi (s, m), Psi (s, n), Theta (q, m)."""
        ops = {"Omega": self._Omega, "Upsilon": self._Upsilon, "Phi": self._Phi, "Psi": self._Psi}
        if self._q:
            ops["Theta"] = self._Theta
        return ops

    @property
    def nbytes(self) -> int:
        """Bytes held: the four sketches plus whatever the operators store (0 for regenerated ones)."""
        tensors = (self._Y, self._X, self._Z, self._W)
        return (sum(t.numel() * t.element_size() for t in tensors)
                + sum(op.nbytes for op in self.operators.values()))

    def __repr__(self) -> str:
        return (f"ThreeSketch(shape={self.shape}, rank={self._rank}, k={self._k}, s={self._s}, "
                f"operator={self._operator!r}, error_size={self._q}, seed={self._seed}, "
                f"dtype={self._dtype}, device={str(self._device)!r})")

    # -- updates -----------------------------------------------------------------
    def update(self, h: torch.Tensor, theta: float = 1.0, eta: float = 1.0) -> None:
        """A <- theta * A + eta * H for H (m, n), applied to every sketch.

        ``theta=beta, eta=1-beta`` is an exponential moving average. H is cast to
        the sketch dtype; it must be finite and on the sketch's device.
        """
        h = self._check_update("H", h, self.shape)
        theta, eta = check_float("theta", theta), check_float("eta", eta)
        self._scale(theta)
        self._Y.add_(self._Omega.apply_right(h), alpha=eta)
        self._X.add_(self._Upsilon.apply(h), alpha=eta)
        self._Z.add_(self._Phi.apply(self._Psi.apply_right(h)), alpha=eta)
        if self._q:
            self._W.add_(self._Theta.apply(h), alpha=eta)

    def update_columns(self, index, values: torch.Tensor, theta: float = 1.0, eta: float = 1.0) -> None:
        """A <- theta * A + eta * H where H is zero except H[:, index] = values (m, c).

        The streaming case of Tropp et al. §2.4 (e.g. one gradient per training
        step as a new column): costs O(m (k + s + q) c) plus drawing c columns of
        Omega and Psi, never touching the other columns of A. Repeated indices add up.
        """
        index = self._check_index("index", index, self._n)
        values = self._check_update("values", values, (self._m, index.numel()))
        theta, eta = check_float("theta", theta), check_float("eta", eta)
        self._scale(theta)
        self._Y.add_(values @ self._Omega.columns(index).mT, alpha=eta)
        self._X.index_add_(1, index, self._Upsilon.apply(values), alpha=eta)
        self._Z.add_(self._Phi.apply(values) @ self._Psi.columns(index).mT, alpha=eta)
        if self._q:
            self._W.index_add_(1, index, self._Theta.apply(values), alpha=eta)

    def update_rows(self, index, values: torch.Tensor, theta: float = 1.0, eta: float = 1.0) -> None:
        """A <- theta * A + eta * H where H is zero except H[index, :] = values (c, n).

        Repeated indices add up.
        """
        index = self._check_index("index", index, self._m)
        values = self._check_update("values", values, (index.numel(), self._n))
        theta, eta = check_float("theta", theta), check_float("eta", eta)
        self._scale(theta)
        self._Y.index_add_(0, index, self._Omega.apply_right(values), alpha=eta)
        self._X.add_(self._Upsilon.columns(index) @ values, alpha=eta)
        self._Z.add_(self._Phi.columns(index) @ self._Psi.apply_right(values), alpha=eta)
        if self._q:
            self._W.add_(self._Theta.columns(index) @ values, alpha=eta)

    def _scale(self, theta: float) -> None:
        if theta != 1.0:
            for sketch in (self._Y, self._X, self._Z, self._W):
                sketch.mul_(theta)

    def _check_update(self, name: str, h, shape: tuple[int, int]) -> torch.Tensor:
        h = check_tensor(name, h, ndim=(2,))
        if tuple(h.shape) != tuple(shape):
            raise ValueError(f"update {name} has shape {tuple(h.shape)} but the sketch is of a "
                             f"{self._m} x {self._n} matrix; pass {name} of shape {tuple(shape)}")
        if not _same_device(h.device, self._device):
            raise ValueError(f"update {name} is on device {h.device} but the sketch on {self._device}; "
                             f"move {name} with .to({str(self._device)!r})")
        h = h.to(self._dtype)
        check_finite(f"update {name}", h)
        return h

    def _check_index(self, name: str, index, size: int) -> torch.Tensor:
        index = torch.as_tensor(index, device=self._device)
        if index.ndim != 1 or index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise ValueError(f"{name} must be a 1-D sequence of integers, got {index!r}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise ValueError(f"{name} has entries outside [0, {size}): min {int(index.min())}, "
                             f"max {int(index.max())}")
        return index.long()

    def reset(self, seed: int | None = None) -> None:
        """Zero the sketches (A <- 0); with ``seed``, also redraw the test matrices from it."""
        if seed is not None:
            self._build_operators(check_seed(seed))
        for sketch in (self._Y, self._X, self._Z, self._W):
            sketch.zero_()

    # -- checkpointing -----------------------------------------------------------
    def state_dict(self) -> dict:
        """Configuration and sketches; the test matrices are rebuilt from ``seed`` on load."""
        return {"shape": self.shape, "rank": self._rank, "k": self._k, "s": self._s,
                "operator": self._operator, "error_size": self._q, "seed": self._seed,
                "dtype": str(self._dtype).removeprefix("torch."),
                "Y": self._Y.clone(), "X": self._X.clone(), "Z": self._Z.clone(), "W": self._W.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore sketches (and seed) saved by :meth:`state_dict` from a sketch of the same configuration."""
        mine = self.state_dict()
        for key in ("shape", "rank", "k", "s", "operator", "error_size", "dtype"):
            theirs = tuple(state[key]) if key == "shape" else state[key]
            if theirs != mine[key]:
                raise ValueError(f"cannot load a state with {key}={theirs!r} into a sketch with "
                                 f"{key}={mine[key]!r}; build the sketch with the saved configuration "
                                 "(ThreeSketch.from_state_dict)")
        if state["seed"] != self._seed:
            self._build_operators(check_seed(state["seed"]))
        for key in ("Y", "X", "Z", "W"):
            getattr(self, "_" + key).copy_(state[key])

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str | None = None) -> "ThreeSketch":
        """A new sketch rebuilt from :meth:`state_dict` output, on ``device`` (default CPU)."""
        sketch = cls(tuple(state["shape"]), state["rank"], k=state["k"], s=state["s"], operator=state["operator"],
                     error_size=state["error_size"], seed=state["seed"], dtype=getattr(torch, state["dtype"]),
                     device=device)
        sketch.load_state_dict(state)
        return sketch

    # -- reconstruction ----------------------------------------------------------
    def reconstruct(self, rank: int | None = None) -> LowRankFactors:
        """A_hat = Q C P^T from the sketches; with ``rank``, its best rank-``rank`` truncation.

        Q = orth(Y) (m, k), P = orth(X^T) (n, k), and C = (Phi Q)^+ Z ((Psi P)^+)^T
        (k, k) by two QR least-squares solves in the sketch dtype.
        """
        if rank is not None:
            rank = check_int("rank", rank, minimum=1, maximum=self._k,
                             hint=f"the reconstruction has rank at most k={self._k}")
        q = orth(self._Y)
        p = orth(self._X.mT)
        left = lstsq_qr(self._Phi.apply(q), self._Z)            # (k, s) = (Phi Q)^+ Z
        core = lstsq_qr(self._Psi.apply(p), left.mT).mT         # (k, k) = left ((Psi P)^+)^T
        factors = LowRankFactors(q, core, p)
        return factors if rank is None else factors.truncate(rank)

    def error_estimate(self, factors: LowRankFactors | None = None, *, rank: int | None = None) -> float:
        """Estimate of ||A - A_hat||_F for ``factors`` (default: ``self.reconstruct(rank)``)."""
        if not self._q:
            raise ValueError("error estimates need an error sketch; build the ThreeSketch with error_size >= 1")
        if factors is None:
            factors = self.reconstruct(rank)
        elif factors.shape != self.shape:
            raise ValueError(f"factors of shape {factors.shape} do not match the sketch shape {self.shape}")
        residual = self._W - ((self._Theta.apply(factors.Q) @ factors.C) @ factors.P.mT)
        return float(torch.linalg.matrix_norm(residual))

    def norm_estimate(self) -> float:
        """Estimate of ||A||_F from the error sketch: ||W||_F."""
        if not self._q:
            raise ValueError("norm estimates need an error sketch; build the ThreeSketch with error_size >= 1")
        return float(torch.linalg.matrix_norm(self._W))

    def relative_error_estimate(self, factors: LowRankFactors | None = None, *, rank: int | None = None) -> float:
        """Estimate of ||A - A_hat||_F / ||A||_F (0 when both are 0, inf when only A is 0)."""
        err = self.error_estimate(factors, rank=rank)
        norm = self.norm_estimate()
        if norm == 0.0:
            return 0.0 if err == 0.0 else math.inf
        return err / norm
