"""Evaluation grids and reference caching shared by the problem modules."""

from __future__ import annotations

import numpy as np

__all__ = ["tensor_grid", "CachedReference"]


def tensor_grid(*axes: np.ndarray) -> np.ndarray:
    """Cartesian product of 1-D axes as points (M, d), first axis varying slowest.

    With axes (x (n_x,), t (n_t,)) row ``i * n_t + j`` is (x[i], t[j]), so a field
    sampled on the grid reshapes to (n_x, n_t) indexed [x, t] like DeepXDE's data.
    """
    if not axes:
        raise ValueError("tensor_grid needs at least one axis; pass 1-D arrays, e.g. tensor_grid(x, t)")
    arrays = [np.asarray(a, dtype=np.float64) for a in axes]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"axis {i} has shape {a.shape}; each axis must be a non-empty 1-D array")
    mesh = np.meshgrid(*arrays, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


class CachedReference:
    """Mixin for problems whose reference is computed by a classical solver.

    Subclasses implement `compute_reference() -> (x (M, d), u (M, n_out))`; `reference()`
    runs it once per instance (no module-level cache) and hands out copies, so
    callers may modify what they get.
    """

    def compute_reference(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_reference()")

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(x (M, d), u (M, n_out)) float64 on the problem's evaluation grid (see compute_reference)."""
        cached = self.__dict__.get("_cached_reference")
        if cached is None:
            cached = self.__dict__["_cached_reference"] = self.compute_reference()
        return cached[0].copy(), cached[1].copy()
