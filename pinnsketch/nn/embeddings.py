"""Input embeddings on jets: periodic features and random Fourier features.

An embedding is a fixed (or trainable-frequency) map of the input coordinates
applied before a network's first dense block. Both embeddings here are
z = x C^T (a linear map of the input jet) followed by cos and sin, so their
jets are exact and cheap: the linear map acts on every stream alike and
cos/sin go through Faa di Bruno's formula (`pinnsketch.nn.jet.Jet.map`).

What they save for backward: with fixed frequencies (the default) and inputs
that do not require grad, nothing; the first dense block stores the embedded
features through its storage policy like any block input. Trainable
frequencies save the input jet and the cos/sin jets exactly (autograd).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .jet import Jet, JetSpec

__all__ = ["PeriodicEmbedding", "FourierFeatures", "Embedding"]


def _cos_sin(z: Jet) -> torch.Tensor:
    """Streams of [cos z, sin z] along the feature axis: (S, N, 2m)."""
    return torch.cat([z.cos().streams, z.sin().streams], dim=-1)


class PeriodicEmbedding(torch.nn.Module):
    """Exact periodicity: x_a -> [cos(2 pi k x_a / P_a), sin(2 pi k x_a / P_a)], k = 1..K.

    Dong & Ni, "A method for representing periodic functions and enforcing exactly
    periodic boundary conditions with deep neural networks", J. Comput. Phys. 435
    (2021). Every function of the features is P_a-periodic in x_a with all its
    derivatives, so a `ps.Periodic` condition on that axis (with the domain's
    length equal to P_a) holds by construction and may be dropped from the problem.

    Args:
        in_features: number of inputs d.
        periods: {axis: period P} for the periodic axes (axes in [0, d), periods > 0).
        harmonics: K, the number of multiples k of the base frequency per axis.
    Output: (N, d - p + 2 K p) for p periodic axes: the other axes unchanged (in
    their order), then the cosines, then the sines (axis-major, k inner).
    """

    def __init__(self, in_features: int, periods: Mapping[int, float], harmonics: int = 1, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if isinstance(harmonics, bool) or not isinstance(harmonics, int) or harmonics < 1:
            raise ValueError(f"harmonics={harmonics!r} must be a positive int (cos/sin multiples k = 1..K)")
        if not periods:
            raise ValueError("periods is empty; pass {axis: period} for at least one axis")
        for axis, period in periods.items():
            if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < in_features:
                raise ValueError(f"periodic axis {axis!r} is not an input axis in [0, {in_features})")
            if not (isinstance(period, (int, float)) and math.isfinite(period) and period > 0):
                raise ValueError(f"period {period!r} of axis {axis} must be a positive finite number "
                                 "(the length of the domain along that axis)")
        self.in_features, self.harmonics = in_features, harmonics
        self.periods = {int(a): float(p) for a, p in sorted(periods.items())}
        self.passed = [a for a in range(in_features) if a not in self.periods]
        rows = [2 * math.pi * k / p * torch.nn.functional.one_hot(torch.tensor(a), in_features).double()
                for a, p in self.periods.items() for k in range(1, harmonics + 1)]
        self.register_buffer("frequencies", torch.stack(rows).to(dtype=dtype or torch.get_default_dtype(),
                                                                  device=device))   # (K p, d)
        self.out_features = len(self.passed) + 2 * len(rows)

    def jet(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """Input streams (S, N, d) -> embedded streams (S, N, out_features)."""
        angles = Jet(z, spec).linear(self.frequencies)
        return torch.cat([z[..., self.passed], _cos_sin(angles)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, out_features) with plain torch ops."""
        angles = x @ self.frequencies.T
        return torch.cat([x[:, self.passed], torch.cos(angles), torch.sin(angles)], dim=-1)

    def extra_repr(self) -> str:
        return f"periods={self.periods}, harmonics={self.harmonics}"


