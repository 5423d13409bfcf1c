"""The memory of a training step on every library problem, `lowrank` against `exact`.

Question: is `lowrank` never worse than `exact` in the memory a step needs, on every problem of
the library at its default network and points, including the narrow networks where compression
does not pay?

For each problem and storage policy: `solve` with the problem's defaults except a short budget
(`--steps` Adam steps, `--lbfgs-steps` L-BFGS iterations; memory does not depend on the number of
steps), the peak of all live tensor bytes of the metered steps above their start
(`result.step_peak_bytes`: the first Adam step and the first L-BFGS step; on the CPU from the
allocator's events) and the peak bytes saved for backward (`result.saved_bytes_peak`).

    python benchmarks/peak_by_problem.py
    python benchmarks/peak_by_problem.py --problems burgers poisson --device cuda

Writes results/peak_by_problem.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    import pinnsketch as ps
    from pinnsketch import problems
    from pinnsketch.data.bench import git_commit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=problems.names(), choices=problems.names())
    p.add_argument("--storages", nargs="+", default=["exact", "lowrank"])
    p.add_argument("--steps", type=int, default=20, help="Adam steps (lowrank's controller settles meanwhile)")
    p.add_argument("--lbfgs-steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "results" / "peak_by_problem.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    for name in args.problems:
        row = {}
        for storage in args.storages:
            result = ps.solve(problems.get(name), storage=storage, adam=ps.Adam(steps=args.steps),
                              lbfgs=ps.LBFGS(steps=args.lbfgs_steps), device=args.device, progress=False)
            row[storage] = {"step_peak_bytes": result.step_peak_bytes, "saved_bytes_peak": result.saved_bytes_peak,
                            "modes": sorted({str(r.get("mode")) for r in result.storage_report if r.get("mode")})}
        record = {"problem": name, **row}
        if "exact" in row:
            for storage in args.storages:
                for key in ("step_peak_bytes", "saved_bytes_peak"):
                    ref, mine = row["exact"][key], row[storage][key]
                    row[storage][f"{key}_ratio_to_exact"] = None if not ref or mine is None else mine / ref
        records.append(record)
        print(f"| {name} | " + " | ".join(
            f"{storage}: {row[storage]['step_peak_bytes'] / 2**20:.2f} MiB step peak, "
            f"{row[storage]['saved_bytes_peak'] / 2**20:.2f} MiB saved" for storage in args.storages) + " |",
            flush=True)
    out = {"command": "python benchmarks/peak_by_problem.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), "torch": torch.__version__, "device": args.device, "threads": args.threads,
           "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
