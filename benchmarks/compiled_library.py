"""solve(compile=True) across the PDE library: compiled against eager Adam iterations at each problem's defaults.

Question: on the library's own problems, with their default networks (tanh MLPs 32-96 wide; allen_cahn's
PirateNet with Fourier features, a periodic embedding and factorized weights) and point sets, how much
faster is a compiled `exact` Adam iteration than an eager one, and does it train the same?

For each problem two `_Run`s are built by the solver at the problem's defaults with storage="exact",
one eager and one compiled (the compile time is measured apart), and they take `--chunk` Adam
iterations in turn, `--rounds` times, so machine load falls on both alike (compiled_step.py's
`PinnStepper`: the solver's unmetered Adam step, one compiled call for loss, gradient and update on
the CPU). Reported per problem: the median over rounds of the main thread's CPU ms per iteration,
the speedup (eager / compiled), the compile time, and the relative difference of the two runs' loss
and the largest difference of their parameters after the same iterations from the same seed
(float32 rounding differences only).

    python benchmarks/compiled_library.py                              # every problem, 8 rounds x 10
    python benchmarks/compiled_library.py --problems allen_cahn burgers --rounds 4

Writes results/compiled_library.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(name: str, rounds: int, chunk: int, warmup: int, seed: int) -> dict:
    """Interleaved eager / compiled Adam iterations of problem `name` at its defaults (storage exact)."""
    from compiled_step import PinnStepper

    from pinnsketch import problems

    given = dict(storage="exact", seed=seed, device="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # torch's deprecation notices while compiling
        # one problem instance per run: a run binds the problem's trainable coefficients to its own
        eager = PinnStepper(problems.get(name), given, False)
        compiled = PinnStepper(problems.get(name), given, True)
    if compiled.fused is None and compiled.run.loss_source is compiled.run.objective:
        raise RuntimeError(f"{name}: the compiled run fell back to eager; nothing to compare")
    cpu = {"eager": [], "compiled": []}
    for stepper in (eager, compiled):
        stepper.steps(warmup)
    for _ in range(rounds):
        for key, stepper in (("eager", eager), ("compiled", compiled)):
            c0 = time.thread_time()
            stepper.steps(chunk)
            cpu[key].append(1e3 * (time.thread_time() - c0) / chunk)
    losses = []
    for stepper in (eager, compiled):
        with torch.no_grad():
            losses.append(float(stepper.run.objective.total(stepper.run.objective.terms())))
    pe, pc = (torch.cat([p.detach().flatten() for p in s.run.params]) for s in (eager, compiled))
    net = stepper.run.o["network"]
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "problem": name, "architecture": net.architecture, "width": net.width, "depth": net.depth,
        "options": {k: bool(getattr(net, k)) for k in ("fourier", "periodic", "factorized")},
        "points": len(eager.run.objective.x_all), "iterations": warmup + rounds * chunk,
        "eager_cpu_ms": med["eager"], "compiled_cpu_ms": med["compiled"],
        "speedup": med["eager"] / med["compiled"],
        "speedup_quartiles": _quartiles([e / c for e, c in zip(cpu["eager"], cpu["compiled"])]),
        "compile_s": compiled.compile_s,
        "loss_eager": losses[0], "loss_compiled": losses[1],
        "loss_rel_diff": abs(losses[0] - losses[1]) / max(abs(losses[0]), 1e-30),
        "param_max_diff": float((pe - pc).abs().max()), "param_max_abs": float(pe.abs().max()),
    }


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [q[0], q[2]]


def main(argv=None) -> int:
    from pinnsketch import problems

    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--problems", nargs="+", default=problems.names(), choices=problems.names())
    cli.add_argument("--rounds", type=int, default=8)
    cli.add_argument("--chunk", type=int, default=10, help="Adam iterations per variant per round")
    cli.add_argument("--warmup", type=int, default=5)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--out", default=str(HERE / "results" / "compiled_library.json"))
    opts = cli.parse_args(argv)
    torch.set_num_threads(1)
    from pinnsketch.data.bench import cpu_model, git_commit

    records = []
    for name in opts.problems:
        record = measure(name, opts.rounds, opts.chunk, opts.warmup, opts.seed)
        records.append(record)
        print(f"{name}: eager {record['eager_cpu_ms']:.1f} ms, compiled {record['compiled_cpu_ms']:.1f} ms, "
              f"{record['speedup']:.2f}x, compile {record['compile_s']:.0f} s, loss diff {record['loss_rel_diff']:.1e}, "
              f"parameter diff {record['param_max_diff']:.1e}",
              file=sys.stderr)
    out = {"command": "python benchmarks/compiled_library.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(), "threads": 1,
           "rounds": opts.rounds, "chunk": opts.chunk, "records": records}
    Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
