"""The in-memory image classification dataset every loader returns, and the data errors."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ImageDataset", "DataDirectoryError", "DataFormatError"]


class DataDirectoryError(ValueError, FileNotFoundError):
    """A data directory is missing or lacks the files a loader expects.

    Subclasses both `ValueError` (bad user input) and `FileNotFoundError`, so either
    `except` clause catches it. The message names the directory searched and the files
    expected there.
    """


class DataFormatError(ValueError):
    """A data file exists but is not in the format its name promises (bad magic number,
    truncated payload, wrong keys or shapes). The message names the file and what was wrong."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A train/test split of labelled images, kept compact as integers.

    Attributes:
        name: short identifier recorded in benchmark results, e.g. "mnist", "mnist-5k".
        train_images: uint8 tensor (N_train, C, H, W), pixel values in [0, pixel_max].
        train_labels: int64 tensor (N_train,), values in [0, len(classes)).
        test_images: uint8 tensor (N_test, C, H, W).
        test_labels: int64 tensor (N_test,).
        classes: class names, index = label.
        pixel_max: the largest pixel value of the format (255 for MNIST/CIFAR, 16 for the
            scikit-learn 8x8 digits); `float(images) / pixel_max` lies in [0, 1].
        source: where the data came from (a path or a package), for records and messages.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    pixel_max: int = 255
    source: str = ""

    def __post_init__(self):
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
                raise TypeError(
                    f"{split}_images must be a uint8 tensor (N, C, H, W); got "
                    f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
                )
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
                raise TypeError(
                    f"{split}_labels must be an int64 tensor (N,); got "
                    f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}"
                )
            if images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{split} split has {images.shape[0]} images but {labels.shape[0]} labels; they must match"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
                raise ValueError(
                    f"{split}_labels span [{int(labels.min())}, {int(labels.max())}] but there are "
                    f"{len(self.classes)} classes; labels must lie in [0, {len(self.classes) - 1}]"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} must have the same (C, H, W)"
            )
        if self.pixel_max <= 0:
            raise ValueError(f"pixel_max={self.pixel_max} must be positive")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_features(self) -> int:
        """C * H * W: the input width of an MLP on flattened images."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, classes={self.num_classes}, source={self.source!r})"
        )
