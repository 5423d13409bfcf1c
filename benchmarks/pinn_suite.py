"""The PDE library under `exact` and `lowrank` storage: error, time, activation memory.

Question: does every library problem reach its tolerance with its default
settings, and what do sketched activations (`lowrank`) cost in accuracy and
save in memory against `exact`, on the same seed?

For each problem (`pinnsketch problems`) and storage policy, one `solve` with the
problem's defaults; recorded: relative L2 error against the reference, the
problem's tolerance and whether it was met, wall time, ms per Adam / L-BFGS
step, peak bytes autograd saved for backward (MemoryMeter), and lowrank's
error and memory relative to exact. Results go to benchmarks/results/pinn_suite.json
and a Markdown table is printed.

    OMP_NUM_THREADS=2 python benchmarks/pinn_suite.py                      # full defaults (long on CPU)
    python benchmarks/pinn_suite.py --problems burgers heat --device cuda
    python benchmarks/pinn_suite.py --steps 500 --lbfgs-steps 100          # quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run_one(name: str, storage: str, opts) -> dict:
    from pinnsketch import problems
    from pinnsketch.pinn.solver import problem_defaults, solve

    problem = problems.get(name)
    base = problem_defaults(problem)
    kwargs = {"storage": storage, "seed": opts.seed, "device": opts.device, "progress": False}
    if opts.steps is not None:
        kwargs["adam"] = dataclasses.replace(base["adam"], steps=opts.steps)
    if opts.lbfgs_steps is not None:
        kwargs["lbfgs"] = dataclasses.replace(base["lbfgs"], steps=opts.lbfgs_steps)
    start = time.perf_counter()
    record = {"problem": name, "storage": storage, "tolerance": getattr(problem, "tolerance", None)}
    try:
        result = solve(problem, **kwargs)
    except Exception as exc:  # a failing problem is a result too; the table names the error
        record.update(error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
        return record
    tol, l2 = record["tolerance"], result.l2_relative_error
    record.update(
        l2_relative_error=l2,
        l2_per_field=result.l2_per_field,
        passed=None if tol is None or l2 is None else bool(l2 <= tol),
        wall_s=time.perf_counter() - start,
        adam_steps=result.timing["adam_steps"],
        lbfgs_steps=result.timing["lbfgs_steps"],
        adam_ms_per_step=result.timing["adam_ms_per_step"],
        lbfgs_ms_per_step=result.timing["lbfgs_ms_per_step"],
        saved_bytes_peak=result.saved_bytes_peak,
        parameters=result.parameters,
        config=result.config,
    )
    return record


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table(records: list[dict]) -> str:
    """Markdown: one row per problem, exact and lowrank side by side."""
    by = {(r["problem"], r["storage"]): r for r in records}
    names = sorted({r["problem"] for r in records})
    storages = list(dict.fromkeys(r["storage"] for r in records))
    head = ["problem", "tol"]
    for s in storages:
        head += [f"L2 {s}", f"time {s} (s)", f"saved {s} (MiB)"]
    if {"exact", "lowrank"} <= set(storages):
        head += ["L2 lowrank/exact", "memory lowrank/exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        row = [name, _fmt(next((by[(name, s)]["tolerance"] for s in storages if (name, s) in by), None), "g")]
        for s in storages:
            r = by.get((name, s), {})
            if "error" in r:
                row += [f"error: {r['error'][:40]}", _fmt(r.get("wall_s"), ".0f"), "-"]
                continue
            mark = "" if r.get("passed") in (None, True) else " (miss)"
            saved = r.get("saved_bytes_peak")
            row += [_fmt(r.get("l2_relative_error"), ".2e") + mark, _fmt(r.get("wall_s"), ".0f"),
                    _fmt(None if saved is None else saved / 2**20, ".2f")]
        if {"exact", "lowrank"} <= set(storages):
            e, lr = by.get((name, "exact"), {}), by.get((name, "lowrank"), {})
            ratio = mem = None
            if e.get("l2_relative_error") and lr.get("l2_relative_error") is not None:
                ratio = lr["l2_relative_error"] / e["l2_relative_error"]
            if e.get("saved_bytes_peak") and lr.get("saved_bytes_peak") is not None:
                mem = lr["saved_bytes_peak"] / e["saved_bytes_peak"]
            row += [_fmt(ratio, ".2f"), _fmt(mem, ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from pinnsketch import problems

    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--problems", nargs="+", default=None, metavar="NAME", help="default: the whole library")
    cli.add_argument("--storages", nargs="+", default=["exact", "lowrank"], metavar="POLICY")
    cli.add_argument("--steps", type=int, default=None, help="override every problem's Adam steps")
    cli.add_argument("--lbfgs-steps", type=int, default=None, help="override every problem's L-BFGS steps")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--device", default="auto")
    cli.add_argument("--out", default=str(HERE / "results" / "pinn_suite.json"))
    opts = cli.parse_args(argv)
    names = opts.problems or problems.names()
    unknown = sorted(set(names) - set(problems.names()))
    if unknown:
        cli.error(f"unknown problems {unknown}; choose from {problems.names()}")

    from pinnsketch.data.bench import git_commit, jsonable

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "pinn_suite",
        "command": "python benchmarks/pinn_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "machine": platform.machine(), "commit": git_commit(), "records": [],
    }
    for name in names:
        for storage in opts.storages:
            record = run_one(name, storage, opts)
            payload["records"].append(record)
            l2 = record.get("l2_relative_error")
            print(f"{name:20s} {storage:10s} L2 {_fmt(l2, '.3e'):>10s}  {record['wall_s']:7.1f} s"
                  + (f"  {record['error']}" if "error" in record else ""), file=sys.stderr, flush=True)
            # rewrite after every run so an interrupted suite keeps what it measured
            out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    print(table(payload["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
