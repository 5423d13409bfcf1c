"""Compact encodings of activation matrices kept for the backward pass.

A codec turns a float matrix x (N, w) into a few smaller tensors and back:

| codec | stored per element | error |
|---|---|---|
| `ExactCodec` | the tensor itself (4 B in float32) | none |
| `BFloat16Codec` | 2 B | relative 2^-8 per element |
| `IntCodec(8)` | 1 B + one scale per row (or group) | |x - x_hat| <= max|row| / 254 |
| `IntCodec(4)` | 0.5 B (two codes per byte) + one scale per row (or group) | |x - x_hat| <= max|row| / 14 |

Integer codes are symmetric (zero maps to zero) with **one scale per row**
(per collocation point / sample), or per row and group of columns: rows
differ by orders of magnitude in PINN activations (points near a shock), and
a per-row scale keeps small rows accurate. Rounding is to nearest, so the
error is deterministic.

`pack_mask` / `unpack_mask` store a boolean matrix in one bit per element
(ReLU's derivative).
"""

from __future__ import annotations

import abc
import math
import sys

import torch

__all__ = ["AbstractCodec", "ExactCodec", "BFloat16Codec", "IntCodec", "make_codec", "CODECS",
           "pack_mask", "unpack_mask"]


class AbstractCodec(abc.ABC):
    """encode(x (N, w)) -> tuple of tensors; decode(parts, shape, dtype) -> x_hat (N, w)."""

    name: str

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode a floating matrix x (N, w)."""

    @abc.abstractmethod
    def decode(self, parts: tuple[torch.Tensor, ...], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Decode to a (N, w) matrix of `dtype`."""

    @abc.abstractmethod
    def nbytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Bytes `encode` produces for a matrix of `shape` and `dtype`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactCodec(AbstractCodec):
    name = "exact"

    def encode(self, x):
        return (x,)

    def decode(self, parts, shape, dtype):
        return parts[0].to(dtype)

    def nbytes(self, shape, dtype):
        return math.prod(shape) * torch.finfo(dtype).bits // 8


class BFloat16Codec(AbstractCodec):
    name = "bfloat16"

    def encode(self, x):
        return (x.to(torch.bfloat16),)

    def decode(self, parts, shape, dtype):
        return parts[0].to(dtype)

    def nbytes(self, shape, dtype):
        return 2 * math.prod(shape)


