"""Time-window marching (`ps.TimeWindows`) against one network on the whole interval, at equal total steps.

Question: at a short budget, does training `allen_cahn` (or `burgers`) as K time windows in turn
lower the relative L2 error against training one network on [0, 1] for the same total number of
Adam and L-BFGS steps?

Each row is one `ps.solve` of the library problem, one torch thread, in this process. The
unwindowed rows run `--adam` Adam and `--lbfgs` L-BFGS iterations; a row with K windows runs
`--adam / K` and `--lbfgs / K` in each window (the budgets of `solve` are per window), so every
row trains the same total steps. Every row uses `Points(domain=--points, refine=None)` (per window
with windows: K times the density; residual refinement off, since its period exceeds a window's
steps at these budgets) and the problem's network. The error is the final relative L2 against the
problem's reference; with windows also each window's error on its own times.

    OMP_NUM_THREADS=1 python benchmarks/time_windows.py --problem allen_cahn --adam 2000 --lbfgs 400
    OMP_NUM_THREADS=1 python benchmarks/time_windows.py --problem allen_cahn --rows one_network windows4 --seed 1
    python benchmarks/time_windows.py --quick --out /tmp/tw.json       # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import pinnsketch as ps
from pinnsketch import problems
from pinnsketch.data.bench import cpu_model, git_commit

OUT = Path(__file__).parent / "results" / "time_windows.json"
ROWS = {  # row -> (windows, causal)
    "one_network": (None, None),
    "windows4": (4, None),
    "causal": (None, ps.Causal(chunks=16, tol=1.0)),
    "windows4_causal": (4, ps.Causal(chunks=4, tol=1.0)),  # 16 chunks over [0, 1], 4 per window
}


def run_row(problem: str, name: str, args) -> dict:
    windows, causal = ROWS[name]
    k = windows or 1
    if args.adam % k or args.lbfgs % k:
        raise SystemExit(f"--adam {args.adam} and --lbfgs {args.lbfgs} must be multiples of the windows ({k})")
    t0 = time.perf_counter()
    result = ps.solve(problems.get(problem), storage=args.storage, adam=ps.Adam(steps=args.adam // k),
                      lbfgs=ps.LBFGS(steps=args.lbfgs // k), points=ps.Points(domain=args.points, refine=None),
                      windows=None if windows is None else ps.TimeWindows(windows), causal=causal,
                      eval_every=max(args.adam // k, 1), seed=args.seed, progress=False)
    record = {
        "problem": problem, "row": name, "storage": args.storage, "seed": args.seed, "windows": windows,
        "causal": None if causal is None else result.config["causal"],
        "l2_relative_error": result.l2_relative_error,
        "adam_steps_per_window": args.adam // k, "lbfgs_steps_per_window": args.lbfgs // k,
        "adam_steps": result.timing["adam_steps"], "lbfgs_steps": result.timing["lbfgs_steps"],
        "points_per_window": args.points, "network": result.config["network"],
        "train_wall_s": result.timing["total_s"], "process_wall_s": time.perf_counter() - t0,
    }
    if windows is not None:
        w = result.history["windows"]
        record["per_window"] = {key: w[key] for key in ("t0", "t1", "first_step", "last_step", "l2_relative_error")}
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="allen_cahn", choices=["allen_cahn", "burgers"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--adam", type=int, default=2000, help="total Adam steps (split over the windows)")
    parser.add_argument("--lbfgs", type=int, default=400, help="total L-BFGS iterations (split over the windows)")
    parser.add_argument("--points", type=int, default=4000, help="interior points (per window with windows)")
    parser.add_argument("--storage", default="exact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 + 4 steps, 200 points per row (smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.adam, args.lbfgs, args.points = 8, 4, 200
    torch.set_num_threads(1)
    for name in args.rows:
        record = run_row(args.problem, name, args)
        record.update(command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), commit=git_commit(),
                      torch=torch.__version__, cpu=cpu_model(), threads=torch.get_num_threads(),
                      python=platform.python_version(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                      measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        print(f"{args.problem} {name} seed {args.seed}: L2 {record['l2_relative_error']:.3e} wall {record['train_wall_s']:.0f}s"
              + (f" per window {record['per_window']['l2_relative_error']}" if "per_window" in record else ""),
              flush=True)
        if not args.quick or args.out != OUT:
            data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
            key = (record["problem"], record["row"], record["storage"], record["seed"])
            data["rows"] = [r for r in data["rows"]
                            if (r["problem"], r["row"], r["storage"], r.get("seed", 0)) != key] + [record]
            args.out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
