"""Append-only tables: lazy columns, back-filling, missing values, promotion, truncation."""

import math

import h5py
import numpy as np
import pytest
import torch

from pinnsketch.io.table import Table, read_table


def test_columns_appear_backfilled_and_missing_values_are_marked(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        t = Table(f.create_group("g"), chunk_rows=4)
        t.append({"step": 1, "loss": 0.5, "phase": "adam", "rank": None})
        t.append({"step": 2, "loss": torch.tensor(0.25), "phase": "adam"})
        t.flush()
        t.append({"step": 3, "loss": np.float32(0.125), "phase": "lbfgs", "rank": 4, "losses/pde": 1.0})
        assert len(t) == 3 and t.buffered == 1
        t.flush()
        assert f["g/step"].maxshape == (None,) and f["g/step"].chunks == (4,)
        assert f["g/step"].compression == "gzip"
        cols = read_table(f["g"])
    assert list(cols) == ["step", "loss", "phase", "rank", "losses/pde"]
    assert cols["step"].tolist() == [1, 2, 3]
    assert cols["loss"].tolist() == [0.5, 0.25, 0.125]
    assert cols["phase"].tolist() == ["adam", "adam", "lbfgs"]
    assert cols["rank"].tolist() == [-1, -1, 4]                 # ints: -1 marks missing
    assert np.isnan(cols["losses/pde"][:2]).all() and cols["losses/pde"][2] == 1.0


def test_int_column_promotes_to_float_and_table_reopens(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        t = Table(f.create_group("g"))
        t.append({"step": 1, "x": 3})
        t.append({"step": 2, "x": None})
        t.flush()
        t.append({"step": 3, "x": 2.5})
        t.flush()
    with h5py.File(tmp_path / "t.h5", "r+") as f:
        t = Table(f["g"])                      # picks up columns and row count from the file
        assert len(t) == 3 and t.columns == ["step", "x"]
        t.append({"step": 4, "x": 1.0})
        t.flush()
        x = read_table(f["g"])["x"]
    assert x.dtype == np.float64
    assert x[0] == 3 and math.isnan(x[1]) and x[2:].tolist() == [2.5, 1.0]


def test_truncate_after_and_update_last(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        t = Table(f.create_group("g"))
        for s in range(1, 8):
            t.append({"step": s, "v": float(s)})
        t.flush()
        t.truncate_after(4)
        t.update_last({"v": -1.0, "new": 9.5})
        t.append({"step": 5, "v": 5.0})
        t.update_last({"v": 50.0})             # still buffered
        t.flush()
        cols = read_table(f["g"])
    assert cols["step"].tolist() == [1, 2, 3, 4, 5]
    assert cols["v"].tolist() == [1.0, 2.0, 3.0, -1.0, 50.0]
    assert np.isnan(cols["new"][[0, 1, 2, 4]]).all() and cols["new"][3] == 9.5


def test_bad_values_are_rejected(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        t = Table(f.create_group("g"))
        with pytest.raises(TypeError, match="column 'v'"):
            t.append({"v": [1, 2]})
