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
each call of a step (told apart by its shape and its order among calls of that
shape, so a PINN's boundary and initial points get their own) has its own basis;
the sample's Gram matrix z_s^T z_s refines the
previous step's basis by one subspace iteration with Rayleigh-Ritz (Halko,
Martinsson & Tropp 2011, Alg. 4.3, warm-started; a full eigendecomposition
the first time). `prepare` only forms the Gram matrix and returns a request;
the chain runs the requests of all its blocks as one batched eigensolver call
(`pinnsketch.sketch.track_many`), so a network pays the solver's launches and
host wait once per step, not once per block. The basis is fixed within a step,
so L-BFGS re-evaluations see the same compression; the quantized residual absorbs what a basis from a
sample misses (a few shock rows), and the measured error (below) says how
much that is. No N-sized random test matrix is drawn.

**On a GPU** the codec of a call without an audit (residual, codes, scales, error norms) and the
decoding in backward are compiled kernels (`pinnsketch.nn.kernels`) with the same arithmetic and codes.

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
* After every step (`advance()`) the controller (`pinnsketch.nn.lowrank_control`,
  a small object that sees numbers only) judges each call class (the number of
  jet streams) on its own: predicted gradient error / target, and for jets
  through a smooth activation, reconstruction error / path target. The worst
  class decides: above 1, of "double the rank" and "int4 -> int8" the change
  with the best predicted reduction per stored byte (the rank's effect
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

**Synchronization.** Measurements (per-stream norms) and the bases' Ritz
values stay on the device during the step; `advance()` reads them in one
transfer, squares and sums them and works out the residual factors on the
host. Within the forward and backward pass the only wait for the device is the
batched eigensolver's status check on CUDA (non-finite activations are
reported by `prepare`, the first time a call shape is seen, and otherwise at
`advance()`).
"""

from __future__ import annotations

import ast
import copy
import math

import torch


from ..sketch import SubspaceRequest, TrackedSubspace, make_operator, track_many
from ..sketch.subspace import tail_factors_from
from .activations import Identity, ReLU
from .codecs import IntCodec, pack_mask, unpack_mask
from .collective import agree, distributed_active
from .kernels import fused_kernels_active, lowrank_decode_kernel, lowrank_encode_kernel
from .lowrank_control import LowRankController
from .storage import (AbstractStorage, Packing, Stored, StorageError, _ExactPacking, check_finite_activation,
                      stored_bytes)

__all__ = ["LowRankStorage"]

_RESIDUALS = ("int4", "int8", None)


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
        max_ratio: a memory cap: each compressed call stores at most this fraction of its exact
            bytes (0 < max_ratio <= 1); the controller never grows past it and never falls back
            to exact storage, so a run's stored activations stay within max_ratio x exact's, and a
            block that cannot meet its target there says so (event "at_cap"). None: no cap.
    """

    name = "lowrank"
    rows_capable = True

    def __init__(self, target: float = 1e-2, *, rank: int | None = None, residual: str | None = "int4",
                 value_residual: str | None = "int8", adaptive: bool = True, initial_rank: int = 8,
                 r_min: int = 4, r_max: int = 32, audit_every: int = 1, audit_size: int = 8, path_gain: float | None = 16.0,
                 noise_fraction: float | None = None, patience: int = 3, group: int | None = None,
                 max_ratio: float | None = None):
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
        if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                      or not 0 < max_ratio <= 1):
            raise StorageError(f"max_ratio={max_ratio!r} must be a fraction of exact storage in (0, 1], or None")
        IntCodec(4, group)      # validates `group`
        self.target, self.fixed_rank, self.adaptive = float(target), rank, bool(adaptive)
        self.initial_rank, self.r_min, self.r_max = initial_rank, r_min, r_max
        self.group = group
        self.audit_every, self.audit_size, self.patience = audit_every, audit_size, patience
        self.path_gain = None if path_gain is None else float(path_gain)
        self.noise_fraction = None if noise_fraction is None else float(noise_fraction)
        self.value_bits: int | None = _bits(value_residual)
        # rank, derivative-stream bits, exact fallback and every measurement behind them
        self.control = LowRankController(self.target, rank=rank or initial_rank, bits=_bits(residual), r_min=r_min,
                                         r_max=r_max, patience=patience, path_gain=self.path_gain,
                                         noise_fraction=self.noise_fraction, max_ratio=max_ratio,
                                         cost=self._cost)
        self.max_ratio = max_ratio
        self._largest: tuple[int, bool, torch.dtype] = (1, True, torch.float32)   # (S, smooth, dtype): most streams
        self.sketch_error: float | None = None       # the low-rank part's own relative error (reports)
        self._step_measured: set = set()             # (S, N) of the calls measured this step
        self._bases: dict[tuple, TrackedSubspace] = {}       # call key (S, N, w, ordinal) -> tracked subspace
        self._fresh: set = set()                    # call keys whose basis is this step's
        self._ordinals: dict[tuple, int] = {}       # calls of each shape in the current loss evaluation
        self._backward_seen = False                 # a backward ran since the last forward call
        self._key: tuple | None = None              # the key of the call between wants_sample and begin
        self._pending_tails: list = []      # (class, Ritz values, energies, rank) of this step's bases
        self._requests: dict[tuple, SubspaceRequest] = {}   # call key -> basis update of this step, not yet taken
        self._pending_calls: list[_Measure] = []            # device-side measurements of this step
        self._readout: list[float] | None = None            # their host values, when the model read them
        self._pending_audits: list[tuple] = []

    # -- configuration state --------------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The current rank (None before the first call fixes the width)."""
        return None if self.control.width is None else self.control.rank

    @property
    def bits(self) -> int | None:
        """Residual bits of the derivative streams (4, 8 or None)."""
        return self.control.bits

    @property
    def exact(self) -> bool:
        """Whether the block is in exact fallback."""
        return self.control.exact

    @property
    def kappa(self) -> float | None:
        return max(self.control.kappa.values(), default=None)

    @property
    def amplification(self) -> float | None:
        return max(self.control.amplification.values(), default=None)

    @property
    def noise(self) -> float | None:
        return self.control.noise

    @property
    def recon_error(self) -> float | None:
        """The worst call class's reconstruction error of the latest measured step."""
        return max(self.control.recon.values(), default=None)

    @property
    def audits(self) -> list[dict]:
        return self.control.audits

    @property
    def audit_count(self) -> int:
        return self.control.audit_count

    @property
    def events(self) -> list[dict]:
        return self.control.events

    @property
    def _controlled(self) -> bool:
        return self.adaptive and self.fixed_rank is None

    def _start(self, w: int) -> None:
        """First call: bounds from the block's width (the rows of a call vary: clamped per call)."""
        if self._controlled:
            self.control.start(w)
            c = self.control
            while self.max_ratio is not None and c.rank > c.lo and self._cost(c.rank, c.bits) > self.max_ratio:
                c.rank //= 2            # the starting rank fits the cap
            return
        r = self.fixed_rank if self.fixed_rank is not None else self.initial_rank
        if r > w:
            raise StorageError(f"layer {self.layer}: rank={r} exceeds the width {w} of the stored "
                               f"activation; pass rank <= {w} or storage='exact'")
        self.control.width, self.control.rank = w, r

    def _is_audit(self) -> bool:
        if not self.audit_every or (self.fixed_rank is not None and not self.adaptive) or not self.adaptive:
            return False
        if self.step < self.n_layers:          # bootstrap: every block once
            return self.step == self.layer
        return self.step % self.audit_every == 0 and (self.step // self.audit_every) % self.n_layers == self.layer

    def _note_call(self, s: int, smooth: bool, dtype: torch.dtype) -> None:
        if s >= self._largest[0]:
            self._largest = (s, smooth, dtype)

    def _cost(self, rank: int, bits: int | None) -> float:
        """Stored bytes / exact bytes of the block's largest call class at (rank, bits), per row."""
        s, smooth, dtype = self._largest
        w, n = self.control.width or 1, 1 << 16
        return self._compressed_bytes(s, n, w, min(rank, w), dtype, smooth, bits) / self._exact_bytes(s, n, w, dtype)

    def _stream_bits(self, stream: int, streams: int, smooth: bool, bits: int | None = -1) -> int | None:
        # The value stream's finer codes protect the derivative path of a jet through a smooth
        # activation (f'' and f''' of z_0 multiply the large derivative streams); without
        # derivative streams, or through ReLU (exact mask), it is coded like the others.
        bits = self.bits if bits == -1 else bits
        if stream == 0 and streams > 1 and smooth:
            return None if self.value_bits is None else max(self.value_bits, bits or 0)
        return bits

    def _codec(self, bits: int | None) -> IntCodec | None:
        return None if bits is None else IntCodec(bits, self.group)

    def _compressed_bytes(self, s: int, n: int, w: int, r: int, dtype: torch.dtype, smooth: bool = True,
                          bits: int | None = -1) -> int:
        size = torch.finfo(dtype).bits // 8
        total = 0
        for i in range(s):
            codec = self._codec(self._stream_bits(i, s, smooth, bits))
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
        if self.rank is not None and not self.exact:
            if self._compressed_bytes(s, n, w, min(self.rank, n, w), dtype, smooth) >= exact:
                return "exact (no saving)"
        return None

    def _call_key(self, shape) -> tuple:
        """(S, N, w, ordinal): the ordinal-th call of this shape in the current loss evaluation.

        Calls of equal shape in one evaluation (a PINN's boundary and initial points, both
        value-only and often equally many) span different subspaces and need their own bases;
        a loss evaluation is the forward calls before a backward, so an L-BFGS step's repeated
        evaluations number their calls alike and reuse the step's bases.
        """
        if self._backward_seen:
            self._ordinals, self._backward_seen = {}, False
        shape = tuple(shape)
        k = self._ordinals.get(shape, 0)
        self._ordinals[shape] = k + 1
        return (*shape, k)

    def wants_sample(self, block, shape):
        self._key = key = self._call_key(shape)
        if key in self._fresh:
            return False
        s, _, w = shape
        return self._stores_exactly(s, 1 << 20, w, torch.float32, not block.piecewise_linear) is None

    def prepare(self, z_sample, block, shape):
        """This step's basis for calls of `shape` (S, N, w), from a sample of the call's input rows.

        Called once per call shape and step, before the first call encodes a row: the Gram
        matrix of the sample refines the previous step's basis by one subspace iteration with
        Rayleigh-Ritz (a full eigendecomposition the first time, or when the subspace is a large
        part of the width or changes size). Calls are told apart by their row count too: a
        PINN's boundary and initial points (both value-only, S = 1) span different subspaces,
        and one basis for both would leave the second call's rows to the quantized residual.
        """
        key = self._key
        if key is None or key[:3] != tuple(shape):
            raise StorageError(f"layer {self.layer}: prepare for shape {tuple(shape)} without wants_sample first; "
                               "call wants_sample(block, shape) once per forward call, then prepare")
        s, _, w = z_sample.shape
        self._note_call(s, not block.piecewise_linear, z_sample.dtype)
        if self.rank is None:
            check_finite_activation(z_sample, self.layer, self.name)       # once, before any basis exists
            self._start(w)
        gram = z_sample.mT @ z_sample                                           # (S, w, w)
        # the eigensolver work is deferred: a chain runs every block's request in one batch
        # (`track_many`), and `begin` runs a request nobody ran
        request = SubspaceRequest(self._bases.get(key), gram, self._basis_size(w))
        self._requests[key] = request
        self._fresh.add(key)
        return request

    def _settle(self, key) -> None:
        """Take the result of the basis request of calls `key`, running it if it has not run."""
        request = self._requests.pop(key, None)
        if request is None:
            return
        basis = request.result if request.result is not None else track_many([request])[0]
        self._bases[key] = basis
        # the residual factors are worked out on the host from the Ritz values, read at advance()
        self._pending_tails.append((key[0], basis.evals, basis.energy, min(self.rank, basis.q.shape[-1])))

    def _basis_size(self, w: int) -> int:
        """Columns of the tracked subspace: 2r, so that the energy at rank 2r is known."""
        return min(w, 2 * self.rank)

    def pack(self, z_prev, a, block):
        s, n, w = z_prev.shape
        if self.wants_sample(block, (s, n, w)):
            self.prepare(z_prev[:, ::max(1, n // min(2048, max(256, 8 * w)))], block, (s, n, w))
        packing = self.begin(tuple(z_prev.shape), z_prev.dtype, z_prev.device, block)
        packing.add(slice(0, n), z_prev, a)
        return packing.finish()

    def begin(self, shape, dtype, device, block):
        s, n, w = shape
        key = self._key if self._key is not None and self._key[:3] == tuple(shape) else self._call_key(shape)
        self._key = None
        self._settle(key)
        smooth = not block.piecewise_linear
        why = self._stores_exactly(s, n, w, dtype, smooth)
        if why is not None:
            return _ExactRows(self, shape, dtype, device, why)
        self._note_call(s, smooth, dtype)
        if self.rank is None:
            self._start(w)
        audit = self._is_audit()
        if self.exact and not audit:
            return _ExactRows(self, shape, dtype, device, "exact (fallback)")
        basis = self._bases.get(key)
        if basis is None:
            raise StorageError(f"layer {self.layer}: lowrank has no basis for calls of shape {(s, n, w)}; "
                               "call prepare(z_sample, block, shape) first (pinnsketch.nn.chain does this)")
        # Errors are measured once per step and call size (L-BFGS re-evaluates a step many times
        # at nearby weights), and on every audited call (its kappa needs that call's error).
        measure = audit or (s, n) not in self._step_measured
        if measure:
            self._step_measured.add((s, n))
        r = min(self.rank, n, w, basis.q.shape[-1])       # a call with fewer rows than the rank
        bits = tuple(self._stream_bits(i, s, smooth) for i in range(s))
        return _LowRankPacking(self, block, shape, dtype, device, basis, r, bits, measure, audit, s > 1 and smooth)

    @staticmethod
    def _mode(bits) -> str:
        names = sorted({f"int{b}" for b in bits if b is not None})
        return "lowrank" + "".join(f"+{n}" for n in names)

    # -- backward ------------------------------------------------------------------------
    def unpack(self, saved, meta, block):
        self._backward_seen = True
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

    def pending_readout(self) -> torch.Tensor | None:
        """This step's measurements and Ritz values on the device, as one float64 vector: per measured
        call its per-stream norms (3 x S per chunk), per audit three scalars, per basis its Ritz values
        and energies (None when nothing is pending)."""
        for key in list(self._requests):
            self._settle(key)
        return self._readout_tensor()

    def _readout_tensor(self) -> torch.Tensor | None:
        calls, audits, tails = self._pending_calls, self._pending_audits, self._pending_tails
        if not calls and not audits and not tails:
            return None
        return torch.cat([torch.stack(c.norms).to(torch.float64).flatten() for c in calls]
                         + [torch.stack(a[:3]).to(torch.float64) for a in audits]
                         + [torch.cat([e.flatten(), en]).to(torch.float64) for _, e, en, _ in tails])

    def take_readout(self, values: list[float]) -> None:
        self._readout = values

    def _resolve_pending(self) -> None:
        """Read the step's measurements and its bases' residual factors on the host in one transfer
        (or take the values the model read for all its blocks), and hand them to the controller."""
        calls, audits, tails = self._pending_calls, self._pending_audits, self._pending_tails
        values, self._readout = self._readout, None
        if not calls and not audits and not tails:
            return
        if values is None:
            values = self._readout_tensor().tolist()
        self._pending_tails = []
        control = self.control
        control.step = self.step
        pos = len(values) - sum(e.numel() + en.numel() for _, e, en, _ in tails)
        for cls, evals, energy, r in tails:
            s, k = evals.shape
            flat = values[pos:pos + s * k]
            factors = tail_factors_from([flat[i * k:(i + 1) * k] for i in range(s)],
                                        values[pos + s * k:pos + s * k + s], r)
            if factors:            # a basis too small to tell says nothing about its class
                control.observe_tails(cls, factors)
            pos += s * k + s
        pos = 0
        for c in calls:
            s, chunks = c.shape[0], len(c.norms) // 3
            per_chunk = [values[pos + j * 3 * s:pos + (j + 1) * 3 * s] for j in range(chunks)]
            pos += 3 * s * chunks
            # sums of squares over the chunks, per stream: (norm, low-rank residual, final error)
            norm_sq, low_sq, err_sq = ([sum(v[i * s + st] ** 2 for v in per_chunk) for st in range(s)]
                                       for i in range(3))
            if not all(map(math.isfinite, norm_sq)):
                raise StorageError(
                    f"layer {self.layer}: non-finite activations (NaN or inf) reached the 'lowrank' storage, "
                    "which would corrupt every reconstructed entry; the training diverged or the inputs hold "
                    "NaN/inf. Lower the learning rate, check the inputs, or use storage='exact' to debug")
            c.recon = max((math.sqrt(e / v) if v > 0 else 0.0) for e, v in zip(err_sq, norm_sq))
            control.observe_call(s, c.recon, c.path)
            self.sketch_error = max((math.sqrt(e / v) if v > 0 else 0.0) for e, v in zip(low_sq, norm_sq))
        for _, _, _, measure, n, streams in audits:
            acc_norm, grad_norm, spread = values[pos:pos + 3]
            pos += 3
            err = acc_norm / grad_norm if grad_norm > 0 else 0.0
            amp = math.sqrt(spread) / grad_norm if grad_norm > 0 else None
            noise = (math.sqrt(max(spread - grad_norm ** 2 / n, 0.0) * n / (n - 1)) / grad_norm
                     if grad_norm > 0 and n > 1 else None)
            control.observe_audit(streams, err, measure.recon, amp, noise)
        self._pending_calls, self._pending_audits = [], []

    # -- control -------------------------------------------------------------------
    def effective_target(self) -> float:
        """`target`, or for mini-batch training max(target, noise_fraction x measured sampling noise)."""
        return self.control.effective_target()

    def path_target(self) -> float | None:
        """The reconstruction error the derivative path allows (None: no path control)."""
        return self.control.path_target()

    def predicted_error(self) -> float | None:
        """kappa x reconstruction error, worst call class (None before calibration)."""
        return self.control.predicted_error()

    def advance(self) -> None:
        # the one host read of the policy per step: the controller reads the step's measurements
        # here, never inside the forward or backward pass (on CUDA the eigensolver of the basis
        # update also waits for its small result)
        for key in list(self._requests):
            self._settle(key)
        self._resolve_pending()
        # bases of call shapes this step did not use (the point count changed) are dropped
        self._bases = {k: b for k, b in self._bases.items() if k in self._fresh}
        self._fresh, self._ordinals, self._backward_seen = set(), {}, False
        self.control.step = self.step
        if distributed_active():
            self.control.agree(agree)       # every process decides alike (multi-process training)
        if self._controlled and self.rank is not None:
            self.control.decide()
        else:
            self.control.end_step()
        self._step_measured = set()
        super().advance()

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

    _STATE = ("value_bits", "sketch_error")

    def get_extra_state(self):
        for key in list(self._requests):
            self._settle(key)
        self._resolve_pending()      # measurements of the current step: the same values, read now
        state = super().get_extra_state()
        # plain values and tensors, so any HDF5/JSON writer can store them
        state["lowrank"] = copy.deepcopy({k: getattr(self, k) for k in self._STATE})
        state["lowrank"]["control"] = self.control.state_dict()
        state["lowrank"]["_step_measured"] = sorted(list(m) for m in self._step_measured)
        state["lowrank"]["bases"] = {repr(key): b.state() for key, b in self._bases.items()}
        state["lowrank"]["fresh"] = sorted(list(k) for k in self._fresh)
        state["lowrank"]["ordinals"] = {repr(k): v for k, v in self._ordinals.items()}
        state["lowrank"]["backward_seen"] = self._backward_seen
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        saved = copy.deepcopy(state["lowrank"])                   # never share state between models
        for k, v in saved.items():
            if k in self._STATE:
                setattr(self, k, v)
        self.control.load_state_dict(saved["control"])
        self._step_measured = {tuple(m) for m in saved.get("_step_measured", [])}
        self._bases = {ast.literal_eval(key): TrackedSubspace.from_state(b) for key, b in saved.get("bases", {}).items()}
        self._fresh = {tuple(k) for k in saved.get("fresh", [])}
        self._ordinals = {ast.literal_eval(k): v for k, v in saved.get("ordinals", {}).items()}
        self._backward_seen, self._key = bool(saved.get("backward_seen", False)), None
        self._pending_tails, self._requests, self._readout = [], {}, None
        self._pending_calls, self._pending_audits = [], []


class _Measure:
    """Device-side norms of one measured call, per chunk and stream: read at `advance()`.

    norms: per chunk three (S,) tensors, the norms of z, of its low-rank residual and of the final
    error z - z_hat; their squares summed over the chunks give the call's sums of squares."""

    __slots__ = ("shape", "path", "norms", "recon")

    def __init__(self, shape, path: bool):
        self.shape, self.path = shape, path
        self.norms: list[torch.Tensor] = []
        self.recon: float | None = None


class _ExactRows(_ExactPacking):
    """lowrank storing a call exactly (narrow, no saving, fallback): z_prev's chunks themselves."""

    def __init__(self, policy: "LowRankStorage", shape, dtype, device, mode: str):
        super().__init__(policy, shape, dtype, device, info={"rank": None, "mode": mode}, tag="exact")


class _LowRankPacking(Packing):
    """One call of `lowrank`, encoded chunk by chunk: U (S, N, r), codes and scales per stream group,
    ReLU's mask bits, the audit sketch; transients are one chunk (see the module docstring)."""

    def __init__(self, policy: "LowRankStorage", block, shape, dtype, device, basis: TrackedSubspace, r: int,
                 bits: tuple, measure: bool, audit: bool, path: bool):
        s, n, w = shape
        self.policy, self.block, self.shape, self.bits, self.basis = policy, block, shape, bits, basis
        self.r, self.audit, self.fallback = r, audit, policy.exact
        self.p = basis.q[..., :r].contiguous()                              # (S, w, r): this step's basis
        coded = any(b is not None for b in bits)
        self.u_dtype = torch.bfloat16 if coded and dtype == torch.float32 else dtype   # the residual absorbs it
        self.groups = [(IntCodec(b, policy.group), streams) for b, streams in _groups(bits) if b is not None]
        # on a GPU, a call without an audit runs its codec as one compiled kernel (`nn.kernels`)
        self.kernel_groups = _kernel_groups(bits, policy.group, w)
        self.kept = _ExactPacking(policy, shape, dtype, device) if self.fallback else None     # exact fallback: z_prev itself
        # U, codes, scales and ReLU's mask bits: a call that comes in one chunk keeps the encoder's own
        # tensors; a chunked one copies each chunk into one buffer per tensor (`_rows_into`)
        self.u, self.codes, self.mask = None, [None] * (2 * len(self.groups)), None
        self.measure = _Measure(shape, path) if measure else None
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
        if not self.audit and self.kernel_groups is not None and fused_kernels_active(z):
            self._add_fused(rows, z, u)
            return
        residual = torch.baddbmm(z, u.to(z.dtype), self.p.mT, alpha=-1)     # z - U P^T, one product
        measure = self.measure
        if measure is not None:
            # norms of z and of the low-rank residual (non-finite values are reported at advance())
            measure.norms += [_stream_norms(z), _stream_norms(residual)]
        decode = measure is not None or self.audit
        for i, (codec, streams) in enumerate(self.groups):
            sub = residual[streams]                                          # (G, m, w)
            if decode:
                (codes, scales), sub_hat = codec.encode_decode(sub.reshape(-1, w))
                torch.sub(sub, sub_hat.view(sub.shape), out=sub)             # the coding error of these streams
            else:
                codes, scales = codec.encode(sub.reshape(-1, w))
            if not self.fallback:
                g, n = streams.stop - streams.start, self.shape[1]
                self.codes[2 * i] = _rows_into(self.codes[2 * i], rows, codes.view(g, m, -1), n)
                self.codes[2 * i + 1] = _rows_into(self.codes[2 * i + 1], rows, scales.view(g, m, -1), n)
        # `residual` now holds z - z_hat on every stream (uncoded streams: the low-rank residual itself)
        if measure is not None:
            measure.norms.append(_stream_norms(residual))
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
        self._keep(rows, z, u)

    def _add_fused(self, rows, z, u):
        """`add` without an audit, as one compiled kernel: the same codes, scales and measurements."""
        parts, norms = lowrank_encode_kernel(z, u, self.p, groups=self.kernel_groups)
        if self.measure is not None:
            self.measure.norms += norms
        for i, part in enumerate(parts):
            self.codes[i] = _rows_into(self.codes[i], rows, part, self.shape[1])
        self._keep(rows, z, u)

    def _keep(self, rows, z, u):
        """Keep U of these rows and, through ReLU, their exact mask bits."""
        n = self.shape[1]
        self.u = _rows_into(self.u, rows, u, n)
        if isinstance(self.block.activation, ReLU):
            self.mask = _rows_into(self.mask, rows, _pack_mask_rows(z[0] > 0), n, dim=0)

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


def _rows_into(buffer: torch.Tensor | None, rows: slice, part: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """`part` as rows `rows` (along `dim`) of an n-row tensor: `part` itself when it is all n rows (one
    chunk: no copy), else written into `buffer` (allocated at the first chunk)."""
    if buffer is None:
        if rows.start == 0 and rows.stop == n:
            return part
        shape = list(part.shape)
        shape[dim] = n
        buffer = part.new_empty(shape)
    buffer[(slice(None),) * dim + (rows,)] = part
    return buffer


def _stream_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-stream Frobenius norm of x (S, m, w): (S,), one pass; squared and summed on the host."""
    return torch.linalg.vector_norm(x, dim=(1, 2))


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


def _kernel_groups(bits: tuple, group: int | None, w: int) -> tuple | None:
    """((bits, first stream, end stream), ...) of the coded streams for `nn.kernels`' codec, or None
    where it does not apply (no coded stream, scales per column group, an odd width under int4)."""
    coded = tuple((b, streams.start, streams.stop) for b, streams in _groups(bits) if b is not None)
    if not coded or group is not None or (w % 2 and any(b == 4 for b, _, _ in coded)):
        return None
    return coded


def _rows_fn(parts, layout, group: int | None):
    """rows -> z_hat[:, rows] (S, m, w) from parts [U, P, (codes (G, N, c), scales (G, N, ng)) per coded group]."""
    s, n, w, _, bits = layout
    u, p, *codes = parts
    coded = [(IntCodec(b, group), streams) for b, streams in _groups(bits) if b is not None]
    kernel_groups = _kernel_groups(bits, group, w)
    uncoded = [i for i, b in enumerate(bits) if b is None]

    def rows(r: slice) -> torch.Tensor:
        if kernel_groups is not None and fused_kernels_active(p):
            return lowrank_decode_kernel(u[:, r], p, *(c[:, r] for c in codes), groups=kernel_groups, w=w)
        ur = u[:, r].to(p.dtype)                                              # (S, m, r)
        if not coded:
            return ur @ p.mT
        m = ur.shape[1]
        # decoded residuals straight into the output, then + U P^T in the same product (baddbmm)
        out = torch.empty(s, m, w, dtype=p.dtype, device=p.device)
        for i, (codec, streams) in enumerate(coded):
            g = streams.stop - streams.start
            c = codes[2 * i][:, r].reshape(g * m, -1)
            sc = codes[2 * i + 1][:, r].reshape(g * m, -1)
            codec.decode((c, sc), (g * m, w), out.dtype, out=out[streams].view(g * m, w))
        for i in uncoded:
            out[i].zero_()
        return out.baddbmm_(ur, p.mT)

    return rows