class IntCodec(AbstractCodec):
    """Symmetric integer codes, bits in {4, 8}, with one float scale per row or per group of columns.

    group=None: one scale per row; group=g: one scale per row and per g consecutive
    columns (finer scales follow a heavy-tailed row more closely, at w/g scales per row).
    """

    def __init__(self, bits: int, group: int | None = None):
        if bits not in (4, 8):
            raise ValueError(f"bits={bits!r} is not supported; pass bits=4 or bits=8")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2):
            raise ValueError(f"group={group!r} must be None (one scale per row) or an even int >= 2")
        self.bits, self.group = bits, group
        self.name = f"int{bits}" if group is None else f"int{bits}g{group}"
        self._levels = 2 ** (bits - 1) - 1          # codes in [-levels, levels]

    def __repr__(self) -> str:
        return f"IntCodec(bits={self.bits}, group={self.group})"

    def _groups(self, w: int) -> tuple[int, int]:
        g = w if self.group is None else self.group
        return g, -(-w // g)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, w) -> (codes as floats (N, G, g), scales (N, G)); G groups of g columns (zero-padded)."""
        n, w = x.shape
        g, ng = self._groups(w)
        xg = x if ng * g == w else torch.cat([x, x.new_zeros(n, ng * g - w)], dim=1)
        xg = xg.view(n, ng, g)
        if x.device.type == "cpu":
            magnitude = xg.abs()
            scale = _row_max(magnitude) / self._levels   # (N, G); a new tensor: magnitude is reused below
        else:
            # max |x| in one reduction, without materializing |x| (an accelerator is bandwidth-bound)
            magnitude = None
            scale = torch.linalg.vector_norm(xg, ord=math.inf, dim=-1) / self._levels
        safe = torch.where(scale > 0, scale, 1.0)
        # the same values as round(xg / safe).clamp(...); on the CPU in |x|'s buffer, no longer needed
        q = torch.div(xg, safe[:, :, None], out=magnitude).round_().clamp_(-self._levels, self._levels)
        return q, scale

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        """Float codes (N, G, g) -> the stored codes: int8 (N, G*g), or uint8 nibbles (N, ceil(G*g/2))."""
        codes = q.to(torch.int8).view(q.shape[0], -1)
        return _pack_nibbles(codes) if self.bits == 4 else codes

    def encode(self, x):
        q, scale = self._quantize(x)
        return self._pack(q), scale.to(x.dtype)

    def encode_decode(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(encode(x), decode(encode(x), x.shape, x.dtype)) for `encode` plus two in-place passes.

        The decoded (N, w) matrix (contiguous) is bit for bit what `decode` returns: the float codes
        times the scales, without converting the stored codes back.
        """
        n, w = x.shape
        q, scale = self._quantize(x)
        parts = (self._pack(q), scale.to(x.dtype))
        # + 0.0 turns round()'s -0.0 into the +0.0 that decode's integer codes give
        x_hat = q.add_(0.0).mul_(parts[1][:, :, None]).view(n, -1)
        return parts, (x_hat if x_hat.shape[1] == w else x_hat[:, :w].contiguous())

    def decode(self, parts, shape, dtype, out: torch.Tensor | None = None):
        """The (N, w) matrix of `parts`; written into `out` (N, w, contiguous, `dtype`) when given."""
        codes, scale = parts
        n, w = shape
        g, ng = self._groups(w)
        if self.bits == 4:
            codes = _unpack_nibbles(codes, ng * g)
        scale = scale.to(dtype)[:, :, None]
        if out is not None and ng * g == w:
            # integer codes times float scales: one pass, converted on the fly
            torch.mul(codes.view(n, ng, g), scale, out=out.view(n, ng, g))
            return out
        x = codes.view(n, ng, g).to(dtype).mul_(scale).view(n, ng * g)[:, :w]
        if out is None:
            return x
        return out.copy_(x)

    def nbytes(self, shape, dtype):
        n, w = shape
        g, ng = self._groups(w)
        code_bytes = n * ng * g if self.bits == 8 else n * ((ng * g + 1) // 2)
        return code_bytes + n * ng * torch.finfo(dtype).bits // 8


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """max over the last dimension: (..., g) -> (...).

    Exactly x.amax(-1) (a maximum is exact in any order). On the CPU, rows shorter than 32 by
    halving: amax over a short last dimension (g = 20 of a PINN block) measured 1.4x slower there
    than a few elementwise maxima, while from g = 32 up amax was 4-8x faster (AMD EPYC, torch 2.13);
    on an accelerator one reduction kernel beats log2(g) launches.
    """
    if x.device.type != "cpu" or x.shape[-1] >= 32:
        return x.amax(-1)
    m = x
    while m.shape[-1] > 1:
        g, h = m.shape[-1], (m.shape[-1] + 1) // 2
        m = torch.maximum(m[..., :h], m[..., g - h:])     # odd g: the middle column is in both halves
    return m[..., 0]


# Nibble packing views two int8 codes as one int16 (a single pass of integer ops instead of
# strided byte slices, ~4x faster on CPU); that needs little-endian byte order.
_LITTLE_ENDIAN = sys.byteorder == "little"


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7], (N, w) -> uint8 (N, ceil(w/2)), two 4-bit codes per byte.

    Byte j holds codes[:, 2j] + 8 in its low nibble and codes[:, 2j + 1] + 8 in its high nibble.
    """
    n, w = codes.shape
    if w % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    u = (codes + 8).contiguous()                                           # [1, 15]
    if not _LITTLE_ENDIAN:
        u = u.view(torch.uint8)
        return u[:, 0::2] | (u[:, 1::2] << 4)
    v = u.view(torch.int16)                       # low | high << 8 per pair (little-endian)
    return (v >> 4).bitwise_or_(v).to(torch.uint8)     # low byte: low | high << 4


def _unpack_nibbles(packed: torch.Tensor, w: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: uint8 (N, ceil(w/2)) -> int8 codes (N, w)."""
    if not _LITTLE_ENDIAN:
        low = (packed & 15).to(torch.int8) - 8
        high = (packed >> 4).to(torch.int8) - 8
        return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :w]
    v = packed.to(torch.int16, memory_format=torch.contiguous_format)     # a copy: free to overwrite
    pairs = (v << 4).bitwise_and_(0x0F00).bitwise_or_(v.bitwise_and_(15))   # low nibble in byte 0, high in byte 1
    codes = pairs.view(torch.int8).sub_(8)                                 # (N, 2 ceil(w/2))
    return codes if codes.shape[1] == w else codes[:, :w]


CODECS = {"exact": ExactCodec, "bfloat16": BFloat16Codec, "int8": lambda: IntCodec(8), "int4": lambda: IntCodec(4)}


def make_codec(name: str | AbstractCodec) -> AbstractCodec:
    """The codec called `name`: "exact" | "bfloat16" | "int8" | "int4" (or pass a codec through)."""
    if isinstance(name, AbstractCodec):
        return name
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]()


def _bit_weights(device: torch.device) -> torch.Tensor:
    """(1, 2, 4, ..., 128) as uint8, made on `device` (a host list copied to a GPU would wait for it)."""
    return torch.ones(8, dtype=torch.uint8, device=device).bitwise_left_shift_(
        torch.arange(8, dtype=torch.uint8, device=device))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor (any shape) -> uint8 (ceil(numel / 8),), one bit per element."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`: uint8 bits -> boolean tensor of `shape`."""
    bits = (packed[:, None] & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape)
