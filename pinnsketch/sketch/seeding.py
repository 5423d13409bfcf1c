"""Deterministic seed derivation and local generators.

Nothing here reads or sets the global torch RNG: random test matrices are
drawn from a local :class:`torch.Generator` seeded from an integer, and
independent streams (one per test matrix, per block, per training step) get
their own integer via :func:`derive_seed`.
"""

from __future__ import annotations

import hashlib

import torch

from ._checks import check_device, check_seed

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any number of int/str keys.

    Deterministic across processes and platforms (BLAKE2b of the keys), so
    ``derive_seed(seed, "omega")`` and ``derive_seed(seed, "layer", 3, step)``
    give independent, reproducible streams.
    """
    seed = check_seed(seed)
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"derive_seed keys must be int or str, got {key!r} ({type(key).__name__})")
    digest = hashlib.blake2b(repr((seed,) + keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A fresh :class:`torch.Generator` on ``device`` seeded with ``seed``.

    CPU and CUDA generators produce different streams from the same seed, so a
    test matrix is reproducible for a given (seed, dtype, device).
    """
    gen = torch.Generator(device=check_device(device))
    gen.manual_seed(check_seed(seed))
    return gen
