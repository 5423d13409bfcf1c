"""Networks built from fused dense blocks: MLP, ResidualMLP, CNN.

Every linear map is a `DenseBlock` (activation of the previous pre-activation,
then the linear map) with its own storage policy. `forward(x)` runs the value
only (classifiers, prediction); `jet(x, spec)` pushes input-derivative streams
through the same blocks so that a PINN loss with u_x, u_xx trains through a
first-order backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .activations import get_activation
from .block import DenseBlock, _factorization
from .chain import ChainCall, ChainFunction, ChainStage
from .embeddings import Embedding, periodic_axes
from .functional import plain_forward
from .jet import Jet, JetSpec
from .memory import MemoryMeter
from .policies import make_storages
from .storage import AbstractStorage, CheckpointStorage, read_pending
from ..sketch import derive_seed

__all__ = ["MLP", "ResidualMLP", "CNN"]

StorageArg = str | AbstractStorage | Sequence[str | AbstractStorage]
Stage = Callable[[torch.Tensor, JetSpec], torch.Tensor]


def _generator_and_seed(seed: int | torch.Generator) -> tuple[torch.Generator, int]:
    """A local generator for the initialization and an integer seed for the storage policies."""
    if isinstance(seed, torch.Generator):
        gen = seed
        # device= explicitly: under torch.set_default_device("cuda") a draw would go to the GPU
        storage_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        return gen, storage_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int or a torch.Generator")
    # a CPU generator whatever the default device: the same seed gives the same weights on every device
    return torch.Generator(device="cpu").manual_seed(seed), derive_seed(seed, "storage")


def _init_for(activation: str) -> str:
    return "kaiming" if get_activation(activation).name in ("relu", "gelu") else "xavier"


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


class _Recomputing(contextlib.AbstractContextManager):
    """Recompute context for checkpoint: flags that the segment runs again in backward."""

    def __init__(self):
        self.active = False

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


class _BlockNetwork(torch.nn.Module):
    """Shared machinery: blocks, stages (callables on streams), checkpoint segments, reports."""

    blocks: torch.nn.ModuleList

    chunk_bytes: int | None = None

    def _input_options(self, in_features: int, fourier, periodic, harmonics: int, factorized, gen,
                       dtype, device) -> int:
        """Set up the input embedding (drawn from `gen` before the blocks) and record the options
        (`init_kwargs`); returns the width of the first block's input."""
        axes = periodic_axes(periodic, None, in_features) if periodic else None
        factorized = None if factorized is None else _factorization(factorized)
        self.embedding: Embedding | None = None
        if axes or fourier is not None:
            self.embedding = Embedding(in_features, periodic=axes, harmonics=harmonics,
                                       fourier=None if fourier is None else dict(fourier), generator=gen,
                                       dtype=dtype, device=device)
        self._options = {}
        if fourier is not None:
            self._options["fourier"] = dict(self.embedding.maps[-1].config())
        if axes:
            self._options["periodic"] = [[a, p] for a, p in self.embedding.maps[0].periods.items()]
            self._options["harmonics"] = harmonics
        if factorized is not None:
            self._options["factorized"] = list(factorized)
        self.factorized = None if factorized is None else tuple(factorized)
        return in_features if self.embedding is None else self.embedding.out_features

    @property
    def init_kwargs(self) -> dict | None:
        """JSON-able constructor arguments (storage aside) that rebuild this network (None: not recorded)."""
        if "_options" not in vars(self):
            return None
        return {"in_features": self.in_features, "out_features": self.out_features, "width": self.width,
                "depth": self.depth, "activation": self.activation.name, **self._options}

    def _embed(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        """Input streams (S, N, d) -> the first block's input streams."""
        return z if self.embedding is None else self.embedding.jet(z, spec)

    def _blocks(self) -> list[tuple[DenseBlock, bool]]:
        """The network as a chain of (block, with a skip connection z + block(z))."""
        return [(block, False) for block in self.blocks]

    def _stages(self) -> list[tuple[Stage, AbstractStorage]]:
        """The network as a chain of stages streams -> streams, with the policy of each."""
        def residual(block):
            return lambda z, spec: z + block(z, spec)

        return [(residual(b) if skip else b, b.storage) for b, skip in self._blocks()]

    def _run(self, z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        blocks = self._blocks()
        if torch.is_grad_enabled() and all(b.storage.rows_capable and not isinstance(b.storage, CheckpointStorage)
                                           for b, _ in blocks):
            # one Function for the whole network, worked through in row chunks (pinnsketch.nn.chain)
            call = ChainCall(tuple(ChainStage(b.call(spec), skip) for b, skip in blocks), self.chunk_bytes)
            params = [t for b, _ in blocks for t in (b.weight, b.bias)]
            return ChainFunction.apply(z, call, *params)
        stages = self._stages()
        i = 0
        while i < len(stages):
            policy = stages[i][1]
            if not isinstance(policy, CheckpointStorage) or not torch.is_grad_enabled():
                z = stages[i][0](z, spec)
                i += 1
                continue
            run_end = i
            while run_end < len(stages) and isinstance(stages[run_end][1], CheckpointStorage):
                run_end += 1
            length = policy.segment_length(run_end - i)
            for start in range(i, run_end, length):
                z = self._checkpoint_segment([s for s, _ in stages[start:min(start + length, run_end)]], z, spec)
            i = run_end
        return z

    @staticmethod
    def _checkpoint_segment(stages: list[Stage], z: torch.Tensor, spec: JetSpec) -> torch.Tensor:
        # Checkpoint's hooks hide the tensors a segment saves from an outer MemoryMeter;
        # when the segment is recomputed in backward, report each stage's input (what
        # its block saves) to the meter captured at forward time, until freed.
        recomputing = _Recomputing()
        meter = MemoryMeter.current()

        def segment(z):
            for stage in stages:
                if recomputing.active and meter is not None:
                    meter.track(z)
                z = stage(z, spec)
            return z

        return checkpoint(segment, z, use_reentrant=False, preserve_rng_state=False,
                          context_fn=lambda: (contextlib.nullcontext(), recomputing))

    # -- public -----------------------------------------------------------------
    def advance(self) -> None:
        """Call once per optimizer step: new per-step sketch seeds, rank-controller updates."""
        storages = [block.storage for block in self.blocks]
        read_pending(storages)           # the blocks' measurements in one host read
        for storage in storages:
            storage.advance()

    def storage_report(self) -> list[dict]:
        """One dict per block: layer, storage, rank, error_estimate, saved_bytes, ..."""
        return [block.storage.report() for block in self.blocks]

    @property
    def storages(self) -> list[AbstractStorage]:
        return [block.storage for block in self.blocks]


class MLP(_BlockNetwork):
    """Fully connected network in -> width (x depth) -> out.

    Blocks: `depth + 1` linear maps; block 0 takes the input (identity
    activation), blocks 1..depth apply `activation` to the previous
    pre-activation first. Storage: a policy name, an `AbstractStorage` (cloned
    per block) or a list of `depth + 1` of them.

    Args:
        in_features, out_features: input dimension d and number of outputs.
        width, depth: hidden width and number of hidden layers.
        activation: "tanh" | "sin" | "relu" | "gelu" (or an Activation).
        storage: see above; default "exact".
        seed: int or torch.Generator for the weights (Xavier normal for tanh/sin,
            Kaiming normal for ReLU/GELU; zero biases) and the storage seeds.
        chunk_bytes: bytes per row-chunk tensor of the training step (None: the device's
            default, `pinnsketch.nn.chunking`; one chunk per call on a GPU).
        fourier: None or {"features": m, "scale": s, "trainable": False}: random Fourier
            features of the (embedded) input (`pinnsketch.nn.embeddings.FourierFeatures`).
        periodic: None or {axis: period}: exact periodicity along those input axes with
            `harmonics` multiples of the base frequency (`pinnsketch.nn.embeddings.PeriodicEmbedding`).
        factorized: None or (mean, std): random weight factorization of every block
            (`DenseBlock`'s `factorized`).
    """

    def __init__(self, in_features: int, out_features: int, width: int = 64, depth: int = 4,
                 activation: str = "tanh", storage: StorageArg = "exact", *, seed: int | torch.Generator = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 chunk_bytes: int | None = None, fourier: dict | None = None, periodic=None, harmonics: int = 1,
                 factorized: tuple[float, float] | None = None):
        super().__init__()
        self.chunk_bytes = chunk_bytes
        _check_positive(in_features=in_features, out_features=out_features, width=width, depth=depth)
        self.in_features, self.out_features = in_features, out_features
        self.width, self.depth = width, depth
        self.activation = get_activation(activation)
        gen, storage_seed = _generator_and_seed(seed)
        first = self._input_options(in_features, fourier, periodic, harmonics, factorized, gen, dtype, device)
        sizes = [first] + [width] * self._hidden_maps(depth) + [out_features]
        n_blocks = len(sizes) - 1
        policies = make_storages(storage, n_blocks, storage_seed)
        init = _init_for(self.activation.name)
        self.blocks = torch.nn.ModuleList(
            DenseBlock(sizes[i], sizes[i + 1], "identity" if i == 0 else self.activation, policies[i],
                       init=init, generator=gen, dtype=dtype, device=device, chunk_bytes=chunk_bytes,
                       factorized=self.factorized)
            for i in range(n_blocks)
        )
        self._value_spec = JetSpec(in_features)

    @staticmethod
    def _hidden_maps(depth: int) -> int:
        """Number of hidden activations of size `width` (the network has this + 1 blocks)."""
        return depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out), value only."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (N, {self.in_features})")
        return self._run(self._embed(x.unsqueeze(0), self._value_spec), self._value_spec)[0]

    def jet(self, x: torch.Tensor, spec: JetSpec) -> Jet:
        """x (N, in) -> Jet with streams (S, N, out): outputs and the input derivatives in `spec`."""
        if spec.dim != self.in_features:
            raise ValueError(f"spec over {spec.dim} inputs does not match in_features={self.in_features}")
        return Jet(self._run(self._embed(Jet.input(x, spec).streams, spec), spec), spec)

    #: x (N, in) -> (N, out) as plain torch ops, differentiable any number of times (nested autograd,
    #: `derivatives="autograd"`); the storage policies do not apply (`pinnsketch.nn.functional`).
    autograd_forward = plain_forward


