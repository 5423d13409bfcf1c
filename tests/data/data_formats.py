"""Writers of small files in the real MNIST IDX and CIFAR-10 python-batch formats (for tests).

Written independently of the readers: IDX by struct (magic, big-endian dims, big-endian
data), CIFAR by pickling the dict the CIFAR-10 distribution holds.
"""

import gzip
import pickle
import struct

import numpy as np

MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding, written independently of the reader: magic, big-endian dims, big-endian data."""
    header = struct.pack(">HBB", 0, IDX_CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, payload: bytes, gz: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)


def fake_mnist(n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def write_mnist(folder, arrays, gz, names=None):
    for stem, array in arrays.items():
        name = (names or {}).get(stem, stem)
        write(folder / (name + (".gz" if gz else "")), idx_bytes(array), gz)


def fake_cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img.png"] * n,
    }


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for seed, name in enumerate(CIFAR_NAMES):
        batches[name] = fake_cifar_batch(n, seed)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return batches


