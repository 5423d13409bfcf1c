"""Multi-process training with `torch.distributed`: one process per device, launched by torchrun.

    torchrun --nproc_per_node=2 -m pinnsketch solve burgers --out burgers.h5
    torchrun --nproc_per_node=2 train.py          # a script that calls ps.solve(...)

`solve` (and `train_classifier`) detect the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run as one rank of a process group (NCCL on CUDA
with one device per process, gloo on the CPU). The first solve of a process creates the
group, with `Distributed.timeout_s`, unless the caller created one; later solves use it.

What is sharded, and why the objective is exact. Every rank draws the same global point
sets from the same seed (`CollocationPoints`), then keeps every `world_size`-th point of
each set (`Group.shard_sets`); a set with fewer points than ranks is kept whole on every
rank. A loss term is a mean over its set; a rank's contribution is the mean over its
shard times its share of the set (sum over its shard / global count; a whole set counts
1/world_size on each rank), so the SUM over ranks is the single-process full-batch term.
Each rank backpropagates its contribution and one all-reduce (SUM) of [loss, terms,
gradients] (`Group.reduce_step`) leaves every rank with the global loss and gradient:
the optimizers take identical steps and the parameters never drift apart
(`Distributed(check_every=N)` verifies it). L-BFGS's closure returns the reduced loss,
so its line search sees the global objective. Resampling and residual-based refinement
draw from the run's generator on every rank alike; refinement scores its candidates
shard by shard and all-gathers the scores (`Group.gather_rows`), so every rank adds the
same points.

Storage policies compress each rank's own shard; their rank controllers read figures
agreed across ranks (`agree`), so every rank keeps the same ranks and bits.

Only rank 0 runs callbacks (the run file writer) and the progress bar; their stop flags
are broadcast after every step. Failures: a rank that raises exits; torchrun's agent
then stops the others, and without an agent a collective waiting for a dead rank fails
after `Distributed.timeout_s` (gloo also fails at once when the peer's socket closes).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..nn.collective import agree, distributed_active

__all__ = ["Distributed", "Group", "session", "launched", "env_rank", "agree", "BACKENDS"]

BACKENDS = ("gloo", "nccl")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """Options of multi-process training (`solve(..., distributed=ps.Distributed(...))`).

    Args:
        timeout_s: how long a collective waits for the other ranks before it fails (a dead
            or stuck rank ends the job after at most this long; torchrun's agent usually
            ends it sooner).
        check_every: debug mode: every N steps compare the parameters of all ranks and
            raise if they differ (0: never).
        backend: "gloo" or "nccl"; None: NCCL on CUDA, gloo on the CPU.
    """

    timeout_s: float = 300.0
    check_every: int = 0
    backend: str | None = None

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"Distributed timeout_s={self.timeout_s!r} must be a positive number of seconds")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 0:
            raise ValueError(f"Distributed check_every={self.check_every!r} must be an int >= 0 (0: no checks)")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"Distributed backend={self.backend!r} is not one of {BACKENDS} (or None: by device)")

    def config(self) -> dict:
        return {"timeout_s": self.timeout_s, "check_every": self.check_every, "backend": self.backend}


def launched() -> bool:
    """Whether this process is one of several ranks: a process group of size > 1 exists,
    or a launcher (torchrun) set WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def env_rank() -> int:
    """This process's rank (0 when not launched as one of several)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


_active = distributed_active


def _all_gather(out: torch.Tensor, mine: torch.Tensor) -> None:
    # all_gather_single is the newer name (torch 2.13 deprecates all_gather_into_tensor)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, mine)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Group:
    """This process's place in the process group, and the collectives of a solve.

    Attributes: rank, world_size, local_rank, backend, device (the training device:
    cuda:LOCAL_RANK for CUDA runs), options (`Distributed`).
    """

    def __init__(self, options: Distributed, device: torch.device):
        self.options = options
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = dist.get_backend()
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        self.device = device
        self.comm_device = _comm_device()
        self._checked = 0  # parameter checks done (check_every)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def config(self) -> dict:
        return {**self.options.config(), "world_size": self.world_size, "backend": self.backend}

    # --- points -------------------------------------------------------------------------
    def _units(self, n: int) -> np.ndarray | None:
        """This rank's units of a set of n: every world_size-th; None: keep the set whole."""
        if n < self.world_size:
            return None
        return np.arange(self.rank, n, self.world_size)

    def shard_sets(self, parts: Sequence[np.ndarray], extras: Sequence[dict], paired: Sequence[bool]
                   ) -> tuple[list[np.ndarray], list[dict], list[float]]:
        """This rank's rows of each point set: (parts, extras, share of each set).

        parts[0] is the interior, then one set per condition with its extras (per-point
        arrays, extras[i - 1] for parts[i]). A set with paired[i] (`Periodic`) holds n points
        then their n images; pairs stay together.
        """
        out_parts, out_extras, shares = [], [], []
        for i, x in enumerate(parts):
            n = len(x) // 2 if paired[i] else len(x)
            units = self._units(n)
            if units is None:
                rows, share = None, 1.0 / self.world_size
            else:
                rows = np.concatenate([units, units + n]) if paired[i] else units
                share = len(units) / n
            out_parts.append(x if rows is None else x[rows])
            if i:
                extra = extras[i - 1]
                out_extras.append(extra if rows is None else {k: np.asarray(v)[rows] for k, v in extra.items()})
            shares.append(share)
        return out_parts, out_extras, shares

    def gather_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """`fn` (M, d) -> (M,) computed shard by shard: each rank evaluates a contiguous block
        of the rows, and all-gather returns the whole (M,) array on every rank."""

        def gathered(x: np.ndarray) -> np.ndarray:
            m, w = len(x), self.world_size
            size = -(-m // w)
            lo, hi = min(self.rank * size, m), min((self.rank + 1) * size, m)
            mine = torch.zeros(size, dtype=torch.float64, device=self.comm_device)
            if hi > lo:
                mine[:hi - lo] = torch.as_tensor(np.asarray(fn(x[lo:hi]), dtype=np.float64))
            full = torch.empty(size * w, dtype=torch.float64, device=self.comm_device)
            _all_gather(full, mine)
            return full[:m].cpu().numpy()

        return gathered

    # --- the step -----------------------------------------------------------------------
    def reduce_step(self, loss: torch.Tensor, terms: torch.Tensor, params: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[float]]:
        """Sum this rank's [loss, terms (T,), gradients] over the ranks in one all-reduce.

        The gradients in p.grad become the global ones (a parameter without a gradient on
        every rank keeps None); returns the global loss (a 0-d tensor) and [loss, *terms].
        """
        dtype = loss.dtype
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        grads = [p.grad for p in params]
        pieces = [loss.detach().reshape(1).to(dtype), terms.detach().reshape(-1).to(dtype),
                  torch.tensor([g is not None for g in grads], dtype=dtype, device=loss.device)]
        pieces += [(torch.zeros_like(p) if g is None else g).reshape(-1).to(dtype) for p, g in zip(params, grads)]
        buf = torch.cat(pieces).to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.to(loss.device)
        n_terms = terms.numel()
        head = buf[:1 + n_terms]
        has = buf[1 + n_terms:1 + n_terms + len(params)].tolist()
        pos = 1 + n_terms + len(params)
        for p, flag in zip(params, has):
            k = p.numel()
            if flag > 0:
                p.grad = buf[pos:pos + k].view_as(p).to(p.dtype).clone()
            pos += k
        return head[0].to(loss.dtype), head.tolist()

    def after_step(self, state, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's stop flags (its callbacks ran) to every rank; the debug drift check."""
        flags = torch.tensor([state.stop_phase, state.stop_training], dtype=torch.int32, device=self.comm_device)
        dist.broadcast(flags, src=0)
        state.stop_phase, state.stop_training = (bool(v) for v in flags.tolist())
        every = self.options.check_every
        if every and state.step // every > self._checked:
            self._checked = state.step // every
            self.check_parameters(params, state.step)

    def check_parameters(self, params: Sequence[torch.Tensor], step: int) -> float:
        """Raise RuntimeError if the ranks' parameters differ; returns the largest difference (0.0)."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in params]).to(self.comm_device)
        both = torch.cat([flat, -flat])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        spread = float((both[:len(flat)] + both[len(flat):]).max()) if len(flat) else 0.0
        if spread != 0.0:
            raise RuntimeError(f"the parameters of the {self.world_size} ranks differ by up to {spread:.3g} at step "
                               f"{step}: the ranks no longer take the same steps (a rank-dependent computation "
                               "outside the all-reduced loss?); rerun with Distributed(check_every=1) to find the step")
        return spread

    def gather_ints(self, values: Sequence[int | None]) -> list[list[int | None]]:
        """values[j] of every rank: out[j][r] (None where a rank has none)."""
        mine = torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.int64, device=self.comm_device)
        full = torch.empty(len(values) * self.world_size, dtype=torch.int64, device=self.comm_device)
        _all_gather(full, mine)
        rows = full.view(self.world_size, len(values)).cpu().tolist()
        return [[None if r[j] < 0 else r[j] for r in rows] for j in range(len(values))]


def _backend(options: Distributed, device: torch.device) -> str:
    if options.backend is not None:
        return options.backend
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(option, device: torch.device) -> Iterator[Group | None]:
    """The process group of one solve: yields a `Group`, or None for a single-process run.

    option: None or a `Distributed` (join when launched as one of several ranks, else
    run alone), True (always join: an error without the launcher's environment), False
    (never). Creates the process group (env:// rendezvous, `timeout_s`) when none exists
    and keeps it for the rest of the process (destroyed at exit): later solves use it as
    it is. Destroying and re-creating the default group on the launcher's store would
    reuse the first group's rendezvous keys.
    """
    if not (option is None or isinstance(option, (bool, Distributed))):
        raise TypeError(f"distributed={option!r} must be None (auto), True, False or a ps.Distributed(...)")
    if option is False or (option is not True and not launched()):
        yield None
        return
    options = option if isinstance(option, Distributed) else Distributed()
    if not dist.is_initialized():
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise ValueError(f"distributed training needs the launcher's environment; {missing} are not set. Launch "
                             "with `torchrun --nproc_per_node=K script.py` (or set RANK, WORLD_SIZE, MASTER_ADDR, "
                             "MASTER_PORT), or pass distributed=False")
        backend = _backend(options, device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=options.timeout_s))
        atexit.register(_destroy)
    elif dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())) % max(torch.cuda.device_count(), 1))
    yield Group(options, device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
