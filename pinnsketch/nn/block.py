"""`DenseBlock`: one fused dense layer, act(z_prev) W^T + b on jets, with its storage policy."""

from __future__ import annotations

import math

import torch

from .activations import Activation, get_activation
from .chain import ChainCall, ChainFunction, ChainStage
from .chunking import row_chunks
from .fused import BlockCall, FusedDense, _linear, activation_jet
from .jet import JetSpec
from .storage import AbstractStorage

__all__ = ["DenseBlock"]


class DenseBlock(torch.nn.Module):
    """One fused block: act(z_prev) W^T + b with a storage policy.

    Args:
        in_features, out_features: sizes of W (out, in).
        activation: applied to the block's input (the previous layer's pre-activation);
            "identity" for the first block of a network.
        storage: an `AbstractStorage` instance owned by this block.
        init: "xavier" (Glorot normal, for tanh/sin/identity) or "kaiming" (He normal, for ReLU/GELU).
        generator: torch.Generator for the initialization (never the global RNG).
        chunk_bytes: bytes per row-chunk tensor (S, rows, width) of the fused Functions
            (None: the device default of `pinnsketch.nn.chunking`, one chunk on a GPU).
        factorized: None, or (mean, std) of random weight factorization (Wang et al.,
            "Random weight factorization improves the training of continuous neural
            representations", arXiv 2210.01274, 2022): W = diag(exp(s)) V with trainable
            s (out,) drawn from N(mean, std^2) and V = diag(exp(-s)) W_init, so the initial W
            is unchanged. `weight` is then computed from (s, V) on each access, before the
            fused Function: the storage policy sees the same block input as without it.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | Activation,
                 storage: AbstractStorage, *, init: str = "xavier", generator: torch.Generator | None = None,
                 chunk_bytes: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, factorized: tuple[float, float] | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(storage, AbstractStorage):
            raise TypeError(f"storage must be an AbstractStorage, got {type(storage).__name__}; "
                            "build one with pinnsketch.nn.make_storage(name)")
        self.in_features, self.out_features = in_features, out_features
        if chunk_bytes is not None:
            row_chunks(1, 1, chunk_bytes)          # validates
        self.chunk_bytes = chunk_bytes
        self.activation = get_activation(activation)
        self.storage = storage
        if init == "xavier":
            std = math.sqrt(2.0 / (in_features + out_features))
        elif init == "kaiming":
            std = math.sqrt(2.0 / in_features)
        else:
            raise ValueError(f"init={init!r} is not one of 'xavier', 'kaiming'")
        # drawn on the generator's device (the CPU for a model seed), then copied: the same
        # weights on every device, and no generator/device mismatch under set_default_device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.empty(out_features, in_features, dtype=dtype or torch.get_default_dtype(), device=gen_device)
        weight = torch.empty(out_features, in_features, dtype=draw.dtype, device=device)
        weight.copy_(draw.normal_(0.0, std, generator=generator))
        self.factorized = None if factorized is None else _factorization(factorized)
        if self.factorized is None:
            self.register_parameter("weight", torch.nn.Parameter(weight))
        else:
            mean, fstd = self.factorized
            s = torch.empty(out_features, dtype=draw.dtype, device=device)
            s.copy_(torch.empty(out_features, dtype=draw.dtype, device=gen_device).normal_(mean, fstd, generator=generator))
            self.weight_s = torch.nn.Parameter(s)
            self.weight_v = torch.nn.Parameter(weight * torch.exp(-s)[:, None])
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=draw.dtype, device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """W (out, in): the parameter, or exp(s)[:, None] * V under weight factorization."""
        own = self._parameters.get("weight")
        if own is not None:
            return own
        return torch.exp(self.weight_s)[:, None] * self.weight_v

    def forward(self, z_prev: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """z_prev (S, N, in) -> z (S, N, out)."""
        if z_prev.dim() != 3 or z_prev.shape[0] != spec.size or z_prev.shape[2] != self.in_features:
            raise ValueError(f"block input of shape {tuple(z_prev.shape)} does not match "
                             f"(S={spec.size}, N, {self.in_features})")
        if not torch.is_grad_enabled():
            # No backward will run (evaluation, prediction): skip the storage policy, whose
            # pack() updates persistent state (ema sketches, rank statistics) and costs a sketch.
            return _linear(activation_jet(z_prev, self.activation, spec), self.weight, self.bias)
        call = self.call(spec)
        if self.storage.rows_capable:
            return ChainFunction.apply(z_prev, ChainCall((ChainStage(call),), self.chunk_bytes), self.weight,
                                       self.bias)
        return FusedDense.apply(z_prev, self.weight, self.bias, call)

    def call(self, spec: JetSpec) -> BlockCall:
        """The non-tensor arguments of this block's fused Function for jets of `spec`."""
        return BlockCall(self.activation, spec, self.storage, self.chunk_bytes)

    def extra_repr(self) -> str:
        extra = "" if self.factorized is None else f", factorized={self.factorized}"
        return f"{self.in_features} -> {self.out_features}, activation={self.activation.name}{extra}"


def _factorization(factorized) -> tuple[float, float]:
    """(mean, std) of the random weight factorization's log-scales, validated."""
    try:
        mean, std = (float(v) for v in factorized)
    except (TypeError, ValueError):
        raise ValueError(f"factorized={factorized!r} must be (mean, std) of the log-scales s, "
                         "e.g. (1.0, 0.1)") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise ValueError(f"factorized={factorized!r} needs a finite mean and a finite std >= 0, e.g. (1.0, 0.1)")
    return mean, std
