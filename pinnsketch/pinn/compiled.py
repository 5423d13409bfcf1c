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
"""

from __future__ import annotations

import time
import warnings

import torch

from ..nn.functional import plain_jet, supports_plain_jet
from ..nn.storage import ExactStorage
from .derivatives import JetDerivatives, _apply_transform
from .objective import Objective

__all__ = ["CompiledLoss", "compile_reason"]


def compile_reason(network: torch.nn.Module, objective: Objective) -> str | None:
    """None when the loss of this run can be compiled, else why it runs eagerly."""
    if not supports_plain_jet(network):
        return f"the network is a {type(network).__name__}, not a pinnsketch MLP/ResidualMLP"
    if not isinstance(objective.provider, JetDerivatives):
        return f"derivatives={objective.provider.name!r}; the compiled loss uses jets"
    if objective.causal is not None:
        return "causal weighting keeps its chunk weights in Python state; it runs eagerly"
    policies = {type(b.storage).__name__ for b in network.blocks if not isinstance(b.storage, ExactStorage)}
    if policies:
        return (f"storage {sorted(policies)} keeps sketches in custom autograd Functions, which the "
                "compiler does not trace; compiling pays for storage='exact'")
    return None


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
        self._compiled = torch.compile(self._terms, backend=backend, mode=self.mode)
        self.active = True
        self.compiled = False
        self.compile_s = 0.0

    def _terms(self, parts: list[torch.Tensor], extras: list[dict]) -> torch.Tensor:
        obj = self.objective
        x = torch.cat(parts)
        bounds = [0]
        for p in parts:
            bounds.append(bounds[-1] + p.shape[0])
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        jet = _apply_transform(obj.transform, x, plain_jet(obj.network, x, obj.spec))
        return obj.terms_of(x, jet, slices, extras)

    def _call(self) -> torch.Tensor:
        obj = self.objective
        obj._refresh()
        for part in obj.x_parts:  # point counts are symbolic: a new count reuses the compiled code
            torch._dynamo.maybe_mark_dynamic(part, 0)
        for extra in obj.extras:
            for value in extra.values():
                if value.dim():
                    torch._dynamo.maybe_mark_dynamic(value, 0)
        return self._compiled(obj.x_parts, obj.extras)

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
            cause = " ".join(str(exc).split())[:300]  # one line, however long the compiler's report
            warnings.warn(
                f"solve(compile=True): torch.compile failed ({type(exc).__name__}: {cause}); "
                "the run continues eagerly",
                RuntimeWarning, stacklevel=4,
            )
        self.compiled = True
        self.compile_s = time.perf_counter() - t0

    def terms(self) -> torch.Tensor:
        """Unweighted mean-square loss of every term, (n_terms,) in `objective.term_names` order."""
        self.prepare()
        if not self.active:
            return self.objective.terms()
        return self._call()
