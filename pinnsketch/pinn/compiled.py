"""The opt-in compiled loss of `solve(compile=True)`.

Under `storage="exact"` every activation is kept anyway, so the network's jet
runs as plain torch ops (`pinnsketch.nn.functional.plain_jet`) and the whole
loss (network jet, residual, conditions) is one `torch.compile`d function of
the point sets, forward and backward fused by inductor. The point counts are
symbolic (marked dynamic), so resampling and refinement do not recompile. On
CUDA the function is compiled with `mode="reduce-overhead"` (CUDA graphs, one
graph per point count); that path is not exercised by the CPU test suite.

The other storage policies are custom autograd Functions with Python-side
state (rank controllers, sketches) that the compiler cannot trace; compiling
around them does not pay, so they run eagerly with one notice.
If compilation fails (no C++ compiler, an unsupported platform) the run
warns once and continues eagerly.

On the CPU an Adam iteration is one compiled call (`CompiledAdam`): loss,
gradient and update. With the loss alone compiled, the gradient still runs
through autograd's engine and the update through the optimizer, each with its
own per-call overhead, which on a PINN-sized network is a quarter of the step
(measured on DeepXDE's Burgers set-up: 3.7 against 4.8 ms per iteration). The
L-BFGS phase, the metered steps and the loss-balancing steps use the compiled
loss. On CUDA the loss-only function under CUDA graphs is kept: the one-call
step mutates its inputs, which CUDA graphs handle differently, and it has not
been measured on a GPU.

Whether compiling pays depends on the network, the points and the machine: on
one CPU the compiled step of allen_cahn's PirateNet took 0.30x the eager step's
time and that of kovasznay's 96-wide MLP 1.15x (`benchmarks/compiled_library.py`).
So the run measures it (`CompileChoice`): its first Adam steps alternate
compiled and eager blocks, and the rest of the run keeps the faster.
"""

from __future__ import annotations

import statistics
import time
import types
import warnings

import torch
from torch.optim.adam import adam as torch_adam

from ..nn.functional import plain_jet, supports_plain_jet
from ..nn.storage import ExactStorage
from .derivatives import JetDerivatives, _apply_transform
from .objective import Objective

__all__ = ["CompiledAdam", "CompiledLoss", "CompileChoice", "compile_reason"]


def compile_reason(network: torch.nn.Module, objective: Objective) -> str | None:
    """None when the loss of this run can be compiled, else why it runs eagerly."""
    if not supports_plain_jet(network):
        return (f"the network is a {type(network).__name__}, not a pinnsketch MLP, ResidualMLP, ModifiedMLP "
                "or PirateNet")
    if not isinstance(objective.provider, JetDerivatives):
        return f"derivatives={objective.provider.name!r}; the compiled loss uses jets"
    if objective.causal is not None:
        return "causal weighting keeps its chunk weights in Python state; it runs eagerly"
    policies = {type(b.storage).__name__ for b in network.blocks if not isinstance(b.storage, ExactStorage)}
    if policies:
        return (f"storage {sorted(policies)} keeps sketches in custom autograd Functions, which the "
                "compiler does not trace; compiling pays for storage='exact'")
    return None


def _own_code(method):
    """`method` (bound) with a code object of its own.

    torch.compile keeps its compiled variants per code object and, after `recompile_limit` of them
    (8), runs that code eagerly through its guards, slower than plain eager and silently. Every run
    compiles a loss for its own problem, network and point sets, so with a shared code object the
    ninth `solve(compile=True)` of a process would fall back; a copy per run gives each its own
    variants, freed with the run (inductor's on-disk cache still shortens a repeated compilation).
    """
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