class ResidualMLP(MLP):
    """MLP with identity skip connections around the hidden blocks.

    x_0 = W_0 x + b_0;  x_{l+1} = x_l + (act(x_l) W_l^T + b_l) for l = 1..depth;
    out = act(x_depth) W_out^T + b_out ("pre-activation" residual form).

    Skip connections and storage: the sum is a jet addition, which saves
    nothing for backward, and each residual block stores its input x_l once
    (the same tensor its skip reads), so the stored tensors are those of an MLP
    with the same blocks: `depth + 2` blocks, block l's policy handles x_l.
    Storage lists therefore have `depth + 2` entries.
    """

    @staticmethod
    def _hidden_maps(depth: int) -> int:
        return depth + 1

    def _blocks(self):
        blocks = list(self.blocks)
        return [(blocks[0], False), *((b, True) for b in blocks[1:-1]), (blocks[-1], False)]


class CNN(_BlockNetwork):
    """A small CIFAR-10 network: two conv stages, then a dense head of fused blocks.

    conv(3->c1, 3x3) ReLU maxpool2 -> conv(c1->c2, 3x3) ReLU maxpool2 -> flatten (c2*8*8)
    -> dense head: DenseBlock(c2*64 -> hidden, identity), DenseBlock(hidden -> classes, ReLU).

    What is sketched: only the dense head uses the storage policies (its first
    block's input, the flattened features, is the largest dense activation; its
    second block stores the hidden pre-activation plus, for non-exact policies,
    ReLU's 1-bit mask). The conv stages are standard PyTorch layers and save
    what PyTorch saves (conv inputs, ReLU outputs, pooling indices): their
    activations are spatial maps whose low-rank structure a per-batch matrix
    sketch does not exploit, so they are left exact.

    Args:
        storage: policy (or list of 2) for the dense head.
        channels: (c1, c2); hidden: head width; num_classes: outputs.
        seed: int or torch.Generator for the initialization and storage seeds.
    """

    def __init__(self, storage: StorageArg = "exact", *, channels: tuple[int, int] = (32, 64), hidden: int = 256,
                 num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 seed: int | torch.Generator = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        _check_positive(hidden=hidden, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        if image_size % 4:
            raise ValueError(f"image_size={image_size} must be divisible by 4 (two 2x2 poolings)")
        gen, storage_seed = _generator_and_seed(seed)
        c1, c2 = channels
        opts = dict(dtype=dtype, device=device)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, c1, 3, padding=1, **opts), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c1, c2, 3, padding=1, **opts), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        with torch.no_grad():
            for conv in (self.features[0], self.features[3]):
                fan_in = conv.in_channels * 9
                draw = torch.empty(conv.weight.shape, dtype=conv.weight.dtype, device=gen.device)
                conv.weight.copy_(draw.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen))
                conv.bias.zero_()
        self.image_shape = (in_channels, image_size, image_size)
        flat = c2 * (image_size // 4) ** 2
        policies = make_storages(storage, 2, storage_seed)
        self.blocks = torch.nn.ModuleList([
            DenseBlock(flat, hidden, "identity", policies[0], init="kaiming", generator=gen, **opts),
            DenseBlock(hidden, num_classes, "relu", policies[1], init="kaiming", generator=gen, **opts),
        ])
        self._value_spec = JetSpec(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) images -> (N, num_classes) logits."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (N, {', '.join(map(str, self.image_shape))})")
        h = self.features(x).flatten(1)
        return self._run(h.unsqueeze(0), self._value_spec)[0]
