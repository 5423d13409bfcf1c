"""Fused dense blocks: activation, then linear map, as one autograd Function.

A block maps the previous layer's pre-activation jet z_prev (S, N, w_in) to

    z = act(z_prev) W^T + b          (bias on the value stream only)

where act acts on the jet through Faa di Bruno's formula
(`pinnsketch.nn.jet.Jet.map`). The first block of a network takes the input
coordinates with the identity activation; the last block's output is the
network output. Fusing in this order ("activation then linear") means one
tensor per block, z_prev, serves both halves of the backward pass:

* the weight gradient  grad_W = sum_s g_s^T a_s,  a = act(z_prev);
* the input gradient   grad_z_prev = J_act(z_prev)^T (g W).

NOTE [storage]
    What forward saves (only through ``ctx.save_for_backward``):
      * W (a parameter: model state, not activation memory);
      * whatever the block's storage policy keeps of z_prev (`AbstractStorage.pack`):
        z_prev itself for "exact", sketches/codes for the others;
      * for ReLU under a non-exact policy, the sign mask of z_prev's value
        stream packed to one bit per element (`codecs.pack_mask`). ReLU's jet
        is a_s = 1[z_0 > 0] * z_s on every stream, so with the exact mask the
        derivative path is exact whatever the policy does to z_prev.
    No tensor is kept on ``ctx`` attributes: ``ctx.call`` holds the activation,
    jet spec and policy object, ``ctx.meta`` the policy's metadata (shapes,
    ranks, flags; `ema` also references its persistent sketch object, whose
    tensors it saves through ``save_for_backward`` as well).
    Backward, one block at a time, and within a block chunk by chunk over the
    points (`chunk_elements`, default 2**20 elements: a small layer is one chunk),
    so that reconstructions and recomputations are a transient of one chunk,
    never of a whole layer:
      * grad_a = g W                       exact (no activation needed);
      * z_hat  = policy.unpack(...).rows(chunk)   exact or approximate, per policy;
      * f(z_hat_0), ..., f^(K+1)(z_hat_0), then a_hat = act(z_hat) and
        grad_z_prev = J_act(z_hat)^T grad_a by the hand-written Faa di Bruno
        vjp (`jet.compose_vjp`, no autograd graph): exact iff z_hat is exact
        (always exact for ReLU and identity, see above);
      * grad_W = sum over chunks of g^T a_hat (`policy.weight_grad_chunk`), exact
        iff z_hat is exact, or the policy's own estimate (`policy.weight_grad`:
        projection, ema);
      * grad_b = sum of g's value stream   exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .activations import MAX_ORDER, Activation, Identity, ReLU, get_activation
from .codecs import pack_mask, unpack_mask
from .jet import JetSpec, compose_streams, compose_vjp
from .storage import AbstractStorage

__all__ = ["BlockCall", "FusedDense", "DenseBlock", "activation_jet"]


def activation_jet(z: torch.Tensor, activation: Activation, spec: JetSpec) -> torch.Tensor:
    """a = act(z) on a jet: z (S, N, w) -> (S, N, w) (Faa di Bruno through `Jet.map`)."""
    if isinstance(activation, Identity):
        return z
    if spec.order == 0:
        return activation(z)
    return compose_streams(z, activation.derivatives(z[0], spec.order), spec)


def _derivatives_for_vjp(activation: Activation, z0: torch.Tensor, order: int) -> list[torch.Tensor] | None:
    """[f, ..., f^(order+1)] at z0 for the hand-written vjp, or None when the activation stops short."""
    if order + 1 > MAX_ORDER:
        return None
    derivs = activation.derivatives(z0, order + 1)
    return derivs if len(derivs) == order + 2 else None


@dataclass(frozen=True)
class BlockCall:
    """Non-tensor arguments of one `FusedDense` call."""

    activation: Activation
    spec: JetSpec
    storage: AbstractStorage
    chunk_elements: int = 2**20

    @property
    def piecewise_linear(self) -> bool:
        return isinstance(self.activation, (ReLU, Identity))

    def jet(self, z: torch.Tensor) -> torch.Tensor:
        return activation_jet(z, self.activation, self.spec)


class FusedDense(torch.autograd.Function):
    """z = act(z_prev) W^T + b on jets; see NOTE [storage] in this module."""

    @staticmethod
    def forward(ctx, z_prev: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                call: BlockCall) -> torch.Tensor:
        a = call.jet(z_prev)
        z = _linear(a, weight, bias)
        saved, meta = call.storage.pack(z_prev, a, call)
        del a
        mask = ()
        if isinstance(call.activation, ReLU) and not call.storage.exact_z:
            mask = (pack_mask(z_prev[0] > 0),)
        ctx.save_for_backward(weight, *mask, *saved)
        ctx.call, ctx.meta, ctx.has_mask = call, meta, bool(mask)
        ctx.mask_shape = tuple(z_prev.shape[1:])
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        call: BlockCall = ctx.call
        weight, *saved = ctx.saved_tensors
        packed_mask = None
        if ctx.has_mask:
            packed_mask, saved = saved[0], saved[1:]
        storage = call.storage
        stored = storage.unpack(tuple(saved), ctx.meta, call)
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        s, n, _ = grad_z.shape
        grad_z_prev = grad_w = grad_b = None
        if need_w:
            grad_w = storage.weight_grad(grad_z, stored, call)        # None: accumulate over chunks
        chunked_w = need_w and grad_w is None
        chunks = _chunks(n, s * max(weight.shape), call.chunk_elements)
        whole = len(chunks) == 1
        if need_z and not whole:
            grad_z_prev = grad_z.new_empty(s, n, weight.shape[1])
        if need_z or chunked_w:
            mask = None if packed_mask is None else unpack_mask(packed_mask, ctx.mask_shape)
            for rows in chunks:
                g = grad_z if whole else grad_z[:, rows]
                grad_a = (g.reshape(-1, g.shape[-1]) @ weight).view(s, -1, weight.shape[1]) if need_z else None
                a_hat, g_prev = _activation_vjp(call, stored.rows(rows), None if mask is None else mask[rows],
                                                grad_a, need_a=chunked_w)
                if need_z:
                    if whole:
                        grad_z_prev = g_prev
                    else:
                        grad_z_prev[:, rows] = g_prev
                if chunked_w:
                    part = storage.weight_grad_chunk(g, a_hat, stored, rows, call)
                    grad_w = part if grad_w is None else grad_w.add_(part)
        if need_w:
            storage.finish_backward(stored, grad_w, call)
        if need_b:
            grad_b = grad_z[0].sum(0)
        return grad_z_prev, grad_w, grad_b, None


def _linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a (S, N, in) -> a W^T + b (S, N, out), the bias on stream 0 only; one matmul for all streams."""
    s, n, w_in = a.shape
    z = (a.reshape(s * n, w_in) @ weight.mT).view(s, n, weight.shape[0])
    if bias is not None:
        z[0] += bias
    return z