class FourierFeatures(torch.nn.Module):
    """Random Fourier features: x -> [cos(x B^T), sin(x B^T)], B (m, d) with entries ~ N(0, scale^2).

    Tancik et al., "Fourier features let networks learn high frequency functions in low
    dimensional domains", NeurIPS 2020; for PINNs Wang, Wang & Perdikaris, "On the eigenvector
    bias of Fourier feature networks", CMAME 384 (2021). `scale` sets the frequencies the
    network fits easily (larger: finer detail, but noisier fits); B is drawn once from the
    given generator and saved with the model (a buffer, or a parameter when trainable).

    Args:
        in_features: number of inputs d; features: m (the output has 2m columns).
        scale: standard deviation of B's entries; trainable: learn B as well.
    """

    def __init__(self, in_features: int, features: int, scale: float, *, trainable: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features={features!r} must be a positive int (the number of frequencies)")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} must be a positive finite number (the frequencies' std)")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.empty(features, in_features, dtype=dtype or torch.get_default_dtype(), device=gen_device)
        b = draw.normal_(0.0, float(scale), generator=generator).to(device)
        if trainable:
            self.B = torch.nn.Parameter(b)
        else:
            self.register_buffer("B", b)
        self.in_features, self.features, self.scale, self.trainable = in_features, features, float(scale), trainable
        self.out_features = 2 * features

    def jet(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """Input streams (S, N, d) -> embedded streams (S, N, 2m)."""
        return _cos_sin(Jet(z, spec).linear(self.B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, 2m) with plain torch ops."""
        angles = x @ self.B.T
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def config(self) -> dict:
        """The options that rebuild this map (B itself is in the state dict)."""
        return {"features": self.features, "scale": self.scale, "trainable": self.trainable}

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scale={self.scale}, trainable={self.trainable}"


class Embedding(torch.nn.Module):
    """The input map of a block network: a periodic embedding, then Fourier features (either optional).

    Args:
        in_features: number of inputs d.
        periodic: {axis: period} or None; harmonics: K of the periodic embedding.
        fourier: {"features": m, "scale": s, "trainable": bool} or None.
        generator: draws the Fourier matrix.
    """

    def __init__(self, in_features: int, *, periodic: Mapping[int, float] | None = None, harmonics: int = 1,
                 fourier: Mapping | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.maps = torch.nn.ModuleList()
        width = in_features
        if periodic:
            self.maps.append(PeriodicEmbedding(width, periodic, harmonics, dtype=dtype, device=device))
            width = self.maps[-1].out_features
        if fourier is not None:
            unknown = set(fourier) - {"features", "scale", "trainable"}
            if unknown:
                raise ValueError(f"fourier options {sorted(unknown)} are unknown; pass features, scale, trainable")
            self.maps.append(FourierFeatures(width, fourier.get("features", 64), fourier.get("scale", 1.0),
                                             trainable=bool(fourier.get("trainable", False)), generator=generator,
                                             dtype=dtype, device=device))
            width = self.maps[-1].out_features
        self.in_features, self.out_features = in_features, width

    def jet(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """Input streams (S, N, d) -> (S, N, out_features)."""
        for m in self.maps:
            z = m.jet(z, spec)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, out_features) with plain torch ops."""
        for m in self.maps:
            x = m(x)
        return x


def periodic_axes(periodic: Mapping[str | int, float] | Sequence, input_names: Sequence[str] | None,
                  in_features: int) -> dict[int, float]:
    """{axis: period} from {input name or axis: period} (or a list of (key, period) pairs)."""
    items = periodic.items() if isinstance(periodic, Mapping) else [tuple(p) for p in periodic]
    out = {}
    for key, period in items:
        if isinstance(key, str) and not key.lstrip("-").isdigit():
            if input_names is None or key not in input_names:
                raise ValueError(f"periodic input {key!r} is not one of the inputs "
                                 f"{tuple(input_names) if input_names else '(unnamed)'}; name an input "
                                 f"or pass its axis number in [0, {in_features})")
            axis = list(input_names).index(key)
        else:
            axis = int(key)
        out[axis] = period
    return out
