"""One optimizer step, the same way in every training loop.

    record = train_step(model, optimizer, loss_fn, meter=True, names=["loss", "pde", "bc"],
                        where="step 10 (adam)", hint="Lower the learning rate.")
    record.values, record.seconds, record.meter.peak_bytes

`train_step` calls the model's `advance()` once (new sketch test matrices, rank
updates), then a closure that zeroes the gradients, evaluates the loss, checks
it is finite and calls `backward()`, then the optimizer's update. An L-BFGS
step (`optimizer.step(closure)`) evaluates the closure several times under one
`advance()`, so its line search and curvature pairs see the same sketches.

`fused_step` is the same step for a function that evaluates the loss and
updates in one call (a compiled iteration, `pinnsketch.pinn.compiled`).

The memory meter, when asked for, spans the step's first loss evaluation
(forward and backward). Every evaluation of a step keeps the same activations,
so one evaluation measures them; an L-BFGS step evaluates up to
max_iter x (1 + max_line_search) times, and profiling all of them on the CPU
(the allocator's events, `MemoryMeter(step_peak=True)`) recorded millions of
events and took gigabytes: a PirateNet run on allen_cahn was killed for
memory at 8.9 GB. L-BFGS' own parameter-sized buffers are therefore outside
the meter. The step's time always includes the update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..nn import MemoryMeter

__all__ = ["TrainingDivergedError", "StepRecord", "train_step", "fused_step", "advance", "crossed"]


class TrainingDivergedError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped before updating on it."""


@dataclass
class StepRecord:
    """What one `train_step` measured.

    Attributes:
        loss: the first closure evaluation's loss, detached (a 0-dim tensor).
        values: [loss, *terms] of the first evaluation as floats; None when the
            step ran with check=False.
        seconds: wall time of the step (every evaluation and the update).
        meter: the `MemoryMeter` of the step, or None when it was not metered.
    """

    loss: torch.Tensor
    values: list[float] | None
    seconds: float
    meter: MemoryMeter | None


def advance(model: torch.nn.Module) -> None:
    """Call `model.advance()` when the model has one (sketched storage policies)."""
    method = getattr(model, "advance", None)
    if callable(method):
        method()


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return after // every > before // every


def _values(loss: torch.Tensor, terms: torch.Tensor | None) -> list[float]:
    """[loss, *terms] as floats (one read-back from the device)."""
    parts = [loss.detach().reshape(1)] if terms is None else [loss.detach().reshape(1), terms.detach()]
    return torch.cat(parts).tolist()


def _check_finite(values: list[float], names: Sequence[str], where: str, hint: str) -> None:
    if all(math.isfinite(v) for v in values):
        return
    bad = [(n, v) for n, v in zip(names[1:], values[1:]) if not math.isfinite(v)] or [(names[0], values[0])]
    raise TrainingDivergedError(
        f"loss term {bad[0][0]!r} became {bad[0][1]} at {where}; non-finite terms: {[n for n, _ in bad]}. "
        f"Training stopped before updating on it. {hint}".rstrip()
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    meter: bool = False,
    step_peak: bool = True,
    check: bool = True,
    names: Sequence[str] = ("loss",),
    where: str = "this step",
    hint: str = "",
    reduce: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, list[float]]] | None = None,
) -> StepRecord:
    """Run one optimizer step of `model` on `loss_fn`.

    Args:
        model: the trained module; its `advance()` (if any) is called once, first.
        optimizer: any torch optimizer; `torch.optim.LBFGS` gets the closure
            (`optimizer.step(closure)`), others step after one evaluation.
        loss_fn: () -> (loss (), terms (k,) or None): the weighted loss to
            minimize and, optionally, the unweighted terms it is made of.
        meter: measure the step in a `MemoryMeter`.
        step_peak: with meter, also measure `step_peak_bytes` (on the CPU a
            profiled step: meter a few steps with it, not all).
        check: raise `TrainingDivergedError` when the loss or a term is NaN or
            infinite, before backward and the update (reads the values back from
            the device on every evaluation).
        names: labels of [loss, *terms] for the error message.
        where, hint: the step and the advice the error message names.
        reduce: multi-process training: (loss, terms) -> (global loss, [loss, *terms]) after
            backward, summing the gradients over the processes too (`distributed.Group.reduce_step`).
            The finiteness check then reads the global values, after backward and before the
            update, so that every process raises alike.

    Returns:
        StepRecord of the first closure evaluation.
    """
    advance(model)
    first: list[tuple[torch.Tensor, list[float] | None]] = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss, terms = loss_fn()
        values = None
        if reduce is not None:
            loss.backward()
            loss, values = reduce(loss, terms)
            del terms
            if check:
                _check_finite(values, names, where, hint)
        else:
            if check:
                values = _values(loss, terms)
                _check_finite(values, names, where, hint)
            del terms  # backward does not need it: freed before the step's peak
            loss.backward()
        if not first:
            first.append((loss.detach(), values))
        return loss

    measure = MemoryMeter(step_peak=step_peak) if meter else None

    def metered_closure():
        # the meter spans the first evaluation only (see the module docstring)
        if measure is None or first:
            return closure()
        with measure:
            return closure()

    t0 = time.perf_counter()
    if isinstance(optimizer, torch.optim.LBFGS):  # evaluates the closure between its updates
        optimizer.step(metered_closure)
    else:
        metered_closure()
        optimizer.step()
    seconds = time.perf_counter() - t0
    loss, values = first[0]
    return StepRecord(loss=loss, values=values, seconds=seconds, meter=measure)


def fused_step(
    model: torch.nn.Module,
    step_fn: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    check: bool = True,
    names: Sequence[str] = ("loss",),
    where: str = "this step",
    hint: str = "",
) -> StepRecord:
    """Run one optimizer step whose loss, gradient and update are one call.

    Args:
        model: the trained module; its `advance()` (if any) is called once, first.
        step_fn: () -> (loss (), terms (k,) or None): evaluates the loss and updates the
            parameters, but leaves them (and the optimizer state) unchanged when the loss or
            a term is not finite.
        check, names, where, hint: as in `train_step`; the check reads the values after the
            call, which skipped the update on a non-finite loss.

    Returns:
        StepRecord of the evaluation (not metered).
    """
    advance(model)
    t0 = time.perf_counter()
    loss, terms = step_fn()
    values = _values(loss, terms) if check else None
    seconds = time.perf_counter() - t0
    if check:
        _check_finite(values, names, where, hint)
    return StepRecord(loss=loss.detach(), values=values, seconds=seconds, meter=None)
