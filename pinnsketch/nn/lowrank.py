"""The `lowrank` storage policy (the default sketched policy).

What a block keeps of its input z_prev (S, N, w), per jet stream s (value,
u_x, u_t, u_xx, ...), each stream on its own:

1. U_s = z_s P_s (N x r, bfloat16 when a residual follows) on a basis P_s
   (w x r) of the stream's top right singular vectors;
2. the residual z_s - U_s P_s^T quantized with one scale per point
   (`codecs.IntCodec`): int4 by default, int8 for the value stream of a jet
   through a smooth activation, whose errors the derivative path multiplies by
   f''(z_0) u_x and f'''(z_0) u_x^2. |error| <= max|residual row| / 14 (int4)
   or / 254 (int8): the residual bounds the error where low rank alone cannot
   (a few shock points carry much of a PINN's gradient);
3. for ReLU, the exact 1-bit mask of z_0 > 0, so its derivative path is exact.
Backward reconstructs z_hat = U P^T + residual chunk by chunk of rows; z_hat
feeds the weight gradient and the derivative path.

**Rows as they come.** A block encodes its input rows as the chained forward
produces them (`pinnsketch.nn.chain`), so the basis must exist before the
first row arrives. Once per step and call shape, the chain runs a strided
sample of rows through the network first (`prepare`: 8 rows per unit of
width, 256 to 2,048; 1/16 of the forward at 32,768 points and width 256);
the sample's Gram matrix z_s^T z_s refines the
previous step's basis by one subspace iteration with Rayleigh-Ritz (Halko,
Martinsson & Tropp 2011, Alg. 4.3, warm-started; a full eigendecomposition
the first time). The basis is fixed within a step, so L-BFGS re-evaluations see
the same compression; the quantized residual absorbs what a basis from a
sample misses (a few shock rows), and the measured error (below) says how
much that is. No N-sized random test matrix is drawn.

**Never worse than exact.** A call whose compressed form would not be smaller
than z_prev (a narrow coordinate input, a handful of rows, full rank with int8
codes) is stored exactly, and so is a block in exact fallback.

**Accuracy control.** Each block targets the relative error of *its weight
gradient* (`target`, default 1e-2), and, for jets through a smooth
activation, the error its reconstruction sends down the derivative path.

* The first call of each shape in a step, and every audited call, measures
  the relative reconstruction error of z_prev (max over streams and calls).
* Audits (one block per step, round robin, every `audit_every` steps) also
  keep Y_a = (a - a_hat) Omega_a^T, (S, N, q) in bfloat16, q = `audit_size`:
  backward forms sum_s g_s^T Y_a,s, a Johnson-Lindenstrauss sketch of the
  weight-gradient error whose squared norm estimates the squared error norm
  without bias (relative standard deviation at most sqrt(2/q)). kappa =
  gradient error / reconstruction error. A row sample could not do this: the
  error is a sum over all points that cancels, and a few points carry much of
  it; the sketch keeps every row and compresses only the width.
* The same audit measures the per-point spread A = sqrt(sum_i ||x_i||^2) /
  ||sum_i x_i|| of the gradient (x_i = sum_s g_s,i a_s,i^T): the factor by
  which an error that does not cancel across points is amplified relative to
  the gradient, which does. A block's reconstruction error also perturbs the
  gradients of all earlier blocks through the derivative path, amplified by
  A; so jets through a smooth activation hold the reconstruction error below
  target / (`path_gain` x A). path_gain = 16 was chosen on Burgers' default
  run (relative L2 within 1.07x of exact; 8 gave 1.56x).
* After every step (`advance()`) the worst of predicted gradient error /
  target (predicted = kappa x reconstruction error) and reconstruction error /
  path target decides: above 1, of "double the rank" and "int4 -> int8" the
  change with the best predicted reduction per stored byte (the rank's effect
  predicted from the basis' Ritz values); with neither available for
  `patience` steps, exact fallback (recorded in `events`); below 1/4 for
  `patience` steps, the change that saves the most bytes while staying below
  1/2. A block in fallback keeps measuring on its audit steps and returns to
  compression when that predicts below 1/2.
* Mini-batch training (`noise_fraction`): a shuffled batch's gradient has
  relative sampling noise sigma (measured by the same audit); an error eps
  that behaves like noise costs eps^2 / sigma^2 of the batch, so the target
  becomes max(target, noise_fraction x sigma). Full-batch PINN training
  leaves it off (None).

**Synchronization.** Measurements stay on the device during the step; the
controller reads them once, in `advance()`. Nothing in the forward or
backward pass waits for the device (non-finite activations are reported by
`prepare`, the first time a call shape is seen, and otherwise at `advance()`).
"""

