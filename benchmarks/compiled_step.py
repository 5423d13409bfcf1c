"""solve(compile=True) against eager pinnsketch and DeepXDE on DeepXDE's Burgers set-up, interleaved.

Question: how much faster is a compiled Adam iteration than an eager one and than
DeepXDE's, how far is it from the matrix-product floor, and is the error after the
same iterations the same?

Set-up: as benchmarks/vs_deepxde.py (2540 interior / 80 boundary / 160 initial
Hammersley points, a 2-20x3-1 tanh network, Adam lr 1e-3, one thread). Each variant
(pinnsketch eager exact, compiled exact, eager lowrank; DeepXDE) takes `--chunk`
Adam iterations in turn, `--rounds` times, so machine load falls on all alike; the
pinnsketch variants run the solver's unmetered Adam step on `_Run` objects built by
the solver: eager, zero_grad, loss terms, finiteness read, backward and torch's fused
Adam; compiled (CPU), one compiled call for loss, gradient and update
(`pinnsketch.pinn.compiled.CompiledAdam`), then the finiteness read. Reported: median
over rounds of the main thread's CPU ms per iteration (and wall ms). The floor is
the step's matrix products alone (forward a W^T per block on all streams, backward
g W and g^T a), timed in the same rounds. The error: `solve` for `--l2-steps` Adam
iterations, eager and compiled, same seed.

    python benchmarks/compiled_step.py                       # 20 rounds x 50 iterations
    python benchmarks/compiled_step.py --rounds 4 --chunk 20 --l2-steps 0   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
NU = 0.01 / math.pi


def burgers(x_ref=None, u_ref=None):
    from vs_deepxde import deepxde_burgers_problem

    return deepxde_burgers_problem(x_ref, u_ref)


def options(storage: str, steps: int, seed: int) -> dict:
    import pinnsketch.pinn as pp

    return dict(network=pp.Network(width=20, depth=3, activation="tanh"), storage=storage,
                adam=pp.Adam(steps=steps, lr=1e-3, schedule="constant"), lbfgs=pp.LBFGS(steps=0),
                points=pp.Points(domain=2540, boundary=80, initial=160, sampler="hammersley", refine=None),
                seed=seed, device="cpu", eval_every=10**9, progress=False)


class PinnStepper:
    """The solver's Adam step on a `_Run` of `problem` with solve() keyword arguments `given`
    (loss source: eager objective or compiled loss)."""

    def __init__(self, problem, given: dict, compile_: bool):
        from pinnsketch.pinn.solver import _check_options, _resolve, _Run

        o = _resolve(problem, given)
        _check_options(o)
        self.run = _Run(problem, o, given.get("storage"), (), False, compile_)
        self.opt = o["adam"].build(self.run.params)
        t0 = time.perf_counter()
        sources = [s for s in (self.run.loss_source, self.run.adam_step) if callable(getattr(s, "prepare", None))]
        for source in sources:
            source.prepare()
        self.compile_s = time.perf_counter() - t0 if sources else None
        fused = self.run.adam_step
        self.fused = fused if fused is not None and fused.active and fused.usable(self.opt) else None

    def steps(self, n: int) -> None:
        from pinnsketch.training import fused_step, train_step

        run, opt, fused = self.run, self.opt, self.fused
        for _ in range(n):        # the solver's unmetered Adam step (one compiled call where solve uses one)
            if fused is not None:
                fused_step(run.network, lambda: fused.step(opt), names=run._names)
            else:
                train_step(run.network, opt, run._loss, names=run._names)


class FloorStepper:
    """The matrix products of one exact step alone: per block a W^T (forward), g W and g^T a (backward)."""

    def __init__(self, streams: int, points: int, sizes: list[int]):
        gen = torch.Generator().manual_seed(0)
        rows = streams * points
        self.blocks = [(torch.randn(rows, a, generator=gen), torch.randn(b, a, generator=gen),
                        torch.randn(rows, b, generator=gen), i > 0) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def steps(self, n: int) -> None:
        for _ in range(n):
            for a, w, g, needs_input_grad in self.blocks:
                torch.mm(a, w.T)
                torch.mm(g.T, a)
                if needs_input_grad:
                    torch.mm(g, w)


class DeepXDEStepper:
    def __init__(self, seed: int):
        os.environ.setdefault("DDE_BACKEND", "pytorch")
        from vs_deepxde import deepxde_burgers_model

        device = torch.get_default_device()
        self.model = deepxde_burgers_model(seed)           # vs_deepxde.py's set-up, DeepXDE's own API
        torch.set_default_device(None if device.type == "cpu" else device)  # undo deepxde's import-time switch

    def steps(self, n: int) -> None:
        self.model.train(iterations=n, display_every=10**9, verbose=0)


def l2_after(steps: int, seed: int, compile_: bool, x_ref, u_ref) -> float:
    from pinnsketch.pinn import solve

    return solve(burgers(x_ref, u_ref), compile=compile_, **options("exact", steps, seed)).l2_relative_error


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--rounds", type=int, default=20)
    cli.add_argument("--chunk", type=int, default=50, help="Adam iterations per variant per round")
    cli.add_argument("--warmup", type=int, default=20)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--l2-steps", type=int, default=2000, help="Adam iterations for the error check (0: skip)")
    cli.add_argument("--out", default=str(HERE / "results" / "compiled_step.json"))
    opts = cli.parse_args(argv)
    torch.set_num_threads(1)
    from pinnsketch.data.bench import cpu_model, git_commit

    variants = {"eager_exact": PinnStepper(burgers(), options("exact", 1, opts.seed), False),
                "compiled_exact": PinnStepper(burgers(), options("exact", 1, opts.seed), True),
                "eager_lowrank": PinnStepper(burgers(), options("lowrank", 1, opts.seed), False)}
    spec = variants["eager_exact"].run.objective.spec
    variants["matmul_floor"] = FloorStepper(spec.size, 2540 + 80 + 160, [2, 20, 20, 20, 1])
    try:
        variants["deepxde"] = DeepXDEStepper(opts.seed)
    except ImportError as exc:
        print(f"deepxde not importable ({exc}); skipped", file=sys.stderr)
    cpu = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    for v in variants.values():
        v.steps(opts.warmup)
    for r in range(opts.rounds):
        for name, v in variants.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            v.steps(opts.chunk)
            cpu[name].append(1e3 * (time.thread_time() - c0) / opts.chunk)
            wall[name].append(1e3 * (time.perf_counter() - t0) / opts.chunk)
        print(f"round {r + 1}/{opts.rounds}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}" for k in variants), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "command": "python benchmarks/compiled_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(), "threads": 1,
        "rounds": opts.rounds, "chunk": opts.chunk,
        "cpu_ms_per_iter": med, "wall_ms_per_iter": {k: statistics.median(v) for k, v in wall.items()},
        "compile_s": variants["compiled_exact"].compile_s,
        "compiled_over_floor": med["compiled_exact"] / med["matmul_floor"],
        "speedup_compiled_vs_eager_exact": med["eager_exact"] / med["compiled_exact"],
    }
    if "deepxde" in med:
        out["speedup_vs_deepxde"] = {k: med["deepxde"] / med[k] for k in ("eager_exact", "compiled_exact", "eager_lowrank")}
    if opts.l2_steps:
        from vs_deepxde import reference

        x_ref, u_ref = reference(None)
        out["l2_steps"] = opts.l2_steps
        out["l2"] = {"eager_exact": l2_after(opts.l2_steps, opts.seed, False, x_ref, u_ref),
                     "compiled_exact": l2_after(opts.l2_steps, opts.seed, True, x_ref, u_ref)}
    print(json.dumps(out, indent=1))
    Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
