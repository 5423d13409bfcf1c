"""`solve(problem, *, ...)`: train a PINN with Adam, then L-BFGS, and check it.

    result = ps.solve(Burgers(), storage="lowrank", adam=ps.Adam(steps=10_000), seed=0)
    result.l2_relative_error, result.predict(x)   # ps.save(result, "burgers.h5") writes the run file

Every option is keyword-only; `None` means "the problem's `solver_defaults`
entry, else the global default" (see `DEFAULTS`). The loop is plain: per step,
optional resampling / refinement (Adam only), then one
`pinnsketch.training.train_step` (`model.advance()` once, the loss terms, a
finiteness check, backward, the optimizer step), bookkeeping, callbacks.
An L-BFGS step runs up to `LBFGS.max_iter` iterations with one `advance()`,
so line searches and curvature pairs within it see the same sketch test
matrices. A float32 L-BFGS phase that stops before it converges goes on in
float64 (`LBFGS.float64_fallback`; the line search of a well-trained network
often finds no step that beats the float32 loss' rounding noise).
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..nn.memory import available_bytes
from ..training import Callback, ProgressBar, StepRecord, TrainingState, crossed, fused_step, train_step
from .causal import Causal, CausalWeights
from .conditions import Condition
from .derivatives import get_provider
from ..training.distributed import Distributed, Group, session
from .errors import ProblemDefinitionError
from .objective import Objective
from .options import LBFGS, RAR, Adam, Network, Points
from .problem import Layout, Problem
from .result import Evaluator, Result, predict
from .sampling import CollocationPoints, refine_points
from .weighting import GradNormWeights, balanced_weights, term_gradient_norms
from .windows import (TimeWindowNetwork, TimeWindows, check_windows, continuation_conditions, window_bounds,
                      window_errors, window_problem)

__all__ = ["solve", "loss_terms", "problem_defaults", "DEFAULTS", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

DEFAULTS: dict[str, Any] = {
    "network": Network(width=32, depth=4, activation="tanh"),
    "storage": "lowrank",
    "adam": Adam(),
    "lbfgs": LBFGS(),
    "points": Points(refine=RAR()),  # RAR: Burgers' error sits at the shock
    "loss_weights": None,
    "balance": None,
    "causal": None,
    "windows": None,
    "seed": 0,
    "dtype": "float32",
    "device": "auto",
    "derivatives": "jet",
    "eval_every": 1_000,
    "eval_points": 10_000,
}


def problem_defaults(problem: Problem) -> dict[str, Any]:
    """The options a solve of `problem` uses when none is given: `DEFAULTS` overlaid with
    `problem.solver_defaults` (whose keys must be keys of `DEFAULTS`)."""
    own = dict(getattr(problem, "solver_defaults", None) or {})
    unknown = sorted(set(own) - set(DEFAULTS))
    if unknown:
        raise ProblemDefinitionError(
            f"{type(problem).__name__}.solver_defaults has unknown keys {unknown}; valid: {sorted(DEFAULTS)}"
        )
    return {**DEFAULTS, **own}


def _resolve(problem: Problem, given: dict[str, Any]) -> dict[str, Any]:
    base = problem_defaults(problem)
    o = {k: given[k] if given.get(k) is not None else base[k] for k in DEFAULTS}
    if o["derivatives"] == "autograd" and isinstance(o["network"], Network):
        o["storage"] = _autograd_storage(given.get("storage"))
    return o


def _autograd_storage(explicit) -> str:
    """A built network's storage under derivatives="autograd": "exact".

    Nested autograd differentiates the network's plain forward (`autograd_forward`), which keeps
    every activation; no storage policy applies, so asking for one is an error rather than a
    policy that the run file would record but the run would not use.
    """
    from ..nn.storage import ExactStorage

    if explicit is None or explicit == "exact" or isinstance(explicit, ExactStorage):
        return "exact"
    raise ValueError(f"storage={explicit!r} applies to jets; derivatives='autograd' differentiates the network's "
                     "plain forward by nested autograd, which keeps every activation: pass derivatives='jet' "
                     "to use the policy, or storage='exact'")


def _device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; pass 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; pass device='cpu' or 'auto'")
    return dev


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def _check_options(o: dict[str, Any]) -> None:
    for key, cls in (("adam", Adam), ("lbfgs", LBFGS), ("points", Points)):
        if not isinstance(o[key], cls):
            raise TypeError(f"{key}={o[key]!r} must be a ps.{cls.__name__}(...)")
    seed = o["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    for key in ("eval_every", "eval_points"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r} must be a positive int")
    if o["loss_weights"] is not None and not isinstance(o["loss_weights"], Mapping):
        raise TypeError(f"loss_weights={o['loss_weights']!r} must be None or a dict {{term: weight}}")
    for key, cls in (("balance", GradNormWeights), ("causal", Causal), ("windows", TimeWindows)):
        if o[key] is not None and not isinstance(o[key], cls):
            raise TypeError(f"{key}={o[key]!r} must be None or a ps.{cls.__name__}(...)")


def _causal(option: Causal | None, layout: Layout, problem: Problem) -> CausalWeights | None:
    if option is None:
        return None
    if layout.time_axis is None:
        raise ValueError(f"causal={option!r} needs a time-dependent problem; {type(problem).__name__}'s domain "
                         f"{layout.domain!r} has no time (use space * ps.geometry.TimeDomain(t0, t1)) or pass "
                         "causal=None")
    lo, hi = layout.domain.bbox
    return CausalWeights(option, float(lo[layout.time_axis]), float(hi[layout.time_axis]), layout.time_axis)


def _build_network(o, explicit_storage, layout: Layout, generator, dtype, device) -> torch.nn.Module:
    network, n_in, n_out = o["network"], layout.dim, len(layout.output_names)
    if isinstance(network, Network):
        # initialize on the CPU (the run's generator lives there), then move
        return network.build(n_in, n_out, o["storage"], generator, dtype, torch.device("cpu"),
                             input_names=layout.input_names).to(device)
    if isinstance(network, torch.nn.Module):
        if explicit_storage is not None:
            raise ValueError(
                "storage= applies to networks the solver builds; with your own network=nn.Module "
                "choose its storage when constructing it and leave storage unset"
            )
        return network.to(device=device, dtype=dtype)
    raise TypeError(f"network={network!r} must be a ps.Network(...) or a torch.nn.Module")


def _check_callbacks(callbacks) -> list:
    out = list(callbacks or ())
    for cb in out:
        if not all(callable(getattr(cb, m, None)) for m in ("on_start", "on_step", "on_end")):
            raise TypeError(f"callback {cb!r} must have on_start, on_step and on_end methods (subclass ps.Callback)")
    return out


def _settle_cpu_allocator() -> None:
    """Keep a CPU training step's working set mapped from one step to the next (glibc).

    glibc's malloc serves blocks above its mmap threshold (128 KiB at start) with
    fresh mappings and gives the top of the heap back to the operating system when
    more than its trim threshold is free, so every step page-faults its stacked jet
    tensors in again: hundreds to a thousand minor faults per Adam step on the
    Burgers benchmark (`benchmarks/vs_deepxde.py`), up to a third of the step. Freeing
    one large block once raises both thresholds by glibc's own dynamic rule
    (threshold = the freed block's size, trim threshold = twice that), after which
    the step's memory stays in the process. Repeating it (one call per solve) costs
    one allocation; with other allocators it only allocates and frees 24 MiB.
    No numerical effect.
    """
    block = torch.empty(24 << 20, dtype=torch.uint8)
    del block


def _new_history(term_names: Sequence[str], parameter_names: Sequence[str], o: dict) -> dict:
    extra = {}
    if o["balance"] is not None:  # the weights after each update (rows in term_names order)
        extra["balance"] = {"step": [], "weights": [], "gradient_norms": []}
    if o["causal"] is not None:  # per step: the smallest causal weight of the step's loss
        extra["causal"] = {"min_weight": []}
    if o["windows"] is not None:  # per step: its time window; per window: its steps, error, L-BFGS stop
        extra["window"] = []
        extra["windows"] = {"index": [], "t0": [], "t1": [], "first_step": [], "last_step": [],
                            "l2_relative_error": [], "lbfgs_stop": []}
    return {**extra,
        "step": [], "phase": [], "loss": [], "lr": [], "wall_time_s": [], "step_time_s": [],
        "terms": {name: [] for name in term_names},
        "parameters": {name: [] for name in parameter_names},
        "eval": {"step": [], "l2_relative_error": [], "per_field": {}},
        "memory": {"step": [], "saved_bytes": [], "step_peak_bytes": []},
        "refine": {"step": [], "points_added": [], "domain_points": []},
    }


class _Run:
    """The state of one solve: built once, then driven phase by phase."""

    def __init__(self, problem: Problem, o: dict, explicit_storage, callbacks, progress: bool,
                 compile: bool = False, group: Group | None = None):
        self.problem, self.o = problem, o
        self.dist = group  # multi-process runs (`pinnsketch.training.distributed`); None: one process
        if group is not None and o["causal"] is not None:
            raise ValueError("causal=ps.Causal(...) is not supported in multi-process runs yet (each process would "
                             "weigh time chunks by its own shard's losses); run it in one process")
        if group is not None and o["balance"] is not None:
            raise ValueError("balance=ps.GradNormWeights(...) is not supported in multi-process runs yet (each "
                             "process would balance on its own shard's gradients); run it in one process or set "
                             "loss_weights by hand")
        if o["windows"] is not None and group is not None:
            raise ValueError("windows=ps.TimeWindows(...) is not supported in multi-process runs yet (the windows' "
                             "initial targets and point sets are not sharded); run it in one process")
        if o["windows"] is not None and compile:
            raise ValueError("windows=ps.TimeWindows(...) cannot run with compile=True: each window's loss reads the "
                             "previous window's network through its initial targets, which the compiled step does "
                             "not trace; pass compile=False")
        self._balance_now = False  # set by the Adam loop on the steps that update the loss weights
        self.layout = layout = Layout.of(problem)
        self.dtype, self.device = _dtype(o["dtype"]), _device(o["device"])
        self.run_dtype = self.dtype  # self.dtype is float64 during an L-BFGS float64 continuation
        if group is not None:
            self.device = group.device  # one CUDA device per rank
        if self.device.type == "cpu":
            _settle_cpu_allocator()
        self.generator = torch.Generator().manual_seed(o["seed"])
        self.network = _build_network(o, explicit_storage, layout, self.generator, self.dtype, self.device)
        self.parameters = {
            name: torch.nn.Parameter(torch.tensor(p.initial, dtype=self.dtype, device=self.device))
            for name, p in type(problem).parameters().items()
        }
        # the module that maps points to the solution: the network, or the windows' networks (`windows.py`)
        self.solution: torch.nn.Module = self.network
        self.window: int | None = None  # the time window being trained (marching), else None
        self.start = 0  # the step at which this window's phases start (0 without windows)
        first = problem
        if o["windows"] is not None:
            check_windows(problem, layout, o["windows"])
            lo, hi = layout.domain.bbox
            bounds = window_bounds(float(lo[layout.time_axis]), float(hi[layout.time_axis]), o["windows"].windows)
            members = [self.network, *(copy.deepcopy(self.network) for _ in bounds[2:])]
            self.solution = TimeWindowNetwork(members, bounds=bounds, time_axis=layout.time_axis)
            self.solution.active.fill_(0)
            self.window = 0
            first = window_problem(problem, layout, bounds[0], bounds[1], problem.conditions)
        self._setup(first, self.network, compile)
        self.term_names = self._run_terms()
        self.evaluator: Evaluator | None = None  # built in run(): references can be costly
        adam, lbfgs = o["adam"], o["lbfgs"]
        self.callbacks = _check_callbacks(callbacks)
        if group is not None and not group.main:
            self.callbacks, progress = [], False  # rank 0 writes and reports; its stop flags are broadcast
        self.bar = ProgressBar(disable=None if progress else True)
        windows = 1 if o["windows"] is None else o["windows"].windows
        self.state = TrainingState(
            problem=problem, model=self.solution, config=self._config(),
            max_steps=windows * (adam.steps + lbfgs.steps),
            history=_new_history(self.term_names, list(self.parameters), o), parameters=self.parameters,
            generator=self.generator, points=self.points, callbacks=self.callbacks,
        )
        if self.window is not None:
            self._record_window()

    def _setup(self, problem: Problem, network: torch.nn.Module, compile: bool) -> None:
        """Points, objective and loss of training `network` on `problem` (the problem itself, or one
        time window of it)."""
        o = self.o
        layout = Layout.of(problem)
        conditions = list(problem.conditions)
        bad = [c for c in conditions if not isinstance(c, Condition)]
        if bad:
            raise ProblemDefinitionError(
                f"{type(problem).__name__}.conditions has {bad!r}; use ps.Dirichlet, ps.Neumann, ps.Robin, "
                "ps.Periodic, ps.Initial, ps.InitialVelocity or ps.PointData"
            )
        problem._bind_parameters(self.parameters)
        self.params = [*network.parameters(), *self.parameters.values()]
        self.points = CollocationPoints(layout, conditions, o["points"], self.generator)
        self.points.sample()
        weights = o["loss_weights"] if self.window is None else None
        self.objective = Objective(problem, layout, network, get_provider(o["derivatives"]), self.points,
                                   self.dtype, self.device, weights, _causal(o["causal"], layout, problem))
        if self.window is not None and o["loss_weights"] is not None:
            # a window weighs the terms it has; the names are checked against all windows' in _run_terms
            mine = {k: v for k, v in o["loss_weights"].items() if k in self.objective.term_names}
            self.objective.weights = self.objective._weights(mine)
        if self.dist is not None:
            self.objective.shard = self.dist.shard_sets  # each rank evaluates its own rows of every set
        self.loss_source = self._loss_source(compile)
        self.adam_step = self._compiled_adam()
        self._compiled = (self.loss_source, self.adam_step)
        self.compile_choice = self._compile_choice()
        self._names = ["loss", *self.objective.term_names]  # labels of a step's values in error messages

    def _run_terms(self) -> list[str]:
        """The loss terms of the run: the objective's, and with windows those the later windows add
        (a problem with a hard initial condition gets `Initial` terms from window 1 on)."""
        names = list(self.objective.term_names)
        if self.window is None:
            return names
        later = continuation_conditions(self.problem, self.layout, self.objective.residual_spec, self.network,
                                        self.objective.provider)
        names += [n for n in dict.fromkeys(c.term_name(self.layout) for c in later) if n not in names]
        unknown = sorted(set(self.o["loss_weights"] or {}) - set(names))
        if unknown:
            raise ValueError(f"loss_weights has unknown terms {unknown}; the terms are {names}")
        return names

    # --- time windows (`windows.py`) ----------------------------------------------------------
    def _record_window(self) -> None:
        w, b = self.state.history["windows"], self.solution.bounds
        w["index"].append(self.window)
        w["t0"].append(b[self.window])
        w["t1"].append(b[self.window + 1])
        w["first_step"].append(self.state.step)

    def _enter_window(self, k: int, resuming: bool = False) -> None:
        """Set up window k: its network starts from window k-1's weights (unless a checkpoint is about to
        restore them), its initial conditions take window k-1's solution at t_k."""
        members, st = self.solution.members, self.state
        if not resuming:
            with torch.no_grad():
                members[k].load_state_dict(members[k - 1].state_dict())
        self.window, self.network = k, members[k]
        self.solution.active.fill_(k)
        conditions = continuation_conditions(self.problem, self.layout, self.objective.residual_spec, members[k - 1],
                                             self.objective.provider)
        b = self.solution.bounds
        self._setup(window_problem(self.problem, self.layout, b[k], b[k + 1], conditions), members[k], False)
        st.points = self.points
        st.phase, st.phase_start, st.stop_phase = "adam", st.step, False
        self.start = st.step
        if not resuming:
            self._record_window()

    def _end_window(self) -> None:
        """Record the window's last step, its error on its own times, and why its L-BFGS ended."""
        st, h = self.state, self.state.history
        w = h["windows"]
        w["last_step"].append(st.step)
        l2 = None
        if self.evaluator.available:
            x = self.evaluator.x
            l2 = window_errors(self.solution, x, predict(self.solution, self.problem, x), self.evaluator.u,
                               self.window)
        w["l2_relative_error"].append(l2)
        stop = h.get("lbfgs_stop")
        w["lbfgs_stop"].append(stop)
        if stop is not None and self.window < self.solution.windows - 1:
            del h["lbfgs_stop"]  # the run's entry is the last window's

    def _config(self) -> dict:
        o, obj = self.o, self.objective
        net = o["network"]
        storage = o["storage"] if isinstance(net, Network) else None
        return {
            "problem": getattr(self.problem, "name", None) or type(self.problem).__name__.lower(),
            "problem_class": f"{type(self.problem).__module__}.{type(self.problem).__qualname__}",
            "input_names": list(self.layout.input_names),
            "output_names": list(self.layout.output_names),
            "network": net.config() if isinstance(net, Network) else {"module": type(net).__name__},
            "storage": storage if storage is None or isinstance(storage, str) else repr(storage),
            "adam": o["adam"].config(), "lbfgs": o["lbfgs"].config(), "points": o["points"].config(),
            "loss_weights": None if o["loss_weights"] is None else dict(o["loss_weights"]),
            "balance": None if o["balance"] is None else o["balance"].config(),
            "causal": None if o["causal"] is None else o["causal"].config(),
            "windows": None if o["windows"] is None else o["windows"].config(),
            "seed": o["seed"], "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "derivatives": obj.provider.name, "eval_every": o["eval_every"], "eval_points": o["eval_points"],
            "terms": list(self.term_names),
            "residual_derivatives": [
                "".join(self.layout.input_names[a] for a in mi) for mi in obj.residual_spec.indices[1:]
            ],
            "parameters": {k: p.initial for k, p in type(self.problem).parameters().items()},
            "torch_version": torch.__version__,
            **({} if self.dist is None else {"distributed": self.dist.config()}),
        }

    def _loss_source(self, compile: bool):
        """The objective, or its compiled loss (`compiled.py`) when compile=True and it pays."""
        if not compile:
            return self.objective
        from .compiled import CompiledLoss, compile_reason

        reason = compile_reason(self.network, self.objective)
        if reason is not None:
            warnings.warn(f"solve(compile=True) runs eagerly: {reason}", RuntimeWarning, stacklevel=4)
            return self.objective
        return CompiledLoss(self.objective, self.params, self.device)

    def _compiled_adam(self):
        """The one-call compiled Adam iteration (`compiled.CompiledAdam`) where it applies: a compiled
        loss on the CPU, one process, the network's parameters only (no trainable PDE parameters)."""
        from .compiled import CompiledAdam, CompiledLoss

        source, adam = self.loss_source, self.o["adam"]
        if not isinstance(source, CompiledLoss) or self.device.type != "cpu" or self.dist is not None:
            return None
        if type(adam) is not Adam or adam.steps == 0:  # SOAP or no Adam phase: nothing to compile it for
            return None
        if len(self.params) != len(list(self.network.parameters())):
            return None
        return CompiledAdam(source, adam.betas)

    def _compile_choice(self):
        """Timing compiled against eager steps (`compiled.CompileChoice`) for a compiled loss of one process
        (a multi-process run keeps the compiled loss: ranks choosing differently would wait on each other)."""
        from .compiled import CompileChoice, CompiledLoss

        if not isinstance(self.loss_source, CompiledLoss) or self.dist is not None or self.o["adam"].steps == 0:
            return None
        return CompileChoice()

    def _use(self, mode: str) -> None:
        """Run the next steps compiled or eagerly (the objective itself; no one-call Adam step)."""
        self.loss_source, self.adam_step = self._compiled if mode == "compiled" else (self.objective, None)

    def _adam_step(self, opt: torch.optim.Optimizer, lr: float) -> StepRecord:
        """One Adam step; while `compile_choice` measures, alternately compiled and eager."""
        choice = self.compile_choice
        if choice is None or choice.chosen is not None or self._metered() or self._balance_now:
            return self._step(opt, "adam", lr)
        mode = choice.mode()
        self._use(mode)
        record = self._step(opt, "adam", lr)
        choice.record(mode, record.seconds)
        self._use(choice.mode())
        if choice.chosen == "eager":
            t = choice.timing()
            warnings.warn(f"solve(compile=True) continues eagerly: here the eager step took "
                          f"{t['eager_ms_per_step_measured']:.3g} ms against the compiled step's "
                          f"{t['compiled_ms_per_step_measured']:.3g} ms", RuntimeWarning, stacklevel=2)
        return record

    def _fused(self, opt: torch.optim.Optimizer, phase: str) -> bool:
        """Whether this step runs as one compiled Adam iteration: not on the steps that meter memory or
        balance the loss weights (they need the loss's autograd graph), nor for other optimizers."""
        fused = self.adam_step
        if fused is None or phase != "adam" or self._balance_now or self._metered() or not fused.usable(opt):
            return False
        fused.prepare()
        return fused.active

    # --- one step ------------------------------------------------------------------------
    def _loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted loss and its terms (k,); in a multi-process run this rank's share of each
        term (the ranks' terms sum to the global ones, `Objective.term_scale`). On the steps the
        Adam loop marks (`_balance_now`), the loss weights are updated first (`weighting.py`)."""
        terms = self.loss_source.terms()
        if self.dist is not None:
            terms = terms * self.objective.term_scale
        if self._balance_now:
            self._balance_now = False
            self._balance(terms)
        return self.objective.total(terms), terms

    def _step(self, opt: torch.optim.Optimizer, phase: str, lr: float) -> StepRecord:
        """One optimizer step through `train_step`, metered on the steps `_metered` picks."""
        where = f"step {self.state.step} ({phase})"
        hint = (f"Lower the learning rate (lr now {lr:.3g}), use dtype='float64', or check the residual and "
                "conditions for divisions by zero, logs of negatives or overflow.")
        if self._fused(opt, phase):
            return fused_step(self.network, functools.partial(self.adam_step.step, opt), names=self._names,
                              where=where, hint=hint)
        reduce = None
        if self.dist is not None:      # gradients and terms summed over the ranks; checked on the global values
            reduce = functools.partial(self.dist.reduce_step, params=self.params)
        return train_step(
            self.network, opt, self._loss, meter=self._metered(), names=self._names, reduce=reduce,
            where=where, hint=hint,
        )

    def _balance(self, terms: torch.Tensor) -> None:
        """Update the loss weights from the terms' gradient norms (`weighting.py`)."""
        obj, option = self.objective, self.o["balance"]
        if not bool(torch.isfinite(terms.detach()).all()):
            return  # the divergence check after this reports it
        norms = term_gradient_norms(terms, self.params)
        obj.weights = balanced_weights(norms, obj.weights, option.alpha)
        b = self.state.history["balance"]
        b["step"].append(self.state.step)
        b["weights"].append(obj.weights.tolist())
        b["gradient_norms"].append(norms.tolist())

    def _finish_step(self, phase: str, record: StepRecord, lr: float, steps: int = 1) -> None:
        """Record a step of `steps` iterations (L-BFGS steps may run several)."""
        values, meter = record.values, record.meter
        st, h = self.state, self.state.history
        st.step += steps
        st.loss, st.lr = values[0], lr
        st.losses = dict(zip(self.objective.term_names, values[1:]))
        st.wall_time_s = self._wall0 + (time.perf_counter() - self._t0)
        h["step"].append(st.step)
        h["phase"].append(phase)
        h["loss"].append(values[0])
        h["lr"].append(lr)
        h["wall_time_s"].append(st.wall_time_s)
        h["step_time_s"].append(record.seconds)
        for name, values in h["terms"].items():  # with windows, a term a window lacks is nan
            values.append(st.losses.get(name, math.nan))
        if self.window is not None:
            h["window"].append(self.window)
        for name, p in self.parameters.items():
            h["parameters"][name].append(float(p.detach()))
        if self.objective.causal is not None:
            h["causal"]["min_weight"].append(self.objective.causal.min_weight())
        if meter is not None and getattr(meter, "peak_bytes", None) is not None:
            h["memory"]["step"].append(st.step)
            h["memory"]["saved_bytes"].append(int(meter.peak_bytes))
            st.saved_bytes_peak = max(st.saved_bytes_peak or 0, int(meter.peak_bytes))
            peak = meter.step_peak_bytes
            h["memory"].setdefault("step_peak_bytes", []).append(-1 if peak is None else int(peak))
            if peak is not None:
                st.step_peak_bytes = max(st.step_peak_bytes or 0, int(peak))
        st.l2_relative_error = None
        if crossed(st.step - steps, st.step, self.o["eval_every"]):
            self._evaluate()
        if meter is not None or st.l2_relative_error is not None:
            report = getattr(self.solution, "storage_report", None)
            st.storage_report = report() if callable(report) else []
        for cb in self._all_callbacks:
            cb.on_step(st)
        if self.dist is not None:
            self.dist.after_step(st, self.params)

    def _evaluate(self) -> None:
        ev = self.state.history["eval"]
        if not self.evaluator.available or (ev["step"] and ev["step"][-1] == self.state.step):
            return
        l2, per = self.evaluator.errors(predict(self.solution, self.problem, self.evaluator.x))
        ev["step"].append(self.state.step)
        ev["l2_relative_error"].append(l2)
        for name, v in per.items():
            ev["per_field"].setdefault(name, []).append(v)
        self.state.l2_relative_error = l2

    def _metered(self) -> bool:
        """Meter memory on the first step of a phase and on the steps that end at an evaluation."""
        st = self.state
        ahead = self.o["lbfgs"].max_iter if st.phase == "lbfgs" else 1
        return st.step == st.phase_start or crossed(st.step, st.step + ahead, self.o["eval_every"])

    # --- phases -------------------------------------------------------------------------
    def _start_phase(self, phase: str, optimizer) -> None:
        st = self.state
        if st.phase == phase and st.pending_optimizer_state is not None:
            optimizer.load_state_dict(st.pending_optimizer_state)
        elif st.phase != phase:
            st.phase, st.phase_start = phase, st.step
        st.pending_optimizer_state = None
        st.optimizer, st.stop_phase = optimizer, False

    def adam(self) -> None:
        adam, pts, st, balance = self.o["adam"], self.o["points"], self.state, self.o["balance"]
        end = self.start + adam.steps  # the window's steps (the run's without windows)
        if st.phase != "adam" or st.step >= end:
            return
        opt = adam.build(self.params)
        self._start_phase("adam", opt)
        while st.step < end and not (st.stop_phase or st.stop_training):
            step = st.step - self.start
            if pts.resample_every and step > 0 and step % pts.resample_every == 0:
                self.points.resample()
            if isinstance(pts.refine, RAR) and step > 0 and step % pts.refine.every == 0:
                scores = self.objective.pointwise
                if self.dist is not None:  # each rank scores its block of the candidates; all get all scores
                    scores = self.dist.gather_rows(scores)
                added = refine_points(self.points, pts.refine, scores)
                if added:
                    r = st.history["refine"]
                    r["step"].append(st.step)
                    r["points_added"].append(added)
                    r["domain_points"].append(len(self.points.domain))
            lr = adam.lr * adam.schedule(step, adam.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            self._balance_now = balance is not None and step % balance.every == 0
            self._finish_step("adam", self._adam_step(opt, lr), lr)

    def lbfgs(self) -> None:
        lbfgs, st = self.o["lbfgs"], self.state
        if lbfgs.steps == 0 or st.stop_training:
            return
        if st.phase == "lbfgs" and st.step >= st.phase_start + lbfgs.steps:
            return
        opt = lbfgs.build(self.params)
        self._start_phase("lbfgs", opt)
        end = st.phase_start + lbfgs.steps
        while st.step < end and not (st.stop_phase or st.stop_training):
            LBFGS.limit(opt, min(lbfgs.max_iter, end - st.step), lbfgs.max_line_search)
            if self.objective.causal is not None:
                self.objective.causal.hold()  # one objective per L-BFGS step (`causal.py`)
            before = opt.state[self.params[0]].get("n_iter", 0)
            evals = opt.state[self.params[0]].get("func_evals", 0)
            record = self._lbfgs_step(opt, lbfgs)
            if record is None:  # a float64 step ran out of device memory (recorded)
                break
            done = opt.state[self.params[0]].get("n_iter", 0) - before
            if done == 0:  # the gradient test ended the step before any iteration: converged
                _lbfgs_stop(st, "gradient tolerance", f"max |gradient| <= tolerance_grad={lbfgs.tolerance_grad:g} "
                            "before the step")
                break
            self._finish_step("lbfgs", record, lbfgs.lr, steps=done)
            stalled = self._float64_stalled(lbfgs, done)
            if stalled is not None:
                _lbfgs_stop(st, "float64 progress", stalled)
                break
            if done < min(lbfgs.max_iter, end - (st.step - done)):
                reason, detail = _lbfgs_reason(opt, lbfgs, opt.state[self.params[0]]["func_evals"] - evals)
                if lbfgs.float64_fallback and self.dtype == torch.float32 and reason != "gradient tolerance":
                    shortfall = self._float64_shortfall()
                    if shortfall is None:
                        # float32's noise floor, most likely: go on in float64 with the same curvature history
                        self._set_dtype(torch.float64, opt)
                        continue
                    detail += f"; no float64 continuation: {shortfall}"
                if self.dtype != self.run_dtype:
                    detail += f" (in float64 from step {st.history['precision']['step'][-1]})"
                _lbfgs_stop(st, reason, detail)
                break  # L-BFGS stopped on a tolerance or its line search budget
        if "lbfgs_stop" not in st.history:
            if st.step >= end:
                _lbfgs_stop(st, "step budget", f"all {lbfgs.steps} iterations of LBFGS(steps={lbfgs.steps}) done")
            elif st.stop_phase or st.stop_training:
                _lbfgs_stop(st, "callback", "a callback set stop_phase or stop_training")
        self._set_dtype(self.run_dtype, opt)  # a float64 continuation ends with its phase

    def _lbfgs_step(self, opt: torch.optim.LBFGS, lbfgs: LBFGS) -> StepRecord | None:
        """One L-BFGS step. In a float64 continuation, a step that runs out of device memory (the guard
        of `_float64_shortfall` works from the last measured step) restores the parameters it started
        from and ends the phase with that reason (None) instead of failing the run."""
        if self.dtype == self.run_dtype:
            return self._step(opt, "lbfgs", lbfgs.lr)
        start = [p.detach().clone() for p in self.params]
        try:
            return self._step(opt, "lbfgs", lbfgs.lr)
        except torch.cuda.OutOfMemoryError as err:
            with torch.no_grad():
                for p, value in zip(self.params, start):
                    p.copy_(value)
                    p.grad = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _lbfgs_stop(self.state, "float64 memory",
                        f"a float64 step ran out of device memory ({first}); the parameters are those before it "
                        f"(in float64 from step {self.state.history['precision']['step'][-1]})")
            return None

    def _float64_stalled(self, lbfgs: LBFGS, done: int) -> str | None:
        """Why the float64 continuation ends after this step, or None: the step completed an interval of
        `LBFGS.FLOAT64_INTERVAL` iterations from the switch that lowered the loss by less than the fraction
        `float64_progress`. Read from the history alone, so a resumed run decides alike."""
        h, st, every = self.state.history, self.state, LBFGS.FLOAT64_INTERVAL
        if self.dtype == self.run_dtype or not lbfgs.float64_progress:
            return None
        start = h["precision"]["step"][-1]
        if not crossed(st.step - done - start, st.step - start, every):
            return None
        # the loss at the last record at least one interval back (the switch's own record at the earliest)
        i = bisect.bisect_right(h["step"], max(start, st.step - every)) - 1
        before, now = h["loss"][i], h["loss"][-1]
        if before - now >= lbfgs.float64_progress * abs(before):
            return None
        return (f"the float64 continuation (from step {start}) lowered the loss by {(before - now) / abs(before):.2%} "
                f"over steps {h['step'][i]}-{st.step}, less than float64_progress={lbfgs.float64_progress:g}")

    def _float64_shortfall(self) -> str | None:
        """Why a float64 continuation would not fit in memory, or None. A float64 step needs about
        twice the float32 step's peak (`state.step_peak_bytes`, None before a metered step: assumed
        to fit); what the device has free must cover the difference, with a quarter to spare. Every
        process of a multi-process run decides alike."""
        need = self.state.step_peak_bytes
        free = available_bytes(self.device) if need else None
        mine = free is not None and free < 1.25 * need
        short = mine if self.dist is None else any(self.dist.gather_ints([int(mine)])[0])
        if not short:
            return None
        if not mine:
            return "another process of the run lacks the memory for it"
        return (f"it needs about {need / 2**20:.0f} MiB more than a float32 step and {free / 2**20:.0f} MiB "
                f"are available on {self.device.type}")

    def _set_dtype(self, dtype: torch.dtype, optimizer: torch.optim.Optimizer | None = None,
                   record: bool = True) -> None:
        """Cast the run to `dtype`: the networks, the PDE parameters (in place: the problem holds them),
        the objective's point tensors and weights, and `optimizer`'s state (L-BFGS' curvature history).
        `record` appends the switch to history["precision"] ({"step": [...], "dtype": [...]})."""
        if dtype == self.dtype:
            return
        self.dtype = dtype
        self.solution.to(dtype)
        for p in self.parameters.values():
            p.data = p.data.to(dtype)
        self.objective.set_dtype(dtype)
        if optimizer is not None:  # torch's loader casts floating state (L-BFGS' history lists too) to the params' dtype
            optimizer.load_state_dict(optimizer.state_dict())
        if record:
            history = self.state.history
            h = history.setdefault("precision", {"step": [], "dtype": []})
            h["step"].append(int(self.state.step))
            h["dtype"].append(str(dtype).removeprefix("torch."))
            for name, p in self.parameters.items():  # the step's value as the run now holds it (rounded)
                if history["parameters"][name]:
                    history["parameters"][name][-1] = float(p.detach())

    def run(self, resume: dict | None) -> Result:
        st = self.state
        self.evaluator = Evaluator(self.problem, self.layout, self.o["eval_points"])
        if resume is not None:
            self._resume_window(resume)
            precision = (resume.get("history") or {}).get("precision") if isinstance(resume, dict) else None
            if precision and precision.get("dtype"):  # stopped during a float64 continuation of L-BFGS
                self._set_dtype(DTYPES[precision["dtype"][-1]], record=False)
            st.load_state_dict(resume)
            if self.window is not None:
                self.start = st.history["windows"]["first_step"][-1]
            balance = st.history.get("balance", {})
            if balance.get("weights") and balance["step"][-1] >= self.start:
                # continue from the balanced weights, not the initial ones
                self.objective.weights = torch.tensor(balance["weights"][-1], dtype=self.dtype, device=self.device)
        self._all_callbacks = [*self.callbacks, self.bar]
        self._t0, self._wall0 = time.perf_counter(), st.wall_time_s
        try:
            for cb in self._all_callbacks:
                cb.on_start(st)
            for source in (self.loss_source, self.adam_step):
                prepare = getattr(source, "prepare", None)
                if callable(prepare):
                    prepare()  # compile now, so that no step time includes it
            self._train()
            self._evaluate()
            result = self._result()
            for cb in self._all_callbacks:
                cb.on_end(st, result)
        except BaseException as exc:
            # callbacks with on_failure (RunWriter) record the cause, step and phase before it propagates
            for cb in self._all_callbacks:
                if callable(getattr(cb, "on_failure", None)):
                    cb.on_failure(st, exc)
            raise
        finally:
            self.bar.close()
        return result

    def _train(self) -> None:
        """Adam, then L-BFGS; with windows, both for each window in turn (stop_training ends the march)."""
        st = self.state
        while True:
            self.adam()
            st.stop_phase = False
            self.lbfgs()
            if self.objective.causal is not None:
                self.objective.causal.release()
            if self.window is None:
                return
            self._end_window()
            if st.stop_training or self.window == self.solution.windows - 1:
                return
            self._enter_window(self.window + 1)

    def _resume_window(self, resume: dict) -> None:
        """Check that a resume state is of a run with the same windows; enter the window it stopped in."""
        saved = resume.get("config", {}).get("windows") if isinstance(resume, dict) else None
        mine = self.state.config.get("windows")
        if isinstance(resume, dict) and "config" in resume and saved != mine:
            raise ValueError(f"resume state was trained with windows={saved} but this solve has windows={mine}; "
                             "resume with the options of the interrupted run")
        history = resume.get("history") if isinstance(resume, dict) else None
        if self.window is not None and isinstance(history, dict) and "windows" in history:
            index = history["windows"]["index"]
            if index and index[-1] > 0:
                self._enter_window(index[-1], resuming=True)

    def _result(self) -> Result:
        st, h = self.state, self.state.history
        report = getattr(self.solution, "storage_report", None)
        st.storage_report = report() if callable(report) else []
        if self.dist is not None:  # memory per rank, and the largest as the run's figure
            saved, peak = self.dist.gather_ints([st.saved_bytes_peak, st.step_peak_bytes])
            st.config["distributed"].update(saved_bytes_peak_per_rank=saved, step_peak_bytes_per_rank=peak)
            st.saved_bytes_peak = max((v for v in saved if v is not None), default=None)
            st.step_peak_bytes = max((v for v in peak if v is not None), default=None)
        timing: dict[str, float] = {"total_s": st.wall_time_s}
        compiled = [getattr(s, "compile_s", None) for s in self._compiled]
        if any(c is not None for c in compiled):
            # the compilations before the first step, not in any step's time
            timing["compile_s"] = sum(c for c in compiled if c is not None)
        if self.compile_choice is not None:
            timing.update(self.compile_choice.timing())
        iterations = [b - a for a, b in zip([0, *h["step"][:-1]], h["step"])]
        for phase in ("adam", "lbfgs"):
            rows = [(t, n) for t, n, p in zip(h["step_time_s"], iterations, h["phase"]) if p == phase]
            seconds, count = float(sum(t for t, _ in rows)), sum(n for _, n in rows)
            timing[f"{phase}_steps"] = count  # iterations (an L-BFGS step may run several)
            timing[f"{phase}_s"] = seconds
            timing[f"{phase}_ms_per_step"] = 1e3 * seconds / count if count else math.nan
        ev = h["eval"]
        l2 = ev["l2_relative_error"][-1] if ev["l2_relative_error"] else None
        per = {k: v[-1] for k, v in ev["per_field"].items()}
        evaluation = None
        if self.evaluator.available:
            evaluation = {"x": self.evaluator.x, "reference": self.evaluator.u,
                          "prediction": predict(self.solution, self.problem, self.evaluator.x)}
        config = dict(st.config, steps_done=st.step)
        return Result(
            problem=self.problem, model=self.solution, history=h, l2_relative_error=l2, l2_per_field=per,
            parameters={k: float(v.detach()) for k, v in self.parameters.items()}, timing=timing,
            saved_bytes_peak=st.saved_bytes_peak, storage_report=st.storage_report, evaluation=evaluation,
            config=config, state=st, step_peak_bytes=st.step_peak_bytes,
        )


def _lbfgs_stop(state: TrainingState, reason: str, detail: str) -> None:
    """Record why the L-BFGS phase ended: history["lbfgs_stop"] = {reason, detail, step}."""
    state.history["lbfgs_stop"] = {"reason": reason, "detail": detail, "step": int(state.step)}


def _lbfgs_reason(opt: torch.optim.LBFGS, lbfgs: LBFGS, evals: int) -> tuple[str, str]:
    """(reason, detail) of an L-BFGS step that ran fewer iterations than allowed, from the optimizer state
    (the tests of `torch.optim.LBFGS.step`, in its order)."""
    s, group = opt.state[opt._params[0]], opt.param_groups[0]
    d, t, g = s.get("d"), s.get("t"), s.get("prev_flat_grad")
    if d is not None and g is not None and float(g.dot(d)) > -lbfgs.tolerance_change:
        return "directional derivative tolerance", (f"directional derivative > -tolerance_change="
                                                    f"{lbfgs.tolerance_change:g}")
    if evals >= group["max_eval"]:
        return "line search budget", (f"{evals} loss evaluations reached max_eval={group['max_eval']} "
                                      f"(max_line_search={lbfgs.max_line_search})")
    grad = opt._gather_flat_grad()
    if float(grad.abs().max()) <= lbfgs.tolerance_grad:
        return "gradient tolerance", f"max |gradient| <= tolerance_grad={lbfgs.tolerance_grad:g}"
    if d is not None and t is not None and float(d.mul(t).abs().max()) <= lbfgs.tolerance_change:
        detail = f"max |step| <= tolerance_change={lbfgs.tolerance_change:g}"
        if float(t) == 0.0:  # strong Wolfe returns t = 0 when no trial point met the sufficient-decrease test
            detail += ("; the line search found no step that lowers the loss (t = 0): the loss' rounding noise "
                       "exceeds what a step gains (dtype='float64' lowers that floor), or the gradient does not "
                       "match the loss")
        return "step tolerance", detail
    return "loss change tolerance", f"|loss change| < tolerance_change={lbfgs.tolerance_change:g}"


def loss_terms(problem: Problem, network: torch.nn.Module, *, points: Points | None = None, seed: int = 0,
               dtype="float64", device="cpu", derivatives: str = "jet") -> dict[str, float]:
    """Unweighted loss terms of a given `network` on `problem` at freshly sampled points.

    No training: useful to check a candidate solution (an exact solution gives ~0).
    """
    options = _resolve(problem, dict(network=network, points=points, seed=seed, dtype=dtype, device=device,
                                     derivatives=derivatives))
    _check_options(options)
    run = _Run(problem, options, None, (), False)
    with torch.no_grad():
        values = run.objective.terms().tolist()
    return dict(zip(run.objective.term_names, values))


def solve(problem: Problem, *, network: Network | torch.nn.Module | None = None, storage=None,
          adam: Adam | None = None, lbfgs: LBFGS | None = None, points: Points | None = None,
          loss_weights: Mapping[str, float] | None = None, balance: GradNormWeights | None = None,
          causal: Causal | None = None, windows: TimeWindows | None = None, seed: int | None = None,
          dtype=None, device=None,
          derivatives: str | None = None, eval_every: int | None = None, eval_points: int | None = None,
          progress: bool = True, callbacks: Sequence[Callback] = (), resume: dict | None = None,
          compile: bool = False, distributed: Distributed | bool | None = None) -> Result:
    """Train a PINN on `problem` and return a checked `Result`.

    Args (all keyword-only; None -> problem.solver_defaults, else `DEFAULTS`):
        network: ps.Network(width, depth, activation) or your own nn.Module
            (with `.jet(x, spec)` for derivatives="jet").
        storage: storage policy of the built network: "exact", "checkpoint",
            "ema", "lowrank" (default), "projection" or a policy object.
        adam, lbfgs: ps.Adam(steps, lr, schedule) (or ps.SOAP(...) for the first phase),
            ps.LBFGS(steps); steps=0 skips a phase.
        points: ps.Points(domain, boundary, initial, sampler, resample_every, refine).
        loss_weights: {term: weight}; term names are in `result.config["terms"]`.
        balance: ps.GradNormWeights(every, alpha): loss weights from the terms' gradient
            norms during Adam, starting from loss_weights (history["balance"]).
        causal: ps.Causal(chunks, tol): causal weights of the residual over time chunks
            (time-dependent problems; history["causal"]["min_weight"] per step).
        windows: ps.TimeWindows(K): time-window marching: K equal time windows trained in
            turn, each with the full adam / lbfgs budgets and points, window k from window
            k-1's weights and with its initial values at t_k (`windows.py`); the model is a
            TimeWindowNetwork; history["window"] per step, history["windows"] per window.
            Resumable; not with compile=True, multi-process runs, ps.Parameter or PointData.
        seed: int; the network, sampling and sketches all derive from it.
        dtype: "float32" | "float64"; device: "cpu" | "cuda" | "auto".
        derivatives: "jet" (forward-mode jets) | "autograd" (nested autograd through the network's
            plain forward, `autograd_forward`: every activation is kept, so a built network's
            storage is "exact" and asking for another policy is an error).
        eval_every: steps between evaluations against the reference (and memory metering);
        eval_points: grid size when the reference is `exact` on the domain.
        progress: show a tqdm bar (only on a terminal).
        callbacks: ps.Callback objects; resume: a TrainingState.state_dict() to continue.
        compile: run the loss through torch.compile (storage="exact" with a network the solver
            builds, any architecture, and jets; other set-ups run eagerly with a warning, and so does a
            failed compilation). On the CPU an Adam iteration is then one compiled call (loss,
            gradient and torch's Adam update; `compiled.CompiledAdam`). The compilation is timed as
            result.timing["compile_s"], outside the step times. The first Adam steps alternate
            compiled and eager blocks, and the run keeps the faster on this machine
            (`compiled.CompileChoice`; result.timing["compiled_ms_per_step_measured"] and
            ["eager_ms_per_step_measured"]; a warning says when it continues eagerly).
        distributed: None (default): when launched by torchrun as one of several processes,
            train as one rank of a process group (points sharded, loss and gradients
            all-reduced: the objective is the single-process one; see `pinnsketch.distributed`);
            a ps.Distributed(timeout_s, check_every, backend) sets its options; False: never.
            Only rank 0 runs `callbacks` and the progress bar; every rank returns the Result.

    Raises:
        ProblemDefinitionError (a ValueError) for inconsistent problems,
        TrainingDivergedError (a FloatingPointError) when a loss term becomes NaN/inf.
    """
    given = dict(network=network, storage=storage, adam=adam, lbfgs=lbfgs, points=points,
                 loss_weights=loss_weights, balance=balance, causal=causal, windows=windows, seed=seed, dtype=dtype,
                 device=device, derivatives=derivatives,
                 eval_every=eval_every, eval_points=eval_points)
    options = _resolve(problem, given)
    _check_options(options)
    with session(distributed, _device(options["device"])) as group:
        return _Run(problem, options, storage, callbacks, progress, compile, group).run(resume)
