"""Elementwise activations with their derivatives up to fifth order.

Forward-mode derivative jets (`pinnsketch.nn.jet`) push a function through
Faa di Bruno's formula, which needs f, f', ..., f^(k) at the same points.
Each activation computes that list in one pass, sharing work (tanh computes
tanh(z) once and expresses every derivative as a polynomial in it).
Jets carry derivatives up to fourth order; the fifth derivative serves the
hand-written backward of a fourth-order jet (`pinnsketch.nn.jet.compose_vjp`).
"""

from __future__ import annotations

import abc
import math

import torch

__all__ = ["Activation", "Tanh", "Sine", "ReLU", "GELU", "Identity", "get_activation", "ACTIVATIONS"]

MAX_ORDER = 5


class Activation(abc.ABC):
    """An elementwise function f with derivatives f', ..., f^(5).

    A subclass that provides fewer derivatives still works: the fused blocks
    then fall back to autograd for the backward of the highest jet order.
    """

    name: str

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.derivatives(z, 0)[0]

    @abc.abstractmethod
    def _derivatives(self, z: torch.Tensor, order: int) -> list[torch.Tensor]:
        """[f(z), f'(z), ..., f^(order)(z)], each shaped like z."""

    def derivatives(self, z: torch.Tensor, order: int) -> list[torch.Tensor]:
        """Return [f(z), f'(z), ..., f^(order)(z)]; `order` in 0..5."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(
                f"derivative order={order} is not supported by activation {self.name!r}; "
                f"pass an order between 0 and {MAX_ORDER}"
            )
        return self._derivatives(z, order)[: order + 1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _tanh(z: torch.Tensor) -> torch.Tensor:
    """tanh(z). On the CPU as 2 sigmoid(2z) - 1: torch's CPU tanh is not vectorized in every
    build (about 10x slower than sigmoid on 55k floats here, where it was a tenth of a PINN
    step). Absolute error within a few eps of torch.tanh (not relative near 0, which no jet
    term needs: every use multiplies t by O(1) factors); exactly +-1 far out. Elsewhere torch.tanh."""
    if z.device.type != "cpu" or not z.is_floating_point():
        return torch.tanh(z)
    return torch.sigmoid(z * 2).mul(2).sub_(1)  # sigmoid saves its output for autograd: not in place


class Tanh(Activation):
    name = "tanh"

    def _derivatives(self, z, order):
        t = _tanh(z)
        if order == 0:
            return [t]
        # every derivative is a polynomial in s = tanh' = 1 - t^2 (times t for the even ones);
        # addcmul against 0-dim constants keeps each one to one or two passes over the tensor
        one = t.new_ones(())
        s = torch.addcmul(one, t, t, value=-1)
        out = [t, s]
        if order >= 2:
            out.append(torch.addcmul(one.new_zeros(()), t, s, value=-2))           # -2 t s
        if order >= 3:
            out.append(torch.addcmul(s * 4, s, s, value=-6))                         # s (4 - 6 s)
        if order >= 4:
            out.append(torch.mul(s, -12).add_(4).mul_(out[2]))                      # 8 t s (3 s - 1)
        if order >= 5:
            out.append(torch.addcmul(s * -120, s, s, value=120).add_(16).mul_(s))   # 8 s (2 - 15 s + 15 s^2)
        return out


class Sine(Activation):
    name = "sin"

    def _derivatives(self, z, order):
        s = torch.sin(z)
        if order == 0:
            return [s]
        c = torch.cos(z)
        return [s, c, -s, -c, s, c][: order + 1]


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
        if order >= 5:
            out.append(pdf * z * (z2 * z2 - 11 * z2 + 18))
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
