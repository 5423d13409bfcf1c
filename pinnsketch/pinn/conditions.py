"""Boundary, initial and data conditions: data objects the solver turns into loss terms.

Each condition picks its points from the run's shared point pool (boundary or
initial samples) or carries its own (PointData), says which derivatives of its
field it needs, and returns a per-point residual whose mean square is its loss:

    Dirichlet        u = g                       on the boundary
    Neumann          du/dn = g                   on the boundary (outward normal)
    Robin            du/dn = f(x, u)             on the boundary
    Periodic         d^k u(x) = d^k u(x')        x, x' opposite faces along an axis, k = 0 or 1
    Initial          u(x, t0) = g(x)
    InitialVelocity  u_t(x, t0) = g(x)
    PointData        u(x_i) = u_i                observations (inverse problems)

Values `g` are numbers or callables x (N, d) tensor -> (N,) or (N, 1).
`on` is "boundary" (all of it) or a callable (x (n, d) array, on_boundary (n,)
bool array) -> (n,) bool array; deepxde-style per-point callables
(x (d,), on_boundary bool) -> bool are accepted too.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field as dc_field

import numpy as np
import torch

from .errors import ProblemDefinitionError
from .fields import Field
from .problem import Layout, as_points

__all__ = [
    "Condition",
    "Dirichlet",
    "Neumann",
    "Robin",
    "Periodic",
    "Initial",
    "InitialVelocity",
    "PointData",
    "PointPool",
    "ConditionPoints",
]

MultiIndex = tuple[int, ...]


@dataclass
class PointPool:
    """Shared samples the conditions choose from (float64 numpy, (n, d))."""

    boundary: np.ndarray | None
    initial: np.ndarray | None


@dataclass
class ConditionPoints:
    """The points of one condition: x (n, d) float64 and per-point extras (e.g. normals)."""

    x: np.ndarray
    extras: dict[str, np.ndarray] = dc_field(default_factory=dict)


def as_column(value, n: int, what: str) -> torch.Tensor:
    """Normalize an (n,) or (n, 1) result to (n,), with an error that names the shape."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.shape != (n,):
        raise ProblemDefinitionError(
            f"{what} has shape {tuple(value.shape)} on {n} points; return shape ({n},) or ({n}, 1)"
            + (" (an (N,) field combined with an (N, 1) column such as x[:, 0:1] broadcasts to (N, N);"
               " use x[:, 0])" if value.dim() == 2 and value.shape[0] == value.shape[1] == n else "")
        )
    return value


def _evaluate(value, x: torch.Tensor, what: str) -> torch.Tensor:
    """A condition value at x (n, d): a number or callable -> (n,) tensor on x's device/dtype."""
    if callable(value):
        out = value(x)
        if isinstance(out, (int, float)):
            return torch.full((len(x),), float(out), dtype=x.dtype, device=x.device)
        return as_column(out, len(x), what).to(device=x.device, dtype=x.dtype)
    return torch.full((len(x),), float(value), dtype=x.dtype, device=x.device)


def _check_value(value, what: str):
    if callable(value):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{what} value {value!r} must be a number or a callable x (N, d) -> (N,) tensor"
        ) from None


def _select(on, x: np.ndarray, what: str) -> np.ndarray:
    """Rows of boundary samples x (n, d) selected by `on`."""
    if on == "boundary":
        return x
    flags = np.ones(len(x), dtype=bool)
    try:
        mask = np.asarray(on(x, flags))
        vectorized = mask.shape == (len(x),)
    except (ValueError, TypeError, IndexError):
        vectorized = False
    if not vectorized:  # a deepxde-style per-point predicate
        mask = np.array([bool(on(row, True)) for row in x])
    return x[mask.astype(bool)]


