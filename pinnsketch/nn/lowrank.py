"""The `lowrank` storage policy (the default sketched policy).

Designed around the calibration run of DESIGN.md §3.4a and the measurements
quoted below. Per block and per jet stream (value, u_x, u_t, u_xx, ...), the
forward pass keeps

1. a rank-r approximation U P^T of the **current** z_prev stream, found by a
   randomized range finder (Halko, Martinsson & Tropp 2011): Y = z Omega^T for
   a Gaussian Omega (k x w, k = 2r+1, regenerated from the per-step seed: fixed
   within an optimizer step, new after `advance()`), Q = orth(Y), the top-r
   right singular vectors P of Q^T z, and U = z P (kept in bfloat16 when a
   residual follows: the residual absorbs the rounding). The block holds all
   of z_prev when it packs it, so the single-pass three-sketch of Tropp et al.
   is not needed here: the two-pass finder is more accurate at the same k, and
   cheaper (no N-sized test matrices: Omega is k x w). A block with w <= 2k
   (a 32-wide PINN) uses the exact top-r right singular vectors from the
   Gram matrix z^T z instead, which costs no more there (N w^2 against 2 N w
   k flops) and is deterministic;
2. the **residual** z_prev - U P^T, quantized with one scale per point
   (`codecs.IntCodec`): int4 by default, int8 for the value stream of a jet
   through a smooth activation (its errors are multiplied by f''(z_0) u_x and
   f'''(z_0) u_x^2 on the derivative path). This bounds the error where low
   rank alone cannot: |error| <= max|residual row| / 254 (int8) or / 14 (int4);
3. the reconstruction z_hat = U P^T + residual_hat feeds both the weight
   gradient and the nonlinearity's derivative path.

Every stream is handled on its own (its own P and quantization scales: the
§3.4a normalization); the streams of a block are processed in one batch.

Accuracy control: each block targets the relative error of **its weight
gradient** (`target`, default 1e-2), and, for jets through a smooth
activation, the error its reconstruction sends down the derivative path.

* The first call of each size in a step, and every audited call, measures the
  exact relative reconstruction error of z_prev (max over streams and over
  the calls of one step; the many L-BFGS evaluations of one step skip it),
  and the singular values tell how much the residual would shrink or grow
  at rank 2r or r/2.
* Audits (one block per step, round robin, every `audit_every` steps) also
  save Y_a = (a - a_hat) Omega_a^T, (S, N, q) in bfloat16 with a Gaussian
  Omega_a (q x w), q = `audit_size`: backward forms sum_s g_s^T Y_a,s, a
  Johnson-Lindenstrauss sketch of the weight-gradient error sum_s g_s^T
  (a_s - a_hat_s) (out x w). Its squared norm is an unbiased estimate of the
  squared error norm, with relative standard deviation at most sqrt(2/q) (0.5
  at q = 8, i.e. about +-25% on the norm, less when the error matrix has more
  than one significant direction), for q/w of the block's exact memory at 2
  bytes: 1/16 of the block at q = 8, w = 32 and S = any; far less for wide
  blocks. kappa = gradient error / reconstruction error.
  Why not keep a random subset of m exact rows and estimate the error from two
  halves: the weight-gradient error is a sum over all N points that cancels
  (§3.4a), and a row sample estimates such a sum with relative standard
  deviation of order sqrt(N/m) / sqrt(out * w); an unbiased estimate good to
  +-25% would need m ~ N / sqrt(out * w) exact rows of w values (6% of a
  32-wide block), against q = 8 values per row here, and it could not see a
  few shock points that carry much of the gradient. The sketch keeps every
  row, so the contraction with g is exact and only the w-dimension is
  compressed, which a Gaussian sketch does without bias.
* The same audit measures, for free, the per-point spread of the gradient:
  A = sqrt(sum_i ||x_i||^2) / ||sum_i x_i|| with x_i = sum_s g_s,i a_s,i^T
  the point's contribution. A is the factor by which an error that does not
  cancel across points (rounding) is amplified relative to the gradient,
  which does; it grows as training converges (Burgers: 4 to 15 through the
  L-BFGS phase, while the coherent ratio sum_i ||x_i|| / ||sum_i x_i||, the
  cancellation of §3.4a, grew from 75 to 280).
* What the audits cannot see directly is the derivative path: block l's
  reconstruction error changes grad_z_prev, and that perturbation reaches the
  weight gradients of all earlier blocks, where it is amplified by A.
  Measured on the Burgers solver's default network (tanh 2-32x4-1, 7,000
  points, exact training stopped in its L-BFGS phase): with the old control,
  which looked only at each block's own weight gradient, the rank fell to 4
  and the first layer's weight gradient was 16% off (total 3.4%), 95% of it
  from the derivative path; a reconstruction error of about 3e-4 in every
  block brought it to 2% (total 3e-3). So jets through a smooth activation
  also hold the reconstruction error below target / (`path_gain` x A). At the
  same point path_gain = 8 gave a first-layer error of 1.2e-2 (total 1.9e-3),
  path_gain = 16 1.6e-3 (total 2e-4). The model error ~ A x reconstruction
  error is calibrated there; deeper into L-BFGS it under-predicts (at 1e-4 loss,
  A = 15: reconstruction 1e-5, first layer 1.2e-2, total 2.6e-3, whatever the
  gain), and int8 codes at full rank are then the finest compressed form.
  Default solver runs (Burgers, seed 0, 10,000 steps, relative L2): exact
  2.46e-3; path_gain 8 3.83e-3 (1.56x) at 0.56 of exact's peak saved bytes,
  path_gain 16 2.63e-3 (1.07x) at 0.64; hence 16. Wide blocks (width 256) see
  A < 1 and stay where the weight-gradient target puts them.
* After every step (`advance()`), the worst of predicted gradient error /
  target (predicted = kappa x reconstruction error) and reconstruction error
  / path target decides: above 1, of "double the rank" and "int4 -> int8"
  (bytes per row: 2r against w/2, predicted effect: the residual's shrinkage
  from the singular values, or 1/18 for int8's finer step) the one with the
  best predicted reduction per byte, unless one no dearer is predicted to
  reach half the target alone; when neither is available for `patience` consecutive
  steps the block falls back to exact storage (recorded in `events`). Below
  1/4 for `patience` consecutive steps: the change that saves the most bytes
  while its predicted error stays below 1/2. A block in exact fallback keeps
  compressing on its audit steps and returns to compression when that
  predicts below 1/2.

Mini-batch training (`noise_fraction`): the gradient of a shuffled
mini-batch is itself a noisy estimate, with relative sampling noise
sigma = sqrt(N/(N-1) (sum_i ||x_i||^2 - ||sum_i x_i||^2 / N)) / ||sum_i x_i||,
measured by the same audit. A compression error that behaves like independent
noise of relative size eps adds eps^2 / sigma^2 to the gradient's variance,
i.e. it costs the same as shrinking the batch by that fraction; so with
`noise_fraction` = f the target becomes max(target, f sigma) (f = 0.25: at
most ~6% of the batch). Full-batch PINN training has no such noise and
leaves it off (None, the default); `pinnsketch.data.make_classifier` turns it
on for classifiers.
"""

