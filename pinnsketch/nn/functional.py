"""A network's jet through plain differentiable torch ops (no storage policies).

`plain_jet(model, x, spec)` computes what `model.jet(x, spec)` computes, reading
the blocks' parameters, but as ordinary autograd ops: every activation is kept
(what `storage="exact"` keeps anyway), and a compiler such as `torch.compile`
sees the whole forward and backward and can fuse the elementwise jet
arithmetic. It is the network of the compiled training step
(`pinnsketch.pinn.compiled`).
"""

from __future__ import annotations

import torch

from .activations import Identity
from .jet import Jet, JetSpec, compose_streams

__all__ = ["plain_jet", "supports_plain_jet"]


def supports_plain_jet(model: torch.nn.Module) -> bool:
    """Whether `plain_jet` knows `model`'s stage structure (pinnsketch MLP and ResidualMLP)."""
    from .models import MLP, ResidualMLP

    return type(model) in (MLP, ResidualMLP)


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


def _block(z: torch.Tensor, block, spec: JetSpec) -> torch.Tensor:
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

    model: a pinnsketch `MLP` (blocks in sequence) or `ResidualMLP`
    (x_{l+1} = x_l + block_l(x_l) for the hidden blocks), with its input embedding
    and factorized weights if it has them.
    """
    from .models import ResidualMLP

    if not supports_plain_jet(model):
        raise TypeError(f"plain_jet supports pinnsketch MLP and ResidualMLP, not {type(model).__name__}; "
                        "use model.jet(x, spec)")
    if spec.dim != model.in_features:
        raise ValueError(f"spec over {spec.dim} inputs does not match in_features={model.in_features}")
    blocks = list(model.blocks)
    z = model._embed(Jet.input(x, spec).streams, spec)
    residual = type(model) is ResidualMLP
    for i, block in enumerate(blocks):
        inner = residual and 0 < i < len(blocks) - 1
        z = z + _block(z, block, spec) if inner else _block(z, block, spec)
    return Jet(z, spec)
