"""Fused kernels on accelerators: a block's elementwise arithmetic as one compiled kernel.

On a GPU the jet step is bound by memory traffic and kernel launches, not by the
matrix products. Eagerly, a tanh block's jet forward is about a dozen passes over
(S, N, w) (the derivatives, then the Faa di Bruno products stream by stream), its
backward two dozen, and `lowrank`'s codec another twenty (residual, row maxima,
rounding, clamping, nibble packing, and the reverse). Profiled on an H200 at
262,144 points (2-256x6-1, Burgers jet): elementwise passes were 38 of `exact`'s 83
ms per step, and the codec 47 of `lowrank`'s 155.

Each function here is written once in plain torch (the same arithmetic as the eager
path it replaces) and, on CUDA, compiled by `torch.compile` (inductor, triton) into
one or two kernels that read their inputs once. Row counts become symbolic after
the first change (torch's automatic dynamic shapes), so new point counts do not
recompile; the width and the jet layout are static. CPU tensors run the eager
code paths: there the per-chunk passes stay in cache, and compiling would need a
C++ compiler at run time.

`DeviceKernel.__call__` compiles at the first CUDA call (seconds, once per process
and variant). If compiling a variant fails (no triton, an unsupported build), the
kernel warns once and that variant runs the eager function from then on: slower,
never wrong.
"""

from __future__ import annotations

import types
import warnings

import torch

from .activations import Activation
from .jet import JetSpec, compose_terms_functional, compose_vjp

__all__ = ["DeviceKernel", "activation_jet_kernel", "activation_vjp_kernel", "lowrank_encode_kernel",
           "lowrank_decode_kernel", "fused_kernels_active"]


def fused_kernels_active(x: torch.Tensor) -> bool:
    """Whether the compiled kernels serve tensors like `x`: CUDA, outside autograd recording."""
    return x.device.type == "cuda" and not (torch.is_grad_enabled() and x.requires_grad)


class DeviceKernel:
    """A plain-torch function `fn(*tensors, **static)`, compiled on first use for CUDA tensors.

    `static` keyword arguments (ints, tuples, jet specs, activations) are constants of the compiled
    kernel. Each variant (static values, the tensors' dtypes and last dimensions) is compiled on its
    own code object, so that the variants of a long session (models, dtypes, widths) never reach
    torch's recompilation limit; the rows stay symbolic within a variant. Equal static values share
    a variant (activations compare by type and attributes, not by identity).
    """

    def __init__(self, fn):
        self.fn = fn
        self._variants: dict = {}        # key -> (compiled function, static values), or None: it failed

    @property
    def failed(self) -> bool:
        """Whether some variant failed to compile (and runs eagerly)."""
        return any(v is None for v in self._variants.values())

    def _variant(self, key, static):
        """(compiled function, static values) of variant `key`, compiled on first use."""
        entry = self._variants.get(key)
        if entry is None:
            # a copy of fn on a fresh code object: its own compilation cache
            code = self.fn.__code__.replace(co_name=f"{self.fn.__name__}_{len(self._variants)}")
            fn = types.FunctionType(code, self.fn.__globals__, code.co_name, self.fn.__defaults__,
                                    self.fn.__closure__)
            fn.__kwdefaults__ = self.fn.__kwdefaults__
            entry = self._variants[key] = (torch.compile(fn, fullgraph=True), dict(static))
        return entry

    def __call__(self, *tensors: torch.Tensor, **static):
        try:
            key = (tuple((name, _static_key(v)) for name, v in sorted(static.items())),
                   tuple((t.dtype, t.shape[-1]) for t in tensors))
        except TypeError:                    # a static value that cannot be a constant (unhashable)
            return self.fn(*tensors, **static)
        if key in self._variants and self._variants[key] is None:
            return self.fn(*tensors, **static)
        try:
            compiled, canonical = self._variant(key, static)
            return compiled(*tensors, **canonical)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the same eager arithmetic
            first = not self.failed
            self._variants[key] = None
            if first:
                warnings.warn(f"pinnsketch: compiling the fused kernel {self.fn.__name__} failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); running it eagerly from now on "
                              "(correct, slower on a GPU)", RuntimeWarning, stacklevel=2)
            return self.fn(*tensors, **static)


