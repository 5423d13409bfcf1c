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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..sketch import LowRankFactors, SIZINGS, OPERATORS, derive_seed
from .trajectory import IncrementalSVD, TrajectorySketch

__all__ = ["GradientMonitor", "Estimate", "Subspace", "METHODS"]

#: How each layer's gradient history is compressed: "three_sketch" (Tropp et al.'s randomized
#: three-sketch, linear in the history) or "isvd" (incremental truncated SVD, Brand 2002).
METHODS = ("three_sketch", "isvd")

_DTYPES = {"torch.float32": torch.float32, "torch.float64": torch.float64}
# Options added after the first files were written; saved configurations without them get these.
_OPTIONAL = {"method": "three_sketch", "k": None, "s": None}


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
        error_size: q, rows of the error sketch (per-step error estimates need q >= 1).
        normalize: track g_t / ||g_t|| and rescale by the stored exact norm (default), so every
            step weighs equally in the low-rank fit; otherwise the large early gradients
            dominate it and the small late ones are reconstructed poorly.
        seed: seeds every test matrix (window w, layer l: ``derive_seed(seed, "window", w, "layer", l)``).
        dtype: dtype of the sketches (float32 or float64).

    Use: call :meth:`update` after ``loss.backward()`` (gradients in ``p.grad``),
    or pass the monitor as a training callback (it updates in ``on_step``).
    """

    def __init__(self, params=None, *, rank: int = 4, window: int = 1000, method: str = "three_sketch",
                 k: int | None = None, s: int | None = None, sizing: str = "default", operator: str = "gaussian",
                 error_size: int = 10, normalize: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
        if method == "isvd" and (k is not None or s is not None):
            raise ValueError(f"k={k!r}, s={s!r} size the three-sketch; method='isvd' keeps `rank` directions, "
                             "leave k and s unset")
        checks = [("rank", rank, 1), ("window", window, 1), ("error_size", error_size, 0), ("seed", seed, 0)]
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
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r} is not supported; pass torch.float32 or torch.float64")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self._config = {"rank": rank, "window": window, "method": method, "k": k, "s": s, "sizing": sizing,
                        "operator": operator, "error_size": error_size, "normalize": normalize, "seed": seed,
                        "dtype": str(dtype)}
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
        norms = []
        for layer, group in enumerate(self._params):
            g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                        device=p.device)
                           for p in group])
            norm = torch.linalg.vector_norm(g, dtype=torch.float64)
            norms.append(norm)
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

    def cosines(self, layer: int | str) -> Estimate:
        """cos(g_t, g_{t+1}) for consecutive recorded steps, (T-1,), with error bounds (T-1,).

        Estimated as <g_hat_t, g_hat_{t+1}> / (||g_t|| ||g_{t+1}||) with the exact norms;
        the error is (e_t ||g_{t+1}|| + ||g_hat_t|| e_{t+1}) / (||g_t|| ||g_{t+1}||) for
        the estimated errors e of the two reconstructions (NaN where a norm is 0).
        """
        layer = self._layer(layer)
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
        """Bytes the monitor holds: sketches (test matrices are regenerated), norms and step numbers."""
        sketches = sum(s.nbytes for window in self._windows for s in window)
        return sketches + len(self._steps) * (8 * len(self._names) + 8)

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
                              "s": sketch.s})
        return {"steps": len(self._steps), "windows": len(self._windows), "monitor_bytes": self.nbytes,
                "full_history_bytes": full,
                "memory_reduction": 1.0 - self.nbytes / full if full else float("nan"), "layers": per_layer}

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
            "windows": [[{k: v.cpu().clone() for k, v in s.sketches().items()} for s in window]
                        for window in self._windows],
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
        self._windows, self._cache = [], {}
        self._windows = [[self._rebuilt(w, layer, tensors) for layer, tensors in enumerate(saved)]
                         for w, saved in enumerate(state["windows"])]

    @classmethod
    def from_config(cls, config: Mapping, params=None) -> "GradientMonitor":
        """A new monitor with the options of :attr:`config` (e.g. read back from a run file)."""
        cfg = dict(config)
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
        key = (w, layer)
        if key not in self._cache:
            sketch = self._windows[w][layer]
            factors = sketch.reconstruct()
            errors = (sketch.column_errors(factors) if sketch.error_size
                      else torch.full((sketch.shape[1],), math.nan, dtype=sketch.dtype, device=sketch.device))
            self._cache[key] = (factors, errors)
        return self._cache[key]

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


def _cat(parts: Sequence[torch.Tensor], empty_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([p.cpu().double() for p in parts]) if parts else torch.zeros(empty_shape, dtype=torch.float64)
