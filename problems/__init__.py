"""The pinnsketch PDE library: one module per problem, each with its reference solution.

    from pinnsketch import problems
    problems.names()              # ['allen_cahn', 'burgers', ...]
    problem = problems.get("burgers")
    result = problem.solve()

Every problem is a `pinnsketch.Problem` subclass with an exact solution
(`exact(x)`) or a reference computed by a classical method in its module
(`reference()`), and a `tolerance`: the relative L2 error its default solve is
expected to reach. Modules are imported on first use, so importing this
package costs nothing.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

__all__ = ["names", "get", "problem_class", "describe", "PROBLEMS"]

# name -> (module, class); the single source of truth for the library's contents
PROBLEMS: MappingProxyType[str, tuple[str, str]] = MappingProxyType({
    "burgers": ("burgers", "Burgers"),
    "poisson": ("poisson", "PoissonLShape"),
    "poisson_corner": ("poisson_corner", "PoissonCorner"),
    "heat": ("heat", "Heat"),
    "wave": ("wave", "Wave"),
    "helmholtz": ("helmholtz", "Helmholtz"),
    "diffusion_reaction": ("diffusion_reaction", "DiffusionReaction"),
    "klein_gordon": ("klein_gordon", "KleinGordon"),
    "kovasznay": ("kovasznay", "Kovasznay"),
    "allen_cahn": ("allen_cahn", "AllenCahn"),
    "inverse_diffusion": ("inverse_diffusion", "InverseDiffusion"),
})
_CLASSES = MappingProxyType({cls: name for name, (_, cls) in PROBLEMS.items()})


def names() -> list[str]:
    """Names of the library's problems, sorted."""
    return sorted(PROBLEMS)


def problem_class(name: str) -> type:
    """The Problem subclass registered as `name` (imports its module)."""
    if not isinstance(name, str):
        raise TypeError(f"problem name must be a str, got {name!r}; choose one of {names()}")
    key = name.strip().lower().replace("-", "_")
    if key not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {names()}")
    module, cls = PROBLEMS[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get(name: str):
    """A fresh instance of the problem registered as `name` (case and '-'/'_' insensitive)."""
    return problem_class(name)()


def describe() -> list[str]:
    """One line per problem: name, the first line of its docstring, its tolerance."""
    width = max(map(len, PROBLEMS))
    lines = []
    for name in names():
        cls = problem_class(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        tol = getattr(cls, "tolerance", None)
        lines.append(f"{name:<{width}}  {summary}" + (f"  [L2 tol {tol:g}]" if tol is not None else ""))
    return lines


def __getattr__(attr: str):
    # `from pinnsketch.problems import Burgers` works without importing every module up front.
    if attr in _CLASSES:
        return problem_class(_CLASSES[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
