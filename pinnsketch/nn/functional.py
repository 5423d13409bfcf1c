"""A network's jet through plain differentiable torch ops (no storage policies).

`plain_jet(model, x, spec)` computes what `model.jet(x, spec)` computes, reading
the blocks' parameters, but as ordinary autograd ops: every activation is kept
(what `storage="exact"` keeps anyway), and a compiler such as `torch.compile`
sees the whole forward and backward and can fuse the elementwise jet
arithmetic. It is the network of the compiled training step
(`pinnsketch.pinn.compiled`). Being plain autograd, it is also differentiable
any number of times: `plain_forward(model, x)`, the value alone, is the models'
`autograd_forward`, what `derivatives="autograd"` differentiates by nested autograd.
"""

from __future__ import annotations

import torch

from .activations import Identity
from .jet import Jet, JetSpec, compose_streams

__all__ = ["plain_jet", "plain_forward", "supports_plain_jet"]


def supports_plain_jet(model: torch.nn.Module) -> bool:
    """Whether `plain_jet` knows `model`'s structure (pinnsketch MLP, ResidualMLP, ModifiedMLP, PirateNet)."""
    from .gated import ModifiedMLP, PirateNet
    from .models import MLP, ResidualMLP

    return type(model) in (MLP, ResidualMLP, ModifiedMLP, PirateNet)


# A product with this few inputs or outputs is memory-bound: written as broadcast arithmetic, the
# compiler fuses it into the neighbouring elementwise kernels instead of a separate BLAS call that
# writes and rereads (S, N, width) (the coordinate input layer, a scalar output).
_NARROW = 4


def _linear(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a (S, N, in) @ weight.T (in, out) -> (S, N, out)."""
    n_out, n_in = weight.shape
    if n_in <= _NARROW:
        return sum(a[..., i:i + 1] * weight[:, i] for i in range(n_in))
    if n_out <= _NARROW:
        return torch.stack([(a * weight[j]).sum(-1) for j in range(n_out)], dim=-1)
    return a @ weight.mT


def _block(block, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
    """act(z) W^T + b on every stream, bias on stream 0: z (S, N, in) -> (S, N, out)."""
    act = block.activation
    if isinstance(act, Identity):
        a = z
    elif spec.order == 0:
        a = act(z)
    else:
        a = compose_streams(z, act.derivatives(z[0], spec.order), spec)
    out = _linear(a, block.weight)
    # out-of-place: autograd needs `out` unchanged
    return torch.cat([(out[0] + block.bias).unsqueeze(0), out[1:]])


def plain_jet(model: torch.nn.Module, x: torch.Tensor, spec: JetSpec) -> Jet:
    """x (N, d) -> Jet with streams (S, N, out), equal to `model.jet(x, spec)`.

    model: a pinnsketch `MLP` (blocks in sequence), `ResidualMLP` (x_{l+1} = x_l +
    block_l(x_l) for the hidden blocks), `ModifiedMLP` or `PirateNet` (their gates as
    ordinary ops), with its input embedding and factorized weights if it has them.
    """
    from .gated import _GatedNetwork
    from .models import ResidualMLP

    if not supports_plain_jet(model):
        raise TypeError(f"plain_jet supports pinnsketch MLP, ResidualMLP, ModifiedMLP and PirateNet, not "
                        f"{type(model).__name__}; use model.jet(x, spec)")
    if spec.dim != model.in_features:
        raise ValueError(f"spec over {spec.dim} inputs does not match in_features={model.in_features}")
    z = model._embed(Jet.input(x, spec).streams, spec)
    if isinstance(model, _GatedNetwork):
        return Jet(model.plain_streams(z, spec, _block), spec)
    blocks = list(model.blocks)
    residual = type(model) is ResidualMLP
    for i, block in enumerate(blocks):
        inner = residual and 0 < i < len(blocks) - 1
        z = z + _block(block, z, spec) if inner else _block(block, z, spec)
    return Jet(z, spec)


def plain_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (N, d) -> (N, out): `model(x)` as plain torch ops, differentiable any number of times.

    The models' `autograd_forward`. No storage policy applies: autograd keeps every activation.
    """
    if x.dim() != 2 or x.shape[1] != model.in_features:
        raise ValueError(f"x of shape {tuple(x.shape)} must be (N, {model.in_features})")
    return plain_jet(model, x, JetSpec(model.in_features)).value
