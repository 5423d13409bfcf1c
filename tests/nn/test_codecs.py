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
