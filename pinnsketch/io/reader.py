"""Read run files: `load(path)` -> `Run`, `load_checkpoint(path)` -> resume state.

Every problem with the file (missing, not HDF5, truncated, corrupt, not a
pinnsketch run, newer schema) raises :class:`RunFileError` naming the file
and the problem, never an h5py traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from .errors import RunFileError
from .schema import SCHEMA_VERSION, build_model, read_attrs, read_monitor_state
from .table import read_table
from .packed import PACKED_KIND, read_packed
from .tree import read_tree

__all__ = ["load", "load_checkpoint", "open_run", "Run", "Solution"]

# What h5py/HDF5 raise for damaged files and objects.
_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, json.JSONDecodeError)


@contextlib.contextmanager
def open_run(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a run file read-only after checking it is a readable pinnsketch run of a known schema."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run file")
    if path.is_dir():
        raise RunFileError(path, "is a directory, not a run file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise RunFileError(path, f"cannot be read ({err.strerror or err})") from None
    if not is_hdf5:
        size = path.stat().st_size
        what = "is empty" if size == 0 else "is not an HDF5 file (no HDF5 signature; truncated or another format)"
        raise RunFileError(path, f"{what}; pinnsketch run files are HDF5")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise RunFileError(path, f"is truncated or corrupt: HDF5 cannot open it ({_short(err)})") from None
    try:
        version = f.attrs.get("schema_version")
        if version is None:
            raise RunFileError(path, "is an HDF5 file but not a pinnsketch run (no 'schema_version' root attribute)")
        try:
            version = int(version)
        except (TypeError, ValueError):
            raise RunFileError(path, f"has an invalid schema_version {version!r}") from None
        if version > SCHEMA_VERSION:
            raise RunFileError(path, f"has schema version {version}, newer than pinnsketch "
                                     f"{__version__} reads (up to {SCHEMA_VERSION}); upgrade pinnsketch")
        if version < 1:
            raise RunFileError(path, f"has an invalid schema_version {version} (versions start at 1)")
        yield f
    finally:
        f.close()


@dataclass(frozen=True)
class Solution:
    """/solution: grid x (M, d); prediction, reference, error = prediction - reference (M, n_out)."""

    x: np.ndarray
    prediction: np.ndarray
    reference: np.ndarray | None
    error: np.ndarray | None
    l2_relative_error: float | None
    input_names: list[str] | None
    output_names: list[str] | None


class Run:
    """A run read from an HDF5 file by :func:`load`.

    Attributes:
        path, schema_version, attrs (root attributes), config (dict).
        training: column -> array ("step", "phase", "loss", "losses/<term>", "lr", "wall_time_s",
            "l2_relative_error" (NaN when not evaluated), "saved_bytes_peak", "step_peak_bytes" (-1 when unknown)).
        sketch: column -> array ("step", "layer_<i>/rank", "layer_<i>/error_estimate", ...).
        gradient_norms: layer -> (T,) exact norms, gradient_steps (T,), or empty without a monitor.
        solution: a :class:`Solution` or None.
        model_spec: class, constructor kwargs, dtype; checkpoint_step: step of /checkpoint or None.
    """

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self.attrs = read_attrs(f)
        self.schema_version = int(self.attrs["schema_version"])
        self.config = json.loads(self.attrs.get("config", "{}"))
        self.training = _table(f, "training")
        self.sketch = _table(f, "sketch")
        self._gradients_attrs = read_attrs(f["gradients"]) if "gradients" in f else {}
        self._monitor_state = (read_monitor_state(f["gradients"])
                               if "windows" in self._gradients_attrs else None)
        self.solution = _solution(f["solution"]) if "solution" in f else None
        if "model" not in f or "state" not in f["model"]:
            raise KeyError("/model/state is missing")
        model_attrs = read_attrs(f["model"])
        self.model_spec = {"class": model_attrs.get("class"), "init_kwargs": json.loads(model_attrs.get(
            "init_kwargs", "null")), "dtype": model_attrs.get("dtype"), "parameters": model_attrs.get("parameters"),
            "storage": json.loads(model_attrs.get("storage", "null"))}
        self.model_state = _read_nested(f["model"]["state"])
        self.checkpoint_step = int(f["checkpoint"].attrs["step"]) if "checkpoint" in f else None

    def __repr__(self) -> str:
        l2 = self.l2_relative_error
        return (f"Run({str(self.path)!r}, problem={self.problem!r}, storage={self.storage!r}, steps={self.steps}, "
                f"l2_relative_error={'n/a' if l2 is None else f'{l2:.3e}'}, completed={self.completed})")

    # -- root attributes -----------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        return self.attrs.get("problem")

    @property
    def storage(self) -> str | None:
        return self.attrs.get("storage")

    @property
    def seed(self) -> int | None:
        return self.attrs.get("seed")

    @property
    def device(self) -> str | None:
        return self.attrs.get("device")

    @property
    def steps(self) -> int:
        return int(self.attrs.get("steps", 0))

    @property
    def completed(self) -> bool:
        return bool(self.attrs.get("completed", False))

    @property
    def wall_time_s(self) -> float | None:
        return _finite(self.attrs.get("wall_time_s"))

    @property
    def saved_bytes_peak(self) -> int | None:
        value = self.attrs.get("saved_bytes_peak")
        return None if value is None else int(value)

    @property
    def step_peak_bytes(self) -> int | None:
        """Peak of all live tensor bytes of a metered step above its start (None in older files)."""
        value = self.attrs.get("step_peak_bytes")
        return None if value is None else int(value)

    @property
    def l2_relative_error(self) -> float | None:
        """Final relative L2 error: root attribute, else /solution, else the last evaluated one."""
        value = _finite(self.attrs.get("l2_relative_error"))
        if value is None and self.solution is not None:
            value = self.solution.l2_relative_error
        if value is None and "l2_relative_error" in self.training:
            seen = self.training["l2_relative_error"][~np.isnan(self.training["l2_relative_error"])]
            value = float(seen[-1]) if seen.size else None
        return value

    # -- histories -----------------------------------------------------------------------
    @property
    def losses(self) -> dict[str, np.ndarray]:
        """Loss term -> values per logged step."""
        return {k.split("/", 1)[1]: v for k, v in self.training.items() if k.startswith("losses/")}

    @property
    def sketch_layers(self) -> dict[str, dict[str, np.ndarray]]:
        """Layer ("layer_0", ...) -> column -> values per row of /sketch (steps in ``sketch["step"]``)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, values in self.sketch.items():
            if "/" in key:
                layer, column = key.split("/", 1)
                out.setdefault(layer, {})[column] = values
        return out

    @property
    def gradient_steps(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64) if self._monitor_state is None else self._monitor_state["steps"].numpy()

    @property
    def gradient_norms(self) -> dict[str, np.ndarray]:
        if self._monitor_state is None:
            return {}
        norms = self._monitor_state["norms"].numpy()
        return {name: norms[:, i] for i, name in enumerate(self._monitor_state["layers"])}

    @property
    def gradient_memory(self) -> dict[str, Any] | None:
        """monitor_bytes, full_history_bytes, memory_reduction of the stored gradient monitor."""
        if self._monitor_state is None:
            return None
        return {k: self._gradients_attrs.get(k) for k in ("monitor_bytes", "full_history_bytes", "memory_reduction")}

    def monitor(self):
        """The stored :class:`~pinnsketch.monitor.GradientMonitor` (no parameters bound): reconstruct
        past gradients, cosines, subspaces from the file."""
        from ..monitor import GradientMonitor

        if self._monitor_state is None:
            raise ValueError(f"{self.path} has no gradient monitor; record one with RunWriter(monitor=...)")
        return GradientMonitor.from_state_dict(self._monitor_state)

    # -- model -----------------------------------------------------------------------------
    @cached_property
    def model(self) -> torch.nn.Module:
        """The network rebuilt from /model (exact storage, CPU, eval mode) with the stored weights."""
        module = build_model(self.model_spec)
        self.load_weights(module)
        return module.eval()

    def load_weights(self, module: torch.nn.Module) -> torch.nn.Module:
        """Load the stored weights into ``module`` (for models the file cannot rebuild itself)."""
        try:
            module.load_state_dict(self.model_state)
        except RuntimeError as err:
            raise ValueError(f"the weights in {self.path} do not fit {type(module).__name__}: {err}") from None
        return module

    @torch.no_grad()
    def predict(self, x) -> np.ndarray:
        """Outputs (M, n_out) of the rebuilt model at x (M, d) (no output transform applied)."""
        param = next(self.model.parameters())
        xt = torch.as_tensor(np.asarray(x), dtype=param.dtype)
        return self.model(xt).double().numpy()

    def checkpoint(self) -> dict:
        """The stored resume state (``solve(resume=...)``); see :func:`load_checkpoint`."""
        return load_checkpoint(self.path)

    def summary(self) -> dict[str, Any]:
        """The key facts as a JSON-able dict (what ``pinnsketch inspect --json`` prints)."""
        from .summary import summarize

        return summarize(self)


