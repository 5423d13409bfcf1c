"""The `lowrank` storage policy (the default sketched policy).

Designed around the calibration run of DESIGN.md §3.4a: a low-rank sketch
alone cannot reach a useful weight-gradient accuracy late in training (the
gradient is a sum that cancels 100-fold while the approximation error does
not), the derivative streams differ in scale by orders of magnitude, and
L-BFGS needs consistent test matrices within a step. So, per block and per
jet stream separately (value, u_x, u_t, u_xx, ...):

1. a three-sketch (Tropp et al. 2019, `pinnsketch.sketch.ThreeSketch`) of the
   **current** z_prev stream, its test matrices regenerated from the per-step
   seed (layer, step, stream): fixed within an optimizer step, new after
   `advance()`; reconstructed and truncated to rank r: U P^T with U (N, r)
   (kept in bfloat16 when a residual follows: the residual absorbs the
   rounding) and P (w, r);
2. the **residual** z_prev - U P^T, quantized with one scale per point
   (`codecs.IntCodec`): int4 by default, int8 for the value stream of a jet
   through a smooth activation (see below). This bounds the error where low
   rank alone cannot: |error| <= max|residual row| / 254 (int8) or / 14 (int4);
3. the reconstruction z_hat = U P^T + residual_hat feeds both the weight
   gradient and the nonlinearity's derivative path.

Every stream is handled on its own, so the sketch and the quantization scales
adapt to each stream's magnitude (the §3.4a normalization). The first block's
derivative streams are constant across points (rank one) and its second
derivatives are zero: the low-rank part captures them.

Why int8 for the value stream (measured, benchmarks/memory.py network: tanh
2-256x6-1 trained 3000 Adam steps, 8192 points, rank 8): the derivative path
multiplies errors of the value stream z_0 by f''(z_0) u_x and f'''(z_0) u_x^2,
where the derivative streams are 10-100x larger, and the early layers' weight
gradients are small by cancellation; with int4 everywhere the first layer's
weight-gradient error was 0.86 (stacked over layers 7.6e-2), with the value
stream at int8 1.5e-2 (stacked 5.5e-3) for 3% more memory.

Accuracy control (per block, targeting the **relative error of the block's
weight gradient**, default 1e-2):

* every forward measures the exact relative reconstruction error of z_prev
  (max over streams, and over the calls of one step) and Tropp's a-posteriori
  estimate of the low-rank part alone (`error_estimate` in the report);
* audits calibrate how the reconstruction error reaches the weight gradient:
  one block per step (round robin, every `audit_every` steps) also saves
  Y = (a - a_hat) Omega^T, (S, N, q) for a Gaussian Omega (q, w) with q =
  `audit_size` (8): its backward estimates ||sum_s g_s^T (a_s - a_hat_s)||_F,
  the weight-gradient error, as ||sum_s g_s^T Y_s||_F (a Johnson-Lindenstrauss
  sketch of that (out, w) matrix, unbiased in the square, about +-25% at q = 8)
  for q/w of the block's memory. kappa = gradient error / reconstruction error;
* after every step (`advance()`), predicted gradient error = kappa x
  reconstruction error goes to an `AdaptiveRank` controller: above target the
  rank grows; when the rank saturates at r_max the derivative streams move
  from int4 to int8 (rank back to its start), and when int8 saturates too the
  block falls back to exact storage (recorded in `events`); far below target
  the rank shrinks with hysteresis, and int8 steps back to int4 once the
  prediction at int4 (x 16) is below target/4. A block in exact fallback keeps
  compressing on its audit steps to see whether compression meets the target
  again, and returns to it when it does.

What the audits do not see: a block's reconstruction error also perturbs the
gradient it passes down (the derivative path), which reaches the weight
gradients of earlier blocks. The value stream's int8 residual is what keeps
that part small; `benchmarks/memory.py` measures the whole effect against exact.
"""

from __future__ import annotations

import copy
import math

import torch

from ..sketch import AdaptiveRank, FixedRank, ThreeSketch, make_operator
from ..sketch.operators import OPERATORS
from ..sketch.three_sketch import SIZINGS
from .activations import Identity, ReLU
from .codecs import IntCodec
from .storage import AbstractStorage, Stored, StorageError, check_finite_activation, stored_bytes

