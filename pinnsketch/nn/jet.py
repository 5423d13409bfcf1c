"""Forward-mode derivative jets: a field together with its input derivatives.

A PINN residual needs u, u_x, u_xx, ... at every collocation point. Nested
reverse-mode autograd builds them by differentiating the graph again, which
keeps a second-order graph alive and rules out custom first-order backward
passes. A jet instead carries the derivative *streams* forward through the
network: a tensor ``streams`` of shape (S, N, w) whose stream 0 is the value
and whose other streams are partial derivatives with respect to the inputs,
one per multi-index of a `JetSpec`. Linear maps act on every stream alike;
an elementwise function f acts through Faa di Bruno's formula,

    d^alpha f(z) = sum over set partitions P of alpha:  f^(|P|)(z) * prod_{B in P} d^B z,

and products through Leibniz's rule. The backward pass through all of this
is first order, so the sketched autograd Functions of `pinnsketch.nn` apply.

Multi-indices are sorted tuples of input axes: () is the value, (0,) is
d/dx_0, (0, 1) is d^2/dx_0 dx_1, (0, 0, 0, 0) is d^4/dx_0^4.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch

from .activations import Activation, get_activation

__all__ = ["JetSpec", "Jet", "compose_streams", "compose_terms_functional", "compose_vjp"]

MultiIndex = tuple[int, ...]
# Faa di Bruno / Leibniz terms: (multiplicity, number of blocks, stream ids of the factors)
_Term = tuple[int, int, tuple[int, ...]]


def _set_partitions(items: list[int]) -> Iterable[list[list[int]]]:
    """All set partitions of `items` (positions, not values)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


class JetSpec:
    """Which derivative streams a jet carries.

    Args:
        dim: number of inputs d.
        indices: multi-indices to carry (tuples of axes in [0, d)); the set is
            closed under sub-multisets automatically (u_xx needs u_x), and ()
            is always stream 0. Streams are ordered by order, then lexically.
    """

    def __init__(self, dim: int, indices: Iterable[Sequence[int]] = ()):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive int (the number of inputs)")
        closed: set[MultiIndex] = {()}
        for index in indices:
            mi = tuple(sorted(int(a) for a in index))
            bad = [a for a in mi if not 0 <= a < dim]
            if bad:
                raise ValueError(
                    f"multi-index {tuple(index)} has axes {bad} outside [0, {dim}); "
                    f"a jet over {dim} inputs can only differentiate along axes 0..{dim - 1}"
                )
            for r in range(len(mi) + 1):
                closed.update(itertools.combinations(mi, r))
        self.dim = dim
        self.indices: tuple[MultiIndex, ...] = tuple(sorted(closed, key=lambda m: (len(m), m)))
        self._position = {mi: i for i, mi in enumerate(self.indices)}
        self._compose_terms = [self._faa_di_bruno_terms(mi) for mi in self.indices]
        self._product_terms = [self._leibniz_terms(mi) for mi in self.indices]
        # Every stream s > 0 has the one-block term f'(z_0) z_s; `compose_streams` and
        # `compose_vjp` treat those as one batched product and loop over the rest only.
        self._higher_terms: tuple[tuple[int, int, int, tuple[int, ...]], ...] = tuple(
            (s, m, k, blocks) for s, terms in enumerate(self._compose_terms) for m, k, blocks in terms if k >= 2
        )

    @property
    def size(self) -> int:
        """Number of streams S (value included)."""
        return len(self.indices)

    @property
    def order(self) -> int:
        """Highest derivative order carried."""
        return len(self.indices[-1])

    def index(self, mi: Sequence[int]) -> int:
        """Stream position of multi-index `mi`."""
        key = tuple(sorted(mi))
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(
                f"derivative {key} is not carried by this jet; carried: {list(self.indices)}"
            ) from None

    def __contains__(self, mi: Sequence[int]) -> bool:
        return tuple(sorted(mi)) in self._position

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JetSpec) and (self.dim, self.indices) == (other.dim, other.indices)

    def __hash__(self) -> int:
        return hash((self.dim, self.indices))

    def __repr__(self) -> str:
        return f"JetSpec(dim={self.dim}, indices={list(self.indices[1:])})"

    @classmethod
    def from_names(cls, names: Iterable[str], input_names: Sequence[str]) -> JetSpec:
        """Build a spec from derivative names such as "x", "xt", "xxxx".

        Each character of a name is one single-letter input name; with
        multi-letter input names pass multi-indices to the constructor instead.
        """
        axis = {name: i for i, name in enumerate(input_names)}
        if any(len(name) != 1 for name in input_names):
            raise ValueError(
                f"input_names={tuple(input_names)} are not single letters, so derivative names "
                "cannot be spelled letter by letter; pass multi-indices to JetSpec(dim, indices)"
            )
        indices = []
        for name in names:
            unknown = [c for c in name if c not in axis]
            if unknown or not name:
                raise ValueError(
                    f"derivative name {name!r} uses {unknown or 'no'} letters outside the inputs "
                    f"{tuple(input_names)}; spell it with those letters, e.g. {input_names[0] * 2!r}"
                )
            indices.append(tuple(axis[c] for c in name))
        return cls(len(input_names), indices)

    def name_of(self, mi: Sequence[int], input_names: Sequence[str]) -> str:
        """Spell multi-index `mi` with input names, e.g. (0, 1) -> "xt"."""
        return "".join(input_names[a] for a in sorted(mi))

    # Term tables are computed once per spec (not cached globally): the
    # duplicates among set partitions are merged into multiplicities, so
    # d^4 f(z) costs 5 terms instead of 15.
    def _faa_di_bruno_terms(self, mi: MultiIndex) -> list[_Term]:
        if not mi:
            return []
        counts: Counter = Counter()
        for partition in _set_partitions(list(range(len(mi)))):
            blocks = tuple(sorted(self._position[tuple(mi[p] for p in b)] for b in partition))
            counts[(len(partition), blocks)] += 1
        return [(m, k, blocks) for (k, blocks), m in sorted(counts.items())]

    def _leibniz_terms(self, mi: MultiIndex) -> list[_Term]:
        counts: Counter = Counter()
        positions = range(len(mi))
        for r in range(len(mi) + 1):
            for left in itertools.combinations(positions, r):
                right = tuple(p for p in positions if p not in left)
                pair = (
                    self._position[tuple(mi[p] for p in left)],
                    self._position[tuple(mi[p] for p in right)],
                )
                counts[pair] += 1
        return [(m, 2, pair) for pair, m in sorted(counts.items())]