from __future__ import annotations

import copy
import math

import torch

from ..sketch import make_operator
from ..sketch.operators import OPERATORS
from ..sketch.three_sketch import SIZINGS
from .activations import Identity, ReLU
from .codecs import IntCodec
from .storage import AbstractStorage, Stored, StorageError, check_finite_activation, stored_bytes

__all__ = ["LowRankStorage"]

_RESIDUALS = ("int4", "int8", None)
# int8's quantization step is 7/127 of int4's (codes in [-127, 127] against [-7, 7]).
_INT8_GAIN = 127.0 / 7.0


def _bits(residual: str | None) -> int | None:
    return None if residual is None else int(residual[3:])


class LowRankStorage(AbstractStorage):
    """Per-stream randomized low-rank approximation of the current z_prev plus a quantized residual.

    Exact: grad_b and the linear part g W of the input gradient; for ReLU and
    identity blocks the derivative path (ReLU keeps its exact 1-bit mask).
    Approximate: the weight gradient and (smooth activations) the derivative
    path, both from z_hat whose relative error is measured every step and kept,
    through audits, near `target` in the weight gradient (see the module
    docstring); exact storage when no compressed form meets the target (or the
    block is too narrow to save).

    Stores per stream: U (N x r), P (w x r), the residual codes (N*w/2 bytes at
    int4, N*w at int8) and N scales; plus ReLU's mask; plus, on the audited
    block's audit steps, Y_a (S, N, q) in bfloat16.

    Args:
        target: relative weight-gradient error to hold (> 0).
        rank: fixed rank (no rank adaptation), or None (adaptive from `initial_rank`).
            Any rank is clamped to the rows of a call (a small boundary batch).
        residual: codes of the derivative streams' residual: "int4" | "int8" | None.
        value_residual: codes of the value stream's residual when the block carries derivative
            streams through a smooth activation: "int8" | "int4" | None (None with residual=None:
            the pure low-rank approximation, for tests and ablations). Otherwise the value stream
            uses `residual`.
        adaptive: adapt rank/bits/fallback to `target` (False: keep what is given, no audits).
        initial_rank, r_min, r_max: rank bounds (each clamped to the block's width).
        operator: test operator Omega of the range finder ("gaussian" | "sparse" | "srft").
        sizing: range-finder size, "default" (k = 2r+1) or "tropp" (k = 4r+1).
        audit_every: steps between audits (one block each, round robin); 0 disables.
        audit_size: q, columns of the audit's Gaussian sketch.
        path_gain: jets through a smooth activation hold their reconstruction error below
            target / (path_gain x A) (A: the measured amplification); None disables.
        noise_fraction: mini-batch training: the target becomes max(target, noise_fraction x the
            measured relative sampling noise of the gradient); None (full batch) keeps `target`.
        patience: consecutive steps far below target before shrinking, or saturated before
            falling back to exact storage.
        group: quantization scale per `group` columns instead of per row (None).
    """

    name = "lowrank"
    _KEEP_AUDITS = 64

    def __init__(self, target: float = 1e-2, *, rank: int | None = None, residual: str | None = "int4",
                 value_residual: str | None = "int8", adaptive: bool = True, initial_rank: int = 8,
                 r_min: int = 4, r_max: int = 32, operator: str = "gaussian", sizing: str = "default",
                 audit_every: int = 1, audit_size: int = 8, path_gain: float | None = 16.0,
                 noise_fraction: float | None = None, patience: int = 3, group: int | None = None):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
            raise StorageError(f"target={target!r} must be a positive float (relative weight-gradient error)")
        for name, value in (("rank", rank), ("initial_rank", initial_rank), ("r_min", r_min), ("r_max", r_max),
                            ("audit_size", audit_size), ("patience", patience)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise StorageError(f"{name}={value!r} must be an int >= 1" + (" or None" if name == "rank" else ""))
        if r_min > r_max:
            raise StorageError(f"r_min={r_min} exceeds r_max={r_max}; pass r_min <= r_max")
        for name, value in (("residual", residual), ("value_residual", value_residual)):
            if value not in _RESIDUALS:
                raise StorageError(f"{name}={value!r} is not one of 'int4', 'int8', None")
        for name, value in (("path_gain", path_gain), ("noise_fraction", noise_fraction)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise StorageError(f"{name}={value!r} must be a positive float or None")
        if operator not in OPERATORS:
            raise StorageError(f"operator={operator!r} is not one of {sorted(OPERATORS)}")
        if sizing not in SIZINGS:
            raise StorageError(f"sizing={sizing!r} is not one of {sorted(SIZINGS)}")
        if isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 0:
            raise StorageError(f"audit_every={audit_every!r} must be an int >= 0 (0 disables audits)")
        IntCodec(4, group)      # validates `group`
        self.target, self.fixed_rank, self.adaptive = float(target), rank, bool(adaptive)
        self.initial_rank, self.r_min, self.r_max = initial_rank, r_min, r_max
        self.operator, self.sizing, self.group = operator, sizing, group
        self.audit_every, self.audit_size, self.patience = audit_every, audit_size, patience
        self.path_gain = None if path_gain is None else float(path_gain)
        self.noise_fraction = None if noise_fraction is None else float(noise_fraction)
        self.bits: int | None = _bits(residual)               # derivative streams; adapted
        self.value_bits: int | None = _bits(value_residual)
        self.exact = False                # in exact fallback
        self._rank: int | None = None
        self._width: int | None = None
        self.kappa: float | None = None   # gradient error / reconstruction error, from audits
        self.amplification: float | None = None     # A, from audits of calls with jets (else any call)
        self.noise: float | None = None              # relative sampling noise of the gradient, from audits
        self.recon_error: float | None = None
        self.sketch_error: float | None = None       # the low-rank part's own relative error
        self._step_recon: float | None = None
        self._step_tail: dict[str, float] = {}       # residual factor at rank 2r ("up") and r/2 ("down")
        self._step_measured: set = set()             # (S, N) of the calls measured this step
        self._path = False                # the block carries jets through a smooth activation
        self._calm = 0
        self._stuck = 0
        self.audits: list[dict] = []      # the latest `_KEEP_AUDITS` audits
        self.audit_count = 0
        self.events: list[dict] = []

    # -- configuration state --------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return self._rank

    @property
    def _controlled(self) -> bool:
        return self.adaptive and self.fixed_rank is None

    def _start(self, w: int) -> None:
        """First call: bounds from the block's width (the rows of a call vary: clamped per call)."""
        self._width = w
        if self.fixed_rank is not None or not self.adaptive:
            r = self.fixed_rank if self.fixed_rank is not None else self.initial_rank
            if r > w:
                raise StorageError(f"layer {self.layer}: rank={r} exceeds the width {w} of the stored "
                                   f"activation; pass rank <= {w} or storage='exact'")
            self._rank = r
        else:
            self._rank = min(max(self.initial_rank, self._r_min), self._r_max)

    @property
    def _r_max(self) -> int:
        return min(self.r_max, self._width or self.r_max)

    @property
    def _r_min(self) -> int:
        return min(self.r_min, self._r_max)

    def _is_audit(self) -> bool:
        if not self.audit_every or (self.fixed_rank is not None and not self.adaptive) or not self.adaptive:
            return False
        if self.step < self.n_layers:          # bootstrap: every block once
            return self.step == self.layer
        return self.step % self.audit_every == 0 and (self.step // self.audit_every) % self.n_layers == self.layer

    def _stream_bits(self, stream: int, streams: int, smooth: bool) -> int | None:
        # The value stream's finer codes protect the derivative path of a jet through a smooth
        # activation (f'' and f''' of z_0 multiply the large derivative streams); without
        # derivative streams, or through ReLU (exact mask), it is coded like the others.
        if stream == 0 and streams > 1 and smooth:
            return None if self.value_bits is None else max(self.value_bits, self.bits or 0)
        return self.bits

    def _codec(self, bits: int | None) -> IntCodec | None:
        return None if bits is None else IntCodec(bits, self.group)

    def _k(self, r: int, w: int, n: int) -> int:
        return min(2 * r + 1 if self.sizing == "default" else 4 * r + 1, w, n)

    def _compressed_bytes(self, s: int, n: int, w: int, r: int, dtype: torch.dtype, smooth: bool = True) -> int:
        size = torch.finfo(dtype).bits // 8
        total = 0
        for i in range(s):
            codec = self._codec(self._stream_bits(i, s, smooth))
            u_bytes = 2 if codec is not None and dtype == torch.float32 else size
            total += n * r * u_bytes + w * r * size
            total += 0 if codec is None else codec.nbytes((n, w), dtype)
        return total

    # -- forward -------------------------------------------------------------------------
    def pack(self, z_prev, a, block):
        s, n, w = z_prev.shape
        smooth = not block.piecewise_linear
        # A block so narrow that even rank 1 would not save half its memory (a PINN's
        # coordinate input, w = d) is stored exactly, whatever the rank settings.
        if 2 * self._compressed_bytes(s, n, w, 1, z_prev.dtype, smooth) > z_prev.numel() * z_prev.element_size():
            check_finite_activation(z_prev, self.layer, self.name)
            self._note({"rank": None, "mode": "exact (narrow)", "saved_bytes": stored_bytes([z_prev])})
            return (z_prev,), ("exact",)
        if self._rank is None:
            self._start(w)
        self._path = self._path or (s > 1 and smooth)
        audit = self._is_audit()
        if self.exact and not audit:
            check_finite_activation(z_prev, self.layer, self.name)
            self._note({"rank": None, "mode": "exact (fallback)", "saved_bytes": stored_bytes([z_prev])})
            return (z_prev,), ("exact",)
        r = min(self._rank, n, w)                     # a call with fewer rows than the rank
        bits = tuple(self._stream_bits(i, s, smooth) for i in range(s))
        # Errors are measured once per step and call size (L-BFGS re-evaluates a step many times
        # at nearby weights), and on every audited call (its kappa needs that call's error).
        measure = audit or (s, n) not in self._step_measured
        parts, err, low_err, tail, decoded = self._compress(z_prev, r, bits, measure, keep_decoded=audit)
        if measure:
            self._step_measured.add((s, n))
            # A step may call the network several times (residual points, boundary points):
            # the controller sees the worst reconstruction of the step.
            self._step_recon = max(self._step_recon or 0.0, err)
            self.recon_error = self._step_recon
            self.sketch_error = low_err
            if n >= self._rank:                           # full-size calls tell what a rank change does
                for key, value in tail.items():
                    self._step_tail[key] = max(self._step_tail.get(key, 0.0), value)
        layout = (s, n, w, r, bits)
        info = {"rank": r, "mode": "exact (fallback)" if self.exact else self._mode(bits),
                "error_estimate": self.sketch_error, "reconstruction_error": self._step_recon,
                "saved_bytes": stored_bytes(parts)}
        meta = ("lowrank", layout, audit, self.exact, err)
        if not audit:
            self._note(info)
            return tuple(parts), meta
        # the audit rebuilds z_hat from the residual decoded while measuring, not from the codes again
        y = self._audit_sketch(z_prev, a, _rows_fn(parts, layout, self.group, decoded), block)
        # fallback: train on the exact z_prev, estimate what compression would cost
        saved = (z_prev, y) if self.exact else (*parts, y)
        self._note({**info, "saved_bytes": stored_bytes(saved)})
        return saved, meta

    @staticmethod
    def _mode(bits) -> str:
        names = sorted({f"int{b}" for b in bits if b is not None})
        return "lowrank" + "".join(f"+{n}" for n in names)

    def _compress(self, z: torch.Tensor, r: int, bits: tuple, measure: bool = True, keep_decoded: bool = False):
        """Low-rank part + residual codes of every stream of z (S, N, w).

        Returns (parts, relative error of z_hat (max over streams), relative error of the low-rank
        part alone (max over streams), predicted residual factors {"up": rank 2r, "down": rank r/2},
        decoded); the errors and factors are nan / {} when not `measure`.
        parts: U (S, N, r), P (S, w, r), then per group of streams with equal bits: codes, scales.
        decoded: with `keep_decoded` (and `measure`), the decoded residual of each coded group,
        [(G, N, w)], exactly what decoding its codes gives (for `_rows_fn`); else None.
        """
        s, n, w = z.shape
        norms = torch.linalg.vector_norm(z, dim=(1, 2))                       # (S,)
        if not all(map(math.isfinite, norms.tolist())):                     # one small copy, no extra ops
            check_finite_activation(z, self.layer, self.name)                 # raises with a clear message
        k = self._k(r, w, n)
        if w <= 2 * k:
            # Narrow block: the Gram matrix z^T z (N w^2 flops) costs no more than the range finder
            # (2 N w k) and gives the exact top-r right singular vectors, deterministically.
            gram = (z.mT @ z).to(torch.float64)                                # (S, w, w)
            evals, evecs = torch.linalg.eigh(gram)                            # ascending
            p = evecs.flip(-1)[:, :, :r].to(z.dtype).contiguous()             # (S, w, r)
            sv2 = evals.flip(-1).clamp_min(0)                                 # (S, w) squared singular values
        else:
            omega = make_operator(self.operator, k, w, seed=self.step_seed("range"), dtype=z.dtype,
                                  device=z.device)
            y = omega.apply_right(z.reshape(s * n, w)).view(s, n, k)
            q, _ = torch.linalg.qr(y)                                        # (S, N, k)
            sv = torch.linalg.svd(q.mT @ z, full_matrices=False)             # B = Q^T z, (S, k, w)
            p = sv.Vh[:, :r].mT.contiguous()                                 # (S, w, r)
            sv2 = sv.S.square()
        u = z @ p                                                            # (S, N, r)
        factors = {}
        if measure:
            # residual energy at ranks r, 2r, r/2 from the (estimated) singular values, in one pass
            energy = norms.square().to(sv2.dtype)
            captured = sv2.cumsum(dim=1)
            names = [name for name, ok in (("up", 2 * r <= sv2.shape[1]), ("down", r // 2 >= 1)) if ok]
            cols = [r - 1] + [2 * r - 1 if name == "up" else r // 2 - 1 for name in names]
            tails = (energy[:, None] - captured[:, cols]).clamp_min(0).sqrt()      # (S, 1 + len(names))
            base = tails[:, 0].clamp_min(1e-30 * float(norms.max().clamp_min(1e-30)))
            factors = dict(zip(names, (tails[:, 1:] / base[:, None]).amax(dim=0).tolist()))
        coded = any(b is not None for b in bits)
        if coded and u.dtype == torch.float32:
            u = u.to(torch.bfloat16)                                          # the residual absorbs the rounding
        low = u.to(z.dtype) @ p.mT                                           # (S, N, w)
        residual = torch.sub(z, low, out=low)                                 # z - U P^T, in place
        low_norms = torch.linalg.vector_norm(residual, dim=(1, 2)) if measure else None      # (S,)
        parts = [u, p]
        decoded = [] if keep_decoded and measure else None
        for b, streams in _groups(bits):
            if b is None:
                continue
            codec = self._codec(b)
            sub = residual[streams]                                           # (G, N, w)
            if not measure:
                parts += codec.encode(sub.reshape(-1, w))
                continue
            codes, sub_hat = codec.encode_decode(sub.reshape(-1, w))
            parts += codes
            if decoded is not None:
                decoded.append(sub_hat.view(sub.shape))
            # the residual is coded: overwrite it with the coding error z - z_hat of these streams
            # (uncoded streams' error is the residual itself), then measure all streams at once
            torch.sub(sub, sub_hat.view(sub.shape), out=sub)
        if not measure:
            return parts, math.nan, math.nan, factors, decoded
        # relative errors of z_hat and of U P^T alone, max over streams (one sync for both)
        safe = torch.where(norms > 0, norms, 1.0)
        errors = torch.stack([torch.linalg.vector_norm(residual, dim=(1, 2)), low_norms]) / safe
        err, low_err = errors.amax(dim=1).tolist()
        return parts, err, low_err, factors, decoded

    def _audit_sketch(self, z, a, rows, block) -> torch.Tensor:
        """Y_a = (a - a_hat) Omega_a^T, (S, N, q), computed chunk by chunk over the points."""
        s, n, w = z.shape
        omega = make_operator("gaussian", self.audit_size, w, seed=self.step_seed("audit"), dtype=z.dtype,
                              device=z.device)
        store = torch.bfloat16 if z.dtype == torch.float32 else z.dtype
        y = torch.empty(s, n, self.audit_size, dtype=store, device=z.device)
        step = max(1, 2**16 // (s * w))
        for start in range(0, n, step):
            r = slice(start, min(n, start + step))
            z_hat = rows(r)
            if isinstance(block.activation, ReLU):
                a_hat = z_hat * (z[0, r] > 0)
            elif isinstance(block.activation, Identity):
                a_hat = z_hat
            else:
                a_hat = block.jet(z_hat)
            y[:, r].copy_(omega.apply_right((a[:, r] - a_hat).reshape(-1, w)).view(s, -1, self.audit_size))
        return y

    # -- backward ------------------------------------------------------------------------
    def unpack(self, saved, meta, block):
        if meta[0] == "exact":
            return Stored.of(saved[0])
        _, layout, audit, fallback, recon = meta
        payload = {}
        if audit:
            payload = {"audit_y": saved[-1], "audit_acc": None, "spread": 0.0, "recon": recon,
                       "points": layout[1], "streams": layout[0]}
        if fallback:
            z = saved[0]
            return Stored(lambda r: z[:, r], payload)
        parts = saved[:-1] if audit else saved
        return Stored(_rows_fn(parts, layout, self.group), payload)

    def weight_grad_chunk(self, grad_z, a, stored, rows, block):
        if "audit_y" in stored.payload:
            # sum_s g_s^T Y_s over these points: the audit's sketch of the gradient error
            y = stored.payload["audit_y"][:, rows].to(grad_z.dtype)
            part = grad_z.flatten(0, 1).mT @ y.flatten(0, 1)
            acc = stored.payload["audit_acc"]
            stored.payload["audit_acc"] = part if acc is None else acc.add_(part)
            # sum_i ||x_i||^2 with x_i = sum_s g_s,i a_s,i^T: (g_s,i . g_t,i)(a_s,i . a_t,i)
            if grad_z.shape[0] == 1:
                sq = (grad_z[0].square().sum(1) * a[0].square().sum(1)).sum()
            else:
                sq = (torch.einsum("sno,tno->nst", grad_z, grad_z) * torch.einsum("snw,tnw->nst", a, a)).sum()
            stored.payload["spread"] += float(sq)
        return super().weight_grad_chunk(grad_z, a, stored, rows, block)

    def finish_backward(self, stored, grad_w, block):
        acc = stored.payload.get("audit_acc")
        if acc is not None:
            norm = float(torch.linalg.norm(grad_w))
            err = float(torch.linalg.norm(acc)) / norm if norm > 0 else 0.0
            spread, n = stored.payload["spread"], stored.payload["points"]
            amp = math.sqrt(spread) / norm if norm > 0 else None
            noise = (math.sqrt(max(spread - norm ** 2 / n, 0.0) * n / (n - 1)) / norm
                     if norm > 0 and n > 1 else None)
            self._record_audit(err, stored.payload["recon"], amp, noise, stored.payload["streams"])

    # -- control -------------------------------------------------------------------
    def _record_audit(self, grad_error: float, recon_error: float, amp: float | None, noise: float | None,
                      streams: int) -> None:
        kappa = grad_error / recon_error if recon_error > 0 else None
        if kappa is not None:
            # The most pessimistic kappa of this audit step and the block's previous one:
            # the cancellation behind kappa grows as training converges (an old, smaller
            # kappa under-predicts), and one step may audit several calls of the network.
            earlier = [a["step"] for a in self.audits if a["kappa"] is not None and a["step"] < self.step]
            recent = [a["kappa"] for a in self.audits if a["kappa"] is not None
                      and (a["step"] == self.step or (earlier and a["step"] == earlier[-1]))]
            self.kappa = max([kappa, *recent])
        same_step = [a for a in self.audits if a["step"] == self.step]
        if amp is not None and (streams > 1 or not self._path):
            # the calls with jets carry the derivative path; take the worst of the step
            prev = [a["amplification"] for a in same_step if a["amplification"] is not None
                    and (a["streams"] > 1 or not self._path)]
            self.amplification = max([amp, *prev])
        if noise is not None:
            prev = [a["noise"] for a in same_step if a["noise"] is not None]
            self.noise = min([noise, *prev])
        self.audits.append({"step": self.step, "grad_error": grad_error, "reconstruction_error": recon_error,
                            "kappa": kappa, "amplification": amp, "noise": noise, "streams": streams,
                            "rank": self.rank, "bits": self.bits, "was_exact": self.exact})
        # L-BFGS evaluates a step many times: keep the recent audits only (they travel in run files)
        del self.audits[:-self._KEEP_AUDITS]
        self.audit_count += 1

    def effective_target(self) -> float:
        """`target`, or for mini-batch training max(target, noise_fraction x measured sampling noise)."""
        if self.noise_fraction is None or self.noise is None:
            return self.target
        return max(self.target, self.noise_fraction * self.noise)

    def path_target(self) -> float | None:
        """The reconstruction error the derivative path allows (None: no path control)."""
        if not self._path or self.path_gain is None or self.amplification is None:
            return None
        return self.effective_target() / (self.path_gain * self.amplification)

    def predicted_error(self) -> float | None:
        """kappa x reconstruction error: the expected relative weight-gradient error (None before calibration)."""
        if self.kappa is None or self.recon_error is None:
            return None
        return self.kappa * self.recon_error

    def _ratio(self) -> float | None:
        """The worst of predicted error / effective target and reconstruction error / path target."""
        predicted = self.predicted_error()
        if predicted is None:
            return None
        ratio = predicted / self.effective_target()
        path = self.path_target()
        if path is not None:
            ratio = max(ratio, self.recon_error / path)
        return ratio

    def advance(self) -> None:
        if self._controlled and self._rank is not None:
            self._control()
        self._step_recon = None
        self._step_tail = {}
        self._step_measured = set()
        super().advance()

    def _event(self, kind: str, **info) -> None:
        self.events.append({"step": self.step, "event": kind, "rank": self.rank, "bits": self.bits, **info})

    def _options(self, up: bool, ratio: float) -> list[tuple[str, float, float]]:
        """Candidate changes (name, predicted ratio, bytes per row and stream saved (< 0: spent))."""
        w, r, opts = self._width, self._rank, []
        u_bytes = 2
        if up:
            if r < self._r_max:
                new = min(2 * r, self._r_max)
                factor = self._step_tail.get("up", 1.0) if new == 2 * r else 1.0
                opts.append(("grow", ratio * factor, -(new - r) * u_bytes))
            if self.bits == 4:
                opts.append(("bits_up", ratio / _INT8_GAIN, -w / 2))
        else:
            if r > self._r_min:
                new = max(self._r_min, r // 2)
                factor = self._step_tail.get("down", math.inf) if new == r // 2 else math.inf
                opts.append(("shrink", ratio * factor, (r - new) * u_bytes))
            if self.bits == 8:
                opts.append(("bits_down", ratio * _INT8_GAIN, w / 2))
        return opts

    def _change(self, change: str, ratio: float) -> None:
        old = self._rank
        if change == "grow":
            self._rank = min(2 * old, self._r_max)
        elif change == "shrink":
            self._rank = max(self._r_min, old // 2)
        elif change == "bits_up":
            self.bits = 8
            self.recon_error /= _INT8_GAIN
        elif change == "bits_down":
            self.bits = 4
            self.recon_error *= _INT8_GAIN
        info = {"error": ratio * self.effective_target()}
        if change in ("grow", "shrink"):
            info.update(old_rank=old, new_rank=self._rank)
        self._event(change, **info)

    def _control(self) -> None:
        ratio = self._ratio()
        if ratio is None:
            return
        if self.exact:
            # Only an audit (which compressed anyway) can tell that compression works again.
            if self.audits and self.audits[-1]["step"] == self.step and ratio < 0.5:
                self.exact, self._stuck = False, 0
                self._event("resume_compression", predicted=ratio * self.effective_target())
            return
        if ratio > 1.0:
            self._calm = 0
            opts = self._options(True, ratio)
            if not opts:
                self._stuck += 1
                if self._stuck >= self.patience:
                    self.exact, self._stuck = True, 0
                    self._event("fallback_exact", predicted=ratio * self.effective_target())
                return
            self._stuck = 0
            # the best predicted reduction per byte spent, unless a change no dearer is predicted
            # to reach half the target on its own
            best = max(opts, key=lambda o: math.log(ratio / max(o[1], 1e-30)) / max(-o[2], 1e-9))
            enough = [o for o in opts if o[1] <= 0.5 and o[2] >= best[2]]
            change = max(enough, key=lambda o: o[2])[0] if enough else best[0]
            self._change(change, ratio)
        elif ratio < 0.25:
            self._stuck = 0
            self._calm += 1
            if self._calm >= self.patience:
                safe = [o for o in self._options(False, ratio) if o[1] < 0.5]
                if safe:
                    self._change(max(safe, key=lambda o: o[2])[0], ratio)
                self._calm = 0
        else:
            self._calm = self._stuck = 0

    @property
    def history(self) -> list[dict]:
        return sorted(self.events, key=lambda e: e["step"])

    def report(self):
        return {**super().report(), "target": self.target, "effective_target": self.effective_target(),
                "bits": self.bits, "value_bits": self.value_bits, "kappa": self.kappa,
                "amplification": self.amplification, "noise": self.noise,
                "predicted_grad_error": self.predicted_error(), "path_target": self.path_target(),
                "exact_fallback": self.exact, "audits": self.audit_count, "events": len(self.events)}

    _STATE = ("bits", "value_bits", "exact", "kappa", "amplification", "noise", "recon_error", "sketch_error",
              "_step_recon", "_step_tail", "_path", "_calm", "_stuck", "_rank", "_width", "audits", "audit_count",
              "events")

    def get_extra_state(self):
        state = super().get_extra_state()
        # plain values, so any HDF5/JSON writer can store them
        state["lowrank"] = copy.deepcopy({k: getattr(self, k) for k in self._STATE})
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        saved = copy.deepcopy(state["lowrank"])                   # never share state between models
        for k, v in saved.items():
            if k in self._STATE:
                setattr(self, k, v)


def _groups(bits: tuple) -> list[tuple[int | None, slice]]:
    """Consecutive streams with equal bits: [(bits, slice of streams)]."""
    out, start = [], 0
    for i in range(1, len(bits) + 1):
        if i == len(bits) or bits[i] != bits[start]:
            out.append((bits[start], slice(start, i)))
            start = i
    return out


def _rows_fn(parts, layout, group: int | None, decoded: list[torch.Tensor] | None = None):
    """rows -> z_hat[:, rows] (S, n, w) from parts [U, P, (codes, scales) per coded group].

    decoded: the decoded residual of each coded group, [(G, N, w)], when the caller has it
    (`_compress`): used instead of decoding the codes again (the same values).
    """
    s, n, w, _, bits = layout
    u, p, *codes = parts
    coded = []
    i = 0
    for b, streams in _groups(bits):
        if b is not None:
            g = streams.stop - streams.start
            coded.append((IntCodec(b, group), streams, g, codes[i], codes[i + 1],
                          None if decoded is None else decoded[i // 2]))
            i += 2

    def rows(r: slice) -> torch.Tensor:
        out = u[:, r].to(p.dtype) @ p.mT                                      # (S, m, w)
        m = out.shape[1]
        for codec, streams, g, c, sc, hat in coded:
            if hat is not None:
                out[streams] += hat[:, r]
                continue
            c = c.view(g, n, -1)[:, r].reshape(g * m, -1)
            sc = sc.view(g, n, -1)[:, r].reshape(g * m, -1)
            out[streams] += codec.decode((c, sc), (g * m, w), out.dtype).view(g, m, w)
        return out

    return rows
