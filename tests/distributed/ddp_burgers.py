"""A small Burgers solve that tests run in one process and under torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/ddp_burgers.py --json out.json

Rank 0 writes the per-step history to --json; every rank writes its own figures to
<json>.rank<R> (so tests can compare the ranks).
"""

from __future__ import annotations

import argparse
import json

import pinnsketch as ps
from pinnsketch import problems


def options(storage: str = "exact", steps: int = 20, lbfgs_steps: int = 5, points: int = 256,
            resample_every: int | None = None, refine_every: int | None = None) -> dict:
    """Keyword arguments of `ps.solve` for the test's Burgers run."""
    refine = None if refine_every is None else ps.RAR(every=refine_every, candidates=500, add=16, max_points=64)
    return dict(
        network=ps.Network(width=16, depth=2, activation="tanh"), storage=storage,
        adam=ps.Adam(steps=steps, lr=1e-3), lbfgs=ps.LBFGS(steps=lbfgs_steps, max_iter=1),
        points=ps.Points(domain=points, boundary=34, initial=33, resample_every=resample_every, refine=refine),
        seed=0, dtype="float32", device="cpu", eval_every=10_000, eval_points=500, progress=False,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="exact", help="comma-separated: one solve per policy")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lbfgs-steps", type=int, default=5)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--resample-every", type=int, default=None)
    parser.add_argument("--refine-every", type=int, default=None)
    parser.add_argument("--check-every", type=int, default=1)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    import faulthandler
    import signal

    import torch

    faulthandler.register(signal.SIGTERM, chain=True)  # a rank stopped by torchrun shows where it was

    torch.set_num_threads(1)
    records = {}
    for storage in args.storage.split(","):
        records[storage], rank = run(storage, args)
    with open(f"{args.json}.rank{rank}", "w") as f:
        json.dump(records, f)
    if rank == 0:
        with open(args.json, "w") as f:
            json.dump(records, f)


def run(storage: str, args) -> tuple[dict, int]:
    """One solve (the process group is created and destroyed by `solve`); (record, rank)."""
    import os

    result = ps.solve(problems.get("burgers"), **options(storage, args.steps, args.lbfgs_steps, args.points,
                                                         args.resample_every, args.refine_every),
                      distributed=ps.Distributed(timeout_s=60, check_every=args.check_every))
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank, "loss": result.history["loss"], "step": result.history["step"],
        "phase": result.history["phase"], "l2": result.l2_relative_error,
        "distributed": result.config.get("distributed"), "points": len(result.state.points.domain),
        "ranks": [r.get("rank") for r in result.storage_report],
        "refine": result.history["refine"],
        "params": [float(v) for p in result.model.parameters() for v in p.detach().reshape(-1)[:4]],
        "saved_bytes_peak": result.saved_bytes_peak,
    }
    return record, rank


if __name__ == "__main__":
    main()
