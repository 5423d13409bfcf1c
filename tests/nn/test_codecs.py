"""Compact codecs: round trips, error bounds, bit packing."""

import pytest
import torch

from pinnsketch.nn.codecs import IntCodec, make_codec, pack_mask, unpack_mask


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("w", [7, 8])
def test_int_codec_error_bound_and_size(bits, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, w, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 33, dtype=torch.float64)[:, None]
    codec = IntCodec(bits)
    parts = codec.encode(x)
    xhat = codec.decode(parts, x.shape, x.dtype)
    levels = 2 ** (bits - 1) - 1
    bound = x.abs().amax(dim=1, keepdim=True) / levels / 2          # half a quantization step per row
    assert bool(((x - xhat).abs() <= bound * (1 + 1e-9)).all())
    assert sum(p.numel() * p.element_size() for p in parts) == codec.nbytes(tuple(x.shape), x.dtype)
    if bits == 4:
        assert parts[0].dtype == torch.uint8 and parts[0].shape == (33, (w + 1) // 2)


def test_zero_rows_and_exact_codecs():
    x = torch.zeros(4, 5)
    x[1] = torch.arange(5.0)
    xhat = IntCodec(4).decode(IntCodec(4).encode(x), x.shape, x.dtype)
    assert torch.equal(xhat[0], torch.zeros(5)) and torch.isfinite(xhat).all()
    assert torch.equal(make_codec("exact").decode(make_codec("exact").encode(x), x.shape, x.dtype), x)
    bf = make_codec("bfloat16")
    torch.testing.assert_close(bf.decode(bf.encode(x), x.shape, x.dtype), x, rtol=2**-8, atol=0)


def test_unknown_codec():
    with pytest.raises(ValueError, match="int4"):
        make_codec("int2")
    with pytest.raises(ValueError, match="bits=4 or bits=8"):
        IntCodec(3)


@pytest.mark.parametrize("shape", [(3, 5), (8,), (2, 3, 7)])
def test_mask_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("w,group", [(1, None), (7, None), (20, None), (7, 2), (20, 6)])
def test_encode_decode_matches_decode_bit_for_bit(bits, w, group):
    """The lowrank policy measures its coding error (and rebuilds z_hat for audits) from
    `encode_decode`: it must be exactly `decode` of `encode`, the sign of zeros included."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, w, generator=g) * torch.logspace(-4, 4, 40)[:, None]
    x[3] = 0.0
    x[5] = -1e-9 * x[5].abs()              # rounds to -0.0 codes next to a large entry
    x[5, 0] = 1.0
    codec = IntCodec(bits, group)
    parts, x_hat = codec.encode_decode(x)
    ref = codec.encode(x)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(parts, ref))
    decoded = codec.decode(parts, x.shape, x.dtype)
    assert x_hat.is_contiguous() and x_hat.shape == x.shape
    assert torch.equal(x_hat, decoded)
    assert torch.equal(torch.signbit(x_hat), torch.signbit(decoded))
    # decode into a given buffer (the lowrank backward's path): the same values, in that buffer
    buffer = torch.full_like(x, float("nan"))
    assert codec.decode(parts, x.shape, x.dtype, out=buffer) is buffer
    assert torch.equal(buffer, decoded)


@pytest.mark.parametrize("w", [1, 2, 5, 20, 33])
def test_codes_layout_and_row_max(w):
    """Nibble layout (code 2j low, 2j+1 high, offset 8) and the halving row maximum."""
    from pinnsketch.nn.codecs import _pack_nibbles, _row_max, _unpack_nibbles

    codes = torch.randint(-7, 8, (9, w), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    packed = _pack_nibbles(codes)
    padded = torch.cat([codes, codes.new_zeros(9, w % 2)], dim=1).to(torch.int16) + 8
    assert torch.equal(packed.to(torch.int16), padded[:, 0::2] + 16 * padded[:, 1::2])
    assert torch.equal(_unpack_nibbles(packed, w), codes)
    x = torch.randn(9, 3, w, generator=torch.Generator().manual_seed(4))
    assert torch.equal(_row_max(x), x.amax(dim=-1))