class CompiledLoss:
    """`objective.terms()` through a compiled plain-torch loss, with an eager fallback.

    Call `terms()` like `Objective.terms()`: (n_terms,) unweighted mean squares.
    The first call compiles forward and backward (a gradient of the summed terms
    that is thrown away) and times it as `compile_s`; later calls only run.
    `active` is False after a failed compilation (then `terms()` is eager).
    backend: torch.compile's backend ("inductor"; "aot_eager" traces without code generation).
    """

    def __init__(self, objective: Objective, params: list[torch.Tensor], device: torch.device,
                 backend: str = "inductor"):
        self.objective, self.params = objective, params
        self.mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        self._compiled = torch.compile(_own_code(self._terms), backend=backend, mode=self.mode)
        self.active = True
        self.compiled = False
        self.compile_s = 0.0

    def _terms(self, parts: list[torch.Tensor], extras: list[dict]) -> torch.Tensor:
        obj = self.objective
        x = torch.cat(parts)  # the point sets as separate inputs: their counts are symbolic
        bounds = [0]
        for p in parts:
            bounds.append(bounds[-1] + p.shape[0])
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        jet = _apply_transform(obj.transform, x, plain_jet(obj.network, x, obj.spec))
        return obj.terms_of(x, jet, slices, extras)

    def inputs(self) -> tuple[list[torch.Tensor], list[dict]]:
        """The current point sets and their conditions' extras, their row counts marked dynamic."""
        obj = self.objective
        obj._refresh()
        for part in obj.x_parts:  # point counts are symbolic: a new count reuses the compiled code
            torch._dynamo.maybe_mark_dynamic(part, 0)
        for extra in obj.extras:
            for value in extra.values():
                if value.dim():
                    torch._dynamo.maybe_mark_dynamic(value, 0)
        return obj.x_parts, obj.extras

    def _call(self) -> torch.Tensor:
        return self._compiled(*self.inputs())

    def prepare(self) -> None:
        """Compile forward and backward now (once); a failure switches to the eager loss with a warning."""
        if self.compiled:
            return
        t0 = time.perf_counter()
        try:
            terms = self._call()
            torch.autograd.grad(terms.sum(), [p for p in self.params if p.requires_grad], allow_unused=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager loss is the same loss
            self.active = False
            _warn_failed(exc, "the run continues eagerly")
        self.compiled = True
        self.compile_s = time.perf_counter() - t0

    def terms(self) -> torch.Tensor:
        """Unweighted mean-square loss of every term, (n_terms,) in `objective.term_names` order."""
        self.prepare()
        if not self.active:
            return self.objective.terms()
        return self._call()


def _warn_failed(exc: Exception, then: str) -> None:
    cause = " ".join(str(exc).split())[:300]  # one line, however long the compiler's report
    warnings.warn(f"solve(compile=True): torch.compile failed ({type(exc).__name__}: {cause}); {then}",
                  RuntimeWarning, stacklevel=5)


class _WeightedLoss(torch.nn.Module):
    """(parts, extras, weights) -> (weighted loss (), terms (k,)), as a module over the network's
    parameters, so that `torch.func.functional_call` can take its gradient."""

    def __init__(self, loss: CompiledLoss):
        super().__init__()
        self.network = loss.objective.network
        self._loss = loss

    def forward(self, parts, extras, weights):
        # Objective.total, with the weights an input: balancing replaces the tensor, which as an
        # attribute read inside the compiled function would recompile it
        terms = self._loss._terms(parts, extras)
        return (weights * terms).sum(), terms


class CompiledAdam:
    """One Adam iteration (loss, gradient, update) as one compiled function, for `CompiledLoss`'s loss.

    The gradient is taken inside the function (`torch.func.grad_and_value` over
    the network's parameters), and the update is torch's own Adam
    (`torch.optim.adam.adam`) on the optimizer's state tensors, so the
    optimizer's state, its `state_dict` and resuming stay torch's. The update is
    applied only when the loss and every term are finite (`torch.where`): a
    diverging iteration leaves parameters and state as they were, and the
    caller's finiteness check raises as after an eager step.

    `usable(optimizer)`: a `torch.optim.Adam` with one parameter group over
    exactly the network's parameters, no amsgrad, no maximize. The first call
    (`prepare`, or the first `step`) compiles and is timed as `compile_s`; a
    failed compilation warns once and sets `active` False.
    """

    def __init__(self, loss: CompiledLoss, adam_betas: tuple[float, float], backend: str = "inductor"):
        self.loss = loss
        self.network = loss.objective.network
        self.params = list(self.network.parameters())
        module = _WeightedLoss(loss)
        names = [f"network.{name}" for name, _ in self.network.named_parameters()]

        def weighted(params, parts, extras, weights):
            return torch.func.functional_call(module, dict(zip(names, params)), (parts, extras, weights))

        self._grad = torch.func.grad_and_value(weighted, has_aux=True)
        self._compiled = torch.compile(_own_code(self._iterate), backend=backend)
        self._betas = tuple(float(b) for b in adam_betas)
        first = self.params[0]
        self._lr = torch.zeros((), dtype=first.dtype, device=first.device)
        self._apply = torch.ones((), dtype=torch.bool, device=first.device)
        self.active = True
        self.compiled = False
        self.compile_s = 0.0

    def _iterate(self, params, exp_avgs, exp_avg_sqs, steps, lr, apply, parts, extras, weights,
                 beta1, beta2, eps, weight_decay):
        grads, (loss, terms) = self._grad(params, parts, extras, weights)
        ok = apply & torch.isfinite(loss) & torch.isfinite(terms).all()
        old = [*params, *exp_avgs, *exp_avg_sqs, *steps]
        # the step counts in float64, so that the bias corrections are as precise as torch's fused
        # Adam's (1 - 0.999 in float32 is off by 1e-5)
        new = [t.clone() for t in old[:-len(steps)]] + [t.to(torch.float64) for t in steps]
        n = len(params)
        torch_adam(
            new[:n], list(grads), new[n:2 * n], new[2 * n:3 * n], [], new[3 * n:], foreach=False,
            capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
            has_complex=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
            eps=eps, maximize=False,
        )
        for before, after in zip(old, new):
            before.copy_(torch.where(ok, after.to(before.dtype), before))
        return loss, terms

    def usable(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `step` can run `optimizer`'s iteration (see the class docstring)."""
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
            return False
        group = optimizer.param_groups[0]
        same = len(group["params"]) == len(self.params) and all(a is b for a, b in zip(group["params"], self.params))
        return same and not group["amsgrad"] and not group["maximize"] and not group.get("differentiable", False)

    def _state(self, optimizer: torch.optim.Adam) -> tuple[list, list, list]:
        """The optimizer's (exp_avg, exp_avg_sq, step) per parameter, created as torch's fused Adam does."""
        states = []
        for p in self.params:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
            states.append(st)
        return [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states]

    def _run(self, exp_avgs, exp_avg_sqs, steps, lr: float, apply: bool, betas, eps: float, weight_decay: float):
        self._lr.fill_(lr)
        self._apply.fill_(apply)
        parts, extras = self.loss.inputs()
        with torch.no_grad():  # the gradient is the function's own; nothing here is recorded
            return self._compiled([p.detach() for p in self.params], exp_avgs, exp_avg_sqs, steps, self._lr,
                                  self._apply, parts, extras, self.loss.objective.weights, float(betas[0]),
                                  float(betas[1]), float(eps), float(weight_decay))

    def prepare(self) -> None:
        """Compile now (once), on scratch optimizer state and without applying the update."""
        if self.compiled:
            return
        if not self.loss.active:  # the compiler failed on the loss alone (and said so): do not retry
            self.active, self.compiled = False, True
            return
        t0 = time.perf_counter()
        scratch = torch.optim.Adam(self.params, betas=self._betas)
        try:
            self._run(*self._state(scratch), 0.0, False, self._betas, 1e-8, 0.0)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the loss-only path is the same step
            self.active = False
            _warn_failed(exc, "Adam steps run through the compiled loss and the optimizer instead")
        self.compiled = True
        self.compile_s = time.perf_counter() - t0

    def step(self, optimizer: torch.optim.Adam) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration of `optimizer` (its lr, betas, eps, weight decay and state); returns the
        weighted loss () and the unweighted terms (k,) at the parameters before the update."""
        self.prepare()
        group = optimizer.param_groups[0]
        return self._run(*self._state(optimizer), group["lr"], True, group["betas"], group["eps"],
                         group["weight_decay"])


class CompileChoice:
    """Compiled or eager, decided by timing both on this machine at the start of the Adam phase.

    The first `rounds` x 2 blocks of `block` measured Adam steps alternate: a compiled block, an
    eager block, ... (`mode()` says which for the next step, `record(mode, seconds)` takes its
    time). Then `chosen` is "eager" when the eager steps' median time is below (1 - `margin`)
    times the compiled steps' median, else "compiled"; both steps train the same loss, so the
    alternation costs nothing but time.
    """

    def __init__(self, rounds: int = 3, block: int = 4, margin: float = 0.05):
        self.rounds, self.block, self.margin = rounds, block, margin
        self.seconds: dict[str, list[float]] = {"compiled": [], "eager": []}
        self.chosen: str | None = None

    def mode(self) -> str:
        """The mode of the next step: the chosen one, or the measuring block's."""
        if self.chosen is not None:
            return self.chosen
        done = len(self.seconds["compiled"]) + len(self.seconds["eager"])
        return ("compiled", "eager")[(done // self.block) % 2]

    def record(self, mode: str, seconds: float) -> None:
        self.seconds[mode].append(seconds)
        if self.chosen is None and min(len(v) for v in self.seconds.values()) >= self.rounds * self.block:
            compiled, eager = (statistics.median(self.seconds[k]) for k in ("compiled", "eager"))
            self.chosen = "eager" if eager < (1 - self.margin) * compiled else "compiled"

    def timing(self) -> dict[str, float]:
        """Median ms per step of each mode while measuring (empty before a decision)."""
        if self.chosen is None:
            return {}
        return {f"{k}_ms_per_step_measured": 1e3 * statistics.median(v) for k, v in self.seconds.items()}
