"""`pinnsketch solve burgers` under each storage policy with a fixed budget: error and time.

Question: does the command-line solver run on this device under each policy, and what
error and wall time does a fixed short budget give? Each run is the CLI itself in a
fresh process (`pinnsketch solve burgers --device D --storage S --steps N
--lbfgs-steps M --out DIR/burgers_S.h5`); the record takes the process's wall time
and the run file's root attributes (`l2_relative_error`, `wall_time_s` of training,
`saved_bytes_peak`, `device`).

    python benchmarks/solve_burgers.py --device cuda                        # -> results/solve_burgers_cuda.json
    python benchmarks/solve_burgers.py --device cpu --steps 20 --lbfgs-steps 2 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import torch

HERE = Path(__file__).resolve().parent


def cli_command() -> list[str]:
    """The `pinnsketch` console script of this environment, else `python -m pinnsketch.cli`."""
    exe = shutil.which("pinnsketch", path=str(Path(sys.executable).parent)) or shutil.which("pinnsketch")
    return [exe] if exe else [sys.executable, "-c", "import sys; from pinnsketch.cli import main; sys.exit(main())"]


def run_one(storage: str, opts, folder: Path) -> dict:
    h5 = folder / f"burgers_{storage}.h5"
    args = ["solve", "burgers", "--device", opts.device, "--storage", storage, "--steps", str(opts.steps),
            "--lbfgs-steps", str(opts.lbfgs_steps), "--seed", str(opts.seed), "--no-progress", "--out", str(h5)]
    if opts.points is not None:
        args[2:2] = ["--points", str(opts.points)]
    record = {"storage": storage, "command": "pinnsketch " + " ".join(args)}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cli_command() + args, capture_output=True, text=True, timeout=opts.timeout_s)
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout", "error": f"over {opts.timeout_s:.0f} s"}
    record["process_wall_s"] = time.perf_counter() - t0
    if out.returncode != 0:
        tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or [""]
        return {**record, "status": "failed", "error": f"exit {out.returncode}: {tail[0]}"}
    with h5py.File(h5, "r") as f:
        attrs = dict(f.attrs)
    record.update(status="ok", l2_relative_error=float(attrs["l2_relative_error"]),
                  training_wall_s=float(attrs["wall_time_s"]), steps=int(attrs["steps"]),
                  saved_bytes_peak=int(attrs["saved_bytes_peak"]), run_device=str(attrs["device"]),
                  stdout=out.stdout.strip().splitlines()[-2:])
    return record


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    cli.add_argument("--storages", nargs="+", default=["exact", "lowrank"])
    cli.add_argument("--steps", type=int, default=2000, help="Adam steps (default 2000)")
    cli.add_argument("--lbfgs-steps", type=int, default=300, help="L-BFGS iterations (default 300)")
    cli.add_argument("--points", type=int, default=None, help="interior collocation points (default: the problem's)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--timeout-s", type=float, default=None, help="per run; a run over it is recorded as timeout")
    cli.add_argument("--keep", default=None, metavar="DIR", help="keep the run files in DIR (default: a temp folder)")
    cli.add_argument("--out", default=None, help="default results/solve_burgers_<cuda|cpu>.json")
    opts = cli.parse_args(argv)
    if opts.steps < 0 or opts.lbfgs_steps < 0:
        cli.error(f"--steps and --lbfgs-steps must be >= 0, got {opts.steps} and {opts.lbfgs_steps}")
    device_type = torch.device(opts.device).type
    out = Path(opts.out or HERE / "results" / f"solve_burgers_{device_type}.json")

    from pinnsketch.data.bench import git_commit, jsonable

    with tempfile.TemporaryDirectory(prefix="solve_burgers_") as tmp:
        folder = Path(opts.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for storage in opts.storages:
            records.append(run_one(storage, opts, folder))
            r = records[-1]
            shown = (f"L2 {r['l2_relative_error']:.3e}, {r['process_wall_s']:.1f} s" if r["status"] == "ok"
                     else f"{r['status']}: {r['error']}")
            print(f"solve burgers --storage {storage:<8} {shown}", file=sys.stderr)
    info = {"gpu_name": torch.cuda.get_device_name(opts.device)} if device_type == "cuda" else {}
    payload = {
        "benchmark": "solve_burgers",
        "command": "python benchmarks/solve_burgers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": opts.device, **info, "steps": opts.steps, "lbfgs_steps": opts.lbfgs_steps, "points": opts.points, "seed": opts.seed,
        "torch": torch.__version__, "commit": git_commit(), "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
