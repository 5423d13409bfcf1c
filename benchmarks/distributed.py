"""Scaling of multi-process training (torchrun, gloo, CPU): time per Adam step at 1, 2 and 4 processes.

Question: how much does sharding the collocation points over processes buy? Strong scaling
keeps the total points fixed (`--strong-points`, split over the ranks); weak scaling keeps
the points per rank fixed (`--weak-points` each). Each configuration is one torchrun launch
(`python -m torch.distributed.run --nproc_per_node=P`), one torch thread per process, of
`ps.solve` on the library's Burgers problem (tanh `--width` x `--depth`, storage
`--storage`, `--steps` Adam steps, no L-BFGS, no refinement); the step time is the median
of rank 0's `history["step_time_s"]` after `--warmup` steps (it includes the all-reduce of
the loss and gradients). The configurations run in turn, `--rounds` times, so the machine's
other load falls on all alike; the figure is the median over rounds.

    strong efficiency(P) = t(1, N) / (P t(P, N))      weak efficiency(P) = t(1, n) / t(P, P n)

P = 1 runs without a process group (torchrun with one process runs the single-process solver).
The machine's CPU count and load average are recorded: with fewer free cores than processes
the processes share cores and the efficiency measures the sharing, not the method.

    python benchmarks/distributed.py                              # 1, 2, 4 processes, 2 rounds
    python benchmarks/distributed.py --procs 1,2 --rounds 1 --steps 10 --strong-points 4096 \\
        --weak-points 4096 --json /tmp/quick.json                 # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """One configuration, on every rank of a torchrun launch; rank 0 writes --json."""
    import torch

    torch.set_num_threads(1)
    import pinnsketch as ps
    from pinnsketch import problems

    class CpuClock(ps.Callback):
        """Rank 0's process CPU seconds at every step (all its threads: gloo's included)."""

        def __init__(self):
            self.marks = []

        def on_step(self, state):
            self.marks.append(time.process_time())

    clock = CpuClock()
    result = ps.solve(problems.get("burgers"), storage=args.storage, callbacks=[clock],
                      network=ps.Network(width=args.width, depth=args.depth, activation="tanh"),
                      adam=ps.Adam(steps=args.steps, lr=1e-3), lbfgs=ps.LBFGS(steps=args.lbfgs_steps),
                      points=ps.Points(domain=args.points, boundary=256, initial=256, refine=None),
                      seed=0, device="cpu", eval_every=10**9, eval_points=2000, progress=False)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    times = result.history["step_time_s"][args.warmup:]
    cpu = [b - a for a, b in zip(clock.marks[args.warmup - 1:-1], clock.marks[args.warmup:])]
    record = {"points": args.points, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times],
              "cpu_ms": 1e3 * statistics.median(cpu),
              "loss_last": result.history["loss"][-1], "distributed": result.config.get("distributed"),
              "step_peak_bytes": result.step_peak_bytes, "l2": result.l2_relative_error,
              "loss": result.history["loss"], "phase": result.history["phase"],
              "ranks": [r.get("rank") for r in result.storage_report]}
    Path(args.json).write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, points: int, opts: argparse.Namespace, lbfgs_steps: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
                   "--worker", "--points", str(points), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
                   "--storage", opts.storage, "--width", str(opts.width), "--depth", str(opts.depth),
                   "--lbfgs-steps", str(lbfgs_steps),
                   "--json", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch")
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{procs} processes, {points} points failed:\n{proc.stderr[-4000:]}")
        record = json.loads(out.read_text())
    record.update(launch_s=time.perf_counter() - t0, load_before=load_before, load_after=os.getloadavg()[0])
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument("--strong-points", type=int, default=16384, help="total points, strong scaling")
    parser.add_argument("--weak-points", type=int, default=16384, help="points per process, weak scaling")
    parser.add_argument("--steps", type=int, default=30, help="Adam steps per launch")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2, help="times every configuration runs")
    parser.add_argument("--storage", default="exact")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--json", default=None, help="default results/distributed.json "
                                                                "(--accuracy: results/distributed_accuracy.json)")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: one process against two on a longer run (--accuracy-steps Adam + "
                             "--accuracy-lbfgs L-BFGS, --strong-points points): per-step loss difference, final L2")
    parser.add_argument("--accuracy-steps", type=int, default=1500)
    parser.add_argument("--accuracy-lbfgs", type=int, default=200)
    parser.add_argument("--lbfgs-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--points", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(opts)
        return
    import torch

    from pinnsketch.data.bench import cpu_model, git_commit

    header = {"command": "python benchmarks/distributed.py " + " ".join(argv or sys.argv[1:]), "commit": git_commit(),
              "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads_per_process": 1,
              "backend": "gloo", "storage": opts.storage, "network": f"tanh 2-{opts.width}x{opts.depth}-1"}
    if opts.accuracy:
        accuracy(opts, header)
        return
    procs = [int(p) for p in opts.procs.split(",")]
    if 1 not in procs:
        raise SystemExit(f"--procs {opts.procs} must include 1 (the baseline of both efficiencies)")
    configs = sorted({(p, opts.strong_points if p == 1 else n) for p in procs
                      for n in (opts.strong_points, opts.weak_points * p)} | {(1, opts.weak_points)})
    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    load_start = os.getloadavg()
    for r in range(opts.rounds):
        for procs_, points in configs:
            record = launch(procs_, points, opts)
            runs[(procs_, points)].append(record)
            print(f"round {r + 1}: {procs_} processes, {points} points: {record['step_ms']:.1f} ms/step "
                  f"(load {record['load_before']:.1f})", file=sys.stderr)
    step = {c: statistics.median(x["step_ms"] for x in v) for c, v in runs.items()}
    cpu = {c: statistics.median(x["cpu_ms"] for x in v) for c, v in runs.items()}
    rows = []
    for p in procs:
        strong, weak = step[(p, opts.strong_points)], step[(p, opts.weak_points * p)]
        rows.append({"procs": p, "strong_points": opts.strong_points, "strong_ms_per_step": strong,
                     "strong_speedup": step[(1, opts.strong_points)] / strong,
                     "strong_efficiency": step[(1, opts.strong_points)] / (p * strong),
                     "weak_points_total": opts.weak_points * p, "weak_ms_per_step": weak,
                     "weak_efficiency": step[(1, opts.weak_points)] / weak,
                     # the same from rank 0's CPU time per step: the cost of sharding and the all-reduce
                     # without the waiting for a core that a loaded machine adds
                     "strong_cpu_efficiency": cpu[(1, opts.strong_points)] / (p * cpu[(p, opts.strong_points)]),
                     "weak_cpu_efficiency": cpu[(1, opts.weak_points)] / cpu[(p, opts.weak_points * p)]})
    payload = {
        "benchmark": "distributed", **header, "load_average_start": load_start, "steps": opts.steps,
        "warmup": opts.warmup,
        "rounds": opts.rounds, "rows": rows,
        "runs": [{"procs": p, "points": n, "records": v} for (p, n), v in runs.items()],
    }
    _write(opts.json or HERE / "results" / "distributed.json", payload)
    print("| processes | strong: ms/step | speedup | efficiency (CPU) | weak: total points | ms/step | "
          "efficiency (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['procs']} | {row['strong_ms_per_step']:.1f} | {row['strong_speedup']:.2f} | "
              f"{row['strong_efficiency']:.2f} ({row['strong_cpu_efficiency']:.2f}) | {row['weak_points_total']:,} | "
              f"{row['weak_ms_per_step']:.1f} | {row['weak_efficiency']:.2f} ({row['weak_cpu_efficiency']:.2f}) |")


def _write(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def accuracy(opts: argparse.Namespace, header: dict) -> None:
    """One process against two on the same global points: per-step loss difference and final L2."""
    opts.steps, opts.warmup = opts.accuracy_steps, 1
    one, two = (launch(p, opts.strong_points, opts, lbfgs_steps=opts.accuracy_lbfgs) for p in (1, 2))
    rows = []
    for phase in ("adam", "lbfgs"):
        a = [x for x, p in zip(one["loss"], one["phase"]) if p == phase]
        b = [x for x, p in zip(two["loss"], two["phase"]) if p == phase]
        n = min(len(a), len(b))
        rel = [abs(x - y) / abs(x) for x, y in zip(a[:n], b[:n])]
        rows.append({"phase": phase, "records_compared": n, "max_relative_loss_difference": max(rel, default=None),
                     "median_relative_loss_difference": statistics.median(rel) if rel else None,
                     "first_10_max": max(rel[:10], default=None)})
    payload = {"benchmark": "distributed_accuracy", **header, "points": opts.strong_points,
               "adam_steps": opts.accuracy_steps, "lbfgs_steps": opts.accuracy_lbfgs,
               "l2_one_process": one["l2"], "l2_two_processes": two["l2"], "l2_ratio": two["l2"] / one["l2"],
               "ranks_one_process": one["ranks"], "ranks_two_processes": two["ranks"], "rows": rows,
               "runs": {"1": one, "2": two}}
    _write(opts.json or HERE / "results" / "distributed_accuracy.json", payload)
    print(f"final L2: one process {one['l2']:.3e}, two {two['l2']:.3e} (ratio {payload['l2_ratio']:.3f})")
    for row in rows:
        print(f"{row['phase']}: {row['records_compared']} records, max relative loss difference "
              f"{row['max_relative_loss_difference']:.2e} (median {row['median_relative_loss_difference']:.2e})")


if __name__ == "__main__":
    main()