__all__ = ["LowRankStorage"]

_RESIDUALS = ("int4", "int8", None)


def _bits(residual: str | None) -> int | None:
    return None if residual is None else int(residual[3:])


class LowRankStorage(AbstractStorage):
    """Per-stream three-sketch of the current z_prev plus a quantized residual; adaptive to a gradient target.

    Exact: grad_b and the linear part g W of the input gradient; for ReLU and
    identity blocks the derivative path (ReLU keeps its exact 1-bit mask).
    Approximate: the weight gradient and (smooth activations) the derivative
    path, both from z_hat whose relative error is measured every step and,
    via audits, kept near `target` in the weight gradient; exact storage when
    no compressed form meets the target (or the block is too narrow to save).

    Stores per stream: U (N x r), P (w x r), the residual codes (N*w/2 bytes at
    int4, N*w at int8) and N scales; plus ReLU's mask; plus, for the audited
    block, Y (S, N, q).

    Args:
        target: relative weight-gradient error to hold (> 0).
        rank: fixed rank (no rank adaptation), or None (adaptive from `initial_rank`).
        residual: codes of the derivative streams' residual: "int4" | "int8" | None.
        value_residual: codes of the value stream's residual when the block carries derivative
            streams through a smooth activation: "int8" | "int4" | None (None with residual=None:
            the pure sketch, for tests and ablations). Otherwise the value stream uses `residual`.
        adaptive: adapt rank/bits/fallback to `target` (False: keep what is given).
        initial_rank, r_min, r_max: rank bounds (each clamped to min(N, w)).
        operator: test operators of the sketch ("gaussian" | "sparse" | "srft").
        sizing: sketch sizes, "default" (k = 2r+1, s = 2k+1) or "tropp" (k = 4r+1).
        audit_every: steps between audits (one block each, round robin); 0 disables.
        audit_size: q, columns of the audit's Gaussian sketch.
        error_size: rows of Tropp's error sketch (0: no estimate).
        group: quantization scale per `group` columns instead of per row (None).
    """

    name = "lowrank"

    def __init__(self, target: float = 1e-2, *, rank: int | None = None, residual: str | None = "int4",
                 value_residual: str | None = "int8", adaptive: bool = True, initial_rank: int = 8,
                 r_min: int = 4, r_max: int = 32, operator: str = "gaussian", sizing: str = "default",
                 audit_every: int = 1, audit_size: int = 8, error_size: int = 10, group: int | None = None):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
            raise StorageError(f"target={target!r} must be a positive float (relative weight-gradient error)")
        for name, value in (("rank", rank), ("initial_rank", initial_rank), ("r_min", r_min), ("r_max", r_max),
                            ("audit_size", audit_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise StorageError(f"{name}={value!r} must be an int >= 1" + (" or None" if name == "rank" else ""))
        if r_min > r_max:
            raise StorageError(f"r_min={r_min} exceeds r_max={r_max}; pass r_min <= r_max")
        for name, value in (("residual", residual), ("value_residual", value_residual)):
            if value not in _RESIDUALS:
                raise StorageError(f"{name}={value!r} is not one of 'int4', 'int8', None")
        if operator not in OPERATORS:
            raise StorageError(f"operator={operator!r} is not one of {sorted(OPERATORS)}")
        if sizing not in SIZINGS:
            raise StorageError(f"sizing={sizing!r} is not one of {sorted(SIZINGS)}")
        if isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 0:
            raise StorageError(f"audit_every={audit_every!r} must be an int >= 0 (0 disables audits)")
        IntCodec(4, group)      # validates `group`
        self.target, self.fixed_rank, self.adaptive = float(target), rank, bool(adaptive)
        self.initial_rank, self.r_min, self.r_max = initial_rank, r_min, r_max
        self.operator, self.sizing, self.error_size, self.group = operator, sizing, error_size, group
        self.audit_every, self.audit_size = audit_every, audit_size
        self.bits: int | None = _bits(residual)               # derivative streams; adapted
        self.value_bits: int | None = _bits(value_residual)
        self.exact = False                # in exact fallback
        self.kappa: float | None = None   # gradient error / reconstruction error, from audits
        self.recon_error: float | None = None
        self._step_recon: float | None = None
        self.sketch_error: float | None = None
        self.audits: list[dict] = []
        self.events: list[dict] = []
        self._controller = None
        self._limit: int | None = None

    # -- configuration state --------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None if self._controller is None else self._controller.rank

    def _controller_for(self, limit: int, rank: int | None = None):
        if self.fixed_rank is not None or not self.adaptive:
            r = self.fixed_rank if self.fixed_rank is not None else self.initial_rank
            if r > limit:
                raise StorageError(f"layer {self.layer}: rank={r} exceeds min(N, w)={limit} of the stored "
                                   f"activation; pass rank <= {limit} or storage='exact'")
            return FixedRank(r)
        r_max = min(self.r_max, limit)
        r_min = min(self.r_min, r_max)
        start = min(max(self.initial_rank if rank is None else rank, r_min), r_max)
        return AdaptiveRank(self.target, rank=start, r_min=r_min, r_max=r_max)

    def _is_audit(self) -> bool:
        if not self.audit_every or (self.fixed_rank is not None and not self.adaptive):
            return False
        if self.step < self.n_layers:          # bootstrap: every block once
            return self.step == self.layer
        return self.step % self.audit_every == 0 and (self.step // self.audit_every) % self.n_layers == self.layer

    def _codec(self, stream: int, streams: int = 1, smooth: bool = True) -> IntCodec | None:
        # The value stream's finer codes protect the derivative path of a jet through a smooth
        # activation (f'' and f''' of z_0 multiply the large derivative streams); without
        # derivative streams, or through ReLU (exact mask), it is coded like the others.
        bits = self.value_bits if stream == 0 and streams > 1 and smooth else self.bits
        return None if bits is None else IntCodec(bits, self.group)

    def _compressed_bytes(self, s: int, n: int, w: int, r: int, dtype: torch.dtype) -> int:
        total = 0
        for i in range(s):
            codec = self._codec(i, s)
            u_bytes = 2 if codec is not None and dtype == torch.float32 else torch.finfo(dtype).bits // 8
            total += n * r * u_bytes + w * r * torch.finfo(dtype).bits // 8
            total += 0 if codec is None else codec.nbytes((n, w), dtype)
        return total

    # -- forward -------------------------------------------------------------------------
    def pack(self, z_prev, a, block):
        s, n, w = z_prev.shape
        check_finite_activation(z_prev, self.layer, self.name)
        # A block so narrow that even rank 1 would not save half its memory (a PINN's
        # coordinate input, w = d) is stored exactly, whatever the rank settings.
        if 2 * self._compressed_bytes(s, n, w, 1, z_prev.dtype) > z_prev.numel() * z_prev.element_size():
            self._note({"rank": None, "mode": "exact (narrow)", "saved_bytes": stored_bytes([z_prev])})
            return (z_prev,), ("exact",)
        if self._controller is None:
            self._limit = min(n, w)
            self._controller = self._controller_for(self._limit)
        r = self._controller.rank
        if r > min(n, w):
            raise StorageError(f"layer {self.layer}: rank={r} exceeds min(N, w)={min(n, w)}; "
                               f"pass rank <= {min(n, w)} or storage='exact'")
        audit = self._is_audit()
        if self.exact and not audit:
            self._note({"rank": None, "mode": "exact (fallback)", "saved_bytes": stored_bytes([z_prev])})
            return (z_prev,), ("exact",)
        codecs = tuple(self._codec(i, s, not block.piecewise_linear) for i in range(s))
        parts, errors, sketch_errors = [], [], []
        for i in range(s):
            stream_parts, err, sk_err = self._compress(z_prev[i], r, codecs[i], i)
            parts.append(stream_parts)
            errors.append(err)
            sketch_errors.append(sk_err)
        # A step may call the network several times (residual points, boundary points):
        # the controller sees the worst reconstruction of the step.
        self._step_recon = max(self._step_recon or 0.0, max(errors))
        self.recon_error = self._step_recon
        self.sketch_error = max(sketch_errors) if self.error_size else None
        flat = [t for stream_parts in parts for t in stream_parts]
        info = {"rank": r, "mode": "exact (fallback)" if self.exact else self._mode(codecs),
                "error_estimate": self.sketch_error, "reconstruction_error": self._step_recon,
                "saved_bytes": stored_bytes(flat)}
        meta = ("lowrank", s, n, w, codecs, audit, self.exact, max(errors))
        if not audit:
            self._note(info)
            return tuple(flat), meta
        y = self._audit_sketch(z_prev, a, _rows_fn(parts, codecs, w), block)
        # fallback: train on the exact z_prev, estimate what compression would cost
        saved = (z_prev, y) if self.exact else (*flat, y)
        self._note({**info, "saved_bytes": stored_bytes(saved)})
        return saved, meta

    @staticmethod
    def _mode(codecs) -> str:
        names = sorted({c.name for c in codecs if c is not None})
        return "lowrank" + "".join(f"+{n}" for n in names)

    def _compress(self, zs: torch.Tensor, r: int, codec, stream: int):
        """Sketch + residual of one stream zs (N, w): (parts, relative error, sketch error estimate)."""
        n, w = zs.shape
        sketch = ThreeSketch((n, w), r, operator=self.operator, sizing=self.sizing, error_size=self.error_size,
                             seed=self.step_seed("stream", stream), dtype=zs.dtype, device=zs.device)
        sketch.update(zs)
        factors = sketch.reconstruct(rank=r)
        sk_err = sketch.relative_error_estimate(factors) if self.error_size else math.nan
        u, p = (factors.Q @ factors.C).contiguous(), factors.P.contiguous()
        if codec is not None and u.dtype == torch.float32:
            u = u.to(torch.bfloat16)          # the residual absorbs the rounding
        approx = u.to(zs.dtype) @ p.mT
        parts = [u, p]
        if codec is not None:
            codes = codec.encode(zs - approx)
            approx = approx + codec.decode(codes, (n, w), zs.dtype)
            parts += codes
        norm = torch.linalg.norm(zs)
        err = float(torch.linalg.norm(zs - approx) / norm) if norm > 0 else 0.0
        return parts, err, sk_err

    def _audit_sketch(self, z, a, rows, block) -> torch.Tensor:
        """Y = (a - a_hat) Omega^T, (S, N, q), computed chunk by chunk over the points."""
        s, n, w = z.shape
        omega = make_operator("gaussian", self.audit_size, w, seed=self.step_seed("audit"), dtype=z.dtype,
                              device=z.device)
        y = z.new_empty(s, n, self.audit_size)
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
            y[:, r] = omega.apply_right((a[:, r] - a_hat).reshape(-1, w)).view(s, -1, self.audit_size)
        return y

    # -- backward ------------------------------------------------------------------------
    def unpack(self, saved, meta, block):
        if meta[0] == "exact":
            return Stored.of(saved[0])
        _, s, n, w, codecs, audit, fallback, recon = meta
        payload = {"audit_y": saved[-1], "audit_acc": None, "recon": recon} if audit else {}
        if fallback:
            z = saved[0]
            return Stored(lambda r: z[:, r], payload)
        parts, start = [], 0
        for codec in codecs:
            per = 2 + (0 if codec is None else 2)
            parts.append(saved[start:start + per])
            start += per
        return Stored(_rows_fn(parts, codecs, w), payload)

    def weight_grad_chunk(self, grad_z, a, stored, rows, block):
        if "audit_y" in stored.payload:
            # sum_s g_s^T Y_s over these points: the audit's sketch of the gradient error
            y = stored.payload["audit_y"][:, rows]
            part = grad_z.flatten(0, 1).mT @ y.flatten(0, 1)
            acc = stored.payload["audit_acc"]
            stored.payload["audit_acc"] = part if acc is None else acc.add_(part)
        return super().weight_grad_chunk(grad_z, a, stored, rows, block)

    def finish_backward(self, stored, grad_w, block):
        acc = stored.payload.get("audit_acc")
        if acc is not None:
            norm = float(torch.linalg.norm(grad_w))
            err = float(torch.linalg.norm(acc)) / norm if norm > 0 else 0.0
            self._record_audit(err, stored.payload["recon"])

    # -- control -------------------------------------------------------------------
    def _record_audit(self, grad_error: float, recon_error: float) -> None:
        kappa = grad_error / recon_error if recon_error > 0 else None
        if kappa is not None:
            # The most pessimistic kappa of this audit step and the block's previous one:
            # the cancellation behind kappa grows as training converges (an old, smaller
            # kappa under-predicts), and one step may audit several calls of the network.
            earlier = [a["step"] for a in self.audits if a["kappa"] is not None and a["step"] < self.step]
            recent = [a["kappa"] for a in self.audits if a["kappa"] is not None
                      and (a["step"] == self.step or (earlier and a["step"] == earlier[-1]))]
            self.kappa = max([kappa, *recent])
        self.audits.append({"step": self.step, "grad_error": grad_error, "reconstruction_error": recon_error,
                            "kappa": kappa, "rank": self.rank, "bits": self.bits, "was_exact": self.exact})

    def predicted_error(self) -> float | None:
        """kappa x reconstruction error: the expected relative weight-gradient error (None before calibration)."""
        if self.kappa is None or self.recon_error is None:
            return None
        return self.kappa * self.recon_error

    def advance(self) -> None:
        if self.adaptive and self.fixed_rank is None and self._controller is not None:
            self._control()
        self._step_recon = None
        super().advance()

    def _event(self, kind: str, **info) -> None:
        self.events.append({"step": self.step, "event": kind, "rank": self.rank, "bits": self.bits, **info})

    def _control(self) -> None:
        predicted = self.predicted_error()
        if predicted is None:
            return
        if self.exact:
            # Only an audit (which compressed anyway) can tell that compression works again.
            if self.audits and self.audits[-1]["step"] == self.step and predicted < 0.5 * self.target:
                self.exact = False
                self._event("resume_compression", predicted=predicted)
            return
        ctrl = self._controller
        ctrl.propose(predicted, self.step)
        if ctrl.saturated and predicted > self.target:
            if self.bits == 4:
                self.bits = 8
                self.recon_error = self.recon_error / 16.0        # int8's step is 1/16 of int4's
                self._controller = self._controller_for(self._limit, rank=self.initial_rank)
                self._event("bits_up", predicted=predicted)
            else:
                self.exact = True
                self._event("fallback_exact", predicted=predicted)
        elif self.bits == 8 and ctrl.rank == ctrl.r_min and 16.0 * predicted < 0.25 * self.target:
            self.bits = 4
            self.recon_error = self.recon_error * 16.0
            self._event("bits_down", predicted=predicted)

    @property
    def history(self) -> list[dict]:
        ranks = [] if self._controller is None else [{**h, "event": h["reason"]} for h in self._controller.history]
        return sorted(self.events + ranks, key=lambda e: e["step"])

    def report(self):
        return {**super().report(), "target": self.target, "bits": self.bits, "value_bits": self.value_bits,
                "kappa": self.kappa, "predicted_grad_error": self.predicted_error(), "exact_fallback": self.exact,
                "audits": len(self.audits), "events": len(self.events)}

    _STATE = ("bits", "value_bits", "exact", "kappa", "recon_error", "_step_recon", "sketch_error", "audits",
              "events", "_controller", "_limit")

    def get_extra_state(self):
        state = super().get_extra_state()
        state["lowrank"] = {k: getattr(self, k) for k in self._STATE if k != "_controller"}
        # the controller is saved as plain values so any HDF5/JSON writer can store it
        ctrl = self._controller
        state["lowrank"]["_controller"] = None if ctrl is None else ctrl.state_dict()
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        saved = copy.deepcopy(state["lowrank"])                   # never share state between models
        ctrl = saved.pop("_controller")
        for k, v in saved.items():
            setattr(self, k, v)
        self._controller = None
        if ctrl is not None:
            self._controller = self._controller_for(self._limit, rank=ctrl["rank"])
            self._controller.load_state_dict(ctrl)


def _rows_fn(parts, codecs, w: int):
    """rows -> z_hat[:, rows] (S, n, w) from per-stream parts [U, P, (codes, scales)]."""

    def rows(r: slice) -> torch.Tensor:
        out = []
        for codec, (u, p, *codes) in zip(codecs, parts):
            zs = u[r].to(p.dtype) @ p.mT
            if codec is not None:
                zs = zs + codec.decode(tuple(q[r] for q in codes), (zs.shape[0], w), zs.dtype)
            out.append(zs)
        return torch.stack(out)

    return rows
