"""Reader for the IDX file format (the format of the MNIST distribution), gzipped or plain.

Layout (all integers big-endian): two zero bytes, a type code, the number of dimensions
n, then n uint32 sizes, then the values in C order.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from .dataset import DataFormatError

__all__ = ["read_idx"]

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    # Sniff the gzip magic rather than trusting the extension: files renamed by hand or
    # decompressed by a browser keep or lose ".gz" independently of their content.
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataFormatError(f"{path}: gzip stream is corrupt or truncated ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array in native byte order.

    Args:
        path: the file, e.g. ".../train-images-idx3-ubyte.gz".

    Returns:
        array of the file's shape, e.g. (N, 28, 28) uint8 for MNIST images, (N,) for labels.

    Raises:
        DataFormatError: the magic number is wrong or the payload does not match the header.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header (4-byte magic number)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(
            f"{path}: magic number {raw[:4].hex()} is not IDX; expected 0000 then a type code in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} then the number of dimensions "
            "(MNIST images start 00000803, labels 00000801)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated header; {ndim} dimensions need {header} bytes, file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{path}: header says shape {shape} of {dtype.name} ({expected} bytes with the header) "
            f"but the (decompressed) file has {len(raw)} bytes; the file is truncated or not IDX"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)