def _check_spec(a: Jet, b: Jet) -> None:
    if a.spec != b.spec:
        raise ValueError(f"cannot combine jets with different specs {a.spec} and {b.spec}")


class Jet:
    """A field and its input derivatives: streams (S, N, w) described by `spec`.

    Arithmetic with plain tensors or numbers treats them as constants in x.
    """

    __slots__ = ("streams", "spec")

    def __init__(self, streams: torch.Tensor, spec: JetSpec):
        if streams.dim() < 2 or streams.shape[0] != spec.size:
            raise ValueError(
                f"streams of shape {tuple(streams.shape)} do not match {spec}: "
                f"expected (S={spec.size}, N, ...)"
            )
        self.streams = streams
        self.spec = spec

    # --- construction and access -------------------------------------------------
    @classmethod
    def input(cls, x: torch.Tensor, spec: JetSpec) -> Jet:
        """The jet of the inputs themselves: x (N, d) -> streams (S, N, d)."""
        if x.dim() != 2 or x.shape[1] != spec.dim:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (N, {spec.dim}) for {spec}")
        streams = x.new_zeros((spec.size, *x.shape))
        streams[0] = x
        for axis in range(spec.dim):
            if (axis,) in spec:
                streams[spec.index((axis,)), :, axis] = 1
        return cls(streams, spec)

    @classmethod
    def constant(cls, value: torch.Tensor, spec: JetSpec) -> Jet:
        """A jet whose derivatives vanish: value (N, w)."""
        streams = value.new_zeros((spec.size, *value.shape))
        streams[0] = value
        return cls(streams, spec)

    @property
    def value(self) -> torch.Tensor:
        """Stream 0, shape (N, w)."""
        return self.streams[0]

    @property
    def shape(self) -> torch.Size:
        """Shape of one stream, (N, w)."""
        return self.streams.shape[1:]

    def d(self, mi: Sequence[int]) -> torch.Tensor:
        """The derivative stream d^mi, shape (N, w)."""
        return self.streams[self.spec.index(mi)]

    def __getitem__(self, key) -> Jet:
        """Index every stream like a (N, w) tensor, e.g. jet[:, 0:1] picks field 0."""
        key = key if isinstance(key, tuple) else (key,)
        return Jet(self.streams[(slice(None), *key)], self.spec)

    @staticmethod
    def cat(jets: Sequence[Jet], dim: int = -1) -> Jet:
        """Concatenate jets along a stream dimension (default: fields)."""
        for other in jets[1:]:
            _check_spec(jets[0], other)
        dim = dim if dim < 0 else dim + 1
        return Jet(torch.cat([j.streams for j in jets], dim=dim), jets[0].spec)

    def detach(self) -> Jet:
        return Jet(self.streams.detach(), self.spec)

    def __repr__(self) -> str:
        return f"Jet(shape={tuple(self.shape)}, {self.spec})"

    # --- maps ---------------------------------------------------------------------
    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Jet:
        """z = a W^T + b on every stream; the bias enters the value stream only.

        weight (out, in), bias (out,) -> Jet with streams (S, N, out).
        """
        out = self.streams @ weight.T
        if bias is not None:
            out = torch.cat([(out[0] + bias).unsqueeze(0), out[1:]])
        return Jet(out, self.spec)

    def map(self, fn: Activation | str | Callable[[torch.Tensor, int], list[torch.Tensor]]) -> Jet:
        """Apply an elementwise function through Faa di Bruno's formula.

        fn: an Activation (or its name), or a callable (z, order) -> [f(z), ..., f^(order)(z)].
        """
        if isinstance(fn, (str, Activation)):
            fn = get_activation(fn).derivatives
        z = self.streams
        return Jet(compose_streams(z, fn(z[0], self.spec.order), self.spec), self.spec)

    # --- arithmetic ---------------------------------------------------------------
    def _mul_jet(self, other: Jet) -> Jet:
        _check_spec(self, other)
        # unbind, not a[i]: autograd's backward of an index allocates and zero-fills a whole (S, N, w)
        # per use, of unbind one stack for all the streams
        a, b = self.streams.unbind(0), other.streams.unbind(0)
        out = []
        for terms in self.spec._product_terms:
            acc = None
            for multiplicity, _, (i, j) in terms:
                term = a[i] * b[j]
                if multiplicity != 1:
                    term = multiplicity * term
                acc = term if acc is None else acc + term
            out.append(acc)
        return Jet(torch.stack(out), self.spec)

    def __add__(self, other) -> Jet:
        if isinstance(other, Jet):
            _check_spec(self, other)
            return Jet(self.streams + other.streams, self.spec)
        # a constant shifts the value stream only
        value = self.streams[0] + other
        rest = self.streams[1:].expand(-1, *value.shape) if value.shape != self.shape else self.streams[1:]
        return Jet(torch.cat([value.unsqueeze(0), rest]), self.spec)

    __radd__ = __add__

    def __neg__(self) -> Jet:
        return Jet(-self.streams, self.spec)

    def __sub__(self, other) -> Jet:
        return self + (-other)

    def __rsub__(self, other) -> Jet:
        return (-self) + other

    def __mul__(self, other) -> Jet:
        if isinstance(other, Jet):
            return self._mul_jet(other)
        return Jet(self.streams * other, self.spec)  # a constant scales every stream

    __rmul__ = __mul__

    def __truediv__(self, other) -> Jet:
        if isinstance(other, Jet):
            return self._mul_jet(other.map(_power_derivatives(-1.0)))
        return Jet(self.streams / other, self.spec)

    def __rtruediv__(self, other) -> Jet:
        return self.map(_power_derivatives(-1.0)) * other

    def __pow__(self, exponent: float) -> Jet:
        if isinstance(exponent, Jet) or isinstance(exponent, torch.Tensor):
            raise TypeError("jet ** jet is not supported; use (a.log() * b).exp()")
        if float(exponent).is_integer() and exponent >= 0:
            result = Jet.constant(torch.ones_like(self.value), self.spec)
            for _ in range(int(exponent)):
                result = result * self
            return result
        return self.map(_power_derivatives(float(exponent)))

    # --- elementary functions -------------------------------------------------------
    def sin(self) -> Jet:
        return self.map("sin")

    def cos(self) -> Jet:
        return self.map(lambda z, order: [torch.cos(z), -torch.sin(z), -torch.cos(z), torch.sin(z), torch.cos(z)][: order + 1])

    def tanh(self) -> Jet:
        return self.map("tanh")

    def exp(self) -> Jet:
        return self.map(lambda z, order: [torch.exp(z)] * (order + 1))

    def log(self) -> Jet:
        def derivs(z, order):
            return [torch.log(z)] + [
                (-1) ** (k - 1) * math.factorial(k - 1) * z ** (-k) for k in range(1, order + 1)
            ]

        return self.map(derivs)

    def sqrt(self) -> Jet:
        return self.map(_power_derivatives(0.5))

    _TORCH_UNARY = {torch.sin: "sin", torch.cos: "cos", torch.tanh: "tanh", torch.exp: "exp",
                    torch.log: "log", torch.sqrt: "sqrt"}
    _TORCH_BINARY = {torch.Tensor.__add__: "__radd__", torch.Tensor.__radd__: "__add__",
                     torch.Tensor.__mul__: "__rmul__", torch.Tensor.__rmul__: "__mul__",
                     torch.Tensor.__sub__: "__rsub__", torch.Tensor.__rsub__: "__sub__",
                     torch.Tensor.__truediv__: "__rtruediv__", torch.Tensor.__rtruediv__: "__truediv__",
                     torch.add: "__radd__", torch.mul: "__rmul__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Lets `torch.sin(jet)` and `tensor * jet` work in user code such as output transforms.
        if not kwargs and func in cls._TORCH_UNARY and len(args) == 1:
            return getattr(args[0], cls._TORCH_UNARY[func])()
        if not kwargs and func in cls._TORCH_BINARY and len(args) == 2 and isinstance(args[1], Jet):
            return getattr(args[1], cls._TORCH_BINARY[func])(args[0])
        return NotImplemented


def compose_streams(z: torch.Tensor, derivs: Sequence[torch.Tensor], spec: JetSpec) -> torch.Tensor:
    """Faa di Bruno: the streams of f(z) from z (S, N, ...) and derivs = [f(z_0), ..., f^(K)(z_0)], K >= order.

    a_0 = f(z_0);  a_s = sum over the terms (m, k, blocks) of stream s of m f^(k)(z_0) prod_b z_b.
    Differentiable by autograd when grad mode is on and an input requires grad;
    otherwise it writes into one preallocated tensor (the fused blocks' path).
    """
    size = spec.size
    d0 = derivs[0]
    if size == 1:
        return d0.unsqueeze(0)
    d1 = derivs[1]
    higher = spec._higher_terms
    tracked = z.requires_grad or any(getattr(d, "requires_grad", False) for d in derivs[: spec.order + 1])
    if (tracked and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        # (under torch.compile the out= writes below would break the graph; the compiler fuses
        # the functional form anyway)
        return compose_terms_functional(z, derivs, spec)
    out = torch.empty(z.shape, dtype=torch.result_type(z, d1), device=z.device)
    zs, outs = z.unbind(0), out.unbind(0)
    outs[0].copy_(d0)
    # stream by stream, not one broadcast (S-1, N, w) x (N, w) product: same-shape operands
    # take CUDA's vectorized elementwise kernels (the broadcast one ran at about half the
    # bandwidth on an H200); on the CPU the two forms cost the same
    for s in range(1, size):
        torch.mul(zs[s], d1, out=outs[s])
    if higher:
        for s, m, k, blocks in higher:
            term = derivs[k] * zs[blocks[0]]
            for b in blocks[1:-1]:
                term.mul_(zs[b])
            outs[s].addcmul_(term, zs[blocks[-1]], value=m)
    return out


def compose_terms_functional(z: torch.Tensor, derivs: Sequence[torch.Tensor], spec: JetSpec) -> torch.Tensor:
    """`compose_streams` in out-of-place ops only: what autograd records and what a compiler fuses
    (`pinnsketch.nn.kernels`) into one kernel."""
    d0 = derivs[0]
    if spec.size == 1:
        return d0.unsqueeze(0)
    first = z[1:] * derivs[1]
    if not spec._higher_terms:
        return torch.cat([d0.unsqueeze(0), first])
    out = [d0, *first.unbind(0)]
    zs = z.unbind(0)               # one backward stack, not a zero-filled (S, N, w) per index
    for s, m, k, blocks in spec._higher_terms:
        term = derivs[k]
        for b in blocks:
            term = term * zs[b]
        out[s] = out[s] + (term if m == 1 else m * term)
    return torch.stack(out)


def compose_vjp(z: torch.Tensor, derivs: Sequence[torch.Tensor], grad_a: torch.Tensor, spec: JetSpec,
                *, overwrite: bool = False) -> torch.Tensor:
    """Vector-Jacobian product of `compose_streams` at z: grad_a (S, N, ...) -> grad_z (S, N, ...).

    derivs = [f(z_0), ..., f^(K+1)(z_0)] with K = spec.order (one more than the
    forward map needs). Written out from the same term list, no autograd:
    for a term t = m f^(k)(z_0) prod_{b in B} z_b of stream s,
      d t / d z_0 = m f^(k+1)(z_0) prod_B z_b,
      d t / d z_b = m f^(k)(z_0) c_b z_b^(c_b - 1) prod_{B without b} z,   (c_b: times b occurs in B)
    and grad_z_j = sum over the terms of grad_a_s * d t / d z_j. The one-block
    terms f'(z_0) z_s give grad_z_s = f'(z_0) grad_a_s for every stream at once.
    overwrite=True writes the result into grad_a (which must not be needed afterwards).
    """
    d1 = derivs[1]
    zs, gas = z.unbind(0), grad_a.unbind(0)
    acc: dict[int, torch.Tensor] = {}       # k -> sum of m grad_a_s prod_B z_b over the terms with k blocks
    pending: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []   # grad_z_b += c * gd * others
    if spec.size > 1:
        # the z_0 derivative of the one-block terms f'(z_0) z_s: f''(z_0) sum_s grad_a_s z_s
        first = gas[1] * zs[1]
        for s in range(2, spec.size):
            first.addcmul_(gas[s], zs[s])
        acc[1] = first
    for s, m, k, blocks in spec._higher_terms:
        ga = gas[s] if m == 1 else gas[s] * m
        gd = ga * derivs[k]
        if k == 2:
            b0, b1 = blocks
            if b0 == b1:
                pending.append((b0, gd, zs[b0], 2))
                prod = zs[b0].square()
            else:
                pending += [(b0, gd, zs[b1], 1), (b1, gd, zs[b0], 1)]
                prod = zs[b0] * zs[b1]
        else:
            counts = Counter(blocks)
            for b, c in counts.items():
                others = None
                for b2, c2 in counts.items():
                    power = c2 if b2 != b else c2 - 1
                    if power == 0:
                        continue
                    factor = zs[b2] if power == 1 else zs[b2].pow(power)
                    others = factor if others is None else others * factor
                pending.append((b, gd, others, c))
            prod = zs[blocks[0]]
            for b in blocks[1:]:
                prod = prod * zs[b]
        if k in acc:
            acc[k].addcmul_(ga, prod)
        else:
            acc[k] = ga * prod
    # everything that reads grad_a is computed: now grad_z_s = f'(z_0) grad_a_s on every stream
    out = grad_a if overwrite else torch.empty_like(grad_a)
    outs = out.unbind(0)
    for s in range(spec.size):           # stream by stream: see compose_streams
        torch.mul(gas[s], d1, out=outs[s])
    for b, gd, others, c in pending:
        outs[b].addcmul_(gd, others, value=c)
    for k, c in acc.items():
        outs[0].addcmul_(derivs[k + 1], c)
    return out


def _power_derivatives(p: float) -> Callable[[torch.Tensor, int], list[torch.Tensor]]:
    """Derivatives of z**p: p (p-1) ... (p-k+1) z**(p-k)."""

    def derivs(z: torch.Tensor, order: int) -> list[torch.Tensor]:
        out, coefficient = [], 1.0
        for k in range(order + 1):
            out.append(coefficient * z ** (p - k))
            coefficient *= p - k
        return out

    return derivs
