"""Gated networks on jets: the modified MLP and PirateNet.

Both mix two encoder features U = act(x W_u + b_u), V = act(x W_v + b_v) into
every hidden layer through a gate g = act(p) of the layer's pre-activation p:

    H = g * U + (1 - g) * V = V + g * (U - V)            (elementwise, on jets)

Every linear map is a `DenseBlock` with the identity activation, so its input
(x, or a gated H) goes through the block's storage policy as in `MLP`. The
activations and gates act on jets through Leibniz's and Faa di Bruno's rules
(`pinnsketch.nn.jet.Jet`) inside `_Recomputed`, which saves only its inputs
(the pre-activation p and U, V, shared by all layers) *exactly*, whatever the
policy, and recomputes the jet arithmetic in backward. So against a plain MLP
of the same blocks each gated layer saves one more exact (S, N, width) tensor
(p) beside what its block's policy keeps, plus U, V and their
pre-activations once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .activations import Activation, get_activation
from .block import DenseBlock
from .functional import plain_forward
from .jet import Jet, JetSpec
from .models import StorageArg, _BlockNetwork, _check_positive, _generator_and_seed, _init_for
from .policies import make_storages
from .storage import CheckpointStorage

__all__ = ["ModifiedMLP", "PirateNet"]

Dense = Callable[[DenseBlock, torch.Tensor, JetSpec], torch.Tensor]
Op = Callable[..., torch.Tensor]


def _call_block(block: DenseBlock, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
    return block(z, spec)


@dataclass(frozen=True)
class _JetOp:
    """Non-tensor arguments of one `_Recomputed` call: which jet function, its activation and spec."""

    kind: str            # "act": act(p); "gate": b + act(p) (a - b); "residual": b + alpha (act(p) - b)
    activation: Activation
    spec: JetSpec

    def __call__(self, p: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        g = Jet(p, self.spec).map(self.activation)
        if self.kind == "act":
            return g.streams
        if self.kind == "gate":
            a, b = (Jet(t, self.spec) for t in rest)
            return (b + g * (a - b)).streams
        b, alpha = rest
        return b + (g.streams - b) * alpha          # linear in the streams: no jet product needed


class _Recomputed(torch.autograd.Function):
    """out = op(*inputs) on jet streams, saving only the inputs; backward recomputes op by autograd.

    Args of `apply`: op (a `_JetOp`), then its tensors (p, ...).
    """

    @staticmethod
    def forward(ctx, op: _JetOp, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.op = op
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return op(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        needs = ctx.needs_input_grad[1:]
        leaves = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            out = ctx.op(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ())
        result = []
        for t in leaves:
            g = next(grads) if t.requires_grad else None
            result.append(torch.zeros_like(t) if g is None and t.requires_grad else g)
        return (None, *result)


class _GatedNetwork(_BlockNetwork):
    """Shared set-up: embedding, encoder blocks U and V, hidden blocks, output block."""

    def __init__(self, in_features: int, out_features: int, width: int, depth: int, activation: str,
                 storage: StorageArg, seed, dtype, device, chunk_bytes, fourier, periodic, harmonics, factorized):
        super().__init__()
        _check_positive(in_features=in_features, out_features=out_features, width=width, depth=depth)
        self.chunk_bytes = chunk_bytes
        self.in_features, self.out_features, self.width, self.depth = in_features, out_features, width, depth
        self.activation = get_activation(activation)
        gen, storage_seed = _generator_and_seed(seed)
        first = self._input_options(in_features, fourier, periodic, harmonics, factorized, gen, dtype, device)
        sizes = self._sizes(first, width, depth, out_features)
        policies = make_storages(storage, len(sizes), storage_seed)
        init = _init_for(self.activation.name)
        self.blocks = torch.nn.ModuleList(
            DenseBlock(n_in, n_out, "identity", policies[i], init=init, generator=gen, dtype=dtype, device=device,
                       chunk_bytes=chunk_bytes, factorized=self.factorized)
            for i, (n_in, n_out) in enumerate(sizes))
        self._value_spec = JetSpec(in_features)

    @staticmethod
    def _sizes(first: int, width: int, depth: int, out: int) -> list[tuple[int, int]]:
        """(in, out) of every block, U and V first, the output block last."""
        raise NotImplementedError

    def _op(self, kind: str, spec: JetSpec, *tensors: torch.Tensor) -> torch.Tensor:
        return _Recomputed.apply(_JetOp(kind, self.activation, spec), *tensors)

    def _plain_op(self, kind: str, spec: JetSpec, *tensors: torch.Tensor) -> torch.Tensor:
        return _JetOp(kind, self.activation, spec)(*tensors)

    def _layers(self, uv: tuple[torch.Tensor, torch.Tensor], dense: Dense, op: Op) -> list:
        """The hidden part as callables (streams, spec) -> streams (one per checkpoint unit).

        dense(block, z, spec) applies a block, op(kind, spec, *tensors) a `_JetOp`: the fused
        primitives in `_forward_streams`, plain torch ops in `plain_streams`.
        """
        raise NotImplementedError

    def _streams(self, z: torch.Tensor, spec: JetSpec, dense: Dense, op: Op) -> torch.Tensor:
        """Embedded input streams (S, N, e) -> output streams (S, N, out)."""
        blocks = list(self.blocks)
        uv = op("act", spec, dense(blocks[0], z, spec)), op("act", spec, dense(blocks[1], z, spec))
        layers = self._layers(uv, dense, op)
        if (dense is _call_block and torch.is_grad_enabled()
                and all(isinstance(b.storage, CheckpointStorage) for b in blocks[2:-1])):
            length = blocks[2].storage.segment_length(len(layers))
            for start in range(0, len(layers), length):
                z = self._checkpoint_segment(layers[start:start + length], z, spec)
        else:
            for layer in layers:
                z = layer(z, spec)
        return dense(blocks[-1], z, spec)

    def _forward_streams(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """Through the blocks' storage policies, the gates in `_Recomputed`."""
        return self._streams(z, spec, _call_block, self._op)

    def plain_streams(self, z: torch.Tensor, spec: JetSpec, dense: Dense) -> torch.Tensor:
        """The same map as plain autograd ops (`pinnsketch.nn.functional.plain_jet`): `dense(block,
        z, spec)` applies a block without its policy, and the gates are ordinary ops."""
        return self._streams(z, spec, dense, self._plain_op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out), value only."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (N, {self.in_features})")
        spec = self._value_spec
        return self._forward_streams(self._embed(x.unsqueeze(0), spec), spec)[0]

    def jet(self, x: torch.Tensor, spec: JetSpec) -> Jet:
        """x (N, in) -> Jet with streams (S, N, out): outputs and the input derivatives in `spec`."""
        if spec.dim != self.in_features:
            raise ValueError(f"spec over {spec.dim} inputs does not match in_features={self.in_features}")
        return Jet(self._forward_streams(self._embed(Jet.input(x, spec).streams, spec), spec), spec)

    #: x (N, in) -> (N, out) as plain torch ops, differentiable any number of times (`MLP.autograd_forward`).
    autograd_forward = plain_forward


