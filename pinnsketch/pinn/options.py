"""Option objects of `pinnsketch.solve`: small frozen dataclasses validated on construction.

    ps.solve(problem,
             network=ps.Network(width=64, depth=4, activation="tanh"),
             adam=ps.Adam(steps=10_000, lr=1e-3, schedule=ps.Cosine(final=0.05)),
             lbfgs=ps.LBFGS(steps=2_000),
             points=ps.Points(domain=8_000, boundary=400, initial=400, refine=ps.RAR()))
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from .geometry import SAMPLERS

__all__ = [
    "Network",
    "Fourier",
    "Factorized",
    "Adam",
    "LBFGS",
    "SOAP",
    "Points",
    "RAR",
    "Schedule",
    "Constant",
    "Cosine",
    "Exponential",
    "WarmupExponential",
    "SCHEDULES",
]


def _positive_int(value, what: str, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{what}={value!r} must be a {'non-negative' if allow_zero else 'positive'} int")
    return value


def _positive_float(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what}={value!r} must be a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{what}={value!r} must be a positive finite number")
    return v


# --- learning-rate schedules --------------------------------------------------------------
class Schedule(abc.ABC):
    """Learning-rate factor as a pure function of the step (so a resumed run matches)."""

    @abc.abstractmethod
    def __call__(self, step: int, total: int) -> float:
        """Multiplier of the base learning rate at `step` of `total` Adam steps."""

    def config(self) -> dict:
        return {"name": type(self).__name__.lower(), **asdict(self)}


@dataclass(frozen=True)
class Constant(Schedule):
    """The base learning rate throughout."""

    def __call__(self, step, total):
        return 1.0


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine decay from 1 to `final` (a fraction of the base rate) over the Adam steps."""

    final: float = 0.05

    def __post_init__(self):
        if not 0 <= self.final <= 1:
            raise ValueError(f"Cosine final={self.final!r} must be in [0, 1] (a fraction of the base lr)")

    def __call__(self, step, total):
        progress = min(step / max(total, 1), 1.0)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Exponential(Schedule):
    """Multiply the rate by `rate` every `every` steps (smoothly)."""

    rate: float = 0.9
    every: int = 1000

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise ValueError(f"Exponential rate={self.rate!r} must be in (0, 1]")
        _positive_int(self.every, "Exponential every")

    def __call__(self, step, total):
        return self.rate ** (step / self.every)


@dataclass(frozen=True)
class WarmupExponential(Schedule):
    """Linear warm-up over `warmup` steps, then `decay_rate ** ((step - warmup) / decay_steps)`.

    The warm-up factor is (step + 1) / warmup, so no step runs at lr 0; warmup=0 skips it.
    (Wang et al. 2023, "An expert's guide to training PINNs": warm-up, then exponential decay.)
    """

    warmup: int = 1_000
    decay_rate: float = 0.9
    decay_steps: int = 2_000

    def __post_init__(self):
        _positive_int(self.warmup, "WarmupExponential warmup", allow_zero=True)
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f"WarmupExponential decay_rate={self.decay_rate!r} must be in (0, 1]")
        _positive_int(self.decay_steps, "WarmupExponential decay_steps")

    def __call__(self, step, total):
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.decay_rate ** ((step - self.warmup) / self.decay_steps)


SCHEDULES: dict[str, type[Schedule]] = {"constant": Constant, "cosine": Cosine, "exponential": Exponential,
                                        "warmupexponential": WarmupExponential}


def _schedule(schedule) -> Schedule:
    if schedule is None:
        return Constant()
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]()
    raise ValueError(
        f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or pass a Schedule "
        "(ps.Constant(), ps.Cosine(final=...), ps.Exponential(rate=..., every=...), "
        "ps.WarmupExponential(warmup=..., decay_rate=..., decay_steps=...))"
    )


# --- optimizers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Adam:
    """First phase: `steps` Adam iterations with learning rate `lr` and a schedule."""

    steps: int = 5_000
    lr: float = 1e-3
    schedule: Schedule | str | None = field(default_factory=lambda: Cosine(final=0.05))
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        _positive_int(self.steps, "Adam steps", allow_zero=True)
        _positive_float(self.lr, "Adam lr")
        object.__setattr__(self, "schedule", _schedule(self.schedule))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"Adam betas={self.betas!r} must be two numbers in [0, 1)")

    def build(self, params) -> torch.optim.Adam:
        params = list(params)
        try:
            # one fused kernel for all parameters: a PINN's parameters are many small tensors,
            # where the multi-tensor path spends several times longer in dispatch
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, fused=True)
        except RuntimeError:  # torch < 2.4 on the CPU, or a device without fused Adam
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)

    def config(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "schedule": self.schedule.config(), "betas": list(self.betas)}


