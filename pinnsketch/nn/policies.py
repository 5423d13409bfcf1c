"""The registry of storage policies and `make_storage`.

A policy is named by a spec: "NAME" or "NAME:KEY=VALUE,KEY=VALUE", the keys being the policy
constructor's keyword arguments ("lowrank:residual=int8,target=5e-3", "ema:beta=0.99"). The same
spec works in `solve(storage=...)`, the model constructors and `pinnsketch solve --storage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from .ema import EMAStorage
from .lowrank import LowRankStorage
from .projection import ProjectionStorage
from .storage import AbstractStorage, CheckpointStorage, ExactStorage

__all__ = ["STORAGES", "build_storage", "make_storage", "make_storages", "parse_key_values", "storage_spec"]

#: Policy name -> class; `make_storage(name)` builds one with default options.
STORAGES = MappingProxyType({
    "exact": ExactStorage,
    "checkpoint": CheckpointStorage,
    "ema": EMAStorage,
    "lowrank": LowRankStorage,
    "projection": ProjectionStorage,
})


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_key_values(text: str, where: str, example: str, what: str = "option") -> dict:
    """{KEY: value} of a spec "KEY=VALUE,KEY=VALUE" ("" gives {}).

    Values are read as int, float, true/false, none, else strings. `where` names the spec in
    errors (e.g. "--fourier 'features=16'"), `example` is a valid spec the error suggests.
    """
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"{what} {item!r} in {where} is not KEY=VALUE; write e.g. {example}")
        if key in kwargs:
            raise ValueError(f"{what} {key!r} is given twice in {where}; give it once")
        kwargs[key] = _parse_value(value)
    return kwargs


def storage_spec(spec: str) -> tuple[str, dict]:
    """(name, constructor options) of a spec "NAME" or "NAME:KEY=VALUE,...", the name checked."""
    name, _, options = spec.partition(":")
    if name not in STORAGES:
        raise ValueError(f"unknown storage policy {name!r}" + (f" in {spec!r}" if name != spec else "")
                         + f"; choose one of {sorted(STORAGES)}, optionally with options as NAME:KEY=VALUE,... "
                         "(e.g. 'lowrank:residual=int8'), or pass an AbstractStorage instance")
    return name, parse_key_values(options, repr(spec), f"{name}:rank=8", what="storage option")


def build_storage(name: str, options: dict, spec: str | None = None) -> AbstractStorage:
    """STORAGES[name](**options), a wrong option named with the spec it came from."""
    try:
        return STORAGES[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for storage {name!r} in {spec or name!r}: {err}") from err


def make_storage(storage: str | AbstractStorage) -> AbstractStorage:
    """A fresh policy: `storage` is a spec ("lowrank", "lowrank:residual=int8") or a policy object
    (cloned, unbound)."""
    if isinstance(storage, AbstractStorage):
        return storage.clone()
    if isinstance(storage, str):
        return build_storage(*storage_spec(storage), spec=storage)
    raise ValueError(f"unknown storage policy {storage!r}; pass a spec such as 'lowrank' or "
                     "'lowrank:residual=int8' (choices: " + ", ".join(sorted(STORAGES))
                     + ") or an AbstractStorage instance (e.g. LowRankStorage(target=1e-2))")


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
