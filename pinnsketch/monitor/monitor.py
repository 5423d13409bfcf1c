"""Gradient monitoring: exact per-layer norms every step and a sketched gradient history.

A run of T steps over a layer with P parameters produces a gradient history
G (P x T) that a long run cannot keep. :class:`GradientMonitor` keeps, per
layer, the exact norm ||g_t|| of every step (T numbers) and a streaming
low-rank tracker of G: the three-sketch (:class:`TrajectorySketch`,
O(k (P + T) + s^2) numbers) or an incremental SVD (:class:`IncrementalSVD`,
O(rank (P + T))), both with a Gaussian error sketch (q x T). From them it
reconstructs any past step's gradient, the norm history, the step-to-step
cosine similarities and the leading gradient subspace, each with an
a-posteriori error estimate from the error sketch.

Steps and windows: the sketched matrix has ``window`` columns, one per
recorded step. A run longer than ``window`` starts a new window (a fresh
sketch) every ``window`` steps, so memory grows by one sketch per window and
the saving against the full history stays that of one window; pass the total
number of steps as ``window`` for one sketch over the whole run.

Step sketch (``step_sketch=m``, off by default): a Johnson-Lindenstrauss sketch of every step's
gradient, y_t = Omega_l g_t with one fixed (m, P) test matrix per layer (SRFT by default,
regenerated from ``derive_seed(seed, "step_sketch", "layer", l)``, never stored dense) scaled
so that E ||y_t||^2 = ||g_t||^2. It costs m numbers per layer per step, so unlike the low-rank
trackers it GROWS LINEARLY with the number of steps (steps x m per layer; the bytes are in
:meth:`GradientMonitor.memory_report`), but it needs no low-rank structure: norms, step-to-step
cosines and the inner product of any two recorded steps are estimated with a relative error
of order 1/sqrt(m) whatever the trajectory (||y_t|| / ||g_t|| has standard deviation about
1/sqrt(2m): sqrt(2/m) for the squared norm). Mini-batch gradient histories that are far from
low rank (``benchmarks/gradient_monitoring.py``, MNIST) are where it matters. When present it
also serves as the error sketch of the low-rank reconstruction (so ``error_size=0`` saves the
separate one), and :meth:`GradientMonitor.cosines` uses it.

Devices: test matrices are regenerated from their seeds on the monitor's device, and CPU and CUDA
generators give different matrices for one seed. Quantities computed from stored values alone
(exact norms, the step sketch's norms, cosines and inner products, the incremental SVD's
reconstruction) read back identically on any device; the three-sketch's reconstruction, the
error estimates and continuing a monitor need the device type it was recorded on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..sketch import LowRankFactors, SIZINGS, OPERATORS, AbstractSketchOperator, derive_seed, make_operator
from .trajectory import IncrementalSVD, TrajectorySketch

__all__ = ["GradientMonitor", "Estimate", "Subspace", "METHODS", "SOURCES"]

#: How each layer's gradient history is compressed: "three_sketch" (Tropp et al.'s randomized
#: three-sketch, linear in the history) or "isvd" (incremental truncated SVD, Brand 2002).
METHODS = ("three_sketch", "isvd")

_DTYPES = {"torch.float32": torch.float32, "torch.float64": torch.float64}
# Options added after the first files were written; saved configurations without them get these.
_OPTIONAL = {"method": "three_sketch", "k": None, "s": None, "step_sketch": 0, "step_operator": "srft"}
#: Where :meth:`GradientMonitor.cosines` takes its estimates from.
SOURCES = ("step_sketch", "reconstruction")


class Estimate(NamedTuple):
    """A reconstructed quantity and an a-posteriori estimate of its absolute error."""

    value: torch.Tensor
    error: torch.Tensor


class Subspace(NamedTuple):
    """Leading left singular vectors of the reconstructed gradient history of one layer.

    basis: (P, r) orthonormal columns; singular_values: (r,); relative_error: estimated
    ||G - G_hat||_F / ||G||_F of the reconstruction the subspace was computed from.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    relative_error: float


