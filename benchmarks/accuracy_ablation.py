"""Accuracy ablation of the training options on `burgers` and `allen_cahn` (issue 15).

Question: which training options (gradient-norm loss balancing, causal weighting,
warm-up + exponential decay, SOAP instead of Adam) lower the relative L2 error of
the library problems, each switched on alone against the problem's defaults, all
together, and SOAP against the L-BFGS stage at equal wall time?

Each row is one `ps.solve` of the library problem at its `solver_defaults` with
the row's options on top, one torch thread, in this process (rows run one after
another). Every run stops at its iteration budget or after `--cap` seconds of
process CPU time in training (`TimeLimit`; CPU, not wall, time because the machine
is shared), whichever comes first, so rows compare at equal (or smaller) time;
`steps_done` and `stopped_by` say which. Adam (or SOAP) runs `ADAM_STEPS`, then
L-BFGS until the cap. The error is the
final relative L2 against the problem's reference. Rows are merged by key into
the JSON (a rerun of some rows keeps the others).

    python benchmarks/accuracy_ablation.py --problem burgers --rows baseline balance --cap 100
    python benchmarks/accuracy_ablation.py --problem burgers --rows baseline --cap 20 --quick   # smoke test
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
from pinnsketch.pinn.options import Constant, Cosine

OUT = Path(__file__).parent / "results" / "accuracy_ablation.json"

ADAM_STEPS = 1_000  # then L-BFGS until the cap: the machine this ran on was shared by a dozen jobs
WARMUP_EXP = ps.WarmupExponential(warmup=100, decay_rate=0.9, decay_steps=50)  # 0.15 of lr at the end of Adam
BALANCE = ps.GradNormWeights(every=100, alpha=0.9)
CAUSAL = ps.Causal(chunks=16, tol=1.0)


def rows(problem: str) -> dict[str, dict]:
    """Row name -> solve() keywords on top of the problem's defaults (baseline: Adam with cosine decay)."""
    return {
        "baseline": {"adam": ps.Adam(steps=ADAM_STEPS, schedule=Cosine(final=0.05))},
        "balance": {"adam": ps.Adam(steps=ADAM_STEPS, schedule=Cosine(final=0.05)), "balance": BALANCE},
        "causal": {"adam": ps.Adam(steps=ADAM_STEPS, schedule=Cosine(final=0.05)), "causal": CAUSAL},
        "warmup_exp": {"adam": ps.Adam(steps=ADAM_STEPS, schedule=WARMUP_EXP)},
        "soap": {"adam": ps.SOAP(steps=ADAM_STEPS, schedule=Cosine(final=0.05))},
        # equal time: a first-order method until the cap, against the baseline's Adam + L-BFGS
        "soap_only": {"adam": ps.SOAP(steps=1_000_000, schedule=Constant()), "lbfgs": ps.LBFGS(steps=0)},
        "adam_only": {"adam": ps.Adam(steps=1_000_000, schedule=Constant()), "lbfgs": ps.LBFGS(steps=0)},
        "all": {"balance": BALANCE, "causal": CAUSAL, "adam": ps.Adam(steps=ADAM_STEPS, schedule=WARMUP_EXP)},
    }


class TimeLimit(ps.Callback):
    """Stop training once the process has spent `seconds` of CPU time in it (one thread; fair on a shared machine)."""

    def __init__(self, seconds: float):
        self.seconds, self.hit, self.start = seconds, False, None

    def on_start(self, state):
        self.start = time.process_time()

    def on_step(self, state):
        if time.process_time() - self.start >= self.seconds:
            self.hit = state.stop_training = True


def run_row(problem: str, name: str, storage: str, cap: float, quick: bool) -> dict:
    options = dict(rows(problem)[name])
    if quick:
        options.setdefault("adam", ps.Adam(steps=20))
        options["lbfgs"] = ps.LBFGS(steps=5)
        options["points"] = ps.Points(domain=500, boundary=50, initial=50)
    limit = TimeLimit(cap)
    t0 = time.perf_counter()
    result = ps.solve(problems.get(problem), storage=storage, progress=False, callbacks=[limit], **options)
    ev = result.history["eval"]
    record = {
        "problem": problem, "row": name, "storage": storage, "l2_relative_error": result.l2_relative_error,
        "tolerance": problems.get(problem).tolerance,
        "options": {k: result.config[k] for k in ("adam", "lbfgs", "balance", "causal", "points", "network")},
        "steps_done": result.config["steps_done"], "adam_steps": result.timing["adam_steps"],
        "lbfgs_steps": result.timing["lbfgs_steps"], "train_wall_s": result.timing["total_s"],
        "process_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - limit.start,
        "stopped_by": "cap" if limit.hit else (result.history.get("lbfgs_stop", {}).get("reason") or "budget"),
        "eval": {"step": ev["step"], "l2_relative_error": ev["l2_relative_error"]},
    }
    if "causal" in result.history:
        mw = result.history["causal"]["min_weight"]
        record["causal_min_weight_last"] = mw[-1] if mw else None
    if "balance" in result.history and result.history["balance"]["weights"]:
        record["balance_weights_last"] = dict(zip(result.config["terms"], result.history["balance"]["weights"][-1]))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True, choices=["burgers", "allen_cahn"])
    parser.add_argument("--rows", nargs="+", default=["baseline"])
    parser.add_argument("--storage", default="exact")
    parser.add_argument("--cap", type=float, default=100.0, help="training CPU seconds per row")
    parser.add_argument("--quick", action="store_true", help="a few steps per row (smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows) - set(rows(args.problem)))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(rows(args.problem))}")
    torch.set_num_threads(1)
    for name in args.rows:
        record = run_row(args.problem, name, args.storage, args.cap, args.quick)
        record.update(command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), commit=git_commit(),
                      torch=torch.__version__, cpu=cpu_model(), threads=torch.get_num_threads(),
                      python=platform.python_version(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                      measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        print(f"{args.problem} {name} {args.storage}: L2 {record['l2_relative_error']:.3e} "
              f"steps {record['steps_done']} wall {record['train_wall_s']:.0f}s ({record['stopped_by']})", flush=True)
        if not args.quick or args.out != OUT:
            data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
            key = (record["problem"], record["row"], record["storage"])
            data["rows"] = [r for r in data["rows"] if (r["problem"], r["row"], r["storage"]) != key] + [record]
            args.out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
