"""How the fused Functions split the points of a call into row chunks.

Chunks trade memory for kernel launches: every chunk costs a few dozen small
operations per block. On a GPU a chunk per block is launch-bound (measured on
an H200: 1,024-row chunks, 32 per block at 32,768 points, made the jet step
12x slower than nested autograd), so there a call is one chunk unless a chunk
tensor would exceed a fraction of device memory. On a CPU the chunk is a few
MiB per tensor: the per-chunk overhead stays a few percent of a step, and the
transients of one chunk stay far below what the policies store.
"""

from __future__ import annotations

import torch

__all__ = ["row_chunks", "default_chunk_bytes", "CPU_CHUNK_BYTES", "CUDA_CHUNK_FRACTION"]

#: Bytes per chunk tensor (S, rows, width) on the CPU: 2 MiB (512 rows of a 4-stream jet 256 wide in float32).
CPU_CHUNK_BYTES = 2 << 20
#: On CUDA (and other accelerators) a chunk tensor may take this fraction of the device's memory.
CUDA_CHUNK_FRACTION = 1 / 16


def default_chunk_bytes(device: torch.device | str) -> int:
    """Bytes one chunk tensor (S, rows, width) may take on `device` when the model does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory * CUDA_CHUNK_FRACTION)
    return CPU_CHUNK_BYTES


def row_chunks(n: int, row_bytes: int, chunk_bytes: int) -> list[slice]:
    """Row slices of at most `chunk_bytes` each (at least one row); [slice(0, n)] when all rows fit.

    n: rows of the call; row_bytes: bytes of one row of the widest chunk tensor (S * width * itemsize).
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes per chunk tensor) "
                         "or None for the device default")
    step = max(1, chunk_bytes // max(1, row_bytes))
    if step >= n:
        return [slice(0, n)]
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]
