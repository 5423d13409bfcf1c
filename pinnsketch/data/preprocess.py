"""Turn stored uint8 images into network inputs: scale, standardize per channel, optionally flatten."""

from __future__ import annotations

import torch

from .dataset import ImageDataset

__all__ = ["Standardizer"]


class Standardizer:
    """Per-channel standardization with statistics of the training split.

    `x = (images / pixel_max - mean[c]) / std[c]`, so the network sees zero-mean,
    unit-variance channels whatever the pixel range of the format.

    Args:
        data: the dataset whose training split fixes mean and std.
        flatten: return (N, C*H*W) for an MLP instead of (N, C, H, W) for a CNN.
    """

    def __init__(self, data: ImageDataset, *, flatten: bool):
        x = data.train_images.to(torch.float64) / data.pixel_max  # (N, C, H, W)
        self.mean = x.mean(dim=(0, 2, 3))  # (C,)
        # A constant channel (std 0) would divide by zero; leave it centred but unscaled.
        std = x.std(dim=(0, 2, 3))
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        self.pixel_max = data.pixel_max
        self.flatten = flatten

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """images: uint8 (N, C, H, W) on any device -> dtype (N, C, H, W) or (N, C*H*W)."""
        mean = self.mean.to(device=images.device, dtype=dtype)[:, None, None]
        std = self.std.to(device=images.device, dtype=dtype)[:, None, None]
        x = (images.to(dtype) / self.pixel_max - mean) / std
        return x.flatten(1) if self.flatten else x
