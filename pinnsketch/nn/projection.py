"""The `projection` storage policy: a random projection of the batch dimension.

For a block with activation jet a (S, N, w) and output gradient g (S, N, out),
the weight gradient is G^T A with A = [a_0; ...; a_{S-1}] stacked per point.
A test operator S (k, N) with E[S^T S] = I (`pinnsketch.sketch`) gives the
unbiased estimate

    grad_W ~ sum_s (S g_s)^T (S a_s),       E[...] = sum_s g_s^T a_s,

so the block keeps only S a (k, S*w), and regenerates S from its per-step
seed in backward to project g. With the default SRFT operator and k = N the
estimate is exact (S = R H D with R the identity is orthogonal).
"""

from __future__ import annotations

import math

import torch

from ..sketch import make_operator
from ..sketch.operators import OPERATORS
from .codecs import make_codec
from .storage import AbstractStorage, Stored, StorageError, check_finite_activation, decode_streams, \
    encode_streams, stored_bytes

__all__ = ["ProjectionStorage"]


class ProjectionStorage(AbstractStorage):
    """Keep S a (k, S*w): an unbiased random projection of the points for the weight gradient.

    Exact: grad_b, and the linear part g W of the input gradient; for ReLU and
    identity blocks the whole input gradient (1-bit mask). Approximate: the
    weight gradient (unbiased, variance ~ N/k); for smooth activations the
    nonlinearity's derivative path, which reads z_prev from a compact copy
    (`derivative` codec, default bfloat16: relative error 2^-8 per entry).

    Stores: k*S*w floats (the projection) + the compact z_prev (smooth
    activations only) + ReLU's 1-bit mask.

    Args:
        k: projected points (rows of S), 1 <= k <= N; None uses ceil(fraction * N).
        fraction: default k as a fraction of the batch.
        operator: "srft" (default; exact at k = N) | "gaussian" | "sparse".
        derivative: codec for z_prev on the derivative path: "bfloat16" | "int8" | "int4" | "exact".
    """

    name = "projection"

    def __init__(self, k: int | None = None, *, fraction: float = 0.125, operator: str = "srft",
                 derivative: str = "bfloat16"):
        super().__init__()
        self._record_options(locals())
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise StorageError(f"k={k!r} must be a positive int (projected rows) or None")
        if not 0 < fraction <= 1:
            raise StorageError(f"fraction={fraction!r} must lie in (0, 1]")
        if operator not in OPERATORS:
            raise StorageError(f"operator={operator!r} is not one of {sorted(OPERATORS)}")
        self.k, self.fraction, self.operator = k, float(fraction), operator
        self.codec = make_codec(derivative)

    def _size(self, n: int) -> int:
        k = self.k if self.k is not None else max(1, math.ceil(self.fraction * n))
        if k > n:
            raise StorageError(f"layer {self.layer}: k={k} exceeds the batch size N={n}; "
                               f"pass k <= {n} (k = N is exact with operator='srft') or storage='exact'")
        return k

    def _operator(self, k: int, n: int, like: torch.Tensor):
        return make_operator(self.operator, k, n, seed=self.step_seed("projection"), dtype=like.dtype,
                             device=like.device)

    def pack(self, z_prev, a, block):
        s, n, w = a.shape
        check_finite_activation(a, self.layer, self.name)
        k = self._size(n)
        sa = self._operator(k, n, a).apply(a.transpose(0, 1).reshape(n, s * w))     # (k, S*w)
        parts = () if block.piecewise_linear else encode_streams(self.codec, z_prev)
        self._note({"rank": k, "saved_bytes": stored_bytes([sa, *parts])})
        return (sa, *parts), (k, tuple(z_prev.shape))

    def unpack(self, saved, meta, block):
        k, shape = meta
        sa, *parts = saved
        if not parts:
            return Stored(None, {"sa": sa, "meta": meta})
        return Stored(lambda rows: decode_streams(self.codec, parts, shape, sa.dtype, rows),
                      {"sa": sa, "meta": meta})

    def weight_grad(self, grad_z, stored, block):
        k, (s, n, w) = stored.payload["meta"]
        out = grad_z.shape[-1]
        sg = self._operator(k, n, grad_z).apply(grad_z.transpose(0, 1).reshape(n, s * out))    # (k, S*out)
        return torch.einsum("kso,ksw->ow", sg.view(k, s, out), stored.payload["sa"].view(k, s, w))

    def report(self):
        return {**super().report(), "operator": self.operator}
