"""A chain of fused dense blocks as one autograd Function, worked through in row chunks.

A PINN network acts on every collocation point separately: row i of every
block's activation depends on point i alone. `ChainFunction` uses that to bound
the working set of a training step. Forward runs the points through the
*whole* chain one chunk of rows at a time; each block's storage policy receives
its input rows as they are produced (`Packing.add`) and keeps its own form of
them (the rows themselves for `exact`, low-rank factors and codes for
`lowrank`), so no block ever holds a full-size activation, a full-size
reconstruction or a full-size temporary. Backward does the same in reverse:
per chunk, from the output gradient down through every block, reconstructing
one chunk of one block's input at a time and accumulating the weight
gradients. What is alive at the peak of a step is then the stored set, the
network's input and output, and the temporaries of one chunk.

NOTE [chunks]
    `pinnsketch.nn.chunking` sizes the chunks in bytes from the device (one
    chunk per call on a GPU). Forward and backward of one call use the same
    chunks, and a policy's per-chunk work depends on its rows only, so the
    result does not depend on the chunking beyond the summation order of the
    weight gradient.

NOTE [what is exact]
    The linear part of every input gradient (g W), the bias gradients and,
    for ReLU and identity blocks, the derivative path are exact whatever the
    policy. The weight gradient sum_s g_s^T a_s and the smooth activations'
    derivative path use the policy's reconstruction of the block input
    (exact for `exact`, approximate for `lowrank`; see each policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..sketch import SubspaceRequest, track_many
from .chunking import default_chunk_bytes, row_chunks
from .fused import BlockCall, _activation_vjp, _linear, _linear_into

__all__ = ["ChainFunction", "ChainCall", "ChainStage", "prepare_chain"]


@dataclass(frozen=True)
class ChainStage:
    """One block of a chain: z -> block(z), or z -> z + block(z) with a skip connection."""

    block: BlockCall
    residual: bool = False


@dataclass(frozen=True)
class ChainCall:
    """Non-tensor arguments of one `ChainFunction` call."""

    stages: tuple[ChainStage, ...]
    chunk_bytes: int | None = None

    def chunks(self, z: torch.Tensor, widths: list[int]) -> list[slice]:
        s, n, _ = z.shape
        budget = self.chunk_bytes if self.chunk_bytes is not None else default_chunk_bytes(z.device)
        return row_chunks(n, s * max(widths) * z.element_size(), budget)


def _stage_forward(stage: ChainStage, z: torch.Tensor, weight, bias,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, next z) for one chunk: a = act(z), next = a W^T + b (+ z with a skip), written into `out` if given."""
    a = stage.block.jet(z)
    if out is None:
        out = _linear(a, weight, bias)
    else:
        _linear_into(a, weight, bias, out)         # `out` is a row slice of a (S, N, w) buffer
    if stage.residual:
        out += z
    return a, out


