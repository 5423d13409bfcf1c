"""Agreement of storage policies across the processes of a `torch.distributed` run.

Under multi-process training each process compresses its own shard of the points
and measures its own errors; a controller that decided from those alone could pick
different ranks on different processes. `agree` gives every process the worst
figure of all of them (a shard is one more call of the step, and the controllers
already take the worst call), so all processes decide alike. Outside a process
group of more than one process it returns its input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["agree", "distributed_active"]


def distributed_active() -> bool:
    """Whether this process belongs to an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(values: Sequence[float | None], lowest: Sequence[bool] = ()) -> list[float | None]:
    """The largest of each value over the processes (the smallest where `lowest[i]`).

    None means "not measured here" and stays None only if no process measured it. Every
    process must call it the same number of times with the same number of values (storage
    policies call it once per `advance()`). One all-reduce of len(values) float64 numbers.
    """
    if not distributed_active():
        return list(values)
    low = list(lowest) + [False] * (len(values) - len(lowest))
    flat = [(-math.inf if v is None else (-float(v) if lo else float(v))) for v, lo in zip(values, low)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.tensor(flat, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return [None if v == -math.inf else (-v if lo else v) for v, lo in zip(buf.tolist(), low)]
