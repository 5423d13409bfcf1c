"""Nested Python containers of tensors <-> HDF5 groups (checkpoints, model weights).

``write_tree(group, name, obj)`` stores dicts as groups, tensors and arrays as
datasets and Python scalars as scalar datasets, so that any HDF5 tool shows a
checkpoint as a readable tree (``/checkpoint/state/model/blocks.0.weight``)
instead of an opaque pickle. Every node carries an attribute ``kind`` that
``read_tree`` uses to rebuild the exact Python object:

| kind | Python | HDF5 |
|---|---|---|
| dict | dict (any JSON-able keys, order kept) | group; attr ``keys``: JSON list of [child name, key] |
| list, tuple | list / tuple | group with children "0", "1", ... |
| ints, floats, strs | list/tuple of only Python ints (int64) / floats / strs | 1-D dataset; attr ``container`` |
| tensor | torch.Tensor (returned on CPU) | dataset; attr ``dtype`` (bfloat16 stored as its int16 bits) |
| ndarray | numpy.ndarray | dataset |
| int, float, bool, str, bytes, none, bigint | Python scalar | scalar dataset (bigint: decimal string) |

Nothing is pickled: an object of any other type raises ``TypeError`` naming
its place in the tree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import torch

__all__ = ["write_tree", "read_tree"]

_INT64 = (-(2**63), 2**63 - 1)
# Arrays at least this large are chunked and compressed; smaller ones are stored contiguously.
_COMPRESS_MIN_ELEMENTS = 4096
_TORCH_DTYPES = {str(d): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
)}


def write_tree(group: h5py.Group, name: str, obj: Any, *, compression: str | None = "gzip") -> None:
    """Store ``obj`` as ``group[name]`` (replacing what is there)."""
    if name in group:
        del group[name]
    try:
        _write(group, name, obj, compression, where=f"{group.name.rstrip('/')}/{name}")
    except BaseException:
        if name in group:                  # leave no half-written node behind
            del group[name]
        raise


def read_tree(node: h5py.Group | h5py.Dataset) -> Any:
    """The object that :func:`write_tree` stored at ``node``."""
    kind = _attr_str(node.attrs.get("kind", ""))
    if kind == "dict":
        pairs = json.loads(_attr_str(node.attrs["keys"]))
        return {key: read_tree(node[child]) for child, key in pairs}
    if kind in ("list", "tuple"):
        items = [read_tree(node[str(i)]) for i in range(int(node.attrs["length"]))]
        return items if kind == "list" else tuple(items)
    if kind in ("ints", "floats", "strs"):
        items = (list(node.asstr()[()]) if kind == "strs"
                 else [(int if kind == "ints" else float)(v) for v in node[()]])
        return items if _attr_str(node.attrs["container"]) == "list" else tuple(items)
    if kind == "tensor":
        dtype = _TORCH_DTYPES[_attr_str(node.attrs["dtype"])]
        data = np.asarray(node[()])
        if dtype == torch.bfloat16:
            return torch.from_numpy(data.copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(data, copy=True)).to(dtype)
    if kind == "ndarray":
        return np.array(node[()], copy=True)
    if kind == "int":
        return int(node[()])
    if kind == "bigint":
        return int(_attr_str(node[()]))
    if kind == "float":
        return float(node[()])
    if kind == "bool":
        return bool(node[()])
    if kind == "str":
        return _attr_str(node[()])
    if kind == "bytes":
        return bytes(np.asarray(node[()], dtype=np.uint8))
    if kind == "none":
        return None
    raise ValueError(f"HDF5 node {node.name} has unknown kind {kind!r}; it was not written by write_tree")


def _write(group: h5py.Group, name: str, obj: Any, compression: str | None, where: str) -> None:
    if isinstance(obj, Mapping):
        sub = group.create_group(name)
        sub.attrs["kind"] = "dict"
        pairs, used = [], set()
        for i, (key, value) in enumerate(obj.items()):
            if key is not None and not isinstance(key, (str, int, float, bool)):
                raise TypeError(f"cannot store the dict key {key!r} ({type(key).__name__}) at {where}: "
                                "keys must be str, int, float, bool or None")
            child = key if _plain_name(key) and key not in used else f"_{i}"
            used.add(child)
            pairs.append([child, key])
            _write(sub, child, value, compression, f"{where}/{child}")
        sub.attrs["keys"] = json.dumps(pairs)
    elif isinstance(obj, (list, tuple, torch.Size)):
        container = "list" if isinstance(obj, list) else "tuple"
        if obj and all(type(v) is int and _INT64[0] <= v <= _INT64[1] for v in obj):
            ds = group.create_dataset(name, data=np.asarray(obj, dtype=np.int64))
            ds.attrs.update(kind="ints", container=container)
        elif obj and all(type(v) is float for v in obj):
            ds = group.create_dataset(name, data=np.asarray(obj, dtype=np.float64))
            ds.attrs.update(kind="floats", container=container)
        elif obj and all(type(v) is str for v in obj):
            ds = group.create_dataset(name, data=np.asarray(obj, dtype=object), dtype=h5py.string_dtype())
            ds.attrs.update(kind="strs", container=container)
        else:
            sub = group.create_group(name)
            sub.attrs.update(kind=container, length=len(obj))
            for i, value in enumerate(obj):
                _write(sub, str(i), value, compression, f"{where}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        ds = _array(group, name, data, compression)
        ds.attrs.update(kind="tensor", dtype=str(t.dtype))
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"cannot store a numpy array of dtype {obj.dtype} at {where}: only numeric arrays")
        _array(group, name, obj, compression).attrs["kind"] = "ndarray"
    elif obj is None:
        group.create_dataset(name, data=h5py.Empty("i1")).attrs["kind"] = "none"
    elif isinstance(obj, (bool, np.bool_)):
        group.create_dataset(name, data=np.bool_(obj)).attrs["kind"] = "bool"
    elif isinstance(obj, (int, np.integer)):
        if _INT64[0] <= int(obj) <= _INT64[1]:
            group.create_dataset(name, data=np.int64(obj)).attrs["kind"] = "int"
        else:
            group.create_dataset(name, data=str(int(obj))).attrs["kind"] = "bigint"
    elif isinstance(obj, (float, np.floating)):
        group.create_dataset(name, data=np.float64(obj)).attrs["kind"] = "float"
    elif isinstance(obj, str):
        group.create_dataset(name, data=str(obj)).attrs["kind"] = "str"
    elif isinstance(obj, (bytes, bytearray)):
        group.create_dataset(name, data=np.frombuffer(bytes(obj), dtype=np.uint8)).attrs["kind"] = "bytes"
    else:
        raise TypeError(f"cannot store {type(obj).__name__} at {where}: supported are dicts, lists, tuples, "
                        "tensors, numpy arrays, int, float, bool, str, bytes and None")


def _array(group: h5py.Group, name: str, data: np.ndarray, compression: str | None) -> h5py.Dataset:
    if data.ndim and data.size >= _COMPRESS_MIN_ELEMENTS and compression:
        return group.create_dataset(name, data=data, chunks=True, compression=compression, shuffle=True)
    return group.create_dataset(name, data=data)


def _plain_name(key) -> bool:
    # A str key usable verbatim as an HDF5 link name (numbered names are reserved for the fallback).
    return isinstance(key, str) and key not in ("", ".") and "/" not in key and not key.startswith("_")


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
