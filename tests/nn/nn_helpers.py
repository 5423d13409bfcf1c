"""Helpers for tests/nn: a plain-PyTorch twin of the block networks, nested autograd."""

import torch

from pinnsketch.nn import ResidualMLP


def plain_forward(model, x):
    """The model's function with ordinary torch ops (for nested autograd): x (N, d) -> (N, out)."""
    blocks = list(model.blocks)
    act = model.activation
    h = x @ blocks[0].weight.T + blocks[0].bias
    residual = isinstance(model, ResidualMLP)
    for block in blocks[1:-1]:
        step = act(h) @ block.weight.T + block.bias
        h = h + step if residual else step
    return act(h) @ blocks[-1].weight.T + blocks[-1].bias


def nested_derivatives(fn, x, spec):
    """Streams (S, N, out) of fn's input derivatives by nested autograd (create_graph=True)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    streams = []
    for mi in spec.indices:
        cols = []
        for c in range(out.shape[1]):
            y = out[:, c]
            for axis in mi:
                (g,) = torch.autograd.grad(y.sum(), x, create_graph=True, materialize_grads=True)
                y = g[:, axis]
            cols.append(y)
        streams.append(torch.stack(cols, dim=1))
    return torch.stack(streams)


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
