"""The one exception the run-file reader raises for files it cannot use."""

from __future__ import annotations

import os

__all__ = ["RunFileError"]


class RunFileError(ValueError):
    """A run file is not HDF5, is truncated or corrupt, or has a newer schema.

    The message names the file and what is wrong with it; ``path`` and
    ``reason`` hold the two parts. Raised instead of h5py's own errors.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