@dataclass(frozen=True)
class SOAP(Adam):
    """First phase with SOAP (Adam in Shampoo's eigenbasis, `optimizers.py`) instead of Adam.

    Pass it as `adam=ps.SOAP(...)`: the same steps, schedule, resampling and refinement
    as Adam; `precondition_every` steps between eigenbasis refreshes.
    """

    betas: tuple[float, float] = (0.95, 0.95)
    precondition_every: int = 10

    def __post_init__(self):
        super().__post_init__()
        _positive_int(self.precondition_every, "SOAP precondition_every")

    def build(self, params) -> torch.optim.Optimizer:
        from .optimizers import SOAPOptimizer

        return SOAPOptimizer(list(params), lr=self.lr, betas=self.betas, precondition_every=self.precondition_every)

    def config(self) -> dict:
        return {**super().config(), "optimizer": "soap", "precondition_every": self.precondition_every}


@dataclass(frozen=True)
class LBFGS:
    """Second phase: `steps` L-BFGS iterations with a strong-Wolfe line search.

    One optimizer step runs up to `max_iter` iterations (`torch.optim.LBFGS`):
    `model.advance()` is called once per step, so the sketch test matrices
    stay fixed across the line searches and curvature pairs of those
    iterations, and the history, callbacks and resume points advance per step.
    The phase ends early when L-BFGS converges (gradient or change tolerance).

    `float64_fallback`: a float32 run whose L-BFGS stops early on anything but
    the gradient tolerance has usually met the float32 noise floor of its loss:
    no trial point of the line search lowers the loss by more than its rounding
    noise (residuals cancel terms far larger than themselves). With True (the
    default) the run then goes on in float64: the network, the PDE parameters,
    the points and the L-BFGS curvature history are cast, and cast back to the
    run's dtype when the phase ends; `history["precision"]` records the
    switches. False: stop there. The float64 steps need twice the activation
    memory (counted in the run's memory figures; the switch is skipped where
    the device lacks it, and a float64 step that runs out of memory all the
    same ends the phase with the parameters before it) and more time (on the CPU about 1.5x a float32
    iteration; consumer GPUs run float64 at a small fraction of float32's rate:
    pass False there).

    `float64_progress`: the continuation ends when an interval of
    `FLOAT64_INTERVAL` (250) iterations lowers the loss by less than this
    fraction (0: it runs to the budget). After the float32 floor, float64
    L-BFGS gains most within a few hundred iterations and then creeps (0.1-0.4 %
    per 250 iterations on heat and inverse_diffusion).
    """

    FLOAT64_INTERVAL: ClassVar[int] = 250

    steps: int = 5_000
    max_iter: int = 20
    history_size: int = 50
    lr: float = 1.0
    tolerance_grad: float = 1e-12
    tolerance_change: float = 1e-15
    max_line_search: int = 25
    float64_fallback: bool = True
    float64_progress: float = 0.01

    def __post_init__(self):
        _positive_int(self.steps, "LBFGS steps", allow_zero=True)
        _positive_int(self.max_iter, "LBFGS max_iter")
        _positive_int(self.max_line_search, "LBFGS max_line_search")
        _positive_int(self.history_size, "LBFGS history_size")
        _positive_float(self.lr, "LBFGS lr")
        if not isinstance(self.float64_fallback, bool):
            raise ValueError(f"LBFGS float64_fallback={self.float64_fallback!r} must be True or False")
        if (isinstance(self.float64_progress, bool) or not isinstance(self.float64_progress, (int, float))
                or not 0 <= self.float64_progress < 1):
            raise ValueError(f"LBFGS float64_progress={self.float64_progress!r} must be a fraction in [0, 1) "
                             "(0 runs the float64 continuation to the budget)")

    def build(self, params) -> torch.optim.LBFGS:
        return torch.optim.LBFGS(
            params, lr=self.lr, max_iter=self.max_iter, history_size=self.history_size,
            tolerance_grad=self.tolerance_grad, tolerance_change=self.tolerance_change,
            line_search_fn="strong_wolfe",
        )

    @staticmethod
    def limit(optimizer: torch.optim.LBFGS, iterations: int, max_line_search: int) -> None:
        """Cap the next step at `iterations` iterations.

        max_eval also bounds each line search (max_ls = max_eval - evaluations so far),
        so it gets room for a full line search in every iteration.
        """
        for group in optimizer.param_groups:
            group["max_iter"] = iterations
            group["max_eval"] = iterations * (1 + max_line_search)

    def config(self) -> dict:
        return asdict(self)