def prepare_chain(stages: tuple[ChainStage, ...], z: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Give policies that ask for it (`AbstractStorage.wants_sample`) a sample of their input rows.

    A policy that encodes rows as they are produced needs what it learns from the
    whole input (lowrank: its basis) before the first row arrives; it gets that
    from a strided sample of rows run through the chain without storing anything,
    once per step and call shape (S, N, w): 8 rows per unit of width, between 256 and 2,048
    (a basis of a few dozen directions in w dimensions needs a few times w rows;
    at 32,768 points and width 256 the sample costs 1/16 of the forward).
    """
    s, n, _ = z.shape
    shapes = [(s, n, params[2 * i].shape[1]) for i in range(len(stages))]
    # one wants_sample per block and call: a policy may number the calls of a step by it
    wanting = [st.block.storage.wants_sample(st.block, shape) for st, shape in zip(stages, shapes)]
    if not any(wanting):
        return
    sample_rows = min(2048, max(256, 8 * max(w for (_, _, w), want in zip(shapes, wanting) if want)))
    stride = max(1, -(-n // sample_rows))
    requests = []
    with torch.no_grad():
        zs = z[:, ::stride]
        for i, st in enumerate(stages):
            if wanting[i]:
                requests.append(st.block.storage.prepare(zs, st.block, shapes[i]))
            if not any(wanting[i + 1:]):
                break
            _, zs = _stage_forward(st, zs, params[2 * i], params[2 * i + 1])
    # the policies' deferred basis updates of all blocks at once: one eigensolver call per kind
    # of update instead of one per block (on a GPU each costs launches and a host wait)
    track_many([r for r in requests if isinstance(r, SubspaceRequest)])


class ChainFunction(torch.autograd.Function):
    """z_0 (S, N, d) -> z_L (S, N, out) through `call.stages`; see the module notes.

    Args of `apply`: z_0, call, then (weight, bias) of every stage (bias may be None).
    """

    @staticmethod
    def forward(ctx, z0: torch.Tensor, call: ChainCall, *params: torch.Tensor) -> torch.Tensor:
        stages = call.stages
        widths = [z0.shape[2], *(p.shape[0] for p in params[0::2])]
        chunks = call.chunks(z0, widths)
        prepare_chain(stages, z0, list(params))
        packings = [st.block.storage.begin((z0.shape[0], z0.shape[1], params[2 * i].shape[1]), z0.dtype,
                                           z0.device, st.block) for i, st in enumerate(stages)]
        out = None if len(chunks) == 1 else z0.new_empty(z0.shape[0], z0.shape[1], widths[-1])
        for rows in chunks:
            z = z0 if len(chunks) == 1 else z0[:, rows]
            for i, st in enumerate(stages):
                dest = packings[i + 1].destination(rows) if i + 1 < len(stages) else None
                a, z_next = _stage_forward(st, z, params[2 * i], params[2 * i + 1], dest)
                packings[i].add(rows, z, a)
                z = z_next
            if out is None:
                out = z
            else:
                out[:, rows] = z
        saved, metas, counts = [], [], []
        for p in packings:
            tensors, meta = p.finish()
            saved += tensors
            counts.append(len(tensors))
            metas.append(meta)
        ctx.save_for_backward(*params, *saved)
        ctx.call, ctx.metas, ctx.counts, ctx.chunks = call, metas, counts, chunks
        ctx.n_params, ctx.in_shape = len(params), tuple(z0.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        call: ChainCall = ctx.call
        tensors = ctx.saved_tensors
        params, rest = tensors[:ctx.n_params], tensors[ctx.n_params:]
        stored, start = [], 0
        for st, meta, count in zip(call.stages, ctx.metas, ctx.counts):
            stored.append(st.block.storage.unpack(tuple(rest[start:start + count]), meta, st.block))
            start += count
        need_in = ctx.needs_input_grad[0]
        need_params = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(params)
        whole = len(ctx.chunks) == 1
        grad_in = None if whole or not need_in else grad_out.new_empty(ctx.in_shape)
        for rows in ctx.chunks:
            g = grad_out if whole else grad_out[:, rows]
            for i in range(len(call.stages) - 1, -1, -1):
                st, weight = call.stages[i], params[2 * i]
                need_w, need_b = need_params[2 * i], need_params[2 * i + 1]
                need_z = i > 0 or need_in
                s = g.shape[0]
                grad_a = (g.reshape(-1, g.shape[-1]) @ weight).view(s, -1, weight.shape[1]) if need_z else None
                a_hat, g_prev = _activation_vjp(st.block, stored[i].rows(rows), stored[i].mask_rows(rows), grad_a,
                                                need_a=need_w)
                if need_w:
                    part = st.block.storage.weight_grad_chunk(g, a_hat, stored[i], rows, st.block)
                    grads[2 * i] = part if grads[2 * i] is None else grads[2 * i].add_(part)
                if need_b and params[2 * i + 1] is not None:
                    part = g[0].sum(0)
                    grads[2 * i + 1] = part if grads[2 * i + 1] is None else grads[2 * i + 1].add_(part)
                if need_z:
                    g = g_prev + g if st.residual else g_prev
            if need_in:
                if whole:
                    grad_in = g
                else:
                    grad_in[:, rows] = g
        for i, st in enumerate(call.stages):
            if need_params[2 * i]:
                st.block.storage.finish_backward(stored[i], grads[2 * i], st.block)
        return (grad_in, None, *grads)
