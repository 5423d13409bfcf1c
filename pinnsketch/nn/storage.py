"""Storage policies: what a fused dense block keeps for its backward pass.

Every block of a pinnsketch network maps the previous pre-activation jet
z_prev (S, N, w_in) to z = act(z_prev) W^T + b (`pinnsketch.nn.fused`). Its
backward needs z_prev twice: for the weight gradient grad_W = sum_s g_s^T a_s
with a = act(z_prev), and for the nonlinearity's derivative path
grad_z_prev = J_act(z_prev)^T (g W). A storage policy decides what is kept of
z_prev in the forward pass and what the backward reconstructs from it.

The interface (`AbstractStorage`), with the two simplest policies:

* `ExactStorage` ("exact"): keeps z_prev; every gradient is exact.
* `CheckpointStorage` ("checkpoint"): keeps only the inputs of segments of
  consecutive blocks; the model recomputes a segment in backward
  (`torch.utils.checkpoint`, non-reentrant). Every gradient is exact.

The sketched policies live in their own modules: `projection`, `ema`,
`lowrank`; `pinnsketch.nn.policies.make_storage` builds any of them by name.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..sketch import derive_seed

__all__ = ["AbstractStorage", "Stored", "Packing", "ExactStorage", "CheckpointStorage", "StorageError",
           "encode_streams", "decode_streams", "check_finite_activation", "stored_bytes", "read_pending"]


class StorageError(ValueError):
    """A storage policy cannot handle the tensors it was given (bad rank, non-finite values, ...)."""


@dataclass
class Stored:
    """What a policy hands the fused block's backward.

    z: rows -> reconstruction of z_prev[:, rows] (S, n, w) for the nonlinearity's
        derivative path and the chunked weight gradient, or None when the policy
        keeps nothing of z_prev (then backward needs none: ReLU/identity with a
        policy that computes its own weight gradient). Backward works through the
        points in chunks so that only one chunk is reconstructed at a time.
    payload: policy-specific extras (e.g. projected activations, audit accumulators).
    """

    z: Callable[[slice], torch.Tensor] | None
    payload: dict[str, Any] = field(default_factory=dict)
    mask: Callable[[slice], torch.Tensor] | None = None

    def rows(self, rows: slice) -> torch.Tensor | None:
        return None if self.z is None else self.z(rows)

    def mask_rows(self, rows: slice) -> torch.Tensor | None:
        """ReLU's exact mask z_prev[0, rows] > 0 (n, w) when the policy keeps it apart from z, else None."""
        return None if self.mask is None else self.mask(rows)

    @staticmethod
    def of(z: torch.Tensor, **payload) -> "Stored":
        """Stored for a dense reconstruction z (S, N, w)."""
        return Stored(lambda rows: z[:, rows], dict(payload))


class Packing(abc.ABC):
    """One call's stored form of a block input z_prev (S, N, w), filled chunk by chunk of rows.

    `pinnsketch.nn.chain` hands every row chunk of z_prev to `add` as soon as it is
    computed, in order, then calls `finish` once; the chunk tensors may be kept
    (they are not modified afterwards) but the policy must not hold any other
    full-size tensor of its own.
    """

    @abc.abstractmethod
    def add(self, rows: slice, z: torch.Tensor, a: torch.Tensor) -> None:
        """Store rows `rows` of z_prev: z (S, n, w) and its activation a = act(z) (S, n, w)."""

    @abc.abstractmethod
    def finish(self) -> tuple[tuple[torch.Tensor, ...], Any]:
        """(tensors to save for backward, metadata for `AbstractStorage.unpack`)."""

    def destination(self, rows: slice) -> torch.Tensor | None:
        """Where the producer of z_prev should write rows `rows` (S, n, w), or None (its own tensor)."""
        return None