# --- collocation points -------------------------------------------------------------------
@dataclass(frozen=True)
class RAR:
    """Residual-based adaptive refinement (Lu et al. 2021): during Adam, every
    `every` steps evaluate |residual| on `candidates` fresh random domain points
    and add the `add` worst to the collocation set, up to `max_points` added."""

    every: int = 1_000
    candidates: int = 20_000
    add: int = 250
    max_points: int = 2_500

    def __post_init__(self):
        for name in ("every", "candidates", "add", "max_points"):
            _positive_int(getattr(self, name), f"RAR {name}")
        if self.add > self.candidates:
            raise ValueError(f"RAR add={self.add} exceeds candidates={self.candidates}; pass add <= candidates")

    def config(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Points:
    """Collocation points: counts per set, sampler, resampling and refinement.

    domain: interior points for the residual; boundary: points on the spatial
    boundary shared by the boundary conditions; initial: points at t0 for
    initial conditions. sampler: one of "hammersley", "sobol", "halton", "lhs",
    "random", "uniform" (deepxde's samplers). resample_every: draw fresh
    pseudo-random domain points every so many Adam steps (None: never; refined
    points are kept). refine: a `RAR` or None.
    """

    domain: int = 6_000
    boundary: int = 200
    initial: int = 200
    sampler: str = "hammersley"
    resample_every: int | None = None
    refine: RAR | None = None

    def __post_init__(self):
        _positive_int(self.domain, "Points domain")
        _positive_int(self.boundary, "Points boundary", allow_zero=True)
        _positive_int(self.initial, "Points initial", allow_zero=True)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.resample_every is not None:
            _positive_int(self.resample_every, "Points resample_every")
        if self.refine is not None and not isinstance(self.refine, RAR):
            raise TypeError(f"Points refine={self.refine!r} must be a ps.RAR(...) or None")

    def config(self) -> dict:
        out = asdict(self)
        out["refine"] = None if self.refine is None else self.refine.config()
        return out


@dataclass(frozen=True)
class Fourier:
    """Random Fourier features of the input (Tancik et al., NeurIPS 2020; Wang, Wang &
    Perdikaris, CMAME 384, 2021): x -> [cos(x B^T), sin(x B^T)], B (features, d) with
    entries ~ N(0, scale^2), drawn from the run's seed (`pinnsketch.nn.embeddings.FourierFeatures`).

    features: number of frequencies m (the first layer sees 2m inputs); scale: their
    standard deviation (in units of the inputs: 1 / the length scale to resolve);
    trainable: learn B too.
    """

    features: int = 64
    scale: float = 1.0
    trainable: bool = False

    def __post_init__(self):
        _positive_int(self.features, "Fourier features")
        _positive_float(self.scale, "Fourier scale")
        if not isinstance(self.trainable, bool):
            raise TypeError(f"Fourier trainable={self.trainable!r} must be True or False")

    def config(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Factorized:
    """Random weight factorization (Wang et al., "Random weight factorization improves the
    training of continuous neural representations", arXiv 2210.01274, 2022): every dense
    weight is W = diag(exp(s)) V with trainable log-scales s ~ N(mean, std^2) and V chosen so
    that the initial W is the usual Glorot draw. The storage policies are untouched: W is
    computed before each fused block."""

    mean: float = 1.0
    std: float = 0.1

    def __post_init__(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Factorized {name}={v!r} must be a finite number")
        if self.std < 0:
            raise ValueError(f"Factorized std={self.std!r} must be >= 0 (e.g. 0.1)")

    def config(self) -> dict:
        return asdict(self)


ARCHITECTURES = ("mlp", "modified", "pirate")


@dataclass(frozen=True)
class Network:
    """The network the solver builds: `width` units in each of `depth` hidden layers.

    architecture: "mlp" (`pinnsketch.nn.MLP`), "modified" (the modified MLP of Wang, Teng &
        Perdikaris 2021, `pinnsketch.nn.gated.ModifiedMLP`: every hidden layer gated between
        two encoder features) or "pirate" (PirateNet, Wang et al. 2024,
        `pinnsketch.nn.gated.PirateNet`: `depth` gated residual blocks of three layers each,
        skip weights initialised at 0; best with `fourier`).
    fourier: a `ps.Fourier(features, scale)` input embedding (or True for the defaults).
    periodic: {input name: period}, e.g. {"x": 2.0}: the network is exactly periodic in those
        inputs with all its derivatives (Dong & Ni, J. Comput. Phys. 435, 2021: features
        cos(2 pi k x / P), sin(2 pi k x / P), k = 1..harmonics), so a `ps.Periodic` condition on
        such an axis holds by construction and may be dropped from the problem's conditions
        (P must be the domain's length along it).
    harmonics: K of the periodic embedding.
    factorized: a `ps.Factorized(mean, std)` random weight factorization of every dense
        layer (or True for the defaults mean=1, std=0.1).
    chunk_bytes: bytes per row-chunk tensor (S, rows, width) of a training step, or None for
        the device's default (`pinnsketch.nn.chunking`: a few MiB on the CPU, one chunk per call
        on a GPU, which is fastest there). A smaller value bounds the step's working set at the
        cost of more kernel launches: on an H200, 32 MiB took `lowrank`'s step peak at 32,768
        points from 0.67 to 0.24 of `exact`'s at about 2x its time (`benchmarks/gpu_step.py`).
    Every option runs through the storage policies and jets: the embeddings feed the first
    block, factorized weights are computed before each block, and the gated architectures
    keep their gating arithmetic outside the policies (saved exactly; `pinnsketch.nn.gated`).
    """

    width: int = 32
    depth: int = 4
    activation: str = "tanh"
    architecture: str = "mlp"
    fourier: Fourier | None = None
    periodic: dict | None = None
    harmonics: int = 1
    factorized: Factorized | None = None
    chunk_bytes: int | None = None

    def __post_init__(self):
        _positive_int(self.width, "Network width")
        if self.chunk_bytes is not None:
            _positive_int(self.chunk_bytes, "Network chunk_bytes")
        _positive_int(self.depth, "Network depth")
        from ..nn.activations import get_activation

        get_activation(self.activation)  # validates the name, listing the choices
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Network architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        for name, cls in (("fourier", Fourier), ("factorized", Factorized)):
            value = getattr(self, name)
            if value is True:
                value = cls()
            elif isinstance(value, dict):   # as recorded in a run's config
                value = cls(**value)
            elif value is False:
                value = None
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"Network {name}={value!r} must be a ps.{cls.__name__}(...), True or None")
            object.__setattr__(self, name, value)
        _positive_int(self.harmonics, "Network harmonics")
        if self.harmonics != 1 and self.periodic is None:
            raise ValueError(f"Network harmonics={self.harmonics} applies to the periodic embedding; "
                             "pass periodic={input name: period} as well, or leave harmonics at 1")
        if self.periodic is not None:
            if not isinstance(self.periodic, dict) or not self.periodic:
                raise TypeError(f"Network periodic={self.periodic!r} must be a non-empty dict "
                                "{input name: period}, e.g. {'x': 2.0}")
            for key, period in self.periodic.items():
                if not isinstance(key, str):
                    raise TypeError(f"Network periodic key {key!r} must be an input name such as 'x'")
                _positive_float(period, f"Network periodic period of {key!r}")
            object.__setattr__(self, "periodic", {k: float(p) for k, p in self.periodic.items()})

    def build(self, in_features: int, out_features: int, storage, generator: torch.Generator,
              dtype: torch.dtype, device: torch.device, *, input_names=None) -> torch.nn.Module:
        """The network module; `input_names` (the problem's, e.g. ("x", "t")) resolve `periodic`."""
        from ..nn import MLP
        from ..nn.embeddings import periodic_axes
        from ..nn.gated import ModifiedMLP, PirateNet

        if self.periodic is not None and input_names is None:
            raise ValueError(f"Network periodic={self.periodic!r} names inputs, but build() got no "
                             "input_names; pass input_names=problem.input_names")
        cls = {"mlp": MLP, "modified": ModifiedMLP, "pirate": PirateNet}[self.architecture]
        extra = {}
        if self.fourier is not None:
            extra["fourier"] = self.fourier.config()
        if self.periodic is not None:
            extra["periodic"] = periodic_axes(self.periodic, input_names, in_features)
            extra["harmonics"] = self.harmonics
        if self.factorized is not None:
            extra["factorized"] = (self.factorized.mean, self.factorized.std)
        return cls(in_features, out_features, width=self.width, depth=self.depth, activation=self.activation,
                   storage=storage, seed=generator, dtype=dtype, device=device, chunk_bytes=self.chunk_bytes,
                   **extra)

    def config(self) -> dict:
        """JSON-able options: width, depth, activation, and the other options where not at their defaults."""
        out = {"width": self.width, "depth": self.depth, "activation": self.activation}
        if self.architecture != "mlp":
            out["architecture"] = self.architecture
        if self.fourier is not None:
            out["fourier"] = self.fourier.config()
        if self.periodic is not None:
            out["periodic"] = dict(self.periodic)
            out["harmonics"] = self.harmonics
        if self.factorized is not None:
            out["factorized"] = self.factorized.config()
        if self.chunk_bytes is not None:
            out["chunk_bytes"] = self.chunk_bytes
        return out
