"""The `ema` storage policy: the EMA three-sketches of arXiv 2510.00442.

Antil & Verma (2025) keep, per layer, the three sketches of Tropp et al.
(2019) of the layer's activation matrix A (points x features) with **fixed**
test matrices, updated as exponential moving averages

    X <- beta X + (1 - beta) Upsilon A_t,   Y <- beta Y + (1 - beta) A_t Omega^T,
    Z <- beta Z + (1 - beta) Phi A_t Psi^T,

and reconstruct A_hat = Q C P^T from them for the weight gradient. The sketches
are linear in A, so they are exactly sketches of the EMA of the activations.

NOTE [mean-field collapse]
    On full-batch training over fixed collocation points (the usual PINN
    set-up) row i of A_t is always point i, and the EMA only adds staleness.
    On shuffled mini-batches row i is an unrelated sample at every step: the
    EMA of A_t tends to the per-feature mean (a rank-one matrix 1 mu^T for
    beta -> 1), so the reconstructed weight gradient G^T A_hat collapses to
    the mean-field gradient (sum_i g_i) mu^T. `tests/nn/test_ema.py` shows the
    relative gradient error near 1 at beta = 0.99 against much less at beta = 0.
    This is the published method, reproduced faithfully; `lowrank` sketches
    the current activations instead.

NOTE [several calls per step]
    A PINN step calls the network more than once (residual points, initial
    points, boundary points), and L-BFGS evaluates it several times per step.
    Each call site keeps its own EMA ("slot", keyed by the activation's shape
    and its occurrence among the step's calls of that shape; a new evaluation
    starts when the step's first shape comes again). A call blends the slot's
    committed sketches with the current activation **out of place** (the
    tensors saved for an earlier call's backward are never modified), and
    `advance()` commits the step's last blend of every slot: the average runs
    over optimizer steps, as in the paper.
"""

from __future__ import annotations

import ast
import copy
import math


from .collective import agree, distributed_active
from ..sketch import AdaptiveRank, FixedRank, ThreeSketch, derive_seed
from ..sketch.operators import OPERATORS
from .codecs import make_codec
from .storage import AbstractStorage, Stored, StorageError, check_finite_activation, decode_streams, \
    encode_streams, stored_bytes

__all__ = ["EMAStorage"]