def _chunks(n: int, row_elements: int, chunk_elements: int) -> list[slice]:
    """Row slices of about `chunk_elements` elements each: the backward transient is one chunk,
    not one layer. [slice(None)] when all `n` rows fit in one chunk (a small layer)."""
    step = max(1, chunk_elements // max(1, row_elements))
    if step >= n:
        return [slice(None)]
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _activation_vjp(call: BlockCall, z: torch.Tensor | None, mask: torch.Tensor | None,
                    grad_a: torch.Tensor | None, *, need_a: bool):
    """a = act(z) on rows of the jet and the vjp grad_a -> grad_z; (a or None, grad_z or None)."""
    act = call.activation
    if isinstance(act, Identity):
        return z, grad_a
    if isinstance(act, ReLU):
        # ReLU's jet is a_s = 1[z_0 > 0] z_s on every stream: linear in z given the mask.
        if mask is None:
            mask = z[0] > 0
        mask = mask.to(grad_a.dtype if grad_a is not None else z.dtype)
        return (None if z is None or not need_a else z * mask), (None if grad_a is None else grad_a * mask)
    if grad_a is None:
        return (call.jet(z) if need_a else None), None
    spec = call.spec
    derivs = _derivatives_for_vjp(act, z[0], spec.order)
    if derivs is None:  # an activation without f^(order+1): differentiate the jet map by autograd
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            a = call.jet(z_leaf)
            (grad_z,) = torch.autograd.grad(a, z_leaf, grad_a)
        return (a.detach() if need_a else None), grad_z
    a = compose_streams(z, derivs, spec) if need_a else None
    return a, compose_vjp(z, derivs, grad_a, spec, overwrite=True)  # grad_a is this chunk's own


class DenseBlock(torch.nn.Module):
    """One fused block: act(z_prev) W^T + b with a storage policy.

    Args:
        in_features, out_features: sizes of W (out, in).
        activation: applied to the block's input (the previous layer's pre-activation);
            "identity" for the first block of a network.
        storage: an `AbstractStorage` instance owned by this block.
        init: "xavier" (Glorot normal, for tanh/sin/identity) or "kaiming" (He normal, for ReLU/GELU).
        generator: torch.Generator for the initialization (never the global RNG).
        chunk_elements: backward works through the points in chunks of about this many
            elements (S * rows * width), so the reconstruction and the recomputed
            activation are a transient of one chunk rather than one layer.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | Activation,
                 storage: AbstractStorage, *, init: str = "xavier", generator: torch.Generator | None = None,
                 chunk_elements: int = 2**20, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(storage, AbstractStorage):
            raise TypeError(f"storage must be an AbstractStorage, got {type(storage).__name__}; "
                            "build one with pinnsketch.nn.make_storage(name)")
        self.in_features, self.out_features = in_features, out_features
        self.chunk_elements = int(chunk_elements)
        self.activation = get_activation(activation)
        self.storage = storage
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        if init == "xavier":
            std = math.sqrt(2.0 / (in_features + out_features))
        elif init == "kaiming":
            std = math.sqrt(2.0 / in_features)
        else:
            raise ValueError(f"init={init!r} is not one of 'xavier', 'kaiming'")
        with torch.no_grad():
            # drawn on the generator's device (the CPU for a model seed), then copied: the same
            # weights on every device, and no generator/device mismatch under set_default_device
            gen_device = generator.device if generator is not None else torch.device("cpu")
            draw = torch.empty(out_features, in_features, dtype=self.weight.dtype, device=gen_device)
            self.weight.copy_(draw.normal_(0.0, std, generator=generator))

    def forward(self, z_prev: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """z_prev (S, N, in) -> z (S, N, out)."""
        if z_prev.dim() != 3 or z_prev.shape[0] != spec.size or z_prev.shape[2] != self.in_features:
            raise ValueError(f"block input of shape {tuple(z_prev.shape)} does not match "
                             f"(S={spec.size}, N, {self.in_features})")
        if not torch.is_grad_enabled():
            # No backward will run (evaluation, prediction): skip the storage policy, whose
            # pack() updates persistent state (ema sketches, rank statistics) and costs a sketch.
            return _linear(activation_jet(z_prev, self.activation, spec), self.weight, self.bias)
        return FusedDense.apply(z_prev, self.weight, self.bias, BlockCall(self.activation, spec, self.storage,
                                                                      self.chunk_elements))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, activation={self.activation.name}"