def _static_key(value):
    """A hashable key that is equal for equal static values (an activation: its type and attributes)."""
    if isinstance(value, Activation):
        return type(value), tuple(sorted(vars(value).items()))
    hash(value)
    return value


def _activation_jet(z: torch.Tensor, *, activation, spec: JetSpec) -> torch.Tensor:
    """a = act(z) on a jet, z (S, N, w) -> (S, N, w): `fused.activation_jet` for a smooth activation."""
    derivs = activation._derivatives(z[0], spec.order)
    return compose_terms_functional(z, derivs, spec)


def _activation_vjp(z: torch.Tensor, grad_a: torch.Tensor, *, activation, spec: JetSpec, need_a: bool):
    """(a = act(z) or None, grad_z = J_act(z)^T grad_a): `fused._activation_vjp` for a smooth activation."""
    derivs = activation._derivatives(z[0], spec.order + 1)
    a = compose_terms_functional(z, derivs, spec) if need_a else None
    return a, compose_vjp(z, derivs, grad_a, spec)


def _quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (G, m, w) -> (stored codes, scales (G, m, 1), x_hat): `IntCodec(bits)` with one scale per row.

    The same arithmetic and code layout as `codecs.IntCodec.encode` (round to nearest even of x / scale,
    codes + 8 in nibbles, low nibble first), so either side can decode the other's codes.
    """
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp(-levels, levels)
    x_hat = q * scale
    if bits == 4:
        pairs = (q + 8).view(*q.shape[:-1], q.shape[-1] // 2, 2)
        codes = (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)
    else:
        codes = q.to(torch.int8)
    return codes, scale, x_hat


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, w: int) -> torch.Tensor:
    """Inverse of `_quantize`: codes (G, m, c), scales (G, m, 1) -> (G, m, w) in the scales' dtype."""
    if bits == 4:
        c = codes.to(torch.int32)
        q = torch.stack([(c & 15) - 8, (c >> 4) - 8], dim=-1).view(*codes.shape[:-1], w)
    else:
        q = codes
    return q.to(scale.dtype) * scale


def _lowrank_encode(z: torch.Tensor, u: torch.Tensor, p: torch.Tensor, *, groups: tuple):
    """One call of `lowrank`'s encoder: z (S, m, w), U (S, m, r), basis P (S, w, r).

    groups: ((bits, first stream, end stream), ...) of the coded streams. Returns (codes and scales
    per group, alternating; the per-stream norms (S,) of z, of z - U P^T and of z - z_hat), the
    measurements of `lowrank._Measure`.
    """
    residual = z - torch.bmm(u.to(z.dtype), p.mT)
    error = residual
    parts = []
    for bits, start, stop in groups:
        codes, scale, x_hat = _quantize(residual[start:stop], bits)
        parts += [codes, scale.to(z.dtype)]
        error = torch.cat([error[:start], residual[start:stop] - x_hat, error[stop:]])
    norms = [t.square().sum(-1).sum(-1).sqrt() for t in (z, residual, error)]
    return parts, norms


def _lowrank_decode(u: torch.Tensor, p: torch.Tensor, *codes: torch.Tensor, groups: tuple, w: int) -> torch.Tensor:
    """z_hat = U P^T + the decoded residual of the coded streams: (S, m, w). codes: codes and scales per group."""
    out = torch.bmm(u.to(p.dtype), p.mT)
    pieces, at = [], 0
    for i, (bits, start, stop) in enumerate(groups):
        if start > at:
            pieces.append(out[at:start])
        pieces.append(out[start:stop] + _dequantize(codes[2 * i], codes[2 * i + 1], bits, w))
        at = stop
    if at < out.shape[0]:
        pieces.append(out[at:])
    return torch.cat(pieces)


activation_jet_kernel = DeviceKernel(_activation_jet)
activation_vjp_kernel = DeviceKernel(_activation_vjp)
lowrank_encode_kernel = DeviceKernel(_lowrank_encode)
lowrank_decode_kernel = DeviceKernel(_lowrank_decode)
