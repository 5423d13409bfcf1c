"""Derivative providers: network + points -> Jet of the (transformed) outputs.

Two interchangeable strategies, chosen by `solve(..., derivatives=...)`:

- `JetDerivatives` ("jet", default): `network.jet(x, spec)` pushes derivative
  streams forward through the layers, so the training backward pass is first
  order and the sketched storage policies apply.
- `AutogradDerivatives` ("autograd"): the checked fallback; differentiates the
  plain forward pass with nested `torch.autograd.grad(create_graph=True)`. It
  works with any `torch.nn.Module` mapping (N, d) -> (N, n_out).

Both apply the problem's optional hard-constraint `output_transform(x_jet, u_jet)`
and return a Jet with streams (S, N, n_out) for the same `JetSpec`, so the
rest of the solver never knows which one ran. `discover_spec` finds the
JetSpec a residual needs by running it once on a few points.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch

from ..nn.jet import Jet, JetSpec
from .errors import DerivativeNameError, ProblemDefinitionError
from .fields import Field

__all__ = [
    "DerivativeProvider",
    "JetDerivatives",
    "AutogradDerivatives",
    "get_provider",
    "PROVIDERS",
    "fields_of",
]

MultiIndex = tuple[int, ...]
Transform = Callable[[Jet, Jet], Jet] | None


class DerivativeProvider(abc.ABC):
    """Computes the jet of a network's outputs at x for a given JetSpec."""

    name: str

    @abc.abstractmethod
    def __call__(self, network: torch.nn.Module, x: torch.Tensor, spec: JetSpec, transform: Transform = None) -> Jet:
        """x (N, d) -> Jet with streams (S, N, n_out)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _apply_transform(transform: Transform, x: torch.Tensor, u: Jet) -> Jet:
    if transform is None:
        return u
    out = transform(Jet.input(x, u.spec), u)
    if not isinstance(out, Jet) or out.shape != u.shape:
        got = f"a Jet of shape {tuple(out.shape)}" if isinstance(out, Jet) else repr(type(out).__name__)
        raise ProblemDefinitionError(
            f"output_transform(x, u) must return a Jet shaped like u {tuple(u.shape)}, got {got}; "
            "build it from x and u with jet arithmetic, e.g. `x[:, 1:2] * u + g`"
        )
    return out


class JetDerivatives(DerivativeProvider):
    """Forward-mode jets through `network.jet(x, spec)` (first-order backward)."""

    name = "jet"

    def __call__(self, network, x, spec, transform=None):
        if not hasattr(network, "jet"):
            raise TypeError(
                f"{type(network).__name__} has no .jet(x, spec) method; use a pinnsketch.nn model "
                "or pass derivatives='autograd'"
            )
        return _apply_transform(transform, x, network.jet(x, spec))


def _twice_differentiable(network):
    """The network's forward for nested autograd.

    pinnsketch.nn models run fused autograd Functions whose backward is first
    order only; nested autograd through them would give wrong higher derivatives.
    Such models offer `autograd_forward(x)`: the same map in plain PyTorch ops.
    """
    plain = getattr(network, "autograd_forward", None)
    if callable(plain):
        return plain
    if type(network).__module__.startswith("pinnsketch.nn"):
        raise TypeError(
            f"derivatives='autograd' needs a twice-differentiable forward, but {type(network).__name__} "
            "runs first-order fused blocks and has no autograd_forward(x); use derivatives='jet' "
            "or pass network=<a plain torch.nn.Module>"
        )
    return network


def _value(network, x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Transformed outputs (N, n_out) as a differentiable function of x."""
    u = _twice_differentiable(network)(x)
    if transform is None:
        return u
    value_only = JetSpec(x.shape[1])
    return _apply_transform(transform, x, Jet(u.unsqueeze(0), value_only)).value