def load(path: str | os.PathLike) -> Run:
    """Read the run file at ``path`` (solution, histories, config, model)."""
    path = Path(path)
    with open_run(path) as f:
        try:
            return Run(path, f)
        except RunFileError:
            raise
        except _H5_ERRORS as err:
            raise RunFileError(path, f"is damaged or incomplete: {_short(err)}") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The resume state in /checkpoint: pass it to ``solve(..., resume=...)`` (tensors on CPU)."""
    path = Path(path)
    with open_run(path) as f:
        if "checkpoint" not in f:
            raise RunFileError(path, "has no checkpoint (the run was stopped before its first one); "
                                     "start it again without resume")
        try:
            return _read_nested(f["checkpoint"])
        except _H5_ERRORS as err:
            raise RunFileError(path, f"has a damaged checkpoint: {_short(err)}") from None


# -- helpers ---------------------------------------------------------------------------------
def _read_nested(node: h5py.Group):
    """A stored state: packed (schema 2, ``pinnsketch.io.packed``) or a tree of groups (schema 1)."""
    return read_packed(node) if read_attrs(node).get("kind") == PACKED_KIND else read_tree(node)


def _table(f: h5py.File, name: str) -> dict[str, np.ndarray]:
    if name not in f:
        raise KeyError(f"/{name} is missing")
    return read_table(f[name])


def _solution(group: h5py.Group) -> Solution:
    attrs = read_attrs(group)
    get = (lambda key: np.array(group[key][()]) if key in group else None)
    names = (lambda key: json.loads(attrs[key]) if key in attrs else None)
    return Solution(x=get("x"), prediction=get("prediction"), reference=get("reference"), error=get("error"),
                    l2_relative_error=_finite(attrs.get("l2_relative_error")),
                    input_names=names("input_names"), output_names=names("output_names"))


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) < 300 else text[:300] + "..."
