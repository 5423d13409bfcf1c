"""The registry of storage policies and `make_storage`."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from .ema import EMAStorage
from .lowrank import LowRankStorage
from .projection import ProjectionStorage
from .storage import AbstractStorage, CheckpointStorage, ExactStorage

__all__ = ["STORAGES", "make_storage", "make_storages"]

#: Policy name -> class; `make_storage(name)` builds one with default options.
STORAGES = MappingProxyType({
    "exact": ExactStorage,
    "checkpoint": CheckpointStorage,
    "ema": EMAStorage,
    "lowrank": LowRankStorage,
    "projection": ProjectionStorage,
})


def make_storage(storage: str | AbstractStorage) -> AbstractStorage:
    """A fresh policy: `storage` is a name in `STORAGES` or a policy object (cloned, unbound)."""
    if isinstance(storage, AbstractStorage):
        return storage.clone()
    if isinstance(storage, str) and storage in STORAGES:
        return STORAGES[storage]()
    raise ValueError(f"unknown storage policy {storage!r}; choose one of {sorted(STORAGES)} "
                     "or pass an AbstractStorage instance (e.g. LowRankStorage(target=1e-2))")


def make_storages(storage: str | AbstractStorage | Sequence[str | AbstractStorage], n_blocks: int,
                  seed: int) -> list[AbstractStorage]:
    """One bound policy per block: a single spec is cloned, a list must have `n_blocks` entries."""
    if isinstance(storage, (str, AbstractStorage)):
        specs = [storage] * n_blocks
    elif isinstance(storage, Sequence):
        specs = list(storage)
        if len(specs) != n_blocks:
            raise ValueError(f"storage list has {len(specs)} entries but the model has {n_blocks} blocks "
                             f"(one per linear map); pass {n_blocks} policies or a single one")
    else:
        raise TypeError(f"storage must be a policy name, an AbstractStorage or a list of them, "
                        f"got {type(storage).__name__}")
    return [make_storage(spec).bind(i, seed, n_blocks) for i, spec in enumerate(specs)]
