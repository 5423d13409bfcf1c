"""`Problem`: a PDE as a small class — a domain, a residual, conditions, a reference.

    class Heat(ps.Problem):
        domain = ps.geometry.Interval(0, 1) * ps.geometry.TimeDomain(0, 1)
        conditions = [ps.Dirichlet(0.0), ps.Initial(lambda x: torch.sin(math.pi * x[:, 0]))]
        def residual(self, x, u):
            return u.t - 0.1 * u.xx

`Layout` is the resolved, validated view of a problem (names, axes) that
conditions and the solver work with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ProblemDefinitionError
from .geometry import Geometry

__all__ = ["Problem", "Parameter", "Layout"]


class Parameter:
    """A trainable scalar of an inverse problem, declared as a class attribute.

        class Inverse(ps.Problem):
            kappa = ps.Parameter(1.0)        # initial guess
            def residual(self, x, u):
                return u.t - self.kappa * u.xx

    Inside `residual` (during `solve`) `self.kappa` is a trainable 0-d tensor;
    after `solve` it holds the trained value, and `result.parameters["kappa"]`
    the float. Before any solve it is a constant tensor of the initial value.
    """

    def __init__(self, initial: float):
        try:
            self.initial = float(initial)
        except (TypeError, ValueError):
            raise TypeError(f"Parameter initial value {initial!r} must be a number") from None
        if not math.isfinite(self.initial):
            raise ValueError(f"Parameter initial value {initial!r} must be finite")
        self.name = None

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        bound = obj.__dict__.get("_ps_parameters", {})
        if self.name in bound:
            return bound[self.name]
        return torch.tensor(self.initial)

    def __set__(self, obj, value) -> None:
        raise AttributeError(
            f"Parameter {self.name!r} is trained by solve(); declare its initial value as "
            f"`{self.name} = ps.Parameter(value)` in the class body instead of assigning it"
        )

    def __repr__(self) -> str:
        return f"Parameter({self.initial:g})"


class Problem:
    """Base class of PDE problems; subclass it and implement `residual`.

    Class attributes:
        domain: a `pinnsketch.geometry` Geometry (space, or space * TimeDomain).
        output_names: names of the network outputs, default ("u",).
        input_names: names of the inputs; default from the domain, e.g. ("x", "t").
        conditions: list of condition objects (Dirichlet, Initial, ...).
        name: short name used by the CLI and in files (default: class name, lower case).
        solver_defaults: keyword arguments of `pinnsketch.solve` this problem
            trains best with (user arguments override them).

    Methods to implement:
        residual(self, x, *fields): x (N, d) tensor, one `Field` per output;
            return an (N,) or (N, 1) tensor, or a tuple / dict of them.
    Optional:
        reference(self) -> (x (M, d), u (M, n_out)) arrays, or None;
        exact(self, x) -> (M, n_out) (or (M,) for one output) tensor;
        output_transform(self, x: Jet, u: Jet) -> Jet  (hard constraints).
    """

    name: str | None = None
    domain: Geometry | None = None
    output_names: tuple[str, ...] = ("u",)
    conditions: Sequence = ()
    solver_defaults: dict = {}

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.domain is None:
            raise ProblemDefinitionError(
                f"{type(self).__name__} has no domain; set a class attribute such as "
                "`domain = ps.geometry.Interval(0, 1)`"
            )
        return self.domain.input_names

    def residual(self, x: torch.Tensor, *fields):
        raise NotImplementedError(
            f"{type(self).__name__} must implement residual(self, x, {', '.join(self.output_names)})"
        )

    def reference(self):
        """Reference solution (x (M, d), u (M, n_out)) or None if the problem has none."""
        return None

    def solve(self, **options):
        """Train a PINN on this problem: `pinnsketch.solve(self, **options)`."""
        from .solver import solve

        return solve(self, **options)

    # --- introspection used by the solver ----------------------------------------------
    @classmethod
    def parameters(cls) -> dict[str, Parameter]:
        """The trainable scalars declared on the class, by name."""
        out = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if isinstance(value, Parameter):
                    out[key] = value
        return out

    def _bind_parameters(self, values: dict[str, torch.Tensor]) -> None:
        self.__dict__["_ps_parameters"] = dict(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class Layout:
    """Names and axes of a validated problem."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    domain: Geometry

    @property
    def dim(self) -> int:
        return len(self.input_names)

    @property
    def time_axis(self) -> int | None:
        return self.dim - 1 if self.domain.has_time else None

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.dim) if i != self.time_axis)

    def field_index(self, field: str | None, what: str) -> int:
        """Output column of `field`; None means the only output."""
        if field is None:
            if len(self.output_names) != 1:
                raise ProblemDefinitionError(
                    f"{what} needs field= one of {self.output_names} (the problem has several outputs)"
                )
            return 0
        if field not in self.output_names:
            raise ProblemDefinitionError(
                f"{what} refers to field {field!r}, but the outputs are {self.output_names}; "
                "pass field= one of them"
            )
        return self.output_names.index(field)

    def axis(self, name: str, what: str) -> int:
        if name not in self.input_names:
            raise ProblemDefinitionError(
                f"{what} refers to input {name!r}, but the inputs are {self.input_names}"
            )
        return self.input_names.index(name)

    @classmethod
    def of(cls, problem: Problem) -> Layout:
        """Validate a problem's static definition and return its layout."""
        kind = type(problem).__name__
        if not isinstance(problem, Problem):
            raise TypeError(f"expected a pinnsketch Problem instance, got {problem!r}")
        domain = problem.domain
        if not isinstance(domain, Geometry):
            raise ProblemDefinitionError(
                f"{kind}.domain must be a pinnsketch.geometry Geometry (e.g. Interval(0, 1)), got {domain!r}"
            )
        inputs = tuple(problem.input_names)
        if len(inputs) != domain.dim or len(set(inputs)) != len(inputs) or not all(
            isinstance(n, str) and n.isidentifier() for n in inputs
        ):
            raise ProblemDefinitionError(
                f"{kind}.input_names={inputs} must be {domain.dim} distinct identifiers, one per "
                f"coordinate of {domain!r}"
            )
        outputs = problem.output_names
        if isinstance(outputs, str) or not outputs or len(set(outputs)) != len(outputs) or not all(
            isinstance(n, str) and n.isidentifier() for n in outputs
        ):
            raise ProblemDefinitionError(
                f"{kind}.output_names={outputs!r} must be a non-empty tuple of distinct identifiers, "
                "e.g. ('u',) or ('u', 'v', 'p')"
            )
        if type(problem).residual is Problem.residual:
            raise ProblemDefinitionError(
                f"{kind} must implement residual(self, x, {', '.join(outputs)})"
            )
        return cls(inputs, tuple(outputs), domain)


def as_points(x, dim: int, what: str) -> np.ndarray:
    """Validate an (M, dim) array of points (numpy or torch) and return float64 numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1 and dim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != dim or len(x) == 0:
        raise ProblemDefinitionError(f"{what} must be a non-empty (M, {dim}) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ProblemDefinitionError(f"{what} contains NaN or infinite values; fix the data")
    return x
