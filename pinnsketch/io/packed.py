"""Nested Python containers of tensors <-> one flat HDF5 group (schema 2 checkpoints).

``write_packed(parent, name, obj)`` stores every tensor, numpy array and long numeric list
of ``obj`` as one dataset of the group ``parent[name]``, named by its dotted path in the
tree (``model.blocks.0.weight``, ``optimizer.state.3.exp_avg``, ``history.loss``), and
everything else (the nesting, scalars, short lists, strings) as one JSON text, the scalar
string dataset ``structure``. A 3,000-parameter PINN's checkpoint is then a few dozen
datasets in one group instead of thousands of nodes; ``h5ls -r`` still names each one.

JSON encoding of the structure (``$``-keys are markers; dicts are always marked, so no
user key can be mistaken for one):

| Python | JSON |
|---|---|
| dict | ``{"$dict": [[key, value], ...]}`` (int keys and order kept) |
| list / tuple | ``[...]`` / ``{"$tuple": [...]}`` |
| torch.Tensor | ``{"$tensor": dataset}``; the dataset's attribute ``dtype`` (bfloat16 as int16 bits) |
| numpy array | ``{"$ndarray": dataset}`` |
| list/tuple of >= 32 ints or floats | ``{"$ints" or "$floats": dataset, "tuple": bool}`` |
| int, float (NaN, inf too), bool, str, None | themselves (Python's JSON floats round-trip exactly) |
| bytes | ``{"$bytes": hex}`` |

Nothing is pickled: other types raise ``TypeError`` naming their place in the tree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import torch

from .tree import _TORCH_DTYPES, _attr_str

__all__ = ["write_packed", "read_packed", "PACKED_KIND"]

#: Value of the group attribute ``kind`` that marks a packed tree.
PACKED_KIND = "packed"

# Homogeneous numeric lists at least this long become datasets (histories); shorter stay in JSON.
_LIST_DATASET_MIN = 32
_COMPRESS_MIN_ELEMENTS = 4096


def write_packed(parent: h5py.Group, name: str, obj: Any, *, compression: str | None = "gzip") -> h5py.Group:
    """Store ``obj`` as the group ``parent[name]`` (replacing what is there); returns the group."""
    if name in parent:
        del parent[name]
    group = parent.create_group(name)
    try:
        used: set[str] = {"structure"}
        structure = _encode(obj, group, "", used, compression)
        group.create_dataset("structure", data=json.dumps(structure, allow_nan=True),
                             dtype=h5py.string_dtype())
        group.attrs["kind"] = PACKED_KIND
    except BaseException:
        del parent[name]                     # leave no half-written checkpoint behind
        raise
    return group


def read_packed(group: h5py.Group) -> Any:
    """The object that :func:`write_packed` stored in ``group``."""
    structure = json.loads(_attr_str(group["structure"][()]))
    return _decode(structure, group)


def _dataset_name(path: str, used: set[str]) -> str:
    base = path.replace("/", "_") or "value"
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}~{n}"
    used.add(name)
    return name


def _child(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _array(group: h5py.Group, name: str, data: np.ndarray, compression: str | None) -> h5py.Dataset:
    if data.ndim and data.size >= _COMPRESS_MIN_ELEMENTS and compression:
        return group.create_dataset(name, data=data, chunks=True, compression=compression, shuffle=True)
    return group.create_dataset(name, data=data)


def _encode(obj: Any, group: h5py.Group, path: str, used: set[str], compression: str | None):
    if isinstance(obj, Mapping):
        pairs = []
        for key, value in obj.items():
            if key is not None and not isinstance(key, (str, int, float, bool)):
                raise TypeError(f"cannot store the dict key {key!r} ({type(key).__name__}) at {path or '/'}: "
                                "keys must be str, int, float, bool or None")
            pairs.append([key, _encode(value, group, _child(path, key), used, compression)])
        return {"$dict": pairs}
    if isinstance(obj, (list, tuple, torch.Size)):
        is_tuple = not isinstance(obj, list)
        if len(obj) >= _LIST_DATASET_MIN:
            for kind, typ, dtype in (("$ints", int, np.int64), ("$floats", float, np.float64)):
                if all(type(v) is typ for v in obj):
                    try:
                        data = np.asarray(obj, dtype=dtype)
                    except OverflowError:      # ints beyond int64 stay in JSON
                        break
                    name = _dataset_name(path, used)
                    _array(group, name, data, compression)
                    return {kind: name, "tuple": is_tuple}
        items = [_encode(v, group, _child(path, i), used, compression) for i, v in enumerate(obj)]
        return {"$tuple": items} if is_tuple else items
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = _dataset_name(path, used)
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        _array(group, name, data, compression).attrs["dtype"] = str(t.dtype)
        return {"$tensor": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"cannot store a numpy array of dtype {obj.dtype} at {path}: only numeric arrays")
        name = _dataset_name(path, used)
        _array(group, name, obj, compression)
        return {"$ndarray": name}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": bytes(obj).hex()}
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'}: supported are dicts, lists, tuples, "
                    "tensors, numpy arrays, int, float, bool, str, bytes and None")


def _decode(node: Any, group: h5py.Group):
    if isinstance(node, list):
        return [_decode(v, group) for v in node]
    if not isinstance(node, dict):
        return node
    if "$dict" in node:
        return {key: _decode(value, group) for key, value in node["$dict"]}
    if "$tuple" in node:
        return tuple(_decode(v, group) for v in node["$tuple"])
    if "$tensor" in node:
        ds = group[node["$tensor"]]
        dtype = _TORCH_DTYPES[_attr_str(ds.attrs["dtype"])]
        data = np.array(ds[()], copy=True)
        if dtype == torch.bfloat16:
            return torch.from_numpy(data).view(torch.bfloat16)
        return torch.from_numpy(data).to(dtype)
    if "$ndarray" in node:
        return np.array(group[node["$ndarray"]][()], copy=True)
    for kind, typ in (("$ints", int), ("$floats", float)):
        if kind in node:
            items = [typ(v) for v in group[node[kind]][()].tolist()]
            return tuple(items) if node["tuple"] else items
    if "$bytes" in node:
        return bytes.fromhex(node["$bytes"])
    raise ValueError(f"unknown node {sorted(node)} in the checkpoint structure of {group.name}")
