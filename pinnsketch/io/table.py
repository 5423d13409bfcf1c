"""Append-only tables: rows of named scalars in resizable, chunked, compressed 1-D datasets.

One ``Table`` per HDF5 group (``/training``, ``/sketch``, ``/gradients``): every
column is a dataset ``group[column]`` of shape ``(rows,)`` and ``maxshape=(None,)``
(py-pde ``FileStorage`` style), created the first time a value for it arrives
and back-filled for earlier rows. Column names may contain ``/`` to nest
(``losses/pde``). Rows are buffered and written on :meth:`Table.flush`, so a
training step costs no HDF5 calls.

Missing values: ``NaN`` in float columns, ``-1`` in integer columns, ``""`` in
string columns. A float arriving in an integer column converts the column to
float64 (its ``-1`` fills become ``NaN``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import h5py
import numpy as np
import torch

__all__ = ["Table", "read_table"]

_STR = h5py.string_dtype()
_FILL = {"i": -1, "f": math.nan, "O": ""}


class Table:
    """Appendable columns of ``group``; the group attribute ``columns`` lists them in order."""

    def __init__(self, group: h5py.Group, *, chunk_rows: int = 1024, compression: str | None = "gzip"):
        self._group = group
        self._chunk_rows = chunk_rows
        self._compression = compression
        self._columns: list[str] = json.loads(group.attrs.get("columns", "[]"))
        self._rows = int(group.attrs.get("rows", 0))
        self._buffer: list[dict] = []

    def __len__(self) -> int:
        return self._rows + len(self._buffer)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def buffered(self) -> int:
        """Rows appended but not yet written."""
        return len(self._buffer)

    def append(self, row: Mapping[str, object]) -> None:
        """Buffer one row: column -> int | float | bool | str | 0-d tensor | None (missing)."""
        self._buffer.append({key: _scalar(key, value) for key, value in row.items()})

    def update_last(self, values: Mapping[str, object]) -> None:
        """Change columns of the last row (e.g. an evaluation made after the step was logged)."""
        if self._buffer:
            self._buffer[-1].update({key: _scalar(key, value) for key, value in values.items()})
            return
        if not self._rows:
            raise IndexError("the table has no rows to update")
        for key, value in values.items():
            value = _scalar(key, value)
            if value is None:
                continue
            if key not in self._columns:
                self._create(key, value)
            ds = self._group[key]
            if ds.dtype.kind == "i" and isinstance(value, float) and not value.is_integer():
                ds = self._promote(key)
            ds[self._rows - 1] = value

    def flush(self) -> None:
        """Write the buffered rows to the file."""
        if not self._buffer:
            return
        n, start = len(self._buffer), self._rows
        for row in self._buffer:
            for key, value in row.items():
                if value is not None and key not in self._columns:
                    self._create(key, value)
        for key in self._columns:
            ds = self._group[key]
            values = [row.get(key) for row in self._buffer]
            if ds.dtype.kind == "i" and any(isinstance(v, float) and not float(v).is_integer() for v in values):
                ds = self._promote(key)
            kind = ds.dtype.kind
            fill = _FILL[kind]
            data = [fill if v is None else v for v in values]
            ds.resize((start + n,))
            ds[start:] = np.asarray(data, dtype=_STR if kind == "O" else ds.dtype)
        self._rows = start + n
        self._group.attrs["rows"] = self._rows
        self._buffer.clear()

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` written rows (drops the buffer)."""
        self._buffer.clear()
        for key in self._columns:
            ds = self._group[key]
            ds.resize((min(rows, ds.shape[0]),))
        self._rows = min(rows, self._rows)
        self._group.attrs["rows"] = self._rows

    def truncate_after(self, step: int) -> None:
        """Keep the written rows whose ``step`` column is <= ``step`` (steps increase down the table)."""
        if "step" not in self._columns:
            return
        steps = self._group["step"][()]
        self.truncate(int((steps <= step).sum()))

    def _create(self, key: str, value) -> None:
        if isinstance(value, str):
            dtype = _STR
        elif isinstance(value, (bool, int)):
            dtype = np.int64
        else:
            dtype = np.float64
        kind = np.dtype(dtype).kind
        ds = self._group.create_dataset(
            key, shape=(self._rows,), maxshape=(None,), dtype=dtype, chunks=(self._chunk_rows,),
            compression=self._compression, shuffle=self._compression is not None, fillvalue=_FILL[kind])
        if self._rows:
            ds[:] = np.full(self._rows, _FILL[kind], dtype=object if kind == "O" else dtype)
        self._columns.append(key)
        self._group.attrs["columns"] = json.dumps(self._columns)

    def _promote(self, key: str) -> h5py.Dataset:
        old = self._group[key]
        data = old[()].astype(np.float64)
        data[data == -1] = math.nan
        attrs = dict(old.attrs)
        del self._group[key]
        ds = self._group.create_dataset(
            key, data=data, maxshape=(None,), chunks=(self._chunk_rows,), compression=self._compression,
            shuffle=self._compression is not None, fillvalue=math.nan)
        ds.attrs.update(attrs)
        return ds


def read_table(group: h5py.Group) -> dict[str, np.ndarray]:
    """All columns of a table group as numpy arrays (strings decoded), in column order."""
    out = {}
    for key in json.loads(group.attrs.get("columns", "[]")):
        ds = group[key]
        out[key] = ds.asstr()[()] if ds.dtype.kind == "O" else ds[()]
    return out


def _scalar(key: str, value):
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"table column {key!r} got {value!r} ({type(value).__name__}); "
                    "pass an int, float, bool, str, one-element tensor or None")
