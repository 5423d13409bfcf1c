"""scikit-learn's 8x8 handwritten digits: real data that ships inside an installed package."""

from __future__ import annotations

import numpy as np
import torch

from .dataset import ImageDataset
from .mnist import stratified_split

__all__ = ["load_digits"]


def load_digits(*, test_fraction: float = 0.2) -> ImageDataset:
    """The 1,797 8x8 digits of `sklearn.datasets.load_digits` (pixel values 0-16), offline.

    Split deterministically by `stratified_split` (per class, the first samples in file
    order train, the last `test_fraction` test): 1,438 train / 359 test by default.

    Returns:
        ImageDataset "digits": train (1438, 1, 8, 8), test (359, 1, 8, 8) uint8, pixel_max 16.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "the 8x8 digits ship with scikit-learn, which is not installed; pip install scikit-learn"
        ) from err
    bunch = _sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = (torch.from_numpy(i) for i in stratified_split(bunch.target, test_fraction))
    return ImageDataset(
        "digits", images[train], labels[train], images[test], labels[test],
        classes=tuple(str(i) for i in range(10)), pixel_max=16, source="sklearn.datasets.load_digits",
    )
