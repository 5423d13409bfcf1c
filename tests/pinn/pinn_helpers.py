"""Small networks with known outputs for the PINN tests (imported by the test modules)."""

from __future__ import annotations

import math

import torch

from pinnsketch.nn.jet import Jet
from pinnsketch.training import Callback


class PlainMLP(torch.nn.Module):
    """A tanh MLP in plain PyTorch: forward is twice differentiable, jet uses Jet ops."""

    def __init__(self, n_in, n_out, width=16, depth=2, seed=0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        sizes = [n_in] + [width] * depth + [n_out]
        self.layers = torch.nn.ModuleList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            lin = torch.nn.Linear(a, b, dtype=dtype)
            with torch.no_grad():
                lin.weight.normal_(0, math.sqrt(2 / (a + b)), generator=gen)
                lin.bias.normal_(0, 0.1, generator=gen)
            self.layers.append(lin)

    def forward(self, x):
        for lin in self.layers[:-1]:
            x = torch.tanh(lin(x))
        return self.layers[-1](x)

    def jet(self, x, spec):
        j = Jet.input(x, spec)
        for lin in self.layers[:-1]:
            j = j.linear(lin.weight, lin.bias).tanh()
        return j.linear(self.layers[-1].weight, self.layers[-1].bias)


class FunctionNet(torch.nn.Module):
    """A 'network' computing a fixed function f (written with ops that Jets and tensors share).

    f takes X (a tensor (N, d) or a Jet) and returns (N, n_out); a dummy parameter
    lets optimizers be built.
    """

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.f(x) + 0 * self.dummy

    def jet(self, x, spec):
        return self.f(Jet.input(x, spec)) + 0 * self.dummy




class Interrupt(Callback):
    """Keep the resumable state and raise KeyboardInterrupt (like Ctrl-C) at the first step >= `at`."""

    def __init__(self, at):
        self.at, self.saved = at, None

    def on_step(self, state):
        if state.step >= self.at and self.saved is None:
            self.saved = state.state_dict()
            raise KeyboardInterrupt


def run_cli(argv) -> int:
    """Exit status of `pinnsketch` with argv, whether main returns it or argparse exits with it."""
    from pinnsketch.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
