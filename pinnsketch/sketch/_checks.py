"""Argument validation shared by the sketch modules (private).

Every check raises a ``ValueError`` / ``TypeError`` that names the argument,
the value received and what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

import torch

#: Floating dtypes the sketches support (QR, lstsq and FFT need at least float32).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]`` or raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    suffix = f"; {hint}" if hint else ""
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}{suffix}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be <= {maximum}{suffix}")
    return value


def check_float(name: str, value, *, positive: bool = False, nonnegative: bool = False,
                open_unit: bool = False, allow_inf: bool = False) -> float:
    """Return ``value`` as a finite ``float`` satisfying the requested sign constraint."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}={value} must be finite")
    if positive and not value > 0:
        raise ValueError(f"{name}={value} must be > 0")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name}={value} must be >= 0")
    if open_unit and not 0 < value < 1:
        raise ValueError(f"{name}={value} must lie strictly between 0 and 1")
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else list them in the error."""
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not one of {listed}")
    return value


def check_dtype(dtype) -> torch.dtype:
    """Return a supported floating dtype (``None`` means float32)."""
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; pass torch.float32 or torch.float64")
    return dtype


def check_device(device) -> torch.device:
    """Return ``torch.device(device)`` (``None`` means CPU)."""
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a valid torch device ({err})") from None


def check_seed(seed) -> int:
    """Return ``seed`` as a non-negative ``int`` (what ``torch.Generator.manual_seed`` accepts)."""
    return check_int("seed", seed, minimum=0, maximum=2**63 - 1)


def check_tensor(name: str, value, *, ndim: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Check that ``value`` is a tensor with one of the allowed numbers of dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim not in ndim:
        allowed = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {allowed}, got shape {tuple(value.shape)}")
    return value


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN or infinity (one reduction; synchronizes on CUDA)."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf); "
                         "sketches are linear, so one bad entry corrupts the whole sketch")
