"""Domains for PINN problems: thin, lazily built wrappers over `deepxde.geometry`.

    domain = Interval(-1, 1) * TimeDomain(0, 1)            # space x time
    domain = Rectangle((0, 0), (1, 1)) - Disk((0.5, 0.5), 0.2)   # CSG: |, -, &

A wrapper validates its arguments when constructed and builds the deepxde
object only when points are first sampled, so `import pinnsketch` never
imports deepxde (which selects a backend, prints, and on CUDA machines moves
torch's default device on import). Points come back as float64 numpy arrays
of shape (n, dim); the solver casts them to the run's dtype and device.
Space-time domains put time in the last column, as deepxde does.
"""

from __future__ import annotations

import abc
import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "Geometry",
    "Interval",
    "Rectangle",
    "Cuboid",
    "Disk",
    "Sphere",
    "Polygon",
    "TimeDomain",
    "Union",
    "Difference",
    "Intersection",
    "SpaceTime",
    "SAMPLERS",
]

# pinnsketch sampler name -> deepxde's name ("uniform" is a grid and handled apart)
SAMPLERS = {
    "uniform": None,
    "random": "pseudo",
    "sobol": "Sobol",
    "hammersley": "Hammersley",
    "halton": "Halton",
    "lhs": "LHS",
}
_SPACE_NAMES = ("x", "y", "z")


def _deepxde():
    """Import deepxde with the pytorch backend, undoing its import-time side effects."""
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    # deepxde prints its backend on import and, when CUDA is available, calls
    # torch.set_default_device("cuda"); keep the user's default device and stderr clean.
    device = torch.get_default_device()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import deepxde
    if torch.get_default_device() != device:
        # set_default_device(None) removes the device mode (a mode on "cpu" would slow every op)
        torch.set_default_device(None if device.type == "cpu" else device)
    return deepxde


@contextlib.contextmanager
def _deepxde_session(generator: torch.Generator | None) -> Iterator[object]:
    """deepxde with float64 points and numpy's global RNG seeded from `generator`.

    NOTE [deepxde randomness]: deepxde draws pseudo-random points from numpy's
    *global* RNG and casts every point array to its global float type. Inside
    this context the global numpy state is replaced by one seeded from the
    caller's torch.Generator and deepxde's float type is set to float64; both
    are restored on exit, so sampling is reproducible from the run's seed and
    no global state leaks out (not thread-safe, like deepxde itself).
    """
    dde = _deepxde()
    real = dde.config.real
    precision = real.precision
    np_state = np.random.get_state()
    if generator is not None:
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    real.set_float64()
    try:
        # deepxde prints point-count warnings; skopt warns about Sobol' balance for n != 2^k
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="skopt")
            yield dde
    finally:
        {16: real.set_float16, 32: real.set_float32, 64: real.set_float64}[precision]()
        np.random.set_state(np_state)


def _check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return sampler


def _check_count(n: int, what: str) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what}={n!r} must be a positive int (a number of points)")
    return int(n)