from __future__ import annotations

import ast
import copy
import math

import torch


from ..sketch import make_operator
from .activations import Identity, ReLU
from .codecs import IntCodec, pack_mask, unpack_mask
from .storage import (AbstractStorage, Packing, Stored, StorageError, _ExactPacking, check_finite_activation,
                      stored_bytes)

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
    rows_capable = True
    _KEEP_AUDITS = 64

    def __init__(self, target: float = 1e-2, *, rank: int | None = None, residual: str | None = "int4",
                 value_residual: str | None = "int8", adaptive: bool = True, initial_rank: int = 8,
                 r_min: int = 4, r_max: int = 32, audit_every: int = 1, audit_size: int = 8, path_gain: float | None = 16.0,
                 noise_fraction: float | None = None, patience: int = 3, group: int | None = None):
        super().__init__()
        self._record_options(locals())
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
        if isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 0:
            raise StorageError(f"audit_every={audit_every!r} must be an int >= 0 (0 disables audits)")
        IntCodec(4, group)      # validates `group`
        self.target, self.fixed_rank, self.adaptive = float(target), rank, bool(adaptive)
        self.initial_rank, self.r_min, self.r_max = initial_rank, r_min, r_max
        self.group = group
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
        self._bases: dict[tuple[int, int], _Basis] = {}     # (streams, width) -> tracked subspace
        self._fresh: set = set()                            # call shapes whose basis is this step's
        self._pending_tails: list = []                      # residual factors of this step's bases
        self._pending_calls: list[_Measure] = []            # device-side measurements of this step
        self._pending_audits: list[tuple] = []

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
    def _exact_bytes(self, s: int, n: int, w: int, dtype: torch.dtype) -> int:
        return s * n * w * (torch.finfo(dtype).bits // 8)

    def _stores_exactly(self, s: int, n: int, w: int, dtype: torch.dtype, smooth: bool) -> str | None:
        """Why a call of shape (s, n, w) is stored exactly, or None when it is compressed.

        A block so narrow that even rank 1 would not save half its memory (a PINN's coordinate
        input, w = d, or a call with a handful of rows) is stored exactly; so is a call whose
        compressed form at the current rank and bits would not be smaller than z_prev itself
        (never worse than exact).
        """
        exact = self._exact_bytes(s, n, w, dtype)
        if 2 * self._compressed_bytes(s, n, w, 1, dtype, smooth) > exact:
            return "exact (narrow)"
        if self._rank is not None and not self.exact:
            if self._compressed_bytes(s, n, w, min(self._rank, n, w), dtype, smooth) >= exact:
                return "exact (no saving)"
        return None

    def wants_sample(self, block, streams, width):
        if (streams, width) in self._fresh:
            return False
        return self._stores_exactly(streams, 1 << 20, width, torch.float32, not block.piecewise_linear) is None

    def prepare(self, z_sample, block):
        """This step's basis for calls of shape (S, w), from a sample of the step's input rows.

        Called once per call shape and step, before the first call encodes a row: the Gram
        matrix of the sample refines the previous step's basis by one subspace iteration with
        Rayleigh-Ritz (a full eigendecomposition the first time, or when the subspace is a large
        part of the width or changes size).
        """
        s, _, w = z_sample.shape
        if self._rank is None:
            check_finite_activation(z_sample, self.layer, self.name)       # once, before any basis exists
            self._start(w)
        gram = z_sample.mT @ z_sample                                           # (S, w, w)
        basis = self._bases.get((s, w))
        if basis is None:
            self._bases[(s, w)] = basis = _Basis.from_gram(gram, self._basis_size(w))
        else:
            basis.gram = gram
            basis.update(self._basis_size(w))
        self._fresh.add((s, w))
        self._pending_tails.append(basis.tail_factors(min(self._rank, basis.q.shape[-1])))

    def _basis_size(self, w: int) -> int:
        """Columns of the tracked subspace: 2r, so that the energy at rank 2r is known."""
        return min(w, 2 * self._rank)

    def pack(self, z_prev, a, block):
        s, n, w = z_prev.shape
        if self.wants_sample(block, s, w):
            self.prepare(z_prev[:, ::max(1, n // min(2048, max(256, 8 * w)))], block)
        packing = self.begin(tuple(z_prev.shape), z_prev.dtype, z_prev.device, block)
        packing.add(slice(0, n), z_prev, a)
        return packing.finish()

    def begin(self, shape, dtype, device, block):
        s, n, w = shape
        smooth = not block.piecewise_linear
        why = self._stores_exactly(s, n, w, dtype, smooth)
        if why is not None:
            return _ExactRows(self, shape, dtype, device, why)
        if self._rank is None:
            self._start(w)
        self._path = self._path or (s > 1 and smooth)
        audit = self._is_audit()
        if self.exact and not audit:
            return _ExactRows(self, shape, dtype, device, "exact (fallback)")
        basis = self._bases.get((s, w))
        if basis is None:
            raise StorageError(f"layer {self.layer}: lowrank has no basis for calls of {s} streams and width {w}; "
                               "call prepare(z_sample) first (pinnsketch.nn.chain does this)")
        # Errors are measured once per step and call size (L-BFGS re-evaluates a step many times
        # at nearby weights), and on every audited call (its kappa needs that call's error).
        measure = audit or (s, n) not in self._step_measured
        if measure:
            self._step_measured.add((s, n))
        r = min(self._rank, n, w, basis.q.shape[-1])       # a call with fewer rows than the rank
        bits = tuple(self._stream_bits(i, s, smooth) for i in range(s))
        return _LowRankPacking(self, block, shape, dtype, device, basis, r, bits, measure, audit)

    @staticmethod
    def _mode(bits) -> str:
        names = sorted({f"int{b}" for b in bits if b is not None})
        return "lowrank" + "".join(f"+{n}" for n in names)

    # -- backward ------------------------------------------------------------------------
    def unpack(self, saved, meta, block):
        kind = meta[0]
        if kind == "exact":
            return Stored.of(saved[0])
        _, layout, audit, fallback, n_pieces, measured = meta
        payload = {}
        if audit:
            payload = {"audit_y": saved[-1], "audit_acc": None, "spread": None, "measured": measured,
                       "points": layout[1], "streams": layout[0]}
            saved = saved[:-1]
        if fallback:
            return Stored.of(saved[0], **payload)
        mask = None
        if n_pieces:
            mask_bits, saved = saved[-1], saved[:-1]
            mask = _mask_rows_fn(mask_bits, layout[2])
        return Stored(_rows_fn(saved, layout, self.group), payload, mask)

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
            spread = stored.payload["spread"]
            stored.payload["spread"] = sq if spread is None else spread + sq
        return super().weight_grad_chunk(grad_z, a, stored, rows, block)

    def finish_backward(self, stored, grad_w, block):
        acc = stored.payload.get("audit_acc")
        if acc is not None:
            # read on the host at advance(): no device sync inside the backward pass
            p = stored.payload
            spread = p["spread"] if p["spread"] is not None else torch.zeros((), device=acc.device)
            self._pending_audits.append((torch.linalg.norm(acc), torch.linalg.norm(grad_w), spread,
                                         p["measured"], p["points"], p["streams"]))

    def _resolve_pending(self) -> None:
        """Read the step's measurements and its bases' residual factors on the host in one transfer,
        and feed them to the controller."""
        calls, audits = self._pending_calls, self._pending_audits
        tails = [t for t in self._pending_tails if t[1] is not None]
        self._pending_tails = []
        if not calls and not audits and not tails:
            return
        values = torch.cat([torch.cat([c.norm_sq, c.low_sq, c.err_sq]) for c in calls]
                           + [torch.stack(a[:3]).to(torch.float64) for a in audits]
                           + [t.to(torch.float64) for _, t in tails]).tolist()
        pos = len(values) - sum(len(names) for names, _ in tails)
        for names, _ in tails:
            for name in names:
                self._step_tail[name] = max(self._step_tail.get(name, 0.0), values[pos])
                pos += 1
        pos = 0
        for c in calls:
            s = c.shape[0]
            norm_sq, low_sq, err_sq = (values[pos + i * s:pos + (i + 1) * s] for i in range(3))
            pos += 3 * s
            if not all(map(math.isfinite, norm_sq)):
                raise StorageError(
                    f"layer {self.layer}: non-finite activations (NaN or inf) reached the 'lowrank' storage, "
                    "which would corrupt every reconstructed entry; the training diverged or the inputs hold "
                    "NaN/inf. Lower the learning rate, check the inputs, or use storage='exact' to debug")
            c.recon = max((math.sqrt(e / v) if v > 0 else 0.0) for e, v in zip(err_sq, norm_sq))
            # A step may call the network several times (residual points, boundary points):
            # the controller sees the worst reconstruction of the step.
            self._step_recon = max(self._step_recon or 0.0, c.recon)
            self.recon_error = self._step_recon
            self.sketch_error = max((math.sqrt(e / v) if v > 0 else 0.0) for e, v in zip(low_sq, norm_sq))
        for _, _, _, measure, n, streams in audits:
            acc_norm, grad_norm, spread = values[pos:pos + 3]
            pos += 3
            err = acc_norm / grad_norm if grad_norm > 0 else 0.0
            amp = math.sqrt(spread) / grad_norm if grad_norm > 0 else None
            noise = (math.sqrt(max(spread - grad_norm ** 2 / n, 0.0) * n / (n - 1)) / grad_norm
                     if grad_norm > 0 and n > 1 else None)
            self._record_audit(err, measure.recon, amp, noise, streams)
        self._pending_calls, self._pending_audits = [], []

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
        # the one host read of the policy per step: the controller reads the step's measurements
        # here, never inside the forward or backward pass (on CUDA the eigensolver of the basis
        # update also waits for its small result)
        self._resolve_pending()
        self._fresh = set()
        self._agree_across_ranks()
        if self._controlled and self._rank is not None:
            self._control()
        self._step_recon = None
        self._step_tail = {}
        self._step_measured = set()
        super().advance()

    # --- multi-process training (pinnsketch.distributed) -----------------------------------
    def _agree_across_ranks(self) -> None:
        """Under torch.distributed each rank compresses and measures its own shard of the points;
        the controller reads the worst figure of all ranks (a shard is one more call of the step,
        and the controller already takes the worst call), so every rank keeps the same rank and bits.
        A no-op in one process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        from ..distributed import agree

        tail = self._step_tail
        (self.recon_error, self.kappa, self.amplification, self.noise, up, down) = agree(
            [self.recon_error, self.kappa, self.amplification, self.noise, tail.get("up"), tail.get("down")],
            lowest=[False, False, False, True])
        self._step_tail = {k: v for k, v in (("up", up), ("down", down)) if v is not None}
    # --- end multi-process training -------------------------------------------------------

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
        self._resolve_pending()
        compressed = self.last.get("mode", "").startswith("lowrank") or self.last.get("mode") == "exact (fallback)"
        errors = {"error_estimate": self.sketch_error, "reconstruction_error": self.recon_error} if compressed else {}
        return {**super().report(), **errors, "target": self.target, "effective_target": self.effective_target(),
                "bits": self.bits, "value_bits": self.value_bits, "kappa": self.kappa,
                "amplification": self.amplification, "noise": self.noise,
                "predicted_grad_error": self.predicted_error(), "path_target": self.path_target(),
                "exact_fallback": self.exact, "audits": self.audit_count, "events": len(self.events)}

    _STATE = ("bits", "value_bits", "exact", "kappa", "amplification", "noise", "recon_error", "sketch_error",
              "_step_recon", "_step_tail", "_path", "_calm", "_stuck", "_rank", "_width", "audits", "audit_count",
              "events")

    def get_extra_state(self):
        self._resolve_pending()      # measurements of the current step: the same values, read now
        state = super().get_extra_state()
        # plain values and tensors, so any HDF5/JSON writer can store them
        state["lowrank"] = copy.deepcopy({k: getattr(self, k) for k in self._STATE})
        state["lowrank"]["_step_measured"] = sorted(list(m) for m in self._step_measured)
        state["lowrank"]["bases"] = {repr(key): b.state() for key, b in self._bases.items()}
        state["lowrank"]["fresh"] = sorted(list(k) for k in self._fresh)
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        saved = copy.deepcopy(state["lowrank"])                   # never share state between models
        for k, v in saved.items():
            if k in self._STATE:
                setattr(self, k, v)
        self._step_measured = {tuple(m) for m in saved.get("_step_measured", [])}
        self._bases = {ast.literal_eval(key): _Basis.from_state(b) for key, b in saved.get("bases", {}).items()}
        self._fresh = {tuple(k) for k in saved.get("fresh", [])}
        self._pending_tails = []
        self._pending_calls, self._pending_audits = [], []


class _Measure:
    """Device-side sums of squares of one measured call, per stream (S,): read at `advance()`."""

    __slots__ = ("shape", "norm_sq", "low_sq", "err_sq", "recon")

    def __init__(self, shape, device):
        self.shape = shape
        self.norm_sq, self.low_sq, self.err_sq = (torch.zeros(shape[0], dtype=torch.float64, device=device)
                                                  for _ in range(3))
        self.recon: float | None = None


class _Basis:
    """The tracked top right-singular subspace of one call shape (S streams, width w).

    q (S, w, k): orthonormal columns ordered by decreasing energy; it encodes the step's
    calls. gram (S, w, w): the Gram matrix z^T z of the step's row sample; `update` turns
    it into the new q by one subspace iteration with Rayleigh-Ritz (Halko, Martinsson &
    Tropp 2011, Alg. 4.3 with q = 1, warm-started from the previous basis), or by a full
    eigendecomposition when the subspace is a large part of the width or changes size.
    """

    def __init__(self, q: torch.Tensor, evals: torch.Tensor, energy: torch.Tensor):
        self.q, self.evals, self.energy = q, evals, energy
        self.gram: torch.Tensor | None = None

    @staticmethod
    def from_gram(gram: torch.Tensor, k: int) -> "_Basis":
        g = gram.to(torch.float64)
        evals, evecs = torch.linalg.eigh(g)                                  # ascending
        return _Basis(evecs.flip(-1)[..., :k].to(gram.dtype).contiguous(), evals.flip(-1)[..., :k].clamp_min(0),
                      g.diagonal(dim1=-2, dim2=-1).sum(-1))

    def update(self, k: int) -> None:
        g, self.gram = self.gram.to(torch.float64), None
        w = g.shape[-1]
        if 4 * k >= w or k != self.q.shape[-1]:
            fresh = _Basis.from_gram(g, k)
            self.q, self.evals, self.energy = fresh.q.to(self.q.dtype), fresh.evals, fresh.energy
            return
        y = g @ self.q.to(torch.float64)                                     # (S, w, k)
        q, _ = torch.linalg.qr(y)
        evals, v = torch.linalg.eigh(q.mT @ g @ q)                           # (S, k, k), ascending
        self.q = (q @ v.flip(-1)).to(self.q.dtype).contiguous()
        self.evals = evals.flip(-1).clamp_min(0)
        self.energy = g.diagonal(dim1=-2, dim2=-1).sum(-1)

    def tail_factors(self, r: int) -> tuple[list[str], torch.Tensor | None]:
        """How the residual norm would change at rank 2r ("up") and r/2 ("down"), worst stream:
        (names, device tensor of one factor per name), or ([], None) when the subspace cannot tell."""
        k = self.evals.shape[-1]
        names = [name for name, ok in (("up", 2 * r <= k), ("down", r // 2 >= 1)) if ok]
        if r > k or not names:
            return [], None
        cols = [r - 1] + [2 * r - 1 if name == "up" else r // 2 - 1 for name in names]
        captured = self.evals.cumsum(-1)[..., cols]                         # (S, 1 + len(names))
        tails = (self.energy[:, None] - captured).clamp_min(0).sqrt()
        floor = 1e-30 * self.energy.max().clamp_min(1e-30).sqrt()
        base = torch.maximum(tails[:, 0], floor)
        return names, (tails[:, 1:] / base[:, None]).amax(dim=0)

    def state(self) -> dict:
        return {"q": self.q.clone(), "evals": self.evals.clone(), "energy": self.energy.clone(),
                "gram": None if self.gram is None else self.gram.clone()}

    @staticmethod
    def from_state(state: dict) -> "_Basis":
        b = _Basis(state["q"].clone(), state["evals"].clone(), state["energy"].clone())
        b.gram = None if state["gram"] is None else state["gram"].clone()
        return b


class _ExactRows(_ExactPacking):
    """lowrank storing a call exactly (narrow, no saving, fallback): z_prev's chunks themselves."""

    def __init__(self, policy: "LowRankStorage", shape, dtype, device, mode: str):
        super().__init__(policy, shape, dtype, device, info={"rank": None, "mode": mode}, tag="exact")


class _LowRankPacking(Packing):
    """One call of `lowrank`, encoded chunk by chunk: U (S, N, r), codes and scales per stream group,
    ReLU's mask bits, the audit sketch; transients are one chunk (see the module docstring)."""

    def __init__(self, policy: "LowRankStorage", block, shape, dtype, device, basis: _Basis, r: int,
                 bits: tuple, measure: bool, audit: bool):
        s, n, w = shape
        self.policy, self.block, self.shape, self.bits, self.basis = policy, block, shape, bits, basis
        self.r, self.audit, self.fallback = r, audit, policy.exact
        self.p = basis.q[..., :r].contiguous()                              # (S, w, r): this step's basis
        coded = any(b is not None for b in bits)
        self.u_dtype = torch.bfloat16 if coded and dtype == torch.float32 else dtype   # the residual absorbs it
        self.groups = [(IntCodec(b, policy.group), streams) for b, streams in _groups(bits) if b is not None]
        self.kept = _ExactPacking(policy, shape, dtype, device) if self.fallback else None     # exact fallback: z_prev itself
        self.u = self.codes = self.mask = None
        if not self.fallback:
            self.u = torch.empty(s, n, r, dtype=self.u_dtype, device=device)
            self.codes = []
            for codec, streams in self.groups:
                g = streams.stop - streams.start
                cols, scales = _code_shape(codec, w)
                self.codes += [torch.empty(g, n, cols, dtype=torch.uint8 if codec.bits == 4 else torch.int8,
                                           device=device),
                               torch.empty(g, n, scales, dtype=dtype, device=device)]
            if isinstance(block.activation, ReLU):
                self.mask = torch.empty(n, -(-w // 8), dtype=torch.uint8, device=device)
        self.measure = _Measure(shape, device) if measure else None
        self.y = self.omega = None
        if audit:
            self.omega = make_operator("gaussian", policy.audit_size, w, seed=policy.step_seed("audit"), dtype=dtype,
                                       device=device)
            self.y = torch.empty(s, n, policy.audit_size, dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
                                 device=device)

    def add(self, rows, z, a):
        s, m, w = z.shape
        u = z @ self.p                                                       # (S, m, r)
        if self.u_dtype != z.dtype:
            u = u.to(self.u_dtype)
        residual = u.to(z.dtype) @ self.p.mT                                 # U P^T, then z - U P^T in place
        torch.sub(z, residual, out=residual)
        measure = self.measure
        if measure is not None:
            measure.norm_sq += _sum_squares(z)          # non-finite values are reported at advance()
            measure.low_sq += _sum_squares(residual)
        decode = measure is not None or self.audit
        for i, (codec, streams) in enumerate(self.groups):
            sub = residual[streams]                                          # (G, m, w)
            if decode:
                (codes, scales), sub_hat = codec.encode_decode(sub.reshape(-1, w))
                torch.sub(sub, sub_hat.view(sub.shape), out=sub)             # the coding error of these streams
            else:
                codes, scales = codec.encode(sub.reshape(-1, w))
            if self.codes is not None:
                g = streams.stop - streams.start
                self.codes[2 * i][:, rows] = codes.view(g, m, -1)
                self.codes[2 * i + 1][:, rows] = scales.view(g, m, -1)
        # `residual` now holds z - z_hat on every stream (uncoded streams: the low-rank residual itself)
        if measure is not None:
            measure.err_sq += _sum_squares(residual)
        if self.audit:
            z_hat = torch.sub(z, residual, out=residual)
            act = self.block.activation
            if isinstance(act, ReLU):
                a_hat = z_hat * (z[0] > 0)
            elif isinstance(act, Identity):
                a_hat = z_hat
            else:
                a_hat = self.block.jet(z_hat)
            self.y[:, rows] = self.omega.apply_right((a - a_hat).reshape(-1, w)).view(s, m, -1)
        if self.fallback:
            self.kept.add(rows, z, a)
            return
        self.u[:, rows] = u
        if self.mask is not None:
            self.mask[rows] = _pack_mask_rows(z[0] > 0)

    def finish(self):
        policy, (s, n, w) = self.policy, self.shape
        if self.measure is not None:
            policy._pending_calls.append(self.measure)
        if self.fallback:
            saved = [self.kept.z]
        else:
            saved = [self.u, self.p, *self.codes] + ([] if self.mask is None else [self.mask])
        if self.audit:
            saved.append(self.y)
        layout = (s, n, w, self.r, self.bits)
        mode = "exact (fallback)" if self.fallback else policy._mode(self.bits)
        policy._note({"rank": self.r, "mode": mode, "saved_bytes": stored_bytes(saved)})
        meta = ("lowrank", layout, self.audit, self.fallback, self.mask is not None, self.measure)
        return tuple(saved), meta


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-stream sum of squares of x (S, m, w), in float64 (S,): one pass (a norm, squared after)."""
    return torch.linalg.vector_norm(x, dim=(1, 2)).to(torch.float64).square()


def _code_shape(codec: IntCodec, w: int) -> tuple[int, int]:
    """(code columns, scale columns) of one encoded row of width w."""
    g, ng = codec._groups(w)
    return (ng * g if codec.bits == 8 else (ng * g + 1) // 2), ng


def _pack_mask_rows(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (m, w) -> uint8 (m, ceil(w/8)), row-aligned bits (rows pack and unpack on their own)."""
    m, w = mask.shape
    pad = (-w) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(m, pad)], dim=1)
    return pack_mask(mask).view(m, -1)


def _mask_rows_fn(bits: torch.Tensor, w: int):
    def rows(r: slice) -> torch.Tensor:
        part = bits[r]
        return unpack_mask(part.reshape(-1), (part.shape[0], part.shape[1] * 8))[:, :w]

    return rows


def _groups(bits: tuple) -> list[tuple[int | None, slice]]:
    """Consecutive streams with equal bits: [(bits, slice of streams)]."""
    out, start = [], 0
    for i in range(1, len(bits) + 1):
        if i == len(bits) or bits[i] != bits[start]:
            out.append((bits[start], slice(start, i)))
            start = i
    return out


def _rows_fn(parts, layout, group: int | None):
    """rows -> z_hat[:, rows] (S, m, w) from parts [U, P, (codes (G, N, c), scales (G, N, ng)) per coded group]."""
    s, n, w, _, bits = layout
    u, p, *codes = parts
    coded = [(IntCodec(b, group), streams) for b, streams in _groups(bits) if b is not None]

    def rows(r: slice) -> torch.Tensor:
        out = u[:, r].to(p.dtype) @ p.mT                                      # (S, m, w)
        m = out.shape[1]
        for i, (codec, streams) in enumerate(coded):
            g = streams.stop - streams.start
            c = codes[2 * i][:, r].reshape(g * m, -1)
            sc = codes[2 * i + 1][:, r].reshape(g * m, -1)
            out[streams] += codec.decode((c, sc), (g * m, w), out.dtype).view(g, m, w)
        return out

    return rows
