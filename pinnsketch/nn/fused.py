"""Fused dense blocks: activation, then linear map, as one autograd Function.

This module holds the block arithmetic shared by every path (`activation_jet`,
`_linear`, `_activation_vjp`) and `FusedDense`, the per-block Function used by
policies that need a block's whole input at once (`ema`, `projection`; and any
block run inside a `checkpoint` segment). Policies that store rows as they come
(`exact`, `lowrank`) run whole networks through `pinnsketch.nn.chain` instead.

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
    points (`pinnsketch.nn.chunking`: sized in bytes per device; one chunk on a GPU),
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

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .activations import MAX_ORDER, Activation, Identity, ReLU
from .codecs import pack_mask, unpack_mask
from .jet import JetSpec, compose_streams, compose_vjp
from .kernels import activation_jet_kernel, activation_vjp_kernel, fused_kernels_active
from .chunking import default_chunk_bytes, row_chunks
from .storage import AbstractStorage

__all__ = ["BlockCall", "FusedDense", "activation_jet"]


def activation_jet(z: torch.Tensor, activation: Activation, spec: JetSpec) -> torch.Tensor:
    """a = act(z) on a jet: z (S, N, w) -> (S, N, w) (Faa di Bruno through `Jet.map`)."""
    if isinstance(activation, Identity):
        return z
    if spec.order == 0:
        return activation(z)
    if fused_kernels_active(z):          # one compiled kernel on a GPU (pinnsketch.nn.kernels)
        return activation_jet_kernel(z, activation=activation, spec=spec)
    return compose_streams(z, activation.derivatives(z[0], spec.order), spec)


def _has_derivatives(activation: Activation, order: int) -> bool:
    """Whether `activation` gives f^(order) (probed on one host element: no device work)."""
    return order <= MAX_ORDER and len(activation.derivatives(torch.zeros(1), order)) == order + 1


@dataclass(frozen=True)
class BlockCall:
    """Non-tensor arguments of one `FusedDense` call."""

    activation: Activation
    spec: JetSpec
    storage: AbstractStorage
    chunk_bytes: int | None = None

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
        # ReLU's exact mask, unless the policy keeps it itself (rows-capable policies do)
        if isinstance(call.activation, ReLU) and not call.storage.exact_z and not call.storage.rows_capable:
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
        budget = call.chunk_bytes if call.chunk_bytes is not None else default_chunk_bytes(grad_z.device)
        chunks = row_chunks(n, s * max(weight.shape) * grad_z.element_size(), budget)
        whole = len(chunks) == 1
        if need_z and not whole:
            grad_z_prev = grad_z.new_empty(s, n, weight.shape[1])
        if need_z or chunked_w:
            mask = None if packed_mask is None else unpack_mask(packed_mask, ctx.mask_shape)
            for rows in chunks:
                g = grad_z if whole else grad_z[:, rows]
                grad_a = (g.reshape(-1, g.shape[-1]) @ weight).view(s, -1, weight.shape[1]) if need_z else None
                a_hat, g_prev = _activation_vjp(call, stored.rows(rows),
                                                stored.mask_rows(rows) if mask is None else mask[rows],
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
    if bias is None:
        return (a.reshape(s * n, w_in) @ weight.mT).view(s, n, weight.shape[0])
    z = a.new_empty(s, n, weight.shape[0])
    _linear_into(a, weight, bias, z)
    return z


def _linear_into(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (S, N, out) = a W^T + b, the bias on stream 0 only, added inside its product (addmm):
    a separate pass over a broadcast bias costs as much as a product's output write on a GPU."""
    s, n, w_in = a.shape
    if bias is None:
        torch.mm(a[0], weight.mT, out=out[0])
    else:
        torch.addmm(bias, a[0], weight.mT, out=out[0])
    if s == 1:
        return
    rest = a[1:]
    if rest.is_contiguous() and out[1:].is_contiguous():     # the other streams in one product
        torch.mm(rest.reshape((s - 1) * n, w_in), weight.mT, out=out[1:].view((s - 1) * n, -1))
    else:
        for k in range(1, s):                # row slices of a chunked buffer: one product per stream
            torch.mm(a[k], weight.mT, out=out[k])


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
    spec, order = call.spec, call.spec.order + 1
    if fused_kernels_active(z) and _has_derivatives(act, order):   # one compiled kernel on a GPU (nn.kernels)
        return activation_vjp_kernel(z, grad_a, activation=act, spec=spec, need_a=need_a)
    derivs = act.derivatives(z[0], order) if order <= MAX_ORDER else []
    if len(derivs) != order + 1:  # an activation without f^(order+1): differentiate the jet map by autograd
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            a = call.jet(z_leaf)
            (grad_z,) = torch.autograd.grad(a, z_leaf, grad_a)
        return (a.detach() if need_a else None), grad_z
    a = compose_streams(z, derivs, spec) if need_a else None
    return a, compose_vjp(z, derivs, grad_a, spec, overwrite=True)  # grad_a is this chunk's own