class Geometry(abc.ABC):
    """A domain: sample interior and boundary points, test membership, give normals.

    Subclasses build a deepxde geometry in `_build(dde)`; everything else is shared.
    Array arguments and results are numpy float64 arrays of shape (n, dim).
    """

    dim: int
    has_time: bool = False

    @abc.abstractmethod
    def _build(self, dde):
        """The deepxde geometry object for this domain."""

    @property
    def input_names(self) -> tuple[str, ...]:
        """Default names of the input coordinates: x, y, z (and t for time)."""
        if self.dim > len(_SPACE_NAMES):
            return tuple(f"x{i + 1}" for i in range(self.dim))
        return _SPACE_NAMES[: self.dim]

    def dde(self, session=None):
        """The underlying deepxde geometry (built once, inside a float64 session)."""
        cached = self.__dict__.get("_dde")
        if cached is None:
            if session is None:
                with _deepxde_session(None) as dde:
                    cached = self._build(dde)
            else:
                cached = self._build(session)
            self.__dict__["_dde"] = cached
        return cached

    # --- sampling -------------------------------------------------------------------
    def sample_domain(self, n: int, sampler: str = "hammersley", generator: torch.Generator | None = None) -> np.ndarray:
        """Interior points, (n, dim) (a grid may return a few more or fewer for "uniform")."""
        n, sampler = _check_count(n, "n"), _check_sampler(sampler)
        with _deepxde_session(generator) as dde:
            geom = self.dde(dde)
            if sampler == "uniform":
                x = geom.uniform_points(n, boundary=False)
            else:
                x = geom.random_points(n, random=SAMPLERS[sampler])
        return self._checked(x, "interior")

    def sample_boundary(self, n: int, sampler: str = "hammersley", generator: torch.Generator | None = None) -> np.ndarray:
        """Points on the (spatial) boundary, (n, dim)."""
        n, sampler = _check_count(n, "n"), _check_sampler(sampler)
        with _deepxde_session(generator) as dde:
            geom = self.dde(dde)
            if sampler == "uniform":
                x = geom.uniform_boundary_points(n)
            else:
                x = geom.random_boundary_points(n, random=SAMPLERS[sampler])
        return self._checked(x, "boundary")

    def sample_initial(self, n: int, sampler: str = "hammersley", generator: torch.Generator | None = None) -> np.ndarray:
        """Points at the initial time, (n, dim); only for domains with a time axis."""
        raise ValueError(
            f"{self!r} has no time axis, so it has no initial points; "
            "build a space-time domain with `space * TimeDomain(t0, t1)`"
        )

    def _checked(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        if len(x) == 0:
            raise ValueError(f"{self!r} produced no {what} points; is the domain empty?")
        return x

    # --- geometry queries -----------------------------------------------------------
    def inside(self, x: np.ndarray) -> np.ndarray:
        """Boolean (n,): x (n, dim) lies in the closed domain."""
        return np.asarray(self.dde().inside(np.asarray(x, dtype=np.float64)), dtype=bool).reshape(-1)

    def on_boundary(self, x: np.ndarray) -> np.ndarray:
        """Boolean (n,): x (n, dim) lies on the (spatial) boundary."""
        return np.asarray(self.dde().on_boundary(np.asarray(x, dtype=np.float64)), dtype=bool).reshape(-1)

    def boundary_normal(self, x: np.ndarray) -> np.ndarray:
        """Outward unit normals (n, dim) at boundary points x (n, dim); zero in time."""
        return np.asarray(self.dde().boundary_normal(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    def periodic_point(self, x: np.ndarray, axis: int) -> np.ndarray:
        """Images of x (n, dim) on the opposite face along `axis` (unchanged elsewhere)."""
        return np.asarray(self.dde().periodic_point(np.asarray(x, dtype=np.float64), axis), dtype=np.float64)

    @property
    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) corners, each (dim,)."""
        lo, hi = self.dde().bbox
        return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    # --- algebra ----------------------------------------------------------------------
    def __or__(self, other: Geometry) -> Geometry:
        return Union(self, other)

    def __sub__(self, other: Geometry) -> Geometry:
        return Difference(self, other)

    def __and__(self, other: Geometry) -> Geometry:
        return Intersection(self, other)

    def __mul__(self, other: Geometry) -> Geometry:
        if not isinstance(other, TimeDomain):
            raise TypeError(
                f"`space * time` needs a TimeDomain on the right, got {other!r}; "
                "products of two spatial domains are not supported"
            )
        return SpaceTime(self, other)


def _floats(values, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{what}={values!r} must be a sequence of numbers") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}={values!r} must be finite")
    return out


class Interval(Geometry):
    """The segment [left, right]."""

    dim = 1

    def __init__(self, left: float, right: float):
        (self.left, self.right) = _floats((left, right), "(left, right)")
        if not self.left < self.right:
            raise ValueError(
                f"Interval({left}, {right}) is empty; pass left < right"
            )

    def _build(self, dde):
        return dde.geometry.Interval(self.left, self.right)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.left:g}, {self.right:g})"


class TimeDomain(Interval):
    """The time interval [t0, t1]; combine with space as `space * TimeDomain(t0, t1)`."""

    has_time = True

    def __init__(self, t0: float, t1: float):
        super().__init__(t0, t1)

    @property
    def t0(self) -> float:
        return self.left

    @property
    def t1(self) -> float:
        return self.right

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("t",)

    def _build(self, dde):
        return dde.geometry.TimeDomain(self.left, self.right)

    def sample_initial(self, n, sampler="hammersley", generator=None):
        _check_count(n, "n")
        return np.array([[self.t0]], dtype=np.float64)


class _Box(Geometry):
    """Axis-aligned box [lower, upper] of a fixed dimension."""

    def __init__(self, lower: Sequence[float], upper: Sequence[float]):
        lower, upper = _floats(lower, "lower"), _floats(upper, "upper")
        name = type(self).__name__
        if len(lower) != self.dim or len(upper) != self.dim:
            raise ValueError(
                f"{name} needs {self.dim} coordinates per corner, got lower={lower}, upper={upper}"
            )
        if not all(lo < hi for lo, hi in zip(lower, upper)):
            raise ValueError(f"{name}({lower}, {upper}) is empty; pass lower < upper in every coordinate")
        self.lower, self.upper = lower, upper

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lower}, {self.upper})"


class Rectangle(_Box):
    """The rectangle [x0, x1] x [y0, y1] given by corners (x0, y0), (x1, y1)."""

    dim = 2

    def _build(self, dde):
        return dde.geometry.Rectangle(list(self.lower), list(self.upper))


class Cuboid(_Box):
    """The box given by corners (x0, y0, z0), (x1, y1, z1)."""

    dim = 3

    def _build(self, dde):
        return dde.geometry.Cuboid(list(self.lower), list(self.upper))


class _Ball(Geometry):
    def __init__(self, center: Sequence[float], radius: float):
        self.center = _floats(center, "center")
        if len(self.center) != self.dim:
            raise ValueError(f"{type(self).__name__} needs a center with {self.dim} coordinates, got {center}")
        (self.radius,) = _floats((radius,), "radius")
        if not self.radius > 0:
            raise ValueError(f"{type(self).__name__} radius={radius} is empty; pass a radius > 0")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.center}, {self.radius:g})"


class Disk(_Ball):
    """The disk of `radius` around `center` (2 coordinates)."""

    dim = 2

    def _build(self, dde):
        return dde.geometry.Disk(list(self.center), self.radius)


class Sphere(_Ball):
    """The solid ball of `radius` around `center` (3 coordinates)."""

    dim = 3

    def _build(self, dde):
        return dde.geometry.Sphere(list(self.center), self.radius)


class Polygon(Geometry):
    """A simple polygon with vertices (k, 2), in either orientation (k >= 3)."""

    dim = 2

    def __init__(self, vertices: Sequence[Sequence[float]]):
        v = np.asarray(vertices, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
            raise ValueError(
                f"Polygon vertices must be k >= 3 points (k, 2), got an array of shape {v.shape}"
            )
        area = 0.5 * np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1])
        if not abs(area) > 0:
            raise ValueError("Polygon vertices enclose zero area (the domain is empty); check the vertices")
        self.vertices = v

    def _build(self, dde):
        # deepxde refuses triangles and rectangles in Polygon; route them to their classes.
        g = dde.geometry
        if len(self.vertices) == 3:
            return g.Triangle(*self.vertices.tolist())
        if len(self.vertices) == 4 and g.Rectangle.is_valid(self.vertices):
            return g.Rectangle(self.vertices.min(axis=0).tolist(), self.vertices.max(axis=0).tolist())
        return g.Polygon(self.vertices.tolist())

    def __repr__(self) -> str:
        return f"Polygon({self.vertices.tolist()})"


class _CSG(Geometry):
    _op: str
    _symbol: str

    def __init__(self, a: Geometry, b: Geometry):
        for g in (a, b):
            if not isinstance(g, Geometry) or g.has_time:
                raise TypeError(
                    f"CSG operands must be spatial pinnsketch geometries, got {g!r}; "
                    "combine spatial domains first, then multiply by a TimeDomain"
                )
        if a.dim != b.dim:
            raise ValueError(f"cannot combine {a!r} (dim {a.dim}) with {b!r} (dim {b.dim})")
        self.a, self.b, self.dim = a, b, a.dim

    def _build(self, dde):
        base = getattr(dde.geometry.csg, self._op)
        # deepxde's CSG keeps boundary points that are not on the result's boundary: the edges B shares
        # with A's boundary in A - B (outside the closed difference), and the faces where A and B touch
        # in A | B (inside the union). The subclass keeps only points with an outside and an inside
        # neighbour, drawing more until it has n.
        # Its interior sampling redraws until it has n points, and a quasi-random sampler redraws the
        # same set: duplicated points (a quarter of an L-shape's), and no end when none of it is inside.
        exact = type(f"Exact{base.__name__}", (base,), {
            "random_points": lambda g, n, random="pseudo": (
                base.random_points(g, n, random=random) if random == "pseudo"
                else _quasi_random_interior(g, n, lambda m: dde.geometry.sampler.sample(m, g.dim, random))),
            "random_boundary_points": lambda g, n, random="pseudo": _true_boundary(
                g, n, lambda m: base.random_boundary_points(g, m, random=random)),
            "uniform_boundary_points": lambda g, n: _true_boundary(
                g, n, lambda m: base.uniform_boundary_points(g, m), exact_count=False),
        })
        return exact(self.a.dde(dde), self.b.dde(dde))

    def __repr__(self) -> str:
        return f"({self.a!r} {self._symbol} {self.b!r})"


def _quasi_random_interior(geom, n: int, unit) -> np.ndarray:
    """n distinct interior points (n, dim) of `geom` from a quasi-random set: unit(m) draws m points
    of [0, 1]^dim, mapped onto the bounding box; m grows until just over n of them are inside (and
    not on the boundary), and the few extra are dropped at random (numpy's global RNG, which
    `_deepxde_session` seeds). Neither a prefix nor an even stride of the set would do: Hammersley's
    first coordinate is i/m, and a stride of a Sobol' sequence stays in a few of its boxes."""
    lo, hi = (np.asarray(b, dtype=np.float64) for b in geom.bbox)
    m = n
    for _ in range(12):
        x = lo + np.asarray(unit(m), dtype=np.float64).reshape(m, geom.dim) * (hi - lo)
        x = x[np.asarray(geom.inside(x), dtype=bool) & ~np.asarray(geom.on_boundary(x), dtype=bool)]
        if len(x) >= n:
            return x[np.sort(np.random.choice(len(x), n, replace=False))]
        m = min(16 * m, max(m + 1, int(np.ceil(1.02 * m * n / max(len(x), 1)))))
    raise ValueError(f"could not sample {n} interior points of {geom!r}: too few of the drawn points lie "
                     "inside it; is the domain empty or thinner than its bounding box suggests?")


def _true_boundary(geom, n: int, draw, exact_count: bool = True) -> np.ndarray:
    """n points (m, dim) of draw(m) on the boundary of the closed set `geom.inside`: a point is kept
    when, at a distance of 1e-6 of the bounding box's diagonal, one of its 3^dim - 1 axis and diagonal
    neighbours is inside and one outside. `exact_count=False` (a grid) may return fewer than n."""
    lo, hi = (np.asarray(b, dtype=np.float64) for b in geom.bbox)
    steps = np.array(np.meshgrid(*[(-1.0, 0.0, 1.0)] * geom.dim, indexing="ij")).reshape(geom.dim, -1).T
    steps = steps[np.any(steps != 0, axis=1)]
    steps *= 1e-6 * float(np.linalg.norm(hi - lo)) / np.linalg.norm(steps, axis=1, keepdims=True)
    m = n
    for _ in range(12):
        x = np.asarray(draw(m), dtype=np.float64)
        near = (x[:, None, :] + steps[None]).reshape(-1, geom.dim)
        inside = np.asarray(geom.inside(near), dtype=bool).reshape(len(x), len(steps))
        x = x[inside.any(axis=1) & ~inside.all(axis=1)]
        if len(x) >= n or not exact_count:
            return x[:n]
        m = int(m * min(16.0, max(2.0, 1.25 * n / max(len(x), 1))))
    raise ValueError(f"could not sample {n} boundary points of {geom!r}: too few of the drawn points lie on "
                     "its boundary; is the domain empty or thinner than 1e-6 of its bounding box?")


class Union(_CSG):
    _op, _symbol = "CSGUnion", "|"


class Difference(_CSG):
    _op, _symbol = "CSGDifference", "-"


class Intersection(_CSG):
    _op, _symbol = "CSGIntersection", "&"


class SpaceTime(Geometry):
    """space x [t0, t1]; time is the last input column."""

    has_time = True

    def __init__(self, space: Geometry, time: TimeDomain):
        if not isinstance(space, Geometry) or space.has_time:
            raise TypeError(f"the spatial factor must be a spatial Geometry, got {space!r}")
        self.space, self.time = space, time
        self.dim = space.dim + 1

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.space.input_names, "t")

    def _build(self, dde):
        return dde.geometry.GeometryXTime(self.space.dde(dde), self.time.dde(dde))

    def sample_initial(self, n, sampler="hammersley", generator=None):
        n, sampler = _check_count(n, "n"), _check_sampler(sampler)
        with _deepxde_session(generator) as dde:
            geom = self.dde(dde)
            if sampler == "uniform":
                x = geom.uniform_initial_points(n)
            else:
                x = geom.random_initial_points(n, random=SAMPLERS[sampler])
        return self._checked(x, "initial")

    @property
    def bbox(self):
        lo, hi = self.space.bbox
        return np.append(lo, self.time.t0), np.append(hi, self.time.t1)

    def inside(self, x):
        x = np.asarray(x, dtype=np.float64)
        t = x[:, -1]
        return self.space.inside(x[:, :-1]) & (t >= self.time.t0) & (t <= self.time.t1)

    def __repr__(self) -> str:
        return f"{self.space!r} * {self.time!r}"
