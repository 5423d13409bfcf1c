"""CIFAR-10 from the standard python batches (a directory, or the unextracted tarball)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .dataset import DataDirectoryError, DataFormatError, ImageDataset

__all__ = ["CIFAR10_FILES", "CIFAR10_CLASSES", "load_cifar10", "read_cifar_batch"]

CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FOLDER = "cifar-10-batches-py"
_TARBALL = "cifar-10-python.tar.gz"

# The batches are pickles. Unpickling runs whatever the file names, so only the globals
# a numpy array (and Python 2's bytes-as-latin1 encoding) need are allowed.
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(source, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (a pickled dict with b"data" and b"labels").

    Args:
        source: a path, or a binary file object.
        name: how to refer to the batch in error messages (defaults to the path).

    Returns:
        images (N, 3, 32, 32) uint8 (channel planes R, G, B, rows in order), labels (N,) int64.

    Raises:
        DataFormatError: not a pickle of that dict, or wrong dtype/shape/labels.
    """
    name = name or str(source)
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
        else:
            batch = _ArrayUnpickler(source, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise DataFormatError(f"{name}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataFormatError(f"{name}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(
            f"{name}: b'data' must be a uint8 array (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{name}: b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{name}: labels span [{labels.min()}, {labels.max()}], expected 0-9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _expected() -> str:
    names = ", ".join(CIFAR10_FILES["train"] + CIFAR10_FILES["test"])
    return f"{names} (in {_FOLDER}/ or directly), or the archive {_TARBALL}"


def _from_folder(folder: Path) -> dict[str, list]:
    out = {}
    for split, names in CIFAR10_FILES.items():
        out[split] = [read_cifar_batch(folder / n) for n in names]
    return out


def _from_tarball(path: Path) -> dict[str, list]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for names in CIFAR10_FILES.values() for n in names if n not in members]
            if missing:
                raise DataFormatError(
                    f"{path}: archive lacks {', '.join(missing)}; expected the CIFAR-10 python batches")
            return {
                split: [read_cifar_batch(io.BytesIO(tar.extractfile(members[n]).read()), f"{path}:{n}") for n in names]
                for split, names in CIFAR10_FILES.items()
            }
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataFormatError(f"{path}: not a readable tar archive ({err})") from err


def _download(root: Path) -> None:
    try:
        import torchvision
    except ImportError as err:
        raise DataDirectoryError(
            f"download=True needs torchvision, which is not installed; install it (pip install torchvision) "
            f"or place {_expected()} in {root}"
        ) from err
    root.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)


def _locate(root: Path):
    """The folder holding all six batches, or the tarball, or None."""
    names = CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
    for folder in (root / _FOLDER, root):
        if all((folder / n).is_file() for n in names):
            return folder
    if (root / _TARBALL).is_file():
        return root / _TARBALL
    return None


def load_cifar10(data_dir: str | os.PathLike, *, download: bool = False) -> ImageDataset:
    """CIFAR-10 from the python batches in `data_dir`.

    Accepts `data_dir/cifar-10-batches-py/` (torchvision's layout), the batches directly in
    `data_dir`, or the unextracted `data_dir/cifar-10-python.tar.gz`. With `download=True`
    and nothing found, fetches them with torchvision (installed, and online).

    Returns:
        ImageDataset "cifar10": train (50000, 3, 32, 32), test (10000, 3, 32, 32) uint8
        for the real files.

    Raises:
        DataDirectoryError: nothing usable in the directory (the message lists what was expected).
        DataFormatError: a batch is present but malformed.
    """
    root = Path(data_dir).expanduser()
    found = _locate(root)
    if found is None and download:
        _download(root)
        found = _locate(root)
    if found is None:
        if not root.is_dir():
            where = f"data directory {root} does not exist"
        else:
            present = [n for n in CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
                       if (root / n).is_file() or (root / _FOLDER / n).is_file()]
            where = (f"incomplete CIFAR-10 batches in {root} (found only {', '.join(present)})" if present
                     else f"no CIFAR-10 files in {root}")
        raise DataDirectoryError(
            f"{where}: expected {_expected()}; pass download=True (--download) with torchvision installed to fetch them"
        )
    batches = _from_tarball(found) if found.is_file() else _from_folder(found)
    splits = []
    for split in ("train", "test"):
        images = np.concatenate([b[0] for b in batches[split]])
        labels = np.concatenate([b[1] for b in batches[split]])
        splits += [torch.from_numpy(images), torch.from_numpy(labels)]
    return ImageDataset("cifar10", *splits, classes=CIFAR10_CLASSES, pixel_max=255, source=str(found))
