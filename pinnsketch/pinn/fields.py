"""`Field`: one network output at the collocation points, with derivatives by name.

Inside `Problem.residual(x, u)` a field behaves like its value tensor (N,):
`u * u.x`, `torch.sin(u)`, `u ** 2` all work. Derivatives are attributes spelled
with the input names, one letter per differentiation: with inputs ("x", "t"),
`u.t`, `u.xx`, `u.xt`, `u.xxxx`; with multi-letter input names use
`u.d("x1", "x1")`. The values come from a *source* (a callable from a sorted
multi-index of input axes to an (N,) tensor), so the same class serves the
forward-mode jets, nested autograd and the derivative-discovery pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import DerivativeNameError

__all__ = ["Field", "MAX_DERIVATIVE_ORDER", "derivative_index", "valid_derivative_names"]

MultiIndex = tuple[int, ...]
MAX_DERIVATIVE_ORDER = 4  # the jets' activations provide derivatives up to 4th order
_COORDINATE_LETTERS = frozenset("xyztr")


def valid_derivative_names(input_names: Sequence[str]) -> str:
    """A short description of the valid derivative names for these inputs (for errors)."""
    names = tuple(input_names)
    if all(len(n) == 1 for n in names):
        first, last = names[0], names[-1]
        examples = [*names, first * 2, first + last if len(names) > 1 else first * 3, first * 4]
        return (
            f"inputs are {names}; spell derivatives with those letters, e.g. "
            f"{', '.join(dict.fromkeys(examples))} (order <= {MAX_DERIVATIVE_ORDER}), "
            f"or use .d({', '.join(repr(n) for n in names[:2])})"
        )
    return (
        f"inputs are {names}; ask with .d(name, ...), e.g. .d({names[0]!r}, {names[0]!r}) "
        f"(order <= {MAX_DERIVATIVE_ORDER})"
    )


def derivative_index(names: Sequence[str], input_names: Sequence[str], field: str = "u") -> MultiIndex:
    """Sorted multi-index of input axes for a sequence of input names."""
    axis = {n: i for i, n in enumerate(input_names)}
    unknown = [n for n in names if n not in axis]
    if unknown:
        raise DerivativeNameError(
            f"{field}: cannot differentiate along {unknown}: the problem has no such input; "
            + valid_derivative_names(input_names)
        )
    if len(names) > MAX_DERIVATIVE_ORDER:
        raise DerivativeNameError(
            f"{field}: derivative of order {len(names)} requested; jets carry at most order "
            f"{MAX_DERIVATIVE_ORDER}"
        )
    return tuple(sorted(axis[n] for n in names))


def _unwrap(obj):
    if isinstance(obj, Field):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _binary(name: str):
    op = getattr(torch.Tensor, name)

    def method(self, other):
        return op(self.value, _unwrap(other))

    method.__name__ = name
    return method


class Field:
    """Output field `name` at N points: acts as its value (N,), derivatives by name.

    Args:
        name: output name, e.g. "u".
        input_names: names of the input coordinates, e.g. ("x", "t").
        source: callable multi-index -> (N,) tensor; () gives the value.
    """

    __slots__ = ("name", "input_names", "_source", "value")

    def __init__(self, name: str, input_names: Sequence[str], source: Callable[[MultiIndex], torch.Tensor]):
        self.name = name
        self.input_names = tuple(input_names)
        self._source = source
        self.value = source(())

    def d(self, *names: str) -> torch.Tensor:
        """Partial derivative along the named inputs, e.g. u.d("x", "t") (N,)."""
        if not names:
            return self.value
        return self._source(derivative_index(names, self.input_names, self.name))

    def __getattr__(self, attr: str):
        # Only reached for names that are not slots or methods.
        if attr.startswith("__"):
            raise AttributeError(attr)
        if all(len(n) == 1 for n in self.input_names) and attr and all(c in self.input_names for c in attr):
            return self.d(*attr)
        # Names spelled with coordinate letters are derivatives, never tensor attributes
        # (u.t on a problem without time must fail, not return Tensor.t).
        looks_like_derivative = all(c in _COORDINATE_LETTERS or c in self.input_names for c in attr)
        if not looks_like_derivative and hasattr(torch.Tensor, attr):  # u.shape, u.dtype, u.abs(), ... act on the value
            return getattr(self.value, attr)
        raise DerivativeNameError(
            f"field {self.name!r} has no derivative or attribute {attr!r}; "
            + valid_derivative_names(self.input_names)
        )

    def __repr__(self) -> str:
        return f"Field({self.name!r}, shape={tuple(self.value.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # torch.sin(u), torch.stack([u, v]), ...: operate on the value tensors.
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    __add__ = _binary("__add__")
    __radd__ = _binary("__radd__")
    __sub__ = _binary("__sub__")
    __rsub__ = _binary("__rsub__")
    __mul__ = _binary("__mul__")
    __rmul__ = _binary("__rmul__")
    __truediv__ = _binary("__truediv__")
    __rtruediv__ = _binary("__rtruediv__")
    __pow__ = _binary("__pow__")
    __rpow__ = _binary("__rpow__")
    __matmul__ = _binary("__matmul__")
    __rmatmul__ = _binary("__rmatmul__")
    __lt__ = _binary("__lt__")
    __le__ = _binary("__le__")
    __gt__ = _binary("__gt__")
    __ge__ = _binary("__ge__")
    __getitem__ = _binary("__getitem__")

    def __neg__(self):
        return -self.value

    def __pos__(self):
        return self.value

    def __abs__(self):
        return self.value.abs()

    def __len__(self) -> int:
        return len(self.value)