class ModifiedMLP(_GatedNetwork):
    """The modified MLP of Wang, Teng & Perdikaris, "Understanding and mitigating gradient flow
    pathologies in physics-informed neural networks", SIAM J. Sci. Comput. 43 (2021).

    U = act(x W_u + b_u), V = act(x W_v + b_v), H_0 = x (the embedded input);
    for l = 1..depth:  g_l = act(H_{l-1} W_l + b_l),  H_l = g_l U + (1 - g_l) V;
    out = H_depth W_out + b_out.

    Blocks (and storage lists): U, V, the `depth` hidden maps, the output map:
    `depth + 3`. What is saved exactly besides the policies: see this module's notes.
    Other arguments as `MLP` (fourier, periodic, harmonics, factorized included).
    """

    def __init__(self, in_features: int, out_features: int, width: int = 64, depth: int = 4,
                 activation: str = "tanh", storage: StorageArg = "exact", *, seed: int | torch.Generator = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 chunk_bytes: int | None = None, fourier: dict | None = None, periodic=None, harmonics: int = 1,
                 factorized: tuple[float, float] | None = None):
        super().__init__(in_features, out_features, width, depth, activation, storage, seed, dtype, device,
                         chunk_bytes, fourier, periodic, harmonics, factorized)

    @staticmethod
    def _sizes(first, width, depth, out):
        return [(first, width), (first, width), (first, width), *[(width, width)] * (depth - 1), (width, out)]

    def _layers(self, uv, dense, op):
        u, v = uv

        def layer(block):
            return lambda h, spec: op("gate", spec, dense(block, h, spec), u, v)

        return [layer(b) for b in list(self.blocks)[2:-1]]


class PirateNet(_GatedNetwork):
    """PirateNet: gated residual blocks with adaptive skip connections (Wang, Li, Chen &
    Perdikaris, "PirateNets: physics-informed deep learning with residual adaptive
    networks", JMLR 25 (2024)).

    U, V as in `ModifiedMLP`; x_0 = the embedded input (width e); for l = 1..depth:
        f = act(x_{l-1} W_1 + b_1),  z_1 = f U + (1 - f) V,
        g = act(z_1 W_2 + b_2),      z_2 = g U + (1 - g) V,
        h = act(z_2 W_3 + b_3)       (width e),
        x_l = alpha_l h + (1 - alpha_l) x_{l-1},  alpha_l trainable, initialised at 0;
    out = x_depth W_out + b_out.

    With alpha = 0 the initial network is a linear map of the embedding, and each block
    joins in as its alpha grows. Use it with Fourier features (`fourier=...`): the skip
    path carries the embedding, so without one it carries only the raw coordinates.
    The paper's least-squares initialization of the output layer is not done here.
    Blocks (and storage lists): U, V, three per residual block, the output map: `3 depth + 3`.
    """

    def __init__(self, in_features: int, out_features: int, width: int = 64, depth: int = 3,
                 activation: str = "tanh", storage: StorageArg = "exact", *, seed: int | torch.Generator = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 chunk_bytes: int | None = None, fourier: dict | None = None, periodic=None, harmonics: int = 1,
                 factorized: tuple[float, float] | None = None):
        super().__init__(in_features, out_features, width, depth, activation, storage, seed, dtype, device,
                         chunk_bytes, fourier, periodic, harmonics, factorized)
        self.alpha = torch.nn.Parameter(torch.zeros(depth, dtype=self.blocks[0].bias.dtype,
                                                    device=self.blocks[0].bias.device))

    @staticmethod
    def _sizes(first, width, depth, out):
        return [(first, width), (first, width), *[(first, width), (width, width), (width, first)] * depth,
                (first, out)]

    def _layers(self, uv, dense, op):
        u, v = uv
        blocks = list(self.blocks)[2:-1]

        def layer(l):
            b1, b2, b3 = blocks[3 * l:3 * l + 3]

            def run(x, spec):
                z1 = op("gate", spec, dense(b1, x, spec), u, v)
                z2 = op("gate", spec, dense(b2, z1, spec), u, v)
                return op("residual", spec, dense(b3, z2, spec), x, self.alpha[l:l + 1])
            return run

        return [layer(l) for l in range(self.depth)]