class Condition(abc.ABC):
    """A loss term on points chosen from the pool; subclasses are small data classes."""

    kind: str  # prefix of the loss-term name, e.g. "dirichlet"
    field: str | None
    weight: float
    name: str | None

    def _init_common(self, field, weight, name):
        self.field = field
        try:
            self.weight = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"{type(self).__name__} weight={weight!r} must be a number") from None
        if not self.weight >= 0:
            raise ValueError(f"{type(self).__name__} weight={weight!r} must be >= 0")
        self.name = name

    def term_name(self, layout: Layout) -> str:
        if self.name is not None:
            return self.name
        column = layout.field_index(self.field, type(self).__name__)
        return f"{self.kind}_{layout.output_names[column]}"

    def needs(self) -> str | None:
        """Which pool this condition samples from: "boundary", "initial" or None."""
        return "boundary"

    @abc.abstractmethod
    def points(self, pool: PointPool, layout: Layout) -> ConditionPoints:
        """Choose this condition's points from the pool."""

    def derivatives(self, layout: Layout) -> set[MultiIndex]:
        """Multi-indices of its field's derivatives that the residual reads."""
        return set()

    @abc.abstractmethod
    def residual(self, x: torch.Tensor, u: Field, extras: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
        """Per-point residual (n,) whose mean square is the loss term."""

    def _boundary(self, pool: PointPool, on, layout: Layout) -> ConditionPoints:
        if pool.boundary is None:
            raise ProblemDefinitionError(f"{type(self).__name__} needs boundary points; pass points=Points(boundary=n > 0)")
        x = _select(on, pool.boundary, type(self).__name__)
        if len(x) == 0:
            raise ProblemDefinitionError(
                f"{type(self).__name__}(on={on!r}) selects none of the {len(pool.boundary)} boundary "
                "points; check the `on` predicate or sample more boundary points"
            )
        return ConditionPoints(x)

    def _repr_args(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = f", field={self.field!r}" if self.field is not None else ""
        return f"{type(self).__name__}({self._repr_args()}{extra})"


def _normal_derivative(u: Field, normals: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    names = u.input_names
    return sum(normals[:, a] * u.d(names[a]) for a in axes)


class Dirichlet(Condition):
    """u = value on the boundary (or on the part `on` selects)."""

    kind = "dirichlet"

    def __init__(self, value=0.0, *, on="boundary", field: str | None = None, weight: float = 1.0, name=None):
        self.value = _check_value(value, "Dirichlet")
        _check_on(on, "Dirichlet")
        self.on = on
        self._init_common(field, weight, name)

    def points(self, pool, layout):
        return self._boundary(pool, self.on, layout)

    def residual(self, x, u, extras, layout):
        return u.value - _evaluate(self.value, x, "Dirichlet value")

    def _repr_args(self):
        return repr(self.value)


class Neumann(Condition):
    """du/dn = value on the boundary, n the outward unit normal."""

    kind = "neumann"

    def __init__(self, value=0.0, *, on="boundary", field: str | None = None, weight: float = 1.0, name=None):
        self.value = _check_value(value, "Neumann")
        _check_on(on, "Neumann")
        self.on = on
        self._init_common(field, weight, name)

    def points(self, pool, layout):
        cp = self._boundary(pool, self.on, layout)
        cp.extras["normal"] = layout.domain.boundary_normal(cp.x)
        return cp

    def derivatives(self, layout):
        return {(a,) for a in layout.spatial_axes}

    def residual(self, x, u, extras, layout):
        return _normal_derivative(u, extras["normal"], layout.spatial_axes) - _evaluate(self.value, x, "Neumann value")


class Robin(Condition):
    """du/dn = fn(x, u) on the boundary; fn gets x (n, d) and the value u (n,)."""

    kind = "robin"

    def __init__(self, fn: Callable, *, on="boundary", field: str | None = None, weight: float = 1.0, name=None):
        if not callable(fn):
            raise TypeError(f"Robin needs a callable fn(x, u) -> (N,) tensor, got {fn!r}")
        _check_on(on, "Robin")
        self.fn, self.on = fn, on
        self._init_common(field, weight, name)

    def points(self, pool, layout):
        cp = self._boundary(pool, self.on, layout)
        cp.extras["normal"] = layout.domain.boundary_normal(cp.x)
        return cp

    def derivatives(self, layout):
        return {(a,) for a in layout.spatial_axes}

    def residual(self, x, u, extras, layout):
        rhs = as_column(self.fn(x, u.value), len(x), "Robin fn(x, u)")
        return _normal_derivative(u, extras["normal"], layout.spatial_axes) - rhs


class Periodic(Condition):
    """d^k u / d axis^k equal on opposite faces along `axis` (k = order, 0 or 1)."""

    kind = "periodic"

    def __init__(self, axis: str = "x", *, order: int = 0, on="boundary", field: str | None = None,
                 weight: float = 1.0, name=None):
        if order not in (0, 1):
            raise ValueError(f"Periodic order={order!r} is not supported; pass order=0 (values) or 1 (first derivatives)")
        if not isinstance(axis, str):
            raise TypeError(f"Periodic axis={axis!r} must be an input name such as 'x'")
        _check_on(on, "Periodic")
        self.axis, self.order, self.on = axis, order, on
        self._init_common(field, weight, name)

    def term_name(self, layout):
        if self.name is not None:
            return self.name
        base = super().term_name(layout)
        return f"{base}_{self.axis}" if self.order == 0 else f"{base}_d{self.axis}"

    def points(self, pool, layout):
        axis = layout.axis(self.axis, "Periodic")
        if axis == layout.time_axis:
            raise ProblemDefinitionError("Periodic cannot pair points along time; use a spatial axis")
        cp = self._boundary(pool, self.on, layout)
        image = layout.domain.periodic_point(cp.x, axis)
        moved = np.abs(image[:, axis] - cp.x[:, axis]) > 0
        if not moved.any():
            raise ProblemDefinitionError(
                f"Periodic(axis={self.axis!r}) found no boundary points on the faces normal to {self.axis!r}; "
                "is the domain a box along that axis?"
            )
        # Each pair once: keep the points on the lower face, stacked with their images.
        lower = moved & (cp.x[:, axis] < image[:, axis])
        x = cp.x[lower] if lower.any() else cp.x[moved]
        return ConditionPoints(np.concatenate([x, layout.domain.periodic_point(x, axis)]))

    def derivatives(self, layout):
        return {(layout.axis(self.axis, "Periodic"),)} if self.order == 1 else set()

    def residual(self, x, u, extras, layout):
        f = u.d(self.axis) if self.order == 1 else u.value
        n = len(f) // 2
        return f[:n] - f[n:]

    def _repr_args(self):
        return f"{self.axis!r}, order={self.order}"


class Initial(Condition):
    """u(x, t0) = value(x)."""

    kind = "initial"

    def __init__(self, value=0.0, *, field: str | None = None, weight: float = 1.0, name=None):
        self.value = _check_value(value, "Initial")
        self._init_common(field, weight, name)

    def needs(self):
        return "initial"

    def points(self, pool, layout):
        if layout.time_axis is None:
            raise ProblemDefinitionError(
                f"{type(self).__name__} needs a time axis; use a domain like `space * TimeDomain(0, 1)`"
            )
        if pool.initial is None:
            raise ProblemDefinitionError(f"{type(self).__name__} needs initial points; pass points=Points(initial=n > 0)")
        return ConditionPoints(pool.initial)

    def residual(self, x, u, extras, layout):
        return u.value - _evaluate(self.value, x, "Initial value")

    def _repr_args(self):
        return repr(self.value)


class InitialVelocity(Initial):
    """u_t(x, t0) = value(x) (second-order-in-time problems such as the wave equation)."""

    kind = "initial_velocity"

    def derivatives(self, layout):
        return {(layout.time_axis,)} if layout.time_axis is not None else set()

    def residual(self, x, u, extras, layout):
        return u.d(layout.input_names[layout.time_axis]) - _evaluate(self.value, x, "InitialVelocity value")


class PointData(Condition):
    """u(x_i) = values_i at given points: observations, e.g. for inverse problems.

    Args:
        x: (M, d) points; values: (M,) or (M, 1) observed values of `field`.
    """

    kind = "data"

    def __init__(self, x, values, *, field: str | None = None, weight: float = 1.0, name=None):
        v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        self._x_raw = x
        if v.ndim != 1 or not np.isfinite(v).all():
            raise ProblemDefinitionError(
                f"PointData values must be finite with shape (M,) or (M, 1), got shape {np.shape(values)}"
            )
        self.values = v
        self._init_common(field, weight, name)

    def needs(self):
        return None

    def points(self, pool, layout):
        x = as_points(self._x_raw, layout.dim, "PointData x")
        if len(x) != len(self.values):
            raise ProblemDefinitionError(
                f"PointData has {len(x)} points but {len(self.values)} values; pass one value per point"
            )
        return ConditionPoints(x, {"values": self.values})

    def residual(self, x, u, extras, layout):
        return u.value - extras["values"]

    def _repr_args(self):
        return f"<{len(self.values)} points>"


def _check_on(on, what: str) -> None:
    if on != "boundary" and not callable(on):
        raise ValueError(
            f"{what} on={on!r} is not supported; pass on='boundary' or a callable "
            "(x (n, d) array, on_boundary (n,) bool array) -> (n,) bool array"
        )