class _ExactPacking(Packing):
    """Keep z_prev: the tensor itself when it comes in one chunk, else its chunks copied into one buffer.

    Why one buffer: many long-lived chunk-sized blocks interleaved with chunk-sized transients
    fragment a CPU allocator's heap (glibc keeps freed interior blocks resident), so the
    process would hold far more than the live bytes; one (S, N, w) buffer per block is
    allocated apart from the transients, and the chain writes each chunk straight into it
    (`destination`), so nothing is copied.

    info: extra entries for the policy's report; tag: metadata is (tag,) instead of ().
    """

    def __init__(self, policy: "AbstractStorage", shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device, info: dict | None = None, tag: str | None = None):
        self.policy, self.shape, self.dtype, self.device = policy, shape, dtype, device
        self.info, self.tag = info or {}, tag
        self.z: torch.Tensor | None = None

    def destination(self, rows):
        if rows.start == 0 and rows.stop == self.shape[1]:
            return None                            # one chunk: keep the producer's tensor itself
        if self.z is None:
            self.z = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.z[:, rows]

    def add(self, rows, z, a):
        if rows.start == 0 and rows.stop == self.shape[1]:
            self.z = z
            return
        dest = self.destination(rows)
        if dest.data_ptr() != z.data_ptr():        # not written in place by the producer
            dest.copy_(z)

    def finish(self):
        self.policy._note({**self.info, "saved_bytes": stored_bytes([self.z])})
        return (self.z,), (() if self.tag is None else (self.tag,))


