"""Files that cannot be used raise RunFileError naming the file and the problem, never h5py's errors."""

import shutil

import h5py
import numpy as np
import pytest

from pinnsketch.io import RunFileError, load, load_checkpoint, open_run


def _fails(path, match):
    for reader in (load, load_checkpoint):
        with pytest.raises(RunFileError, match=match) as info:
            reader(path)
        err = info.value
        assert str(path) in str(err) and err.path == str(path)
        assert isinstance(err, ValueError)
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no h5py traceback


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run file"):
        load(tmp_path / "nope.h5")
    _fails(tmp_path, "is a directory")


def test_empty_and_non_hdf5_files(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    _fails(tmp_path / "empty.h5", "is empty")
    (tmp_path / "text.h5").write_text("step,loss\n1,0.5\n")
    _fails(tmp_path / "text.h5", "not an HDF5 file")


def test_truncated_file(recorded_run, tmp_path):
    data = recorded_run[0].read_bytes()
    for fraction in (0.1, 0.5, 0.9):
        cut = tmp_path / f"cut{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        _fails(cut, "truncated or corrupt")


def test_corrupt_file(recorded_run, tmp_path):
    data = bytearray(recorded_run[0].read_bytes())
    rng = np.random.default_rng(0)
    # Overwrite the middle of the file (object headers, B-trees and chunks) with noise.
    start = len(data) // 4
    data[start: start + len(data) // 2] = rng.integers(0, 256, len(data) // 2, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(bytes(data))
    _fails(bad, "corrupt|damaged")


def test_hdf5_file_that_is_not_a_run(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)
    _fails(path, "not a pinnsketch run")


def test_newer_and_invalid_schema_versions(recorded_run, tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copyfile(recorded_run[0], newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = 3
    _fails(newer, "schema version 3, newer.*upgrade pinnsketch")
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = "one"
    _fails(newer, "invalid schema_version")


def test_missing_group(recorded_run, tmp_path):
    path = tmp_path / "nomodel.h5"
    shutil.copyfile(recorded_run[0], path)
    with h5py.File(path, "r+") as f:
        del f["model"]
    with pytest.raises(RunFileError, match="damaged or incomplete.*model"):
        load(path)


def test_open_run_gives_a_checked_file(recorded_run):
    with open_run(recorded_run[0]) as f:
        assert int(f.attrs["schema_version"]) == 2
        assert set(f) >= {"training", "sketch", "gradients", "model", "solution", "checkpoint"}