class GradientMonitor:
    """Per-layer gradient norms (exact) and sketched gradient history of a model.

    Args:
        params: an ``nn.Module`` (one layer per module that owns parameters,
            e.g. ``blocks.0`` = weight and bias), a mapping name -> parameter or
            list of parameters, or ``None`` to bind to ``state.model`` in
            :meth:`on_start` when used as a training callback.
        rank: target rank r of each layer's sketch (clamped to the layer size).
        window: steps per sketch (columns of the sketched matrix); see the module docstring.
        method: "three_sketch" (default): a :class:`~pinnsketch.sketch.ThreeSketch` per layer
            (randomized, linear in the history); "isvd": an incremental truncated SVD keeping
            ``rank`` directions (deterministic; on decaying spectra close to the best rank-``rank``
            approximation, so far more accurate per byte; see benchmarks/gradient_monitoring.py).
        k, s: three-sketch sizes (default from ``sizing``; clamped to the layer size and window).
            Memory per layer is about k (P + window) + s^2 + error_size * window numbers and the
            reconstruction has rank k; for "isvd" it is rank (P + window) + error_size * window.
        sizing: "default" (k = 2r + 1, s = 2k + 1) or "tropp" (k = 4r + 1).
        operator: test operator of the three-sketch: "gaussian" | "sparse" | "srft".
        error_size: q, rows of the error sketch (per-step error estimates need q >= 1, or a step
            sketch, which then provides them).
        normalize: track g_t / ||g_t|| and rescale by the stored exact norm (default), so every
            step weighs equally in the low-rank fit; otherwise the large early gradients
            dominate it and the small late ones are reconstructed poorly.
        step_sketch: m, rows of the per-step Johnson-Lindenstrauss sketch of each layer (0: none);
            see the module docstring. Clamped to the layer size; a layer with at most m parameters
            is kept exactly (an orthogonal transform of its gradient). Memory: steps x m numbers per layer.
        step_operator: test matrix of the step sketch: "srft" (default; O(P log P) per step, stores P
            signs), "gaussian" (regenerated every step, O(m P)) or "sparse".
        seed: seeds every test matrix (window w, layer l: ``derive_seed(seed, "window", w, "layer", l)``).
        dtype: dtype of the sketches (float32 or float64).

    Use: call :meth:`update` after ``loss.backward()`` (gradients in ``p.grad``),
    or pass the monitor as a training callback (it updates in ``on_step``).
    """

    def __init__(self, params=None, *, rank: int = 4, window: int = 1000, method: str = "three_sketch",
                 k: int | None = None, s: int | None = None, sizing: str = "default", operator: str = "gaussian",
                 error_size: int = 10, normalize: bool = True, step_sketch: int = 0, step_operator: str = "srft",
                 seed: int = 0, dtype: torch.dtype = torch.float32):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
        if method == "isvd" and (k is not None or s is not None):
            raise ValueError(f"k={k!r}, s={s!r} size the three-sketch; method='isvd' keeps `rank` directions, "
                             "leave k and s unset")
        checks = [("rank", rank, 1), ("window", window, 1), ("error_size", error_size, 0), ("seed", seed, 0),
                  ("step_sketch", step_sketch, 0)]
        if k is not None:
            checks.append(("k", k, rank))
        if s is not None:
            checks.append(("s", s, rank if k is None else k))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        if sizing not in SIZINGS:
            raise ValueError(f"sizing={sizing!r} is not one of {', '.join(map(repr, SIZINGS))}")
        if operator not in OPERATORS:
            raise ValueError(f"operator={operator!r} is not one of {', '.join(map(repr, OPERATORS))}")
        if step_operator not in OPERATORS:
            raise ValueError(f"step_operator={step_operator!r} is not one of {', '.join(map(repr, OPERATORS))}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r} is not supported; pass torch.float32 or torch.float64")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self._config = {"rank": rank, "window": window, "method": method, "k": k, "s": s, "sizing": sizing,
                        "operator": operator, "error_size": error_size, "normalize": normalize,
                        "step_sketch": step_sketch, "step_operator": step_operator, "seed": seed, "dtype": str(dtype)}
        self._dtype = dtype
        self._names: list[str] = []
        self._sizes: list[int] = []
        self._params: list[list[torch.Tensor]] | None = None
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._device = torch.device("cpu")
        self._steps: list[int] = []
        self._norms: list[torch.Tensor] = []          # one (L,) float64 row per step, on the gradients' device
        self._windows: list[list[TrajectorySketch | IncrementalSVD]] = []
        self._cache: dict[tuple[int, int], tuple[LowRankFactors, torch.Tensor]] = {}
        # Step sketch: per window, per layer, a (window, m_l) block of rows y_t = Omega_l g_t.
        self._step_rows: list[list[torch.Tensor]] = []
        self._step_ops: dict[int, AbstractSketchOperator] = {}
        if params is not None:
            self.bind(params)

    # -- setup -------------------------------------------------------------------
    def bind(self, params) -> "GradientMonitor":
        """Attach the parameters to monitor (see ``params`` in the class docstring)."""
        layers = _layers(params)
        if not layers:
            raise ValueError("no trainable parameters to monitor; pass a model or a mapping name -> parameters")
        names = [name for name, _ in layers]
        sizes = [sum(p.numel() for p in group) for _, group in layers]
        if self._names and (names != self._names or sizes != self._sizes):
            raise ValueError(f"the parameters (layers {names}, sizes {sizes}) differ from those this monitor "
                             f"recorded (layers {self._names}, sizes {self._sizes})")
        self._names, self._sizes = names, sizes
        self._params = [group for _, group in layers]
        first = self._params[0][0]
        self._itemsize = first.element_size()
        if first.device != self._device:                 # sketches live where the gradients are
            self._device = first.device
            self._norms = [row.to(self._device) for row in self._norms]
            self._windows = [[self._rebuilt(w, layer, sketch) for layer, sketch in enumerate(window)]
                             for w, window in enumerate(self._windows)]
            self._step_rows = [[rows.to(self._device) for rows in window] for window in self._step_rows]
            self._step_ops.clear()
            self._cache.clear()
        return self

    @property
    def config(self) -> dict:
        """The constructor options (JSON-able)."""
        return dict(self._config)

    @property
    def layers(self) -> list[str]:
        return list(self._names)

    @property
    def layer_sizes(self) -> list[int]:
        return list(self._sizes)

    @property
    def steps(self) -> torch.Tensor:
        """Recorded step numbers, (T,) int64."""
        return torch.tensor(self._steps, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return (f"GradientMonitor(layers={len(self._names)}, steps={len(self._steps)}, "
                f"rank={self._config['rank']}, window={self._config['window']})")

    # -- recording -----------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Record the gradients now in ``p.grad`` as step ``step`` (default: the next integer)."""
        if self._params is None:
            raise RuntimeError("this monitor has no parameters (it was read from a file or never bound); "
                               "call bind(model) first")
        if step is None:
            step = self._steps[-1] + 1 if self._steps else 0
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"step {step} is not after the last recorded step {self._steps[-1]}; a monitor "
                             "must be updated once per step (pass it either to RunWriter(monitor=...) or "
                             "as a callback, not both)")
        index = len(self._steps)
        w, j = divmod(index, self._config["window"])
        if w == len(self._windows):
            self._windows.append([self._new_sketch(w, layer) for layer in range(len(self._names))])
            if self._config["step_sketch"]:
                self._step_rows.append([self._new_step_rows(layer) for layer in range(len(self._names))])
        norms = []
        for layer, group in enumerate(self._params):
            g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                        device=p.device)
                           for p in group])
            norm = torch.linalg.vector_norm(g, dtype=torch.float64)
            norms.append(norm)
            if self._config["step_sketch"]:
                self._step_rows[w][layer][j] = self._step_apply(layer, g.to(self._dtype))
            if self._config["normalize"]:
                g = g / torch.where(norm > 0, norm, 1.0).to(g.dtype)
            self._windows[w][layer].add_column(j, g)
            self._cache.pop((w, layer), None)
        self._steps.append(step)
        self._norms.append(torch.stack(norms))

    def _new_sketch(self, w: int, layer: int) -> TrajectorySketch | IncrementalSVD:
        cfg = self._config
        rows, cols = self._sizes[layer], cfg["window"]
        limit = min(rows, cols)
        seed = derive_seed(cfg["seed"], "window", w, "layer", layer)
        if cfg["method"] == "isvd":
            return IncrementalSVD((rows, cols), min(cfg["rank"], limit), error_size=cfg["error_size"], seed=seed,
                                  dtype=self._dtype, device=self._device)
        k = None if cfg.get("k") is None else min(cfg["k"], limit)
        s = None if cfg.get("s") is None else min(cfg["s"], limit)
        return TrajectorySketch((rows, cols), min(cfg["rank"], limit), k=k, s=s, sizing=cfg["sizing"],
                                operator=cfg["operator"], error_size=cfg["error_size"],
                                seed=seed, dtype=self._dtype, device=self._device)

    def _step_size(self, layer: int) -> int:
        """m_l: rows of the step sketch of ``layer`` (0 without one)."""
        return min(self._config["step_sketch"], self._sizes[layer])

    def _step_exact(self, layer: int) -> bool:
        """Whether the step sketch of ``layer`` is exact (m_l = P_l: an orthogonal transform)."""
        return 0 < self._step_size(layer) == self._sizes[layer]

    def _step_op(self, layer: int) -> AbstractSketchOperator:
        """Omega_l (m_l, n_l), the same for every step (and window) of the layer; regenerated from its seed.

        n_l = P_l, except that an SRFT of m_l < P_l acts on the gradient zero-padded to the next
        5-smooth length (an isometric embedding: same norms and inner products), where the FFT is fast.
        """
        op = self._step_ops.get(layer)
        if op is None:
            m, size = self._step_size(layer), self._sizes[layer]
            # With m = P the SRFT is sqrt(P/P) H D: orthogonal, so the layer is kept exactly.
            name = "srft" if m == size else self._config["step_operator"]
            length = _smooth_length(size) if name == "srft" and m < size else size
            op = make_operator(name, m, length, seed=derive_seed(self._config["seed"], "step_sketch", "layer", layer),
                               dtype=self._dtype, device=self._device)
            self._step_ops[layer] = op
        return op

    def _step_apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Omega_l x for x (P_l,) or (P_l, k), zero-padding x to the operator's length."""
        op = self._step_op(layer)
        pad = op.n - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        return op.apply(x)

    def _new_step_rows(self, layer: int) -> torch.Tensor:
        return torch.zeros(self._config["window"], self._step_size(layer), dtype=self._dtype, device=self._device)

    def _rebuilt(self, w: int, layer: int, saved) -> TrajectorySketch | IncrementalSVD:
        """Window ``w``'s sketch of ``layer`` on this monitor's device, holding ``saved``'s values."""
        sketch = self._new_sketch(w, layer)
        sketch.load_sketches(saved if isinstance(saved, Mapping) else saved.sketches())
        return sketch

    # -- callback protocol -----------------------------------------------------------
    def on_start(self, state) -> None:
        if self._params is None:
            self.bind(state.model)

    def on_step(self, state) -> None:
        self.update(step=state.step)

    def on_end(self, state, result) -> None:
        pass

    # -- queries -----------------------------------------------------------------------
    def norms(self, layer: int | str | None = None) -> torch.Tensor:
        """Exact gradient norms: (T,) for one layer, (T, L) for all; float64 on CPU."""
        table = torch.stack(self._norms).cpu() if self._norms else torch.zeros(0, len(self._names),
                                                                                 dtype=torch.float64)
        return table if layer is None else table[:, self._layer(layer)]

    def gradient(self, step: int, layer: int | str) -> Estimate:
        """Reconstructed gradient of ``layer`` at ``step``, (P,), and the estimated ||g - g_hat||."""
        index = self._position(step)
        layer = self._layer(layer)
        w, j = divmod(index, self._config["window"])
        factors, errors = self._factors(w, layer)
        scale = self._scale(index, layer)
        value = factors.Q @ (factors.C @ factors.P[j]) * scale
        return Estimate(value.cpu(), (errors[j] * scale).cpu())

    def gradients(self, layer: int | str) -> Estimate:
        """All reconstructed gradients of ``layer``, (T, P) dense (T x P memory: for analysis), errors (T,)."""
        layer = self._layer(layer)
        values, errors = [], []
        for w, rows in self._window_rows():
            factors, err = self._factors(w, layer)
            coeff = factors.P[:len(rows)] @ factors.C.mT                  # (n, k): rows of C P^T
            scale = self._scales(rows, layer)
            values.append((coeff @ factors.Q.mT) * scale[:, None].to(coeff.dtype))
            errors.append(err[:len(rows)].double().cpu() * scale.cpu())
        return Estimate(_cat(values, (0, self._sizes[layer])).cpu(), _cat(errors, (0,)))

    def reconstructed_norms(self, layer: int | str) -> Estimate:
        """Norms ||g_hat_t|| of the reconstructed gradients, (T,), with error estimates (T,).

        The error is the estimated ||g_t - g_hat_t||, a bound on | ||g_t|| - ||g_hat_t|| |.
        """
        layer = self._layer(layer)
        values, errors = [], []
        for w, rows in self._window_rows():
            factors, err = self._factors(w, layer)
            # Q has orthonormal columns: ||Q C p_j|| = ||C p_j||.
            coeff = factors.P[:len(rows)] @ factors.C.mT
            scale = self._scales(rows, layer).cpu()
            values.append(torch.linalg.vector_norm(coeff, dim=1).double().cpu() * scale)
            errors.append(err[:len(rows)].double().cpu() * scale)
        return Estimate(_cat(values, (0,)), _cat(errors, (0,)))

    def estimated_norms(self, layer: int | str) -> Estimate:
        """Per-step norms estimated from the compressed state alone, (T,), with error estimates (T,).

        From the step sketch when the monitor has one (:meth:`sketched_norms`), otherwise from the
        low-rank reconstruction (:meth:`reconstructed_norms`). (The exact norms are :meth:`norms`.)
        """
        return self.sketched_norms(layer) if self._config["step_sketch"] else self.reconstructed_norms(layer)

    def step_sketch(self, layer: int | str) -> torch.Tensor:
        """The step sketch of ``layer``: rows y_t = Omega g_t of the recorded steps, (T, m_l), on CPU.

        Inner products of rows estimate those of the gradients (E <y_s, y_t> = <g_s, g_t>).
        """
        layer = self._layer(layer)
        if not self._config["step_sketch"]:
            raise ValueError("this monitor keeps no step sketch; build it with step_sketch=m (e.g. 128)")
        parts = [self._step_rows[w][layer][:len(rows)] for w, rows in self._window_rows()]
        return torch.cat(parts).cpu() if parts else torch.zeros(0, self._step_size(layer), dtype=self._dtype)

    def sketched_norms(self, layer: int | str) -> Estimate:
        """||g_t|| estimated by ||y_t|| from the step sketch, (T,), with standard errors (T,).

        ||y_t||^2 / ||g_t||^2 has mean 1 and standard deviation about sqrt(2/m) (exactly so for a
        Gaussian Omega: chi^2_m / m), so ||y_t|| has relative standard error about 1/sqrt(2m):
        the error returned is ||y_t|| / sqrt(2m) (0 for a layer kept exactly). About 68% of the
        true errors fall below it, 99.7% below three times it; the median error is about 0.67 times it.
        """
        layer = self._layer(layer)
        y = self.step_sketch(layer).double()
        value = torch.linalg.vector_norm(y, dim=1)
        return Estimate(value, value * self._step_rel_error(layer))

    def inner_product(self, layer: int | str, step_a: int, step_b: int) -> Estimate:
        """<g_a, g_b> for any two recorded steps from the step sketch, with a standard error.

        The error is sqrt((||y_a||^2 ||y_b||^2 + <y_a, y_b>^2) / m), the standard deviation of
        <y_a, y_b> for a Gaussian Omega (0 for a layer kept exactly).
        """
        layer = self._layer(layer)
        ya, yb = self._step_row(layer, step_a), self._step_row(layer, step_b)
        dot = ya @ yb
        spread = math.sqrt(2.0) * self._step_rel_error(layer)          # 1/sqrt(m)
        err = spread * torch.sqrt((ya @ ya) * (yb @ yb) + dot ** 2)
        return Estimate(dot, err)

    def cosine(self, layer: int | str, step_a: int, step_b: int) -> Estimate:
        """cos(g_a, g_b) for any two recorded steps from the step sketch, with a standard error.

        Estimated as <y_a, y_b> / (||y_a|| ||y_b||); its standard error is about (1 - c^2) / sqrt(m).
        """
        layer = self._layer(layer)
        ya, yb = self._step_row(layer, step_a), self._step_row(layer, step_b)
        value = _cos(ya[None], yb[None])[0]
        return Estimate(value, (1 - value ** 2) * math.sqrt(2.0) * self._step_rel_error(layer))

    def cosines(self, layer: int | str, source: str | None = None) -> Estimate:
        """cos(g_t, g_{t+1}) for consecutive recorded steps, (T-1,), with error estimates (T-1,).

        ``source`` "step_sketch" (the default when the monitor has one): <y_t, y_{t+1}> /
        (||y_t|| ||y_{t+1}||), standard error about (1 - c^2) / sqrt(m) whatever the trajectory.
        "reconstruction" (the default otherwise): <g_hat_t, g_hat_{t+1}> / (||g_t|| ||g_{t+1}||) with
        the exact norms; the error is (e_t ||g_{t+1}|| + ||g_hat_t|| e_{t+1}) / (||g_t|| ||g_{t+1}||)
        for the estimated errors e of the two reconstructions, a bound that is as good as the
        low-rank fit. NaN where a norm is 0.
        """
        if source is None:
            source = "step_sketch" if self._config["step_sketch"] else "reconstruction"
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
        layer = self._layer(layer)
        if source == "step_sketch":
            y = self.step_sketch(layer).double()
            value = _cos(y[:-1], y[1:])
            return Estimate(value, (1 - value ** 2) * math.sqrt(2.0) * self._step_rel_error(layer))
        coords, bases = [], []
        for w, rows in self._window_rows():
            factors, _ = self._factors(w, layer)
            scale = self._scales(rows, layer).to(factors.C.dtype)
            coords.append((factors.P[:len(rows)] @ factors.C.mT) * scale[:, None])   # g_hat_t = Q coords_t
            bases.append(factors.Q)
        if len(self._steps) < 2:
            empty = torch.zeros(0, dtype=torch.float64)
            return Estimate(empty, empty)
        dots = []
        for w, c in enumerate(coords):
            dots.append((c[:-1] * c[1:]).sum(dim=1).double().cpu())
            if w + 1 < len(coords):                                   # across a window boundary
                cross = (bases[w].mT @ bases[w + 1]).double()
                dots.append((c[-1].double() @ cross @ coords[w + 1][0].double()).reshape(1).cpu())
        dot = torch.cat(dots)
        norms = self.norms(layer)
        approx, err = self.reconstructed_norms(layer)
        denom = norms[:-1] * norms[1:]
        value = dot / denom
        bound = (err[:-1] * norms[1:] + approx[:-1] * err[1:]) / denom
        return Estimate(value, bound)

    def subspace(self, layer: int | str, rank: int | None = None) -> Subspace:
        """Leading ``rank`` (default r) left singular vectors of the reconstructed history of ``layer``."""
        layer = self._layer(layer)
        if not self._steps:
            raise ValueError("no steps recorded yet")
        blocks = []
        for w, rows in self._window_rows():
            factors, _ = self._factors(w, layer)
            scale = self._scales(rows, layer).to(factors.C.dtype)
            # G_hat_w = Q C (D P)^T with D = diag(scale); (D P) = U R gives G_hat_w = (Q C R^T) U^T.
            r = torch.linalg.qr(factors.P[:len(rows)] * scale[:, None], mode="reduced").R
            blocks.append(factors.Q @ factors.C @ r.mT)
        u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
        rank = self._config["rank"] if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= s.numel():
            raise ValueError(f"rank={rank!r} must be an int in [1, {s.numel()}] (the reconstruction's rank)")
        _, errors = self.reconstructed_norms(layer)
        total = float((self.norms(layer) ** 2).sum())
        rel = math.sqrt(float((errors ** 2).sum()) / total) if total > 0 else 0.0
        return Subspace(u[:, :rank].cpu(), s[:rank].cpu(), rel)

    # -- memory ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the monitor holds: sketches, step sketch (rows and the structure of its test matrices;
        Gaussian ones are regenerated), norms and step numbers."""
        sketches = sum(s.nbytes for window in self._windows for s in window)
        return sketches + self.step_sketch_bytes + len(self._steps) * (8 * len(self._names) + 8)

    @property
    def step_sketch_bytes(self) -> int:
        """Bytes of the step sketch: its rows (window x m_l per layer and window; grows with the steps)
        plus what its test matrices keep (SRFT: P_l int8 signs and m_l row indices per layer)."""
        if not self._config["step_sketch"]:
            return 0
        rows = sum(t.numel() * t.element_size() for window in self._step_rows for t in window)
        return rows + sum(self._step_op(layer).nbytes for layer in range(len(self._names)))

    @property
    def full_history_bytes(self) -> int:
        """Bytes of the full gradient history of the recorded steps in the gradients' dtype."""
        return len(self._steps) * sum(self._sizes) * self._itemsize

    def memory_report(self) -> dict:
        """monitor_bytes, full_history_bytes, memory_reduction (fraction saved) and per-layer sizes."""
        full = self.full_history_bytes
        per_layer = []
        for layer, name in enumerate(self._names):
            sketch = self._windows[0][layer] if self._windows else self._new_sketch(0, layer)
            per_layer.append({"layer": name, "params": self._sizes[layer], "rank": sketch.rank, "k": sketch.k,
                              "s": sketch.s, "step_sketch": self._step_size(layer)})
        m_total = sum(self._step_size(layer) for layer in range(len(self._names)))
        return {"steps": len(self._steps), "windows": len(self._windows), "monitor_bytes": self.nbytes,
                "full_history_bytes": full,
                "memory_reduction": 1.0 - self.nbytes / full if full else float("nan"),
                # The step sketch grows linearly: step_sketch_bytes_per_step more bytes every step.
                "step_sketch_bytes": self.step_sketch_bytes,
                "step_sketch_bytes_per_step": m_total * torch.empty((), dtype=self._dtype).element_size(),
                "layers": per_layer}

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue or analyse the monitor (tensors on CPU)."""
        return {
            "config": self.config,
            "layers": list(self._names),
            "sizes": list(self._sizes),
            "itemsize": self._itemsize,
            "steps": self.steps,
            "norms": self.norms(),
            "windows": [[{**{k: v.cpu().clone() for k, v in s.sketches().items()},
                          **({"step_sketch": self._step_rows[w][layer].cpu().clone()}
                             if self._config["step_sketch"] else {})}
                         for layer, s in enumerate(window)]
                        for w, window in enumerate(self._windows)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output; the configuration and layers must match."""
        saved = {**_OPTIONAL, **state["config"]}
        if saved != self._config:
            raise ValueError(f"saved monitor configuration {saved} differs from this "
                             f"monitor's {self._config}; build the monitor with the saved options")
        names, sizes = list(state["layers"]), [int(n) for n in state["sizes"]]
        if self._names and (names != self._names or sizes != self._sizes):
            raise ValueError(f"saved monitor layers {names} (sizes {sizes}) differ from this monitor's "
                             f"{self._names} (sizes {self._sizes})")
        self._names, self._sizes = names, sizes
        self._itemsize = int(state["itemsize"])
        self._steps = [int(s) for s in torch.as_tensor(state["steps"]).tolist()]
        norms = torch.as_tensor(state["norms"], dtype=torch.float64).to(self._device)
        self._norms = list(norms.reshape(len(self._steps), len(self._names)))
        self._windows, self._cache, self._step_rows, self._step_ops = [], {}, [], {}
        self._windows = [[self._rebuilt(w, layer, tensors) for layer, tensors in enumerate(saved)]
                         for w, saved in enumerate(state["windows"])]
        if self._config["step_sketch"]:
            for w, saved in enumerate(state["windows"]):
                blocks = []
                for layer, tensors in enumerate(saved):
                    if "step_sketch" not in tensors:
                        raise ValueError(f"saved monitor state has no step sketch for window {w}, layer "
                                         f"{self._names[layer]!r} although its configuration has step_sketch="
                                         f"{self._config['step_sketch']}")
                    rows = self._new_step_rows(layer)
                    _copy_into(rows, tensors["step_sketch"], f"step sketch of window {w}, layer {self._names[layer]!r}")
                    blocks.append(rows)
                self._step_rows.append(blocks)

    @classmethod
    def from_config(cls, config: Mapping, params=None) -> "GradientMonitor":
        """A new monitor with the options of :attr:`config` (e.g. read back from a run file)."""
        cfg = {**_OPTIONAL, **dict(config)}
        dtype = _DTYPES.get(cfg.pop("dtype", "torch.float32"))
        if dtype is None:
            raise ValueError(f"monitor dtype {config.get('dtype')!r} is not one of {sorted(_DTYPES)}")
        return cls(params, **cfg, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "GradientMonitor":
        """A monitor rebuilt from :meth:`state_dict` for analysis (no parameters bound)."""
        monitor = cls.from_config(state["config"])
        monitor.load_state_dict(state)
        return monitor

    # -- helpers -------------------------------------------------------------------------
    def _layer(self, layer: int | str) -> int:
        if isinstance(layer, str):
            if layer not in self._names:
                raise KeyError(f"no layer named {layer!r}; layers are {self._names}")
            return self._names.index(layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(self._names) <= layer < len(self._names):
            raise IndexError(f"layer={layer!r} is not a layer index in [0, {len(self._names)}) or a name "
                             f"in {self._names}")
        return layer % len(self._names)

    def _position(self, step: int) -> int:
        lo, hi = 0, len(self._steps)
        while lo < hi:                                   # steps are increasing: bisect
            mid = (lo + hi) // 2
            if self._steps[mid] < step:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(self._steps) or self._steps[lo] != step:
            shown = f"{self._steps[0]}..{self._steps[-1]}" if self._steps else "none"
            raise KeyError(f"step {step} was not recorded (recorded steps: {shown})")
        return lo

    def _window_rows(self) -> list[tuple[int, range]]:
        window, total = self._config["window"], len(self._steps)
        return [(w, range(w * window, min(total, (w + 1) * window))) for w in range(len(self._windows))]

    def _factors(self, w: int, layer: int) -> tuple[LowRankFactors, torch.Tensor]:
        """Low-rank factors of window ``w`` (of the tracked, possibly normalized, columns) and the
        estimated error of each column: from the step sketch when there is one (m rows), else from
        the tracker's error sketch (q rows), else NaN."""
        key = (w, layer)
        if key not in self._cache:
            sketch = self._windows[w][layer]
            factors = sketch.reconstruct()
            if self._config["step_sketch"]:
                rows = self._step_rows[w][layer]                               # (window, m): y_t = Omega g_t
                if self._config["normalize"]:
                    start = w * self._config["window"]
                    stop = min(len(self._norms), start + rows.shape[0])
                    scale = torch.ones(rows.shape[0], dtype=torch.float64, device=self._device)
                    if stop > start:
                        scale[:stop - start] = torch.stack([self._norms[i][layer] for i in range(start, stop)])
                    rows = rows / torch.where(scale > 0, scale, 1.0).to(rows.dtype)[:, None]
                fit = (self._step_apply(layer, factors.Q) @ factors.C) @ factors.P.mT      # (m, window)
                errors = torch.linalg.vector_norm(rows.mT - fit, dim=0)
            elif sketch.error_size:
                errors = sketch.column_errors(factors)
            else:
                errors = torch.full((sketch.shape[1],), math.nan, dtype=sketch.dtype, device=sketch.device)
            self._cache[key] = (factors, errors)
        return self._cache[key]

    def _step_rel_error(self, layer: int) -> float:
        """Relative standard error 1/sqrt(2 m_l) of a sketched norm (0 for a layer kept exactly)."""
        return 0.0 if self._step_exact(layer) else 1.0 / math.sqrt(2.0 * self._step_size(layer))

    def _step_row(self, layer: int, step: int) -> torch.Tensor:
        if not self._config["step_sketch"]:
            raise ValueError("this monitor keeps no step sketch; build it with step_sketch=m (e.g. 128)")
        index = self._position(step)
        w, j = divmod(index, self._config["window"])
        return self._step_rows[w][layer][j].double().cpu()

    def _scale(self, index: int, layer: int) -> torch.Tensor | float:
        return self._norms[index][layer].to(self._dtype) if self._config["normalize"] else 1.0

    def _scales(self, rows: range, layer: int) -> torch.Tensor:
        if not self._config["normalize"]:
            return torch.ones(len(rows), dtype=torch.float64, device=self._device)
        return torch.stack([self._norms[i][layer] for i in rows])


def _layers(params) -> list[tuple[str, list[torch.Tensor]]]:
    """(layer name, parameters) pairs from a module, a mapping or (name, tensor) pairs."""
    if isinstance(params, torch.nn.Module):
        groups: dict[str, list[torch.Tensor]] = {}
        for name, p in params.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.rpartition(".")[0] or name, []).append(p)
        return list(groups.items())
    if isinstance(params, Mapping):
        items = params.items()
    elif isinstance(params, Iterable):
        items = list(params)
        if not all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in items):
            raise TypeError("params must be an nn.Module, a mapping name -> parameters, or (name, parameter) pairs")
    else:
        raise TypeError(f"params must be an nn.Module, a mapping name -> parameters, or (name, parameter) "
                        f"pairs; got {type(params).__name__}")
    out = []
    for name, value in items:
        group = [value] if isinstance(value, torch.Tensor) else list(value)
        if not group or not all(isinstance(p, torch.Tensor) for p in group):
            raise TypeError(f"layer {name!r}: expected a tensor or a sequence of tensors, got {value!r}")
        out.append((str(name), group))
    return out


def _smooth_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT lengths with only small prime factors are fast)."""
    best, p2 = None, 1
    while p2 < 2 * n:
        p3 = p2
        while p3 < 2 * n:
            p5 = p3
            while p5 < n:
                p5 *= 5
            best = p5 if best is None else min(best, p5)
            p3 *= 3
        p2 *= 2
    return best


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (n, m) a and b; NaN where a row is zero."""
    dot = (a * b).sum(dim=1)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), math.nan)


def _copy_into(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    value = torch.as_tensor(value)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"saved {what} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    target.copy_(value.to(target.device, target.dtype))


def _cat(parts: Sequence[torch.Tensor], empty_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([p.cpu().double() for p in parts]) if parts else torch.zeros(empty_shape, dtype=torch.float64)