class AbstractStorage(torch.nn.Module, abc.ABC):
    """How one block stores z_prev for backward. One instance per block.

    Subclasses implement `pack` (forward, under no_grad) and `unpack` (backward).
    The weight gradient is, by default, accumulated over chunks of points from
    the reconstruction (`weight_grad_chunk`: sum over streams of g_s^T a_s); a
    policy that estimates it otherwise overrides `weight_grad`. Per-step randomness comes from `step_seed()`, derived
    from (seed, layer, step): fixed within an optimizer step so that L-BFGS
    re-evaluations see the same test matrices, new after `advance()`.

    Class attributes:
        name: registry name.
        exact_z: True when `unpack` returns z_prev exactly (then ReLU's mask is
            derived from it instead of being stored separately).
    """

    name: ClassVar[str]
    exact_z: ClassVar[bool] = False
    #: True when the policy stores rows as they come (`begin`): the model may then run whole
    #: chains of such blocks chunk by chunk (`pinnsketch.nn.chain`).
    rows_capable: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self.layer = 0
        self.n_layers = 1
        self.seed = 0
        self.step = 0
        self.last: dict[str, Any] = {}           # the step's largest call (for storage_report)
        self._noted_step = -1

    def _record_options(self, given: dict[str, Any]) -> None:
        """Keep the constructor's arguments (call with ``locals()`` first thing in ``__init__``) for `config`."""
        import inspect

        params = inspect.signature(type(self).__init__).parameters
        self._init_options = {name: given[name] for name in params if name != "self" and name in given}

    def config(self) -> dict[str, Any]:
        """The constructor arguments that differ from their defaults: ``type(self)(**config())``
        builds the same policy (run files record it; `make_storage("name:key=value")` reads it)."""
        import inspect

        params = inspect.signature(type(self).__init__).parameters
        options = getattr(self, "_init_options", {})
        return {k: v for k, v in options.items() if params[k].default is inspect.Parameter.empty
                or v != params[k].default}

    def bind(self, layer: int, seed: int, n_layers: int = 1) -> "AbstractStorage":
        """Attach the policy to block `layer` of `n_layers` in a model whose storage seed is `seed`."""
        self.layer, self.seed, self.n_layers = int(layer), int(seed), int(n_layers)
        return self

    def clone(self) -> "AbstractStorage":
        """A fresh copy with the same configuration (one per block)."""
        return copy.deepcopy(self)

    def step_seed(self, *keys: int | str) -> int:
        """Seed of this layer's random test matrices for the current step."""
        return derive_seed(self.seed, "layer", self.layer, "step", self.step, *keys)

    def advance(self) -> None:
        """Move to the next optimizer step (new test matrices, controller updates)."""
        self.step += 1

    def pending_readout(self) -> torch.Tensor | None:
        """The device values `advance()` will read on the host, as one 1-D float64 tensor (None: none).

        A model reads the readouts of all its blocks in one transfer (`read_pending`) and hands each
        its part (`take_readout`), so that a step waits for the device once, not once per block.
        """
        return None

    def take_readout(self, values: list[float]) -> None:
        """The host values of `pending_readout()`, read by the model for the coming `advance()`."""

    @abc.abstractmethod
    def pack(self, z_prev: torch.Tensor, a: torch.Tensor, block) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Forward: z_prev (S, N, w) and its activation a (S, N, w) -> (tensors to save, metadata)."""

    @abc.abstractmethod
    def unpack(self, saved: tuple[torch.Tensor, ...], meta: Any, block) -> Stored:
        """Backward: rebuild what `weight_grad` and the derivative path need."""

    def begin(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, block) -> Packing:
        """Forward of a rows-capable policy: a `Packing` for an input of `shape` (S, N, w)."""
        raise NotImplementedError(f"{type(self).__name__} does not store rows as they come (rows_capable=False)")

    def wants_sample(self, block, shape: tuple[int, int, int]) -> bool:
        """Whether `begin` needs `prepare` first, for an input of `shape` (S, N, w) (default: no).

        Called once per forward call, before `prepare` and `begin`."""
        return False

    def prepare(self, z_sample: torch.Tensor, block, shape: tuple[int, int, int]):
        """Learn what `begin` needs for an input of `shape` (S, N, w) from a sample of its rows
        z_sample (S, m, w) (see `wants_sample`). May return a `pinnsketch.sketch.SubspaceRequest`
        that the caller runs, batched with other blocks' (`track_many`), before `begin`; `begin`
        runs it if nobody did. Default: nothing to learn (None)."""
        return None

    def weight_grad(self, grad_z: torch.Tensor, stored: Stored, block) -> torch.Tensor | None:
        """The whole grad_W (out, in) from grad_z (S, N, out), or None to accumulate chunks."""
        return None

    def weight_grad_chunk(self, grad_z: torch.Tensor, a: torch.Tensor, stored: Stored, rows: slice,
                          block) -> torch.Tensor:
        """Contribution of points `rows`: sum_s grad_z[s]^T a[s]; grad_z (S, n, out), a (S, n, in)."""
        g, a = grad_z.flatten(0, 1), a.flatten(0, 1)
        # BLAS is several times slower on X^T Y when Y is the narrow one (a first block with
        # 2 inputs and 20 outputs: 6x here), so the narrow matrix goes first
        return (a.mT @ g).mT if a.shape[1] < g.shape[1] else g.mT @ a

    def finish_backward(self, stored: Stored, grad_w: torch.Tensor, block) -> None:
        """Called with the block's weight gradient once backward has it (audits)."""

    def _note(self, info: dict[str, Any]) -> None:
        """Record what a call stored; the report shows the largest call of the step
        (a PINN step also calls the network on small boundary sets)."""
        if self._noted_step != self.step or info.get("saved_bytes", 0) >= self.last.get("saved_bytes", 0):
            self.last, self._noted_step = info, self.step

    @property
    def history(self) -> list[dict[str, Any]]:
        """Decisions over training (rank changes, resets, fallbacks), one dict each with a "step" key."""
        return []

    def report(self) -> dict[str, Any]:
        """Per-layer summary for `storage_report()`."""
        return {"layer": self.layer, "storage": self.name, "rank": None, "error_estimate": None,
                **self.last}

    # Step counter and controller state travel with the model's state_dict.
    def get_extra_state(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_layers": self.n_layers, "seed": self.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.layer, self.n_layers = state["layer"], state["n_layers"]
        self.seed, self.step = state["seed"], state["step"]

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


def stored_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (what save_for_backward keeps alive)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def encode_streams(codec, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Encode a jet z (S, N, w) as one (S*N, w) matrix: per-row codec scales are per stream and point."""
    return codec.encode(z.reshape(-1, z.shape[-1]))


def decode_streams(codec, parts, shape: tuple[int, int, int], dtype: torch.dtype,
                   rows: slice = slice(None)) -> torch.Tensor:
    """Inverse of `encode_streams` for points `rows` only: -> (S, n, w).

    Every part of an encoded (S*N, w) matrix is row-aligned (codes, scales), so
    a chunk of points decodes without touching the rest.
    """
    s, n, w = shape
    start, stop, _ = rows.indices(n)
    out = []
    for i in range(s):
        sub = tuple(p[i * n + start:i * n + stop] for p in parts)
        out.append(codec.decode(sub, (stop - start, w), dtype))
    return torch.stack(out)


def read_pending(storages: Sequence["AbstractStorage"]) -> None:
    """One device-to-host transfer for the pending readouts of `storages` (call before their `advance()`).

    Policies on different devices, or a single policy with a readout, read their own.
    """
    parts = [(s, t) for s in storages if (t := s.pending_readout()) is not None]
    if len(parts) < 2 or len({t.device for _, t in parts}) > 1:
        return
    values = torch.cat([t for _, t in parts]).tolist()
    at = 0
    for storage, t in parts:
        storage.take_readout(values[at:at + t.numel()])
        at += t.numel()


def check_finite_activation(z: torch.Tensor, layer: int, policy: str) -> None:
    """Raise a clear error when non-finite activations would reach a sketch."""
    if bool(torch.isfinite(z.sum())):
        return              # fast path: any NaN/inf entry makes the sum non-finite
    finite = torch.isfinite(z)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise StorageError(
            f"layer {layer}: {bad} non-finite activation entries (NaN or inf) reached the {policy!r} storage "
            "sketch, which would corrupt every reconstructed entry; the training diverged or the inputs "
            "hold NaN/inf. Lower the learning rate, check the inputs, or use storage='exact' to debug")


class ExactStorage(AbstractStorage):
    """Keep z_prev itself. Stores S*N*w floats per block; every gradient is exact."""

    name = "exact"
    exact_z = True
    rows_capable = True

    def pack(self, z_prev, a, block):
        packing = self.begin(tuple(z_prev.shape), z_prev.dtype, z_prev.device, block)
        packing.add(slice(0, z_prev.shape[1]), z_prev, a)
        return packing.finish()

    def begin(self, shape, dtype, device, block):
        return _ExactPacking(self, shape, dtype, device)

    def unpack(self, saved, meta, block):
        return Stored.of(saved[0])


class CheckpointStorage(ExactStorage):
    """Recompute consecutive blocks in backward (`torch.utils.checkpoint`, non-reentrant).

    The model splits each run of consecutive checkpoint blocks into segments of
    `segment` blocks (default: round(sqrt(run length)), which balances the
    segment inputs kept in forward, about run/segment tensors, against the
    backward recompute transient, one segment's saved tensors) and wraps each
    segment in `torch.utils.checkpoint.checkpoint(use_reentrant=False)`.

    Stores: the input of every segment (counted by `MemoryMeter` like any saved
    tensor). Backward: recomputes one segment at a time, whose blocks then save
    z_prev exactly as `ExactStorage` does; that transient is registered with the
    active `MemoryMeter` (checkpoint's own hooks hide it). Every gradient is exact.

    Args:
        segment: blocks per checkpointed segment (None: round(sqrt(run length))).
    """

    name = "checkpoint"

    def __init__(self, segment: int | None = None):
        super().__init__()
        self._record_options(locals())
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
            raise ValueError(f"segment={segment!r} must be a positive int (blocks per checkpointed segment) "
                             "or None for round(sqrt(run length))")
        self.segment = segment

    def segment_length(self, run: int) -> int:
        """Blocks per segment for a run of `run` consecutive checkpoint blocks."""
        return self.segment if self.segment is not None else max(1, round(math.sqrt(run)))
