"""Elementwise activations with their derivatives up to fourth order.

Forward-mode derivative jets (`pinnsketch.nn.jet`) push a function through
Faa di Bruno's formula, which needs f, f', ..., f^(k) at the same points.
Each activation computes that list in one pass, sharing work (tanh computes
tanh(z) once and expresses every derivative as a polynomial in it).
"""

from __future__ import annotations

import abc
import math

import torch

__all__ = ["Activation", "Tanh", "Sine", "ReLU", "GELU", "Identity", "get_activation", "ACTIVATIONS"]

MAX_ORDER = 4


class Activation(abc.ABC):
    """An elementwise function f with derivatives f', ..., f^(4)."""

    name: str

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.derivatives(z, 0)[0]

    @abc.abstractmethod
    def _derivatives(self, z: torch.Tensor, order: int) -> list[torch.Tensor]:
        """[f(z), f'(z), ..., f^(order)(z)], each shaped like z."""

    def derivatives(self, z: torch.Tensor, order: int) -> list[torch.Tensor]:
        """Return [f(z), f'(z), ..., f^(order)(z)]; `order` in 0..4."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(
                f"derivative order={order} is not supported by activation {self.name!r}; "
                f"pass an order between 0 and {MAX_ORDER}"
            )
        return self._derivatives(z, order)[: order + 1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Tanh(Activation):
    name = "tanh"

    def _derivatives(self, z, order):
        t = torch.tanh(z)
        if order == 0:
            return [t]
        s = 1 - t * t  # tanh' = 1 - tanh^2; higher derivatives are polynomials in t
        out = [t, s]
        if order >= 2:
            out.append(-2 * t * s)
        if order >= 3:
            out.append(s * (6 * t * t - 2))
        if order >= 4:
            out.append(8 * t * s * (2 - 3 * t * t))
        return out


class Sine(Activation):
    name = "sin"

    def _derivatives(self, z, order):
        s = torch.sin(z)
        if order == 0:
            return [s]
        c = torch.cos(z)
        return [s, c, -s, -c, s][: order + 1]


class ReLU(Activation):
    """max(z, 0); derivatives of order >= 2 are zero almost everywhere."""

    name = "relu"

    def _derivatives(self, z, order):
        out = [torch.relu(z)]
        if order >= 1:
            out.append((z > 0).to(z.dtype))
        zero = torch.zeros_like(z) if order >= 2 else None
        out.extend([zero] * max(order - 1, 0))
        return out


class GELU(Activation):
    """Exact (erf) GELU: z * Phi(z); derivatives via the normal density phi."""

    name = "gelu"

    def _derivatives(self, z, order):
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        out = [z * cdf]
        if order == 0:
            return out
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        z2 = z * z
        out.append(cdf + z * pdf)
        if order >= 2:
            out.append(pdf * (2 - z2))
        if order >= 3:
            out.append(pdf * z * (z2 - 4))
        if order >= 4:
            out.append(pdf * (-z2 * z2 + 7 * z2 - 4))
        return out


class Identity(Activation):
    name = "identity"

    def _derivatives(self, z, order):
        out = [z]
        if order >= 1:
            out.append(torch.ones_like(z))
        if order >= 2:
            zero = torch.zeros_like(z)
            out.extend([zero] * (order - 1))
        return out


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (Tanh, Sine, ReLU, GELU, Identity)
}


def get_activation(activation: str | Activation) -> Activation:
    """Return the activation named `activation` (or pass an Activation through)."""
    if isinstance(activation, Activation):
        return activation
    try:
        return ACTIVATIONS[activation]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} "
            "or pass a pinnsketch.nn.activations.Activation instance"
        ) from None
