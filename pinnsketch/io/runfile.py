"""One run file being written: a live working copy and atomic commits onto the final path.

Atomicity (HDF5 files cannot be appended to atomically in place):

* training appends to a **live** file ``<path>.partial`` next to ``<path>``;
* a **commit** (at the start, at every checkpoint, at the end) closes the live
  file, copies it to a temporary file in the same directory, fsyncs it and
  ``os.replace``-s it onto ``<path>``; the final commit renames the live file
  itself. ``os.replace`` is atomic on POSIX and Windows, so ``<path>`` always
  holds a complete, readable file: the one of the last commit.

A process killed mid-run therefore leaves ``<path>`` at its last checkpoint
(plus a possibly inconsistent ``<path>.partial``, the lock file and, killed during
a commit, a temporary ``.<name>.*.tmp``; the next writer of ``<path>`` replaces the
first and removes the others); resuming continues from that checkpoint. A writer
that closes, aborts or fails removes its live file, temporaries and lock.

One writer per path: a writer holds an advisory lock (``fcntl.lockf``, POSIX) on
``.<name>.lock`` next to ``<path>`` from its start to its end; a writer in another
process fails at once with :class:`RunFileLocked`, before touching any file. The lock
belongs to the process (POSIX record locks), so a writer abandoned in the same process
(an interrupted custom training loop) does not block the next one there.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from .schema import GROUPS, SCHEMA_VERSION, append_monitor_rows, json_attr, model_spec, write_monitor_sketches
from .table import Table
from .packed import write_packed

__all__ = ["RunFile", "COMPRESSIONS", "RunFileLocked", "WriteLock", "check_output_path"]

COMPRESSIONS = ("gzip", "lzf", None)


class RunFileLocked(RuntimeError):
    """Another process is writing the same run file."""


class WriteLock:
    """The advisory lock of one run file path: ``.<name>.lock`` next to it, held with ``lockf``.

    ``acquire()`` fails at once with :class:`RunFileLocked` when another process holds it. The
    lock file is removed on ``release()``; an acquirer that locked a file just unlinked by the
    previous holder notices (inode changed) and retries on the new one. Without ``fcntl``
    (Windows) it only creates the folder and does not lock.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> "WriteLock":
        try:
            import fcntl
        except ImportError:            # no advisory locks on this platform
            return self
        while self._fd is None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunFileLocked(f"{self.path} is being written by another process (lock {self.lock_path}); "
                                    "wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:                      # the previous holder removed it between our open and flock
                os.close(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still held: a waiting writer then re-opens a fresh file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any training, that a run file can be written at ``path``; returns it as a Path.

    Creates the parent folder; raises ValueError when ``path`` is a folder or ends in ``.partial``,
    PermissionError (naming the folder) when the folder is not writable, and
    :class:`RunFileLocked` when another process is writing ``path``. Leaves nothing behind.
    """
    path = Path(path)
    if path.suffix == ".partial":
        raise ValueError(f"--out {str(path)!r} ends in .partial, the suffix of live files; choose another name")
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a directory; give a file name, e.g. {str(path / 'run.h5')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create the folder {str(path.parent)!r} for --out {str(path)!r} "
                              f"({err.strerror or err}); choose a writable place") from None
    if not path.parent.is_dir():
        raise ValueError(f"--out {str(path)!r}: {str(path.parent)!r} is not a folder")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        where = path if path.exists() else path.parent
        raise PermissionError(f"cannot write --out {str(path)!r}: {str(where)!r} is not writable; choose a "
                              "writable place")
    lock = WriteLock(path).acquire()
    lock.release()
    return path


class RunFile:
    """Writes one run file; see the module docstring for the commit protocol.

    Args:
        path: the final file.
        compression: "gzip" | "lzf" | None for the datasets.
        resume: continue from the committed file at ``path`` instead of starting a new one.
    """

    def __init__(self, path: str | os.PathLike, *, compression: str | None = "gzip", resume: bool = False):
        self.path = Path(path)
        self.live = self.path.with_name(self.path.name + ".partial")
        self.compression = compression
        if self.path.is_dir():
            raise ValueError(f"{str(self.path)!r} is a directory; give the run file a name, e.g. "
                             f"{str(self.path / 'run.h5')!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = WriteLock(self.path).acquire()      # before touching any file of this path
        try:
            # A fresh inode for the live file: a writer that died without closing may still hold the old one.
            self.live.unlink(missing_ok=True)
            self._remove_stale_temporaries()
            if resume:
                shutil.copyfile(self.path, self.live)
                self._file = h5py.File(self.live, "r+")
            else:
                self._file = h5py.File(self.live, "w")
                for name in GROUPS[:4]:
                    self._file.create_group(name)
            self._open_tables()
        except BaseException:
            self.live.unlink(missing_ok=True)
            self._lock.release()
            raise

    def _remove_stale_temporaries(self) -> None:
        """Delete commit temporaries of ``path`` left by a writer killed mid-commit (one writer per path)."""
        prefix, suffix = f".{self.path.name}.", ".tmp"
        for name in os.listdir(self.path.parent):
            if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
                try:
                    (self.path.parent / name).unlink()
                except OSError:
                    pass

    # -- tables ------------------------------------------------------------------------
    def _open_tables(self) -> None:
        opts = dict(compression=self.compression)
        self.training = Table(self._file.require_group("training"), **opts)
        self.sketch = Table(self._file.require_group("sketch"), **opts)
        self.gradients = Table(self._file.require_group("gradients"), **opts)

    def flush(self) -> None:
        for table in (self.training, self.sketch, self.gradients):
            table.flush()

    @property
    def file(self) -> h5py.File:
        return self._file

    # -- content -----------------------------------------------------------------------
    def write_root(self, *, problem: str | None, storage: str | None, seed: int | None, device: str | None,
                   config: dict, kind: str) -> None:
        attrs = {"schema_version": SCHEMA_VERSION, "pinnsketch_version": __version__,
                 "torch_version": torch.__version__, "h5py_version": h5py.__version__,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "kind": kind, "problem": problem, "storage": storage, "seed": seed, "device": device,
                 "config": json_attr(config), "completed": False, "status": "running", "steps": 0}
        self.update_root(**attrs)

    def update_root(self, **attrs: Any) -> None:
        """Set root attributes; None values are left out (HDF5 attributes cannot be None)."""
        for key, value in attrs.items():
            if isinstance(value, np.generic):
                value = value.item()            # numpy str_ has no HDF5 conversion; Python str has
            if value is None:
                self._file.attrs.pop(key, None)
            else:
                self._file.attrs[key] = str(value) if isinstance(value, str) else value

    def write_model(self, model: torch.nn.Module) -> None:
        group = self._file.require_group("model")
        spec = model_spec(model)
        group.attrs.update({"class": spec["class"], "init_kwargs": json_attr(spec["init_kwargs"]),
                            "dtype": spec["dtype"], "device": spec["device"], "parameters": spec["parameters"],
                            "storage": json_attr(spec.get("storage"))})
        write_packed(group, "state", model.state_dict(), compression=self.compression)

    def append_monitor_rows(self, monitor, written: int) -> int:
        """Append the monitor's norms of steps ``written:`` to /gradients; returns the rows now written."""
        return append_monitor_rows(self.gradients, monitor, written)

    def write_monitor_sketches(self, monitor) -> None:
        write_monitor_sketches(self._file["gradients"], monitor, self.compression)

    def write_solution(self, x, prediction, reference, *, input_names=None, output_names=None) -> float | None:
        """/solution: grid x (M, d), prediction and reference (M, n_out), error = prediction - reference."""
        if "solution" in self._file:
            del self._file["solution"]
        group = self._file.create_group("solution")
        x = np.asarray(x, dtype=np.float64)
        prediction = np.asarray(prediction, dtype=np.float64)
        opts = dict(chunks=True, compression=self.compression) if self.compression else {}
        group.create_dataset("x", data=x, **opts)
        group.create_dataset("prediction", data=prediction, **opts)
        l2 = None
        if reference is not None:
            reference = np.asarray(reference, dtype=np.float64)
            group.create_dataset("reference", data=reference, **opts)
            group.create_dataset("error", data=prediction - reference, **opts)
            norm = np.linalg.norm(reference)
            l2 = float(np.linalg.norm(prediction - reference) / norm) if norm > 0 else None
            if l2 is not None:
                group.attrs["l2_relative_error"] = l2
            per = [float(np.linalg.norm(prediction[:, i] - reference[:, i]) / n) if (n := np.linalg.norm(
                reference[:, i])) > 0 else float("nan") for i in range(reference.shape[1])]
            group.attrs["l2_relative_error_per_output"] = np.asarray(per)
        if input_names is not None:
            group.attrs["input_names"] = json_attr(list(input_names))
        if output_names is not None:
            group.attrs["output_names"] = json_attr(list(output_names))
        return l2

    def write_checkpoint(self, state: dict, *, step: int, wall_time_s: float | None) -> None:
        write_packed(self._file, "checkpoint", state, compression=self.compression)
        self._file["checkpoint"].attrs.update(step=int(step), written=_now())
        if wall_time_s is not None:
            self._file["checkpoint"].attrs["wall_time_s"] = float(wall_time_s)

    # -- commits -----------------------------------------------------------------------
    def commit(self) -> None:
        """Make ``path`` a copy of the live file, atomically (see the module docstring)."""
        self.flush()
        self._file.close()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as dst, open(self.live, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)
        self._file = h5py.File(self.live, "r+")
        self._open_tables()

    def close(self) -> None:
        """Final commit: the live file becomes ``path``."""
        self.flush()
        self._file.close()
        try:
            with open(self.live, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.live, self.path)
            _fsync_dir(self.path.parent)
        finally:
            self.live.unlink(missing_ok=True)
            self._lock.release()

    def abort(self) -> None:
        """Close and remove the live file without committing (``path`` keeps the last commit)."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - already closed or broken; nothing more to save
            pass
        self.live.unlink(missing_ok=True)
        self._lock.release()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is (POSIX); not supported on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