class _AutogradTree:
    """Derivatives of outputs u (N, w) w.r.t. x (N, d) by nested autograd, computed on demand.

    d^mi u[:, c] is obtained from its parent d^(mi[:-1]) u[:, c] by one
    `autograd.grad` call, which yields every axis at once; results are cached.
    """

    def __init__(self, u: torch.Tensor, x: torch.Tensor, create_graph: bool):
        self.x, self.create_graph = x, create_graph
        self._cache: dict[tuple[MultiIndex, int], torch.Tensor] = {}
        self._grads: dict[tuple[MultiIndex, int], torch.Tensor] = {}
        for c in range(u.shape[1]):
            self._cache[((), c)] = u[:, c]

    def get(self, mi: MultiIndex, c: int) -> torch.Tensor:
        key = (mi, c)
        if key not in self._cache:
            parent = (mi[:-1], c)
            if parent not in self._grads:
                f = self.get(*parent)
                if f.requires_grad:
                    # retain_graph: other output columns (u, v, p) differentiate through the same graph later
                    (g,) = torch.autograd.grad(f.sum(), self.x, create_graph=self.create_graph,
                                               retain_graph=True, allow_unused=True)
                else:
                    g = None
                self._grads[parent] = torch.zeros_like(self.x) if g is None else g
            self._cache[key] = self._grads[parent][:, mi[-1]]
        return self._cache[key]


class AutogradDerivatives(DerivativeProvider):
    """Nested reverse-mode autograd on the plain forward pass (the checked fallback)."""

    name = "autograd"

    def __call__(self, network, x, spec, transform=None):
        # Under no_grad (evaluation, refinement) derivatives are still needed, but no graph is kept.
        training = torch.is_grad_enabled()
        with torch.enable_grad():
            x = x.detach().requires_grad_(spec.size > 1)
            u = _value(network, x, transform)
            # higher derivatives differentiate lower ones, so their graphs are always built
            tree = _AutogradTree(u, x, create_graph=True)
            streams = torch.stack([
                torch.stack([tree.get(mi, c) for c in range(u.shape[1])], dim=-1) for mi in spec.indices
            ])
        return Jet(streams if training else streams.detach(), spec)


PROVIDERS: dict[str, type[DerivativeProvider]] = {p.name: p for p in (JetDerivatives, AutogradDerivatives)}


def get_provider(derivatives: str | DerivativeProvider) -> DerivativeProvider:
    if isinstance(derivatives, DerivativeProvider):
        return derivatives
    try:
        return PROVIDERS[derivatives]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown derivatives={derivatives!r}; choose one of {sorted(PROVIDERS)} "
            "or pass a DerivativeProvider instance"
        ) from None


def fields_of(jet: Jet, input_names: Sequence[str], output_names: Sequence[str], what: str = "residual") -> list[Field]:
    """One Field per output column of `jet`, reading derivatives from its streams."""

    def source(column: int, name: str):
        def read(mi: MultiIndex) -> torch.Tensor:
            if mi not in jet.spec:
                spelled = "".join(input_names[a] for a in mi)
                raise DerivativeNameError(
                    f"{what} asked for {name}.{spelled or 'value'}, which it did not ask for on its "
                    "first call; the set of derivatives used must not depend on the data"
                )
            return jet.d(mi)[:, column]

        return read

    return [Field(name, input_names, source(c, name)) for c, name in enumerate(output_names)]


def discover_fields(provider: DerivativeProvider, network, x: torch.Tensor, input_names, output_names,
                    transform: Transform):
    """Fields that record which derivatives are read, computing them with `provider`.

    Returns (fields, requested): `requested` is the set of multi-indices read
    so far (shared by all fields: the network has one jet for all outputs).
    Each newly requested derivative recomputes the jet on these few points with
    the enlarged spec, so the values the residual sees are real.
    """
    requested: set[MultiIndex] = set()
    dim = x.shape[1]
    current: list[Jet] = []

    def jet_for(mi: MultiIndex) -> Jet:
        requested.add(mi)
        if not current or mi not in current[0].spec:
            with torch.no_grad():
                current[:] = [provider(network, x, JetSpec(dim, requested), transform)]
        return current[0]

    def source(column: int):
        return lambda mi: jet_for(mi).d(mi)[:, column]

    return [Field(name, input_names, source(c)) for c, name in enumerate(output_names)], requested