class EMAStorage(AbstractStorage):
    """Three EMA sketches of the block's activation a (stacked jet, (S*N) x w), fixed test matrices.

    Exact: grad_b, the linear part g W of the input gradient, and for ReLU and
    identity blocks the whole input gradient (1-bit mask). Approximate: the
    weight gradient (from the EMA reconstruction, i.e. from the average of
    past activations, see NOTE [mean-field collapse]); for smooth activations
    the nonlinearity's derivative path, which reads z_prev from a compact copy
    (`derivative` codec, default bfloat16).

    Stores (saved for backward): the blended sketches Y ((S*N) x k), X (k x w),
    Z (s x s) of this call, plus the compact z_prev (smooth activations) and
    ReLU's mask. Persistent between steps: the committed sketches of every
    slot (NOTE [several calls per step]).

    Rank: fixed (`rank=int`) or adaptive (`rank=None`): after each step
    (`advance()`) an `AdaptiveRank` controller compares Tropp's relative
    error estimate of the EMA reconstruction (worst call of the step) with
    `target`. A rank change invalidates the sketches: every slot is rebuilt
    empty (new test matrices of the new size) and the reset is recorded in
    `resets`. The first update of a slot initializes it with the current
    activation (no zero-start bias).

    Hysteresis: right after a reset the sketches hold one activation, not an
    average, and their error is lower than the settled EMA's; a controller that
    shrank on it flapped (measured on Burgers, beta = 0.9: rank 4 -> 8 -> 4 every
    4 steps, each change wiping the average). So the rank may only grow during
    the `settle` = ceil(1 / (1 - beta)) steps (the EMA's time constant) after a
    reset, and a rank change that undoes the previous one within 4 settle + 3
    steps (a flap) blocks shrinking for a cooldown that starts at 8 settle steps
    and doubles at every flap.

    Args:
        beta: EMA decay in [0, 1) (0: sketch of the current activation only).
        rank: fixed rank, or None for adaptive (starting at `initial_rank`).
        target: relative reconstruction error target of the adaptive controller.
        initial_rank, r_min, r_max: adaptive bounds (r_max is clamped to min(S*N, w); None: no cap).
        operator: "gaussian" | "sparse" | "srft" test matrices.
        derivative: codec for z_prev on the derivative path.
        error_size: rows of Tropp's error sketch.
    """

    name = "ema"

    def __init__(self, beta: float = 0.9, *, rank: int | None = None, target: float = 0.1, initial_rank: int = 8,
                 r_min: int = 1, r_max: int | None = 32, operator: str = "gaussian", derivative: str = "bfloat16",
                 error_size: int = 10):
        super().__init__()
        self._record_options(locals())
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise StorageError(f"beta={beta!r} must lie in [0, 1) (EMA decay)")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise StorageError(f"rank={rank!r} must be a positive int or None (adaptive)")
        if operator not in OPERATORS:
            raise StorageError(f"operator={operator!r} is not one of {sorted(OPERATORS)}")
        self.beta, self.fixed_rank, self.target = float(beta), rank, float(target)
        self.initial_rank, self.r_min, self.r_max = initial_rank, r_min, r_max
        self.operator, self.error_size = operator, error_size
        self.codec = make_codec(derivative)
        self._slots: dict[tuple, ThreeSketch] = {}        # committed EMA sketches per call site
        self._pending: dict[tuple, ThreeSketch] = {}      # this step's latest blend per call site
        self._occurrence: dict[tuple, int] = {}
        self._first_shape: tuple | None = None
        self._controller = None
        self._generation = 0          # bumps on every reset: new test matrices
        self._step_error: float | None = None
        self.resets: list[dict] = []
        self.error: float | None = None
        self.settle = max(1, math.ceil(1.0 / (1.0 - self.beta) - 1e-9))
        self._last_change: tuple[int, int] | None = None     # (step, rank before the change)
        self._no_shrink_until = 0
        self._cooldown = 8 * self.settle

    @property
    def rank(self) -> int | None:
        return None if self._controller is None else self._controller.rank

    # -- rank control -------------------------------------------------------------
    def _make_controller(self, limit: int):
        if self.fixed_rank is not None:
            if self.fixed_rank > limit:
                raise StorageError(f"layer {self.layer}: rank={self.fixed_rank} exceeds min(rows, cols)={limit} "
                                   f"of the activation matrix; pass rank <= {limit} or storage='exact'")
            return FixedRank(self.fixed_rank)
        r_max = limit if self.r_max is None else min(self.r_max, limit)
        r_min = min(self.r_min, r_max)
        return AdaptiveRank(self.target, rank=min(max(self.initial_rank, r_min), r_max), r_min=r_min, r_max=r_max)

    def _reset(self, reason: str) -> None:
        self._generation += 1
        self._slots.clear()
        self._pending.clear()
        self.resets.append({"step": self.step, "rank": self.rank, "reason": reason})

    def _new_sketch(self, key: tuple, dtype, device) -> ThreeSketch:
        # Fixed test matrices per call site: the seed depends on the layer, the slot and
        # the reset generation, never on the step.
        shape, occurrence = key
        seed = derive_seed(self.seed, "layer", self.layer, "ema", self._generation, *shape, occurrence)
        return ThreeSketch(shape, self.rank, operator=self.operator, error_size=self.error_size, seed=seed,
                           dtype=dtype, device=device)

    def _slot_key(self, shape: tuple) -> tuple:
        if self._first_shape is None:
            self._first_shape = shape
        elif shape == self._first_shape and self._occurrence.get(shape, 0) > 0:
            self._occurrence.clear()                      # a new evaluation of the same step
        index = self._occurrence.get(shape, 0)
        self._occurrence[shape] = index + 1
        return (shape, index)

    def advance(self) -> None:
        for key, sketch in self._pending.items():
            self._slots[key] = sketch
        self._pending.clear()
        self._occurrence.clear()
        self._first_shape = None
        self.error, self._step_error = self._step_error, None
        if distributed_active():
            # multi-process training (pinnsketch.training.distributed): each rank sketches its own shard;
            # the controller reads the worst error of all ranks, so every rank keeps the same rank
            self.error = agree([self.error])[0]
        if self._controller is not None and self.error is not None and math.isfinite(self.error):
            old, error = self._controller.rank, self.error
            if isinstance(self._controller, AdaptiveRank) and self._shrink_blocked():
                error = max(error, 0.5 * self.target)      # hold: cannot count toward a shrink
            new = self._controller.propose(error, self.step)
            if new != old:
                last = self._last_change
                if last is not None and new == last[1] and self.step - last[0] <= 4 * self.settle + 3:
                    # a change that undoes the previous one (a shrink that had to be grown back, or
                    # a grow the settled average shrank again): back off from shrinking
                    self._no_shrink_until = self.step + self._cooldown
                    self._cooldown *= 2
                self._last_change = (self.step, old)
                self._reset("rank change")
        super().advance()

    def _shrink_blocked(self) -> bool:
        since_reset = self.step - self.resets[-1]["step"] if self.resets else self.step
        return since_reset < self.settle or self.step < self._no_shrink_until

    # -- storage --------------------------------------------------------------------
    def pack(self, z_prev, a, block):
        s, n, w = a.shape
        check_finite_activation(a, self.layer, self.name)
        mat = a.reshape(s * n, w)
        shape = (s * n, w)
        if self._controller is None:
            self._limit = min(shape)
            self._controller = self._make_controller(self._limit)
            self._reset("first step")
        key = self._slot_key(shape)
        committed = self._slots.get(key)
        if committed is None or committed.dtype != mat.dtype or committed.device != mat.device:
            sketch = self._new_sketch(key, mat.dtype, mat.device)
            sketch.update(mat)                                     # first update: the activation itself
        else:
            sketch = copy.deepcopy(committed)                      # blend out of place
            sketch.update(mat, theta=self.beta, eta=1.0 - self.beta)
        self._pending[key] = sketch
        error = sketch.relative_error_estimate() if self.error_size else None
        if error is not None:
            self._step_error = max(self._step_error or 0.0, error)
        parts = () if block.piecewise_linear else encode_streams(self.codec, z_prev)
        saved = (sketch.Y, sketch.X, sketch.Z, *parts)
        self._note({"rank": sketch.rank, "error_estimate": error, "saved_bytes": stored_bytes(saved)})
        # meta references this call's sketch object for its (seed-regenerated) test
        # operators; its tensors are the ones saved above, never modified afterwards.
        return saved, (sketch, tuple(z_prev.shape))

    def unpack(self, saved, meta, block):
        sketch, shape = meta
        y, x, z, *parts = saved
        factors = sketch.reconstruct(rank=sketch.rank)
        if not parts:
            return Stored(None, {"factors": factors})
        return Stored(lambda rows: decode_streams(self.codec, parts, shape, y.dtype, rows), {"factors": factors})

    def weight_grad(self, grad_z, stored, block):
        g = grad_z.reshape(-1, grad_z.shape[-1])                      # (S*N, out)
        return stored.payload["factors"].rmatmul(g.mT)                 # G^T A_hat, (out, w)

    @property
    def history(self) -> list[dict]:
        ranks = [] if self._controller is None else [{**h, "event": h["reason"]} for h in self._controller.history]
        return sorted([{**r, "event": "reset"} for r in self.resets] + ranks, key=lambda e: e["step"])

    def report(self):
        return {**super().report(), "beta": self.beta, "resets": len(self.resets), "slots": len(self._slots)}

    def get_extra_state(self):
        state = super().get_extra_state()
        state["ema"] = {
            "generation": self._generation, "resets": list(self.resets), "error": self.error,
            "hysteresis": {"last_change": None if self._last_change is None else list(self._last_change),
                           "no_shrink_until": self._no_shrink_until,
                           "cooldown": self._cooldown},
            # plain values, so any HDF5/JSON writer can store the controller
            "controller": None if self._controller is None else {"limit": self._limit, **self._controller.state_dict()},
            # call-site keys are tuples; stored as their repr so run files can hold them
            "slots": {repr(key): {name: getattr(sk, name).clone() for name in ("Y", "X", "Z", "W")}
                      for key, sk in self._slots.items()},
        }
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        ema = copy.deepcopy(state["ema"])            # never share controllers between models
        self._generation, self.resets, self.error = ema["generation"], ema["resets"], ema["error"]
        hyst = ema.get("hysteresis") or {}
        self._last_change = tuple(hyst["last_change"]) if hyst.get("last_change") is not None else None
        self._no_shrink_until = hyst.get("no_shrink_until", 0)
        self._cooldown = hyst.get("cooldown", 8 * self.settle)
        ctrl, self._controller = ema["controller"], None
        if ctrl is not None:
            self._limit = ctrl.pop("limit")
            self._controller = self._make_controller(self._limit)
            self._controller.load_state_dict(ctrl)
        self._slots, self._pending, self._occurrence, self._first_shape = {}, {}, {}, None
        for key, buffers in ema["slots"].items():
            key = ast.literal_eval(key) if isinstance(key, str) else key
            sketch = self._new_sketch(key, buffers["Y"].dtype, buffers["Y"].device)
            for name, value in buffers.items():
                getattr(sketch, name).copy_(value)
            self._slots[key] = sketch
